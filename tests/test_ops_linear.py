"""ops.linear against F.linear's autograd (the independent reference): values and grads, the
oneDNN path and the reference path, and the weight-grad accumulation fusion's contract."""

import sys

import pytest
import torch
import torch.nn.functional as F

from megalite import ops
from megalite.ops import dispatch

# The module, not the function megalite.ops.linear that shadows its name in the package.
linear_mod = sys.modules["megalite.ops.linear"]

SHAPES = [((37, 24), 40), ((5, 3, 24), 40), ((512, 256), 1024), ((64, 4, 128), 96)]


def _inputs(x_shape, out_features, dtype, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(x_shape, generator=g).to(dtype)
    w = (torch.randn(out_features, x_shape[-1], generator=g) * 0.1).to(dtype)
    b = torch.randn(out_features, generator=g).to(dtype) if bias else None
    dy = torch.randn(*x_shape[:-1], out_features, generator=g).to(dtype)
    return x, w, b, dy


def _run(fn, x, w, b, dy, **kw):
    """y and the grads of (x, w, b) for upstream grad dy, on fresh leaves."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, w) + ((b,) if b is not None else ())]
    y = fn(leaves[0], leaves[1], leaves[2] if b is not None else None, **kw)
    y.backward(dy)
    return [y.detach()] + [t.grad for t in leaves]


def _close(ours, ref, rtol, atol):
    """Elementwise close, with atol relative to the reference's magnitude (a GEMM's rounding
    error scales with its inputs; oneDNN and MKL sum in different orders)."""
    for a, r in zip(ours, ref):
        assert a.shape == r.shape and a.dtype == r.dtype
        scale = r.float().abs().max().item() or 1.0
        torch.testing.assert_close(a.float(), r.float(), rtol=rtol, atol=atol * scale)


@pytest.fixture
def no_forced_reference(monkeypatch):
    monkeypatch.delenv("MEGALITE_KERNELS", raising=False)


@pytest.mark.parametrize("x_shape,out_features", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_fp32_matches_f_linear(no_forced_reference, x_shape, out_features, bias):
    x, w, b, dy = _inputs(x_shape, out_features, torch.float32, bias)
    _close(_run(ops.linear, x, w, b, dy), _run(F.linear, x, w, b, dy), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("x_shape,out_features", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_bf16_matches_f_linear(no_forced_reference, x_shape, out_features, bias):
    x, w, b, dy = _inputs(x_shape, out_features, torch.bfloat16, bias)
    # Both sides accumulate in fp32 and round once to bf16: at most a bf16 ulp or so apart.
    _close(_run(ops.linear, x, w, b, dy), _run(F.linear, x, w, b, dy), rtol=1.6e-2, atol=1e-2)


def test_onednn_path_is_taken_on_cpu(no_forced_reference):
    if not linear_mod.onednn_available():
        pytest.skip("torch without oneDNN's _linear_pointwise")
    x, w, b, _ = _inputs((8, 16), 12, torch.float32)
    assert linear_mod._use_onednn(x, w, b)
    y = ops.linear(x.requires_grad_(), w, b)
    assert type(y.grad_fn).__name__.startswith("_LinearFn")
    # bf16 (torch's GEMM for it is oneDNN's already) and fp64 are not: F.linear itself.
    for dt in (torch.bfloat16, torch.float64):
        xd, wd, bd = x.detach().to(dt).requires_grad_(), w.to(dt), b.to(dt)
        assert not linear_mod._use_onednn(xd, wd, bd)
        assert ops.linear(xd, wd, bd).grad_fn.name() == "AddmmBackward0"


def test_non_contiguous_inputs(no_forced_reference):
    x, w, b, dy = _inputs((24, 6, 32), 20, torch.float32)
    x_nc = x.transpose(0, 1).contiguous().transpose(0, 1)  # same values, strides of [6, 24]
    assert not x_nc.is_contiguous()
    dy_nc = dy.transpose(0, 1).contiguous().transpose(0, 1)
    w_nc = w.t().contiguous().t()  # a transposed weight: F.linear path
    assert not w_nc.is_contiguous()
    ref = _run(F.linear, x, w, b, dy)
    _close(_run(ops.linear, x_nc, w, b, dy), ref, rtol=1e-5, atol=1e-5)
    _close(_run(ops.linear, x, w_nc, b, dy_nc), ref, rtol=1e-5, atol=1e-5)
    # A strided slice of the feature dim.
    wide = torch.randn(24, 6, 64)
    xs = wide[..., ::2]
    _close(
        _run(ops.linear, xs, w, b, dy),
        _run(F.linear, xs.contiguous(), w, b, dy),
        rtol=1e-5,
        atol=1e-5,
    )


def test_1d_input_and_no_grad(no_forced_reference):
    x, w, b, _ = _inputs((32,), 8, torch.float32)
    torch.testing.assert_close(ops.linear(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        y = ops.linear(x.requires_grad_(), w, b)
    assert y.grad_fn is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forced_reference_is_f_linear_bitwise(monkeypatch, dtype):
    monkeypatch.setenv("MEGALITE_KERNELS", "reference")
    x, w, b, dy = _inputs((16, 4, 64), 48, dtype)
    assert not linear_mod._use_onednn(x, w, b)
    ours, ref = _run(ops.linear, x, w, b, dy), _run(F.linear, x, w, b, dy)
    for a, r in zip(ours, ref):
        assert torch.equal(a, r)
    # The reference never fuses: the weight gets its real grad.
    main = torch.zeros_like(w)
    w = w.detach().clone().requires_grad_()
    w.accumulate_main_grad = lambda into: into(main, 0.0, 1.0)
    ops.linear(x, w, b, fuse_wgrad_accumulation=True).backward(dy)
    assert torch.equal(w.grad, ref[2]) and not main.any()


def test_kernel_report_has_linear(monkeypatch):
    monkeypatch.delenv("MEGALITE_KERNELS", raising=False)
    report = {r["op"]: r for r in ops.kernel_report()}
    fast = linear_mod.onednn_available() and not torch.cuda.is_available()
    expected = "onednn" if fast else "torch"
    assert report["linear"]["impl"] == expected
    monkeypatch.setenv("MEGALITE_KERNELS", "reference")
    report = {r["op"]: r for r in ops.kernel_report()}
    assert report["linear"]["impl"] == "torch" and "MEGALITE_KERNELS" in report["linear"]["reason"]


# -- gradient-accumulation fusion -------------------------------------------------------------


class FakeAccumulator:
    """What the DP grad buffers do: main grad in fp32, beta 0 for the first micro-batch of a
    step (no zeroing pass), then 1; alpha = 1/DP."""

    def __init__(self, weight, alpha, poison=True):
        self.main = torch.full_like(weight, float("nan") if poison else 0.0, dtype=torch.float32)
        self.alpha = alpha
        self.first = True
        self.calls = []

    def new_step(self):
        self.first = True

    def __call__(self, wgrad_into):
        beta = 0.0 if self.first else 1.0
        self.calls.append(beta)
        wgrad_into(self.main, beta, self.alpha)
        self.first = False


@pytest.mark.parametrize("forced", [False, True], ids=["onednn", "torch"])
@pytest.mark.parametrize("bias", [True, False])
def test_fusion_accumulates_into_main_grad(monkeypatch, forced, bias):
    """3 micro-batches, beta 0 then 1: main grad = alpha * sum of the reference weight grads;
    x/bias grads as usual; the weight's own grad is only a placeholder."""
    monkeypatch.delenv("MEGALITE_KERNELS", raising=False)
    if forced:  # fusion on the plain F.linear path too (what runs on CUDA)
        monkeypatch.setattr(linear_mod, "_use_onednn", lambda *a: False)
    alpha = 0.5
    w0 = torch.randn(48, 32) * 0.1
    b0 = torch.randn(48) if bias else None
    w = w0.clone().requires_grad_()
    b = b0.clone().requires_grad_() if bias else None
    acc = FakeAccumulator(w, alpha)
    w.accumulate_main_grad = acc
    want_w = torch.zeros_like(w0)
    for mb in range(3):
        x, _, _, dy = _inputs((10, 3, 32), 48, torch.float32, seed=mb)
        ref = _run(F.linear, x, w0, b0, dy)
        xl = x.clone().requires_grad_()
        y = ops.linear(xl, w, b, fuse_wgrad_accumulation=True)
        y.backward(dy)
        _close([y.detach(), xl.grad], ref[:2], rtol=1e-5, atol=1e-5)
        if bias:
            _close([b.grad], [ref[3]], rtol=1e-5, atol=1e-5)
            b.grad = None
        assert w.grad is not None and w.grad.shape == w.shape  # the placeholder
        w.grad = None  # what the DDP hook does
        want_w += ref[2]
    assert acc.calls == [0.0, 1.0, 1.0]
    assert torch.isfinite(acc.main).all()  # the nan poison of the first call is gone
    _close([acc.main], [want_w * alpha], rtol=1e-5, atol=1e-5)


