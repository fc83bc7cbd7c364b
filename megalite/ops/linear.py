"""linear(x, weight, bias): F.linear on the CPU's fastest GEMMs, with Megatron's
gradient-accumulation fusion.

    y = ops.linear(x, weight, bias)                          # y = x @ weight^T + bias
    y = ops.linear(x, weight, bias, fuse_wgrad_accumulation=True)

x is [..., in] (the model's [s, b, in] is flattened to a 2-D view [s*b, in], no copy when x is
contiguous), weight [out, in], bias [out] or None.

Which GEMM (the one place this is decided). On the CPU, for fp32, the forward and the input
grad run oneDNN (`torch.ops.mkldnn._linear_pointwise`, the op Inductor uses for CPU linears)
instead of F.linear's BLAS call: torch sends fp32 GEMMs to MKL's sgemm, which on AMD CPUs does
not take its best code path, and oneDNN's JIT GEMM is faster for a GPT step's shapes. Measured
on a 2-core Zen 4 (2 threads, x [512..2048, 256..4096] by weight [256..4096, 256..4096]):
forward 1.10-1.30x, input grad 1.07-1.23x; a whole fwd+bwd 1.07-1.14x at GPT-2 small's
shapes (x [2048, 768] by [3072, 768], and back), 1.00-1.07x at x [512, 256 or 1024]
(tools/bench/kernels.py, the linear cases), where the fixed cost of the autograd Function and
of oneDNN's call (about 0.15 ms per fwd+bwd) eats part of the gain. The weight grad dy^T @ x
stays a plain `mm` (MKL): oneDNN with both operands transposed ranged from 0.93x to 1.14x of
it (no consistent gain; with copied, contiguous transposes 0.83-1.03x), and the fused variant
below needs BLAS's in-place `C = beta C + alpha A B`, which oneDNN's op does not offer. bf16
stays F.linear: torch already runs bf16 GEMMs through oneDNN, and our oneDNN path measured
0.93-0.99x of it (the autograd Function's overhead, no faster GEMM).
Everything else runs exactly F.linear (so autograd's own backward): tensors on other devices
(CUDA's cuBLAS is already what runs), other dtypes, autocast, torch.compile, a missing
oneDNN, and `MEGALITE_KERNELS=reference` (read at call time).

Gradient-accumulation fusion (Megatron's --gradient-accumulation-fusion). With
fuse_wgrad_accumulation=True and a weight that has a callable `weight.accumulate_main_grad`
(the data-parallel grad buffers set it, megalite/parallel/ddp.py), the backward does not
materialise the weight grad. It calls

    weight.accumulate_main_grad(wgrad_into)

once, synchronously, and `wgrad_into(out, beta, alpha)` computes in place

    out = beta * out + alpha * (dy^T @ x)         (one GEMM: torch.addmm(..., out=out))

with `out` the weight's fp32 main grad (shaped like the weight, contiguous), beta 0.0 for the
first micro-batch of a step (out's old contents are then never read: even a nan in it does
not leak) and 1.0 after, alpha typically 1/DP. The weight's grad then returned to autograd is
a placeholder, `torch.empty_like(weight)`: uninitialised memory that must never be read. It is
only there so that AccumulateGrad runs and fires the post-accumulate-grad hook (the bucket's
readiness for the overlapped all-reduce); the hook knows, because accumulate_main_grad was
called for this grad, that the grad is already in main_grad, and drops param.grad.

The fusion happens only when x and dy are fp32 (main_grad's dtype); for a bf16/fp16 model the
weight grad is computed normally and returned, and the hook accumulates it as before. Autograd
sums all the grads a tensor receives in one backward before AccumulateGrad runs, so every use
of a weight within one backward must be fused, or none: a tied embedding that is also the LM
head (F.embedding's real grad + the head's placeholder) must be called with
fuse_wgrad_accumulation=False, or the embedding's grad would be dropped with the placeholder.
(Two fused uses are fine: each adds into main_grad, the summed placeholders are dropped.) The
reference path (MEGALITE_KERNELS=reference) never fuses.
"""

import torch
import torch.nn.functional as F

from megalite.ops.dispatch import forced_reference

try:
    _ONEDNN_OP = torch.ops.mkldnn._linear_pointwise
except (AttributeError, RuntimeError):  # torch without oneDNN's fused-linear op
    _ONEDNN_OP = None
# Measured faster than F.linear on the CPU (module docstring; bf16 is not: torch's bf16 GEMM
# already is oneDNN's).
_ONEDNN_DTYPES = (torch.float32,)


def onednn_available():
    return _ONEDNN_OP is not None and torch.backends.mkldnn.is_available()


