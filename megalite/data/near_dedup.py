"""Near-duplicate removal: MinHash signatures (in the preprocess workers) and an LSH index that
decides in input order (in the main process), so the first occurrence is kept whatever the
number of workers.

Signature. A document's text is lowercased and cut into shingles: word n-grams (a word is a run
of ASCII letters and digits or of non-ASCII characters; punctuation and whitespace separate
words) or character n-grams (whitespace runs count as one space). A document shorter than n
words (characters) is one shingle. Each shingle is hashed to 32 bits (polynomial hashes over its
bytes and words, then murmur3's 64-bit finaliser, whose top half is taken), and signature value
i is the minimum over the document's distinct shingles x of h_i(x) = (a_i x + b_i) mod 2^32, a_i
odd: the minimum is decided by the leading bits, which are Dietzfelbinger's multiply-shift hash
of x (a universal family); a_i and b_i come from a fixed seed, so signatures are the same in
every process and run. Measured against exact Jaccard on planted near-duplicates the estimate
is unbiased within 0.01 (tests/test_data_near_dedup.py). P(sig_A[i] == sig_B[i]) is the Jaccard
similarity of the two shingle sets, and the signature of a union is the elementwise minimum
(pieces of a long document combine exactly, but for the shingles that straddle two pieces).

Index. The signature is cut into `bands` bands of `rows = num_perm // bands` values; each band
hashes to a 64-bit key. Two documents are candidates when any band key is equal (probability
1 - (1 - J^rows)^bands), and a candidate is a duplicate when its estimated Jaccard (the fraction
of equal signature values) reaches the threshold. A document is dropped when it is a near
duplicate of an earlier kept one; kept documents enter the index. What is kept per kept
document: its signature's low 16 bits (2 * num_perm bytes: b-bit minwise hashing, whose
estimate is corrected for the 2^-16 chance that unequal values agree) and its band keys with
its number (12 bytes per band), in sorted runs merged like a log-structured tree.
"""

import numpy as np

_SEED = 0x6D696E68617368  # fixed: signatures must be the same in every process and run
_U64 = np.uint64
_MASK32 = _U64(0xFFFFFFFF)
_B = 0x100000001B3  # odd multipliers of the polynomial hashes (mod 2^64)
_C = 0x9E3779B97F4A7C15
_D = 0xC2B2AE3D27D4EB4F
_CHUNK = 8192  # shingles per [num_perm, chunk] block in the min-hash loop
_CAP = 16  # matches taken per band key and run (earliest documents first)
_BLOCK = 1 << 16  # stored signatures per block
_GROUP = 1 << 18  # characters of text hashed at a time

# A byte is part of a word: ASCII letters and digits, and every byte of a non-ASCII character.
_WORD_BYTE = np.zeros(256, dtype=bool)
for _c in b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789":
    _WORD_BYTE[_c] = True
_WORD_BYTE[0x80:] = True


def fmix64(x):
    """murmur3's 64-bit finaliser, elementwise on a uint64 array (a new array)."""
    x = x ^ (x >> _U64(33))
    x *= _U64(0xFF51AFD7ED558CCD)
    x ^= x >> _U64(33)
    x *= _U64(0xC4CEB9FE1A85EC53)
    x ^= x >> _U64(33)
    return x


def _pow_table(base, n):
    """base^k mod 2^64 for k < n."""
    t = np.full(max(n, 1), base, dtype=_U64)
    t[0] = 1
    return np.cumprod(t)


def _word_hashes(raw):
    """uint8 text -> (64-bit hash of every word, in order; the words' start offsets)."""
    is_word = _WORD_BYTE[raw]
    mask = np.zeros(len(raw) + 2, dtype=np.int8)
    mask[1:-1] = is_word
    edges = np.diff(mask)
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    if not len(starts):
        return np.zeros(0, _U64), starts
    lens = ends - starts
    first = np.cumsum(lens) - lens  # of each word in the compacted word bytes
    pos = np.arange(int(lens.sum())) - np.repeat(first, lens)
    vals = (raw[is_word].astype(_U64) + _U64(1)) * _pow_table(_B, int(lens.max()))[pos]
    return fmix64(np.add.reduceat(vals, first)), starts


