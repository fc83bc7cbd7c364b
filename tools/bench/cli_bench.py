"""Shared machinery of the command-line benchmarks (train_step.py, data_parallel.py, zero.py).

Each side is a real command line under torchrun: `-m megalite.train <flags>` (a variant adds
flags) or `tools/bench/plain_gpt.py <the same shape flags>`. A run writes one JSON line per
iteration to its --metrics-file; its score is the median tokens/s over the iterations after
warm-up. Sides run one after another in rounds, in a rotating order, so the machine's drifting
load (other jobs share its cores) hits every side alike; the headline is the median over rounds
of each round's side / plain ratio (a round's runs share about the same load).
"""

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PLAIN = "tools/bench/plain_gpt.py"
# What launch/pretrain.sh sets: freed memory is kept for reuse instead of unmapped, so a step
# does not page-fault its large buffers in again. Both sides get the same setting.
MALLOC_TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"

SHAPE = {
    "layers": 4,
    "hidden": 256,
    "heads": 8,
    "seq": 128,
    "vocab": 2048,
    "micro_batch": 4,
    "global_batch": 16,
    "iters": 20,
    "warmup": 5,
}
QUICK = {"layers": 2, "hidden": 64, "seq": 64, "vocab": 512, "iters": 6, "warmup": 2, "rounds": 1}


def parser(doc, rounds_flag, rounds, threads, threads_help):
    """The flags both scripts share; `rounds_flag` is --pairs or --rounds."""
    p = argparse.ArgumentParser(description=doc.strip().split("\n")[0])
    for name, v in SHAPE.items():
        p.add_argument(
            "--" + name.replace("_", "-"), type=int, default=v, help="default %(default)s"
        )
    p.add_argument(
        rounds_flag,
        dest="rounds",
        type=int,
        default=rounds,
        metavar=rounds_flag[2:].upper(),
        help="default %(default)s",
    )
    p.add_argument(
        "--threads", type=int, default=threads, help=threads_help + " (default %(default)s)"
    )
    p.add_argument("--bf16", action="store_true")
    p.add_argument(
        "--system-malloc",
        action="store_true",
        help="glibc's default allocator settings on both sides (no GLIBC_TUNABLES)",
    )
    p.add_argument(
        "--extra-megalite-args",
        default="",
        help="appended to every megalite command line (shlex split); "
        "write --extra-megalite-args='--flag ...' with the '='",
    )
    p.add_argument("--quick", action="store_true", help="a tiny shape and one round: a smoke test")
    p.add_argument("--json", help="write every number here")
    return p


def finish_args(a, min_rounds):
    if a.quick:
        for k, v in QUICK.items():
            setattr(a, k, v)
    elif a.rounds < min_rounds:
        sys.exit(f"at least {min_rounds} rounds/pairs, for a median that means something")
    if a.iters <= a.warmup:
        sys.exit("--iters must exceed --warmup")
    return a


def shape_flags(a):
    """Flags with the same name and meaning in megalite and plain_gpt.py."""
    f = [
        "--num-layers",
        a.layers,
        "--hidden-size",
        a.hidden,
        "--num-attention-heads",
        a.heads,
        "--seq-length",
        a.seq,
        "--vocab-size",
        a.vocab,
        "--micro-batch-size",
        a.micro_batch,
        "--global-batch-size",
        a.global_batch,
        "--train-iters",
        a.iters,
        "--lr",
        "1e-4",
        "--weight-decay",
        "0.1",
        "--clip-grad",
        "1.0",
        "--device",
        "cpu",
    ]
    return [str(x) for x in f] + (["--bf16"] if a.bf16 else [])


def side_argv(side, a, variant_flags=()):
    """What follows `torchrun ...` for one side: the plain script or megalite (+ a variant)."""
    if side == "plain":
        return [PLAIN] + shape_flags(a)
    # Mock data, one log line (and metrics record) per iteration, no evaluation.
    return (
        [
            "-m",
            "megalite.train",
            "--mock-data",
            "--model-style",
            "gpt2",
            "--log-interval",
            "1",
            "--eval-interval",
            "1000000",
            "--split",
            "100,0,0",
        ]
        + shape_flags(a)
        + list(variant_flags)
        + shlex.split(a.extra_megalite_args)
    )


