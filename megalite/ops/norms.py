"""LayerNorm and RMSNorm: functional faces, autograd Functions and nn.Modules.

Each kernel (CUDA, C++, reference) sees a contiguous 2-D view [rows, hidden] of the input in
its own dtype (fp32, bf16 or fp16), an fp32 weight/bias (or None), and computes in fp32. The
per-row statistics (mean and rstd, fp32) are saved for the backward instead of being
recomputed. Weight and bias are cast to fp32 here (they are only `hidden` elements) so the
kernels need not be compiled for every weight-dtype/input-dtype pair; their grads are cast
back to the parameter's dtype.

On the CPU the whole op is one C++ autograd node instead (`megalite._C.layer_norm` /
`rms_norm`, csrc/norms.cpp): the same kernels, the parameters taken in their own dtype, and no
Python around them (the autograd Functions below remain the path of CUDA, of the reference and
of functorch transforms). At a small model's sizes ([512, 256] fp32) the Python Function's own
cost per call (its forward and backward, dispatch, the casts and reshapes of weight, bias and
dy: ~100 us) was larger than the kernels' (~45 us) and made megalite's LayerNorm fwd+bwd 1.5x
slower than torch's; see tools/bench/kernels.py (cases layer_norm 512x256 and the like).
"""

import torch
import torch.nn as nn

from megalite.ops import reference
from megalite.ops.dispatch import _C, choose, forced_reference

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_functorch_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: False)


# (op, device) -> compiled module or None, fixed once the extensions load. Per device, not per
# device type: GPUs of different capabilities may get different paths (dispatch.cuda_code_for).
_MODULES = {}
_UNSET = object()
# megalite._C's C++ autograd nodes (absent from an extension built before they existed).
_CPP_NODES = _C is not None and hasattr(_C, "layer_norm") and hasattr(_C, "rms_norm")


def _impl(op, x):
    """The compiled module for x's device, or the reference (also for dtypes such as fp64 that
    no kernel is compiled for)."""
    if x.dtype not in _DTYPES or forced_reference():
        return reference
    key = (op, x.device)
    module = _MODULES.get(key, _UNSET)
    if module is _UNSET:
        module = _MODULES[key] = choose(op, x.device)[1]
    return reference if module is None else module


def _cpu_param(p):
    return p is None or (p.is_cpu and p.dtype in _DTYPES)


def _cpp_node(x, weight, bias=None):
    """Whether the op runs as megalite._C's C++ autograd node: CPU tensors in the kernels' dtypes
    (the parameters too, in any of them), no MEGALITE_KERNELS=reference, no functorch transform
    (C++ autograd nodes do not support them). Kept cheap: it runs on every call."""
    return (
        _CPP_NODES
        and x.is_cpu
        and x.dtype in _DTYPES
        and _cpu_param(weight)
        and _cpu_param(bias)
        and not forced_reference()
        and not _functorch_active()
    )


def _param(t, x):
    """Weight/bias as the kernels take them: fp32 (fp64 for an fp64 input), contiguous, detached."""
    return None if t is None else t.detach().to(reference._acc(x)).contiguous()


def _check(name, x, weight, bias=None):
    if x.dim() == 0:
        raise ValueError(f"{name}: input must have at least one dimension")
    n = x.shape[-1]
    if weight is not None and (weight.dim() != 1 or weight.shape[0] != n):
        _bad_shape(name, "weight", weight, n)
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != n):
        _bad_shape(name, "bias", bias, n)


def _bad_shape(name, what, t, n):
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
    if _cpp_node(x, weight, bias):
        return _C.layer_norm(x, weight, bias, float(eps))
    return _LayerNormFn.apply(x, weight, bias, eps)


def rms_norm(x, weight=None, eps=1e-5):
    """RMSNorm over the last dim of x: x / sqrt(mean(x^2) + eps) * weight."""
    _check("rms_norm", x, weight)
    if _cpp_node(x, weight):
        return _C.rms_norm(x, weight, float(eps))
    return _RMSNormFn.apply(x, weight, eps)


class FusedLayerNorm(nn.Module):
    """Drop-in for nn.LayerNorm(hidden_size) over the last dim; params 'weight' and 'bias'."""

    def __init__(self, hidden_size, eps=1e-5, bias=True, device=None, dtype=None):
        super().__init__()
        self.hidden_size = int(hidden_size)
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(self.hidden_size, device=device, dtype=dtype))
        self.bias = (
            nn.Parameter(torch.empty(self.hidden_size, device=device, dtype=dtype))
            if bias
            else None
        )
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
