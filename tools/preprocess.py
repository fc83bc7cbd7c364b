#!/usr/bin/env python
"""Tokenize raw text into Megatron-compatible shards: {output-prefix}_{key}_document.bin/.idx.

Examples:
  python tools/preprocess.py --input 'data/*.jsonl.gz' --json-keys text \\
      --tokenizer-model tok.model --append-eod --workers 8 --output-prefix data/web
  python tools/preprocess.py --input-format text --blank-line-docs --input book.txt \\
      --tokenizer-model tok.model --append-eod --output-prefix data/book

How it streams: the main process reads the input in ~0.5 MB blocks cut at document boundaries and
hands them to --workers processes, at most a few blocks ahead of the writer; workers parse,
clean and tokenize; the main process writes results in input order as they arrive. Memory thus
stays flat whatever the input size (except --dedup, which remembers 16 bytes + a set entry per
unique document). Outputs are written under temporary names and renamed at the end, so an
interrupted run never leaves a valid-looking truncated shard.
"""

import argparse
import gc
import hashlib
import os
import signal
import sys
import time
from collections import Counter, deque

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from megalite.data.indexed import IndexedDatasetWriter, best_dtype  # noqa: E402
from megalite.data.preprocessing import (  # noqa: E402
    expand_inputs,
    init_worker,
    make_tasks,
    process,
    return_freed_memory,
)
from megalite.data.tokenizers import build_tokenizer  # noqa: E402
from megalite.errors import MegaliteError, run_main  # noqa: E402


