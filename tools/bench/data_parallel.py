#!/usr/bin/env python
"""Data-parallel step time: megalite's grad buckets and optimizers against PyTorch's DDP.

DP=2 over gloo: two processes on this machine, one compute thread each. Every variant trains
the same megalite GPT (fp32, same init) on the same batches with the same optimizer
arithmetic (the fused AdamW kernel) and the same global-norm clipping. A step is forward +
backward over the micro-batches (grad sync only after the last one), clipping and AdamW.

    torch-ddp         torch.nn.parallel.DistributedDataParallel(bucket_cap_mb=25), no_sync()
                      for all but the last micro-batch, clip_grad_norm_, FusedAdamW over .grad
    megalite          megalite.parallel.data.DistributedDataParallel, 25 MB buckets, the
                      buckets reduced after backward; MixedPrecisionOptimizer (fp32 here)
    megalite-overlap  the same with --overlap-grad-reduce: each bucket's all-reduce starts
                      in backward as soon as its grads are in
    megalite-distopt  --use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather

Each round runs one step of every variant, in a rotating order (so the machine's load hits
them alike); the table gives the median step time over the rounds (warm-up rounds dropped),
its interquartile range, the ratio of medians to torch-ddp and the median of the per-round
ratios ("paired": steadier, since a round's steps run back to back under the same load).

    python tools/bench/data_parallel.py [--quick] [--json out.json]
"""

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

VARIANTS = ["torch-ddp", "megalite", "megalite-overlap", "megalite-distopt"]
BUCKET_MB = 25


def build(args):
    from megalite.config import ModelConfig
    from megalite.model.gpt import GPTModel
    from megalite.parallel.layers import init_parameters
    cfg = ModelConfig(num_layers=args.layers, hidden_size=args.hidden,
                      num_attention_heads=args.heads, seq_length=args.seq)
    model = GPTModel(cfg, args.vocab)
    init_parameters(model, 1234)
    return model


def groups(model):
    from megalite.optim import no_weight_decay
    named = list(model.named_parameters())
    return [{"params": [p for n, p in named if not no_weight_decay(n, p)], "weight_decay": 0.1},
            {"params": [p for n, p in named if no_weight_decay(n, p)], "weight_decay": 0.0}]


class TorchDDP:
    def __init__(self, args):
        from megalite.optim import FusedAdamW
        self.module = build(args)
        self.model = torch.nn.parallel.DistributedDataParallel(self.module,
                                                               bucket_cap_mb=BUCKET_MB)
        self.opt = FusedAdamW(groups(self.module), lr=1e-4, betas=(0.9, 0.95))
        self.params = list(self.module.parameters())

    def step(self, micro):
        for i, (x, y) in enumerate(micro):
            last = i == len(micro) - 1
            with contextlib.nullcontext() if last else self.model.no_sync():
                (self.model(x, labels=y).mean() / len(micro)).backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0, foreach=True)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


class Megalite:
    def __init__(self, args, overlap, distopt):
        from megalite.optim import DistributedOptimizer, MixedPrecisionOptimizer
        from megalite.parallel.data import DistributedDataParallel
        self.model = build(args)
        self.ddp = DistributedDataParallel(
            self.model, bucket_size=BUCKET_MB * 2 ** 20 // 4, overlap_grad_reduce=overlap,
            use_distributed_optimizer=distopt, overlap_param_gather=distopt)
        cls = DistributedOptimizer if distopt else MixedPrecisionOptimizer
        self.opt = cls(groups(self.model), self.ddp, lr=1e-4, betas=(0.9, 0.95), clip_grad=1.0)

    def step(self, micro):
        from megalite.parallel.data import finalize_model_grads
        from megalite.parallel.pipeline import forward_backward_no_pipelining
        batches = iter([{"tokens": x, "labels": y} for x, y in micro])
        forward_backward_no_pipelining(self.model, batches, len(micro), no_sync=self.ddp.no_sync)
        finalize_model_grads(self.model, self.ddp)
        self.opt.step()
        self.opt.zero_grad()


def make(name, args):
    if name == "torch-ddp":
        return TorchDDP(args)
    return Megalite(args, overlap=name != "megalite", distopt=name == "megalite-distopt")


