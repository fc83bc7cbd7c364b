"""Tensor-parallel "regions": autograd functions named after the communication they do.

Activations are [seq, batch, hidden]. Each function is the identity when the tensor-parallel
group has one rank, so the single-process model pays nothing for them.

    copy_to_tp            fwd: identity                   bwd: all-reduce
    reduce_from_tp        fwd: all-reduce                 bwd: identity
    scatter_to_tp         fwd: keep my last-dim slice     bwd: all-gather last dim
    gather_from_tp        fwd: all-gather last dim        bwd: keep my slice
    scatter_to_sp         fwd: keep my seq (dim 0) slice  bwd: all-gather dim 0
    gather_from_sp        fwd: all-gather dim 0           bwd: reduce-scatter dim 0
    reduce_scatter_to_sp  fwd: reduce-scatter dim 0       bwd: all-gather dim 0
    copy_to_tp_replicas   fwd: identity                   bwd: sum over the `r` consecutive
                          TP ranks holding the same block (GQA key/value heads replicated
                          when TP > query groups)

Collectives never write into a tensor autograd may still hold (an input, a saved tensor, an
incoming grad that a residual branch shares): they work on a fresh buffer.

Every collective of TP goes through `_timed`: the step timers' tp_comm region
(--timing-log-level, megalite/timers.py), or, for a benchmark, `comm_timer`; with neither
on it costs two branches.
"""

import contextlib
import time

import torch
import torch.distributed as dist

from megalite import timers
from megalite.parallel import state

# Older torch names them *_tensor; 2.13 prefers *_single. Both exist on gloo and NCCL here.
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class CommTimer:
    """Wall time and count of TP collectives while `enabled` (benchmarks only). With
    `synchronize` (CUDA) the device is drained before and after each one, so the time is the
    collective's own rather than its launch's: that serialises the step, so only benchmarks
    turn it on."""

    def __init__(self):
        self.enabled, self.synchronize, self.seconds, self.calls = False, False, 0.0, 0

    def reset(self):
        self.seconds, self.calls = 0.0, 0


comm_timer = CommTimer()


def _timed():
    """The context around one TP collective."""
    if comm_timer.enabled:
        return _bench_timed()
    return timers.timed("tp_comm")


@contextlib.contextmanager
def _bench_timed():
    if comm_timer.synchronize:
        torch.cuda.synchronize()
    tic = time.perf_counter()
    try:
        yield
    finally:
        if comm_timer.synchronize:
            torch.cuda.synchronize()
        comm_timer.seconds += time.perf_counter() - tic
        comm_timer.calls += 1


def _group():
    return state.get().tp_group


def _tp():
    return state.get().tp


def all_reduce(x, op=dist.ReduceOp.SUM):
    """In-place all-reduce over TP of a tensor the caller owns (cross entropy's statistics)."""
    if _tp() > 1:
        with _timed():
            dist.all_reduce(x, op=op, group=_group())
    return x


def _all_reduce(x):
    if _tp() == 1:
        return x
    x = x.clone(memory_format=torch.contiguous_format)  # never reduce a caller's buffer
    with _timed():
        dist.all_reduce(x, group=_group())
    return x


def _split(x, dim):
    tp = _tp()
    if tp == 1:
        return x
    return x.chunk(tp, dim=dim)[state.get().tp_rank].contiguous()


def _all_gather(x, dim):
    tp = _tp()
    if tp == 1:
        return x
    x = x.contiguous()
    out = torch.empty((tp * x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    with _timed():
        _all_gather_into(out, x, group=_group())  # [tp*s, ...] rank-major
    if dim in (0, -x.dim()):
        return out
    # rank-major blocks along dim 0 -> concatenated along `dim`
    return torch.cat(out.chunk(tp, dim=0), dim=dim)


def _reduce_scatter_dim0(x):
    tp = _tp()
    if tp == 1:
        return x
    if x.shape[0] % tp:
        raise ValueError(
            f"sequence length {x.shape[0]} is not divisible by tensor-parallel "
            f"size {tp} (sequence parallelism splits it)"
        )
    x = x.contiguous()
    out = torch.empty((x.shape[0] // tp,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    with _timed():
        _reduce_scatter(out, x, group=_group())
    return out


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x

    @staticmethod
    def backward(ctx, g):
        return _all_reduce(g)


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _all_reduce(x)

    @staticmethod
    def backward(ctx, g):
        return g


class _ScatterToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _split(x, -1)

    @staticmethod
    def backward(ctx, g):
        return _all_gather(g, -1)


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _all_gather(x, -1)

    @staticmethod
    def backward(ctx, g):
        return _split(g, -1)


class _ScatterToSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _split(x, 0)

    @staticmethod
    def backward(ctx, g):
        return _all_gather(g, 0)


class _GatherFromSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _all_gather(x, 0)

    @staticmethod
    def backward(ctx, g):
        return _reduce_scatter_dim0(g)


class _ReduceScatterToSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _reduce_scatter_dim0(x)

    @staticmethod
    def backward(ctx, g):
        return _all_gather(g, 0)


class _CopyToTPReplicas(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, replicas):
        ctx.replicas = replicas
        return x

    @staticmethod
    def backward(ctx, g):
        # Gather every rank's partial grad, then sum my replica set's in rank order: the same
        # additions in the same order on every replica, so the copies stay bitwise equal.
        r = ctx.replicas
        parts = _all_gather(g.unsqueeze(0), 0)  # [tp, *g.shape]
        first = state.get().tp_rank // r * r
        total = parts[first].clone()
        for k in range(first + 1, first + r):
            total += parts[k]
        return total, None


def copy_to_tp(x):
    return _CopyToTP.apply(x) if _tp() > 1 else x


def reduce_from_tp(x):
    return _ReduceFromTP.apply(x) if _tp() > 1 else x


def scatter_to_tp(x):
    return _ScatterToTP.apply(x) if _tp() > 1 else x


def gather_from_tp(x):
    return _GatherFromTP.apply(x) if _tp() > 1 else x


def scatter_to_sp(x):
    return _ScatterToSP.apply(x) if _tp() > 1 else x


def gather_from_sp(x):
    return _GatherFromSP.apply(x) if _tp() > 1 else x


def reduce_scatter_to_sp(x):
    return _ReduceScatterToSP.apply(x) if _tp() > 1 else x


def copy_to_tp_replicas(x, replicas: int):
    return _CopyToTPReplicas.apply(x, replicas) if _tp() > 1 and replicas > 1 else x