def test_fusion_fires_post_accumulate_hook(no_forced_reference):
    """The DDP hook keys on the post-accumulate-grad hook: it must fire for a fused weight."""
    w = (torch.randn(16, 8) * 0.1).requires_grad_()
    acc = FakeAccumulator(w, 1.0)
    w.accumulate_main_grad = acc
    fired = []
    w.register_post_accumulate_grad_hook(lambda p: fired.append(len(acc.calls)))
    x, _, _, dy = _inputs((4, 8), 16, torch.float32)
    ops.linear(x.requires_grad_(), w, None, fuse_wgrad_accumulation=True).backward(dy)
    assert fired == [1]  # after accumulate_main_grad was called


def test_weight_used_twice_both_fused(no_forced_reference):
    """Two fused uses in one backward: both GEMMs land in main grad (beta 0, then 1), and
    AccumulateGrad fires once with the (summed) placeholders."""
    w0 = torch.randn(24, 16) * 0.1
    w = w0.clone().requires_grad_()
    acc = FakeAccumulator(w, 1.0)
    w.accumulate_main_grad = acc
    fired = []
    w.register_post_accumulate_grad_hook(lambda p: fired.append(1))
    x1, _, _, dy1 = _inputs((6, 16), 24, torch.float32, seed=1)
    x2, _, _, dy2 = _inputs((9, 16), 24, torch.float32, seed=2)
    y1 = ops.linear(x1, w, None, fuse_wgrad_accumulation=True)
    y2 = ops.linear(x2, w, None, fuse_wgrad_accumulation=True)
    torch.autograd.backward([y1, y2], [dy1, dy2])
    assert acc.calls == [0.0, 1.0] and fired == [1]
    want = _run(F.linear, x1, w0, None, dy1)[2] + _run(F.linear, x2, w0, None, dy2)[2]
    _close([acc.main], [want], rtol=1e-5, atol=1e-5)


