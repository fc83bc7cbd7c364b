"""Preprocessing internals: read input in blocks cut at document boundaries, and (in worker
processes) parse, clean and tokenize them. tools/preprocess.py drives these and writes shards.

A task is a list of Units (~1 MB of input). JSONL and blank-line text blocks hold whole
documents; a one-document text file bigger than a block arrives as pieces cut at line ends,
flagged first/last, and the writer joins them back into one document. Parquet and Arrow IPC
files are read by the main process one record batch at a time (a Parquet file row group by row
group), and a Unit holds the text columns of a slice of rows as UTF-8 bytes and offsets, which
the worker turns into the same documents as the JSONL lines of those rows would be.
"""

import ctypes
import glob
import gzip
import hashlib
import itertools
import json
import os
import re
import signal
import zlib
from collections import Counter

import numpy as np

from megalite.data import chat, near_dedup
from megalite.data.cleaning import Cleaner
from megalite.data.tokenizers import build_tokenizer
from megalite.errors import MegaliteError

BOM = b"\xef\xbb\xbf"


# ---- reading: blocks cut at document boundaries -------------------------------------------
def expand_inputs(patterns):
    files = []
    for pat in patterns:
        if os.path.isdir(pat):
            matched = sorted(
                os.path.join(pat, f)
                for f in os.listdir(pat)
                if not f.startswith(".") and os.path.isfile(os.path.join(pat, f))
            )
        else:
            matched = sorted(f for f in glob.glob(pat, recursive=True) if os.path.isfile(f))
        if not matched:
            raise MegaliteError(f"--input {pat!r} matches no file; check the path (quote globs)")
        files += matched
    return list(dict.fromkeys(files))


def _cut_line(buf):
    """Cut after the last line end, or -1."""
    pos = buf.rfind(b"\n")
    return pos + 1 if pos >= 0 else -1


def _cut_blank_line(buf):
    """Cut after the last whitespace-only line, or -1 (walks back line by line)."""
    j = len(buf)
    while True:
        i = buf.rfind(b"\n", 0, j)
        k = buf.rfind(b"\n", 0, i) if i > 0 else -1
        if k < 0:
            return -1
        if not buf[k + 1 : i].strip():
            return i + 1
        j = i


class Unit:
    """A block of input: whole documents, or (text files) a piece of one document. Arrow units
    (fmt "arrow") hold, per key, (UTF-8 bytes, int64 offsets) of rows from `line` on."""

    __slots__ = ("path", "line", "offset", "data", "first", "last", "fmt")

    def __init__(self, path, line, offset, data, first=True, last=True, fmt=None):
        self.path, self.line, self.offset, self.data, self.first, self.last = (
            path,
            line,
            offset,
            data,
            first,
            last,
        )
        self.fmt = fmt

    def nbytes(self):
        return sum(len(b) for b, _ in self.data) if self.fmt == "arrow" else len(self.data)


def read_units(path, chunk_bytes, cut):
    """Yield (Unit, raw bytes read so far) for one file, in blocks of about chunk_bytes that end
    where `cut` allows (a block grows until one is found). The last Unit has last=True."""
    try:
        raw = open(path, "rb")
    except OSError as e:
        raise MegaliteError(f"cannot open {path} ({e.strerror or e}); check --input") from None
    f = gzip.GzipFile(fileobj=raw) if path.endswith(".gz") else raw
    try:
        parts, size, line, offset, first, start = [], 0, 1, 0, True, True
        pending = None  # one block behind, to know which block is the last
        while True:
            try:
                data = f.read(chunk_bytes)
            except (OSError, EOFError, zlib.error) as e:
                raise MegaliteError(f"{path}: cannot read ({e}); is the file complete?") from e
            if start:
                data, start = (data[len(BOM) :] if data.startswith(BOM) else data), False
            if not data:
                break
            pos = cut(data)
            if pos >= 0:
                cut_at = size + pos
            elif parts:  # a boundary (blank line) may straddle the previous read and this one
                tail = parts[-1][-256:]
                pos = cut(tail + data[:256])
                cut_at = size - len(tail) + pos
            parts.append(data)
            size += len(data)
            if pos < 0:
                continue
            buf = b"".join(parts) if len(parts) > 1 else data
            block, rest = buf[:cut_at], buf[cut_at:]
            parts, size = ([rest], len(rest)) if rest else ([], 0)
            if pending is not None:
                yield pending
            pending = (Unit(path, line, offset, block, first=first, last=False), raw.tell())
            first = False
            line += block.count(b"\n")
            offset += len(block)
        rest = b"".join(parts)
        if rest or pending is None:  # an empty file still yields one (empty) unit
            if pending is not None:
                yield pending
            pending = (Unit(path, line, offset, rest, first=first, last=False), raw.tell())
        pending[0].last = True
        yield pending
    finally:
        raw.close()


