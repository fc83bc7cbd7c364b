"""Tensor-parallel layers (Megatron style) and layout-independent initialisation.

ColumnParallelLinear splits the weight's output dim, RowParallelLinear its input dim (bias
added after the reduction), VocabParallelEmbedding owns a contiguous slice of the vocabulary.
With one TP rank they are plain nn.Linear / nn.Embedding maths with no communication.

Every parameter they create carries a `ParamTag` (parallel/tags.py): its partition over TP
ranks, whether it is sequence-parallel, its init rule. `init_parameters` gives a parameter its
full value from the seed and the parameter's name alone, then keeps this rank's slice: the
same seed gives the same full model whatever the layout. `shard_of` and `unshard` go from
full to slice and back.
"""

import hashlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from megalite import ops
from megalite.errors import MegaliteError
from megalite.parallel import state
from megalite.parallel.tags import tag, tag_of
from megalite.parallel.tensor import (
    copy_to_tp,
    copy_to_tp_replicas,
    gather_from_sp,
    gather_from_tp,
    reduce_from_tp,
    reduce_scatter_to_sp,
)


def _divide(n, tp, what):
    if n % tp:
        raise MegaliteError(f"{what} {n} is not divisible by tensor-parallel size {tp}")
    return n // tp


def group_replicas(layout, tp: int) -> int:
    """How many TP ranks share each group of a grouped layout (1: groups are split)."""
    if layout is None or tp <= layout[0]:
        return 1
    return tp // layout[0]


