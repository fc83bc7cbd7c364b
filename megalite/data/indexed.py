"""Megatron-compatible indexed token shards: `{prefix}.bin` + `{prefix}.idx`.

`.bin` holds the token ids of every sequence back to back (no header, no padding).
`.idx` (little-endian, no padding) is laid out as in docs/ARCHITECTURE.md, "Token shards":

    offset     size       content
    0          9 bytes    magic b"MMIDIDX\\x00\\x00"
    9          uint64     version = 1
    17         uint8      dtype code (see DTYPE_CODES)
    18         uint64     N = number of sequences
    26         uint64     D = number of documents + 1
    34         int32[N]   tokens per sequence
    34+4N      int64[N]   byte offset of each sequence in .bin
    34+12N     int64[D]   document boundaries 0, ..., N

Shards written here load in Megatron-LM and vice versa. The reader memory-maps both files, so
opening a terabyte shard costs only the header checks; the writer streams, so writing one keeps
memory flat however many tokens go through it.
"""

import os
import struct

import numpy as np

from megalite.errors import MegaliteError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_SIZE = 34  # 9 magic + 8 version + 1 dtype + 8 N + 8 D

# Megatron's codes. 6/7 (float64/float32) exist there too but are never token ids.
DTYPE_CODES = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    8: np.uint16,
}
CODE_OF_DTYPE = {np.dtype(t): c for c, t in DTYPE_CODES.items()}

REGENERATE = "re-create it with tools/preprocess.py"


def best_dtype(vocab_size):
    """uint16 when every id fits with room to spare (Megatron's rule: vocab < 65500), else int32."""
    return np.uint16 if vocab_size is not None and vocab_size < 65500 else np.int32


def index_path(prefix):
    return prefix + ".idx"


def data_path(prefix):
    return prefix + ".bin"


def strip_suffix(prefix):
    """Users often pass `x.bin` or `x.idx` where the prefix `x` is meant; accept both."""
    for suffix in (".bin", ".idx"):
        if prefix.endswith(suffix):
            return prefix[: -len(suffix)]
    return prefix


def shard_exists(prefix):
    return os.path.isfile(index_path(prefix)) and os.path.isfile(data_path(prefix))


