"""ZeRO at DP=2 over gloo: megalite's four sharding strategies against torch DDP and FSDP2.

The train_step.py machinery (tools/bench/cli_bench.py): every side is a command line under
`torchrun --standalone --nproc_per_node 2`, one compute thread per process (the 2 cores in
all), the same shape flags, fp32, mock data, global batch 16 = 2 micro-batches of 4 per rank:

    no_shard            megalite --data-parallel-sharding-strategy no_shard     (ZeRO-0)
    optim               ... optim                                              (ZeRO-1)
    optim_grads         ... optim_grads                                        (ZeRO-2)
    optim_grads_params  ... optim_grads_params                                 (ZeRO-3)
    ddp                 tools/bench/plain_gpt.py: torch DDP, no_sync() but the last micro-batch
    fsdp2               tools/bench/plain_gpt.py --fsdp2: fully_shard per Block, then the root
    fsdp2-prefetch      ... --fsdp2-prefetch: also async all-gathers, explicit prefetching
                        (FSDP2's overlap comes from CUDA streams: on a CPU it has none)

The default shape is larger than data_parallel.py's (6 layers, hidden 512, vocab 8192: 23.2M
params, the model of RESULTS.md's issue-7 section) so that model state, not the ~0.4 GB a
torch + gloo process starts with, decides the peak memory: 16 B/param unsharded = 371 MB.

Per side: the median over rounds of its run's median tokens/s and of its run's peak memory
(`mem_peak_gb` of the metrics records: ru_maxrss of the last rank, the one both trainers log
from; the ranks are symmetric), each also as the median of per-round ratios to fsdp2; for
megalite the per-rank bytes per parameter of params, grads and optimizer state from its start
records (`mem_*_bytes`). Goal: optim_grads_params / fsdp2 >= 1.0x tokens/s and <= 1.0x peak
memory.

    python tools/bench/zero.py [--rounds 3] [--variants optim_grads_params,fsdp2] [--json f]
    python tools/bench/zero.py --quick       # a smoke test: a tiny shape, one round
"""

import json
import os
import statistics
import sys

import cli_bench as cb

STRATEGIES = ("no_shard", "optim", "optim_grads", "optim_grads_params")
VARIANTS = {s: ["--data-parallel-sharding-strategy", s] for s in STRATEGIES}
PLAIN_VARIANTS = {"ddp": [], "fsdp2": ["--fsdp2"], "fsdp2-prefetch": ["--fsdp2-prefetch"]}
BASE, GOAL = "fsdp2", "optim_grads_params"
# Larger than cli_bench.SHAPE's (see the docstring); fewer iterations, as a step takes seconds.
DEFAULTS = {"layers": 6, "hidden": 512, "vocab": 8192, "iters": 12, "warmup": 4}


def num_params(a):
    """GPT-2 (plain_gpt.py's model, megalite's --model-style gpt2): tied head, biases."""
    h = a.hidden
    return a.vocab * h + a.seq * h + a.layers * (12 * h * h + 13 * h) + 2 * h


