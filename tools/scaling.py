#!/usr/bin/env python
"""Scaling tests: the trainer at several GPU counts, timed, as users run it (launch/pretrain.sh).

    python tools/scaling.py --mode strong --gpus 1,2,4 --output runs/scaling -- \\
        --num-layers 4 --hidden-size 256 --num-attention-heads 8 --seq-length 128 \\
        --micro-batch-size 4 --global-batch-size 16 --mock-data --vocab-size 2048
    python tools/scaling.py --mode weak --gpus 8,16,32,64 --gpus-per-node 8 --slurm \\
        --layout 8=--tensor-model-parallel-size=8 --output runs/weak -- --config c.yaml ...

Every point runs `--warmup + --iters` iterations and is timed over the last --iters (medians
of the metrics file's per-iteration records). --mode strong keeps the global batch; --mode
weak multiplies --global-batch-size by GPUs / the first count (with no --global-batch-size,
the trainer's default, micro-batch x DP, grows by itself). --layout N=FLAGS gives the parallel
flags of the count N (`=`-joined flags, comma-separated: `8=--tensor-model-parallel-size=2,
--use-distributed-optimizer`); a count without one runs pure data parallelism, or with
--plan GPU the planner's fastest layout for that many GPUs (tools/plan.py).

Locally each point is `NPROC=N launch/pretrain.sh ...`. With --slurm each point is an sbatch
script (one torchrun per node, as launch/slurm.sbatch) submitted with `sbatch`
(--dry-run: written, not submitted); run the same command again to collect: finished points
are read, pending ones listed. Either way a point already measured is not run again, so an
interrupted sweep resumes where it stopped.

Writes, under --output: scaling.json, scaling.md (GPUs, layout, tokens/s, TFLOP/s per GPU,
MFU, scaling efficiency against linear, memory per rank, the --timing-log-level split when
the runs have it) and scaling_throughput.png, scaling_efficiency.png, scaling_memory.png.
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mode", choices=("strong", "weak"), required=True)
    p.add_argument("--gpus", required=True, help="comma-separated process counts: 1,2,4")
    p.add_argument("--output", required=True, help="directory for runs and results")
    p.add_argument("--layout", action="append", default=[], help="N=FLAGS (see above)")
    p.add_argument(
        "--plan",
        metavar="GPU",
        help="each count without --layout runs the "
        "planner's fastest layout for that many GPUs of this kind (H100, ...)",
    )
    p.add_argument("--iters", type=int, default=10, help="timed iterations per point")
    p.add_argument("--warmup", type=int, default=3, help="untimed iterations first")
    p.add_argument("--gpus-per-node", type=int, default=8, help="for --slurm")
    p.add_argument("--slurm", action="store_true", help="one sbatch job per point")
    p.add_argument("--dry-run", action="store_true", help="with --slurm: write, do not submit")
    p.add_argument("--sbatch-args", default="", help="extra #SBATCH lines, ';'-separated")
    p.add_argument("train", nargs=argparse.REMAINDER, help="-- then the trainer's flags")
    a = p.parse_args(argv)
    a.train = a.train[1:] if a.train[:1] == ["--"] else a.train
    try:
        a.counts = [int(n) for n in a.gpus.split(",")]
    except ValueError:
        p.error(f"--gpus {a.gpus!r}: comma-separated integers, such as 1,2,4")
    a.layouts = {}
    for item in a.layout:
        n, _, flags = item.partition("=")
        if not n.isdigit() or not flags:
            p.error(f"--layout {item!r}: N=FLAGS, such as 8=--tensor-model-parallel-size=2")
        a.layouts[int(n)] = [part for f in flags.split(",") for part in f.split("=", 1)]
    return a


def planned_layout(a, n) -> list:
    """--plan: the parallel flags of tools/plan.py's fastest fitting layout for n GPUs."""
    from megalite.config import parse_config
    from megalite.planner import Cluster, search

    per_node = min(n, a.gpus_per_node)
    cluster = Cluster.of(a.plan, nodes=max(1, n // per_node), gpus_per_node=per_node)
    best = search(parse_config(a.train, world_size=n), cluster, top=1)
    if not best or not best[0].fits:
        raise SystemExit(f"error: the planner finds no layout that fits {n} x {a.plan}")
    lo = best[0].layout
    flags = ["--tensor-model-parallel-size", str(lo["tp"]),
             "--pipeline-model-parallel-size", str(lo["pp"]),
             "--data-parallel-sharding-strategy", lo["strategy"],
             "--micro-batch-size", str(lo["micro_batch_size"]),
             "--overlap-grad-reduce"]  # fmt: skip
    p = best[0].cfg.parallel
    if p.num_layers_per_virtual_pipeline_stage:
        flags += ["--num-layers-per-virtual-pipeline-stage",
                  str(p.num_layers_per_virtual_pipeline_stage)]  # fmt: skip
    if lo["sequence_parallel"]:
        flags.append("--sequence-parallel")
    if lo["recompute"]:
        flags += ["--recompute-granularity", lo["recompute"]]
    return flags


def point_flags(a, n) -> list:
    """The trainer's command line of the point with n processes."""
    flags = list(a.train)
    if a.mode == "weak" and "--global-batch-size" in flags:
        i = flags.index("--global-batch-size") + 1
        flags[i] = str(int(flags[i]) * n // a.counts[0])
    metrics = os.path.join(os.path.abspath(a.output), f"point_{n}.jsonl")
    return flags + a.layouts.get(n, []) + [
        "--train-iters", str(a.warmup + a.iters), "--log-interval", "1",
        "--metrics-file", metrics,
    ]  # fmt: skip


def run_local(a, n) -> None:
    log = os.path.join(a.output, f"point_{n}.log")
    env = dict(os.environ, NPROC=str(n))
    with open(log, "w") as fh:
        rc = subprocess.call(["bash", os.path.join(REPO, "launch", "pretrain.sh"),
                              *point_flags(a, n)], stdout=fh, stderr=subprocess.STDOUT,
                             cwd=REPO, env=env)  # fmt: skip
    if rc != 0:
        tail = open(log).read().strip().splitlines()[-1:] or ["(no output)"]
        raise SystemExit(f"error: the {n}-process point failed (exit {rc}): {tail[0]}; see {log}")


def submit_slurm(a, n) -> str:
    """Write the point's sbatch script; submit it unless --dry-run. Returns what was done."""
    nodes = math.ceil(n / a.gpus_per_node)
    per_node = min(n, a.gpus_per_node)
    extra = "".join(f"#SBATCH {s.strip()}\n" for s in a.sbatch_args.split(";") if s.strip())
    flags = " ".join(f"'{f}'" for f in point_flags(a, n))
    script = os.path.join(a.output, f"point_{n}.sbatch")
    with open(script, "w") as fh:
        fh.write(
            f"#!/usr/bin/env bash\n#SBATCH --job-name=scaling-{n}\n#SBATCH --nodes={nodes}\n"
            f"#SBATCH --ntasks-per-node=1\n#SBATCH --gpus-per-node={per_node}\n"
            f"#SBATCH --output={os.path.abspath(a.output)}/point_{n}.log\n{extra}"
            "set -euo pipefail\n"
            'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)\n'
            f"export MASTER_PORT=29500 NNODES=$SLURM_NNODES NPROC={per_node}\n"
            f"cd {REPO}\n"
            f"srun --kill-on-bad-exit=1 bash -c 'NODE_RANK=$SLURM_NODEID exec "
            f'launch/pretrain.sh "$@"\' _ {flags}\n'
        )
    if a.dry_run:
        return f"wrote {script}"
    job = subprocess.run(["sbatch", "--parsable", script], capture_output=True, text=True)
    if job.returncode != 0:
        raise SystemExit(f"error: sbatch {script} failed: {job.stderr.strip()}")
    with open(os.path.join(a.output, f"point_{n}.job"), "w") as fh:
        fh.write(job.stdout.strip())
    return f"submitted {script} as job {job.stdout.strip()}"


def measure(a, n):
    """The point's figures from its metrics file, or None while it is incomplete."""
    path = os.path.join(a.output, f"point_{n}.jsonl")
    if not os.path.exists(path):
        return None
    records = [json.loads(line) for line in open(path) if line.strip()]
    steps = [r for r in records if "tokens_per_sec" in r]
    timed = [r for r in steps if r["iteration"] > a.warmup]
    if len(timed) < a.iters:
        return None

    def median(key):
        values = [r[key] for r in timed if r.get(key) is not None]
        return statistics.median(values) if values else None

    start = {r["rank"]: r for r in records if "mem_params_bytes" in r}
    state = max((r["mem_params_bytes"] + r["mem_grads_bytes"] + r["mem_optimizer_bytes"]
                 for r in start.values()), default=None)  # fmt: skip
    timers = {k: median(k) for k in sorted({k for r in timed for k in r if k.startswith("time_")})}
    return dict(gpus=n, layout=" ".join(a.layouts.get(n, [])) or "data parallel",
                tokens_per_sec=median("tokens_per_sec"), tflops_per_gpu=median("tflops_per_device"),
                mfu=median("mfu"), mem_peak_gb=max(r.get("mem_peak_gb") or 0 for r in timed),
                state_bytes_per_rank=state, timers=timers)  # fmt: skip


def with_efficiency(points) -> list:
    """Scaling efficiency against linear: tokens/s per GPU relative to the first point."""
    base = points[0]["tokens_per_sec"] / points[0]["gpus"]
    for p in points:
        p["efficiency"] = p["tokens_per_sec"] / p["gpus"] / base
    return points


def write_report(a, points) -> None:
    with open(os.path.join(a.output, "scaling.json"), "w") as fh:
        json.dump({"mode": a.mode, "points": points}, fh, indent=1)
    timer_keys = sorted({k for p in points for k in p["timers"]})
    head = ["GPUs", "layout", "tokens/s", "TFLOP/s per GPU", "MFU", "efficiency",
            "peak memory per rank (GB)", "params+grads+optimizer per rank (MB)",
            *(k[5:-2] + " (ms)" for k in timer_keys)]  # fmt: skip
    lines = [f"# {a.mode.capitalize()} scaling", "", "| " + " | ".join(head) + " |",
             "|" + "---|" * len(head)]  # fmt: skip
    for p in points:
        cells = [p["gpus"], p["layout"], f"{p['tokens_per_sec']:,.0f}",
                 f"{p['tflops_per_gpu']:.3f}" if p["tflops_per_gpu"] is not None else "-",
                 f"{p['mfu']:.1%}" if p["mfu"] is not None else "-", f"{p['efficiency']:.2f}",
                 f"{p['mem_peak_gb']:.2f}",
                 f"{p['state_bytes_per_rank'] / 2**20:.1f}" if p["state_bytes_per_rank"] else "-",
                 *(f"{p['timers'][k] * 1e3:.1f}" if p["timers"].get(k) is not None else "-"
                   for k in timer_keys)]  # fmt: skip
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    with open(os.path.join(a.output, "scaling.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    plot(a, points)


def plot(a, points) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gpus = [p["gpus"] for p in points]
    ideal = [points[0]["tokens_per_sec"] * n / gpus[0] for n in gpus]
    figures = {
        "throughput": ("tokens/s", [("measured", [p["tokens_per_sec"] for p in points]),
                                    ("linear", ideal)]),
        "efficiency": ("scaling efficiency", [("measured", [p["efficiency"] for p in points]),
                                              ("linear", [1.0] * len(gpus))]),
        "memory": ("peak memory per rank (GB)", [("measured", [p["mem_peak_gb"] for p in points])]),
    }  # fmt: skip
    for name, (ylabel, series) in figures.items():
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for label, ys in series:
            ax.plot(gpus, ys, marker="o" if label == "measured" else None,
                    linestyle="-" if label == "measured" else "--", label=label)  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_xticks(gpus, [str(n) for n in gpus])
        ax.set_xlabel("GPUs (processes)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{a.mode} scaling: {ylabel}")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(a.output, f"scaling_{name}.png"), dpi=100)
        plt.close(fig)


def main(argv=None):
    a = parse(argv)
    os.makedirs(a.output, exist_ok=True)
    if a.plan:
        for n in a.counts:
            a.layouts.setdefault(n, planned_layout(a, n))
    points, pending = [], []
    for n in a.counts:
        point = measure(a, n)
        if point is None and not a.slurm:
            run_local(a, n)
            point = measure(a, n)
            if point is None:
                raise SystemExit(f"error: the {n}-process point wrote no timed iterations")
        elif point is None:
            job = os.path.join(a.output, f"point_{n}.job")
            pending.append(f"{n}: " + (f"job {open(job).read().strip()} not finished"
                                       if os.path.exists(job) else submit_slurm(a, n)))  # fmt: skip
            continue
        print(f"{n} processes: {point['tokens_per_sec']:,.0f} tokens/s", flush=True)
        points.append(point)
    if pending:
        print("pending points (run this again to collect):\n  " + "\n  ".join(pending))
    if points:
        write_report(a, with_efficiency(points))
        print(f"wrote {a.output}/scaling.md, scaling.json and scaling_*.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