def bench_env(threads, system_malloc):
    """os.environ with the threads and allocator setting the two sides share."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    env.pop("GLIBC_TUNABLES", None)
    if not system_malloc:
        env["GLIBC_TUNABLES"] = MALLOC_TUNABLES
    return env


def run_once(argv, nproc, env, workdir, tag, warmup, records=None):
    """Run one command line under torchrun; the median tokens/s after `warmup` iterations.
    `records`, a list, gets every record of its metrics file (start records included)."""
    metrics = os.path.join(workdir, tag + ".jsonl")
    log = os.path.join(workdir, tag + ".log")
    cmd = (
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(nproc),
        ]
        + argv
        + ["--metrics-file", metrics]
    )
    with open(log, "w") as fh:
        rc = subprocess.run(
            cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT, check=False
        ).returncode
    recs = []
    if os.path.exists(metrics):
        with open(metrics) as fh:
            recs = list(map(json.loads, fh))
        if records is not None:
            records.extend(recs)
        recs = [r for r in recs if "tokens_per_sec" in r]
    kept = [r["tokens_per_sec"] for r in recs if r["iteration"] > warmup]
    if rc != 0 or not kept:
        with open(log) as fh:
            lines = fh.readlines()
        # The process's own last words, not torchrun's traceback of its ChildFailedError.
        end = next((i + 1 for i, ln in enumerate(lines) if "failed (exitcode" in ln), len(lines))
        tail = "".join(lines[max(0, end - 30) : end])
        why = f"exit status {rc}" if rc else f"no timed iterations in {os.path.basename(metrics)}"
        sys.exit(f"{tag} failed ({why}): {shlex.join(cmd)}\n--- the end of its output ---\n{tail}")
    return statistics.median(kept)


def run_rounds(a, sides, nproc, env, records=None):
    """{side: [median tokens/s of its run in each round]}; `sides` maps a name to its argv.
    Round r starts at side r mod n, so each side goes first (and last) equally often.
    `records`, a dict, gets {side: [each run's metrics records]}."""
    names = list(sides)
    out = {n: [] for n in names}
    with tempfile.TemporaryDirectory(prefix="megalite-bench-") as d:
        for r in range(a.rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                t0 = time.perf_counter()
                recs = []
                tps = run_once(sides[name], nproc, env, d, f"r{r}-{name}", a.warmup, recs)
                out[name].append(tps)
                if records is not None:
                    records.setdefault(name, []).append(recs)
                print(
                    f"  round {r + 1}/{a.rounds} {name:18s} {tps:10,.0f} tok/s "
                    f"({time.perf_counter() - t0:.0f} s)",
                    flush=True,
                )
    return out


def summarise(runs, base="plain"):
    """Per side: median over runs, ratio of medians, per-round ratios and their median."""
    med = {k: statistics.median(v) for k, v in runs.items()}
    res = {}
    for k, v in runs.items():
        pair = [x / y for x, y in zip(v, runs[base])]
        res[k] = {
            "runs_tokens_per_sec": v,
            "median_tokens_per_sec": med[k],
            "ratio_of_medians": med[k] / med[base],
            "round_ratios": pair,
            "median_round_ratio": statistics.median(pair),
            "min_round_ratio": min(pair),
            "max_round_ratio": max(pair),
        }
    return res


def report(title, a, res, goal_side, env, nproc, base="plain"):
    """Print the table; write --json. The headline is goal_side's median round ratio."""
    dtype = "bf16" if a.bf16 else "fp32"
    malloc = "glibc defaults" if a.system_malloc else "launcher's (reuse freed memory)"
    print(
        f"\n{title}: {a.layers}L h{a.hidden} a{a.heads} s{a.seq} v{a.vocab}, micro-batch "
        f"{a.micro_batch}, global {a.global_batch}, {dtype}, {nproc} x OMP_NUM_THREADS="
        f"{a.threads}, malloc: {malloc}; medians of iterations {a.warmup + 1}-{a.iters}, "
        f"{a.rounds} round(s); load average {os.getloadavg()[0]:.1f} (other jobs skew runs)"
    )
    print(f"  {'side':18s} {'tok/s':>10s} {'/ plain':>8s} {'paired':>8s} {'pair min-max':>14s}")
    for k, r in res.items():
        if k == base:
            print(f"  {k:18s} {r['median_tokens_per_sec']:10,.0f}")
            continue
        print(
            f"  {k:18s} {r['median_tokens_per_sec']:10,.0f} {r['ratio_of_medians']:7.3f}x "
            f"{r['median_round_ratio']:7.3f}x {r['min_round_ratio']:6.3f}-"
            f"{r['max_round_ratio']:.3f}x"
        )
    head = res[goal_side]["median_round_ratio"]
    print(
        f"  headline: {goal_side} / plain = {head:.3f}x (median of per-round ratios; goal >= 1.05x)"
    )
    if a.json:
        keep = ("GLIBC_TUNABLES", "OMP_NUM_THREADS")
        with open(a.json, "w") as fh:
            json.dump(
                {
                    "shape": {k: getattr(a, k) for k in SHAPE},
                    "dtype": dtype,
                    "nproc": nproc,
                    "rounds": a.rounds,
                    "headline": head,
                    "headline_side": goal_side,
                    "load_avg": os.getloadavg(),
                    "env": {k: env.get(k) for k in keep},
                    "extra_megalite_args": a.extra_megalite_args,
                    "sides": res,
                },
                fh,
                indent=1,
            )
    return head
