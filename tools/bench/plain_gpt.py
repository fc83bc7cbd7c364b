"""A plain PyTorch GPT-2 trainer: what a user would write themselves (nanoGPT style).

The baseline of tools/bench/train_step.py, data_parallel.py and zero.py; it imports nothing from
megalite and takes megalite's flag names, so one set of shape flags serves both:

    torchrun --standalone --nproc_per_node N tools/bench/plain_gpt.py --num-layers 4 \
        --hidden-size 256 --num-attention-heads 8 --seq-length 128 --vocab-size 2048 \
        --micro-batch-size 4 --global-batch-size 16 --train-iters 20 --metrics-file m.jsonl

One process: the plain model. WORLD_SIZE > 1: torch DDP (25 MB buckets, no_sync() on every
micro-batch but the last) over gloo on a CPU, nccl on CUDA. Threads: torch's own, i.e.
OMP_NUM_THREADS (torchrun sets 1 per process when it launches several, unless it is set).

--fsdp2 (WORLD_SIZE > 1): torch.distributed.fsdp.fully_shard (FSDP2) instead of DDP, applied
as torchtitan does: to each Block (resharded after forward, except the last one, which
backward needs first), then to the root model (embeddings, final norm, the tied head). The
optimizer steps the sharded DTensor params. Gradient accumulation lets FSDP2 reduce-scatter
every micro-batch (its default, and torchtitan's): set_requires_gradient_sync(False) would
keep a full unsharded grad per param between micro-batches, the memory FSDP exists to save.
On a CPU, FSDP2 runs its collectives synchronously (its overlap comes from CUDA streams);
--fsdp2-prefetch also issues the all-gathers asynchronously (the private
_set_unshard_async_op(True)) with explicit prefetching of the next Block in forward and the
previous one in backward (set_modules_to_{forward,backward}_prefetch), so they overlap compute
as megalite's ZeRO-3 prefetch does. Its reduce-scatters stay synchronous.

The metrics file gets one record per iteration from the last rank, as megalite's: loss,
iter_time_s, tokens_per_sec and mem_peak_gb (what megalite writes: the peak resident memory
of the process, ru_maxrss, on a CPU; max_memory_allocated on CUDA).
"""

import argparse
import contextlib
import json
import os
import resource
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


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


class GPT(nn.Module):
    """GPT-2: learned positions, pre-LayerNorm blocks, LM head tied to the token embedding."""

    def __init__(self, vocab, seq, h, layers, heads):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, h), nn.Embedding(seq, h)
        self.blocks = nn.ModuleList(Block(h, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(h)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for blk in self.blocks:
            x = blk(x)
        logits = F.linear(self.ln_f(x), self.wte.weight)
        return F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--num-attention-heads", type=int, default=8)
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--global-batch-size", type=int, default=16)
    p.add_argument("--train-iters", type=int, default=20)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--clip-grad", type=float, default=1.0)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--metrics-file")
    p.add_argument("--fsdp2", action="store_true", help="fully_shard instead of DDP")
    p.add_argument(
        "--fsdp2-prefetch", action="store_true", help="--fsdp2, async explicit prefetching"
    )
    a = p.parse_args()
    a.fsdp2 = a.fsdp2 or a.fsdp2_prefetch

    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.device(a.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    elif a.fsdp2:
        p.error("--fsdp2 needs WORLD_SIZE > 1 (run it under torchrun)")
    n_micro, rem = divmod(a.global_batch_size, a.micro_batch_size * world)
    if rem or not n_micro:
        p.error("--global-batch-size must be a multiple of --micro-batch-size x WORLD_SIZE")

    # The same init on every rank: DDP broadcasts rank 0's anyway, fully_shard keeps a shard.
    torch.manual_seed(a.seed)
    model = GPT(a.vocab_size, a.seq_length, a.hidden_size, a.num_layers, a.num_attention_heads).to(
        device
    )
    ddp = None
    if a.fsdp2:
        from torch.distributed.fsdp import fully_shard

        for i, blk in enumerate(model.blocks):
            fully_shard(blk, reshard_after_forward=i < len(model.blocks) - 1)
        fully_shard(model)
        if a.fsdp2_prefetch:
            blocks = list(model.blocks)
            for i, blk in enumerate(blocks):
                blk.set_modules_to_forward_prefetch(blocks[i + 1 : i + 2])
                blk.set_modules_to_backward_prefetch(blocks[max(i - 1, 0) : i])
            model._set_unshard_async_op(True)
    elif world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(model, bucket_cap_mb=25)
    fwd = ddp or model
    params = list(model.parameters())  # with FSDP2: DTensors, this rank's shards
    # Weight decay on matrices and embeddings only, not on biases and LayerNorm parameters.
    groups = [
        {"params": [q for q in params if q.ndim >= 2], "weight_decay": a.weight_decay},
        {"params": [q for q in params if q.ndim < 2], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=a.lr, betas=(0.9, 0.95), fused=True)
    gen = torch.Generator().manual_seed(a.seed + rank)  # each rank its own batches
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=a.bf16)
    tokens_per_iter = a.global_batch_size * a.seq_length

    for it in range(1, a.train_iters + 1):
        t0 = time.perf_counter()
        total = torch.zeros((), device=device)
        for i in range(n_micro):
            # Random tokens made inside the step, as megalite's --mock-data batches are.
            s = torch.randint(
                0, a.vocab_size, (a.micro_batch_size, a.seq_length + 1), generator=gen
            ).to(device)
            # DDP all-reduces the grads in backward; accumulate locally until the last one.
            sync = ddp is None or i == n_micro - 1
            with contextlib.nullcontext() if sync else ddp.no_sync(), autocast:
                loss = fwd(s[:, :-1], s[:, 1:])
            (loss / n_micro).backward()
            total += loss.detach()
        if a.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(params, a.clip_grad)
        opt.step()
        opt.zero_grad(set_to_none=True)
        total /= n_micro
        if world > 1:
            # The mean loss over the ranks, for logging, as megalite does: one scalar, cheap.
            dist.all_reduce(total)
            total /= world
        loss = total.item()
        dt = time.perf_counter() - t0
        last = rank == world - 1  # the rank megalite logs from
        if a.metrics_file and last:  # appended after the timing, as megalite does
            if device.type == "cuda":
                peak = torch.cuda.max_memory_allocated(device) / 2**30
            else:  # ru_maxrss is KiB on Linux
                peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
            with open(a.metrics_file, "a") as fh:
                fh.write(
                    json.dumps(
                        {
                            "iteration": it,
                            "loss": loss,
                            "iter_time_s": dt,
                            "tokens_per_sec": tokens_per_iter / dt,
                            "mem_peak_gb": peak,
                        }
                    )
                    + "\n"
                )
        if last:
            print(
                f"iter {it}/{a.train_iters} | loss {loss:.4f} | {tokens_per_iter / dt:,.0f} "
                f"tok/s | {dt * 1000:.0f} ms/it",
                flush=True,
            )
    if world > 1:
        # Drop DDP's reducer before its process group: destroyed the other way round (or left
        # to interpreter teardown) gloo's threads can abort a run that succeeded.
        dist.barrier()
        del ddp, fwd
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
