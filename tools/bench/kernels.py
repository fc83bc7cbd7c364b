"""Benchmark megalite's kernels against what a PyTorch user would run instead, in one process.

    python tools/bench/kernels.py                 # full sizes (the issue's goals), table on stdout
    python tools/bench/kernels.py --quick         # small sizes, a smoke test (seconds)
    python tools/bench/kernels.py --json out.json # also write the results as JSON

Each case times megalite and its baseline alternately (baseline, ours, baseline, ours, ...), so
load from other processes hits both alike, and reports medians and the ratio
baseline_time / our_time (> 1: megalite is faster), plus the median of the per-pair ratios
("paired", steadier on a busy machine). CPU runs use --threads threads (default 2).

Cases and goals (2-core CPU, 2 threads):
  adamw_fp32      FusedAdamW().step() (default arguments: torch's contract, no inf/nan pass)
                  vs torch.optim.AdamW(fused=True).step(), 50M params in 50 tensors goal >= 0.95
                  (and, for information, FusedAdamW(check_finite=True) against torch without
                  and with GradScaler's check)
  adamw_mixed     fused_adamw_ (fp32 main+moments, fp32 grads, unscale + inf check, bf16 copy
                  written in the same call) vs torch's unscale/inf check + fused AdamW + copy to
                  bf16                                                              goal >= 1.5
                  (and "+ clip": the trainer's step, the global grad norm doubling as the inf
                  check, against torch with clip_grad_norm_ added)
  grad sum of sq. ops.sum_of_squares (the grad norm's pass) vs torch._foreach_norm: no goal
  layer_norm_*    ops.layer_norm fwd+bwd vs F.layer_norm, 8192x768 and 8192x2048: bf16 >= 1.5,
                  fp32 >= 1.0 (rms_norm_* vs F.rms_norm: no goal, for information); and at a
                  small model's sizes, 512x256, 2048x256, 512x1024, fp32 and bf16: >= 1.1
  gelu_tanh_*     ops.gelu_tanh fwd+bwd vs F.gelu(approximate="tanh"), 512x1024 and 2048x4096:
                  fp32 >= 2.0 (bf16: for information)
  swiglu_*        ops.swiglu fwd+bwd vs gate, up = h.chunk(2, -1); F.silu(gate) * up, h
                  512x2048 and 2048x8192: fp32 >= 2.0 (bf16: for information)
  adamw_* vs D2D  CUDA only: the AdamW step against a device copy of as many bytes  goal >= 0.85
  flatten         flatten_into + unflatten_from of 100 tensors (25M elements) vs one memcpy-
                  like copy of the same bytes each way (dst.copy_(src))            goal >= 0.8
  linear          ops.linear fwd+bwd vs F.linear, x [512, 256] w [1024, 256] (512x256->1024)
                  and x [512, 1024] w [256, 1024], fp32; "fused": ops.linear with the weight
                  grad GEMM accumulating into an fp32 main grad (beta 1) vs F.linear +
                  main_grad.add_(grad); "bf16 oneDNN": the oneDNN path ops.linear does not
                  take for bf16: no goal, for information

Large CPU buffers: glibc serves allocations above 32 MB with a fresh mmap, so every LayerNorm
call (and every training step) page-faults its outputs in, on both sides; on this VM that costs
more than the kernels (about 30 ms for the 134 MB of an fp32 8192x2048 fwd+bwd). By default the
script re-runs itself under the allocator settings launch/pretrain.sh gives training (glibc's
mmap off, so freed buffers are reused), for both sides alike; --system-malloc keeps glibc's
defaults.
"""

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import megalite.ops as ops  # noqa: E402
from megalite.ops.linear import linear_onednn  # noqa: E402
from megalite.optim.fused_adamw import FusedAdamW  # noqa: E402
from megalite.optim.grad_norm import clip_coefficient, global_grad_norm  # noqa: E402