class IndexedDataset:
    """Memory-mapped reader of one `.bin`/`.idx` pair.

    ds[i] -> numpy array (read-only view into the mapped `.bin`) with sequence i's tokens;
    ds.get(i, offset, length) -> part of it; sequence_lengths (int32[N]), sequence_pointers
    (int64[N], byte offsets) and document_indices (int64[D]) are views into the mapped `.idx`.
    """

    def __init__(self, path_prefix):
        self.path_prefix = strip_suffix(str(path_prefix))
        self._open()

    # Pickle as the path only, so DataLoader workers started with spawn re-map the files
    # instead of copying every token through a pipe.
    def __getstate__(self):
        return {"path_prefix": self.path_prefix}

    def __setstate__(self, state):
        self.path_prefix = state["path_prefix"]
        self._open()

    def _open(self):
        idx_file, bin_file = index_path(self.path_prefix), data_path(self.path_prefix)
        for path in (idx_file, bin_file):
            if not os.path.isfile(path):
                raise MegaliteError(
                    f"{path} not found; --data-path takes the shard prefix without .bin/.idx "
                    f"(e.g. data/shakespeare_text_document), both files must exist; make them "
                    f"with tools/preprocess.py"
                )
        n, d = self._read_header(idx_file)
        self._map_index(idx_file, n, d)
        self._map_data(idx_file, bin_file)

    def _read_header(self, idx_file):
        """Check the index header and size; sets the token dtype, returns (sequences, docs)."""
        idx_size = os.path.getsize(idx_file)
        if idx_size < HEADER_SIZE:
            raise MegaliteError(
                f"{idx_file} is truncated ({idx_size} bytes, a header alone is {HEADER_SIZE}); "
                f"{REGENERATE}"
            )
        with open(idx_file, "rb") as f:
            header = f.read(HEADER_SIZE)
        magic = header[:9]
        if magic != MAGIC:
            raise MegaliteError(
                f"{idx_file}: bad magic {magic!r} (expected {MAGIC!r}), not a Megatron/megalite "
                f"index file; {REGENERATE}"
            )
        (version,) = struct.unpack("<Q", header[9:17])
        if version != VERSION:
            raise MegaliteError(
                f"{idx_file}: unknown index version {version} (megalite reads version {VERSION}); "
                f"{REGENERATE}"
            )
        code = header[17]
        if code not in DTYPE_CODES:
            raise MegaliteError(
                f"{idx_file}: unknown token dtype code {code} (known: "
                f"{', '.join(f'{c}={np.dtype(t).name}' for c, t in DTYPE_CODES.items())}); "
                f"{REGENERATE}"
            )
        self.dtype = np.dtype(DTYPE_CODES[code])
        n, d = struct.unpack("<QQ", header[18:34])
        expected = HEADER_SIZE + 12 * n + 8 * d
        # Megatron's multimodal shards append one int8 mode per sequence; text ignores them.
        if idx_size != expected and idx_size != expected + n:
            what = "truncated" if idx_size < expected else "longer than its header says"
            raise MegaliteError(
                f"{idx_file} is {what}: {idx_size} bytes, but its header ({n} sequences, "
                f"{d} document boundaries) implies {expected}; {REGENERATE}"
            )
        return n, d

    def _map_index(self, idx_file, n, d):
        self._idx_mmap = np.memmap(idx_file, mode="r", dtype=np.uint8)
        buf = memoryview(self._idx_mmap)
        self.sequence_lengths = np.frombuffer(buf, np.int32, count=n, offset=HEADER_SIZE)
        self.sequence_pointers = np.frombuffer(buf, np.int64, count=n, offset=HEADER_SIZE + 4 * n)
        self.document_indices = np.frombuffer(buf, np.int64, count=d, offset=HEADER_SIZE + 12 * n)
        if d < 1 or self.document_indices[0] != 0 or self.document_indices[-1] != n:
            raise MegaliteError(
                f"{idx_file}: document boundaries must run from 0 to the sequence count {n}; "
                f"the index is corrupt, {REGENERATE}"
            )

    def _map_data(self, idx_file, bin_file):
        n = len(self.sequence_lengths)
        # The .bin must hold exactly the tokens the index describes; anything else is a
        # truncated copy or a .bin/.idx pair from two different runs.
        num_tokens = int(self.sequence_lengths.sum(dtype=np.int64))
        bin_size = os.path.getsize(bin_file)
        if bin_size != num_tokens * self.dtype.itemsize:
            what = "truncated" if bin_size < num_tokens * self.dtype.itemsize else "too long"
            raise MegaliteError(
                f"{bin_file} is {what}: {bin_size} bytes, but {idx_file} describes "
                f"{num_tokens} {self.dtype.name} tokens = {num_tokens * self.dtype.itemsize} "
                f"bytes; the pair is mismatched or was cut off, {REGENERATE}"
            )
        if n and int(self.sequence_pointers[0]) != 0:
            raise MegaliteError(f"{idx_file}: first sequence offset is not 0; {REGENERATE}")
        self.num_tokens = num_tokens
        # mmap cannot map an empty file; an empty shard is legal (no documents).
        if bin_size:
            self._bin_mmap = np.memmap(bin_file, mode="r", dtype=np.uint8)
            self._bin = memoryview(self._bin_mmap)
        else:
            self._bin_mmap, self._bin = None, b""

    def __len__(self):
        return len(self.sequence_lengths)

    @property
    def num_documents(self):
        return len(self.document_indices) - 1

    def __getitem__(self, idx):
        if isinstance(idx, slice):
            return [self[i] for i in range(*idx.indices(len(self)))]
        idx = int(idx)
        if idx < 0:
            idx += len(self)
        if not 0 <= idx < len(self):
            raise IndexError(f"sequence {idx} out of range for {len(self)} sequences")
        return np.frombuffer(
            self._bin,
            self.dtype,
            count=int(self.sequence_lengths[idx]),
            offset=int(self.sequence_pointers[idx]),
        )

    def get(self, idx, offset=0, length=None):
        """Tokens [offset, offset+length) of sequence idx (to its end when length is None)."""
        seq_len = int(self.sequence_lengths[idx])
        if length is None:
            length = seq_len - offset
        if offset < 0 or length < 0 or offset + length > seq_len:
            raise IndexError(
                f"tokens [{offset}, {offset + length}) outside sequence {idx} of length {seq_len}"
            )
        ptr = int(self.sequence_pointers[idx]) + offset * self.dtype.itemsize
        return np.frombuffer(self._bin, self.dtype, count=length, offset=ptr)

    def __repr__(self):
        return (
            f"IndexedDataset({self.path_prefix!r}, {len(self)} sequences, "
            f"{self.num_documents} documents, {self.num_tokens} {self.dtype.name} tokens)"
        )


