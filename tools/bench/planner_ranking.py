"""The planner's ranking of layouts by step time against the trainer's, in alternating rounds.

tests/test_planner.py runs its 6 layouts once each (2 to 8 processes of a tiny bf16 model on
this machine) and prints the plan's ranking beside the run's; on 2 cores one run of a layout
moves by up to 40% between idle runs, so one run cannot rank two layouts that are 10% apart.
This runs the same layouts through the same command lines (`-m megalite.train` under
torchrun) for --rounds rounds, in an order rotating per round, and ranks the layouts by their
median ms per iteration over the rounds (each run's median over its iterations after the
first two). It prints the predicted and measured ms per layout, both rankings, the pairs they
order differently with the measured gap of each, and Kendall's tau.

    python tools/bench/planner_ranking.py [--rounds 3] [--iters 10] [--json out.json]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "tests"))  # the test's layouts and machine figures

from test_planner import FLAGS, LAYOUTS, config, cpu_cluster, flags_of  # noqa: E402


def run_layout(name, iters):
    """ms per iteration of one run of a layout (the median after the first two)."""
    nproc, settings = LAYOUTS[name]
    flags = list(FLAGS)
    flags[flags.index("--train-iters") + 1] = str(iters)
    with tempfile.TemporaryDirectory() as d:
        m = os.path.join(d, "m.jsonl")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", str(nproc), "-m", "megalite.train", *flags,
               *flags_of(settings), "--metrics-file", m]  # fmt: skip
        env = dict(os.environ, OMP_NUM_THREADS="1")
        p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        if p.returncode:
            sys.exit(f"{name} failed:\n{p.stderr[-3000:]}")
        records = [json.loads(line) for line in open(m)]
    times = [r["iter_time_s"] for r in records if "iter_time_s" in r][2:]
    return 1e3 * statistics.median(times)


def kendall(a, b):
    """Kendall's tau of two orderings of the same names, and the pairs they disagree on."""
    pos = {n: i for i, n in enumerate(b)}
    pairs = [(a[i], a[j]) for i in range(len(a)) for j in range(i + 1, len(a))]
    bad = [(x, y) for x, y in pairs if pos[x] > pos[y]]
    return 1 - 2 * len(bad) / len(pairs), bad


def main():
    ap = argparse.ArgumentParser(description=__doc__.strip().split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--json")
    a = ap.parse_args()
    from megalite.planner import plan_layout

    names = list(LAYOUTS)
    predicted = {}
    for n in names:
        nproc, settings = LAYOUTS[n]
        predicted[n] = 1e3 * plan_layout(config(nproc, settings), cpu_cluster(nproc)).step_s
    runs = {n: [] for n in names}
    for r in range(a.rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            tic = time.time()
            runs[n].append(run_layout(n, a.iters))
            print(f"  round {r + 1}/{a.rounds} {n:<27} {runs[n][-1]:7.1f} ms/it "
                  f"({time.time() - tic:.0f} s)", flush=True)  # fmt: skip
    measured = {n: statistics.median(v) for n, v in runs.items()}
    by_plan = sorted(names, key=predicted.get)
    by_run = sorted(names, key=measured.get)
    tau, bad = kendall(by_plan, by_run)
    print(f"\n{'layout':<27} {'predicted ms':>12} {'measured ms (median)':>21}   rounds")
    for n in by_plan:
        rounds = " ".join(f"{x:.0f}" for x in runs[n])
        print(f"{n:<27} {predicted[n]:12.1f} {measured[n]:21.1f}   {rounds}")
    print(f"ranked by the plan: {by_plan}\nranked by the runs: {by_run}")
    swaps = "; ".join(f"{x} / {y} (measured {measured[x] / measured[y]:.2f}x)" for x, y in bad)
    print(f"Kendall's tau {tau:.3f}; pairs ordered differently: {swaps or 'none'}")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"predicted_ms": predicted, "runs_ms": runs, "measured_ms": measured,
                       "by_plan": by_plan, "by_run": by_run, "tau": tau,
                       "discordant": bad, "load_avg": os.getloadavg()}, fh, indent=1)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
