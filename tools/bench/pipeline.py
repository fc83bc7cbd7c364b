#!/usr/bin/env python
"""Pipeline bubble: measured against the theory, for 1F1B and interleaved 1F1B.

The bubble is the share of an iteration a stage spends idle: 1 - busy / makespan, averaged
over the stages, where busy is the time inside the stage's forward and backward passes (from
the schedule's own trace) and makespan the slowest stage's wall time for the whole schedule.
Theory: (PP - 1) / (M + PP - 1) for 1F1B, divided by the number of virtual stages for the
interleaved schedule (the issue's formula; with free transfers the exact value is
(PP - 1) / (vp M + PP - 1), which the `ideal` column gives from megalite's schedule
simulator). The `model` column replays the same schedule in the simulator with this run's
measured per-op times (each rank's median forward / backward per chunk) and the measured
one-way gloo transfer latency: where measured and model agree, the remaining gap to theory is
explained by unequal stages and transfer latency, not by the executor. Three stage kinds:

  sleep   each stage's forward sleeps t_f (backward 2 t_f) through a real autograd Function,
          with real gloo transfers and the real executor. Sleeping needs no CPU, so PP = 4
          processes measure the schedule and its communication faithfully on a 2-core
          machine: the difference to theory is megalite's own overhead.
  gpt     real GPT stages (megalite's model) with one thread per process; only PP = 2 fits
          on 2 cores without the stages competing for them. Other engineers' jobs on the
          machine add noise: quote medians.
  gpipe   all forwards, then all backwards (sleep stages): the same bubble in theory, but a
          stage holds every micro-batch; shown for contrast.

    python tools/bench/pipeline.py [--quick] [--json out.json]
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
import torch.nn as nn  # noqa: E402

SEQ, MBS, HIDDEN = 64, 2, 128


class _Sleep(torch.autograd.Function):
    """y = x * w, taking `cost` seconds forward and twice that backward, without the CPU."""

    @staticmethod
    def forward(ctx, x, w, cost):
        time.sleep(cost)
        ctx.save_for_backward(x, w)
        ctx.cost = cost
        return x * w

    @staticmethod
    def backward(ctx, grad):
        time.sleep(2 * ctx.cost)
        x, w = ctx.saved_tensors
        return grad * w, (grad * x).sum().reshape(1), None


class SleepStage(nn.Module):
    """A model chunk with the GPTModel calling convention whose compute is a sleep."""

    def __init__(self, pre_process, post_process, cost):
        super().__init__()
        self.pre_process, self.post_process, self.cost = pre_process, post_process, cost
        self.w = nn.Parameter(torch.ones(1))

    def forward(self, tokens=None, labels=None, hidden_states=None):
        x = torch.ones(SEQ, MBS, HIDDEN) if self.pre_process else hidden_states  # [s, b, h]
        y = _Sleep.apply(x, self.w, self.cost)
        return y.mean(-1).t() if self.post_process else y  # [b, s]


def _chunks(kind, pp_rank, pp, vp, t_f):
    if kind in ("sleep", "gpipe"):
        return [
            SleepStage(pp_rank == 0 and c == 0, pp_rank == pp - 1 and c == vp - 1, t_f / vp)
            for c in range(vp)
        ]
    from megalite.config import ModelConfig
    from megalite.model.gpt import GPTModel
    from megalite.layout import pipeline_layout
    from megalite.parallel.layers import init_parameters

    cfg = ModelConfig(num_layers=8, hidden_size=HIDDEN, num_attention_heads=4, seq_length=SEQ)
    out = []
    for c, layers in enumerate(pipeline_layout(8, pp, vp)[pp_rank]):
        m = GPTModel(
            cfg,
            1024,
            pre_process=pp_rank == 0 and c == 0,
            post_process=pp_rank == pp - 1 and c == vp - 1,
            layer_numbers=layers,
        )
        init_parameters(m, 0)
        out.append(m)
    return out


def _batches(n):
    g = torch.Generator().manual_seed(0)
    return iter(
        [
            {
                "tokens": torch.randint(0, 1000, (MBS, SEQ), generator=g),
                "labels": torch.randint(0, 1000, (MBS, SEQ), generator=g),
            }
            for _ in range(n)
        ]
    )


def _latency(st, reps=30):
    """One-way latency of one activation-sized gloo transfer between ranks 0 and 1 (s)."""
    from megalite.parallel import p2p

    t = torch.zeros(SEQ, MBS, HIDDEN)
    rtts = []
    for _ in range(reps):
        dist.barrier(group=st.pp_group)
        t0 = time.perf_counter()
        if st.pp_rank == 0:
            p2p.exchange([(True, t, st.pp_ranks[1])])
            p2p.exchange([(False, t, st.pp_ranks[1])])
        elif st.pp_rank == 1:
            p2p.exchange([(False, t, st.pp_ranks[0])])
            p2p.exchange([(True, t, st.pp_ranks[0])])
        rtts.append(time.perf_counter() - t0)
    rtt = torch.tensor([statistics.median(rtts)])
    dist.broadcast(rtt, st.pp_ranks[0], group=st.pp_group)
    return rtt.item() / 2


def _measure(kind, vp, M, iters, t_f):
    """(median bubble, median iteration seconds, every rank's median op times) of one
    configuration on this rank's group."""
    from megalite.parallel import pipeline, schedules, state
    from megalite.parallel.schedules import Backward, Forward

    st = state.get()
    chunks = _chunks(kind, st.pp_rank, st.pp, vp, t_f)
    if kind == "gpipe":
        program = schedules.all_forward_all_backward(st.pp, st.pp_rank, M)
    else:
        program = schedules.schedule_ops(st.pp, st.pp_rank, M, vp)
    bubbles, times, ops = [], [], {}
    for it in range(iters + 1):  # the first iteration warms up (allocations, gloo pairs)
        trace = []
        dist.barrier(group=st.pp_group)
        t0 = time.perf_counter()
        pipeline.run_schedule(
            program, chunks, _batches(M), M, tensor_shape=(SEQ, MBS, HIDDEN), trace=trace
        )
        span = torch.tensor([time.perf_counter() - t0])
        busy = sum(t1 - t0_ for op, t0_, t1 in trace if isinstance(op, (Forward, Backward)))
        dist.all_reduce(span, op=dist.ReduceOp.MAX, group=st.pp_group)  # the makespan
        idle = torch.tensor([1 - busy / span.item()])
        dist.all_reduce(idle, group=st.pp_group)
        for c in chunks:
            c.zero_grad(set_to_none=True)
        if it:
            bubbles.append(idle.item() / st.pp)
            times.append(span.item())
            for op, a, b in trace:
                if isinstance(op, (Forward, Backward)):
                    ops.setdefault((type(op).__name__, op.chunk), []).append(b - a)
    mine = {k: statistics.median(v) for k, v in ops.items()}
    every = [None] * st.pp
    dist.all_gather_object(every, mine, group=st.pp_group)
    return statistics.median(bubbles), statistics.median(times), every


def _worker(rank, world, port, configs, iters, t_f, out):
    from megalite.parallel import state

    try:
        torch.set_num_threads(1)
        state.initialize(
            1,
            world,
            backend="gloo",
            device=torch.device("cpu"),
            rank=rank,
            world_size=world,
            init_method=f"tcp://127.0.0.1:{port}",
        )
        latency = _latency(state.get())
        res = [(*c, *_measure(*c, iters, t_f)) for c in configs]
        if rank == 0:
            torch.save((latency, res), out)
    except Exception:
        traceback.print_exc()
        raise
    finally:
        state.destroy()


def run(pp, configs, iters, t_f):
    from megalite.parallel.schedules import all_forward_all_backward
    from megalite.parallel.schedule_sim import bubble_fraction, simulate, theoretical_bubble

    sys.path.insert(
        0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests")
    )
    from conftest import free_port

    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "res.pt")
        mp.start_processes(
            _worker,
            args=(pp, free_port(), configs, iters, t_f, out),
            nprocs=pp,
            start_method="spawn",
        )
        latency, results = torch.load(out, weights_only=False)
        rows = []
        for kind, vp, M, measured, seconds, op_times in results:
            programs = (
                [all_forward_all_backward(pp, r, M) for r in range(pp)] if kind == "gpipe" else None
            )
            cost = lambda r, op: op_times[r][(type(op).__name__, op.chunk)]  # noqa: E731
            rows.append(
                dict(
                    kind=kind,
                    pp=pp,
                    vp=vp,
                    M=M,
                    measured=measured,
                    theory=theoretical_bubble(pp, M, vp),
                    ideal=bubble_fraction(simulate(pp, M, vp, programs=programs)),
                    model=bubble_fraction(
                        simulate(pp, M, vp, programs=programs, cost=cost, comm_cost=latency)
                    ),
                    seconds=seconds,
                    latency_ms=latency * 1e3,
                )
            )
        return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--iters", type=int, default=5, help="timed iterations per configuration")
    p.add_argument(
        "--t-forward",
        type=float,
        default=0.02,
        help="sleep stages: forward seconds per stage (backward twice that)",
    )
    p.add_argument("--quick", action="store_true", help="few configurations, a smoke test")
    p.add_argument("--json", help="write the results here")
    a = p.parse_args()
    Ms = (4, 8) if a.quick else (4, 8, 16)
    iters = 2 if a.quick else a.iters
    rows = []
    for pp in (2, 4):
        configs = [
            (kind, vp, M) for kind, vp in (("sleep", 1), ("sleep", 2), ("gpipe", 1)) for M in Ms
        ]
        if pp == 2:
            configs += [("gpt", vp, M) for vp in (1, 2) for M in Ms]
        rows += run(pp, configs, iters, a.t_forward)
    load = os.getloadavg()
    print(
        f"bubble = idle share of an iteration, mean over stages; load average before the "
        f"run {load[0]:.1f} on {os.cpu_count()} CPUs; gloo one-way latency "
        + ", ".join(
            f"PP={pp}: {next(r['latency_ms'] for r in rows if r['pp'] == pp):.2f} ms"
            for pp in (2, 4)
        )
    )
    print(
        f"{'stages':7s} {'PP':>3s} {'vp':>3s} {'M':>4s} {'measured':>9s} {'theory':>8s} "
        f"{'ideal':>8s} {'model':>8s} {'s/iter':>7s}"
    )
    for r in rows:
        print(
            f"{r['kind']:7s} {r['pp']:3d} {r['vp']:3d} {r['M']:4d} {r['measured']:9.3f} "
            f"{r['theory']:8.3f} {r['ideal']:8.3f} {r['model']:8.3f} {r['seconds']:7.3f}"
        )
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(
                {
                    "rows": rows,
                    "t_forward": a.t_forward,
                    "iters": iters,
                    "load_average": load,
                    "torch": torch.__version__,
                    "cpus": os.cpu_count(),
                },
                fh,
                indent=1,
            )


if __name__ == "__main__":
    main()