def test_nan_in_main_grad_does_not_leak_at_beta_zero(no_forced_reference):
    w = (torch.randn(64, 32) * 0.1).requires_grad_()
    x, _, _, dy = _inputs((128, 32), 64, torch.float32)
    acc = FakeAccumulator(w, 1.0)
    acc.main.view(-1)[::7] = float("inf")
    w.accumulate_main_grad = acc
    ops.linear(x, w, None, fuse_wgrad_accumulation=True).backward(dy)
    assert acc.calls == [0.0]
    _close([acc.main], [_run(F.linear, x, w.detach(), None, dy)[2]], rtol=1e-5, atol=1e-5)


def test_no_fusion_without_accumulator_or_flag_or_fp32(no_forced_reference):
    x, w, b, dy = _inputs((12, 32), 24, torch.float32)
    ref = _run(F.linear, x, w, b, dy)
    # Flag without an accumulator: the plain weight grad.
    _close(_run(ops.linear, x, w, b, dy, fuse_wgrad_accumulation=True), ref, rtol=1e-5, atol=1e-5)
    # Accumulator without the flag: not called.
    wl = w.clone().requires_grad_()
    acc = FakeAccumulator(wl, 1.0)
    wl.accumulate_main_grad = acc
    ops.linear(x, wl, b).backward(dy)
    assert acc.calls == [] and wl.grad is not None
    _close([wl.grad], [ref[2]], rtol=1e-5, atol=1e-5)
    # bf16 activations: main grad is fp32, so no fusion; the weight grad is returned.
    xb, wb, bb, dyb = (t.bfloat16() for t in (x, w, b, dy))
    wl = wb.clone().requires_grad_()
    acc = FakeAccumulator(wl, 1.0)
    wl.accumulate_main_grad = acc
    ops.linear(xb, wl, bb, fuse_wgrad_accumulation=True).backward(dyb)
    assert acc.calls == []
    _close([wl.grad], [_run(F.linear, xb, wb, bb, dyb)[2]], rtol=1.6e-2, atol=1e-2)