class IndexedDatasetWriter:
    """Streams a `.bin`/`.idx` pair to disk under temporary names; `finalize()` renames them.

    Tokens go straight to the `.bin`; sequence lengths and document boundaries are spooled to
    small temporary files, so memory stays flat however large the shard grows. An interrupted
    write (exception, Ctrl-C, `abort()`) leaves no file under the final names, hence never a
    valid-looking truncated shard.

    Megatron-style API: add_item(tokens) appends one sequence, end_document() closes a document,
    add_document(tokens, lengths) does both. Bulk API for speed: add_documents(tokens, lengths)
    appends many one-sequence documents at once; extend_item()/close_item() build one sequence
    from pieces; add_index(prefix) appends a whole existing shard (merging).
    """

    _SPOOL_FLUSH = 1 << 16  # entries buffered before they go to the spool files (~0.5 MB)

    def __init__(self, path_prefix, dtype=np.int32):
        self.path_prefix = strip_suffix(str(path_prefix))
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODE_OF_DTYPE:
            raise MegaliteError(f"cannot write tokens as {self.dtype}; use uint16 or int32")
        tag = f".tmp-{os.getpid()}"
        self._bin_tmp = data_path(self.path_prefix) + tag
        self._idx_tmp = index_path(self.path_prefix) + tag
        self._len_tmp = index_path(self.path_prefix) + ".lengths" + tag
        self._doc_tmp = index_path(self.path_prefix) + ".documents" + tag
        try:
            os.makedirs(os.path.dirname(os.path.abspath(self.path_prefix)), exist_ok=True)
            self._bin = open(self._bin_tmp, "wb")
            self._lens_f = open(self._len_tmp, "wb")
            self._docs_f = open(self._doc_tmp, "wb")
        except OSError as e:
            raise MegaliteError(
                f"cannot write {e.filename or self._bin_tmp} ({e.strerror or e}); choose a "
                "writable output prefix"
            ) from e
        self._lens, self._docs = [], []  # buffered int32 / int64 arrays
        self._buffered = 0
        self.num_sequences = 0
        self.num_documents = 0
        self.num_tokens = 0
        self._open_len = 0  # tokens of the sequence being built by extend_item
        self._open = False
        self._closed = False

    # ---- writing -------------------------------------------------------------------------
    def _write_tokens(self, tokens):
        arr = np.asarray(tokens)
        if arr.dtype != self.dtype:
            # Catch ids the chosen dtype cannot hold before they wrap around silently.
            if arr.size and arr.dtype.kind in "iu":
                info = np.iinfo(self.dtype)
                lo, hi = int(arr.min()), int(arr.max())
                if lo < info.min or hi > info.max:
                    raise MegaliteError(
                        f"token id {hi if hi > info.max else lo} does not fit {self.dtype.name} "
                        f"in {self._bin_tmp}; write the shard as int32"
                    )
            arr = arr.astype(self.dtype)
        self._bin.write(np.ascontiguousarray(arr).data)
        self.num_tokens += arr.size
        return arr.size

    def _push(self, lengths=None, doc_ends=None):
        if lengths is not None and len(lengths):
            lengths = np.asarray(lengths, dtype=np.int64)
            if lengths.min() < 0 or lengths.max() > np.iinfo(np.int32).max:
                raise MegaliteError(
                    f"sequence of {int(lengths.max())} tokens in {self._bin_tmp} exceeds the "
                    f"format's int32 length; split the document"
                )
            self._lens.append(lengths.astype(np.int32))
            self._buffered += len(lengths)
        if doc_ends is not None and len(doc_ends):
            self._docs.append(np.asarray(doc_ends, dtype=np.int64))
            self._buffered += len(doc_ends)
        if self._buffered >= self._SPOOL_FLUSH:
            self._flush_spool()

    def _flush_spool(self):
        for arrays, f in ((self._lens, self._lens_f), (self._docs, self._docs_f)):
            for a in arrays:
                f.write(a.data)
            arrays.clear()
        self._buffered = 0

    def extend_item(self, tokens):
        """Append tokens to the sequence under construction (long documents arrive in pieces)."""
        self._open_len += self._write_tokens(tokens)
        self._open = True

    def close_item(self):
        self._push(lengths=[self._open_len])
        self.num_sequences += 1
        self._open_len, self._open = 0, False

    def add_item(self, tokens):
        self.extend_item(tokens)
        self.close_item()

    def end_document(self):
        if self._open:
            self.close_item()
        self.num_documents += 1
        self._push(doc_ends=[self.num_sequences])

    def add_document(self, tokens, lengths):
        """Megatron's signature: `tokens` is every sequence of the document back to back."""
        lengths = np.asarray(lengths, dtype=np.int64)
        tokens = np.asarray(tokens)
        if int(lengths.sum()) != tokens.size:
            raise ValueError(
                f"lengths sum to {int(lengths.sum())} but {tokens.size} tokens were given"
            )
        self._write_tokens(tokens)
        self._push(lengths=lengths)
        self.num_sequences += len(lengths)
        self.num_documents += 1
        self._push(doc_ends=[self.num_sequences])

    def add_documents(self, tokens, lengths):
        """Append len(lengths) documents of one sequence each; tokens: all of them back to back."""
        lengths = np.asarray(lengths, dtype=np.int64)
        if self._open:
            raise RuntimeError("add_documents while a sequence is open; call close_item first")
        if int(lengths.sum()) != np.size(tokens):
            raise ValueError(
                f"lengths sum to {int(lengths.sum())} but {np.size(tokens)} tokens were given"
            )
        self._write_tokens(tokens)
        self._push(lengths=lengths)
        first = self.num_sequences
        self.num_sequences += len(lengths)
        self.num_documents += len(lengths)
        self._push(doc_ends=np.arange(first + 1, self.num_sequences + 1, dtype=np.int64))

    def add_index(self, path_prefix, chunk_tokens=1 << 24):
        """Append every document of another shard (streamed; converts the dtype if needed)."""
        other = (
            path_prefix if isinstance(path_prefix, IndexedDataset) else IndexedDataset(path_prefix)
        )
        if self._open:
            raise RuntimeError("add_index while a sequence is open; call close_item first")
        if other.dtype == self.dtype:
            self._bin.flush()
            with open(data_path(other.path_prefix), "rb") as src:
                while block := src.read(1 << 24):
                    self._bin.write(block)
            self.num_tokens += other.num_tokens
        else:
            for start in range(0, other.num_tokens, chunk_tokens):
                count = min(chunk_tokens, other.num_tokens - start)
                self._write_tokens(
                    np.frombuffer(
                        other._bin, other.dtype, count=count, offset=start * other.dtype.itemsize
                    )
                )
        step = self._SPOOL_FLUSH
        for s in range(0, len(other), step):
            self._push(lengths=other.sequence_lengths[s : s + step])
        for s in range(1, len(other.document_indices), step):
            self._push(doc_ends=other.document_indices[s : s + step] + self.num_sequences)
        self.num_sequences += len(other)
        self.num_documents += other.num_documents

    # ---- finishing -----------------------------------------------------------------------
    def finalize(self):
        """Write the `.idx`, then move both files to their final names (.bin first, .idx last)."""
        if self._closed:
            return
        if self._open:
            self.close_item()
        self._flush_spool()
        for f in (self._bin, self._lens_f, self._docs_f):
            f.close()
        n, d = self.num_sequences, self.num_documents + 1
        with open(self._idx_tmp, "wb") as idx:
            idx.write(MAGIC)
            idx.write(struct.pack("<Q", VERSION))
            idx.write(struct.pack("<B", CODE_OF_DTYPE[self.dtype]))
            idx.write(struct.pack("<QQ", n, d))
            lengths = np.memmap(self._len_tmp, np.int32, mode="r") if n else np.zeros(0, np.int32)
            step = 1 << 22
            for s in range(0, n, step):  # int32[N] lengths
                idx.write(np.ascontiguousarray(lengths[s : s + step]).data)
            carry = 0
            for s in range(0, n, step):  # int64[N] byte offsets: exclusive prefix sum
                block = lengths[s : s + step].astype(np.int64) * self.dtype.itemsize
                ends = np.cumsum(block) + carry
                idx.write((ends - block).data)
                carry = int(ends[-1])
            idx.write(np.zeros(1, np.int64).data)  # int64[D] document boundaries, from 0
            if d > 1:
                docs = np.memmap(self._doc_tmp, np.int64, mode="r")
                for s in range(0, d - 1, step):
                    idx.write(np.ascontiguousarray(docs[s : s + step]).data)
                del docs
            del lengths
            idx.flush()
            os.fsync(idx.fileno())
        with open(self._bin_tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(self._bin_tmp, data_path(self.path_prefix))
        os.replace(self._idx_tmp, index_path(self.path_prefix))
        for p in (self._len_tmp, self._doc_tmp):
            os.remove(p)
        self._closed = True

    def abort(self):
        """Drop everything written so far; no file is left under the final names."""
        if self._closed:
            return
        for f in (self._bin, self._lens_f, self._docs_f):
            f.close()
        for p in (self._bin_tmp, self._idx_tmp, self._len_tmp, self._doc_tmp):
            if os.path.exists(p):
                os.remove(p)
        self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.finalize()
        else:
            self.abort()
        return False
