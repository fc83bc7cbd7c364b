"""The gloo message latency the planner's CPU figures use (tests/test_planner.py's cpu_cluster).

Pairs of processes (ranks 2i, 2i+1) all-reduce one TP activation of the test's model ([32, 2,
64] fp32) between `--work` ms of compute each, as tensor-parallel ranks do between their
collectives, for 2, 4 and 8 processes on this machine's cores. A two-rank ring all-reduce is
2 messages, so the latency per message is half the mean time in the all-reduce. With a core
per process it is gloo's loopback round trip; once processes outnumber the cores a peer may
be descheduled when its partner arrives, and the wait grows to a scheduler's time slice.

    python tools/bench/gloo_latency.py [--work 1.0] [--iters 200] [--procs 2 4 8]
"""

import argparse
import os
import subprocess
import sys
import time


def rank_main(work_ms, iters):
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    groups = [dist.new_group([2 * i, 2 * i + 1]) for i in range(world // 2)]
    group = groups[rank // 2]
    x, a = torch.randn(32, 2, 64), torch.randn(256, 256)

    def compute(ms):
        tic = time.perf_counter()
        while (time.perf_counter() - tic) * 1e3 < ms:
            a @ a

    for _ in range(20):
        dist.all_reduce(x, group=group)
    waits = []
    for _ in range(iters):
        compute(work_ms)
        tic = time.perf_counter()
        dist.all_reduce(x, group=group)
        waits.append(time.perf_counter() - tic)
    mean = sum(waits) / len(waits)
    if rank == 0:
        waits.sort()
        print(f"{world} processes on {os.cpu_count()} cores: all-reduce mean {mean * 1e3:.2f} ms "
              f"(median {waits[len(waits) // 2] * 1e3:.2f}), {mean / 2 * 1e3:.2f} ms per "
              f"message", flush=True)  # fmt: skip
    dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser(description=__doc__.strip().split("\n")[0])
    ap.add_argument("--work", type=float, default=1.0, help="ms of compute between collectives")
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--procs", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--rank-main", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.rank_main:
        return rank_main(a.work, a.iters)
    if any(n < 2 or n % 2 for n in a.procs):
        ap.error(f"--procs {a.procs}: each count must be even (the ranks all-reduce in pairs)")
    for n in a.procs:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", str(n), os.path.abspath(__file__), "--rank-main",
               "--work", str(a.work), "--iters", str(a.iters)]  # fmt: skip
        env = dict(os.environ, OMP_NUM_THREADS="1")
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if p.returncode:
            sys.exit(f"{n} processes failed:\n{p.stderr[-3000:]}")
        print(p.stdout.strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
