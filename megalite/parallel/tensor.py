"""Tensor-parallel "regions": autograd functions named after the communication they do.

Activations are [seq, batch, hidden]. Each function is the identity when the tensor-parallel
group has one rank, so the single-process model pays nothing for them.

    copy_to_tp            fwd: identity              bwd: all-reduce
    reduce_from_tp        fwd: all-reduce            bwd: identity
    scatter_to_tp         fwd: keep my last-dim slice  bwd: all-gather last dim
    gather_from_tp        fwd: all-gather last dim   bwd: keep my slice
    scatter_to_sp         fwd: keep my seq (dim 0) slice  bwd: all-gather dim 0
    gather_from_sp        fwd: all-gather dim 0      bwd: reduce-scatter dim 0
    reduce_scatter_to_sp  fwd: reduce-scatter dim 0  bwd: all-gather dim 0
"""

import torch
import torch.distributed as dist

from megalite.parallel import state


def _group():
    return state.get().tp_group


def _tp():
    return state.get().tp


def _all_reduce(x):
    if _tp() == 1:
        return x
    x = x.contiguous()
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
    parts = [torch.empty_like(x) for _ in range(tp)]
    dist.all_gather(parts, x, group=_group())
    return torch.cat(parts, dim=dim)


def _reduce_scatter_dim0(x):
    tp = _tp()
    if tp == 1:
        return x
    x = x.contiguous()
    out = torch.empty((x.shape[0] // tp,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    if x.device.type == "cpu":
        # gloo has no reduce_scatter: all-reduce, then keep my slice.
        dist.all_reduce(x, group=_group())
        out.copy_(x.chunk(tp, dim=0)[state.get().tp_rank])
    else:
        dist.reduce_scatter_tensor(out, x, group=_group())
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
        return _all_reduce(x.clone()) if _tp() > 1 else x

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
