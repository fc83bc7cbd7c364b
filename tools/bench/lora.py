"""LoRA against full fine-tuning, as users run them: model-state memory and tokens/s.

Both sides are the trainer's command line under `torchrun --standalone --nproc_per_node 1`
(tools/bench/cli_bench.py), from the same base checkpoint (one pretraining iteration of the
shape below), mock data, the same flags:

    full        --load BASE --finetune                         (every parameter trains)
    lora-R      --load BASE --finetune --lora-rank R --lora-alpha 2R   (qkv,proj,fc1,fc2)

Per side, from the run's start records (`mem_*_bytes`, measured from the storages: params,
grads, optimizer state) the bytes per model parameter, and the median tokens/s over rounds
(alternating order). Default shape: GPT-2 style, 6 layers x 512 hidden, vocab 8192 (23.2M
params, as tools/bench/zero.py), seq 256, fp32 and --bf16.

    python tools/bench/lora.py [--rounds 3] [--ranks 8,64] [--json f]
    python tools/bench/lora.py --quick       # a smoke test: a tiny shape, one round
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile

import cli_bench as cb

DEFAULTS = {"layers": 6, "hidden": 512, "vocab": 8192, "iters": 8, "warmup": 3}


def memory(records) -> dict:
    start = next(r for r in records if "mem_params_bytes" in r)
    numel = start["mem_numel"]
    parts = {k: start[f"mem_{k}_bytes"] / numel for k in ("params", "grads", "optimizer")}
    parts["total"] = sum(parts.values())
    count = next(r for r in records if "trainable_parameters" in r)
    parts["trainable"] = count["trainable_parameters"]
    parts["parameters"] = count["parameters"]
    return parts


def main():
    p = cb.parser(__doc__, "--rounds", 3, 2, "OMP_NUM_THREADS of the process")
    p.set_defaults(**DEFAULTS)
    p.add_argument("--ranks", default="8,64", help="LoRA ranks, comma-separated")
    a = cb.finish_args(p.parse_args(), 1)
    env = cb.bench_env(a.threads, a.system_malloc)
    results = {}
    with tempfile.TemporaryDirectory(prefix="megalite-lora-bench-") as d:
        base = os.path.join(d, "base")
        argv = cb.side_argv("megalite", a)
        one = list(argv)
        one[one.index("--train-iters") + 1] = "1"
        pre = [sys.executable, *one, "--save", base]
        subprocess.run(pre, cwd=cb.REPO, env=env, check=True, capture_output=True)
        tune = ["--load", base, "--finetune"]
        sides = {"full": argv + tune}
        for r in (int(x) for x in a.ranks.split(",")):
            sides[f"lora-{r}"] = argv + tune + ["--lora-rank", str(r), "--lora-alpha", str(2 * r)]
        records = {}
        runs = cb.run_rounds(a, sides, 1, env, records)
    print(f"\n{'side':10s} {'trainable':>12s} {'B/param':>8s} {'params':>7s} {'grads':>6s} "
          f"{'optim':>6s} {'tok/s':>9s} {'vs full':>7s}")  # fmt: skip
    full_tps = statistics.median(runs["full"])
    for side, tps in runs.items():
        m = memory(records[side][0])
        med = statistics.median(tps)
        results[side] = dict(m, tokens_per_sec=med, rounds=tps)
        ratio = med / full_tps
        print(f"{side:10s} {m['trainable']:12,d} {m['total']:8.2f} {m['params']:7.2f} "
              f"{m['grads']:6.2f} {m['optimizer']:6.2f} {med:9,.0f} {ratio:6.2f}x")  # fmt: skip
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"shape": vars(a), "results": results}, fh, indent=1)


if __name__ == "__main__":
    main()