def main():
    p = cb.parser(__doc__, "--rounds", 3, 1, "OMP_NUM_THREADS of each of the 2 processes")
    p.set_defaults(**DEFAULTS)
    every = list(VARIANTS) + list(PLAIN_VARIANTS)
    p.add_argument("--variants", default=",".join(every), help="comma-separated subset")
    p.add_argument(
        "--glibc-tunables",
        help="GLIBC_TUNABLES of every side instead of the launcher's, e.g. "
        "glibc.malloc.mmap_threshold=1048576 (buffers of 1 MB and more mmapped: freed ones go "
        "back to the OS, so the heap's fragmentation leaves the peak)",
    )
    a = cb.finish_args(p.parse_args(), min_rounds=3)
    names = a.variants.split(",")
    if not names or any(n not in every for n in names) or BASE not in names:
        p.error(f"--variants: choose from {', '.join(every)}, {BASE} included")
    env = cb.bench_env(a.threads, a.system_malloc)
    if a.glibc_tunables:
        env["GLIBC_TUNABLES"] = a.glibc_tunables
    sides = {
        n: cb.side_argv("plain", a) + PLAIN_VARIANTS[n]
        if n in PLAIN_VARIANTS
        else cb.side_argv("megalite", a, VARIANTS[n])
        for n in names
    }
    records = {}
    runs = cb.run_rounds(a, sides, 2, env, records)
    res = cb.summarise(runs, base=BASE)
    peaks = {n: [max(r["mem_peak_gb"] for r in rs if "mem_peak_gb" in r) for rs in records[n]]
             for n in names}  # fmt: skip
    numel = num_params(a)
    for n in names:
        pair = [x / y for x, y in zip(peaks[n], peaks[BASE])]
        res[n].update(
            runs_mem_peak_gb=peaks[n],
            median_mem_peak_gb=statistics.median(peaks[n]),
            mem_round_ratios=pair,
            median_mem_round_ratio=statistics.median(pair),
        )
        start = {r["rank"]: r for r in records[n][0] if "mem_params_bytes" in r}
        res[n]["bytes_per_param"] = {
            rank: {k: r[f"mem_{k}_bytes"] / numel for k in ("params", "grads", "optimizer")}
            for rank, r in sorted(start.items())
        }

    print(
        f"\nZeRO, DP=2 over gloo: {a.layers}L h{a.hidden} a{a.heads} s{a.seq} v{a.vocab} "
        f"({numel / 1e6:.1f}M params), micro-batch {a.micro_batch}, global {a.global_batch}, "
        f"{'bf16' if a.bf16 else 'fp32'}, 2 x OMP_NUM_THREADS={a.threads}, GLIBC_TUNABLES="
        f"{env.get('GLIBC_TUNABLES', '(unset)')}; medians of "
        f"iterations {a.warmup + 1}-{a.iters}, {a.rounds} round(s); load average "
        f"{os.getloadavg()[0]:.1f} (other jobs skew runs)"
    )
    print(
        f"  {'side':18s} {'tok/s':>8s} {'/fsdp2':>7s} {'min-max':>11s} {'peak GB':>8s} "
        f"{'/fsdp2':>7s} {'min-max':>11s}  B/param per rank: params grads optim = total"
    )
    for n, r in res.items():
        bpp = r["bytes_per_param"]
        worst = max(bpp.values(), key=lambda v: sum(v.values())) if bpp else None
        mr = r["mem_round_ratios"]
        print(
            f"  {n:18s} {r['median_tokens_per_sec']:8,.0f} {r['median_round_ratio']:6.3f}x "
            f"{r['min_round_ratio']:5.2f}-{r['max_round_ratio']:.2f}x "
            f"{r['median_mem_peak_gb']:8.3f} {r['median_mem_round_ratio']:6.3f}x "
            f"{min(mr):5.2f}-{max(mr):.2f}x"
            + (
                "  {params:5.2f} {grads:5.2f} {optimizer:5.2f} = ".format(**worst)
                + f"{sum(worst.values()):.2f}"
                if worst
                else ""
            )
        )
    if GOAL in res:
        tps, mem = res[GOAL]["median_round_ratio"], res[GOAL]["median_mem_round_ratio"]
        met = "met" if tps >= 1.0 and mem <= 1.0 else "NOT met"
        print(
            f"  headline: {GOAL} / {BASE} = {tps:.3f}x tokens/s, {mem:.3f}x peak memory "
            f"(medians of per-round ratios; goal >= 1.0x and <= 1.0x: {met})"
        )
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(
                {
                    "shape": {k: getattr(a, k) for k in cb.SHAPE},
                    "num_params": numel,
                    "dtype": "bf16" if a.bf16 else "fp32",
                    "rounds": a.rounds,
                    "load_avg": os.getloadavg(),
                    "env": {k: env.get(k) for k in ("GLIBC_TUNABLES", "OMP_NUM_THREADS")},
                    "extra_megalite_args": a.extra_megalite_args,
                    "sides": res,
                },
                fh,
                indent=1,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
