#!/usr/bin/env python
"""Tokenize raw text into Megatron-compatible shards: {output-prefix}_{key}_document.bin/.idx.

Examples:
  python tools/preprocess.py --input 'data/*.jsonl.gz' --json-keys text \\
      --tokenizer-model tok.model --append-eod --workers 8 --output-prefix data/web
  python tools/preprocess.py --input-format text --blank-line-docs --input book.txt \\
      --tokenizer-model tok.model --append-eod --output-prefix data/book

How it streams: the main process reads the input in ~1 MB blocks cut at document boundaries and
hands them to --workers processes, at most a few blocks ahead of the writer; workers parse,
clean and tokenize; the main process writes results in input order as they arrive. Memory thus
stays flat whatever the input size (except --dedup, which remembers 16 bytes + a set entry per
unique document). Outputs are written under temporary names and renamed at the end, so an
interrupted run never leaves a valid-looking truncated shard.
"""

import argparse
import ctypes
import glob
import gzip
import hashlib
import itertools
import json
import os
import re
import signal
import sys
import time
from collections import Counter, deque

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from megalite.data.indexed import IndexedDatasetWriter, best_dtype  # noqa: E402
from megalite.data.tokenizers import build_tokenizer  # noqa: E402
from megalite.errors import MegaliteError, run_main  # noqa: E402

BOM = b"\xef\xbb\xbf"


def get_parser():
    p = argparse.ArgumentParser(
        prog="tools/preprocess.py",
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("input")
    g.add_argument("--input", nargs="+", required=True, metavar="PATH",
                   help="input files, globs (quote them) or directories (every file inside); "
                        ".gz files are decompressed on the fly")
    g.add_argument("--input-format", choices=["jsonl", "text"], default="jsonl",
                   help="jsonl: one JSON object per line (default); text: plain UTF-8 text, one "
                        "document per file unless --blank-line-docs")
    g.add_argument("--json-keys", nargs="+", default=["text"], metavar="KEY",
                   help="JSON fields to tokenize (default: text); each key gets its own shard pair "
                        "{prefix}_{key}_document; with --input-format text the first key only names the output")
    g.add_argument("--blank-line-docs", action="store_true",
                   help="with --input-format text: documents are separated by one or more blank lines "
                        "(default: each file is one document)")
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-type", default=None,
                   help="sentencepiece, huggingface (needs `pip install tokenizers`) or byte; default: "
                        "inferred from --tokenizer-model (*.model: sentencepiece, *.json: huggingface)")
    g.add_argument("--tokenizer-model", default=None, metavar="PATH",
                   help="sentencepiece .model (see tools/train_tokenizer.py) or huggingface tokenizer.json")
    g = p.add_argument_group("output")
    g.add_argument("--output-prefix", required=True,
                   help="output path prefix; writes {prefix}_{key}_document.bin and .idx (token dtype "
                        "uint16 when the vocabulary has fewer than 65500 ids, int32 otherwise)")
    g.add_argument("--append-eod", action="store_true",
                   help="append the tokenizer's end-of-document token to every document (usual for GPT)")
    g = p.add_argument_group("cleaning (the summary counts what each drops)")
    g.add_argument("--dedup", action="store_true",
                   help="drop exact duplicate documents (128-bit hash of the text after normalisation; "
                        "keeps the first); memory grows by ~100 bytes per unique document")
    g.add_argument("--min-chars", type=int, default=0, metavar="N",
                   help="drop documents with fewer than N characters after normalisation (all keys "
                        "together; default 0: keep all). Empty documents (no tokens) are always dropped")
    g.add_argument("--normalize-whitespace", action="store_true",
                   help="turn \\r\\n and \\r into \\n, collapse runs of other whitespace to one space, trim "
                        "spaces around line breaks, keep at most one blank line, strip the ends")
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=1,
                   help="tokenizer processes (default 1: tokenize in the main process); the main "
                        "process only reads and writes")
    g.add_argument("--chunk-size-mb", type=float, default=1.0, metavar="MB",
                   help="input handed to a worker at a time (default 1 MB); larger documents are "
                        "cut at line ends (one-document-per-file text)")
    g.add_argument("--log-interval", type=int, default=100000, metavar="DOCS",
                   help="without a terminal, log progress every this many documents (and at least "
                        "every 30 s); on a terminal a progress bar is shown instead")
    g.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    return p


