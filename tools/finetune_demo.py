#!/usr/bin/env python
"""The fine-tuning demo: the pretrained demo model taught to answer questions, with LoRA, on a
CPU in a few minutes, with no download.

1. base        the checkpoint of `make demo` (runs/demo/checkpoints; made first if missing)
2. data        an instruction set from the Python standard library's sources: a function's
               or method's signature as the prompt ("What does `textwrap.dedent(text)` do?"),
               the first sentence of its docstring as the response (read with `ast`: nothing
               imported; up to 8,000 rows; textwrap held out)
3. shards      tools/preprocess.py --sft (the default chat template, loss mask on answers)
4. fine-tune   the trainer: --sft --load BASE --finetune --lora-rank 16 (the base frozen;
               conversations packed into samples, the loss over answer tokens only)
5. answers     tools/convert.py merge-lora, then one held-out prompt answered by the base
               model and by the fine-tuned one (greedy)

  python tools/finetune_demo.py [--out runs/demo] [--train-iters N] [extra trainer flags...]
"""

import argparse
import ast
import json
import os
import subprocess
import sys
import sysconfig
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from demo import MODEL_FLAGS, ROOT  # noqa: E402

# Answered before and after, never trained on (its module is left out of the data).
HELD_OUT = ("textwrap", "dedent")


SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "__pycache__", "lib2to3", "ensurepip"}


def _functions(tree):
    """(qualified name, node) of the public functions and methods of a module's tree."""
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
            yield node.name, node
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            for sub in node.body:
                if isinstance(sub, ast.FunctionDef) and not sub.name.startswith("_"):
                    yield f"{node.name}.{sub.name}", sub


def instructions(max_rows: int) -> list:
    """{"prompt", "response"} rows: public functions and methods with a docstring, module by
    module over the standard library (its tests, and the held-out module, left out)."""
    stdlib = sysconfig.get_paths()["stdlib"]
    rows = []
    for dirpath, dirnames, filenames in sorted(os.walk(stdlib)):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        package = os.path.relpath(dirpath, stdlib).replace(os.sep, ".").strip(".")
        for name in sorted(filenames):
            if not name.endswith(".py") or name.startswith("_"):
                continue
            module = ".".join(x for x in (package, name[:-3]) if x)
            if module == HELD_OUT[0]:
                continue
            try:
                with open(os.path.join(dirpath, name), encoding="utf-8") as fh:
                    tree = ast.parse(fh.read())
            except (SyntaxError, UnicodeDecodeError, OSError, ValueError):
                continue
            for qualname, node in _functions(tree):
                doc = ast.get_docstring(node)
                # the docstring's summary: its first sentence
                answer = " ".join(doc.split("\n\n")[0].split()).split(". ")[0] if doc else ""
                if 20 <= len(answer) <= 200:
                    args = ast.unparse(node.args)
                    question = f"What does `{module}.{qualname}({args})` do?"
                    rows.append({"prompt": question, "response": answer})
                    if len(rows) == max_rows:
                        return rows
    return rows


def held_out_prompt() -> str:
    import textwrap

    path = textwrap.__file__
    with open(path, encoding="utf-8") as fh:
        tree = ast.parse(fh.read())
    node = next(n for n in tree.body if getattr(n, "name", None) == HELD_OUT[1])
    return f"What does `{HELD_OUT[0]}.{node.name}({ast.unparse(node.args)})` do?"


def run(cmd):
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def answer(load_dir: str, tokenizer_model: str, question: str) -> str:
    """The model's greedy answer to `question`, rendered with the training template."""
    from generate import generate

    from megalite import load_pretrained
    from megalite.data import build_tokenizer
    from megalite.data.chat import render_prompt

    model = load_pretrained(load_dir)
    tok = build_tokenizer(None, tokenizer_model)
    ids = render_prompt(tok, [{"role": "user", "content": question}])
    out = generate(model, ids, 80, tok.vocab_size, temperature=0, eod=tok.eod)
    text = tok.detokenize(out[len(ids) :]).strip()
    return text or "(nothing: it ends the turn at once)"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "demo"))
    p.add_argument("--train-iters", type=int, default=200)
    p.add_argument("--max-rows", type=int, default=8000)
    args, trainer_flags = p.parse_known_args()
    py, t0 = sys.executable, time.time()
    base = os.path.join(args.out, "checkpoints")
    tokenizer = os.path.join(args.out, "tokenizer.model")
    if not os.path.exists(os.path.join(base, "latest_checkpointed_iteration.txt")):
        print(f"[1/5] no pretrained demo model in {base}: running the demo first")
        run([py, "tools/demo.py", "--out", args.out])
    else:
        print(f"[1/5] base model: {base}")

    rows = instructions(args.max_rows)
    data = os.path.join(args.out, "instructions.jsonl")
    with open(data, "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    print(f"[2/5] {len(rows)} instructions from the standard library -> {data}")
    print(f"      e.g. {rows[0]['prompt']} -> {rows[0]['response'][:80]}...")

    print("[3/5] preprocessing with the chat template (loss mask on the answers)")
    prefix = os.path.join(args.out, "instructions")
    run([py, "tools/preprocess.py", "--sft", "--input", data, "--tokenizer-model", tokenizer,
         "--output-prefix", prefix, "--workers", "2"])  # fmt: skip

    print("[4/5] LoRA fine-tuning (the base frozen; watch the loss fall)")
    lora = os.path.join(args.out, "lora")
    t_train = time.time()
    run(["bash", "launch/pretrain.sh", *MODEL_FLAGS, "--tokenizer-model", tokenizer,
         "--sft", "--data-path", prefix + "_sft_document", "--split", "98,2,0",
         "--load", base, "--finetune", "--lora-rank", "16", "--lora-alpha", "32",
         "--micro-batch-size", "8", "--global-batch-size", "16",
         "--train-iters", str(args.train_iters), "--lr", "5e-3", "--min-lr", "5e-4",
         "--lr-warmup-iters", "10", "--weight-decay", "0.0", "--eval-interval", "100",
         "--eval-iters", "4", "--log-interval", "20", "--save", lora,
         "--metrics-file", os.path.join(args.out, "finetune_metrics.jsonl"),
         "--exit-duration-in-mins", "5", *trainer_flags])  # fmt: skip
    train_min = (time.time() - t_train) / 60

    print("[5/5] one held-out question, before and after")
    merged = os.path.join(args.out, "merged")
    run([py, "tools/convert.py", "merge-lora", "--load", lora, "--save", merged])
    question = held_out_prompt()
    print(f"question: {question}")
    print(f"before (the base model): {answer(base, tokenizer, question)}")
    print(f"after (LoRA fine-tuned): {answer(merged, tokenizer, question)}")
    print(
        f"fine-tuning demo done in {(time.time() - t0) / 60:.1f} minutes (training "
        f"{train_min:.1f}); outputs in {args.out}"
    )


if __name__ == "__main__":
    main()
