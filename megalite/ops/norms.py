"""LayerNorm and RMSNorm: functional faces, autograd Functions and nn.Modules.

Each kernel (CUDA, C++, reference) sees a contiguous 2-D view [rows, hidden] of the input in
its own dtype (fp32, bf16 or fp16), an fp32 weight/bias (or None), and computes in fp32. The
per-row statistics (mean and rstd, fp32) are saved for the backward instead of being
recomputed. Weight and bias are cast to fp32 here (they are only `hidden` elements) so the
kernels need not be compiled for every weight-dtype/input-dtype pair; their grads are cast
back to the parameter's dtype.
"""

import torch
import torch.nn as nn

from megalite.ops import reference
from megalite.ops.dispatch import choose

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _impl(op, x):
    """The compiled module for x's device, or the reference (also for dtypes such as fp64 that
    no kernel is compiled for)."""
    _, module, _ = choose(op, x.device)
    if x.dtype not in _DTYPES or module is None:
        return reference
    return module


def _param(t, x):
    """Weight/bias as the kernels take them: fp32 (fp64 for an fp64 input), contiguous, detached."""
    return None if t is None else t.detach().to(reference._acc(x)).contiguous()


def _check(name, x, weight, bias=None):
    if x.dim() == 0:
        raise ValueError(f"{name}: input must have at least one dimension")
    n = x.shape[-1]
    for what, t in (("weight", weight), ("bias", bias)):
        if t is not None and (t.dim() != 1 or t.shape[0] != n):
            raise ValueError(f"{name}: {what} has shape {tuple(t.shape)} but the input's last dim is {n}")


class _LayerNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        impl = _impl("layer_norm", x)
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        w32, b32 = _param(weight, x), _param(bias, x)
        y, mean, rstd = impl.layer_norm_fwd(x2, w32, b32, float(eps))
        ctx.save_for_backward(x2, w32, mean, rstd)
        ctx.has_bias = bias is not None
        ctx.shape = x.shape
        ctx.w_dtype = None if weight is None else weight.dtype
        ctx.b_dtype = None if bias is None else bias.dtype
        return y.reshape(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, w32, mean, rstd = ctx.saved_tensors
        impl = _impl("layer_norm", x2)
        dy2 = dy.reshape(x2.shape).to(x2.dtype).contiguous()
        dx, dw, db = impl.layer_norm_bwd(dy2, x2, mean, rstd, w32, ctx.has_bias)
        dw = None if dw is None else dw.to(ctx.w_dtype)
        db = None if db is None else db.to(ctx.b_dtype)
        return dx.reshape(ctx.shape), dw, db, None


class _RMSNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        impl = _impl("rms_norm", x)
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        w32 = _param(weight, x)
        y, rstd = impl.rms_norm_fwd(x2, w32, float(eps))
        ctx.save_for_backward(x2, w32, rstd)
        ctx.shape = x.shape
        ctx.w_dtype = None if weight is None else weight.dtype
        return y.reshape(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, w32, rstd = ctx.saved_tensors
        impl = _impl("rms_norm", x2)
        dy2 = dy.reshape(x2.shape).to(x2.dtype).contiguous()
        dx, dw = impl.rms_norm_bwd(dy2, x2, rstd, w32)
        dw = None if dw is None else dw.to(ctx.w_dtype)
        return dx.reshape(ctx.shape), dw, None


def layer_norm(x, weight=None, bias=None, eps=1e-5):
    """LayerNorm over the last dim of x (fp32/bf16/fp16), fp32 statistics; weight/bias may be
    None. Output has x's dtype. Differentiable in x, weight and bias."""
    _check("layer_norm", x, weight, bias)
    return _LayerNormFn.apply(x, weight, bias, eps)


def rms_norm(x, weight=None, eps=1e-5):
    """RMSNorm over the last dim of x: x / sqrt(mean(x^2) + eps) * weight."""
    _check("rms_norm", x, weight)
    return _RMSNormFn.apply(x, weight, eps)


class FusedLayerNorm(nn.Module):
    """Drop-in for nn.LayerNorm(hidden_size) over the last dim; params 'weight' and 'bias'."""

    def __init__(self, hidden_size, eps=1e-5, bias=True, device=None, dtype=None):
        super().__init__()
        self.hidden_size = int(hidden_size)
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(self.hidden_size, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(self.hidden_size, device=device, dtype=dtype)) if bias else None
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x):
        return layer_norm(x, self.weight, self.bias, self.eps)

    def extra_repr(self):
        return f"{self.hidden_size}, eps={self.eps}, bias={self.bias is not None}"


class FusedRMSNorm(nn.Module):
    """RMSNorm over the last dim; param 'weight' (initialised to ones)."""

    def __init__(self, hidden_size, eps=1e-5, device=None, dtype=None):
        super().__init__()
        self.hidden_size = int(hidden_size)
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(self.hidden_size, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.ones_(self.weight)

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)

    def extra_repr(self):
        return f"{self.hidden_size}, eps={self.eps}"
