"""LayerNorm / RMSNorm kernels, and the pure-PyTorch reference they fall back to, against torch's
own F.layer_norm / F.rms_norm and their autograd evaluated in float64 on the same inputs,
forward and backward, on awkward sizes. The oracle is never megalite.ops.reference itself, so
the MEGALITE_KERNELS=reference runs (the `impl` fixture) check the reference too."""

import pytest
import torch
import torch.nn.functional as F

import megalite.ops as ops
from megalite.ops import dispatch, norms, reference

SHAPES = [(0, 8), (1, 1), (1, 7), (3, 17), (2, 3, 31), (5, 100), (4, 1000), (9, 768), (2, 2053)]
TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=1e-2, atol=1e-2),
    torch.float16: dict(rtol=1e-2, atol=1e-2),
}


def _inputs(shape, dtype, seed, affine=True, bias=True):
    g = torch.Generator().manual_seed(seed)
    h = shape[-1]
    x = (torch.randn(shape, generator=g) * 2 + 0.5).to(dtype).requires_grad_()
    w = (torch.randn(h, generator=g) * 0.5 + 1).to(dtype).requires_grad_() if affine else None
    b = (torch.randn(h, generator=g) * 0.1).to(dtype).requires_grad_() if affine and bias else None
    dy = torch.randn(shape, generator=g).to(dtype)
    return x, w, b, dy


def _grads(out, dy, *ts):
    grads = torch.autograd.grad(out, [t for t in ts if t is not None], dy, allow_unused=True)
    it = iter(grads)
    return [next(it) if t is not None else None for t in ts]


def torch_layer_norm(x, w, b, eps, dy):
    """The oracle: F.layer_norm and torch's autograd of it in float64, on x, w, b and dy as given
    (already rounded to their dtypes). Returns y, dx, dw, db (None for an absent param)."""
    ts = [None if t is None else t.detach().double().requires_grad_() for t in (x, w, b)]
    y = F.layer_norm(ts[0], (x.shape[-1],), ts[1], ts[2], eps)
    return [y.detach(), *_grads(y, dy.double(), *ts)]


def torch_rms_norm(x, w, eps, dy):
    """F.rms_norm and its autograd in float64: y, dx, dw."""
    ts = [None if t is None else t.detach().double().requires_grad_() for t in (x, w)]
    y = F.rms_norm(ts[0], (x.shape[-1],), ts[1], eps)
    return [y.detach(), *_grads(y, dy.double(), *ts)]


def _ref_layer_norm(x, w, b, eps, dy):
    """megalite.ops.reference's forward + backward on detached inputs (what the CUDA path falls
    back to); checked against torch in test_reference_matches_torch."""
    x2 = x.detach().reshape(-1, x.shape[-1])
    w32 = None if w is None else w.detach().float()
    b32 = None if b is None else b.detach().float()
    y, mean, rstd = reference.layer_norm_fwd(x2, w32, b32, eps)
    dx, dw, db = reference.layer_norm_bwd(dy.reshape(x2.shape), x2, mean, rstd, w32, b is not None)
    return y.reshape(x.shape), dx.reshape(x.shape), dw, db


def _ref_rms_norm(x, w, eps, dy):
    x2 = x.detach().reshape(-1, x.shape[-1])
    w32 = None if w is None else w.detach().float()
    y, rstd = reference.rms_norm_fwd(x2, w32, eps)
    dx, dw = reference.rms_norm_bwd(dy.reshape(x2.shape), x2, rstd, w32)
    return y.reshape(x.shape), dx.reshape(x.shape), dw


def assert_norm_close(got, want, dtype):
    """got (y, dx, dweight[, dbias]) against the oracle's, at the dtype's tolerance; dweight and
    dbias sum over all rows, so they are compared relative to their largest element."""
    for i, (g, w) in enumerate(zip(got, want)):
        if w is None:
            assert g is None
            continue
        assert g is not None and g.shape == w.shape
        if i >= 2:
            scale = max(1.0, w.abs().max().item())
            g, w = g.float() / scale, w / scale
        torch.testing.assert_close(g.float(), w.float(), **TOL[dtype])


