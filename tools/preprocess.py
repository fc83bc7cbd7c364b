#!/usr/bin/env python
"""Tokenize raw text into Megatron-compatible shards: {output-prefix}_{key}_document.bin/.idx.

Examples:
  python tools/preprocess.py --input 'data/*.jsonl.gz' --json-keys text \\
      --tokenizer-model tok.model --append-eod --workers 8 --output-prefix data/web
  python tools/preprocess.py --input-format text --blank-line-docs --input book.txt \\
      --tokenizer-model tok.model --append-eod --output-prefix data/book
  python tools/preprocess.py --input 'web/*.parquet' --json-keys text --dedup near \\
      --strip-markup --remove-invalid-chars --normalize-whitespace --min-words 50 \\
      --max-repeated-line-ratio 0.3 --max-repeated-ngram-ratio 0.15 --language en \\
      --tokenizer-model tok.model --append-eod --workers 16 --output-prefix data/web \\
      --report data/web_report.json
  python tools/preprocess.py --sft --input 'chat/*.jsonl' --tokenizer-model tok.model \\
      --workers 8 --output-prefix data/chat --report data/chat_report.json

How it streams: the main process reads the input in ~0.5 MB blocks cut at document boundaries
(Parquet: row group by row group; Arrow: record batch by record batch) and hands them to
--workers processes, at most a few blocks ahead of the writer; workers parse, clean, tokenize
and compute MinHash signatures; the main process decides duplicates and writes results in input
order as they arrive. Memory thus stays flat whatever the input size, except for what
deduplication remembers per kept document: ~100 bytes for --dedup exact, plus
2 x num-perm + 14 x bands bytes for --dedup near (~0.7 GB per million documents with the
defaults). Outputs are written under temporary names and renamed at the end, so an interrupted
run never leaves a valid-looking truncated shard.

Cleaning order: --strip-markup, --remove-invalid-chars, --normalize-whitespace; then empty and
--min-chars; then the filters --min-words, --max-symbol-ratio, --language,
--max-repeated-line-ratio, --max-repeated-ngram-ratio, --filter (a document is counted under
the first that drops it); then exact and near duplicates (among the documents left). With
several --json-keys the filters and deduplication judge a document's texts together.

--sft (instruction data): JSONL rows {"messages": [{"role", "content"}, ...]} or {"prompt",
"response"[, "system"]}, rendered with a chat template (the built-in one, --chat-template FILE,
or the Hugging Face tokenizer directory's chat_template; see megalite/data/chat.py) into
{prefix}_sft_document.bin/.idx and the aligned uint8 loss mask
{prefix}_sft_document_loss_mask.bin/.idx (1 on assistant content and its end-of-turn). Bad rows
are skipped and counted by reason. --dedup works on conversations; --append-eod, --json-keys,
the cleaning flags and Parquet/Arrow/text input are refused.
"""

import argparse
import gc
import hashlib
import json
import os
import resource
import signal
import sys
import time
from collections import Counter, deque

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from megalite.data import chat  # noqa: E402
from megalite.data.cleaning import FILTERS, TRANSFORMS, Cleaner  # noqa: E402
from megalite.data.indexed import IndexedDatasetWriter, best_dtype  # noqa: E402
from megalite.data.near_dedup import (  # noqa: E402
    NearDuplicateIndex,
    bytes_per_document,
    candidate_probability,
)
from megalite.data.preprocessing import (  # noqa: E402
    expand_inputs,
    file_format,
    import_pyarrow,
    init_worker,
    make_tasks,
    process,
    return_freed_memory,
)
from megalite.data.tokenizers import build_tokenizer  # noqa: E402
from megalite.errors import MegaliteError, run_main  # noqa: E402