# ---- Parquet and Arrow IPC --------------------------------------------------------------
ARROW_SUFFIXES = {".parquet": "parquet", ".pq": "parquet", ".arrow": "arrow", ".feather": "arrow",
                  ".ipc": "arrow"}  # fmt: skip


def file_format(path, input_format):
    """The format of one input file: --input-format, or else by extension (JSONL by default)."""
    if input_format:
        return input_format
    return ARROW_SUFFIXES.get(os.path.splitext(path)[1].lower(), "jsonl")


def import_pyarrow(what="Parquet and Arrow input"):
    """pyarrow with its parquet and ipc modules, or a one-line error naming the package. Its
    buffers come from the system allocator, which (with return_freed_memory) gives a row
    group's memory back when it is done; pyarrow's default pool keeps it, and resident memory
    then grows with the input."""
    try:
        import pyarrow
        import pyarrow.ipc  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise MegaliteError(f"{what} needs the `pyarrow` package: pip install pyarrow") from None
    if pyarrow.default_memory_pool().backend_name != "system":
        pyarrow.set_memory_pool(pyarrow.system_memory_pool())
    return pyarrow


def _check_columns(path, schema, keys):
    pa = import_pyarrow()
    names = schema.names
    for k in keys:
        if k not in names:
            raise MegaliteError(
                f"{path}: no column {k!r} (it has: {', '.join(names)}); choose text columns with "
                "--json-keys"
            )
        t = schema.field(k).type
        if not (pa.types.is_string(t) or pa.types.is_large_string(t)
                or getattr(pa.types, "is_string_view", lambda _: False)(t)):  # fmt: skip
            strings = [n for n in names if pa.types.is_string(schema.field(n).type)
                       or pa.types.is_large_string(schema.field(n).type)]  # fmt: skip
            raise MegaliteError(
                f"{path}: column {k!r} holds {t}, not strings (string columns: "
                f"{', '.join(strings) or 'none'}); choose text columns with --json-keys"
            )


def _record_batches(path, fmt, keys):
    """Yield (record batch of the key columns, first row number, input bytes read so far)."""
    pa = import_pyarrow()
    try:
        if fmt == "parquet":
            f = pa.parquet.ParquetFile(path)
            _check_columns(path, f.schema_arrow, keys)
            meta, size, row = f.metadata, os.path.getsize(path), 0
            for g in range(meta.num_row_groups):  # one row group in memory at a time
                table = f.read_row_group(g, columns=keys, use_threads=False)
                done = int(size * (row + table.num_rows) / max(meta.num_rows, 1))
                for batch in table.to_batches():
                    yield batch, row, done
                    row += batch.num_rows
                del table
            return
        src = pa.OSFile(path)  # read, not memory-mapped: resident memory stays one batch
        try:
            try:
                reader = pa.ipc.open_file(src)
                batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
            except pa.ArrowInvalid:  # the streaming format (Hugging Face datasets' .arrow)
                src.seek(0)
                reader = pa.ipc.open_stream(src)
                batches = iter(reader)
            _check_columns(path, reader.schema, keys)
            row = 0
            for batch in batches:
                yield batch.select(keys), row, src.tell()
                row += batch.num_rows
        finally:
            src.close()
    except (pa.ArrowException, OSError) as e:
        if isinstance(e, MegaliteError):
            raise
        what = "Parquet" if fmt == "parquet" else "Arrow IPC"
        raise MegaliteError(
            f"{path}: cannot read it as {what} ({e}); check --input-format"
        ) from None