# ---- reading: blocks cut at document boundaries -------------------------------------------
def expand_inputs(patterns):
    files = []
    for pat in patterns:
        if os.path.isdir(pat):
            matched = sorted(os.path.join(pat, f) for f in os.listdir(pat)
                             if not f.startswith(".") and os.path.isfile(os.path.join(pat, f)))
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
    """A block of input: whole documents, or (text files) a piece of one document."""

    __slots__ = ("path", "line", "offset", "data", "first", "last")

    def __init__(self, path, line, offset, data, first=True, last=True):
        self.path, self.line, self.offset, self.data, self.first, self.last = path, line, offset, data, first, last


def read_units(path, chunk_bytes, cut):
    """Yield (Unit, raw bytes read so far) for one file, in blocks of about chunk_bytes that end
    where `cut` allows (a block grows until one is found). The last Unit has last=True."""
    raw = open(path, "rb")
    f = gzip.GzipFile(fileobj=raw) if path.endswith(".gz") else raw
    try:
        parts, size, line, offset, first, start = [], 0, 1, 0, True, True
        pending = None  # one block behind, to know which block is the last
        while True:
            try:
                data = f.read(chunk_bytes)
            except (OSError, EOFError) as e:
                raise MegaliteError(f"{path}: cannot read ({e}); is the file complete?") from e
            if start:
                data, start = (data[len(BOM):] if data.startswith(BOM) else data), False
            if not data:
                break
            # Search the new bytes plus a margin, for a boundary that straddles two reads.
            window = (parts[-1][-256:] if parts else b"") + data
            pos = cut(window)
            parts.append(data)
            size += len(data)
            if pos < 0:
                continue
            cut_at = size - len(window) + pos
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