def _tokens(texts, unit):
    """-> (token values uint64, token counts per document int64)."""
    if unit == "char":
        cleaned = [" ".join(t.lower().split()) for t in texts]
        counts = np.fromiter(map(len, cleaned), np.int64, count=len(cleaned))
        data = "".join(cleaned).encode("utf-32-le", "surrogatepass")
        return np.frombuffer(data, np.uint32).astype(_U64) + _U64(1), counts
    parts = [t.lower().encode("utf-8", "surrogatepass") for t in texts]
    byte_counts = np.fromiter(map(len, parts), np.int64, count=len(parts))
    raw = np.frombuffer(b"\n".join(parts), np.uint8)  # "\n" is no word byte: words stay inside
    words, starts = _word_hashes(raw)
    doc_starts = np.cumsum(byte_counts + 1) - (byte_counts + 1)
    first_word = np.searchsorted(starts, doc_starts)
    counts = np.diff(np.append(first_word, len(starts)))
    return words, counts


def shingle_hashes(texts, ngram, unit="word"):
    """-> (32-bit shingle hashes uint32, their document numbers int64): distinct per document,
    sorted by document."""
    values, counts = _tokens(texts, unit)
    length = len(values)
    doc_end = np.repeat(np.cumsum(counts), counts)
    starts = np.arange(length)
    full = np.flatnonzero(starts + ngram <= doc_end)
    h = np.zeros(len(full), dtype=_U64)
    for k in range(ngram):  # polynomial over the n tokens: sum values[s + k] * C^k
        h += values[full + k] * _U64(pow(_C, k, 2**64))
    doc = np.repeat(np.arange(len(counts)), counts)[full]
    short = np.flatnonzero((counts > 0) & (counts < ngram))  # one shingle of all its tokens
    if len(short):
        first = (np.cumsum(counts) - counts)[short]
        hs = np.zeros(len(short), dtype=_U64)
        for k in range(ngram - 1):
            ok = k < counts[short]
            hs += np.where(ok, values[np.minimum(first + k, length - 1)], 0) * _U64(
                pow(_C, k, 2**64)
            )
        h, doc = np.concatenate([h, hs]), np.concatenate([doc, short])
    key = (doc.astype(_U64) << _U64(32)) | (fmix64(h) >> _U64(32))
    key.sort()  # np.unique's hash table is slower than a sort here
    key = key[np.concatenate([[True], key[1:] != key[:-1]])] if len(key) else key
    return (key & _MASK32).astype(np.uint32), (key >> _U64(32)).astype(np.int64)


def permutations(num_perm):
    """(a, b) uint32 [num_perm, 1] of the hash functions h(x) = a x + b mod 2^32; a is odd."""
    rng = np.random.default_rng(_SEED)
    ab = rng.integers(0, 2**32, size=(2, num_perm), dtype=np.uint32, endpoint=False)
    return (ab[0] | np.uint32(1))[:, None], ab[1][:, None]


def signatures(texts, num_perm, ngram, unit="word", perms=None):
    """MinHash signatures uint32 [len(texts), num_perm]; a document without a shingle gets
    all 0xFFFFFFFF (signature_is_empty). Texts are hashed ~256k characters at a time, which
    bounds the temporaries (8 bytes per byte of text, or per shingle and hash function)."""
    perms = perms if perms is not None else permutations(num_perm)
    sizes = np.cumsum(np.fromiter(map(len, texts), np.int64, count=len(texts)))
    cuts = np.searchsorted(sizes, np.arange(_GROUP, sizes[-1] if len(sizes) else 0, _GROUP))
    bounds = [0, *sorted(set((cuts + 1).tolist()) - {0, len(texts)}), len(texts)]
    if len(bounds) > 2:
        return np.concatenate([
            _signatures(texts[lo:hi], num_perm, ngram, unit, perms)
            for lo, hi in zip(bounds[:-1], bounds[1:])
        ])  # fmt: skip
    return _signatures(texts, num_perm, ngram, unit, perms)


def _signatures(texts, num_perm, ngram, unit, perms):
    a, b = perms
    x, doc = shingle_hashes(texts, ngram, unit)
    sig = np.full((len(texts), num_perm), 0xFFFFFFFF, dtype=np.uint32)
    for lo in range(0, len(x), _CHUNK):
        xs, ds = x[lo : lo + _CHUNK], doc[lo : lo + _CHUNK]
        h = a * xs[None, :]
        h += b
        seg = np.concatenate([[0], np.flatnonzero(np.diff(ds)) + 1])
        docs = ds[seg]
        sig[docs] = np.minimum(sig[docs], np.minimum.reduceat(h, seg, axis=1).T)
    return sig


def signature_is_empty(sig):
    return (sig == 0xFFFFFFFF).all(axis=-1)