def _string_column(pa, path, arr, key, row0):
    """-> (UTF-8 bytes, int64 offsets from 0) of a string array; nulls are an error."""
    if arr.null_count:
        first = int(np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False))[0])
        raise MegaliteError(
            f"{path}: row {row0 + first + 1}: column {key!r} is null; drop or fill such rows first"
        )
    if not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
        arr = arr.cast(pa.large_string())
    bufs = arr.buffers()
    dtype = np.int32 if pa.types.is_string(arr.type) else np.int64
    offsets = np.frombuffer(bufs[1], dtype=dtype)[arr.offset : arr.offset + len(arr) + 1]
    offsets = offsets.astype(np.int64)
    data = b"" if bufs[2] is None else bufs[2][int(offsets[0]) : int(offsets[-1])].to_pybytes()
    return data, offsets - offsets[0]


def read_arrow_units(path, fmt, keys, chunk_bytes):
    """Yield (Unit, input bytes read so far) of about chunk_bytes of text each."""
    pa = import_pyarrow()
    for batch, row0, done in _record_batches(path, fmt, keys):
        cols = [_string_column(pa, path, batch.column(k), k, row0) for k in keys]
        per_row = sum(o[1:] - o[:-1] for _, o in cols)
        cum = np.cumsum(per_row)
        cuts = np.searchsorted(cum, np.arange(chunk_bytes, cum[-1] if len(cum) else 0, chunk_bytes))
        bounds = [0, *sorted(set((cuts + 1).tolist()) - {0, len(cum)}), len(cum)]
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            if hi <= lo:
                continue
            data = [(b[o[lo] : o[hi]], o[lo : hi + 1] - o[lo]) for b, o in cols]
            yield Unit(path, row0 + lo + 1, 0, data, fmt="arrow"), done


def make_tasks(files, input_format, blank_line_docs, chunk_bytes, keys=("text",)):
    """Yield (list of Units, input bytes read so far) in input order."""
    chunk = max(1 << 12, int(chunk_bytes))
    done = 0  # bytes of finished files
    batch, batch_bytes = [], 0
    for path in files:
        fmt = file_format(path, input_format)
        if fmt in ("parquet", "arrow"):
            units = read_arrow_units(path, fmt, keys, chunk)
            pieces = False
        else:
            if fmt == "jsonl":
                cut, pieces = _cut_line, False
            elif blank_line_docs:
                cut, pieces = _cut_blank_line, False
            else:
                cut, pieces = _cut_line, True
            units = read_units(path, chunk, cut)
        for unit, pos in units:
            if not pieces:
                unit.first = unit.last = True  # whole documents only
            batch.append(unit)
            batch_bytes += unit.nbytes()
            # Small files (one document each) are batched into one task; big blocks go alone.
            if batch_bytes >= chunk:
                yield batch, done + pos
                batch, batch_bytes = [], 0
        done += os.path.getsize(path)
    if batch:
        yield batch, done


# ---- workers: parse, clean, tokenize ------------------------------------------------------
_W = {}
_HSPACE = re.compile(r"[^\S\n]+")
_EDGE_SPACE = re.compile(r" ?\n ?")
_MANY_BLANKS = re.compile(r"\n{3,}")
_BLANK_SEP = re.compile(r"\n(?:[^\S\n]*\n)+")


def normalize_whitespace(text):
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _HSPACE.sub(" ", text)
    text = _EDGE_SPACE.sub("\n", text)
    return _MANY_BLANKS.sub("\n\n", text).strip()


