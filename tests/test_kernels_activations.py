"""GeLU (tanh) and SwiGLU kernels against the pure-PyTorch reference (F.gelu(approximate="tanh"),
F.silu(gate) * up and torch's autograd of them), forward and backward, on awkward sizes, layouts
and values; and the kernels' own exp against torch's.

fp32 results are compared with the reference evaluated in fp64 (its exact value, to fp32's
tolerance: rtol 1e-5, atol 1e-6): torch's own fp32 GeLU backward is further than that from it in
places (up to ~1e-6 |dy|, where its 1 - tanh^2 cancels), the kernels are not, so they are checked
to be at least as accurate as torch's fp32 op rather than equal to its rounding. bf16/fp16 results
are compared with torch's op in that dtype and with the fp32 reference, at the dtype's tolerance.
"""

import pytest
import torch
import torch.nn.functional as F

import megalite.ops as ops
from megalite.ops import activations, dispatch, reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),
    torch.float16: dict(rtol=1e-3, atol=1e-3),
}
# Element counts: 1, 7 and 1023 (odd, below and around a vector), 3 * 5 * 64, and one large
# enough to be split between threads.
GELU_SHAPES = [(1,), (7,), (1023,), (3, 5, 64), (3, 33000)]
# SwiGLU: [..., 2n] with n = 1, 7, 1023 outputs, rows of odd length, and a parallel split that
# cuts rows.
SWIGLU_SHAPES = [(2,), (14,), (2046,), (5, 2 * 17), (2, 3, 2 * 100), (7, 2 * 9999)]

requires_cpp = pytest.mark.skipif(not activations._CPP_NODES, reason="megalite._C not built")


def _x(shape, dtype, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(dtype)


def _grad(fn, x, dy):
    x = x.detach().requires_grad_()
    y = fn(x)
    (dx,) = torch.autograd.grad(y, x, dy)
    return y, dx


def _close(actual, expected, dtype, equal_nan=False):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual.float(), expected.float(), equal_nan=equal_nan, **TOL[dtype])


def _swiglu_ref(t):
    gate, up = t.chunk(2, dim=-1)
    return F.silu(gate) * up


def _gelu_ref(t):
    return F.gelu(t, approximate="tanh")


def _check(op, ref, x, dy, equal_nan=False):
    """op's forward and backward against the reference's (see the module docstring)."""
    dtype = x.dtype
    y, dx = _grad(op, x, dy)
    if dispatch.forced_reference():  # the reference itself: torch's op, whatever its rounding
        for got, want in zip((y, dx), _grad(ref, x, dy)):
            _close(got, want, dtype, equal_nan)
        return y, dx
    if dtype == torch.float32:
        for got, want in zip((y, dx), _grad(ref, x.double(), dy.double())):
            assert got.dtype == dtype and got.shape == want.shape
            want = want.float().double()  # rounded to fp32's range (an fp32 overflow is inf)
            torch.testing.assert_close(got.double(), want, equal_nan=equal_nan, **TOL[dtype])
        return y, dx
    for got, want in zip((y, dx), _grad(ref, x, dy)):
        _close(got, want, dtype, equal_nan)
    for got, want in zip((y, dx), _grad(ref, x.float(), dy.float())):
        _close(got, want.to(dtype), dtype, equal_nan)  # (rounded to the dtype's range)
    return y, dx


# ---- the ops against torch's autograd of the reference expressions -----------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", GELU_SHAPES)
def test_gelu_tanh_fwd_bwd(impl, shape, dtype):
    x, dy = _x(shape, dtype, seed=shape[-1]), _x(shape, dtype, seed=1, scale=1.0)
    _check(ops.gelu_tanh, _gelu_ref, x, dy)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SWIGLU_SHAPES)
