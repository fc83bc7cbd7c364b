"""Functional fused AdamW over lists of tensors (the distributed optimizer steps its shards
with it).

One call reads param, grad, exp_avg, exp_avg_sq and writes param, exp_avg, exp_avg_sq (and the
low-precision model copy when given), unscaling the grad by 1/grad_scale on the way. By default
(check_finite=True: these functions exist for loss-scaled steps, and their return value is the
answer) every grad is checked for inf/nan before any write: if one is found the call returns True
and NOTHING was updated, so a dynamic loss scaler can simply skip the step. That check is a read of
every grad before the update reads them again (32 bytes per fp32 param instead of 28, and on CUDA
a host synchronisation): a caller that has already established that the grads are finite, as the
trainer has through its global grad norm, passes check_finite=False and gets torch's single
sweep. (The optimizer class, megalite.optim.FusedAdamW, follows torch.optim.AdamW's contract
instead: it passes check_finite=True only for steps given a grad scale, or when asked.)

A step need not read anything back either: `grad_scale` may be a 1-element fp32 tensor on the
params' device (the trainer's loss scale / clip coefficient, computed there from the global grad
norm), `found_inf` a 1-element flag there (nonzero: update nothing; the trainer's is "the
norm is not finite") and `step` a 1-element fp32 tensor there (the trainer's count of steps
taken, plus one). The kernels read them where they run: the CUDA one from device memory
inside the update (the bias corrections in double there, as the host derives them), the CPU
one from host memory (a CPU tensor is host memory: no sync).

The compiled kernels take fp32 params and moments, contiguous tensors, grads in fp32/bf16/fp16
and model copies in bf16/fp16/fp32; anything else (for example bf16 params without fp32 master
weights) runs the reference, which handles any floating dtype.
"""

import torch

from megalite.ops import reference
from megalite.ops.dispatch import choose

_GRAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _compiled_ok(params, grads, exp_avgs, exp_avg_sqs, model_copies):
    device = params[0].device
    for i, (p, g, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
        copy = None if model_copies is None else model_copies[i]
        ts = (p, g, m, v) if copy is None else (p, g, m, v, copy)
        if any(t.device != device or not t.is_contiguous() for t in ts):
            return False
        if p.dtype != torch.float32 or m.dtype != torch.float32 or v.dtype != torch.float32:
            return False
        if g.dtype not in _GRAD_DTYPES:
            return False
        if copy is not None and copy.dtype not in _GRAD_DTYPES:
            return False
    return True


def _validate(params, grads, exp_avgs, exp_avg_sqs, model_copies, hyper):
    n = len(params)
    lists = {"grads": grads, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs}
    if model_copies is not None:
        lists["model_copies"] = model_copies
    for name, lst in lists.items():
        if len(lst) != n:
            raise ValueError(f"fused_adamw_: {n} params but {len(lst)} {name}")
    for name, lst in hyper.items():
        if len(lst) != n:
            raise ValueError(f"fused_adamw_: {n} params but {len(lst)} values of {name}")
    for i in range(n):
        for name, lst in lists.items():
            if lst[i] is not None and lst[i].numel() != params[i].numel():
                raise ValueError(
                    f"fused_adamw_: param {i} has {params[i].numel()} elements "
                    f"but its {name[:-1]} has {lst[i].numel()}"
                )


def _device_scalar(t, name, device, dtypes):
    """A 1-element tensor argument on the params' device, checked without reading it."""
    if t.numel() != 1 or t.device != device or t.dtype not in dtypes:
        names = "/".join(str(d).removeprefix("torch.") for d in dtypes)
        raise ValueError(
            f"fused_adamw_: {name} must be a float or a 1-element {names} tensor on {device}, "
            f"got {t.dtype} {tuple(t.shape)} on {t.device}"
        )


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
    """AdamW with one hyperparameter value per tensor (lists); see fused_adamw_. step may
    also be one 1-element fp32 tensor on the params' device, every tensor's step.

    Over ~60 lines: a third is the signature; the rest are the argument checks every backend
    relies on (made once here, none reading a device value back) and the dispatch."""
    step_tensor = step if isinstance(step, torch.Tensor) else None
    hyper = {
        "lr": lr,
        "beta1": beta1,
        "beta2": beta2,
        "eps": eps,
        "weight_decay": weight_decay,
    }
    if step_tensor is None:
        hyper["step"] = step
    _validate(params, grads, exp_avgs, exp_avg_sqs, model_copies, hyper)
    if not params:
        return False
    device = params[0].device
    if step_tensor is not None:  # its value is not checked either (>= 1: the caller's)
        _device_scalar(step_tensor, "step", device, (torch.float32,))
    scale_tensor = grad_scale if isinstance(grad_scale, torch.Tensor) else None
    if scale_tensor is not None:  # its value is not checked: that would read it back
        _device_scalar(scale_tensor, "grad_scale", device, (torch.float32,))
    elif not (grad_scale > 0 and grad_scale != float("inf")):
        raise ValueError(f"fused_adamw_: grad_scale must be positive and finite, got {grad_scale}")
    if found_inf is not None:
        _device_scalar(found_inf, "found_inf", device, (torch.bool, torch.int32, torch.float32))
    _, module, _ = choose("fused_adamw", device)
    if module is not None and _compiled_ok(params, grads, exp_avgs, exp_avg_sqs, model_copies):
        hyper = {k: [float(x) for x in v] for k, v in hyper.items()}
        return bool(
            module.fused_adamw(
                params,
                grads,
                exp_avgs,
                exp_avg_sqs,
                [] if model_copies is None else list(model_copies),
                hyper["lr"],
                hyper["beta1"],
                hyper["beta2"],
                hyper["eps"],
                hyper["weight_decay"],
                [] if step_tensor is not None else hyper["step"],
                1.0 if scale_tensor is not None else 1.0 / float(grad_scale),
                bool(check_finite),
                grad_scale=None if scale_tensor is None else scale_tensor.reshape(1),
                # the kernels take an int32 flag: "nonzero" for any dtype, nan included
                found_inf=None if found_inf is None else found_inf.reshape(1).ne(0).int(),
                step_tensor=None if step_tensor is None else step_tensor.reshape(1),
            )
        )
    return reference.multi_tensor_adamw_(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        grad_scale=grad_scale,
        model_copies=model_copies,
        check_finite=check_finite,
        found_inf=found_inf,
        step=step,
        **{k: v for k, v in hyper.items() if k != "step"},
    )


def fused_adamw_(
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
    """One AdamW step (decoupled weight decay, bias correction; torch.optim.AdamW's arithmetic)
    over lists of tensors, in place. grads are multiplied by 1/grad_scale: a positive finite
    float, or a 1-element fp32 tensor on the params' device (read there, never by the host;
    its value is the caller's to vouch for). model_copies, if given, receive the updated params
    in their own dtype (bf16/fp16 model weights); an entry may be None (that param has no
    copy), so params with and without copies share one call.

    found_inf: an optional 1-element tensor (bool, int32 or fp32) on the params' device; if it
    is nonzero nothing at all is updated. It is read on the device, so a caller that computed
    it there (from a global grad norm) steps without a host synchronisation. step (the bias
    correction's, >= 1) likewise: a number, or a 1-element fp32 tensor on the params' device
    whose bias corrections are computed there (the trainer's count of the steps taken, which
    a skip on the device does not advance); its results equal the number's (bitwise on the
    CPU).

    Returns True if any grad holds an inf or nan (or found_inf is set); then nothing at all was
    updated. check_finite=False skips that check (one read of every grad, and on CUDA a host
    synchronisation) and returns False: only for callers that know the grads are finite, or
    that pass their own found_inf; an inf/nan then reaches the params, as with
    torch.optim.AdamW."""
    n = len(params)
    return multi_tensor_adamw_(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        lr=[lr] * n,
        beta1=[beta1] * n,
        beta2=[beta2] * n,
        eps=[eps] * n,
        weight_decay=[weight_decay] * n,
        step=step if isinstance(step, torch.Tensor) else [step] * n,
        grad_scale=grad_scale,
        model_copies=model_copies,
        check_finite=check_finite,
        found_inf=found_inf,
    )