def return_freed_memory():
    """Give the ~0.5 MB blocks their own mmap, so freeing one returns it to the OS. glibc's default
    raises that threshold after the first such free, after which the blocks come from the heap,
    fragment it, and resident memory creeps up with the input size instead of staying flat."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD (setting it also stops the adjusting)
        libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


def init_worker(tokenizer_type, tokenizer_model, options):
    return_freed_memory()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process handles Ctrl-C for all
    os.environ.setdefault("RAYON_NUM_THREADS", "1")  # huggingface tokenizers: one thread each
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _W.clear()
    _W.update(options)
    _W["tok"] = build_tokenizer(tokenizer_type, tokenizer_model)
    _W["cleaner"] = Cleaner(options)
    if options.get("dedup") == "near":
        _W["perms"] = near_dedup.permutations(options["minhash_num_perm"])
    if options.get("sft") is not None:
        _W["chat"] = chat.build_template(options["sft"])


_JSON = json.JSONDecoder()


def _decode(unit):
    try:
        return unit.data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = unit.line + unit.data.count(b"\n", 0, e.start)
        raise MegaliteError(
            f"{unit.path}:{line}: not valid UTF-8 (byte {unit.offset + e.start}); convert the file "
            f"(e.g. iconv -t UTF-8) first"
        ) from None


def _bad_field(unit, n, obj, keys):
    have = ", ".join(map(str, obj)) if isinstance(obj, dict) else type(obj).__name__
    missing = [k for k in keys if not isinstance(obj, dict) or not isinstance(obj.get(k), str)]
    return MegaliteError(
        f"{unit.path}:{unit.line + n}: no string field {', '.join(missing)!r} (it has: {have}); "
        f"choose fields with --json-keys"
    )


def _arrow_texts(unit, data, offsets, key):
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        row = unit.line + int(np.searchsorted(offsets, e.start, "right")) - 1
        raise MegaliteError(
            f"{unit.path}: row {row}: column {key!r} is not valid UTF-8; fix the file"
        ) from None
    if len(text) != len(data):  # not ASCII: byte offsets are not character offsets
        o = offsets.tolist()
        return [data[a:b].decode("utf-8") for a, b in zip(o[:-1], o[1:])]
    o = offsets.tolist()
    return [text[a:b] for a, b in zip(o[:-1], o[1:])]


def _arrow_docs(unit):
    cols = [_arrow_texts(unit, d, o, k) for (d, o), k in zip(unit.data, _W["keys"])]
    return list(zip(*cols))


def _parse(units):
    """-> list of documents (tuples of texts, one per key), list of (first, last) or None."""
    keys, mode = _W["keys"], _W["mode"]
    docs = []
    if mode == "jsonl":  # JSONL, Parquet and Arrow units, in any mix
        # One decode per block and the decoder called directly: json.loads on bytes would sniff
        # the encoding and decode again for every line, a tenth of a worker's time.
        loads, single = _JSON.decode, keys[0] if len(keys) == 1 else None
        for unit in units:
            if unit.fmt == "arrow":
                docs += _arrow_docs(unit)
                continue
            for n, line in enumerate(_decode(unit).split("\n")):
                if not line or line.isspace():
                    continue
                try:
                    obj = loads(line)
                except ValueError as e:
                    raise MegaliteError(
                        f"{unit.path}:{unit.line + n}: not valid JSON ({e}); fix or remove the line"
                    ) from None
                try:  # the common single-key case without a generator per line: it is the hot loop
                    texts = (obj[single],) if single is not None else tuple(obj[k] for k in keys)
                except (KeyError, TypeError, IndexError):
                    raise _bad_field(unit, n, obj, keys) from None
                for t in texts:
                    if type(t) is not str:
                        raise _bad_field(unit, n, obj, keys)
                docs.append(texts)
        return docs, None
    if mode == "blank":
        for unit in units:
            for d in _BLANK_SEP.split(_decode(unit)):
                d = d.strip("\r\n")
                if d.strip():
                    docs.append((d,))
        return docs, None
    return [(_decode(u),) for u in units], [(u.first, u.last) for u in units]


def _flatten(ids, dtype, eod=None):
    """list of id sequences -> (tokens dtype[sum], lengths int64[len]), eod after each if given."""
    lengths = np.fromiter(map(len, ids), np.int64, count=len(ids))
    if not ids:
        return np.zeros(0, dtype), lengths
    if eod is not None:
        lengths += 1
        if isinstance(ids[0], np.ndarray):  # interleave [ids, eod, ids, eod, ...]: one concatenate
            # (the EOD in the output dtype: the ids' own may be too narrow, as the byte
            # tokenizer's uint8)
            parts, e = [None] * (2 * len(ids)), np.array([eod], dtype=dtype)
            parts[0::2], parts[1::2] = ids, [e] * len(ids)
            ids = parts
        else:
            for x in ids:
                x.append(eod)
    if isinstance(ids[0], np.ndarray):
        return np.concatenate(ids).astype(dtype, copy=False), lengths
    return np.fromiter(itertools.chain.from_iterable(ids), dtype, count=int(lengths.sum())), lengths


def process(units):
    """One task: parse, clean, tokenize. Complete documents are filtered here; pieces of long
    documents are returned with their measures and decided on by the main process.

    Over ~60 lines: the steps run in the order the output depends on (parse, transforms,
    length filters, quality filters, tokenize, exact and near-duplicate signatures), each a few
    lines over the same locals; --sft rows go to process_sft."""
    if _W.get("sft") is not None:
        return process_sft(units)
    tok, keys, dtype, cleaner = _W["tok"], _W["keys"], _W["dtype"], _W["cleaner"]
    docs, pieces = _parse(units)
    dropped, changed = Counter(), Counter()
    if cleaner.transforms:
        docs = cleaner.transform(docs, changed)
    if _W["normalize"]:
        docs = [tuple(normalize_whitespace(t) for t in d) for d in docs]
    if pieces is None:  # blank in every key: "empty", whatever --min-chars says
        n = len(docs)
        if len(keys) == 1:
            docs = [d for d in docs if d[0] and not d[0].isspace()]
        else:
            docs = [d for d in docs if any(t and not t.isspace() for t in d)]
        dropped["empty"] += n - len(docs)
    chars = None
    if pieces is not None or _W["min_chars"] > 0:
        chars = np.fromiter((sum(map(len, d)) for d in docs), np.int64, count=len(docs))
    if pieces is None and _W["min_chars"] > 0:
        keep = chars >= _W["min_chars"]
        dropped["min_chars"] += int((~keep).sum())
        docs = [d for d, k in zip(docs, keep) if k]
        chars = chars[keep]
    measures = None
    if pieces is None:
        docs = cleaner.filter(docs, dropped, changed)
    elif cleaner.filters:
        measures = []
        for i, d in enumerate(docs):
            text, stats, reason = cleaner.piece(d[0])
            docs[i] = (text,)
            measures.append((stats, reason))
    # Pieces of a long document get their EOD from the main process, at the document's end.
    eod = _W["eod"] if pieces is None else None
    tokens, lengths = [], []
    for k in range(len(keys)):
        t, n = _flatten(tok.tokenize_batch([d[k] for d in docs]), dtype, eod)
        tokens.append(t)
        lengths.append(n)
    if pieces is None and docs:  # drop documents without a single text token, in every key
        keep = np.sum(lengths, axis=0) > (0 if eod is None else len(keys))
        if not keep.all():
            dropped["empty"] += int((~keep).sum())
            for k in range(len(keys)):
                tokens[k] = tokens[k][np.repeat(keep, lengths[k])]
                lengths[k] = lengths[k][keep]
            docs = [d for d, kk in zip(docs, keep) if kk]
    hashes = None
    if _W["dedup"]:
        hashes = [
            hashlib.blake2b(
                "\x1f".join(d).encode("utf-8", "surrogatepass"), digest_size=16
            ).digest()
            for d in docs
        ]
    sig = keys_ = None
    if _W["dedup"] == "near":
        texts = [d[0] if len(d) == 1 else "\n".join(d) for d in docs]
        sig = near_dedup.signatures(
            texts, _W["minhash_num_perm"], _W["minhash_ngram"], _W["minhash_unit"], _W["perms"]
        )
        if pieces is None:  # a long document's keys come from its pieces' signatures combined
            keys_ = near_dedup.band_keys(sig, _W["minhash_bands"])
    return {
        "tokens": tokens,
        "lengths": lengths,
        "hashes": hashes,
        "signatures": sig,
        "band_keys": keys_,
        "chars": chars,
        "pieces": pieces,
        "measures": measures,
        "dropped": dropped,
        "changed": changed,
    }


# ---- --sft: conversations -> tokens and loss mask ------------------------------------------
def _sft_lines(unit):
    """Yield (line number, text or None when the line is not valid UTF-8) of a JSONL unit."""
    try:
        lines = unit.data.decode("utf-8").split("\n")
    except UnicodeDecodeError:
        for n, raw in enumerate(unit.data.split(b"\n")):
            try:
                yield unit.line + n, raw.decode("utf-8")
            except UnicodeDecodeError:
                yield unit.line + n, None
        return
    for n, line in enumerate(lines):
        yield unit.line + n, line


def process_sft(units):
    """One task of --sft: parse rows, render them with the chat template, tokenize segment by
    segment. Bad rows come back counted by reason with the first one's file, line and detail;
    the tokens and the loss mask come back as two aligned "keys".

    Over ~60 lines: parse, render, tokenize and the dedup signatures in the order the output
    depends on, over the same locals, as `process`."""
    tok, dtype, template = _W["tok"], _W["dtype"], _W["chat"]
    bad = {}  # reason -> [count, path, line, detail] of the first

    def note(reason, path, line, detail=None):
        if reason in bad:
            bad[reason][0] += 1
        else:
            bad[reason] = [1, path, line, detail]

    convs, rendered, where = [], [], []
    loads = _JSON.decode
    for unit in units:
        for line_no, line in _sft_lines(unit):
            if line is None:
                note("invalid_utf8", unit.path, line_no)
                continue
            if not line or line.isspace():
                continue
            try:
                obj = loads(line)
            except ValueError as e:
                detail = f"{e.msg} at column {e.colno}" if hasattr(e, "msg") else str(e)[:80]
                note("invalid_json", unit.path, line_no, detail)
                continue
            try:
                messages = chat.parse_row(obj)
                segments = template.render(messages)
            except chat.BadRow as e:
                note(e.reason, unit.path, line_no, e.detail)
                continue
            convs.append(messages)
            rendered.append(segments)
            where.append((unit.path, line_no))
    encoded = chat.encode(tok, rendered)
    keep = [i for i, (_, m) in enumerate(encoded) if m.any()]
    if len(keep) < len(encoded):
        for i in sorted(set(range(len(encoded))) - set(keep)):
            note("no_loss_tokens", *where[i])
        encoded = [encoded[i] for i in keep]
        convs = [convs[i] for i in keep]
    lengths = np.fromiter((len(t) for t, _ in encoded), np.int64, count=len(encoded))
    if encoded:
        tokens = np.concatenate([t for t, _ in encoded]).astype(dtype)
        mask = np.concatenate([m for _, m in encoded])
    else:
        tokens, mask = np.zeros(0, dtype), np.zeros(0, np.uint8)
    hashes = sig = band_keys = None
    if _W["dedup"]:  # the same conversation, whichever row shape it came in
        hashes = [
            hashlib.blake2b(
                json.dumps(c, ensure_ascii=False, sort_keys=True).encode("utf-8"), digest_size=16
            ).digest()
            for c in convs
        ]
    if _W["dedup"] == "near":
        texts = ["\n".join(m["content"] for m in c) for c in convs]
        sig = near_dedup.signatures(
            texts, _W["minhash_num_perm"], _W["minhash_ngram"], _W["minhash_unit"], _W["perms"]
        )
        band_keys = near_dedup.band_keys(sig, _W["minhash_bands"])
    return {
        "tokens": [tokens, mask],
        "lengths": [lengths, lengths.copy()],
        "hashes": hashes,
        "signatures": sig,
        "band_keys": band_keys,
        "chars": None,
        "pieces": None,
        "measures": None,
        "dropped": Counter(),
        "changed": Counter(),
        "bad": bad,
    }
