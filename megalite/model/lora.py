"""LoRA (Hu et al. 2021, "Low-Rank Adaptation of Large Language Models") on the TP linears.

A target linear y = W x keeps W frozen and learns y = W x + (alpha / r) B A x, with A [r, in]
and B [out, r]: B starts at zero (the model starts as the base), A as PyTorch's default for
a linear (kaiming-uniform, bound 1/sqrt(in)), both drawn from (seed, parameter name) like
every other parameter, so any layout starts from the same adapters.

Each factor is split the way its base layer is, so the adapter adds one small collective of
rank-r activations and none of the base's width:

  column-parallel W (rows split):  A whole on every TP rank, B split by rows like W.
      h = A x, on the layer's input as it arrives (sequence-parallel: this rank's part of
      the sequence), then gathered over the sequence (SP) or copied into the TP region
      (its grad all-reduced), then y_local = B_local h. With SP, A's grad is a partial sum
      over the sequence (tagged sequence_parallel: summed over TP before the step).
  row-parallel W (columns split):  A split by columns like W, B whole on every TP rank.
      h = A_local x_local is a partial sum over TP ranks: all-reduced (or reduce-scattered
      over the sequence with SP), then y = B h, added after the base's own reduction.

Targets (`--lora-target-modules`): qkv (attention's fused QKV, B laid out group by group as
W is), proj (attention's output), fc1 (the MLP's first linear; SwiGLU's [gate; up] blocks,
B strided as W is), fc2. Everything else is frozen: requires_grad False, so it has no grad,
no DDP buffer and no optimizer state (`freeze_base`).

Checkpoints hold the adapters alone and the base they were trained on (training/checkpoint.py);
`tools/convert.py merge-lora` folds B A into W, `export-peft` writes them for `peft`.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from megalite.parallel import state
from megalite.parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    full_shape,
    init_parameters,
)
from megalite.parallel.random import tracker
from megalite.parallel.tags import tag, tag_of
from megalite.parallel.tensor import (
    copy_to_tp,
    gather_from_sp,
    reduce_from_tp,
    reduce_scatter_to_sp,
)

# --lora-target-modules name -> the linear's path inside a transformer layer
TARGET_PATHS = {
    "qkv": "attention.linear_qkv",
    "proj": "attention.linear_proj",
    "fc1": "mlp.linear_fc1",
    "fc2": "mlp.linear_fc2",
}


class LoRA(nn.Module):
    """The adapter beside one column- or row-parallel linear: forward(x) is the update to add
    to the base layer's output (the base layer calls it: `base.lora`)."""

    def __init__(self, base: nn.Module, rank: int, scaling: float, dropout: float):
        super().__init__()
        self.column = isinstance(base, ColumnParallelLinear)
        if not self.column and not isinstance(base, RowParallelLinear):
            raise TypeError(f"LoRA goes on a Column/RowParallelLinear, not {type(base).__name__}")
        self.scaling, self.dropout = scaling, dropout
        self.sequence_parallel = base.sequence_parallel
        tp = state.get().tp
        w = base.weight
        out_local, in_local = w.shape
        base_tag = tag_of(w)
        kw = dict(dtype=w.dtype, device=w.device)
        if self.column:
            fan_in = in_local
            self.a = nn.Parameter(torch.empty(rank, in_local, **kw))
            self.b = nn.Parameter(torch.empty(out_local, rank, **kw))
            tag(self.a, sequence_parallel=self.sequence_parallel)
            tag(self.b, partition_dim=0, partition_stride=base_tag.partition_stride,
                group_layout=base_tag.group_layout)  # fmt: skip
            self._replicated = base._replicated  # GQA with TP > groups: shared k/v rows
        else:
            fan_in = in_local * tp
            self.a = nn.Parameter(torch.empty(rank, in_local, **kw))
            self.b = nn.Parameter(torch.empty(out_local, rank, **kw))
            tag(self.a, partition_dim=1)
            tag(self.b, sequence_parallel=self.sequence_parallel)
        tag(self.a, init=("uniform", 1.0 / math.sqrt(fan_in)))
        tag(self.b, init=("zeros",))

    def _drop(self, x, in_tp_region: bool):
        if self.dropout == 0.0 or not self.training:
            return x
        if in_tp_region:  # differs per TP rank: the TP-rank stream
            with tracker.fork():
                return F.dropout(x, self.dropout, True)
        return F.dropout(x, self.dropout, True)

    def forward(self, x):
        sp = self.sequence_parallel
        if self.column:  # x [s(/tp), b, in]: replicated over TP, or this rank's sequence part
            h = F.linear(self._drop(x, sp), self.a)  # [s(/tp), b, r]
            h = gather_from_sp(h) if sp else copy_to_tp(h)  # [s, b, r]
            return F.linear(h, self._replicated(self.b)) * self.scaling  # [s, b, out/tp]
        # row: x [s, b, in/tp], this rank's slice of the features
        h = F.linear(self._drop(x, True), self.a)  # partial sums [s, b, r]
        h = reduce_scatter_to_sp(h) if sp else reduce_from_tp(h)  # [s(/tp), b, r]
        return F.linear(h, self.b) * self.scaling  # [s(/tp), b, out]


def add_lora(chunks: list, lora_cfg, seed: int) -> int:
    """Put adapters on the target linears of every layer of this rank's chunks, initialise
    them from (seed, name) and freeze everything else. Returns the number of trainable
    parameters on this rank."""
    for chunk in chunks:
        for layer in chunk.layers.values():
            for target in lora_cfg.targets:
                base = layer.get_submodule(TARGET_PATHS[target])
                base.lora = LoRA(base, lora_cfg.lora_rank, lora_cfg.scaling, lora_cfg.lora_dropout)
        freeze_base(chunk)
        init_parameters(chunk, seed, only=is_adapter)
    return sum(p.numel() for c in chunks for p in c.parameters() if p.requires_grad)


def is_adapter(name: str) -> bool:
    """Whether a parameter name is a LoRA factor's (`...linear_qkv.lora.a`)."""
    return ".lora." in name


def freeze_base(chunk: nn.Module) -> None:
    for name, p in chunk.named_parameters():
        p.requires_grad_(is_adapter(name))


def lora_update(a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """The full weight update scaling x B A of one target: [out, in] (fp32)."""
    return scaling * (b.float() @ a.float())


def parameter_counts(chunks: list) -> tuple:
    """(trainable, total) parameters of the whole model (every rank's chunks, each counted
    once: full shapes by name, gathered over ranks; the last stage's copy of a tied
    embedding not counted)."""
    mine = {
        n: (math.prod(full_shape(p)), p.requires_grad)
        for c in chunks
        for n, p in c.named_parameters()
        if tag_of(p).tied_embedding != "output"
    }
    every = [mine]
    if dist.is_initialized():
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, mine)
    union = {n: v for d in every for n, v in d.items()}
    return sum(n for n, t in union.values() if t), sum(n for n, _ in union.values())
