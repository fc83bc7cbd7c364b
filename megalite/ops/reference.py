"""Pure-PyTorch references of every megalite kernel.

Each function here is both the test oracle of the compiled kernels (csrc/, csrc/cuda/) and the
fallback when they are not built. They favour being obviously right over being fast: statistics
in fp32 whatever the input dtype, the textbook formulas, no in-place tricks beyond what the
functional API promises.
"""

import math

import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------
# LayerNorm / RMSNorm over the last dimension. Forward returns the output plus the per-row
# statistics (fp32, or fp64 for fp64 input) the backward needs; backward returns
# (dx, dweight, dbias).


def _acc(t):
    """Accumulation dtype: fp32 for fp32/bf16/fp16, fp64 for fp64."""
    return torch.promote_types(t.dtype, torch.float32)


def layer_norm_fwd(x, weight, bias, eps):
    n = x.shape[-1]
    xf = x.reshape(-1, n).to(_acc(x))
    mean = xf.mean(dim=1)
    var = (xf - mean[:, None]).square().mean(dim=1)  # biased, like torch's layer_norm
    rstd = torch.rsqrt(var + eps)
    y = (xf - mean[:, None]) * rstd[:, None]
    if weight is not None:
        y = y * weight.to(xf.dtype)
    if bias is not None:
        y = y + bias.to(xf.dtype)
    return y.to(x.dtype).reshape(x.shape), mean, rstd


def layer_norm_bwd(dy, x, mean, rstd, weight, need_bias_grad=True):
    n = x.shape[-1]
    xf = x.reshape(-1, n).to(_acc(x))
    dyf = dy.reshape(-1, n).to(xf.dtype)
    xhat = (xf - mean[:, None]) * rstd[:, None]
    g = dyf * weight.to(xf.dtype) if weight is not None else dyf
    # d/dx of (x - mean) * rstd, contracted with g: the two mean terms come from mean and var.
    dx = rstd[:, None] * (
        g - g.mean(dim=1, keepdim=True) - xhat * (g * xhat).mean(dim=1, keepdim=True)
    )
    dw = (dyf * xhat).sum(dim=0).to(weight.dtype) if weight is not None else None
    db = None
    if need_bias_grad:
        db = dyf.sum(dim=0).to(weight.dtype if weight is not None else x.dtype)
    return dx.to(x.dtype).reshape(x.shape), dw, db


def rms_norm_fwd(x, weight, eps):
    n = x.shape[-1]
    xf = x.reshape(-1, n).to(_acc(x))
    rstd = torch.rsqrt(xf.square().mean(dim=1) + eps)
    y = xf * rstd[:, None]
    if weight is not None:
        y = y * weight.to(xf.dtype)
    return y.to(x.dtype).reshape(x.shape), rstd


def rms_norm_bwd(dy, x, rstd, weight):
    n = x.shape[-1]
    xf = x.reshape(-1, n).to(_acc(x))
    dyf = dy.reshape(-1, n).to(xf.dtype)
    xhat = xf * rstd[:, None]
    g = dyf * weight.to(xf.dtype) if weight is not None else dyf
    dx = rstd[:, None] * (g - xhat * (g * xhat).mean(dim=1, keepdim=True))
    dw = (dyf * xhat).sum(dim=0).to(weight.dtype) if weight is not None else None
    return dx.to(x.dtype).reshape(x.shape), dw


# ----------------------------------------------------------------------------------------------
# MLP activations. gelu_tanh / swiglu are the expressions themselves (differentiable by torch's
# autograd: the fallback, and what MEGALITE_KERNELS=reference runs); the _fwd/_bwd pairs are the
# kernels' interface, computed in fp32 (fp64 for fp64 input) and rounded once to the input's dtype.


def gelu_tanh(x):
    """GeLU with the tanh approximation (GPT-2's)."""
    return F.gelu(x, approximate="tanh")


def swiglu(h):
    """silu(gate) * up with h = [gate | up] along the last dim (Llama's MLP)."""
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


def gelu_tanh_fwd(x):
    return F.gelu(x.to(_acc(x)), approximate="tanh").to(x.dtype)


def gelu_tanh_bwd(dy, x):
    xf = x.to(_acc(x))
    return torch.ops.aten.gelu_backward(dy.to(xf.dtype), xf, approximate="tanh").to(x.dtype)


def swiglu_fwd(h):
    gate, up = h.to(_acc(h)).chunk(2, dim=-1)
    return (F.silu(gate) * up).to(h.dtype)


def swiglu_bwd(dy, h):
    gate, up = h.to(_acc(h)).chunk(2, dim=-1)
    dyf = dy.to(gate.dtype)
    s = torch.sigmoid(gate)
    dgate = dyf * up * s * (1 + gate * (1 - s))  # d silu(g)/dg = s (1 + g (1 - s))
    dup = dyf * F.silu(gate)
    return torch.cat([dgate, dup], dim=-1).to(h.dtype)


# ----------------------------------------------------------------------------------------------
# AdamW (decoupled weight decay, bias correction), torch.optim.AdamW's arithmetic.


