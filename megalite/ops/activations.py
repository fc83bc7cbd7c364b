"""The MLP's activations: GeLU with the tanh approximation (GPT-2's) and SwiGLU (Llama's).

    y = ops.gelu_tanh(x)    # = F.gelu(x, approximate="tanh")
    y = ops.swiglu(h)       # = F.silu(gate) * up, with gate, up = h.chunk(2, dim=-1)

Both are differentiable. Which implementation runs (megalite/ops/dispatch.py):
  - CPU tensors in fp32, bf16 or fp16: the C++ kernels (csrc/activations.cpp), each op one C++
    autograd node (`megalite._C.gelu_tanh` / `swiglu`) so that no Python runs around the
    kernels. The forward saves only its input; the backward recomputes the tanh / sigmoid. fp32
    maths whatever the dtype, one rounding per output. About 2x torch's own ops fwd+bwd on the
    CPU (tools/bench/kernels.py, cases gelu_tanh_* and swiglu_*).
  - CUDA tensors: torch's own F.gelu / F.silu * up (dispatch's TORCH_ON_CUDA: megalite has no
    CUDA kernel for them).
  - MEGALITE_KERNELS=reference, other dtypes (fp64: gradcheck), other devices, functorch
    transforms: the pure-PyTorch expressions (megalite.ops.reference), differentiated by torch.
The autograd Function below takes any module with the kernels' forward/backward pair
(`gelu_tanh_fwd(x)`, `gelu_tanh_bwd(dy, x)`, `swiglu_fwd(h)`, `swiglu_bwd(dy, h)`); the C++ nodes
are the same computation without the Python Function around it.

Results match torch's within fp32 rounding (rtol 1e-5, atol 1e-6; same expressions, the
kernels' own exp is within an ulp of torch's), including torch's saturation (GeLU gives exactly
x or -0 where torch's tanh(u) is +-1) and its inf/nan results.
"""

import torch

from megalite.ops import reference
from megalite.ops.dispatch import _C, choose, forced_reference

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_functorch_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: False)
# megalite._C's C++ autograd nodes (absent from an extension built before they existed).
_CPP_NODES = _C is not None and hasattr(_C, "gelu_tanh") and hasattr(_C, "swiglu")


def _cpp_node(x):
    """CPU tensor in a kernel dtype, no MEGALITE_KERNELS=reference, no functorch transform (C++
    autograd nodes do not support them). Kept cheap: it runs on every call."""
    return (
        _CPP_NODES
        and x.is_cpu
        and x.dtype in _DTYPES
        and not forced_reference()
        and not _functorch_active()
    )


def _module(op, x):
    """The compiled module with op's forward/backward for x's device, or None (the reference:
    MEGALITE_KERNELS=reference, torch's own op on CUDA, an unsupported dtype or device)."""
    if x.dtype not in _DTYPES or _functorch_active():
        return None
    return choose(op, x.device)[1]


class _SavedInputFn(torch.autograd.Function):
    """An elementwise op whose backward needs only its input: fwd(x), bwd(dy, x)."""

    @staticmethod
    def forward(ctx, x, fwd, bwd):
        x = x.contiguous()
        ctx.save_for_backward(x)
        ctx.bwd = bwd
        return fwd(x)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        return ctx.bwd(dy.to(x.dtype).contiguous(), x), None, None


def gelu_tanh(x):
    """GeLU with the tanh approximation, 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), like
    F.gelu(x, approximate="tanh"). Output in x's dtype and shape."""
    if _cpp_node(x):
        return _C.gelu_tanh(x)
    module = _module("gelu_tanh", x)
    if module is None:
        return reference.gelu_tanh(x)
    return _SavedInputFn.apply(x, module.gelu_tanh_fwd, module.gelu_tanh_bwd)


def swiglu(h):
    """silu(gate) * up, where gate, up = h.chunk(2, dim=-1): h [..., 2n] -> [..., n] (the fused
    gate/up projection of a Llama MLP). Output in h's dtype."""
    if h.dim() == 0 or h.shape[-1] % 2:
        raise ValueError(
            f"swiglu: the last dim of h must be even ([gate | up]), got shape {tuple(h.shape)}"
        )
    if _cpp_node(h):
        return _C.swiglu(h)
    module = _module("swiglu", h)
    if module is None:
        return reference.swiglu(h)
    return _SavedInputFn.apply(h, module.swiglu_fwd, module.swiglu_bwd)