def band_keys(sig, bands):
    """64-bit key per band: uint64 [n, bands]; keys of different bands never meet."""
    sig = np.atleast_2d(sig)
    rows = sig.shape[1] // bands
    s = sig[:, : bands * rows].reshape(len(sig), bands, rows).astype(_U64)
    key = (s * _pow_table(_D, rows)[None, None, :]).sum(axis=2, dtype=_U64)
    salt = fmix64(np.arange(1, bands + 1, dtype=_U64) * _U64(_C))
    return fmix64(key ^ salt[None, :])


def candidate_probability(jaccard, num_perm, bands):
    """P(two documents of this Jaccard similarity share a band)."""
    rows = num_perm // bands
    return 1.0 - (1.0 - jaccard**rows) ** bands


def bytes_per_document(num_perm, bands):
    """What the index keeps per kept document: the signature's low 16 bits, and per band the
    key and the document's number (12 bytes) and its Bloom filter share (1 to 2 bytes)."""
    return 2 * num_perm + 14 * bands


def _expand(lo, counts):
    """Concatenated ranges lo[k] .. lo[k] + counts[k] - 1 and the k of each element."""
    owner = np.repeat(np.arange(len(lo)), counts)
    first = np.cumsum(counts) - counts
    return lo[owner] + (np.arange(owner.size) - first[owner]), owner


def _merge(k1, i1, k2, i2):
    """Two sorted runs -> one, the older run's entries first among equal keys; in linear time
    and with only the output (and a mask) allocated."""
    pos = np.searchsorted(k1, k2, "right") + np.arange(len(k2))
    k = np.empty(len(k1) + len(k2), dtype=k1.dtype)
    i = np.empty(len(k), dtype=i1.dtype)
    old = np.ones(len(k), dtype=bool)
    old[pos] = False
    k[pos], i[pos] = k2, i2
    k[old], i[old] = k1, i1
    return k, i