def _local_rows(full_rows: int, tp: int, layout, what: str) -> int:
    if layout is None:
        return _divide(full_rows, tp, what)
    groups, split, shared = layout
    if tp <= groups:
        _divide(groups, tp, f"{what}: number of groups")
        return full_rows // tp
    if tp % groups:
        raise MegaliteError(
            f"{what}: tensor-parallel size {tp} is neither a divisor nor a "
            f"multiple of the {groups} groups"
        )
    return _divide(split, tp // groups, f"{what}: rows split within a group") + shared


class ColumnParallelLinear(nn.Module):
    """y = x A^T + b with A split by rows (output features) over TP ranks.

    input  [s, b, in] (or [s/tp, b, in] with sequence parallelism, gathered here)
    output [s, b, out/tp], or [s, b, out] with gather_output
    group_layout: see the module docstring (fused QKV with grouped-query attention)
    """

    def __init__(
        self,
        in_features,
        out_features,
        bias=True,
        gather_output=False,
        sequence_parallel=False,
        init_std=0.02,
        stride=1,
        group_layout=None,
        dtype=None,
    ):
        super().__init__()
        tp = state.get().tp
        self.gather_output = gather_output
        self.sequence_parallel = sequence_parallel and tp > 1
        if group_layout is not None:
            g, split, shared = group_layout
            assert g * (split + shared) == out_features, (group_layout, out_features)
        self.replicas = group_replicas(group_layout, tp)
        rows = _local_rows(out_features, tp, group_layout, "output features")
        # rows [0, split_local) are this rank's own; [split_local, rows) are shared by replicas
        self.split_local = rows - group_layout[2] if self.replicas > 1 else rows
        self.lora = None  # a LoRA adapter (model/lora.py), whose update joins the output
        self.weight = tag(
            nn.Parameter(torch.empty(rows, in_features, dtype=dtype)),
            partition_dim=0,
            init=("normal", init_std),
            partition_stride=stride,
            group_layout=group_layout,
        )
        self.bias = None
        if bias:
            self.bias = tag(
                nn.Parameter(torch.empty(rows, dtype=dtype)),
                partition_dim=0,
                init=("zeros",),
                partition_stride=stride,
                group_layout=group_layout,
            )

    def _replicated(self, t):
        # Shared rows get grads from this rank's query heads only: sum them over the replicas.
        if t is None or self.replicas == 1:
            return t
        a = self.split_local
        return torch.cat([t[:a], copy_to_tp_replicas(t[a:], self.replicas)], dim=0)

    def forward(self, x):
        w, b = self._replicated(self.weight), self._replicated(self.bias)
        y = column_parallel_linear(x, w, b, self.sequence_parallel)
        if self.lora is not None:
            y = y + self.lora(x)
        return gather_from_tp(y) if self.gather_output else y


def column_parallel_linear(x, weight, bias=None, sequence_parallel=False):
    """The maths of ColumnParallelLinear, also for a weight owned elsewhere (a tied LM head).

    The weight grad goes straight into the DDP buffer (gradient-accumulation fusion,
    ops.linear) unless the weight is also used elsewhere in the same backward: the input
    embedding that a tied head reuses gets its two grads summed by autograd first."""
    x = gather_from_sp(x) if sequence_parallel else copy_to_tp(x)  # [s, b, in]
    fuse = tag_of(weight).tied_embedding != "input"
    return ops.linear(x, weight, bias, fuse_wgrad_accumulation=fuse)  # [s, b, out/tp]


class RowParallelLinear(nn.Module):
    """y = x A^T + b with A split by columns (input features); partial sums are reduced.

    input  [s, b, in/tp] (already split: the output of a ColumnParallelLinear)
    output [s, b, out], or [s/tp, b, out] with sequence parallelism (reduce-scattered)
    """

    def __init__(
        self,
        in_features,
        out_features,
        bias=True,
        sequence_parallel=False,
        init_std=0.02,
        dtype=None,
    ):
        super().__init__()
        tp = state.get().tp
        self.sequence_parallel = sequence_parallel and tp > 1
        self.lora = None  # a LoRA adapter (model/lora.py), whose update joins the output
        self.weight = tag(
            nn.Parameter(
                torch.empty(out_features, _divide(in_features, tp, "input features"), dtype=dtype)
            ),
            partition_dim=1,
            init=("normal", init_std),
        )
        self.bias = None
        if bias:
            self.bias = tag(
                nn.Parameter(torch.empty(out_features, dtype=dtype)),
                init=("zeros",),
                sequence_parallel=self.sequence_parallel,
            )

    def forward(self, x):
        if state.get().tp == 1:  # no reduction: the bias joins the GEMM
            y = ops.linear(x, self.weight, self.bias, fuse_wgrad_accumulation=True)
            return y if self.lora is None else y + self.lora(x)
        y = ops.linear(x, self.weight, fuse_wgrad_accumulation=True)
        y = reduce_scatter_to_sp(y) if self.sequence_parallel else reduce_from_tp(y)
        if self.lora is not None:
            y = y + self.lora(x)
        return y + self.bias if self.bias is not None else y


class VocabParallelEmbedding(nn.Module):
    """Embedding whose rows (vocabulary) are split into contiguous slices over TP ranks.

    input ids [b, s] -> output [s, b, h] ([s/tp, b, h] with sequence parallelism)
    """

    def __init__(self, vocab_size, hidden_size, sequence_parallel=False, init_std=0.02, dtype=None):
        super().__init__()
        st = state.get()
        self.sequence_parallel = sequence_parallel and st.tp > 1
        per_rank = _divide(vocab_size, st.tp, "vocabulary size (padded)")
        self.vocab_start = st.tp_rank * per_rank
        self.vocab_end = self.vocab_start + per_rank
        self.weight = tag(
            nn.Parameter(torch.empty(per_rank, hidden_size, dtype=dtype)),
            partition_dim=0,
            init=("normal", init_std),
        )

    def forward(self, ids):
        ids = ids.t()  # [s, b]
        if state.get().tp == 1:
            return F.embedding(ids, self.weight)  # [s, b, h]
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local = (ids - self.vocab_start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_scatter_to_sp(out) if self.sequence_parallel else reduce_from_tp(out)


# -- initialisation --------------------------------------------------------------------------


def _seed_for(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def full_shape(param) -> list:
    """The shape of a parameter's full (unsharded) value under the current TP size."""
    shape = list(param.shape)
    dim, _, layout = tag_of(param).partition
    if dim is not None and layout is not None:
        shape[dim] = layout[0] * (layout[1] + layout[2])
    elif dim is not None:
        shape[dim] *= state.get().tp
    return shape


@torch.no_grad()
def init_parameters(module: nn.Module, seed: int, only=None) -> None:
    """Give every parameter its full value from (seed, name), then keep this rank's slice.

    A parameter's tag may name another (`init_name`) to be initialised as it (the pipeline's
    last-stage copy of a tied embedding starts equal to the first stage's embedding). The full
    value is drawn on the CPU in fp32 whatever the layout, so every TP size slices the same numbers
    (a vocabulary padded further for a larger TP only appends rows: the real rows are equal).
    only: a predicate on names, to initialise those parameters alone (LoRA's adapters).
    """
    st = state.get()
    for name, p in module.named_parameters():
        if only is not None and not only(name):
            continue
        t = tag_of(p)
        rule = t.init
        if rule[0] == "zeros":
            p.zero_()
            continue
        if rule[0] == "ones":
            p.fill_(1.0)
            continue
        gen = torch.Generator().manual_seed(_seed_for(seed, t.init_name or name))
        full = torch.empty(full_shape(p), dtype=torch.float32)
        if rule[0] == "uniform":  # ("uniform", bound): U(-bound, bound)
            full.uniform_(-rule[1], rule[1], generator=gen)
        else:
            full.normal_(0.0, rule[1], generator=gen)
        p.copy_(shard_of(full, p, st.tp, st.tp_rank))


def shard_of(full: torch.Tensor, param, tp: int, tp_rank: int) -> torch.Tensor:
    """This TP rank's slice of a parameter's full value (inverse of `unshard`)."""
    dim, stride, layout = tag_of(param).partition
    if dim is None or tp == 1:
        return full
    if group_replicas(layout, tp) > 1:
        groups, split, shared = layout
        r = tp // groups
        block = full.chunk(groups, dim=dim)[tp_rank // r]  # [split + shared, ...]
        own = block.narrow(dim, 0, split).chunk(r, dim=dim)[tp_rank % r]
        return torch.cat([own, block.narrow(dim, split, shared)], dim=dim)
    blocks = full.chunk(stride, dim=dim)
    return torch.cat([b.chunk(tp, dim=dim)[tp_rank] for b in blocks], dim=dim)


def unshard(shards: list, dim, stride: int = 1, group_layout=None) -> torch.Tensor:
    """The full value from every TP rank's slice, in TP-rank order."""
    if dim is None or len(shards) == 1:
        return shards[0]
    if group_replicas(group_layout, len(shards)) > 1:
        groups, split, shared = group_layout
        r = len(shards) // groups
        own = split // r
        parts = []
        for g in range(groups):
            replicas = shards[g * r : (g + 1) * r]
            parts += [s.narrow(dim, 0, own) for s in replicas]
            parts.append(replicas[0].narrow(dim, own, shared))  # equal on every replica
        return torch.cat(parts, dim=dim)
    per_rank = [s.chunk(stride, dim=dim) for s in shards]
    return torch.cat([torch.cat([r[k] for r in per_rank], dim=dim) for k in range(stride)], dim=dim)


def unique_part(param, t: torch.Tensor) -> torch.Tensor:
    """The part of `t` (the param or its grad) that no lower TP rank also holds: for the
    global grad norm, where each value must count once. Whole-replicated params are left to
    the caller (they count on TP rank 0 only); this trims replicated key/value rows."""
    st = state.get()
    pt = tag_of(param)
    r = group_replicas(pt.group_layout, st.tp)
    if r == 1 or st.tp_rank % r == 0:
        return t
    own = pt.group_layout[1] // r
    return t.narrow(pt.partition_dim, 0, own)
