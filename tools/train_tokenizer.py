#!/usr/bin/env python
"""Train a sentencepiece tokenizer on raw text: writes {output-prefix}.model and .vocab.

Example:
  python tools/train_tokenizer.py --input data/tinyshakespeare.txt --vocab-size 2000 \\
      --model-type bpe --output-prefix data/tok
  python tools/preprocess.py --tokenizer-model data/tok.model ...

Ids 0, 1, 2 are <unk>, <s> and </s>; </s> is the end-of-document (EOD) token that
`preprocess.py --append-eod` puts after each document. Text files are read line by line; JSONL
files (*.jsonl, *.json, optionally .gz) contribute the lines of their --json-keys fields.
"""

import argparse
import glob
import gzip
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megalite.errors import MegaliteError, run_main  # noqa: E402


def get_parser():
    p = argparse.ArgumentParser(
        prog="tools/train_tokenizer.py",
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--input",
        nargs="+",
        required=True,
        metavar="PATH",
        help="text or JSONL files (globs allowed; .gz is decompressed)",
    )
    p.add_argument(
        "--input-format",
        choices=["auto", "text", "jsonl"],
        default="auto",
        help="auto (default): *.jsonl/*.json(.gz) are JSONL, everything else text",
    )
    p.add_argument(
        "--json-keys",
        nargs="+",
        default=["text"],
        metavar="KEY",
        help="JSONL fields to train on (default: text)",
    )
    p.add_argument(
        "--vocab-size", type=int, required=True, help="number of pieces, special ones included"
    )
    p.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe", help="default: bpe")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.model and PREFIX.vocab")
    p.add_argument(
        "--max-sentences",
        type=int,
        default=2_000_000,
        metavar="N",
        help="train on a random sample of at most N lines (default 2,000,000; 0: all); "
        "bounds memory and time on large inputs",
    )
    p.add_argument(
        "--character-coverage",
        type=float,
        default=0.9995,
        help="fraction of characters the vocabulary must cover (default 0.9995; 1.0 for "
        "small alphabets)",
    )
    p.add_argument(
        "--byte-fallback",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="encode characters outside the vocabulary as UTF-8 byte pieces instead of "
        "<unk> (adds 256 pieces; default on)",
    )
    p.add_argument(
        "--normalization",
        default="nmt_nfkc",
        choices=["nmt_nfkc", "nfkc", "nmt_nfkc_cf", "nfkc_cf", "identity"],
        help="sentencepiece normalisation rule (default nmt_nfkc, which also folds "
        "whitespace runs and line breaks into single spaces)",
    )
    p.add_argument(
        "--remove-extra-whitespaces",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="collapse runs of spaces and strip them at the ends of each text (default on); "
        "for code, where whitespace matters, use --normalization identity "
        "--no-remove-extra-whitespaces (line breaks then encode as byte pieces)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="training threads (default: all cores)",
    )
    p.add_argument(
        "--debug", action="store_true", help="show tracebacks instead of one-line errors"
    )
    return p


def iter_lines(files, fmt, keys):
    for path in files:
        is_json = fmt == "jsonl" or (
            fmt == "auto" and path.removesuffix(".gz").endswith((".jsonl", ".json"))
        )
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8", errors="replace") as f:
            for n, line in enumerate(f, 1):
                if not is_json:
                    if line.strip():
                        yield line.rstrip("\r\n")
                    continue
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                    texts = [obj[k] for k in keys]
                except (ValueError, KeyError, TypeError) as e:
                    raise MegaliteError(
                        f"{path}:{n}: cannot read field(s) {keys} ({e}); fix the line or "
                        "--json-keys"
                    ) from None
                for text in texts:
                    for sub in str(text).splitlines():
                        if sub.strip():
                            yield sub


def main(argv):
    args = get_parser().parse_args(argv)
    files = []
    for pat in args.input:
        matched = sorted(f for f in glob.glob(pat) if os.path.isfile(f))
        if not matched:
            raise MegaliteError(f"--input {pat!r} matches no file; check the path")
        files += matched
    if args.vocab_size < 8:
        raise MegaliteError(
            f"--vocab-size {args.vocab_size} is too small; use at least a few hundred"
        )
    min_vocab = 3 + (256 if args.byte_fallback else 0) + 1
    if args.vocab_size < min_vocab:
        raise MegaliteError(
            f"--vocab-size {args.vocab_size} leaves no room for learned pieces next to the 3 "
            "special "
            f"and 256 byte pieces; use more than {min_vocab} or --no-byte-fallback"
        )
    import sentencepiece as spm

    os.makedirs(os.path.dirname(os.path.abspath(args.output_prefix)), exist_ok=True)
    # sentencepiece swallows an exception raised by the iterator (it reports only a line of its
    # traceback), so the iterator's own error, such as a bad JSONL line, is kept here.
    input_error = []

    def sentences():
        try:
            yield from iter_lines(files, args.input_format, args.json_keys)
        except MegaliteError as e:
            input_error.append(e)
            raise

    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences(),
            model_prefix=args.output_prefix,
            vocab_size=args.vocab_size,
            model_type=args.model_type,
            character_coverage=args.character_coverage,
            byte_fallback=args.byte_fallback,
            normalization_rule_name=args.normalization,
            remove_extra_whitespaces=args.remove_extra_whitespaces,
            input_sentence_size=args.max_sentences,
            shuffle_input_sentence=True,
            num_threads=args.threads,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            minloglevel=2,
        )
    except RuntimeError as e:
        if input_error:
            raise input_error[0] from None
        first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise MegaliteError(
            f"sentencepiece training failed: {first}; adjust --vocab-size or give more text"
        ) from None
    sp = spm.SentencePieceProcessor(model_file=args.output_prefix + ".model")
    print(
        f"done: {args.output_prefix}.model, vocab {sp.get_piece_size()}, eod id {sp.eos_id()} "
        f"({sp.id_to_piece(sp.eos_id())}), {args.model_type}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