class NearDuplicateIndex:
    """Decides near duplicates in input order; holds signatures, never documents."""

    def __init__(self, num_perm, bands, threshold):
        if num_perm % bands:
            raise ValueError("num_perm must be a multiple of bands")
        self.num_perm, self.bands, self.threshold = num_perm, bands, float(threshold)
        self.runs = []  # (band keys uint64 sorted, document numbers uint32), biggest first
        self.blocks = []  # uint16 [_BLOCK, num_perm] signatures' low bits of kept documents
        self.size = 0  # kept documents in the index
        self.entries = 0  # band keys in the runs
        # A Bloom filter of the band keys (8 bits per key, 2 probes: ~5% false positives) spares
        # the binary searches of nearly every lookup: most documents have no candidate.
        self.filter_bits = 20
        self.filter = np.zeros(1 << (self.filter_bits - 3), dtype=np.uint8)

    def nbytes(self):
        runs = sum(k.nbytes + i.nbytes for k, i in self.runs)
        return runs + self.filter.nbytes + self.size * 2 * self.num_perm

    def _probes(self, keys):
        m = self.filter_bits
        return keys >> _U64(64 - m), keys & _U64((1 << m) - 1)

    def _filter_add(self, keys):
        for h in self._probes(keys):
            bit = np.left_shift(np.uint8(1), (h & _U64(7)).astype(np.uint8))
            np.bitwise_or.at(self.filter, h >> _U64(3), bit)

    def _filter_has(self, keys):
        hit = np.ones(len(keys), dtype=bool)
        for h in self._probes(keys):
            hit &= (self.filter[h >> _U64(3)] >> (h & _U64(7)).astype(np.uint8)) & 1 == 1
        return hit

    def _similarity(self, s16, other):
        eq = (s16 == other).mean(axis=1)
        return (eq - 2.0**-16) / (1.0 - 2.0**-16)

    def _stored(self, ids):
        out = np.empty((len(ids), self.num_perm), dtype=np.uint16)
        blk = ids >> 16
        for b in np.unique(blk):
            m = blk == b
            out[m] = self.blocks[b][ids[m] & (_BLOCK - 1)]
        return out

    def _lookup(self, keys, owners):
        """Pairs (owner, stored id) for every stored key equal to one of `keys`."""
        docs, ids = [], []
        maybe = np.flatnonzero(self._filter_has(keys))
        keys, owners = keys[maybe], owners[maybe]
        order = np.argsort(keys)  # sorted needles: each binary search starts near the last
        keys, owners = keys[order], owners[order]
        for run_keys, run_ids in self.runs:
            lo = np.searchsorted(run_keys, keys, "left")
            hit = np.flatnonzero(run_keys[np.minimum(lo, len(run_keys) - 1)] == keys)
            if len(hit):
                lo = lo[hit]
                n = np.minimum(np.searchsorted(run_keys, keys[hit], "right") - lo, _CAP)
                pos, k = _expand(lo, n)
                docs.append(owners[hit][k])
                ids.append(run_ids[pos])
        if not docs:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        pair = np.unique((np.concatenate(docs).astype(np.int64) << 32) | np.concatenate(ids))
        return pair >> 32, pair & 0xFFFFFFFF

    def check(self, sig, keys=None, candidates=None):
        """sig uint32 [n, num_perm] of documents in input order -> keep mask bool [n]; the kept
        ones (among `candidates`, default: those with a shingle) enter the index."""
        sig = np.atleast_2d(sig)
        n = len(sig)
        keep = np.ones(n, dtype=bool)
        if keys is None:
            keys = band_keys(sig, self.bands)
        valid = ~signature_is_empty(sig)
        if candidates is not None:
            valid &= candidates
        idx = np.flatnonzero(valid)
        if not len(idx):
            return keep
        s16 = sig.astype(np.uint16)
        b = self.bands
        # 1. against earlier tasks' kept documents: order within this task does not matter
        doc, ids = self._lookup(keys[idx].ravel(), np.repeat(idx, b))
        if len(doc):
            sim = self._similarity(s16[doc], self._stored(ids))
            keep[doc[sim >= self.threshold]] = False
        # 2. within the task, in order: against earlier documents of the task still kept
        rest = idx[keep[idx]]
        if len(rest) > 1:
            flat, owner = keys[rest].ravel(), np.repeat(rest, b)
            order = np.lexsort((owner, flat))
            flat, owner = flat[order], owner[order]
            new_group = np.concatenate([[True], flat[1:] != flat[:-1]])
            group_start = np.maximum.accumulate(np.where(new_group, np.arange(len(flat)), 0))
            rank = np.arange(len(flat)) - group_start
            later = np.flatnonzero(rank)
            if len(later):
                pos, k = _expand(group_start[later], np.minimum(rank[later], _CAP))
                i, j = owner[pos], owner[later][k]
                pair = np.unique((i.astype(np.int64) << 32) | j)
                i, j = pair >> 32, pair & 0xFFFFFFFF
                i, j = i[i < j], j[i < j]  # (a 64-bit key collision across bands aside)
                sim = self._similarity(s16[i], s16[j])
                i, j = i[sim >= self.threshold], j[sim >= self.threshold]
                if len(j):
                    order = np.lexsort((i, j))
                    i, j = i[order], j[order]
                    bounds = np.flatnonzero(np.diff(j)) + 1
                    for ii, jj in zip(np.split(i, bounds), j[np.concatenate([[0], bounds])]):
                        if keep[ii].any():  # i < j: their fate is already decided
                            keep[jj] = False
        # 3. the kept ones enter the index
        kept = idx[keep[idx]]
        if len(kept):
            self._insert(s16[kept], keys[kept])
        return keep

    def _insert(self, s16, keys):
        first, off = self.size, 0
        while off < len(s16):
            slot = self.size & (_BLOCK - 1)
            if slot == 0:
                self.blocks.append(np.empty((_BLOCK, self.num_perm), dtype=np.uint16))
            take = min(_BLOCK - slot, len(s16) - off)
            self.blocks[-1][slot : slot + take] = s16[off : off + take]
            self.size += take
            off += take
        ids = np.repeat(np.arange(first, self.size, dtype=np.uint32), self.bands)
        flat = keys.ravel()
        order = np.argsort(flat, kind="stable")
        self.runs.append((flat[order], ids[order]))
        self.entries += len(flat)
        if self.entries * 8 > (1 << self.filter_bits):  # over 1 key per 8 bits: grow, refill
            while self.entries * 8 > (1 << self.filter_bits):
                self.filter_bits += 1
            self.filter = np.zeros(1 << (self.filter_bits - 3), dtype=np.uint8)
            for k, _ in self.runs:
                self._filter_add(k)
        else:
            self._filter_add(flat)
        while len(self.runs) > 1 and len(self.runs[-2][0]) <= 2 * len(self.runs[-1][0]):
            newer = self.runs.pop()
            self.runs[-1] = _merge(*self.runs[-1], *newer)
