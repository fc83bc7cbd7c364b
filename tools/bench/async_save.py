"""--async-save against synchronous saves: how long the training loop stops for a checkpoint.

Both sides are the command line users run, under torchrun (`-m megalite.train --mock-data`,
the shape flags of tools/bench/cli_bench.py), saving every --save-interval iterations; the
only difference is `--async-save`. Each save writes `checkpoint_blocking_s` (the loop stopped
for it) and `checkpoint_total_s` (snapshot to `latest`) to the --metrics-file, which is read
back. The default model, 6 layers x hidden 384 (vocab 2048, fp32), holds 11.4M params: 137 MB
of state (params, two AdamW moments), all in one shard file.

Rounds alternate the sides (the order rotating per round, so the machine's drifting load hits
both alike). Reported per side: the median over every save of every run (the first save of a
run, which allocates the host copies, also on its own), the median iteration time; the
headline is async / sync of the median blocking time (each round's own ratio is printed too:
the two runs of a round share about the same load). Goal: <= 0.10.

    python tools/bench/async_save.py [--rounds 3] [--nproc 1] [--save-interval 5]
    python tools/bench/async_save.py --quick       # a smoke test, about a minute
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import cli_bench as cb

SIDES = {"sync": [], "async": ["--async-save"]}
DEFAULTS = dict(layers=6, hidden=384, heads=6, seq=64, micro_batch=1, global_batch=1, iters=40,
                warmup=0)  # fmt: skip
QUICK = dict(layers=2, hidden=128, heads=4, iters=12, rounds=1)


def run_once(a, side, nproc, env, workdir, tag):
    """One run of a side: (its checkpoint records, the iteration times of its log records)."""
    metrics = os.path.join(workdir, tag + ".jsonl")
    log = os.path.join(workdir, tag + ".log")
    ck = os.path.join(workdir, tag + "-ck")
    flags = ["--save", ck, "--save-interval", str(a.save_interval), "--keep-last", "2",
             "--metrics-file", metrics, *SIDES[side]]  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           str(nproc), *cb.side_argv("megalite", a, flags)]  # fmt: skip
    with open(log, "w") as fh:
        rc = subprocess.run(
            cmd, cwd=cb.REPO, env=env, stdout=fh, stderr=subprocess.STDOUT
        ).returncode
    recs = []
    if os.path.exists(metrics):
        with open(metrics) as fh:
            recs = list(map(json.loads, fh))
    saves = [r for r in recs if "checkpoint_blocking_s" in r]
    if rc != 0 or not saves:
        with open(log) as fh:
            tail = "".join(fh.readlines()[-30:])
        sys.exit(f"{tag} failed (exit status {rc}): {' '.join(cmd)}\n{tail}")
    with open(os.path.join(ck, "latest_checkpointed_iteration.txt")) as fh:
        last = os.path.join(ck, f"iter_{int(fh.read()):07d}")
    with open(os.path.join(last, "metadata.json")) as fh:
        mb = sum(f["bytes"] for f in json.load(fh)["files"].values()) / 1e6
    subprocess.run(["rm", "-rf", ck], check=True)
    return saves, [r["iter_time_s"] for r in recs if "iter_time_s" in r], mb


def main():
    p = cb.parser(__doc__, "--rounds", 3, 2, "OMP_NUM_THREADS of each process")
    p.set_defaults(**DEFAULTS)
    p.add_argument("--nproc", type=int, default=1, help="processes (DP ranks), default 1")
    p.add_argument("--save-interval", type=int, default=5, help="default %(default)s")
    p.add_argument("--dir", help="where the checkpoints go (default: the system's temp dir)")
    a = p.parse_args()
    if a.quick:
        for k, v in QUICK.items():
            setattr(a, k, v)
    elif a.rounds < 3:
        sys.exit("at least 3 rounds, for a median that means something")
    env = cb.bench_env(a.threads, a.system_malloc)
    runs = {s: [] for s in SIDES}
    with tempfile.TemporaryDirectory(prefix="megalite-async-save-", dir=a.dir) as d:
        for r in range(a.rounds):
            names = list(SIDES)[r % 2 :] + list(SIDES)[: r % 2]
            for side in names:
                t0 = time.perf_counter()
                saves, iters, mb = run_once(a, side, a.nproc, env, d, f"r{r}-{side}")
                runs[side].append({"saves": saves, "iter_time_s": iters})
                b = statistics.median(s["checkpoint_blocking_s"] for s in saves)
                print(f"  round {r + 1}/{a.rounds} {side:5s} {len(saves)} saves, median blocking "
                      f"{b:.3f} s ({time.perf_counter() - t0:.0f} s)", flush=True)  # fmt: skip
    res = {}
    for side, rs in runs.items():
        saves = [s for run in rs for s in run["saves"]]
        res[side] = {
            "median_blocking_s": statistics.median(s["checkpoint_blocking_s"] for s in saves),
            "median_total_s": statistics.median(s["checkpoint_total_s"] for s in saves),
            "median_first_blocking_s": statistics.median(
                run["saves"][0]["checkpoint_blocking_s"] for run in rs
            ),
            "median_iter_time_s": statistics.median(t for run in rs for t in run["iter_time_s"]),
            "saves": len(saves),
            "runs": rs,
        }
    ratio = res["async"]["median_blocking_s"] / res["sync"]["median_blocking_s"]
    # each round's two runs share about the same machine load: their ratio, round by round
    rounds = [
        statistics.median(s["checkpoint_blocking_s"] for s in a_run["saves"])
        / statistics.median(s["checkpoint_blocking_s"] for s in s_run["saves"])
        for a_run, s_run in zip(runs["async"], runs["sync"])
    ]
    print(
        f"\nasync save: {a.layers}L h{a.hidden} a{a.heads} s{a.seq} v{a.vocab}, micro-batch "
        f"{a.micro_batch}, fp32, checkpoints of {mb:.0f} MB, {a.nproc} x OMP_NUM_THREADS="
        f"{a.threads}, a save every {a.save_interval} of {a.iters} iterations, {a.rounds} "
        f"round(s); load average {os.getloadavg()[0]:.1f}"
    )
    print(f"  {'side':5s} {'saves':>5s} {'blocking':>9s} {'total':>8s} {'1st blocking':>12s} "
          f"{'iteration':>9s}")  # fmt: skip
    for side, r in res.items():
        print(f"  {side:5s} {r['saves']:5d} {r['median_blocking_s']:8.3f}s "
              f"{r['median_total_s']:7.3f}s {r['median_first_blocking_s']:11.3f}s "
              f"{r['median_iter_time_s']:8.3f}s")  # fmt: skip
    print(f"  per-round async / sync: {' '.join(f'{x:.3f}' for x in rounds)} (median "
          f"{statistics.median(rounds):.3f})")  # fmt: skip
    print(f"  headline: async / sync median blocking = {ratio:.3f} (goal <= 0.10: "
          f"{'met' if ratio <= 0.10 else 'not met'})")  # fmt: skip
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"args": vars(a), "checkpoint_mb": mb, "ratio": ratio, "round_ratios": rounds,
                       "sides": res},
                      fh, indent=1)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