def get_parser():
    p = argparse.ArgumentParser(
        prog="tools/preprocess.py",
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("input")
    g.add_argument(
        "--input",
        nargs="+",
        required=True,
        metavar="PATH",
        help="input files, globs (quote them) or directories (every file inside); "
        ".gz files are decompressed on the fly",
    )
    g.add_argument(
        "--input-format",
        choices=["jsonl", "text"],
        default="jsonl",
        help="jsonl: one JSON object per line (default); text: plain UTF-8 text, one "
        "document per file unless --blank-line-docs",
    )
    g.add_argument(
        "--json-keys",
        nargs="+",
        default=["text"],
        metavar="KEY",
        help="JSON fields to tokenize (default: text); each key gets its own shard pair "
        "{prefix}_{key}_document; with --input-format text the first key only names the output",
    )
    g.add_argument(
        "--blank-line-docs",
        action="store_true",
        help="with --input-format text: documents are separated by one or more blank lines "
        "(default: each file is one document)",
    )
    g = p.add_argument_group("tokenizer")
    g.add_argument(
        "--tokenizer-type",
        default=None,
        help="sentencepiece, huggingface (needs `pip install tokenizers`) or byte; default: "
        "inferred from --tokenizer-model (*.model: sentencepiece, *.json: huggingface)",
    )
    g.add_argument(
        "--tokenizer-model",
        default=None,
        metavar="PATH",
        help="sentencepiece .model (see tools/train_tokenizer.py) or huggingface tokenizer.json",
    )
    g = p.add_argument_group("output")
    g.add_argument(
        "--output-prefix",
        required=True,
        help="output path prefix; writes {prefix}_{key}_document.bin and .idx (token dtype "
        "uint16 when the vocabulary has fewer than 65500 ids, int32 otherwise)",
    )
    g.add_argument(
        "--append-eod",
        action="store_true",
        help="append the tokenizer's end-of-document token to every document (usual for GPT)",
    )
    g = p.add_argument_group("cleaning (the summary counts what each drops)")
    g.add_argument(
        "--dedup",
        action="store_true",
        help="drop exact duplicate documents (128-bit hash of the text after normalisation; "
        "keeps the first); memory grows by ~100 bytes per unique document",
    )
    g.add_argument(
        "--min-chars",
        type=int,
        default=0,
        metavar="N",
        help="drop documents with fewer than N characters after normalisation (all keys "
        "together; default 0: keep all). Empty documents (no tokens) are always dropped",
    )
    g.add_argument(
        "--normalize-whitespace",
        action="store_true",
        help="turn \\r\\n and \\r into \\n, collapse runs of other whitespace to one space, trim "
        "spaces around line breaks, keep at most one blank line, strip the ends",
    )
    g = p.add_argument_group("runtime")
    g.add_argument(
        "--workers",
        type=int,
        default=1,
        help="tokenizer processes (default 1: tokenize in the main process); the main "
        "process only reads and writes",
    )
    g.add_argument(
        "--chunk-size-mb",
        type=float,
        default=0.5,
        metavar="MB",
        help="input handed to a worker at a time (default 0.5 MB: less than that costs "
        "speed, more costs memory); bigger one-document text files are cut at line ends",
    )
    g.add_argument(
        "--log-interval",
        type=int,
        default=100000,
        metavar="DOCS",
        help="without a terminal, log progress every this many documents (and at least "
        "every 30 s); on a terminal a progress bar is shown instead",
    )
    g.add_argument(
        "--debug", action="store_true", help="show tracebacks instead of one-line errors"
    )
    return p


# ---- main process: ordered, bounded, streaming writes ---------------------------------------
def ordered_results(pool, tasks, window):
    """Yield (result, progress) in task order, at most `window` tasks in flight (pool None: "
    "inline)."""
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

            self.bar = tqdm(
                total=total_bytes,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc="preprocess",
                dynamic_ncols=True,
                mininterval=0.5,
            )

    def update(self, bytes_done, docs, tokens):
        self.docs += docs
        self.tokens += tokens
        now = time.perf_counter()
        el = max(now - self.t0, 1e-9)
        if self.bar is not None:
            self.bar.set_postfix_str(
                f"{self.docs / el:,.0f} docs/s, {self.tokens / el:,.0f} tok/s", refresh=False
            )
            self.bar.update(bytes_done - self.bytes)
        elif self.docs >= self.next_log_docs or now - self.last_log >= 30:
            print(
                f"[preprocess] {self.docs:,} docs, {self.tokens:,} tokens, "
                f"{bytes_done / 2**20:,.1f} MB "
                f"in {el:.1f} s ({self.docs / el:,.0f} docs/s, {self.tokens / el:,.0f} tokens/s, "
                f"{bytes_done / 2**20 / el:.2f} MB/s)",
                file=sys.stderr,
                flush=True,
            )
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
                h = (
                    d["hashes"][0]
                    if len(d["hashes"]) == 1
                    else hashlib.blake2b(b"".join(d["hashes"]), digest_size=16).digest()
                )
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
        raise MegaliteError(
            "--input-format text has one text per document; give at most one --json-keys (it "
            "names the output)"
        )
    if args.blank_line_docs and args.input_format != "text":
        raise MegaliteError(
            "--blank-line-docs applies to --input-format text; add --input-format text"
        )
    files = expand_inputs(args.input)
    return_freed_memory()
    tok = build_tokenizer(args.tokenizer_type, args.tokenizer_model)  # fail fast, before forking
    dtype = best_dtype(tok.vocab_size)
    eod = tok.eod if args.append_eod else None
    keys = args.json_keys[:1] if args.input_format == "text" else args.json_keys
    mode = (
        "jsonl" if args.input_format == "jsonl" else ("blank" if args.blank_line_docs else "file")
    )
    options = {
        "keys": keys,
        "mode": mode,
        "dtype": dtype,
        "eod": eod,
        "dedup": args.dedup,
        "min_chars": args.min_chars,
        "normalize": args.normalize_whitespace,
    }
    prefixes = [f"{args.output_prefix}_{k}_document" for k in keys]
    writers = [IndexedDatasetWriter(p, dtype) for p in prefixes]
    collector = Collector(writers, args, eod, dtype)
    init_args = (args.tokenizer_type, args.tokenizer_model, options)
    pool = None
    if args.workers > 1:
        import multiprocessing as mp

        # Objects that exist now are shared with the forked workers page by page; freezing them
        # keeps the garbage collector from writing to (hence un-sharing) those pages later on,
        # which would make the memory of the run grow with its length.
        gc.freeze()
        # Started before any thread (the progress bar's) exists: forking a threaded process
        # is unsafe.
        pool = mp.Pool(args.workers, initializer=init_worker, initargs=init_args)
    else:
        init_worker(*init_args)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    progress = Progress(sum(os.path.getsize(f) for f in files), args.log_interval)
    t0 = time.perf_counter()
    total_tokens = 0
    results = ordered_results(
        pool,
        make_tasks(files, args.input_format, args.blank_line_docs, args.chunk_size_mb * 2**20),
        2 * args.workers + 2,
    )
    try:
        for r, bytes_done in results:
            docs, tokens = collector.add(r)
            total_tokens += tokens
            progress.update(bytes_done, docs, tokens)
        for w in writers:
            w.finalize()
    except BaseException as e:
        for w in writers:
            w.abort()
        if isinstance(e, KeyboardInterrupt):
            raise MegaliteError(
                "interrupted; the partial outputs were removed, nothing was written"
            ) from None
        if isinstance(e, OSError) and not isinstance(e, MegaliteError):
            raise MegaliteError(
                f"writing {', '.join(prefixes)} failed ({e.strerror or e}); check the disk space "
                "and "
                f"permissions of the output directory; nothing was written"
            ) from e
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
    dropped = (
        f"dropped {d['duplicate']:,} duplicate, {d['min_chars']:,} shorter than "
        f"{args.min_chars} chars, {d['empty']:,} empty"
    )
    print(
        f"done: {collector.docs:,} documents, {total_tokens:,} tokens, {seconds:.2f} s, "
        f"{total_tokens / max(seconds, 1e-9):,.0f} tokens/s, {mb / max(seconds, 1e-9):.2f} MB/s; "
        f"{dropped}; wrote {', '.join(p + '.bin/.idx' for p in prefixes)}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