def impl_report():
    """('onednn' | 'torch', reason) for CPU linears here (kernel_report's 'linear' row)."""
    if forced_reference():
        return "torch", "MEGALITE_KERNELS=reference: F.linear"
    if torch.cuda.is_available():
        return "torch", ""  # CUDA: F.linear is cuBLAS, the fast path
    if _ONEDNN_OP is None:
        return "torch", "torch has no mkldnn._linear_pointwise: F.linear"
    if not torch.backends.mkldnn.is_available():
        return "torch", "torch built without oneDNN: F.linear"
    return "onednn", ""


def _compiling():
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # pragma: no cover - older torch
        return False


def _autocast(device_type):
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # pragma: no cover - older torch: no device argument
        return device_type == "cpu" and torch.is_autocast_cpu_enabled()


def _use_onednn(x, weight, bias):
    if not onednn_available() or forced_reference() or _compiling():
        return False
    if x.device.type != "cpu" or weight.device.type != "cpu" or x.dtype not in _ONEDNN_DTYPES:
        return False
    if weight.dtype != x.dtype or weight.dim() != 2 or not weight.is_contiguous():
        return False
    if bias is not None and (bias.dtype != x.dtype or bias.device.type != "cpu" or bias.dim() != 1):
        return False
    if x.dim() == 0 or x.shape[-1] != weight.shape[1] or x.numel() == 0:
        return False
    return not _autocast("cpu")


def _can_fuse(x, weight, fuse):
    """Fusion needs the accumulator and fp32 activations (main_grad's dtype)."""
    return (
        fuse
        and callable(getattr(weight, "accumulate_main_grad", None))
        and weight.requires_grad
        and x.dtype == weight.dtype == torch.float32
        and torch.is_grad_enabled()
        and not forced_reference()
    )


def _mm_input_grad(dy2d, weight, onednn):
    if onednn:  # dy @ w as oneDNN's linear with the weight's transposed view (no copy)
        return _ONEDNN_OP(dy2d, weight.t(), None, "none", [], "")
    return dy2d.mm(weight)


class _LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, onednn, fuse):
        out_features = weight.shape[0]
        x2d = x.reshape(-1, x.shape[-1])
        if onednn:
            if not x2d.is_contiguous():
                x2d = x2d.contiguous()
            y2d = _ONEDNN_OP(x2d, weight, bias, "none", [], "")
        else:
            y2d = F.linear(x2d, weight, bias)
        ctx.save_for_backward(x2d, weight)
        ctx.onednn = onednn
        # The param's accumulator, kept here: under activation recomputation the saved
        # weight comes back as another tensor object, without the attribute.
        ctx.accumulate = weight.accumulate_main_grad if fuse else None
        ctx.has_bias = bias is not None
        ctx.x_shape = x.shape
        return y2d.view(*x.shape[:-1], out_features)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x2d, weight = ctx.saved_tensors
        dy2d = dy.reshape(-1, dy.shape[-1])
        if not dy2d.is_contiguous():
            dy2d = dy2d.contiguous()
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dx = dw = db = None
        if need_x:
            dx = _mm_input_grad(dy2d, weight, ctx.onednn).view(ctx.x_shape)
        if need_w:
            if ctx.accumulate is not None and dy2d.dtype == x2d.dtype == torch.float32:

                def wgrad_into(out, beta, alpha):
                    # One GEMM into main_grad: out = beta * out + alpha * dy^T x. With beta 0
                    # BLAS does not read out (a nan there is overwritten, not propagated).
                    torch.addmm(out, dy2d.t(), x2d, beta=beta, alpha=alpha, out=out)

                ctx.accumulate(wgrad_into)
                dw = torch.empty_like(weight)  # placeholder: never read (module docstring)
            else:  # MKL whatever the forward used: oneDNN is not faster here (docstring)
                dw = dy2d.t().mm(x2d)
        if need_b and ctx.has_bias:
            db = dy2d.sum(0)
        return dx, dw, db, None, None


def linear(x, weight, bias=None, fuse_wgrad_accumulation=False):
    """y = x @ weight^T + bias, like F.linear; see the module docstring for the CPU fast path
    and the weight-grad accumulation fusion (fuse_wgrad_accumulation=True)."""
    onednn = _use_onednn(x, weight, bias)
    fuse = _can_fuse(x, weight, fuse_wgrad_accumulation)
    if not onednn and not fuse:
        return F.linear(x, weight, bias)
    return _LinearFn.apply(x, weight, bias, onednn, fuse)


def linear_onednn(x, weight, bias=None):
    """The oneDNN path whatever the dtype policy (CPU; fp32 or bf16): for benchmarks that
    re-check the choice on another machine, and tests."""
    return _LinearFn.apply(x, weight, bias, True, False)
