"""GPT samples over the shuffled document stream, with `.npy` index caching.

A sample is `seq_length + 1` consecutive tokens of the document stream; consecutive samples
overlap by one token, so `tokens = s[:-1]` and `labels = s[1:]` use every token once as a label.
Three indices, all built once from the seed with vectorised numpy and cached:

  document_index  int32/64[E * n]    sequence ids in stream order: one permutation of the split's
                                     n sequences per epoch, E epochs back to back
  sample_index    int32/64[M + 1, 2] (position in document_index, token offset) where sample k
                                     starts; sample k ends on the token where sample k+1 starts
  shuffle_index   uint32/int64[M]    the order samples are served in: a permutation of each
                                     epoch's samples, epochs in order, so the run sees all of
                                     epoch e before any of epoch e+1

E is the fewest epochs that give the requested number of samples, and M = (E*T - 1) // seq_length
samples are built (T = tokens per epoch): every built sample is whole, only the last
(< seq_length) tokens of the stream are never a sample's input.

"Documents" here are the shard's sequences, as in Megatron; splits (train/valid/test) are
contiguous ranges of the shard's documents, cut by weights such as "969,30,1".

Cache files are named `{hash}-{split}-{kind}.npy`, the hash covering exactly what the indices
depend on (the split's sequence lengths, seq_length, epochs, seed, this file's format version),
so a cache is reused whenever it is valid and never when it is not. Files are written to a
temporary name and renamed, the description `.json` last, which marks the set complete.
"""

import hashlib
import json
import logging
import math
import os
import re
import time
import uuid

import numpy as np

from megalite.data.indexed import IndexedDataset, strip_suffix
from megalite.errors import MegaliteError

logger = logging.getLogger("megalite.data")

INDEX_FORMAT = 1  # bump whenever the index construction changes: old caches stop matching
SPLIT_NAMES = ("train", "valid", "test")


# ---- user input --------------------------------------------------------------------------
def _is_number(s):
    try:
        float(s)
        return True
    except ValueError:
        return False


def parse_data_path(data_path):
    """Megatron's --data-path: ['0.3', 'A', '0.7', 'B'], ['A'] or ['A', 'B'] (equal weights).

    Returns (prefixes, weights) with weights normalised to sum to 1. A bare string is split on
    whitespace; a `.bin`/`.idx` suffix on a prefix is dropped.
    """
    if isinstance(data_path, str):
        data_path = [data_path]
    items = [tok for item in (data_path or []) for tok in str(item).split()]
    if not items:
        raise MegaliteError(
            "--data-path is empty; give a shard prefix such as data/shakespeare_text_document"
        )
    numeric = [_is_number(s) for s in items]
    if not any(numeric):
        prefixes, weights = items, [1.0] * len(items)
    elif len(items) % 2 == 0 and all(numeric[0::2]) and not any(numeric[1::2]):
        weights = [float(w) for w in items[0::2]]
        prefixes = items[1::2]
    else:
        raise MegaliteError(
            f"cannot parse --data-path {' '.join(items)!r}: give prefixes alone (A B) or "
            "weight/prefix "
            f"pairs (0.3 A 0.7 B)"
        )
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise MegaliteError(
            f"--data-path weights {weights} must be non-negative, finite and not all zero"
        )
    total = sum(weights)
    return [strip_suffix(p) for p in prefixes], [w / total for w in weights]


def data_path_has_weights(data_path):
    """Whether a --data-path gives weights (0.3 A 0.7 B) rather than prefixes alone."""
    if isinstance(data_path, str):
        data_path = [data_path]
    return any(_is_number(tok) for item in (data_path or []) for tok in str(item).split())