def test_frozen_weight_not_fused(no_forced_reference):
    x, w, b, dy = _inputs((12, 32), 24, torch.float32)
    acc = FakeAccumulator(w, 1.0)
    w.accumulate_main_grad = acc  # w does not require grad
    xl = x.clone().requires_grad_()
    ops.linear(xl, w, b, fuse_wgrad_accumulation=True).backward(dy)
    assert acc.calls == [] and w.grad is None
    _close([xl.grad], [_run(F.linear, x, w, b, dy)[1]], rtol=1e-5, atol=1e-5)


def test_dispatch_untouched_ops(no_forced_reference):
    """linear is reported by kernel_report but is not a compiled op: choose() is unchanged."""
    assert "linear" not in dispatch.OPS


def test_ddp_buffers_get_fused_weight_grads_equal_to_autograd():
    """Through the trainer's own objects (one process): DDP installs accumulate_main_grad,
    the parallel layers fuse their weight GEMMs into main_grad; after 3 micro-batches
    main_grad equals plain autograd's accumulated grad of an identical model."""
    from megalite.config import ModelConfig
    from megalite.model.gpt import GPTModel
    from megalite.parallel.ddp import DistributedDataParallel
    from megalite.parallel.layers import init_parameters
    from megalite.parallel.pipeline import forward_backward

    def build():
        m = GPTModel(
            ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16), 128
        )
        init_parameters(m, 3)
        return m

    g = torch.Generator().manual_seed(0)
    batches = [
        {
            "tokens": torch.randint(0, 128, (2, 16), generator=g),
            "labels": torch.randint(0, 128, (2, 16), generator=g),
        }
        for _ in range(3)
    ]
    ref, fused = build(), build()
    for b in batches:
        (ref(b["tokens"], labels=b["labels"]).float().mean() / 3).backward()
    ddp = DistributedDataParallel([fused])
    seen = []
    for p in fused.parameters():  # count the GEMMs that wrote straight into main_grad
        acc = p.accumulate_main_grad
        p.accumulate_main_grad = lambda fn, acc=acc, p=p: (seen.append(p), acc(fn))[1]
    forward_backward([fused], iter(batches), 3, no_sync=ddp.no_sync)
    ddp.finish_grad_sync()
    if not dispatch.forced_reference():
        assert len({id(p) for p in seen}) == 8  # qkv, proj, fc1, fc2 of two layers
    for (n, p), q in zip(ref.named_parameters(), fused.parameters()):
        assert q.grad is None, n
        torch.testing.assert_close(q.main_grad, p.grad, rtol=1e-5, atol=1e-6, msg=n)
