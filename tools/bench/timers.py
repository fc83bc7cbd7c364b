"""Step timers' overhead: tokens/s at --timing-log-level 0, 1 and 2 through the command line.

The cli_bench.py machinery (tools/bench/train_step.py's): each level is a real command line,
`torchrun ... -m megalite.train --mock-data <shape> --timing-log-level N`, one JSON record per
iteration; a run's score is its median tokens/s after warm-up. Each round runs the three
levels in an order rotating per round, so the machine's drifting load (other jobs share its
cores) hits every level alike; the headline per level is the median over rounds of its run /
level 0's run in the same round. Goal: level 1 at most 2% slower (>= 0.98x).

tokens/s is the step's own time (StepClock), so it holds what timing adds inside a step (the
regions' clock reads; with PP > 1 the one wait for the slowest stage) and not what it adds at
a log line (reading the window, level 2's all-gather), which happens once per --log-interval
(every iteration here). Printed too: the host cost of entering and leaving one region.

On a shared machine whole runs differ by more than 2% from one minute to the next, so
--paired measures the same thing within one torchrun world: the same command line's config
through loop.setup / loop.train_step, its timers switched on and off on alternate iterations
(each pair in a rotating order), every rank alike; the headline is the median over pairs of
the level-0 step time / the level-1 step time (tokens/s ratio), adjacent steps sharing the
load. It also times level 2's log-time all-gather.

    python tools/bench/timers.py [--layout dp2|pp2|tp2|one] [--rounds 5] [--json out.json]
    python tools/bench/timers.py --paired [--layout pp2] [--iters 100]
    python tools/bench/timers.py --quick               # a smoke test, about a minute
"""

import os
import statistics
import sys
import time

import cli_bench as cb

sys.path.insert(0, cb.REPO)

LAYOUTS = {  # name: (processes, flags)
    "dp2": (2, []),
    "pp2": (2, ["--pipeline-model-parallel-size", "2"]),
    "tp2": (2, ["--tensor-model-parallel-size", "2"]),
    "one": (1, []),
}
LEVELS = ("level0", "level1", "level2")


def region_cost(n=200_000):
    """Seconds of host time to enter and leave one region (level 1, the CPU clock)."""
    from megalite import timers

    t = timers.Timers(1, timers.HostClock())
    t.start_step()
    tic = time.perf_counter()
    for _ in range(n):
        with timers.timed("forward"):
            pass
    cost = (time.perf_counter() - tic) / n
    t.stop_step().totals()
    timers.active = None
    tic = time.perf_counter()
    for _ in range(n):
        with timers.timed("forward"):
            pass
    return cost, (time.perf_counter() - tic) / n