MALLOC_TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, prepare=None):
    """Seconds one call of fn takes. On CUDA, between two events on the stream (the device's
    time from the call's first launch to its last kernel's end, host launch gaps included), not
    a host clock around synchronisations, whose latency would be counted too."""
    if prepare is not None:
        prepare()
    sync(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def compare(
    name,
    ours,
    baseline,
    device,
    repeats,
    prepare=None,
    bytes_moved=None,
    goal=None,
    note="",
    warmup=1,
):
    """Time ours and baseline alternately; medians and ratio baseline/ours."""
    for _ in range(warmup):  # first-touch of buffers, thread pool start, GPU clocks ramping up
        for fn in (baseline, ours):
            timed(fn, device, prepare)
    t_ours, t_base = [], []
    for _ in range(repeats):
        t_base.append(timed(baseline, device, prepare))
        t_ours.append(timed(ours, device, prepare))
    mo, mb = statistics.median(t_ours), statistics.median(t_base)
    # Also the median of the per-pair ratios: each pair ran back to back, under the same load.
    paired = statistics.median(b / o for b, o in zip(t_base, t_ours))
    row = {
        "case": name,
        "device": device.type,
        "ours_ms": mo * 1e3,
        "baseline_ms": mb * 1e3,
        "ratio": mb / mo,
        "ratio_paired": paired,
        "goal": goal,
        "note": note,
        "ours_GBps": bytes_moved / mo / 1e9 if bytes_moved else None,
        "ours_min_ms": min(t_ours) * 1e3,
        "baseline_min_ms": min(t_base) * 1e3,
    }
    row["meets_goal"] = None if goal is None else row["ratio"] >= goal
    return row


# ---- cases -------------------------------------------------------------------------------------


def bench_adamw_fp32(device, numel, tensors, repeats):
    per = numel // tensors
    gen = torch.Generator(device="cpu").manual_seed(0)
    init = [torch.randn(per, generator=gen) for _ in range(tensors)]
    grads = [torch.randn(per, generator=gen) * 1e-3 for _ in range(tensors)]

    def params():
        ps = [torch.nn.Parameter(t.to(device, copy=True)) for t in init]
        for p, g in zip(ps, grads):
            p.grad = g.to(device)
        return ps

    name = f"adamw_fp32 {numel / 1e6:g}M/{tensors}"
    goal = 0.95 if numel >= 50_000_000 else None
    default = FusedAdamW(params(), lr=1e-4, weight_decay=0.1)
    checking = FusedAdamW(params(), lr=1e-4, weight_decay=0.1, check_finite=True)
    torch_p = params()
    base = torch.optim.AdamW(torch_p, lr=1e-4, weight_decay=0.1, fused=True)
    # The goal's case: default arguments on both sides, the same contract (no inf/nan pass).
    rows = [
        compare(
            name,
            default.step,
            base.step,
            device,
            repeats,
            bytes_moved=28 * numel,
            goal=goal,
            note="FusedAdamW() vs AdamW(fused=True): neither checks for inf/nan",
        )
    ]
    # Checking every grad first (32 B/param), against the same torch.
    rows.append(
        compare(
            f"{name} ours checking",
            checking.step,
            base.step,
            device,
            repeats,
            bytes_moved=28 * numel,
            note="FusedAdamW(check_finite=True), torch does not check",
        )
    )
    # Like for like: torch with an inf/nan check too (GradScaler's, scale 1).
    found_inf = torch.zeros(1, device=device)
    one = torch.ones(1, device=device)
    torch_grads = [p.grad for p in torch_p]

    def checked():
        found_inf.zero_()
        torch._amp_foreach_non_finite_check_and_unscale_(torch_grads, found_inf, one)
        if found_inf.item() == 0:
            base.step()

    rows.append(
        compare(
            f"{name} both checking",
            checking.step,
            checked,
            device,
            repeats,
            bytes_moved=28 * numel,
            note="baseline: inf/nan check + AdamW(fused)",
        )
    )
    return rows


def bench_adamw_mixed(device, numel, tensors, repeats, scale=1024.0, clip=1.0):
    """The mixed-precision step: fp32 main params and moments, fp32 grads scaled by the loss
    scale, a bf16 model copy. Two cases: the goal's (unscale + inf check + AdamW + copy), and
    the step as the trainer runs it, with global-norm clipping (the norm is the inf check)."""
    per = numel // tensors
    gen = torch.Generator(device="cpu").manual_seed(0)
    init = [torch.randn(per, generator=gen) for _ in range(tensors)]
    grads0 = [(torch.randn(per, generator=gen) * 1e-3 * scale).to(device) for _ in range(tensors)]
    hyper = dict(lr=1e-4, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)

    def side():
        p = [torch.nn.Parameter(t.to(device, copy=True)) for t in init]
        g = [x.clone() for x in grads0]
        for pi, gi in zip(p, g):
            pi.grad = gi
        return p, g, [x.to(torch.bfloat16) for x in p]

    op, og, ocopy = side()
    om = [torch.zeros_like(x) for x in op]
    ov = [torch.zeros_like(x) for x in op]
    step = [0]

    def ours():  # one call: unscale, inf check, AdamW, bf16 copy
        step[0] += 1
        ops.fused_adamw_(
            op, og, om, ov, step=step[0], grad_scale=scale, model_copies=ocopy, **hyper
        )

    def ours_clipped():  # MixedPrecisionOptimizer.step: the norm, then one unchecked pass
        step[0] += 1
        norm = global_grad_norm(op, og).item() / scale
        if math.isfinite(norm):
            ops.fused_adamw_(
                op,
                og,
                om,
                ov,
                step=step[0],
                grad_scale=scale / clip_coefficient(norm, clip),
                model_copies=ocopy,
                check_finite=False,
                **hyper,
            )

    # torch: what GradScaler + AdamW(fused) + a bf16 model copy amounts to.
    tp, tg, tcopy = side()
    topt = torch.optim.AdamW(tp, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    found_inf = torch.zeros(1, device=device)
    inv_scale = torch.full((1,), 1.0 / scale, device=device)

    def baseline(clip_grads=False):
        found_inf.zero_()
        torch._amp_foreach_non_finite_check_and_unscale_(tg, found_inf, inv_scale)
        if found_inf.item() == 0:
            if clip_grads:
                torch.nn.utils.clip_grad_norm_(tp, clip, foreach=True)
            topt.step()
            torch._foreach_copy_(tcopy, tp)

    def refresh():  # fresh (scaled) grads every step, outside the timing, for both sides
        torch._foreach_copy_(og, grads0)
        torch._foreach_copy_(tg, grads0)

    name = f"adamw_mixed {numel / 1e6:g}M/{tensors}"
    return [
        compare(
            name,
            ours,
            baseline,
            device,
            repeats,
            prepare=refresh,
            bytes_moved=30 * numel,
            goal=1.5 if numel >= 50_000_000 else None,
            note="baseline: _amp_foreach_non_finite_check_and_unscale_ + AdamW(fused) "
            "+ _foreach_copy_",
        ),
        compare(
            f"{name} + clip (trainer)",
            ours_clipped,
            lambda: baseline(clip_grads=True),
            device,
            repeats,
            prepare=refresh,
            bytes_moved=30 * numel,
            note="ours: grad norm + one unchecked pass; baseline adds clip_grad_norm_",
        ),
    ]


def norm_fwd_bwd(device, kind, rows, hidden, dtype):
    """{"ours": ..., "torch": ...}: ops.<kind> and F.<kind> fwd+bwd over the same inputs, each a
    callable of no arguments; plus make(f), which wraps another implementation f(x, w, b, eps)
    (b is None for rms_norm) the same way, and the bytes one fwd+bwd moves at least (x, y; dy,
    x, dx)."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(rows, hidden, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    w = torch.randn(hidden, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    b = torch.randn(hidden, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    dy = torch.randn(rows, hidden, generator=gen).to(device=device, dtype=dtype)
    if kind == "rms_norm":
        b = None
    inputs = (x, w) if b is None else (x, w, b)

    def make(f):
        return lambda: torch.autograd.grad(f(x, w, b, 1e-5), inputs, dy)

    if kind == "layer_norm":
        sides = {
            "ours": make(ops.layer_norm),
            "torch": make(lambda x, w, b, eps: F.layer_norm(x, (hidden,), w, b, eps)),
        }
    else:
        sides = {
            "ours": make(lambda x, w, b, eps: ops.rms_norm(x, w, eps)),
            "torch": make(lambda x, w, b, eps: F.rms_norm(x, (hidden,), w, eps)),
        }
    return sides, make, 5 * rows * hidden * (torch.finfo(dtype).bits // 8)


def bench_norm(device, kind, rows, hidden, dtype, repeats):
    sides, _, bytes_moved = norm_fwd_bwd(device, kind, rows, hidden, dtype)
    goal = None
    if kind == "layer_norm" and rows >= 8192:
        goal = 1.5 if dtype == torch.bfloat16 else 1.0 if dtype == torch.float32 else None
    dt = str(dtype).replace("torch.", "")
    return compare(
        f"{kind} {rows}x{hidden} {dt} fwd+bwd",
        sides["ours"],
        sides["torch"],
        device,
        repeats,
        bytes_moved=bytes_moved,
        goal=goal,
    )


def _per_call(row, calls, bytes_moved=None):
    """A row timed over `calls` calls per sample, as times per call."""
    for key in ("ours_ms", "baseline_ms", "ours_min_ms", "baseline_min_ms"):
        row[key] /= calls
    if bytes_moved:
        row["ours_GBps"] = bytes_moved / (row["ours_ms"] * 1e-3) / 1e9
    return row


def _calls(numel):
    """Calls per timed sample for a small op: ~1M elements (a few ms) per sample at least."""
    return max(1, 1_000_000 // numel)


def bench_norm_small(device, rows, hidden, dtype, repeats):
    """ops.layer_norm fwd+bwd vs F.layer_norm at a small model's sizes, where per-call costs
    (autograd, dispatch, threading) weigh as much as the kernels: several calls per sample."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(rows, hidden, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    w = torch.randn(hidden, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    b = torch.randn(hidden, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    dy = torch.randn(rows, hidden, generator=gen).to(device=device, dtype=dtype)
    calls = _calls(rows * hidden)

    def run(f):
        def go():
            for _ in range(calls):
                torch.autograd.grad(f(x, w, b), (x, w, b), dy)

        return go

    esize = torch.finfo(dtype).bits // 8
    dt = str(dtype).replace("torch.", "")
    ours = run(lambda x, w, b: ops.layer_norm(x, w, b, 1e-5))
    base = run(lambda x, w, b: F.layer_norm(x, (hidden,), w, b, 1e-5))
    row = compare(
        f"layer_norm {rows}x{hidden} {dt} fwd+bwd",
        ours,
        base,
        device,
        repeats,
        goal=1.1,
        note=f"{calls} calls per sample",
    )
    return _per_call(row, calls, 5 * rows * hidden * esize)


def bench_activation(device, kind, rows, n, dtype, repeats):
    """ops.gelu_tanh / ops.swiglu fwd+bwd vs the PyTorch expressions they replace (autograd of
    F.gelu(approximate="tanh"), or of h.chunk(2, -1) -> F.silu(gate) * up). n: output columns
    (SwiGLU's h has 2n)."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    cols = 2 * n if kind == "swiglu" else n
    x = (torch.randn(rows, cols, generator=gen) * 2).to(device=device, dtype=dtype).requires_grad_()
    dy = torch.randn(rows, n, generator=gen).to(device=device, dtype=dtype)
    if kind == "gelu_tanh":
        ours_f, base_f = ops.gelu_tanh, lambda t: F.gelu(t, approximate="tanh")
        bytes_moved = 5 * rows * n  # x, y; dy, x, dx (elements)
    else:

        def base_f(h):
            gate, up = h.chunk(2, dim=-1)
            return F.silu(gate) * up

        ours_f = ops.swiglu
        bytes_moved = 8 * rows * n  # h, y; dy, h, dh
    calls = _calls(rows * cols)

    def run(f):
        def go():
            for _ in range(calls):
                torch.autograd.grad(f(x), x, dy)

        return go

    esize = torch.finfo(dtype).bits // 8
    dt = str(dtype).replace("torch.", "")
    goal = 2.0 if dtype == torch.float32 and (rows, n) in ((512, 1024), (2048, 4096)) else None
    shape = f"{rows}x{cols}"
    row = compare(
        f"{kind} {shape} {dt} fwd+bwd",
        run(ours_f),
        run(base_f),
        device,
        repeats,
        goal=goal,
        note=f"{calls} calls per sample" if calls > 1 else "",
    )
    return _per_call(row, calls, bytes_moved * esize)


def bench_flatten(device, numel, tensors, repeats):
    per = numel // tensors
    src = [torch.randn(per, device=device) for _ in range(tensors)]
    dst = [torch.empty_like(t) for t in src]
    buf = torch.empty(per * tensors, device=device)
    flat_src = torch.randn(per * tensors, device=device)
    flat_dst = torch.empty_like(flat_src)

    def ours():
        ops.flatten_into(src, buf)
        ops.unflatten_from(buf, dst)

    def memcpy():  # the same bytes, as one contiguous copy each way
        flat_dst.copy_(flat_src)
        flat_src.copy_(flat_dst)

    return compare(
        f"flatten+unflatten {tensors}x{per}",
        ours,
        memcpy,
        device,
        repeats,
        bytes_moved=2 * 2 * 4 * per * tensors,
        goal=0.8 if numel >= 25_000_000 else None,
        note="baseline: dst.copy_(src) of one contiguous tensor each way",
    )


def bench_sum_of_squares(device, numel, tensors, repeats, warmup=1):
    """For information: the global grad norm's pass against torch._foreach_norm (what
    clip_grad_norm_ runs), over the same fp32 grads."""
    per = numel // tensors
    # Drawn where they live: a GPU-sized list (tools/gpu_check.py) would take seconds on the CPU.
    gen = torch.Generator(device=device).manual_seed(0)
    grads = [torch.randn(per, generator=gen, device=device) for _ in range(tensors)]

    def torch_norm():
        return torch.stack(torch._foreach_norm(grads)).square().sum().item()

    return compare(
        f"grad sum of squares {numel / 1e6:g}M/{tensors}",
        lambda: ops.sum_of_squares(grads).item(),
        torch_norm,
        device,
        repeats,
        bytes_moved=4 * numel,
        note="ops.sum_of_squares vs torch._foreach_norm, squared and summed",
        warmup=warmup,
    )


def bench_adamw_roofline(device, numel, tensors, repeats):
    """CUDA only: the fp32 step's bandwidth (28 B/param) against a device-to-device copy of
    the same number of bytes (the goal: >= 85% of the copy's bandwidth)."""
    per = numel // tensors
    p = [torch.randn(per, device=device) for _ in range(tensors)]
    g = [torch.randn(per, device=device) * 1e-3 for _ in range(tensors)]
    m = [torch.zeros_like(x) for x in p]
    v = [torch.zeros_like(x) for x in p]
    src = torch.empty(14 * numel // 4, device=device)  # a copy reads and writes 14 B per param
    dst = torch.empty_like(src)

    def ours():
        ops.fused_adamw_(
            p,
            g,
            m,
            v,
            lr=1e-4,
            beta1=0.9,
            beta2=0.95,
            eps=1e-8,
            weight_decay=0.1,
            step=1,
            check_finite=False,
        )

    row = compare(
        f"adamw_fp32 {numel / 1e6:g}M vs D2D copy",
        ours,
        lambda: dst.copy_(src),
        device,
        repeats,
        bytes_moved=28 * numel,
        goal=0.85,
        note="ratio = copy time / AdamW time for the same bytes moved "
        "(the trainer's unchecked step)",
    )
    return row


def bench_linear(device, rows, in_features, out_features, dtype, repeats, force_onednn=False):
    """ops.linear fwd+bwd (x, weight and bias grads) vs F.linear's autograd, same tensors.
    force_onednn: the oneDNN path even where ops.linear does not take it (bf16), to re-check
    that choice."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(rows, in_features, generator=gen).to(device=device, dtype=dtype)
    w = torch.randn(out_features, in_features, generator=gen) * 0.02
    x.requires_grad_()
    w = w.to(device=device, dtype=dtype).requires_grad_()
    b = torch.zeros(out_features, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(rows, out_features, generator=gen).to(device=device, dtype=dtype)

    def run(f):
        return lambda: torch.autograd.grad(f(x, w, b), (x, w, b), dy)

    dt = {torch.float32: "fp32", torch.bfloat16: "bf16"}.get(dtype, str(dtype))
    ours = linear_onednn if force_onednn else ops.linear
    return compare(
        f"linear {rows}x{in_features}->{out_features} {dt}"
        + (" oneDNN" if force_onednn else "")
        + " fwd+bwd",
        run(ours),
        run(F.linear),
        device,
        repeats,
        note="oneDNN fwd/dgrad forced (not what ops.linear runs for this dtype)"
        if force_onednn
        else "ops.linear (oneDNN fwd/dgrad for fp32 on CPU) vs F.linear",
    )


def bench_linear_fused(device, rows, in_features, out_features, repeats, alpha=0.5):
    """Gradient-accumulation fusion, fp32, a micro-batch after the first (beta 1): ops.linear's
    weight-grad GEMM adds into main_grad vs F.linear, then main_grad.add_(grad, alpha) (what the
    DDP hook does with a materialised grad)."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(rows, in_features, generator=gen).to(device).requires_grad_()
    w0 = (torch.randn(out_features, in_features, generator=gen) * 0.02).to(device)
    dy = torch.randn(rows, out_features, generator=gen).to(device)
    b0 = torch.zeros(out_features, device=device)
    sides = {}
    for side in ("ours", "torch"):
        w = w0.clone().requires_grad_()
        b = b0.clone().requires_grad_()
        main = torch.zeros_like(w0)
        if side == "ours":
            w.accumulate_main_grad = lambda wgrad_into, main=main: wgrad_into(main, 1.0, alpha)
        sides[side] = (w, b, main)

    def ours():
        w, b, _ = sides["ours"]
        ops.linear(x, w, b, fuse_wgrad_accumulation=True).backward(dy)
        x.grad = w.grad = b.grad = None  # w.grad: the placeholder, dropped

    def baseline():
        w, b, main = sides["torch"]
        F.linear(x, w, b).backward(dy)
        main.add_(w.grad, alpha=alpha)
        x.grad = w.grad = b.grad = None

    return compare(
        f"linear {rows}x{in_features}->{out_features} fp32 fused wgrad acc.",
        ours,
        baseline,
        device,
        repeats,
        note="ops.linear(fuse_wgrad_accumulation=True) vs F.linear + main_grad.add_()",
    )


def bench_flatten_loop(device, numel, tensors, repeats):
    """For information: our flatten against the per-tensor copy loop a user would write."""
    per = numel // tensors
    src = [torch.randn(per, device=device) for _ in range(tensors)]
    buf = torch.empty(per * tensors, device=device)

    def loop():
        torch.cat([t.view(-1) for t in src], out=buf)

    return compare(
        f"flatten {tensors}x{per} vs torch.cat",
        lambda: ops.flatten_into(src, buf),
        loop,
        device,
        repeats,
        bytes_moved=2 * 4 * per * tensors,
    )


# ---- driver ------------------------------------------------------------------------------------


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def run_all(args):
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    q = args.quick
    reps = args.repeats or (3 if q else 9)
    rows = []
    adam_n, adam_t = (2_000_000, 10) if q else (50_000_000, 50)
    rows.extend(bench_adamw_fp32(device, adam_n, adam_t, reps))
    rows.extend(bench_adamw_mixed(device, adam_n, adam_t, reps))
    rows.append(bench_sum_of_squares(device, adam_n, adam_t, reps))
    if device.type == "cuda":
        rows.append(bench_adamw_roofline(device, adam_n, adam_t, reps))
    norm_rows = 512 if q else 8192
    for hidden in (768, 2048):
        for dtype in (torch.bfloat16, torch.float32):
            rows.append(bench_norm(device, "layer_norm", norm_rows, hidden, dtype, reps))
    for dtype in (torch.bfloat16, torch.float32):
        rows.append(bench_norm(device, "rms_norm", norm_rows, 2048, dtype, reps))
    for dtype in (
        torch.float32,
        torch.bfloat16,
    ):  # a small model's LayerNorms (the same in --quick)
        for shape in ((512, 256), (2048, 256), (512, 1024)):
            rows.append(bench_norm_small(device, *shape, dtype, 3 * reps))
    for kind in ("gelu_tanh", "swiglu"):
        for dtype in (torch.float32, torch.bfloat16):
            for shape in ((512, 1024),) if q else ((512, 1024), (2048, 4096)):
                rows.append(bench_activation(device, kind, *shape, dtype, 3 * reps))
    flat_n = 1_000_000 if q else 25_000_000
    rows.append(bench_flatten(device, flat_n, 100, reps))
    rows.append(bench_flatten_loop(device, flat_n, 100, reps))
    for in_f, out_f in ((256, 1024), (1024, 256)):
        rows.append(bench_linear(device, 512, in_f, out_f, torch.float32, 3 * reps))
        rows.append(bench_linear_fused(device, 512, in_f, out_f, 3 * reps))
        if device.type == "cpu":  # bf16 runs F.linear (see megalite/ops/linear.py): re-check
            rows.append(
                bench_linear(device, 512, in_f, out_f, torch.bfloat16, 3 * reps, force_onednn=True)
            )
    return rows


def print_table(rows, meta):
    print(
        f"# {meta['device_name']} | torch {meta['torch']} | threads {meta['threads']} | "
        f"load avg {meta['load_avg'][0]:.1f} | malloc: "
        f"{'reuse (launcher)' if meta['malloc_reuse'] else 'glibc default'} | kernels: "
        + ", ".join(f"{r['op']}={r['impl']}" for r in meta["kernels"])
    )
    header = (
        f"{'case':44s} {'ours ms':>9s} {'torch ms':>9s} {'ratio':>6s} {'paired':>6s} {'goal':>5s} "
        f"{'ok':>3s} "
        f"{'GB/s':>6s}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        goal = "" if r["goal"] is None else f"{r['goal']:.2f}"
        ok = "" if r["meets_goal"] is None else ("yes" if r["meets_goal"] else "NO")
        gbs = "" if r["ours_GBps"] is None else f"{r['ours_GBps']:.1f}"
        print(
            f"{r['case']:44s} {r['ours_ms']:9.2f} {r['baseline_ms']:9.2f} {r['ratio']:6.2f} "
            f"{r['ratio_paired']:6.2f} {goal:>5s} {ok:>3s} {gbs:>6s}"
        )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, few repeats: a smoke test")
    ap.add_argument("--json", metavar="PATH", help="write the results as JSON")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    ap.add_argument(
        "--repeats", type=int, default=0, help="timed runs per side (default 9, quick 3)"
    )
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument(
        "--system-malloc",
        action="store_true",
        help="glibc's default allocator settings instead of launch/pretrain.sh's (see module doc)",
    )
    args = ap.parse_args(argv)
    if not args.system_malloc and "GLIBC_TUNABLES" not in os.environ:
        env = dict(os.environ, GLIBC_TUNABLES=MALLOC_TUNABLES)
        return subprocess.call(
            [sys.executable, os.path.abspath(__file__), *(argv or sys.argv[1:])], env=env
        )
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda but torch.cuda.is_available() is False")
    rows = run_all(args)
    meta = {
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "malloc_reuse": os.environ.get("GLIBC_TUNABLES") == MALLOC_TUNABLES,
        "quick": args.quick,
        "load_avg": os.getloadavg(),
        "kernels": ops.kernel_report(),
    }
    print_table(rows, meta)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
