"""Tensor-parallel layers (Megatron style) and layout-independent initialisation.

ColumnParallelLinear splits the weight's output dim, RowParallelLinear its input dim (bias
added after the reduction), VocabParallelEmbedding owns a contiguous slice of the vocabulary.
With one TP rank they are plain nn.Linear / nn.Embedding maths with no communication.

Every parameter carries two attributes that the rest of megalite reads:
  tp_partition_dim   the dim split over TP ranks, or None when every TP rank holds it whole
  tp_partition_stride  k > 1 when the full tensor is k blocks along that dim (SwiGLU's
                     [gate; up]) and each rank holds its slice of every block, concatenated
  sequence_parallel  True when each TP rank sees only part of the sequence, so its grad is a
                     partial sum to be all-reduced over TP before the optimizer step
and an `init` rule. `init_parameters` gives a parameter its full value from the seed and the
parameter's name alone, then keeps this rank's slice: the same seed gives the same full
model whatever the layout.
"""

import hashlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from megalite.parallel import state
from megalite.parallel.tensor import (copy_to_tp, gather_from_sp, gather_from_tp,
                                      reduce_from_tp, reduce_scatter_to_sp)


def mark(param: nn.Parameter, partition_dim=None, init=("normal", 0.02), sequence_parallel=False,
         stride=1):
    param.tp_partition_dim = partition_dim
    param.tp_partition_stride = stride
    param.init = init
    param.sequence_parallel = sequence_parallel
    return param


def _divide(n, tp, what):
    if n % tp:
        raise ValueError(f"{what} {n} is not divisible by tensor-parallel size {tp}")
    return n // tp


class ColumnParallelLinear(nn.Module):
    """y = x A^T + b with A split by rows (output features) over TP ranks.

    input  [s, b, in] (or [s/tp, b, in] with sequence parallelism, gathered here)
    output [s, b, out/tp], or [s, b, out] with gather_output
    """

    def __init__(self, in_features, out_features, bias=True, gather_output=False,
                 sequence_parallel=False, init_std=0.02, stride=1, dtype=None):
        super().__init__()
        tp = state.get().tp
        self.gather_output = gather_output
        self.sequence_parallel = sequence_parallel and tp > 1
        self.weight = mark(nn.Parameter(torch.empty(
            _divide(out_features, tp, "output features"), in_features, dtype=dtype)),
            partition_dim=0, init=("normal", init_std), stride=stride)
        self.bias = None
        if bias:
            self.bias = mark(nn.Parameter(torch.empty(self.weight.shape[0], dtype=dtype)),
                             partition_dim=0, init=("zeros",), stride=stride)

    def forward(self, x):
        y = column_parallel_linear(x, self.weight, self.bias, self.sequence_parallel)
        return gather_from_tp(y) if self.gather_output else y


def column_parallel_linear(x, weight, bias=None, sequence_parallel=False):
    """The maths of ColumnParallelLinear for a weight owned elsewhere (a tied LM head)."""
    x = gather_from_sp(x) if sequence_parallel else copy_to_tp(x)
    return F.linear(x, weight, bias)


class RowParallelLinear(nn.Module):
    """y = x A^T + b with A split by columns (input features); partial sums are reduced.

    input  [s, b, in/tp] (already split: the output of a ColumnParallelLinear)
    output [s, b, out], or [s/tp, b, out] with sequence parallelism (reduce-scattered)
    """

    def __init__(self, in_features, out_features, bias=True, sequence_parallel=False,
                 init_std=0.02, dtype=None):
        super().__init__()
        tp = state.get().tp
        self.sequence_parallel = sequence_parallel and tp > 1
        self.weight = mark(nn.Parameter(torch.empty(
            out_features, _divide(in_features, tp, "input features"), dtype=dtype)),
            partition_dim=1, init=("normal", init_std))
        self.bias = None
        if bias:
            self.bias = mark(nn.Parameter(torch.empty(out_features, dtype=dtype)),
                             init=("zeros",), sequence_parallel=self.sequence_parallel)

    def forward(self, x):
        y = F.linear(x, self.weight)
        y = reduce_scatter_to_sp(y) if self.sequence_parallel else reduce_from_tp(y)
        return y + self.bias if self.bias is not None else y


class VocabParallelEmbedding(nn.Module):
    """Embedding whose rows (vocabulary) are split into contiguous slices over TP ranks.

    input ids [b, s] -> output [s, b, h] ([s/tp, b, h] with sequence parallelism)
    """

    def __init__(self, vocab_size, hidden_size, sequence_parallel=False, init_std=0.02,
                 dtype=None):
        super().__init__()
        st = state.get()
        self.sequence_parallel = sequence_parallel and st.tp > 1
        per_rank = _divide(vocab_size, st.tp, "padded vocabulary")
        self.vocab_start = st.tp_rank * per_rank
        self.vocab_end = self.vocab_start + per_rank
        self.weight = mark(nn.Parameter(torch.empty(per_rank, hidden_size, dtype=dtype)),
                           partition_dim=0, init=("normal", init_std))

    def forward(self, ids):
        ids = ids.t()                                               # [s, b]
        if state.get().tp == 1:
            return F.embedding(ids, self.weight)                    # [s, b, h]
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local = (ids - self.vocab_start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_scatter_to_sp(out) if self.sequence_parallel else reduce_from_tp(out)


# -- initialisation --------------------------------------------------------------------------

def _seed_for(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def full_shape(param) -> list:
    shape = list(param.shape)
    dim = getattr(param, "tp_partition_dim", None)
    if dim is not None:
        shape[dim] *= state.get().tp
    return shape


@torch.no_grad()
def init_parameters(module: nn.Module, seed: int) -> None:
    """Give every parameter its full value from (seed, name), then keep this rank's slice.

    A parameter may set `init_name` to be initialised as another (the pipeline's last-stage
    copy of a tied embedding starts equal to the first stage's embedding).
    """
    st = state.get()
    for name, p in module.named_parameters():
        rule = getattr(p, "init", ("normal", 0.02))
        if rule[0] == "zeros":
            p.zero_()
            continue
        if rule[0] == "ones":
            p.fill_(1.0)
            continue
        gen = torch.Generator().manual_seed(_seed_for(seed, getattr(p, "init_name", name)))
        full = torch.empty(full_shape(p), dtype=torch.float32).normal_(0.0, rule[1], generator=gen)
        p.copy_(shard_of(full, p, st.tp, st.tp_rank))


def shard_of(full: torch.Tensor, param, tp: int, tp_rank: int) -> torch.Tensor:
    """This TP rank's slice of a parameter's full value (inverse of `unshard`)."""
    dim = getattr(param, "tp_partition_dim", None)
    if dim is None or tp == 1:
        return full
    blocks = full.chunk(getattr(param, "tp_partition_stride", 1), dim=dim)
    return torch.cat([b.chunk(tp, dim=dim)[tp_rank] for b in blocks], dim=dim)


def unshard(shards: list, dim, stride: int = 1) -> torch.Tensor:
    """The full value from every TP rank's slice, in TP-rank order."""
    if dim is None or len(shards) == 1:
        return shards[0]
    per_rank = [s.chunk(stride, dim=dim) for s in shards]
    return torch.cat([torch.cat([r[k] for r in per_rank], dim=dim) for k in range(stride)], dim=dim)
