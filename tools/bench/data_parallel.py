"""Data-parallel throughput, DP=2 over gloo: megalite's command lines against torch DDP.

The train_step.py machinery (tools/bench/cli_bench.py) with two processes under torchrun, one
compute thread each (the 2 cores in all): tools/bench/plain_gpt.py with
torch.nn.parallel.DistributedDataParallel (25 MB buckets, no_sync() on all but the last
micro-batch) against these megalite command lines, all with the same shape flags (global batch
16 = 2 micro-batches of 4 per rank):

    megalite          default flags: bucketed grad all-reduce after backward (through shared
                      memory: both ranks are on this machine, megalite/parallel/shm.py)
    megalite-gloo     --no-shm-grad-reduce: the same all-reduce over gloo's sockets
    megalite-overlap  --overlap-grad-reduce: each bucket's all-reduce starts in backward
    megalite-distopt  --use-distributed-optimizer --overlap-grad-reduce (ZeRO-1)

Each round runs plain and every variant once, in an order rotating per round; the headline per
variant is the median over rounds of its megalite / plain ratio. Goal: >= 1.05x for `megalite`.

    python tools/bench/data_parallel.py [--rounds 3] [--variants megalite,megalite-overlap]
    python tools/bench/data_parallel.py --quick       # a smoke test, about a minute
"""

import sys

import cli_bench as cb

VARIANTS = {
    "megalite": [],
    "megalite-gloo": ["--no-shm-grad-reduce"],
    "megalite-overlap": ["--overlap-grad-reduce"],
    "megalite-distopt": ["--use-distributed-optimizer", "--overlap-grad-reduce"],
}


def main():
    p = cb.parser(__doc__, "--rounds", 3, 1, "OMP_NUM_THREADS of each of the 2 processes")
    p.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"comma-separated subset of {', '.join(VARIANTS)}",
    )
    a = cb.finish_args(p.parse_args(), min_rounds=3)
    names = a.variants.split(",")
    if not names or any(n not in VARIANTS for n in names):
        p.error(f"--variants: choose from {', '.join(VARIANTS)}")
    env = cb.bench_env(a.threads, a.system_malloc)
    sides = {"plain": cb.side_argv("plain", a)}
    sides.update({n: cb.side_argv("megalite", a, VARIANTS[n]) for n in names})
    runs = cb.run_rounds(a, sides, 2, env)
    goal = "megalite" if "megalite" in names else names[0]
    cb.report("data parallel, DP=2 over gloo", a, cb.summarise(runs), goal, env, 2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