def make_tasks(files, args):
    """Yield (list of Units, input bytes read so far) in input order."""
    chunk = max(1 << 12, int(args.chunk_size_mb * (1 << 20)))
    done = 0  # bytes of finished files
    batch, batch_bytes = [], 0
    for path in files:
        if args.input_format == "jsonl":
            cut, pieces = _cut_line, False
        elif args.blank_line_docs:
            cut, pieces = _cut_blank_line, False
        else:
            cut, pieces = _cut_line, True
        for unit, pos in read_units(path, chunk, cut):
            if not pieces:
                unit.first = unit.last = True  # whole documents only
            batch.append(unit)
            batch_bytes += len(unit.data)
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
    """Give the ~1 MB blocks their own mmap, so freeing one returns it to the OS. glibc's default
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


def _decode(unit):
    try:
        return unit.data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MegaliteError(
            f"{unit.path}: not valid UTF-8 at byte {unit.offset + e.start}; convert the file "
            f"(e.g. iconv -t UTF-8) first"
        ) from None


def _parse(units):
    """-> list of documents (tuples of texts, one per key), list of (first, last) or None."""
    keys, mode = _W["keys"], _W["mode"]
    docs = []
    if mode == "jsonl":
        for unit in units:
            for n, line in enumerate(unit.data.split(b"\n")):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except ValueError as e:
                    raise MegaliteError(f"{unit.path}:{unit.line + n}: not valid JSON ({e}); fix or remove the line") from None
                try:
                    texts = tuple(obj[k] for k in keys)
                except (KeyError, TypeError):
                    have = ", ".join(map(str, obj)) if isinstance(obj, dict) else type(obj).__name__
                    raise MegaliteError(
                        f"{unit.path}:{unit.line + n}: no field {', '.join(k for k in keys if not isinstance(obj, dict) or k not in obj)!r} "
                        f"(it has: {have}); choose fields with --json-keys"
                    ) from None
                if not all(isinstance(t, str) for t in texts):
                    raise MegaliteError(f"{unit.path}:{unit.line + n}: field {keys} is not a string; fix the line")
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


def _flatten(ids, dtype):
    """list of id sequences -> (tokens dtype[sum], lengths int64[len])."""
    lengths = np.fromiter((len(x) for x in ids), np.int64, count=len(ids))
    if not ids:
        return np.zeros(0, dtype), lengths
    if isinstance(ids[0], np.ndarray):
        return np.concatenate(ids).astype(dtype, copy=False), lengths
    return np.fromiter(itertools.chain.from_iterable(ids), dtype, count=int(lengths.sum())), lengths


def process(units):
    """One task: parse, clean, tokenize. Complete documents are filtered here; pieces of long
    documents are returned unfiltered and decided on by the main process."""
    tok, keys, dtype = _W["tok"], _W["keys"], _W["dtype"]
    docs, pieces = _parse(units)
    dropped = Counter()
    if _W["normalize"]:
        docs = [tuple(normalize_whitespace(t) for t in d) for d in docs]
    if pieces is None:  # blank in every key: "empty", whatever --min-chars says
        n = len(docs)
        docs = [d for d in docs if any(not t.isspace() and t for t in d)]
        dropped["empty"] += n - len(docs)
    chars = np.fromiter((sum(map(len, d)) for d in docs), np.int64, count=len(docs))
    if pieces is None and _W["min_chars"] > 0:
        keep = chars >= _W["min_chars"]
        dropped["min_chars"] += int((~keep).sum())
        docs = [d for d, k in zip(docs, keep) if k]
        chars = chars[keep]
    tokens, lengths = [], []
    for k in range(len(keys)):
        t, n = _flatten(tok.tokenize_batch([d[k] for d in docs]), dtype)
        tokens.append(t)
        lengths.append(n)
    if pieces is None and docs:  # drop documents without a single token, in every key
        keep = np.sum(lengths, axis=0) > 0
        if not keep.all():
            dropped["empty"] += int((~keep).sum())
            for k in range(len(keys)):
                tokens[k] = tokens[k][np.repeat(keep, lengths[k])]
                lengths[k] = lengths[k][keep]
            docs = [d for d, kk in zip(docs, keep) if kk]
            chars = chars[keep]
    hashes = None
    if _W["dedup"]:
        hashes = [hashlib.blake2b("\x1f".join(d).encode("utf-8", "surrogatepass"), digest_size=16).digest()
                  for d in docs]
    if pieces is None and _W["eod"] is not None:  # pieces get their EOD from the main process
        for k in range(len(keys)):
            tokens[k] = np.insert(tokens[k], np.cumsum(lengths[k]), np.array(_W["eod"], dtype))
            lengths[k] = lengths[k] + 1
    return {
        "tokens": tokens, "lengths": lengths, "hashes": hashes, "chars": chars,
        "pieces": pieces, "dropped": dropped, "bytes": sum(len(u.data) for u in units),
    }


# ---- main process: ordered, bounded, streaming writes ---------------------------------------
def ordered_results(pool, tasks, window):
    """Yield (result, progress) in task order, at most `window` tasks in flight (pool None: inline)."""
    if pool is None:
        for units, progress in tasks:
            yield process(units), progress
        return
    pending = deque()
    for units, progress in tasks:
        pending.append((pool.apply_async(process, (units,)), progress))
        if len(pending) >= window:
            res, prog = pending.popleft()
            yield res.get(), prog
    while pending:
        res, prog = pending.popleft()
        yield res.get(), prog


class Progress:
    """tqdm bar on a terminal; otherwise a line every log_interval documents or 30 s."""

    def __init__(self, total_bytes, log_interval):
        self.t0 = time.perf_counter()
        self.docs = self.tokens = self.bytes = 0
        self.log_interval, self.next_log_docs, self.last_log = log_interval, log_interval, self.t0
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024,
                            desc="preprocess", dynamic_ncols=True, mininterval=0.5)

    def update(self, bytes_done, docs, tokens):
        self.docs += docs
        self.tokens += tokens
        now = time.perf_counter()
        el = max(now - self.t0, 1e-9)
        if self.bar is not None:
            self.bar.set_postfix_str(f"{self.docs / el:,.0f} docs/s, {self.tokens / el:,.0f} tok/s", refresh=False)
            self.bar.update(bytes_done - self.bytes)
        elif self.docs >= self.next_log_docs or now - self.last_log >= 30:
            print(f"[preprocess] {self.docs:,} docs, {self.tokens:,} tokens, {bytes_done / 2**20:,.1f} MB "
                  f"in {el:.1f} s ({self.docs / el:,.0f} docs/s, {self.tokens / el:,.0f} tokens/s, "
                  f"{bytes_done / 2**20 / el:.2f} MB/s)", file=sys.stderr, flush=True)
            self.next_log_docs = (self.docs // self.log_interval + 1) * self.log_interval
            self.last_log = now
        self.bytes = bytes_done

    def close(self):
        if self.bar is not None:
            self.bar.close()


class Collector:
    """Writes results in order; applies --dedup, and assembles long documents from pieces."""

    def __init__(self, writers, args, eod, dtype):
        self.writers, self.args, self.eod, self.dtype = writers, args, eod, dtype
        self.seen = set()
        self.dropped = Counter()
        self.docs = 0
        self.doc = None  # the long document being assembled: dict(tokens, chars, hashes, count)
        self.buffer_pieces = args.dedup or args.min_chars > 0  # decisions need the whole document

    def add(self, r):
        self.dropped.update(r["dropped"])
        if r["pieces"] is None:
            return self._add_documents(r)
        return self._add_pieces(r)

    def _add_documents(self, r):
        n = len(r["lengths"][0])
        keep = None
        if r["hashes"] is not None:
            keep = np.ones(n, dtype=bool)
            for i, h in enumerate(r["hashes"]):
                if h in self.seen:
                    keep[i] = False
                else:
                    self.seen.add(h)
            self.dropped["duplicate"] += int(n - keep.sum())
            if keep.all():
                keep = None
        tokens_written = 0
        for w, toks, lens in zip(self.writers, r["tokens"], r["lengths"]):
            if keep is not None:
                toks, lens = toks[np.repeat(keep, lens)], lens[keep]
            w.add_documents(toks, lens)
            tokens_written += len(toks)
        kept = n if keep is None else int(keep.sum())
        self.docs += kept
        return kept, tokens_written

    def _add_pieces(self, r):
        w = self.writers[0]
        docs = tokens_written = 0
        toks, lens = r["tokens"][0], r["lengths"][0]
        starts = np.concatenate([[0], np.cumsum(lens)])
        for i, (first, last) in enumerate(r["pieces"]):
            piece = toks[starts[i] : starts[i + 1]]
            if first:
                self.doc = {"tokens": [], "count": 0, "chars": 0, "hashes": []}
            d = self.doc
            d["count"] += len(piece)
            d["chars"] += int(r["chars"][i])
            if r["hashes"] is not None:
                d["hashes"].append(r["hashes"][i])
            if self.buffer_pieces:
                d["tokens"].append(piece)
            elif len(piece):
                w.extend_item(piece)
                tokens_written += len(piece)
            if not last:
                continue
            self.doc = None
            reason = None
            if d["count"] == 0:
                reason = "empty"
            elif d["chars"] < self.args.min_chars:
                reason = "min_chars"
            elif self.args.dedup:
                h = d["hashes"][0] if len(d["hashes"]) == 1 else hashlib.blake2b(b"".join(d["hashes"]), digest_size=16).digest()
                if h in self.seen:
                    reason = "duplicate"
                self.seen.add(h)
            if reason is not None:
                assert self.buffer_pieces or d["count"] == 0  # streamed tokens can't be taken back
                self.dropped[reason] += 1
                continue
            for piece in d["tokens"]:
                w.extend_item(piece)
                tokens_written += len(piece)
            if self.eod is not None:
                w.extend_item(np.array([self.eod], self.dtype))
                tokens_written += 1
            w.end_document()
            docs += 1
        self.docs += docs
        return docs, tokens_written


def main(argv):
    args = get_parser().parse_args(argv)
    if args.workers < 1:
        raise MegaliteError(f"--workers must be at least 1, got {args.workers}")
    if args.min_chars < 0:
        raise MegaliteError(f"--min-chars must be >= 0, got {args.min_chars}")
    if args.chunk_size_mb <= 0 or args.log_interval < 1:
        raise MegaliteError("--chunk-size-mb and --log-interval must be positive")
    if args.input_format == "text" and len(args.json_keys) > 1:
        raise MegaliteError("--input-format text has one text per document; give at most one --json-keys (it names the output)")
    if args.blank_line_docs and args.input_format != "text":
        raise MegaliteError("--blank-line-docs applies to --input-format text; add --input-format text")
    files = expand_inputs(args.input)
    return_freed_memory()
    tok = build_tokenizer(args.tokenizer_type, args.tokenizer_model)  # fail fast, before forking
    dtype = best_dtype(tok.vocab_size)
    eod = tok.eod if args.append_eod else None
    keys = args.json_keys[:1] if args.input_format == "text" else args.json_keys
    mode = "jsonl" if args.input_format == "jsonl" else ("blank" if args.blank_line_docs else "file")
    options = {"keys": keys, "mode": mode, "dtype": dtype, "eod": eod, "dedup": args.dedup,
               "min_chars": args.min_chars, "normalize": args.normalize_whitespace}
    prefixes = [f"{args.output_prefix}_{k}_document" for k in keys]
    writers = [IndexedDatasetWriter(p, dtype) for p in prefixes]
    collector = Collector(writers, args, eod, dtype)
    init_args = (args.tokenizer_type, args.tokenizer_model, options)
    pool = None
    if args.workers > 1:
        import multiprocessing as mp

        # Started before any thread (the progress bar's) exists: forking a threaded process is unsafe.
        pool = mp.Pool(args.workers, initializer=init_worker, initargs=init_args)
    else:
        init_worker(*init_args)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    progress = Progress(sum(os.path.getsize(f) for f in files), args.log_interval)
    t0 = time.perf_counter()
    total_tokens = 0
    results = ordered_results(pool, make_tasks(files, args), 2 * args.workers + 2)
    try:
        for r, bytes_done in results:
            docs, tokens = collector.add(r)
            total_tokens += tokens
            progress.update(bytes_done, docs, tokens)
        for w in writers:
            w.finalize()
    except BaseException:
        for w in writers:
            w.abort()
        raise
    finally:
        results.close()
        progress.close()
        if pool is not None:
            pool.terminate()
            pool.join()
    seconds = time.perf_counter() - t0
    mb = progress.bytes / 2**20
    d = collector.dropped
    dropped = (f"dropped {d['duplicate']:,} duplicate, {d['min_chars']:,} shorter than "
               f"{args.min_chars} chars, {d['empty']:,} empty")
    print(f"done: {collector.docs:,} documents, {total_tokens:,} tokens, {seconds:.2f} s, "
          f"{total_tokens / max(seconds, 1e-9):,.0f} tokens/s, {mb / max(seconds, 1e-9):.2f} MB/s; "
          f"{dropped}; wrote {', '.join(p + '.bin/.idx' for p in prefixes)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
