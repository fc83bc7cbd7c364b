#!/usr/bin/env python
"""The demo: from nothing to a trained GPT and a generated sample, with no download.

1. corpus      the Python standard library's sources and its documentation (pydoc topics),
               which ship with every Python install, as JSONL
2. tokenizer   tools/train_tokenizer.py (sentencepiece BPE)
3. shards      tools/preprocess.py with 2 workers
4. training    launch/pretrain.sh: a small GPT for a few minutes on a CPU (faster on a GPU);
               the log shows the loss falling
5. sample      tools/generate.py from the final checkpoint

  python tools/demo.py [--out runs/demo] [--train-iters N] [extra trainer flags...]
"""

import argparse
import json
import os
import subprocess
import sys
import sysconfig
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The demo model (tools/finetune_demo.py fine-tunes it with the same shape).
MODEL_FLAGS = "--model-style gpt2 --num-layers 4 --hidden-size 256 --num-attention-heads 4 "
MODEL_FLAGS = (MODEL_FLAGS + "--seq-length 256").split()


def build_corpus(path, max_bytes):
    """One document per stdlib module (tests skipped) plus every pydoc documentation topic."""
    docs = []
    try:
        from pydoc_data.topics import topics

        docs += [text for _, text in sorted(topics.items())]
    except ImportError:  # some distributions strip the docs; the sources suffice
        pass
    stdlib = sysconfig.get_paths()["stdlib"]
    for dirpath, dirnames, filenames in sorted(os.walk(stdlib)):
        dirnames[:] = sorted(
            d
            for d in dirnames
            if d
            not in (
                "test",
                "tests",
                "idlelib",
                "site-packages",
                "__pycache__",
                "lib2to3",
                "ensurepip",
            )
        )
        for name in sorted(filenames):
            if name.endswith(".py"):
                try:
                    with open(os.path.join(dirpath, name), encoding="utf-8") as fh:
                        docs.append(fh.read())
                except (UnicodeDecodeError, OSError):
                    continue
    total = 0
    with open(path, "w") as out:
        for text in docs:
            if total >= max_bytes:
                break
            out.write(json.dumps({"text": text}) + "\n")
            total += len(text)
    return total


def run(cmd, **kw):
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT, **kw)


def main():
    p = argparse.ArgumentParser(
        description="megalite demo: corpus -> tokenizer -> shards -> "
        "training -> sample. Other flags go to the trainer."
    )
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "demo"))
    p.add_argument("--corpus-mb", type=float, default=8.0)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--train-iters", type=int, default=300)
    args, trainer_flags = p.parse_known_args()
    os.makedirs(args.out, exist_ok=True)
    py = sys.executable
    t0 = time.time()

    corpus = os.path.join(args.out, "stdlib.jsonl")
    n = build_corpus(corpus, int(args.corpus_mb * 2**20))
    print(f"[1/5] corpus: {n / 2**20:.1f} MB of the Python standard library -> {corpus}")

    prefix = os.path.join(args.out, "tokenizer")
    print("[2/5] training a tokenizer")
    # Code: keep newlines and indentation (identity normalisation; byte fallback for "\n").
    run(
        [
            py,
            "tools/train_tokenizer.py",
            "--input",
            corpus,
            "--vocab-size",
            str(args.vocab_size),
            "--model-type",
            "bpe",
            "--output-prefix",
            prefix,
            "--normalization",
            "identity",
            "--no-remove-extra-whitespaces",
        ]
    )

    data = os.path.join(args.out, "stdlib")
    print("[3/5] preprocessing into Megatron-format shards")
    run(
        [
            py,
            "tools/preprocess.py",
            "--input",
            corpus,
            "--output-prefix",
            data,
            "--tokenizer-model",
            prefix + ".model",
            "--append-eod",
            "--workers",
            "2",
        ]
    )

    print("[4/5] training (watch the loss fall)")
    ckpt = os.path.join(args.out, "checkpoints")
    run(
        [
            "bash",
            "launch/pretrain.sh",
            *MODEL_FLAGS,
            "--micro-batch-size",
            "8",
            "--global-batch-size",
            "16",
            "--train-iters",
            str(args.train_iters),
            "--lr",
            "1e-3",
            "--min-lr",
            "1e-4",
            "--lr-warmup-iters",
            "40",
            "--weight-decay",
            "0.1",
            "--clip-grad",
            "1.0",
            "--data-path",
            data + "_text_document",
            "--tokenizer-model",
            prefix + ".model",
            "--split",
            "98,2,0",
            "--eval-interval",
            "100",
            "--eval-iters",
            "4",
            "--log-interval",
            "20",
            "--save",
            ckpt,
            "--load",
            ckpt,
            "--metrics-file",
            os.path.join(args.out, "metrics.jsonl"),
            "--exit-duration-in-mins",
            "8",
            *trainer_flags,
        ]
    )

    print("[5/5] a sample from the trained model")
    run(
        [
            py,
            "tools/generate.py",
            "--load",
            ckpt,
            "--prompt",
            "def ",
            "--max-new-tokens",
            "120",
            "--temperature",
            "0.7",
            "--top-k",
            "40",
        ]
    )
    print(f"demo done in {(time.time() - t0) / 60:.1f} minutes; outputs in {args.out}")


if __name__ == "__main__":
    main()