def parse_split(split):
    """'969,30,1' (or '969/30/1', '98,2', '1') -> three weights summing to 1."""
    text = str(split).strip()
    parts = [p.strip() for p in re.split(r"[,/]", text)] if text else []
    try:
        weights = [float(p) for p in parts]
    except ValueError:
        weights = None
    if (
        not weights
        or len(weights) > 3
        or any(not math.isfinite(w) or w < 0 for w in weights)
        or sum(weights) <= 0
    ):
        raise MegaliteError(
            f"cannot parse --split {split!r}: give up to three non-negative weights for "
            f"train,valid,test such as 969,30,1"
        )
    weights += [0.0] * (3 - len(weights))
    total = sum(weights)
    return [w / total for w in weights]


def split_document_ranges(num_documents, split_weights):
    """Contiguous [begin, end) document ranges per split (Megatron's rounding)."""
    bounds = [0]
    for w in split_weights:
        bounds.append(bounds[-1] + int(round(w * float(num_documents))))
    diff = bounds[-1] - num_documents
    bounds = [bounds[0]] + [b - diff for b in bounds[1:]]
    return [(max(bounds[i], 0), bounds[i + 1]) for i in range(len(split_weights))]


# ---- index construction (pure functions, vectorised) --------------------------------------
def num_epochs_needed(tokens_per_epoch, seq_length, num_samples):
    """Fewest epochs E such that (E*T - 1) // seq_length >= num_samples."""
    return max(1, -(-(num_samples * seq_length + 1) // tokens_per_epoch))


def build_document_index(sequence_ids, num_epochs, rng):
    """One permutation of the sequence ids per epoch, concatenated."""
    dtype = np.int32 if len(sequence_ids) == 0 or sequence_ids[-1] < 2**31 else np.int64
    ids = np.asarray(sequence_ids, dtype=dtype)
    return np.concatenate([ids[rng.permutation(len(ids))] for _ in range(num_epochs)])


def build_sample_index(lengths, seq_length, num_samples):
    """lengths[i]: tokens of document_index[i]. Returns [num_samples + 1, 2] (doc position, offset).

    Sample k starts at stream token k * seq_length; the token at stream position p lies in the
    first document whose end (cumulative length) exceeds p. Zero-length documents are skipped
    because their end equals their start.
    """
    ends = np.cumsum(lengths, dtype=np.int64)
    starts = np.arange(num_samples + 1, dtype=np.int64) * seq_length
    if len(ends) == 0 or starts[-1] >= ends[-1]:
        raise ValueError("stream too short for the requested samples")
    doc_pos = np.searchsorted(ends, starts, side="right")
    offsets = starts - (ends[doc_pos] - np.asarray(lengths, dtype=np.int64)[doc_pos])
    dtype = np.int32 if len(ends) < 2**31 else np.int64
    return np.stack([doc_pos, offsets], axis=1).astype(dtype)


def build_shuffle_index(num_samples, seq_length, tokens_per_epoch, rng):
    """A permutation of each epoch's samples (sample k belongs to the epoch of its first token)."""
    dtype = np.uint32 if num_samples < 2**32 else np.int64
    num_epochs = -(-(num_samples * seq_length) // tokens_per_epoch) if num_samples else 0
    e = np.arange(num_epochs + 1, dtype=np.int64)
    bounds = np.minimum(-(-(e * tokens_per_epoch) // seq_length), num_samples)  # ceil(e*T/S)
    out = np.empty(num_samples, dtype=dtype)
    for b, c in zip(bounds[:-1], bounds[1:]):
        out[b:c] = b + rng.permutation(int(c - b)).astype(dtype)
    return out


# ---- cache ---------------------------------------------------------------------------------
def default_cache_dir(prefix):
    return os.path.join(os.path.dirname(os.path.abspath(prefix)), "index-cache")


class IndexCache:
    """The `.npy` files of one index set: `{dir}/{hash}-{name}-{kind}.npy` + `-description.json`."""

    def __init__(self, cache_dir, key, name, kinds):
        digest = hashlib.md5(json.dumps(key, sort_keys=True).encode()).hexdigest()
        self.dir, self.key, self.kinds = cache_dir, key, kinds
        self.stem = os.path.join(cache_dir, f"{digest}-{name}")
        self.description = self.stem + "-description.json"

    def path(self, kind):
        return f"{self.stem}-{kind}.npy"

    def load_or_build(self, build, allow_build=True):
        """The cached arrays; when missing, build() (which saves them) first, if allowed
        (only rank 0 builds: the others load what it wrote)."""
        arrays = self.load()
        if arrays is None:
            if not allow_build:
                raise MegaliteError(
                    f"index cache {self.description} missing; it should have been built by rank 0"
                )
            build()
            arrays = self.load()
            if arrays is None:
                raise MegaliteError(
                    f"index cache {self.description} vanished right after it was written; "
                    f"is {self.dir} shared and stable?"
                )
        return arrays

    def load(self):
        """The cached arrays memory-mapped, or None when the set is absent or unreadable."""
        if not os.path.isfile(self.description):
            return None
        try:
            return {k: np.load(self.path(k), mmap_mode="r") for k in self.kinds}
        except (OSError, ValueError):
            return None  # a half-deleted or damaged cache is rebuilt, never trusted

    def save(self, arrays, info):
        try:
            os.makedirs(self.dir, exist_ok=True)
            for kind in self.kinds:
                _atomic_write(self.path(kind), lambda f, a=arrays[kind]: np.save(f, a))
            text = json.dumps({**self.key, **info}, indent=1, sort_keys=True).encode()
            _atomic_write(self.description, lambda f: f.write(text))  # last: marks the set complete
        except OSError as e:
            raise MegaliteError(
                f"cannot write the index cache in {self.dir} ({e.strerror or e}); pass a writable "
                f"directory as cache_dir (--data-cache-path)"
            ) from e


def _atomic_write(path, write):
    tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# ---- the dataset ---------------------------------------------------------------------------
class CachedIndices:
    """Pickles as parameters (data-loader workers re-map the cached `.npy` files, never copy
    them): a subclass names its index arrays in KINDS and keeps its IndexCache in self.cache."""

    KINDS = ()

    def __getstate__(self):
        state = self.__dict__.copy()
        for k in self.KINDS:
            state.pop(k)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        arrays = self.cache.load()
        if arrays is None:
            raise MegaliteError(
                f"index cache {self.cache.description} disappeared; rebuild by restarting"
            )
        for k in self.KINDS:
            setattr(self, k, arrays[k])


class GPTDataset(CachedIndices):
    """Item i -> int64[seq_length + 1] (tokens = s[:-1], labels = s[1:]).

    indexed: an IndexedDataset or a shard prefix. document_range: [begin, end) documents of the
    shard this split uses (None: all). allow_build=False loads the cache or fails (used where
    another rank is responsible for building).
    """

    KINDS = ("document_index", "sample_index", "shuffle_index")

    def __init__(
        self,
        indexed,
        split_name,
        document_range,
        seq_length,
        num_samples,
        seed,
        cache_dir=None,
        allow_build=True,
    ):
        # (Over ~60 lines: argument checks with one-line errors, then build-or-map the cached
        # sample index, in the order every rank must follow.)
        self.indexed = indexed if isinstance(indexed, IndexedDataset) else IndexedDataset(indexed)
        self.split_name = split_name
        self.seq_length = int(seq_length)
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        if self.seq_length < 1 or self.num_samples < 1:
            raise MegaliteError(
                f"seq_length ({seq_length}) and num_samples ({num_samples}) must be positive"
            )
        if not 0 <= self.seed < 2**32:
            raise MegaliteError(f"seed {seed} out of range; use an integer in [0, 2**32)")
        ndocs = self.indexed.num_documents
        begin, end = document_range if document_range is not None else (0, ndocs)
        if not 0 <= begin <= end <= ndocs:
            raise ValueError(f"document range [{begin}, {end}) outside [0, {ndocs})")
        self.document_range = (int(begin), int(end))
        doc_idx = self.indexed.document_indices
        self.sequence_range = (int(doc_idx[begin]), int(doc_idx[end]))
        lengths = self.indexed.sequence_lengths[self.sequence_range[0] : self.sequence_range[1]]
        self.tokens_per_epoch = int(lengths.sum(dtype=np.int64))
        if self.tokens_per_epoch < 1:
            raise MegaliteError(
                f"the {split_name} split of {self.indexed.path_prefix} (documents {begin}..{end}) "
                f"holds no tokens; give it a larger --split weight or request 0 samples from it"
            )
        self.num_epochs = num_epochs_needed(
            self.tokens_per_epoch, self.seq_length, self.num_samples
        )

        key = {
            "class": "GPTDataset",
            "format": INDEX_FORMAT,
            "sequence_range": list(self.sequence_range),
            "lengths_blake2b": hashlib.blake2b(
                np.ascontiguousarray(lengths).data, digest_size=16
            ).hexdigest(),
            "seq_length": self.seq_length,
            "num_epochs": self.num_epochs,
            "seed": self.seed,
        }
        self.cache = IndexCache(
            cache_dir or default_cache_dir(self.indexed.path_prefix), key, split_name, self.KINDS
        )
        arrays = self.cache.load_or_build(self._build, allow_build)
        self.document_index = arrays["document_index"]
        self.sample_index = arrays["sample_index"]
        self.shuffle_index = arrays["shuffle_index"]

    def _build(self):
        t0 = time.perf_counter()
        rng = np.random.RandomState(self.seed)  # frozen stream: the same indices on any numpy
        seq_ids = np.arange(*self.sequence_range, dtype=np.int64)
        document_index = build_document_index(seq_ids, self.num_epochs, rng)
        lengths = self.indexed.sequence_lengths[document_index]
        total = (self.num_epochs * self.tokens_per_epoch - 1) // self.seq_length
        sample_index = build_sample_index(lengths, self.seq_length, total)
        shuffle_index = build_shuffle_index(total, self.seq_length, self.tokens_per_epoch, rng)
        seconds = time.perf_counter() - t0
        self.cache.save(
            {
                "document_index": document_index,
                "sample_index": sample_index,
                "shuffle_index": shuffle_index,
            },
            {
                "prefix": self.indexed.path_prefix,
                "split": self.split_name,
                "num_samples_requested": self.num_samples,
                "num_samples_built": int(total),
                "tokens_per_epoch": self.tokens_per_epoch,
                "build_seconds": round(seconds, 3),
            },
        )
        logger.info(
            "built %s index for %s: %d samples of %d tokens over %d epoch(s) of %d tokens in %.2f "
            "s -> %s",
            self.split_name,
            self.indexed.path_prefix,
            total,
            self.seq_length,
            self.num_epochs,
            self.tokens_per_epoch,
            seconds,
            self.cache.dir,
        )

    def __len__(self):
        return len(self.shuffle_index)

    def __getitem__(self, idx):
        idx = int(idx)
        if not 0 <= idx < len(self):
            raise IndexError(f"sample {idx} out of range for {len(self)} samples")
        j = int(self.shuffle_index[idx])
        d0, o0 = (int(x) for x in self.sample_index[j])
        d1, o1 = (int(x) for x in self.sample_index[j + 1])
        doc = self.document_index
        if d0 == d1:  # the whole sample (end token included) inside one document
            return self.indexed.get(int(doc[d0]), o0, o1 - o0 + 1).astype(np.int64)
        parts = [self.indexed.get(int(doc[d0]), o0)]
        parts += [self.indexed[int(doc[d])] for d in range(d0 + 1, d1)]
        parts.append(self.indexed.get(int(doc[d1]), 0, o1 + 1))
        return np.concatenate(parts).astype(np.int64)

    def __repr__(self):
        return (
            f"GPTDataset({self.indexed.path_prefix!r}, {self.split_name}, {len(self)} samples "
            f"of {self.seq_length}+1 tokens, {self.num_epochs} epoch(s))"
        )
