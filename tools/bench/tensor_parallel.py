#!/usr/bin/env python
"""Tensor parallelism: TP=2 against TP=1 step time on this machine, and the share of the step
spent communicating.

One training step = forward + backward of one micro-batch, `finalize_model_grads` (the
sequence-parallel grad all-reduce) and an AdamW step, on a GPT-2-shaped model with random
tokens. Each layout runs in its own processes (gloo on CPU, one thread per rank unless
stated); layouts alternate over rounds so drifting machine load hits all alike, and the table
gives medians over the timed steps. "comm" is wall time inside TP collectives (every region
of megalite.parallel.tensor, the vocab-parallel loss's all-reduces, and finalize's), so it
includes time a rank waits for the other: on CPU both ranks also share the memory bus.

    python tools/bench/tensor_parallel.py [--quick] [--json out.json]
    python tools/bench/tensor_parallel.py --device cuda      # NCCL, needs 2 GPUs for TP=2

Baselines: TP=1 with one thread (the same compute per process as each TP=2 rank) and TP=1
with as many threads as TP=2 has processes (the same cores: what a user would run instead).
On CUDA the layouts are TP=1 (one GPU) and TP=2 with and without SP; each collective is timed
between two device synchronisations, which serialises the step a little.
"""

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
# Idle OpenMP threads sleep instead of spinning (read when torch loads libgomp, so before the
# import). On a busy machine spinning threads make the 2-thread TP=1 baseline several times
# slower than 1 thread; passive waiting is the fair (baseline-friendly) setting.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

# (label, TP, sequence parallel, threads per rank)
LAYOUTS = [
    ("TP=1, 1 thread", 1, False, 1),
    ("TP=1, 2 threads", 1, False, 2),
    ("TP=2", 2, False, 1),
    ("TP=2 + SP", 2, True, 1),
]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _worker(rank, world, port, out_dir, a, sp, threads):
    from megalite.config import ModelConfig, MODEL_STYLES
    from megalite.layout import padded_vocab_size
    from megalite.model.gpt import GPTModel
    from megalite.parallel import state
    from megalite.parallel.ddp import finalize_model_grads
    from megalite.parallel.layers import init_parameters
    from megalite.parallel.tensor import comm_timer

    torch.set_num_threads(threads)
    device = torch.device(a.device)
    if device.type == "cuda":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    st = state.initialize(
        world,
        backend="nccl" if device.type == "cuda" else "gloo",
        device=device,
        rank=rank,
        world_size=world,
        init_method=f"tcp://127.0.0.1:{port}",
    )
    cfg = ModelConfig(
        **MODEL_STYLES["gpt2"],
        num_layers=a.layers,
        hidden_size=a.hidden,
        num_attention_heads=a.heads,
        seq_length=a.seq,
    )
    model = GPTModel(
        cfg,
        padded_vocab_size(a.vocab, 128, st.tp),
        sequence_parallel=sp,
        unpadded_vocab_size=a.vocab,
    )
    init_parameters(model, 1234)
    model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, foreach=True)
    g = torch.Generator().manual_seed(1)
    comm_timer.enabled, comm_timer.synchronize = True, device.type == "cuda"
    steps, comms = [], []
    for i in range(a.warmup + a.iters):
        s = torch.randint(0, a.vocab, (a.micro_batch, a.seq + 1), generator=g).to(device)
        comm_timer.reset()
        _sync(device)
        t0 = time.perf_counter()
        loss = model(s[:, :-1], labels=s[:, 1:]).mean()
        loss.backward()
        _sync(device)
        t1 = time.perf_counter()
        finalize_model_grads(model)  # all communication when DP = 1
        _sync(device)
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        t3 = time.perf_counter()
        if i >= a.warmup:
            steps.append(t3 - t0)
            comms.append(comm_timer.seconds + (t2 - t1 if st.tp > 1 else 0.0))
    if rank == 0:
        with open(os.path.join(out_dir, "rank0.json"), "w") as fh:
            json.dump({"steps": steps, "comms": comms, "calls": comm_timer.calls}, fh)
    state.destroy()