def sum_of_squares(tensors):
    """sum(x * x) over every element of every tensor, as a 0-dim fp32 tensor (inf/nan propagate)."""
    tensors = [t for t in tensors if t.numel()]
    if not tensors:
        return torch.zeros(())
    norms = torch._foreach_norm([t.float() if t.dtype != torch.float32 else t for t in tensors])
    return torch.stack(norms).square().sum()


def any_non_finite(tensors):
    """True if any tensor holds an inf or a nan."""
    for t in tensors:
        if t.numel() and not torch.isfinite(t).all():
            return True
    return False


@torch.no_grad()
def multi_tensor_adamw_(
    params,
    grads,
    exp_avgs,
    exp_avg_sqs,
    *,
    lr,
    beta1,
    beta2,
    eps,
    weight_decay,
    step,
    grad_scale=1.0,
    model_copies=None,
    check_finite=True,
    found_inf=None,
):
    """One AdamW step over lists of tensors, in place, with per-tensor hyperparameters (lists, one
    entry per tensor), so that several param groups step in one call and one inf check covers
    all of them; megalite.ops.multi_tensor_adamw_'s reference. Returns True (and touches
    nothing) if any grad holds an inf or nan (check_finite=False: not checked, the caller
    vouches, and the result is False). params/exp_avgs/exp_avg_sqs are fp32; grads fp32, bf16
    or fp16 and multiplied by 1/grad_scale (a float, or a 1-element fp32 tensor on the params'
    device); model_copies (optional) receive the updated params in their own (low-precision)
    dtype; an entry may be None (no copy for that param). found_inf (optional 1-element
    tensor): nonzero skips the whole update, decided on the device. step: a list, or one
    1-element fp32 tensor on the params' device, every tensor's step, read there.

    Over ~60 lines: a quarter is the signature; the reference spells out, in one loop, every
    case the compiled kernels take (step and scale tensors, found_inf, model copies), so
    their tests compare against one readable function."""
    if check_finite and (any_non_finite(grads) or (found_inf is not None and bool(found_inf))):
        return True
    if isinstance(grad_scale, torch.Tensor):  # 0-dim: it must not promote the grads' dtype
        inv_scale = torch.reciprocal(grad_scale.reshape(()).float())
    else:
        inv_scale = None if grad_scale == 1.0 else 1.0 / grad_scale
    # A device flag skips by selecting the old values: no host read.
    skip = None if found_inf is None else found_inf.reshape(()).ne(0)
    # A step tensor (one step for every tensor, on the params' device): the bias corrections
    # derived from it there, in double as from a float step, then rounded to fp32 as the
    # float's are where they meet the fp32 tensors.
    step64 = step.reshape(()).double() if isinstance(step, torch.Tensor) else None

    def store(dst, new):
        dst.copy_(new if skip is None else torch.where(skip, dst, new.to(dst.dtype)))

    for i, (p, g, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
        if step64 is None:
            step_size = lr[i] / (1.0 - beta1[i] ** step[i])
            bc2_sqrt = math.sqrt(1.0 - beta2[i] ** step[i])
        else:
            step_size = (lr[i] / (1.0 - beta1[i] ** step64)).float()
            bc2_sqrt = (1.0 - beta2[i] ** step64).sqrt().float()
        g = g.to(m.dtype)
        if inv_scale is not None:
            g = g * inv_scale
        p_new = p * (1.0 - lr[i] * weight_decay[i])
        m_new = torch.lerp(m, g, 1.0 - beta1[i])
        v_new = (v * beta2[i]).addcmul_(g, g, value=1.0 - beta2[i])
        denom = (v_new.sqrt() / bc2_sqrt).add_(eps[i])
        p_new.sub_(step_size * m_new / denom)  # addcdiv_(m, denom, value=-step_size), bitwise
        store(p, p_new)
        store(m, m_new)
        store(v, v_new)
        if model_copies is not None and model_copies[i] is not None:
            store(model_copies[i], p_new)
    return False


# ----------------------------------------------------------------------------------------------
# Gradient bucketing.


def _check_flat(tensors, buffer, what):
    total = sum(t.numel() for t in tensors)
    if buffer.dim() != 1 or not buffer.is_contiguous():
        raise ValueError(f"{what}: buffer must be a contiguous 1-D tensor")
    if total > buffer.numel():
        raise ValueError(
            f"{what}: tensors hold {total} elements but the buffer only {buffer.numel()}"
        )
    for t in tensors:
        if t.dtype != buffer.dtype:
            raise ValueError(
                f"{what}: tensor dtype {t.dtype} differs from buffer dtype {buffer.dtype}"
            )
        if t.device != buffer.device:
            raise ValueError(f"{what}: tensor on {t.device} but buffer on {buffer.device}")


@torch.no_grad()
def flatten_into(tensors, buffer):
    """Copy tensors back to back into the flat buffer (in the order given)."""
    _check_flat(tensors, buffer, "flatten_into")
    offset = 0
    for t in tensors:
        n = t.numel()
        buffer[offset : offset + n].view(t.shape).copy_(t)
        offset += n


@torch.no_grad()
def unflatten_from(buffer, tensors):
    """Copy the flat buffer back out into tensors (the inverse of flatten_into)."""
    _check_flat(tensors, buffer, "unflatten_from")
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(buffer[offset : offset + n].view(t.shape))
        offset += n