DEFAULTS = {
    "dedup_threshold": 0.6,
    "minhash_num_perm": 128,
    "minhash_bands": 32,
    "minhash_ngram": 3,
    "minhash_unit": "word",
    "language_threshold": 0.5,
}


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
        choices=["jsonl", "text", "parquet", "arrow"],
        default=None,
        help="jsonl: one JSON object per line; text: plain UTF-8 text, one document per file "
        "unless --blank-line-docs; parquet: Parquet files, one document per row, read row group "
        "by row group; arrow: Arrow IPC files or streams (.arrow, .feather; Hugging Face "
        "datasets' cache files), one document per row. Default: by extension (.parquet/.pq: "
        "parquet; .arrow/.feather/.ipc: arrow; anything else: jsonl). Parquet and Arrow need "
        "the pyarrow package; their documents give the same shards as the same rows as JSONL",
    )
    g.add_argument(
        "--json-keys",
        nargs="+",
        default=None,
        metavar="KEY",
        help="JSON fields (Parquet/Arrow: string columns) to tokenize (default: text); each key "
        "gets its own shard pair {prefix}_{key}_document; with --input-format text the first "
        "key only names the output",
    )
    g.add_argument(
        "--blank-line-docs",
        action="store_true",
        help="with --input-format text: documents are separated by one or more blank lines "
        "(default: each file is one document)",
    )
    g.add_argument(
        "--sft",
        action="store_true",
        help='instruction data: JSONL rows {"messages": [{"role": system|user|assistant, '
        '"content": ...}, ...]} or {"prompt", "response"[, "system"]}, rendered with '
        "a chat template; writes {prefix}_sft_document.bin/.idx and the uint8 loss mask "
        "{prefix}_sft_document_loss_mask.bin/.idx (same lengths; 1 on assistant content and its "
        "end-of-turn token). Bad rows are skipped and counted by reason; no row written is an "
        "error",
    )
    g.add_argument(
        "--chat-template",
        default=None,
        metavar="FILE|default",
        help="with --sft: a jinja chat template file (needs `pip install jinja2`), or 'default' "
        "for the built-in <|system|>/<|user|>/<|assistant|> text template ending each "
        "assistant turn with the eod token. Default: the chat_template of a Hugging Face "
        "--tokenizer-model directory (tokenizer_config.json) if it has one, else the built-in",
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
    g = p.add_argument_group(
        "cleaning (each opt-in; the summary and --report count what each drops or changes, by name)"
    )
    g.add_argument(
        "--strip-markup",
        action="store_true",
        help="strip_markup: remove HTML/XML tags (script, style and comments with their "
        "content; block-level tags become line breaks) and decode character entities",
    )
    g.add_argument(
        "--remove-invalid-chars",
        action="store_true",
        help="invalid_chars: remove control characters (but tab and line ends), lone "
        "surrogates, U+FEFF, U+FFFD replacement characters (encoding debris) and noncharacters",
    )
    g.add_argument(
        "--normalize-whitespace",
        action="store_true",
        help="turn \\r\\n and \\r into \\n, collapse runs of other whitespace to one space, "
        "trim spaces around line breaks, keep at most one blank line, strip the ends",
    )
    g.add_argument(
        "--min-chars",
        type=int,
        default=0,
        metavar="N",
        help="min_chars: drop documents with fewer than N characters after normalisation (all "
        "keys together; default 0: keep all). Empty documents (no tokens) are always dropped",
    )
    g.add_argument(
        "--min-words",
        type=int,
        default=0,
        metavar="N",
        help="min_words: drop documents with fewer than N whitespace-separated words (default "
        "0: keep all; Gopher uses 50)",
    )
    g.add_argument(
        "--max-symbol-ratio",
        type=float,
        default=None,
        metavar="R",
        help="symbol_ratio: drop documents in which more than R of the non-whitespace "
        "characters are symbols: neither letters, digits nor sentence punctuation "
        "(. , ; : ! ? ' \" ( ) - and curly quotes, dashes, ellipsis); e.g. 0.1. Catches "
        "markup debris, tables of symbols, code, junk",
    )
    g.add_argument(
        "--max-repeated-line-ratio",
        type=float,
        default=None,
        metavar="R",
        help="repeated_lines: drop documents in which the non-blank lines that repeat an earlier "
        "line are more than R of the lines, or hold more than R of their characters (Gopher: "
        "0.3 of the lines)",
    )
    g.add_argument(
        "--max-repeated-ngram-ratio",
        type=float,
        default=None,
        metavar="R",
        help="repeated_ngrams: Gopher's n-gram repetition filter from one number: drop when the "
        "most frequent word 2-, 3-, 4-gram covers more than R+0.05, R+0.03, R+0.01 of the "
        "characters, or the repeats of earlier 5- .. 10-grams cover more than R, R-0.01 .. "
        "R-0.05; 0.15 gives Gopher's thresholds",
    )
    g.add_argument(
        "--language",
        nargs="+",
        default=None,
        metavar="CODE",
        help="language: keep documents whose letters are mostly in the script of one of these "
        "languages (ISO 639-1 codes such as en ru zh ja ko ar hi, or script names such as "
        "latin cyrillic han); a heuristic on Unicode scripts, no model: languages that share a "
        "script (en, fr, de ...) are not told apart; Japanese and Chinese by their kana",
    )
    g.add_argument(
        "--language-threshold",
        type=float,
        default=None,
        metavar="F",
        help="with --language: the share of letters that must be in the language's script "
        "(default 0.5)",
    )
    g.add_argument(
        "--filter",
        default=None,
        metavar="MODULE:FUNCTION",
        help="filter: your own filter, MODULE:FUNCTION (importable, or from the current "
        "directory) or FILE.py:FUNCTION, run last in every worker. It gets the document's text "
        "(with several --json-keys: a dict key -> text) and returns True to keep it, False to "
        "drop it, or a str (a dict) to replace the text",
    )
    g = p.add_argument_group("deduplication")
    g.add_argument(
        "--dedup",
        nargs="?",
        const="exact",
        default=None,
        choices=["exact", "near"],
        help="exact (the default of a bare --dedup): drop exact duplicates (128-bit hash of "
        "the text after cleaning; keeps the first; ~100 bytes per unique document). near: also "
        "near duplicates (near_duplicate), by MinHash over n-grams and LSH banding, across all "
        "input files and workers, keeping the first occurrence in input order; keeps "
        "2 x num-perm + 14 x bands bytes per kept document (~0.7 GB per million with the "
        "defaults), never the documents",
    )
    g.add_argument(
        "--dedup-threshold",
        type=float,
        default=None,
        metavar="J",
        help="with --dedup near: a document is a near duplicate of an earlier kept one when their "
        f"estimated Jaccard similarity is at least J (default {DEFAULTS['dedup_threshold']}; "
        "a copy with 5%% of its words changed has ~0.75 on word 3-grams)",
    )
    g.add_argument(
        "--minhash-num-perm",
        type=int,
        default=None,
        metavar="N",
        help=f"with --dedup near: MinHash signature length (default "
        f"{DEFAULTS['minhash_num_perm']}); the Jaccard estimate's error is about "
        "sqrt(J(1-J)/N)",
    )
    g.add_argument(
        "--minhash-bands",
        type=int,
        default=None,
        metavar="B",
        help=f"with --dedup near: LSH bands (default {DEFAULTS['minhash_bands']}; must divide "
        "--minhash-num-perm, rows = N/B); documents of similarity J become candidates with "
        "probability 1-(1-J^rows)^B (0.6: 0.99, 0.3: 0.23 with the defaults)",
    )
    g.add_argument(
        "--minhash-ngram",
        type=int,
        default=None,
        metavar="N",
        help=f"with --dedup near: shingle length in words or characters (default "
        f"{DEFAULTS['minhash_ngram']})",
    )
    g.add_argument(
        "--minhash-unit",
        choices=["word", "char"],
        default=None,
        help="with --dedup near: shingles of words (runs of letters and digits, lowercased; "
        "the default) or of characters (lowercased, whitespace runs as one space; ~5x slower)",
    )
    g = p.add_argument_group("report")
    g.add_argument(
        "--report",
        default=None,
        metavar="PATH",
        help="write a JSON report: documents in and out, what each cleaning step and "
        "deduplication dropped or changed (by name), tokens, seconds, documents/s, the "
        "near-duplicate index's size, peak resident memory of the main process and of the "
        "workers; with --sft also the bad rows by reason, the first of each, and loss tokens",
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

    def __init__(self, writers, args, eod, dtype, cleaner):
        self.writers, self.args, self.eod, self.dtype = writers, args, eod, dtype
        self.cleaner = cleaner
        self.seen = set()
        self.near = None
        if args.dedup == "near":
            self.near = NearDuplicateIndex(
                args.minhash_num_perm, args.minhash_bands, args.dedup_threshold
            )
        self.dropped, self.changed = Counter(), Counter()
        self.docs = 0
        # --sft: the writers are tokens and loss mask; bad rows by reason: [count, path, line,
        # detail] of the first in input order
        self.sft = bool(getattr(args, "sft", False))
        self.bad = {}
        self.loss_tokens = 0
        self.doc = None  # the long document being assembled: dict(tokens, chars, hashes, ...)
        # decisions that need the whole document
        self.buffer_pieces = bool(args.dedup or args.min_chars > 0 or cleaner.filters)

    def add(self, r):
        self.dropped.update(r["dropped"])
        self.changed.update(r["changed"])
        for reason, (count, *first) in r.get("bad", {}).items():
            if reason in self.bad:
                self.bad[reason][0] += count
            else:
                self.bad[reason] = [count, *first]
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
        if self.near is not None and n:
            near = self.near.check(r["signatures"], r["band_keys"], candidates=keep)
            self.dropped["near_duplicate"] += int((keep & ~near).sum())
            keep &= near
        if keep is not None and keep.all():
            keep = None
        tokens_written = 0
        for k, (w, toks, lens) in enumerate(zip(self.writers, r["tokens"], r["lengths"])):
            if keep is not None:
                toks, lens = toks[np.repeat(keep, lens)], lens[keep]
            w.add_documents(toks, lens)
            if self.sft and k == 1:  # the loss mask: not tokens of their own
                self.loss_tokens += int(toks.sum(dtype=np.int64))
            else:
                tokens_written += len(toks)
        kept = n if keep is None else int(keep.sum())
        self.docs += kept
        return kept, tokens_written

    def _judge(self, d):
        """Why a long document assembled from pieces is dropped, or None."""
        if d["count"] == 0:
            return "empty"
        if d["chars"] < self.args.min_chars:
            return "min_chars"
        reasons = [self.cleaner.judge(*d["measures"])] if d["measures"] else []
        reasons += d["fails"]
        reasons = [x for x in reasons if x is not None]
        if reasons:
            return min(reasons, key=FILTERS.index)
        if self.args.dedup:
            h = (
                d["hashes"][0]
                if len(d["hashes"]) == 1
                else hashlib.blake2b(b"".join(d["hashes"]), digest_size=16).digest()
            )
            seen = h in self.seen
            self.seen.add(h)
            if seen:
                return "duplicate"
        if self.near is not None and not self.near.check(d["signature"][None])[0]:
            return "near_duplicate"
        return None

    def _add_pieces(self, r):
        w = self.writers[0]
        docs = tokens_written = 0
        toks, lens = r["tokens"][0], r["lengths"][0]
        starts = np.concatenate([[0], np.cumsum(lens)])
        for i, (first, last) in enumerate(r["pieces"]):
            piece = toks[starts[i] : starts[i + 1]]
            if first:
                self.doc = {"tokens": [], "count": 0, "chars": 0, "hashes": [], "fails": [],
                            "measures": None, "signature": None}  # fmt: skip
            d = self.doc
            d["count"] += len(piece)
            d["chars"] += int(r["chars"][i])
            if r["hashes"] is not None:
                d["hashes"].append(r["hashes"][i])
            if r["measures"] is not None:  # words, symbols, non-space chars: sums; scripts
                stats, fail = r["measures"][i]
                m = d["measures"]
                d["measures"] = stats if m is None else tuple(
                    a + b if a is not None else None for a, b in zip(m, stats)
                )  # fmt: skip
                d["fails"].append(fail)
            if r["signatures"] is not None:  # the signature of a union: the elementwise min
                sig = r["signatures"][i]
                d["signature"] = sig if d["signature"] is None else np.minimum(d["signature"], sig)
            if self.buffer_pieces:
                d["tokens"].append(piece)
            elif len(piece):
                w.extend_item(piece)
                tokens_written += len(piece)
            if not last:
                continue
            self.doc = None
            reason = self._judge(d)
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


def _check_args(args):
    """One-line errors for flags out of range or without the flag they qualify."""
    if args.workers < 1:
        raise MegaliteError(f"--workers must be at least 1, got {args.workers}")
    for flag, v in (("--min-chars", args.min_chars), ("--min-words", args.min_words)):
        if v < 0:
            raise MegaliteError(f"{flag} must be >= 0, got {v}")
    if args.chunk_size_mb <= 0 or args.log_interval < 1:
        raise MegaliteError("--chunk-size-mb and --log-interval must be positive")
    _check_sft_args(args)
    if args.json_keys is None:
        args.json_keys = ["text"]
    if args.input_format == "text" and len(args.json_keys) > 1:
        raise MegaliteError(
            "--input-format text has one text per document; give at most one --json-keys (it "
            "names the output)"
        )
    if args.blank_line_docs and args.input_format != "text":
        raise MegaliteError(
            "--blank-line-docs applies to --input-format text; add --input-format text"
        )
    for flag in ("max_symbol_ratio", "max_repeated_line_ratio", "max_repeated_ngram_ratio",
                 "language_threshold", "dedup_threshold"):  # fmt: skip
        v = getattr(args, flag)
        if v is not None and not 0 <= v <= 1:
            raise MegaliteError(f"--{flag.replace('_', '-')} must be between 0 and 1, got {v}")
    qualified = {
        "near": ("dedup_threshold", "minhash_num_perm", "minhash_bands", "minhash_ngram",
                 "minhash_unit"),
        "language": ("language_threshold",),
    }  # fmt: skip
    for name, flags in qualified.items():
        active = args.dedup == "near" if name == "near" else args.language
        for flag in flags:
            if getattr(args, flag) is None:
                setattr(args, flag, DEFAULTS[flag])
            elif not active:
                need = "--dedup near" if name == "near" else "--language"
                raise MegaliteError(f"--{flag.replace('_', '-')} applies to {need}; add {need}")
    if args.dedup == "near":
        n, b = args.minhash_num_perm, args.minhash_bands
        if n < 1 or b < 1 or n % b:
            raise MegaliteError(
                f"--minhash-bands {b} must divide --minhash-num-perm {n} (both positive)"
            )
        if args.minhash_ngram < 1:
            raise MegaliteError(f"--minhash-ngram must be at least 1, got {args.minhash_ngram}")
        if args.dedup_threshold <= 0:
            raise MegaliteError("--dedup-threshold must be above 0")


CLEANING_FLAGS = (
    ("--strip-markup", "strip_markup", False),
    ("--remove-invalid-chars", "remove_invalid_chars", False),
    ("--normalize-whitespace", "normalize_whitespace", False),
    ("--min-chars", "min_chars", 0),
    ("--min-words", "min_words", 0),
    ("--max-symbol-ratio", "max_symbol_ratio", None),
    ("--max-repeated-line-ratio", "max_repeated_line_ratio", None),
    ("--max-repeated-ngram-ratio", "max_repeated_ngram_ratio", None),
    ("--language", "language", None),
    ("--filter", "filter", None),
)


def _check_sft_args(args):
    """--sft takes JSONL conversations and --dedup; the flags that make no sense there are
    refused in one line each."""
    if not args.sft:
        if args.chat_template is not None:
            raise MegaliteError("--chat-template applies to --sft; add --sft")
        return
    if args.input_format not in (None, "jsonl"):
        raise MegaliteError(
            f"--sft reads JSONL conversations, not --input-format {args.input_format}; convert "
            'the rows to JSONL (one {"messages": [...]} or {"prompt", "response"} a line)'
        )
    if args.json_keys is not None:
        raise MegaliteError(
            "--sft reads the fields messages or prompt/response (and system); drop --json-keys"
        )
    if args.append_eod:
        raise MegaliteError(
            "--append-eod does not apply to --sft: the chat template ends every assistant turn "
            "(the default one with the eod token); drop --append-eod"
        )
    used = [flag for flag, name, off in CLEANING_FLAGS if getattr(args, name) != off]
    if used:
        raise MegaliteError(
            f"--sft does not clean text (it would change the conversations the loss mask is "
            f"built from); drop {', '.join(used)} and clean the rows beforehand"
        )


def peak_rss_mb(pid="self"):
    """Peak resident memory (MB) of a process: VmHWM, the high-water mark of its own address
    space (ru_maxrss would carry a launching parent's over exec); ru_maxrss where there is no
    /proc."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    if pid != "self":
        return None
    kb = 1 if sys.platform != "darwin" else 1 / 1024  # ru_maxrss: KB on Linux, bytes on macOS
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * kb / 1024, 1)


def describe_bad_rows(bad):
    """'skipped 3 bad rows: 2 empty_content (first: a.jsonl line 7: message 1), ...'."""
    total = sum(v[0] for v in bad.values())
    if not total:
        return "skipped 0 bad rows"
    order = list(chat.BAD_ROW_REASONS)
    parts = []
    for reason in sorted(bad, key=lambda r: (-bad[r][0], order.index(r) if r in order else 99)):
        count, path, line, detail = bad[reason]
        first = f"{path} line {line}" + (f": {detail}" if detail else "")
        parts.append(f"{count:,} {reason} (first: {first})")
    return f"skipped {total:,} bad row{'s' * (total != 1)}: " + ", ".join(parts)


def _sft_summary(args, files, prefixes, collector, tokens, seconds, mb, worker_mb):
    d, bad = collector.dropped, collector.bad
    rows_in = collector.docs + sum(d.values()) + sum(v[0] for v in bad.values())
    dedup = [k for k, on in (("duplicate", bool(args.dedup)),
                             ("near_duplicate", args.dedup == "near")) if on]  # fmt: skip
    line = describe_bad_rows(bad)
    if dedup:
        line += "; dropped " + ", ".join(f"{d[k]:,} {k}" for k in dedup)
    share = 100 * collector.loss_tokens / max(tokens, 1)
    template = args._template_origin
    print(
        f"done: {collector.docs:,} conversations, {tokens:,} tokens ({collector.loss_tokens:,} "
        f"loss tokens, {share:.1f}%), {seconds:.2f} s, {tokens / max(seconds, 1e-9):,.0f} "
        f"tokens/s, {rows_in / max(seconds, 1e-9):,.0f} rows/s; chat template {template}; {line}; "
        f"wrote {', '.join(p + '.bin/.idx' for p in prefixes)}",
        flush=True,
    )
    if args.report:
        report = {
            "inputs": files,
            "outputs": [p + ".bin/.idx" for p in prefixes],
            "chat_template": template,
            "documents_in": rows_in,
            "documents": collector.docs,
            "tokens": tokens,
            "loss_tokens": collector.loss_tokens,
            "input_mb": round(mb, 3),
            "seconds": round(seconds, 3),
            "documents_per_second": round(rows_in / max(seconds, 1e-9), 1),
            "workers": args.workers,
            "bad_rows": {r: v[0] for r, v in bad.items()},
            "bad_rows_first": {
                r: {"file": v[1], "line": v[2], "detail": v[3]} for r, v in bad.items()
            },
            "dropped": {k: d[k] for k in dedup},
            "peak_rss_mb": {"main": peak_rss_mb(), "workers": worker_mb},
        }
        if args.dedup:
            report["dedup"] = {"mode": args.dedup, "exact_hashes": len(collector.seen)}
        write_report(args.report, report)
    return 0


def write_report(path, report):
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def main(argv):
    args = get_parser().parse_args(argv)
    _check_args(args)
    files = expand_inputs(args.input)
    formats = {file_format(f, args.input_format) for f in files}
    if args.sft and formats != {"jsonl"}:
        other = next(f for f in files if file_format(f, args.input_format) != "jsonl")
        raise MegaliteError(
            f"--sft reads JSONL conversations; {other} is {file_format(other, None)}: convert "
            "it to JSONL (or pass --input-format jsonl if it is JSONL)"
        )
    arrow_like = [n for f, n in (("parquet", "Parquet"), ("arrow", "Arrow")) if f in formats]
    if arrow_like:
        import_pyarrow(" and ".join(arrow_like) + " input")
    return_freed_memory()
    tok = build_tokenizer(args.tokenizer_type, args.tokenizer_model)  # fail fast, before forking
    dtype = best_dtype(tok.vocab_size)
    eod = tok.eod if args.append_eod else None
    keys = args.json_keys[:1] if args.input_format == "text" else args.json_keys
    mode = "jsonl" if args.input_format != "text" else ("blank" if args.blank_line_docs else "file")
    options = {
        "keys": keys,
        "mode": mode,
        "dtype": dtype,
        "eod": eod,
        "dedup": args.dedup,
        "min_chars": args.min_chars,
        "normalize": args.normalize_whitespace,
        "strip_markup": args.strip_markup,
        "remove_invalid_chars": args.remove_invalid_chars,
        "min_words": args.min_words,
        "max_symbol_ratio": args.max_symbol_ratio,
        "max_repeated_line_ratio": args.max_repeated_line_ratio,
        "max_repeated_ngram_ratio": args.max_repeated_ngram_ratio,
        "language": args.language,
        "language_threshold": args.language_threshold,
        "filter": args.filter,
        "minhash_num_perm": args.minhash_num_perm,
        "minhash_bands": args.minhash_bands,
        "minhash_ngram": args.minhash_ngram,
        "minhash_unit": args.minhash_unit,
        "sft": None,
    }
    cleaner = Cleaner(options)  # fail fast on --language and --filter, before forking
    if args.sft:
        options["sft"] = chat.template_options(args.chat_template, args.tokenizer_model, tok)
        chat.build_template(options["sft"])  # fail fast: jinja2 missing, a syntax error
        args._template_origin = options["sft"]["origin"]
        prefixes = [chat.sft_prefix(args.output_prefix)]
        prefixes.append(chat.loss_mask_prefix(prefixes[0]))
        writers = [IndexedDatasetWriter(prefixes[0], dtype),
                   IndexedDatasetWriter(prefixes[1], np.uint8)]  # fmt: skip
    else:
        prefixes = [f"{args.output_prefix}_{k}_document" for k in keys]
        writers = [IndexedDatasetWriter(p, dtype) for p in prefixes]
    collector = Collector(writers, args, eod, dtype, cleaner)
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
        make_tasks(
            files, args.input_format, args.blank_line_docs, args.chunk_size_mb * 2**20, keys
        ),
        2 * args.workers + 2,
    )
    try:
        for r, bytes_done in results:
            docs, tokens = collector.add(r)
            total_tokens += tokens
            progress.update(bytes_done, docs, tokens)
        if args.sft and collector.docs == 0:
            why = describe_bad_rows(collector.bad) if collector.bad else "the input has no rows"
            if collector.dropped:
                why += f", {sum(collector.dropped.values()):,} duplicates dropped"
            raise MegaliteError(f"no conversation written: {why}; nothing was written")
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
        worker_mb = None
        if pool is not None:
            import multiprocessing as mp

            peaks = [peak_rss_mb(c.pid) for c in mp.active_children()]
            worker_mb = max((x for x in peaks if x is not None), default=None)
            pool.terminate()
            pool.join()
    seconds = time.perf_counter() - t0
    mb = progress.bytes / 2**20
    d, c = collector.dropped, collector.changed
    active = [k for k, on in (
        ("near_duplicate", args.dedup == "near"),
        ("min_words", args.min_words > 0),
        ("symbol_ratio", args.max_symbol_ratio is not None),
        ("language", bool(args.language)),
        ("repeated_lines", args.max_repeated_line_ratio is not None),
        ("repeated_ngrams", args.max_repeated_ngram_ratio is not None),
        ("filter", bool(args.filter)),
    ) if on]  # fmt: skip
    changers = [k for k, on in (
        ("strip_markup", args.strip_markup),
        ("invalid_chars", args.remove_invalid_chars),
        ("filter", bool(args.filter)),
    ) if on]  # fmt: skip
    dropped = (
        f"dropped {d['duplicate']:,} duplicate, {d['min_chars']:,} shorter than "
        f"{args.min_chars} chars, {d['empty']:,} empty"
    )
    dropped += "".join(f", {d[k]:,} {k}" for k in active)
    if changers:
        dropped += "; changed " + ", ".join(f"{c[k]:,} {k}" for k in changers)
    if args.sft:
        return _sft_summary(args, files, prefixes, collector, total_tokens, seconds, mb, worker_mb)
    docs_in = collector.docs + sum(d.values())
    print(
        f"done: {collector.docs:,} documents, {total_tokens:,} tokens, {seconds:.2f} s, "
        f"{total_tokens / max(seconds, 1e-9):,.0f} tokens/s, {mb / max(seconds, 1e-9):.2f} MB/s, "
        f"{docs_in / max(seconds, 1e-9):,.0f} documents/s; "
        f"{dropped}; wrote {', '.join(p + '.bin/.idx' for p in prefixes)}",
        flush=True,
    )
    if args.report:
        report = {
            "inputs": files,
            "outputs": [p + ".bin/.idx" for p in prefixes],
            "documents_in": docs_in,
            "documents": collector.docs,
            "tokens": total_tokens,
            "input_mb": round(mb, 3),
            "seconds": round(seconds, 3),
            "documents_per_second": round(docs_in / max(seconds, 1e-9), 1),
            "workers": args.workers,
            "dropped": {
                k: d[k]
                for k in ("empty", "min_chars", "duplicate", *FILTERS, "near_duplicate")
                if k in d or k in active
            },  # fmt: skip
            "changed": {k: c[k] for k in (*TRANSFORMS, "filter") if k in changers},
            "peak_rss_mb": {"main": peak_rss_mb(), "workers": worker_mb},
        }
        if args.dedup:
            report["dedup"] = {"mode": args.dedup, "exact_hashes": len(collector.seen)}
        if collector.near is not None:
            nd, n, b = collector.near, args.minhash_num_perm, args.minhash_bands
            report["dedup"].update({
                "threshold": args.dedup_threshold, "num_perm": n, "bands": b, "rows": n // b,
                "ngram": args.minhash_ngram, "unit": args.minhash_unit,
                "candidate_probability_at_threshold": round(
                    candidate_probability(args.dedup_threshold, n, b), 4),
                "signatures": nd.size, "index_bytes": nd.nbytes(),
                "bytes_per_document": bytes_per_document(n, b),
            })  # fmt: skip
        write_report(args.report, report)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