def _close(actual, expected, dtype):
    if expected is None:
        assert actual is None
        return
    torch.testing.assert_close(actual.float(), expected.float(), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_layer_norm_fwd_bwd(impl, shape, dtype):
    for affine, bias in [(True, True), (True, False), (False, False)]:
        x, w, b, dy = _inputs(shape, dtype, seed=shape[-1], affine=affine, bias=bias)
        y = ops.layer_norm(x, w, b, 1e-5)
        assert y.dtype == dtype and y.shape == x.shape
        got = [y, *_grads(y, dy, x, w, b)]
        for t in got[2:]:
            assert t is None or t.dtype == dtype
        assert_norm_close(got, torch_layer_norm(x, w, b, 1e-5, dy), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_rms_norm_fwd_bwd(impl, shape, dtype):
    for affine in (True, False):
        x, w, _, dy = _inputs(shape, dtype, seed=shape[-1] + 1, affine=affine, bias=False)
        y = ops.rms_norm(x, w, 1e-6)
        assert y.dtype == dtype and y.shape == x.shape
        got = [y, *_grads(y, dy, x, w)]
        assert_norm_close(got, torch_rms_norm(x, w, 1e-6, dy), dtype)


@pytest.mark.parametrize("shape", [(1, 2), (3, 17), (4, 5, 64), (7, 1000)])  # hidden 1: degenerate
def test_reference_matches_torch(shape):
    """The oracle itself against torch's layer_norm / rms_norm autograd (fp32)."""
    x, w, b, dy = _inputs(shape, torch.float32, seed=3)
    y = F.layer_norm(x, (shape[-1],), w, b, 1e-5)
    want = [y] + _grads(y, dy, x, w, b)
    got = _ref_layer_norm(x, w, b, 1e-5, dy)
    for g_, w_ in zip(got, want):
        torch.testing.assert_close(g_, w_, rtol=1e-5, atol=1e-5)
    y = F.rms_norm(x, (shape[-1],), w, 1e-6)
    want = [y] + _grads(y, dy, x, w)
    got = _ref_rms_norm(x, w, 1e-6, dy)
    for g_, w_ in zip(got, want):
        torch.testing.assert_close(g_, w_, rtol=1e-5, atol=1e-5)


def test_gradcheck_float64():
    """float64 runs the reference (no compiled kernel for it): its backward is the exact one."""
    x = torch.randn(3, 9, dtype=torch.float64, requires_grad=True)
    w = torch.randn(9, dtype=torch.float64, requires_grad=True)
    b = torch.randn(9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: ops.layer_norm(x, w, b, 1e-5), (x, w, b))
    assert torch.autograd.gradcheck(lambda x, w: ops.rms_norm(x, w, 1e-5), (x, w))


def test_mixed_weight_dtype(impl):
    """bf16 activations with fp32 weights (and the other way round) keep each tensor's dtype."""
    x, w, b, dy = _inputs((4, 33), torch.bfloat16, seed=5)
    w32 = w.detach().float().requires_grad_()
    y = ops.layer_norm(x, w32, b, 1e-5)
    assert y.dtype == torch.bfloat16
    dx, dw, db = _grads(y, dy, x, w32, b)
    assert (dx.dtype, dw.dtype, db.dtype) == (torch.bfloat16, torch.float32, torch.bfloat16)


def test_modules(impl):
    ln = ops.FusedLayerNorm(48, eps=1e-5, dtype=torch.bfloat16)
    assert [n for n, _ in ln.named_parameters()] == ["weight", "bias"]
    assert ln.weight.dtype == torch.bfloat16
    ref = torch.nn.LayerNorm(48)
    x = torch.randn(2, 5, 48)
    ln32 = ops.FusedLayerNorm(48)
    ln32.load_state_dict(ref.state_dict())
    torch.testing.assert_close(ln32(x), ref(x), rtol=1e-5, atol=1e-5)
    assert ops.FusedLayerNorm(16, bias=False).bias is None
    rms = ops.FusedRMSNorm(48, eps=1e-6)
    assert [n for n, _ in rms.named_parameters()] == ["weight"]
    torch.testing.assert_close(rms(x), F.rms_norm(x, (48,), rms.weight, 1e-6), rtol=1e-5, atol=1e-5)
    rms(x).sum().backward()
    assert rms.weight.grad is not None and rms.weight.grad.shape == (48,)


def test_non_contiguous_input(impl):
    x = torch.randn(33, 6).t()  # [6, 33], not contiguous
    w = torch.randn(33)
    torch.testing.assert_close(
        ops.layer_norm(x, w, None, 1e-5),
        F.layer_norm(x, (33,), w, None, 1e-5),
        rtol=1e-5,
        atol=1e-5,
    )


def test_bad_weight_shape():
    with pytest.raises(ValueError, match="last dim is 8"):
        ops.layer_norm(torch.randn(2, 8), torch.ones(7), None, 1e-5)


def test_compiled_kernels_used(monkeypatch):
    """The install builds megalite._C: CPU norms must not silently fall back to the reference."""
    monkeypatch.delenv("MEGALITE_KERNELS", raising=False)
    for op in ("layer_norm", "rms_norm"):
        impl, _, reason = dispatch.choose(op, "cpu")
        assert impl == "cpp", reason
    x = torch.randn(3, 8, requires_grad=True)  # the C++ autograd node, not the Python Function
    assert norms._CPP_NODES
    assert "_LayerNormFn" not in type(ops.layer_norm(x, None, None, 1e-5).grad_fn).__name__
    assert "_RMSNormFn" not in type(ops.rms_norm(x, None, 1e-5).grad_fn).__name__
    monkeypatch.setenv("MEGALITE_KERNELS", "reference")
    assert dispatch.choose("layer_norm", "cpu")[0] == "reference"
    report = {r["op"]: r for r in ops.kernel_report()}
    assert report["layer_norm"]["impl"] == "reference"
    assert "MEGALITE_KERNELS" in report["layer_norm"]["reason"]


def test_scalar_input_rejected():
    with pytest.raises(ValueError, match="at least one dimension"):
        ops.rms_norm(torch.tensor(1.0), None, 1e-5)


def test_best_isa_clone_is_selected():
    """The kernels' ISA clones are picked by CPU features; on a CPU with AVX-512 (F, BW, DQ, VL)
    the AVX-512 clone must be the one that runs, on one with AVX2+FMA the AVX2 one."""
    isa = dispatch.cpu_isa()
    assert isa is not None
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(line for line in f if line.startswith("flags")).split()
    except (OSError, StopIteration):
        pytest.skip("no /proc/cpuinfo")
    if {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx2", "fma"} <= set(flags):
        assert isa.startswith("x86-64-v4"), isa
    elif {"avx2", "fma", "f16c", "bmi2"} <= set(flags):
        assert isa.startswith(("x86-64-v3", "x86-64-v4")), isa


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_outputs_streaming_path(dtype):
    """Outputs of 8 MB and more are written with streaming stores (another code path)."""
    rows = (8 << 20) // (1027 * torch.finfo(dtype).bits // 8) + 3
    x, w, b, dy = _inputs((rows, 1027), dtype, seed=11)
    y = ops.layer_norm(x, w, b, 1e-5)
    assert_norm_close([y, *_grads(y, dy, x, w, b)], torch_layer_norm(x, w, b, 1e-5, dy), dtype)
    y = ops.rms_norm(x, w, 1e-5)
    assert_norm_close([y, *_grads(y, dy, x, w)], torch_rms_norm(x, w, 1e-5, dy), dtype)


def _fwd_bwd(fn, x, w, b, dy):
    ts = [t for t in (x, w, b) if t is not None]
    y = fn(x, w, b)
    return [y, *torch.autograd.grad(y, ts, dy)]


def test_same_bits_for_any_thread_count(monkeypatch):
    """y, dx, dweight and dbias do not depend on the thread count: rows go to threads in
    contiguous ranges, dweight/dbias are summed per fixed block of rows, then in block order."""
    monkeypatch.delenv("MEGALITE_KERNELS", raising=False)
    threads = torch.get_num_threads()
    for dtype in (torch.float32, torch.bfloat16):
        x, w, b, dy = _inputs((1500, 257), dtype, seed=12)
        out = []
        try:
            for n in (1, 2, 3):
                torch.set_num_threads(n)
                out.append(
                    _fwd_bwd(lambda x, w, b: ops.layer_norm(x, w, b, 1e-5), x, w, b, dy)
                    + _fwd_bwd(lambda x, w, b: ops.rms_norm(x, w, 1e-5), x, w, None, dy)
                )
        finally:
            torch.set_num_threads(threads)
        for other in out[1:]:
            for a, c in zip(out[0], other):
                assert torch.equal(a, c)


def test_python_function_path(monkeypatch):
    """The autograd Functions (the CUDA path, and the CPU's under functorch) on the C++ kernels
    give the C++ autograd node's bits."""
    monkeypatch.delenv("MEGALITE_KERNELS", raising=False)
    if not norms._CPP_NODES:
        pytest.skip("megalite._C not built")
    for dtype in (torch.float32, torch.bfloat16):
        x, w, b, dy = _inputs((5, 3, 100), dtype, seed=13)
        node = _fwd_bwd(lambda x, w, b: ops.layer_norm(x, w, b, 1e-5), x, w, b, dy)
        node_rms = _fwd_bwd(lambda x, w, b: ops.rms_norm(x, w, 1e-5), x, w, None, dy)
        monkeypatch.setattr(norms, "_CPP_NODES", False)
        fn = _fwd_bwd(lambda x, w, b: ops.layer_norm(x, w, b, 1e-5), x, w, b, dy)
        fn_rms = _fwd_bwd(lambda x, w, b: ops.rms_norm(x, w, 1e-5), x, w, None, dy)
        assert "_LayerNormFn" in type(ops.layer_norm(x, w, b, 1e-5).grad_fn).__name__
        monkeypatch.setattr(norms, "_CPP_NODES", True)
        for a, c in zip(node + node_rms, fn + fn_rms):
            assert torch.equal(a, c)


def test_frozen_params_and_inputs(impl):
    """Grads only for what requires them (the C++ node skips dweight/dbias when not needed)."""
    x, w, b, dy = _inputs((6, 40), torch.float32, seed=14)
    w.requires_grad_(False)
    y = ops.layer_norm(x, w, b, 1e-5)
    dx, db = torch.autograd.grad(y, (x, b), dy)
    ry, rdx, _, rdb = torch_layer_norm(x, w, b, 1e-5, dy)
    _close(dx, rdx, torch.float32)
    _close(db, rdb, torch.float32)
    x2 = x.detach()
    w.requires_grad_(True)
    (dw,) = torch.autograd.grad(ops.rms_norm(x2, w, 1e-5), (w,), dy)
    _close(dw, torch_rms_norm(x2, w, 1e-5, dy)[2], torch.float32)
    with torch.no_grad():
        _close(ops.layer_norm(x, w, b, 1e-5), ry, torch.float32)