def test_swiglu_fwd_bwd(impl, shape, dtype):
    out_shape = shape[:-1] + (shape[-1] // 2,)
    h, dy = _x(shape, dtype, seed=shape[-1]), _x(out_shape, dtype, seed=2, scale=1.0)
    y, _ = _check(ops.swiglu, _swiglu_ref, h, dy)
    assert y.shape == out_shape


def test_empty_inputs(impl):
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.empty(0, 16, dtype=dtype, requires_grad=True)
        y = ops.gelu_tanh(x)
        assert y.shape == (0, 16)
        y.sum().backward()
        assert x.grad.shape == (0, 16)
        h = torch.empty(3, 0, dtype=dtype, requires_grad=True)
        y = ops.swiglu(h)
        assert y.shape == (3, 0)
        y.sum().backward()
        assert h.grad.shape == (3, 0)


def test_non_contiguous_inputs(impl):
    x = _x((64, 50), torch.float32, seed=4).t()  # transposed
    dy = _x((64, 50), torch.float32, seed=5, scale=1.0).t()  # dy too
    assert not x.is_contiguous() and not dy.is_contiguous()
    _check(ops.gelu_tanh, _gelu_ref, x, dy)
    h = _x((40, 3, 66), torch.float32, seed=6)[:, 1, :]  # strided rows
    assert not h.is_contiguous()
    _check(ops.swiglu, _swiglu_ref, h, _x((40, 33), torch.float32, seed=7, scale=1.0))
    h = _x((66, 40), torch.bfloat16, seed=8).t()  # transposed
    _check(ops.swiglu, _swiglu_ref, h, _x((40, 33), torch.bfloat16, seed=9, scale=1.0))


def test_expand_broadcast_grad(impl):
    """sum().backward() hands the backward an expanded (stride-0) dy."""
    x = _x((9, 31), torch.float32, seed=10)
    _check(ops.gelu_tanh, _gelu_ref, x, torch.ones(()).expand(9, 31))
    _check(ops.swiglu, _swiglu_ref, x[:, :30], torch.ones(()).expand(9, 15))


@pytest.mark.parametrize("dtype", DTYPES)
def test_special_values(impl, dtype):
    """Large |x|, zeros, tiny values, inf and nan, forward and backward: the reference's values
    (nan where it gives nan: gelu(-inf), the gradients at +-inf, silu(-inf))."""
    vals = [
        0.0,
        -0.0,
        1e-30,
        -1e-30,
        1e-8,
        -1e-8,
        0.5,
        -0.5,
        1.0,
        -1.0,
        3.0,
        -3.0,
        5.0,
        -5.0,
        5.05,
        -5.05,
        5.2,
        -5.2,
        8.0,
        -8.0,
        10.0,
        -10.0,
        11.0,
        -11.0,
        12.0,
        -12.0,
        30.0,
        -30.0,
        88.0,
        -88.0,
        89.0,
        -89.0,
        100.0,
        -100.0,
        1e4,
        -1e4,
        6e4,
        -6e4,
        float("inf"),
        float("-inf"),
        float("nan"),
    ]
    if dtype == torch.float32:  # (compared with fp64: torch's own fp32 backward overflows in x^2
        vals += [1e20, -1e20, 3e38, -3e38]  # there, to nan; the kernels give the limits, 1 and 0)
    x = torch.tensor(vals).to(dtype)
    _check(ops.gelu_tanh, _gelu_ref, x, torch.ones_like(x), equal_nan=True)
    # SwiGLU: every value as the gate, against up = 1.5, and as the up, against gate = 1.5
    ones = torch.full_like(x, 1.5)
    h = torch.stack([torch.cat([x, ones]), torch.cat([ones, x])])
    _check(ops.swiglu, _swiglu_ref, h, torch.ones(2, x.numel(), dtype=dtype), equal_nan=True)


def test_gelu_dense_sweep():
    """fp32 over a dense sweep of [-12, 12] (every regime: the small-argument range, the
    saturation of tanh around x = +-5.05, the clamped range past |x| = 11.2), and at least as
    accurate as torch's fp32 op there, forward and backward."""
    x = torch.linspace(-12, 12, 400_001)
    dy = torch.ones_like(x)
    y, dx = _check(ops.gelu_tanh, _gelu_ref, x, dy)
    ty, tdx = _grad(_gelu_ref, x, dy)
    ry, rdx = _grad(_gelu_ref, x.double(), dy.double())
    for got, torch32, exact in ((y, ty, ry), (dx, tdx, rdx)):
        assert (got.double() - exact).abs().max() <= (torch32.double() - exact).abs().max()


# ---- the raw kernels against the reference's forward/backward pairs ----------------------------


@requires_cpp
@pytest.mark.parametrize("dtype", DTYPES)
def test_raw_kernels_match_reference(dtype):
    """megalite._C's forward/backward pairs against the reference's (evaluated in fp64 for fp32
    inputs, see the module docstring; in fp32, as the kernels, for bf16/fp16)."""

    def ref(fn, *ts):
        if dtype == torch.float32:
            return fn(*(t.double() for t in ts)).float()
        return fn(*ts)

    x, dy = _x((5, 1001), dtype, seed=9), _x((5, 1001), dtype, seed=10, scale=1.0)
    _close(dispatch._C.gelu_tanh_fwd(x), ref(reference.gelu_tanh_fwd, x), dtype)
    _close(dispatch._C.gelu_tanh_bwd(dy, x), ref(reference.gelu_tanh_bwd, dy, x), dtype)
    h, dy = _x((5, 2002), dtype, seed=11), _x((5, 1001), dtype, seed=12, scale=1.0)
    _close(dispatch._C.swiglu_fwd(h), ref(reference.swiglu_fwd, h), dtype)
    _close(dispatch._C.swiglu_bwd(dy, h), ref(reference.swiglu_bwd, dy, h), dtype)


def test_reference_pairs_match_autograd():
    """The reference's explicit backward formulas against torch's autograd (the oracle's oracle)."""
    h, dy = _x((4, 2 * 37), torch.float64, seed=13), _x((4, 37), torch.float64, seed=14, scale=1.0)
    y, dh = _grad(reference.swiglu, h, dy)
    torch.testing.assert_close(reference.swiglu_fwd(h), y)
    torch.testing.assert_close(reference.swiglu_bwd(dy, h), dh)
    x, dy = _x((4, 37), torch.float64, seed=15), _x((4, 37), torch.float64, seed=16, scale=1.0)
    y, dx = _grad(reference.gelu_tanh, x, dy)
    torch.testing.assert_close(reference.gelu_tanh_fwd(x), y)
    torch.testing.assert_close(reference.gelu_tanh_bwd(dy, x), dx)


@requires_cpp
def test_python_function_path(monkeypatch):
    """The autograd Function (the path of a compiled module without C++ autograd nodes) with the
    C++ kernels, against the C++ nodes: the same bits."""
    monkeypatch.delenv("MEGALITE_KERNELS", raising=False)
    x, dy = _x((3, 777), torch.float32, seed=17), _x((3, 777), torch.float32, seed=18, scale=1.0)
    y1, dx1 = _grad(ops.gelu_tanh, x, dy)
    y2, dx2 = _grad(
        lambda t: activations._SavedInputFn.apply(
            t, dispatch._C.gelu_tanh_fwd, dispatch._C.gelu_tanh_bwd
        ),
        x,
        dy,
    )
    assert torch.equal(y1, y2) and torch.equal(dx1, dx2)
    h = _x((3, 2 * 777), torch.bfloat16, seed=19)
    dy = _x((3, 777), torch.bfloat16, seed=20, scale=1.0)
    y1, dh1 = _grad(ops.swiglu, h, dy)
    y2, dh2 = _grad(
        lambda t: activations._SavedInputFn.apply(
            t, dispatch._C.swiglu_fwd, dispatch._C.swiglu_bwd
        ),
        h,
        dy,
    )
    assert torch.equal(y1, y2) and torch.equal(dh1, dh2)
    monkeypatch.setattr(activations, "_CPP_NODES", False)  # ops.* then take the Function path
    y3, dh3 = _grad(ops.swiglu, h, dy)
    assert torch.equal(y1, y3) and torch.equal(dh1, dh3)
    assert "SavedInputFn" in type(ops.swiglu(h.requires_grad_()).grad_fn).__name__


@requires_cpp
def test_same_bits_for_any_thread_count():
    x = _x((4, 50000), torch.float32, seed=21)
    dy = _x((4, 50000), torch.float32, seed=22, scale=1.0)
    h = _x((4, 2 * 50000), torch.bfloat16, seed=23)
    threads = torch.get_num_threads()
    out = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            out.append([*_grad(ops.gelu_tanh, x, dy), *_grad(ops.swiglu, h, dy.to(torch.bfloat16))])
    finally:
        torch.set_num_threads(threads)
    for other in out[1:]:
        for a, b in zip(out[0], other):
            assert torch.equal(a, b)


def test_gradcheck_float64():
    """float64 runs the reference (no compiled kernel for it): its backward is the exact one."""
    x = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(ops.gelu_tanh, (x,))
    h = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(ops.swiglu, (h,))


# ---- dispatch ----------------------------------------------------------------------------------


def test_dispatch(monkeypatch):
    monkeypatch.delenv("MEGALITE_KERNELS", raising=False)
    x = torch.randn(4, 8, requires_grad=True)
    for op in ("gelu_tanh", "swiglu"):
        assert dispatch.choose(op, "cuda")[0] == "torch"  # torch's own op on CUDA
        if dispatch._C is not None:
            impl, _, reason = dispatch.choose(op, "cpu")
            assert impl == "cpp", reason
    if activations._CPP_NODES:  # the C++ node, not torch's autograd of the expression
        assert "Gelu" not in type(ops.gelu_tanh(x).grad_fn).__name__
        assert "Mul" not in type(ops.swiglu(x).grad_fn).__name__
    monkeypatch.setenv("MEGALITE_KERNELS", "reference")
    assert dispatch.choose("gelu_tanh", "cpu")[0] == "reference"
    assert type(ops.gelu_tanh(x).grad_fn).__name__ == "GeluBackward0"
    assert type(ops.swiglu(x).grad_fn).__name__ == "MulBackward0"
    report = {r["op"]: r for r in ops.kernel_report()}
    assert report["gelu_tanh"]["impl"] == "reference"
    assert "MEGALITE_KERNELS" in report["swiglu"]["reason"]


def test_unsupported_dtype_runs_reference(monkeypatch):
    monkeypatch.delenv("MEGALITE_KERNELS", raising=False)
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    assert type(ops.gelu_tanh(x).grad_fn).__name__ == "GeluBackward0"
    torch.testing.assert_close(ops.swiglu(x), _swiglu_ref(x))


def test_swiglu_odd_last_dim_rejected():
    with pytest.raises(ValueError, match="must be even"):
        ops.swiglu(torch.randn(3, 5))
    with pytest.raises(ValueError, match="must be even"):
        ops.swiglu(torch.tensor(1.0))


def test_gelu_scalar_input(impl):
    _check(ops.gelu_tanh, _gelu_ref, torch.tensor(0.7), torch.tensor(1.3))


# ---- the kernels' own exp ----------------------------------------------------------------------


def _ulps(actual, exact64):
    """|actual - exact| in units in the last place of the correctly rounded fp32 result."""
    r = exact64.float()
    ulp = (torch.nextafter(r.abs(), torch.tensor(float("inf"))) - r.abs()).double()
    return (actual.double() - exact64).abs() / ulp


@requires_cpp
def test_exp_accuracy():
    """Within 1 ulp of the exact exp over the kernels' whole domain, [-87, 87], and within 2 ulp
    of torch's exp; exactly 1 at 0."""
    x = torch.cat(
        [
            torch.linspace(-87, 87, 1_000_001),
            torch.linspace(-1, 1, 200_001),
            -torch.logspace(-40, 1.9, 10_001),
            torch.logspace(-40, 1.9, 10_001),
            torch.tensor([0.0, -0.0, 1e-45, -1e-45, 87.0, -87.0]),
        ]
    )
    got = dispatch._C.exp_f32(x)
    exact = torch.exp(x.double())
    assert _ulps(got, exact).max() <= 1.0
    assert _ulps(got, torch.exp(x).double()).max() <= 2.0
    assert got[-6] == 1 and got[-5] == 1