def worker(rank, world, port, args, out):
    from megalite.parallel import state
    torch.set_num_threads(1)
    state.initialize(1, backend="gloo", device=torch.device("cpu"), rank=rank, world_size=world,
                     init_method=f"tcp://127.0.0.1:{port}")
    g = torch.Generator().manual_seed(rank)
    data = [[(t[:, :-1], t[:, 1:]) for t in
             (torch.randint(0, args.vocab, (args.mbs, args.seq + 1), generator=g)
              for _ in range(args.micro))] for _ in range(4)]
    runners = {name: make(name, args) for name in VARIANTS}
    n_params = sum(p.numel() for p in runners["megalite"].model.parameters())
    times = {name: [] for name in VARIANTS}
    # One step of each variant per round, in a rotating order: the machine's load (other
    # jobs share its 2 cores) then hits every variant alike instead of whole blocks of one.
    for r in range(args.rounds):
        order = VARIANTS[r % len(VARIANTS):] + VARIANTS[:r % len(VARIANTS)]
        for name in order:
            run = runners[name]
            dist.barrier()
            tic = time.perf_counter()
            run.step(data[r % len(data)])
            if name == "megalite-distopt":
                run.ddp.finish_param_sync()    # its gather overlaps its own next forward only
            if r >= args.warmup:
                times[name].append(time.perf_counter() - tic)
    if rank == 0:
        torch.save({"times": times, "params": n_params}, out)
    state.destroy()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a smaller model, fewer rounds")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--rounds", type=int, default=None)
    args = ap.parse_args()
    if args.quick:
        shape = dict(layers=2, hidden=256, heads=4, seq=64, vocab=4096, mbs=1, micro=2,
                     rounds=12, warmup=2)
    else:
        shape = dict(layers=6, hidden=512, heads=8, seq=64, vocab=8192, mbs=1, micro=2,
                     rounds=40, warmup=3)
    for k, v in shape.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    from megalite.parallel.data import default_bucket_size  # noqa: F401 (import check)
    sock = __import__("socket").socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "r.pt")
        mp.start_processes(worker, args=(2, port, args, out), nprocs=2, start_method="spawn")
        res = torch.load(out, weights_only=False)
    times, n = res["times"], res["params"]
    med = {k: statistics.median(v) for k, v in times.items()}
    iqr = {k: statistics.quantiles(v, n=4) for k, v in times.items()}
    base = med["torch-ddp"]
    print(f"DP=2 over gloo, {n / 1e6:.1f}M params ({n * 4 / 2 ** 20:.0f} MB of fp32 grads), "
          f"{BUCKET_MB} MB buckets, {args.layers} layers x hidden {args.hidden}, "
          f"{args.micro} micro-batches of {args.mbs} x {args.seq} tokens per rank; "
          f"median of {len(times['torch-ddp'])} steps each")
    # Steps of one round ran back to back under about the same load: the median of the
    # per-round ratios is steadier than the ratio of medians.
    paired = {k: statistics.median(a / b for a, b in zip(times[k], times["torch-ddp"]))
              for k in VARIANTS}
    print(f"{'variant':18s} {'step ms':>9s} {'IQR ms':>15s} {'vs torch-ddp':>13s} "
          f"{'paired':>8s}")
    for k in VARIANTS:
        q = f"{iqr[k][0] * 1e3:.0f}-{iqr[k][2] * 1e3:.0f}"
        print(f"{k:18s} {med[k] * 1e3:9.1f} {q:>15s} {med[k] / base:12.3f}x "
              f"{paired[k]:7.3f}x")
    overlap = statistics.median(a / b for a, b in zip(times["megalite-overlap"],
                                                      times["megalite"]))
    print(f"overlap: megalite-overlap / megalite = {med['megalite-overlap'] / med['megalite']:.3f}"
          f" (paired {overlap:.3f})")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"params": n, "shape": shape, "median_s": med,
                       "ratio_to_torch_ddp": {k: med[k] / base for k in VARIANTS},
                       "paired_ratio_to_torch_ddp": paired, "overlap_paired_ratio": overlap,
                       "steps": times}, fh, indent=1)


if __name__ == "__main__":
    main()
