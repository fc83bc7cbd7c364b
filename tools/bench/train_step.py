#!/usr/bin/env python
"""Training throughput: megalite's trainer (one process) against a plain PyTorch GPT.

The baseline is what a user would write themselves (nanoGPT style): the same GPT-2 shape,
nn.LayerNorm, scaled_dot_product_attention, tied head, F.cross_entropy, gradient accumulation,
clip_grad_norm_ and torch.optim.AdamW(fused=True). Both train on the same random tokens with
the same batch, threads and precision; each reports tokens/s per iteration and the table gives
medians over the timed iterations (warm-up iterations dropped), alternating the two runs.

    python tools/bench/train_step.py [--quick] [--json out.json] [--bf16]
"""

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402


class Block(nn.Module):
    def __init__(self, h, heads):
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = nn.LayerNorm(h), nn.LayerNorm(h)
        self.c_attn, self.c_proj = nn.Linear(h, 3 * h), nn.Linear(h, h)
        self.c_fc, self.c_proj2 = nn.Linear(h, 4 * h), nn.Linear(4 * h, h)

    def forward(self, x):
        b, s, h = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(h, dim=2)
        q, k, v = (t.view(b, s, self.heads, h // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.c_proj(y.transpose(1, 2).reshape(b, s, h))
        return x + self.c_proj2(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class PlainGPT(nn.Module):
    def __init__(self, vocab, seq, h, layers, heads):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, h), nn.Embedding(seq, h)
        self.blocks = nn.ModuleList(Block(h, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(h)

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for blk in self.blocks:
            x = blk(x)
        logits = F.linear(self.ln_f(x), self.wte.weight)
        return F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1))


def run_plain(a, iters, dtype):
    torch.manual_seed(0)
    model = PlainGPT(a.vocab, a.seq, a.hidden, a.layers, a.heads)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-4, betas=(0.9, 0.95), fused=True)
    n_micro = a.global_batch // a.micro_batch
    g = torch.Generator().manual_seed(1)
    rates = []
    for _ in range(iters):
        t0 = time.perf_counter()
        for _ in range(n_micro):
            s = torch.randint(0, a.vocab, (a.micro_batch, a.seq + 1), generator=g)
            with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                loss = model(s[:, :-1], s[:, 1:])
            (loss / n_micro).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        rates.append(a.global_batch * a.seq / (time.perf_counter() - t0))
    return rates


def run_megalite(a, iters, bf16):
    from megalite.config import parse_config
    from megalite.training.loop import pretrain
    with tempfile.TemporaryDirectory() as d:
        metrics = os.path.join(d, "m.jsonl")
        argv = ["--mock-data", "--vocab-size", str(a.vocab), "--model-style", "gpt2",
                "--num-layers", str(a.layers), "--hidden-size", str(a.hidden),
                "--num-attention-heads", str(a.heads), "--seq-length", str(a.seq),
                "--micro-batch-size", str(a.micro_batch), "--global-batch-size",
                str(a.global_batch), "--train-iters", str(iters), "--lr", "1e-4",
                "--weight-decay", "0.1", "--clip-grad", "1.0", "--log-interval", "1",
                "--eval-interval", str(10 ** 9), "--split", "100,0,0", "--metrics-file", metrics,
                "--device", "cpu"]
        if bf16:
            argv.append("--bf16")
        import contextlib
        import io
        with contextlib.redirect_stdout(io.StringIO()):
            pretrain(parse_config(argv))
        return [json.loads(line)["tokens_per_sec"] for line in open(metrics)]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--global-batch", type=int, default=16)
    p.add_argument("--iters", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count()))
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--quick", action="store_true", help="tiny sizes, a smoke test")
    p.add_argument("--json", help="write the results here")
    a = p.parse_args()
    if a.quick:
        a.layers, a.hidden, a.seq, a.vocab, a.iters, a.warmup, a.rounds = 2, 64, 64, 512, 4, 1, 1
    torch.set_num_threads(a.threads)
    dtype = torch.bfloat16 if a.bf16 else torch.float32

    plain, mega = [], []
    for _ in range(a.rounds):  # alternate so drifting machine load hits both alike
        plain += run_plain(a, a.iters, dtype)[a.warmup:]
        mega += run_megalite(a, a.iters, a.bf16)[a.warmup:]
    res = {
        "shape": dict(layers=a.layers, hidden=a.hidden, heads=a.heads, seq=a.seq,
                      vocab=a.vocab, micro_batch=a.micro_batch, global_batch=a.global_batch),
        "threads": a.threads, "dtype": str(dtype).replace("torch.", ""),
        "plain_pytorch_tokens_per_sec": statistics.median(plain),
        "megalite_tokens_per_sec": statistics.median(mega),
    }
    res["ratio"] = res["megalite_tokens_per_sec"] / res["plain_pytorch_tokens_per_sec"]
    print(f"train step, {a.layers}L h{a.hidden} s{a.seq} v{a.vocab} gbs{a.global_batch}, "
          f"{res['dtype']}, {a.threads} threads, medians of {len(mega)} iterations")
    print(f"  {'plain PyTorch GPT (AdamW fused)':34s} {res['plain_pytorch_tokens_per_sec']:>10,.0f} tok/s")
    print(f"  {'megalite trainer':34s} {res['megalite_tokens_per_sec']:>10,.0f} tok/s")
    print(f"  {'ratio (goal >= 1.0)':34s} {res['ratio']:>10.3f}x")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(res, fh, indent=1)
    return 0 if math.isfinite(res["ratio"]) else 1


if __name__ == "__main__":
    sys.exit(main())