def worker(argv):
    """In each rank of --paired: train with the timers on and off on alternate iterations;
    rank 0 writes the step times."""
    import json

    from megalite import timers
    from megalite.config import parse_config
    from megalite.parallel import state
    from megalite.training import loop

    out, iters, warmup = argv[0], int(argv[1]), int(argv[2])
    run = loop.setup(parse_config(argv[argv.index("--") + 1 :]))
    on = timers.build(1, state.get().device)
    steps = {0: [], 1: []}
    for i in range(iters):
        level = (i + i // 2) % 2  # pairs (0, 1), (1, 0), (0, 1), ...: each goes first alike
        run.timers = on if level else None
        stats = loop.train_step(run)
        if stats.timing is not None:
            stats.timing.totals()
        if i >= warmup + warmup % 2:  # whole pairs
            steps[level].append(stats.clock.seconds())
    level2 = timers.Timers(2, on.clock)
    totals = dict.fromkeys(timers.PARTS, 0.01)
    tic = time.perf_counter()
    for _ in range(20):
        timers.report(level2, totals, 1, 0.1, run.log, 0)
    gather_s = (time.perf_counter() - tic) / 20
    if state.get().rank == 0:
        with open(out, "w") as fh:
            json.dump({"steps": steps, "gather_s": gather_s}, fh)
    run.log.close()
    return 0


def paired(a, nproc, flags, env):
    import json
    import subprocess
    import tempfile

    argv = cb.side_argv("megalite", a, flags)[2:]  # the trainer's flags
    with tempfile.TemporaryDirectory(prefix="megalite-bench-") as d:
        out = os.path.join(d, "steps.json")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
               str(nproc), os.path.abspath(__file__), "--worker", out, str(a.iters),
               str(a.warmup), "--", *argv]  # fmt: skip
        subprocess.run(cmd, cwd=cb.REPO, env=env, check=True)
        with open(out) as fh:
            res = json.load(fh)
    off, on = res["steps"]["0"], res["steps"]["1"]
    ratios = [b / c for b, c in zip(off, on)]  # tokens/s at level 1 / at level 0, per pair
    head = statistics.median(ratios)
    print(
        f"\ntiming overhead, paired, {a.layout} ({nproc} x OMP_NUM_THREADS={a.threads}): "
        f"{a.layers}L h{a.hidden} s{a.seq}, micro-batch {a.micro_batch}, global "
        f"{a.global_batch}; {len(ratios)} pairs of steps after {a.warmup}; load average "
        f"{os.getloadavg()[0]:.1f}\n"
        f"  step ms, median: level 0 {statistics.median(off) * 1e3:.1f}, level 1 "
        f"{statistics.median(on) * 1e3:.1f}\n"
        f"  per-pair tokens/s ratio level 1 / level 0: median {head:.4f}x, quartiles "
        f"{statistics.quantiles(ratios, n=4)[0]:.4f}-{statistics.quantiles(ratios, n=4)[2]:.4f}"
        f"\n  level 2's all-gather at a log line: {res['gather_s'] * 1e3:.2f} ms"
    )
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"layout": a.layout, "pairs": len(ratios), "median_ratio": head,
                       "level0_s": off, "level1_s": on, "gather_s": res["gather_s"],
                       "load_avg": os.getloadavg()}, fh, indent=1)  # fmt: skip
    return 0


def main():
    if sys.argv[1:2] == ["--worker"]:
        return worker(sys.argv[2:])
    p = cb.parser(__doc__, "--rounds", 5, 1, "OMP_NUM_THREADS of each process")
    p.add_argument("--layout", choices=list(LAYOUTS), default="dp2", help="default %(default)s")
    p.add_argument("--paired", action="store_true", help="alternate levels 0 and 1 per step")
    a = cb.finish_args(p.parse_args(), min_rounds=3)
    nproc, flags = LAYOUTS[a.layout]
    env = cb.bench_env(a.threads, a.system_malloc)
    if a.paired:
        return paired(a, nproc, flags, env)
    sides = {
        f"level{k}": cb.side_argv("megalite", a, [*flags, "--timing-log-level", str(k)])
        for k in range(3)
    }
    runs = cb.run_rounds(a, sides, nproc, env)
    res = cb.summarise(runs, base="level0")
    on, off = region_cost()
    print(
        f"\ntiming overhead, {a.layout} ({nproc} x OMP_NUM_THREADS={a.threads}): {a.layers}L "
        f"h{a.hidden} s{a.seq} v{a.vocab}, micro-batch {a.micro_batch}, global "
        f"{a.global_batch}; medians of iterations {a.warmup + 1}-{a.iters}, {a.rounds} "
        f"round(s); load average {os.getloadavg()[0]:.1f} (other jobs skew runs)"
    )
    print(f"  {'level':8s} {'tok/s':>10s} {'/ level 0':>10s} {'per round':s}")
    for k in LEVELS:
        r = res[k]
        rounds = " ".join(f"{x:.3f}" for x in r["round_ratios"])
        print(f"  {k:8s} {r['median_tokens_per_sec']:10,.0f} {r['median_round_ratio']:9.3f}x "
              f"{rounds}")  # fmt: skip
    print(f"  one region, enter + exit: {on * 1e6:.2f} us timed, {off * 1e6:.2f} us at level 0")
    head = res["level1"]["median_round_ratio"]
    print(f"  headline: level 1 / level 0 = {head:.3f}x (median of per-round ratios; goal "
          f">= 0.98x)")  # fmt: skip
    if a.json:
        import json

        with open(a.json, "w") as fh:
            json.dump({"layout": a.layout, "shape": {k: getattr(a, k) for k in cb.SHAPE},
                       "rounds": a.rounds, "load_avg": os.getloadavg(), "sides": res,
                       "region_cost_s": on, "null_region_cost_s": off,
                       "median_level1_ratio": head,
                       "median_level2_ratio": res["level2"]["median_round_ratio"]},
                      fh, indent=1)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