def run_layout(a, tp, sp, threads):
    with tempfile.TemporaryDirectory() as d:
        mp.start_processes(
            _worker,
            args=(tp, _free_port(), d, a, sp, threads),
            nprocs=tp,
            start_method="forkserver",
        )
        with open(os.path.join(d, "rank0.json")) as fh:
            return json.load(fh)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--iters", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--quick", action="store_true", help="tiny sizes, a smoke test")
    p.add_argument("--json", help="write the results here")
    a = p.parse_args()
    if a.quick:
        a.layers, a.hidden, a.seq, a.vocab, a.iters, a.warmup, a.rounds = 2, 64, 64, 512, 3, 1, 1
    layouts = LAYOUTS
    if a.device == "cuda":
        if torch.cuda.device_count() < 2:
            print(f"--device cuda needs 2 GPUs for TP=2; {torch.cuda.device_count()} found")
            return 1
        layouts = [("TP=1", 1, False, 1), ("TP=2", 2, False, 1), ("TP=2 + SP", 2, True, 1)]
    import multiprocessing

    multiprocessing.set_forkserver_preload(["torch", "torch.distributed"])

    runs = {label: {"steps": [], "comms": []} for label, *_ in layouts}
    for _ in range(a.rounds):
        for label, tp, sp, threads in layouts:
            r = run_layout(a, tp, sp, threads)
            runs[label]["steps"] += r["steps"]
            runs[label]["comms"] += r["comms"]
            runs[label]["collectives_per_step"] = r["calls"]

    base1 = statistics.median(runs[layouts[0][0]]["steps"])
    base2 = statistics.median(runs[layouts[1][0]]["steps"]) if a.device == "cpu" else base1
    rows = []
    for label, tp, sp, threads in layouts:
        steps, comms = runs[label]["steps"], runs[label]["comms"]
        step = statistics.median(steps)
        comm = statistics.median(comms)
        share = statistics.median(c / s for c, s in zip(comms, steps))
        rows.append(
            dict(
                layout=label,
                tp=tp,
                sequence_parallel=sp,
                threads_per_rank=threads,
                step_ms=1e3 * step,
                comm_ms=1e3 * comm,
                comm_share=share,
                speedup_vs_tp1_1thread=base1 / step,
                speedup_vs_tp1_2threads=base2 / step,
                collectives_per_step=runs[label]["collectives_per_step"],
                steps_timed=len(steps),
            )
        )
    shape = dict(
        layers=a.layers,
        hidden=a.hidden,
        heads=a.heads,
        seq=a.seq,
        vocab=a.vocab,
        micro_batch=a.micro_batch,
    )
    backend = "CPU gloo" if a.device == "cpu" else f"{torch.cuda.get_device_name()} NCCL"
    print(
        f"tensor parallel step (fwd+bwd+finalize+AdamW), GPT-2 {a.layers}L h{a.hidden} "
        f"s{a.seq} b{a.micro_batch} v{a.vocab}, fp32, {backend}, medians of "
        f"{a.rounds}x{a.iters} steps; load average {os.getloadavg()[0]:.1f} on "
        f"{os.cpu_count()} cores, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}"
    )
    cpu = a.device == "cpu"
    print(
        f"  {'layout':18s} {'step ms':>9s} {'comm ms':>9s} {'comm %':>7s} "
        f"{'vs TP1 1t' if cpu else 'vs TP1':>10s}" + (f" {'vs TP1 2t':>10s}" if cpu else "")
    )
    for r in rows:
        print(
            f"  {r['layout']:18s} {r['step_ms']:9.1f} {r['comm_ms']:9.1f} "
            f"{100 * r['comm_share']:6.1f}% {r['speedup_vs_tp1_1thread']:9.2f}x"
            + (f" {r['speedup_vs_tp1_2threads']:9.2f}x" if cpu else "")
        )
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(
                {
                    "shape": shape,
                    "device": backend,
                    "cores": os.cpu_count(),
                    "load_average": os.getloadavg()[0],
                    "torch": torch.__version__,
                    "omp_wait_policy": os.environ["OMP_WAIT_POLICY"],
                    "rows": rows,
                },
                fh,
                indent=1,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
