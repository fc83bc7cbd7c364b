"""Fused AdamW with its grad scale, inf flag and step number as 1-element tensors on the params'
device, as the trainer's step passes them so that it reads nothing back (issue 12, item 9).

Against torch.optim.AdamW (the oracle of tests/test_kernels_adamw.py), and bitwise against the
same call with the scale (the step) as a float (on a GPU the step's bias corrections are
derived on the device: as close as double math there allows); a set flag updates nothing,
model copies included; the Python layers never read any of these tensors. Every test runs
through dispatch (the C++ kernel here, the CUDA kernel on a GPU) and through the reference (the
`impl` fixture). The CUDA cases skip here; on a GPU they also run under
torch.cuda.set_sync_debug_mode("error").
"""

import contextlib

import pytest
import torch

from megalite import ops
from megalite.ops import dispatch
from test_kernels_adamw import assert_adamw_close, torch_adamw

HYPER = {"lr": 1e-2, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.1}
STEP = 5  # past the first step, so bias correction matters
SCALE = 3.0  # not a power of two: the kernels' reciprocal of it is not exact
# Not multiples of a vector width, one big enough to be split between threads / many blocks.
SIZES = [(7,), (33, 17), (100_003,)]

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    ),
]


def make_state(device, mixed=False, seed=0):
    """fp32 params and moments (v >= 0); grads fp32, or bf16 with bf16 model copies (mixed
    precision: what MixedPrecisionOptimizer hands the kernel)."""
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g) for s in SIZES]
    grads = [torch.randn(s, generator=g) * SCALE for s in SIZES]
    exp_avgs = [torch.randn(s, generator=g) * 0.1 for s in SIZES]
    exp_avg_sqs = [torch.rand(s, generator=g) * 0.01 for s in SIZES]
    copies = None
    if mixed:
        grads = [x.bfloat16() for x in grads]
        copies = [p.bfloat16() for p in params]
    move = lambda ts: None if ts is None else [t.to(device) for t in ts]  # noqa: E731
    return dict(
        params=move(params),
        grads=move(grads),
        exp_avgs=move(exp_avgs),
        exp_avg_sqs=move(exp_avg_sqs),
        model_copies=move(copies),
    )


def clone_state(st):
    return {k: None if v is None else [t.clone() for t in v] for k, v in st.items()}


def step(st, at=STEP, **kw):
    """One call at step `at`: a number (a list of it), or a 1-element tensor."""
    n = len(st["params"])
    hyper = {k: [v] * n for k, v in HYPER.items()}
    at = at if isinstance(at, torch.Tensor) else [float(at)] * n
    return ops.multi_tensor_adamw_(**st, **hyper, step=at, **kw)


def tensors_of(st):
    return [t for k in ("params", "exp_avgs", "exp_avg_sqs", "model_copies") for t in st[k] or []]


@contextlib.contextmanager
def no_host_reads(device):
    """Fail on any read of a tensor's value by the host: Python-level reads always, and on CUDA
    any synchronising operation at all."""

    def refuse(*args, **kwargs):
        raise AssertionError("the host read a tensor value")

    with pytest.MonkeyPatch.context() as mp:
        for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
            mp.setattr(torch.Tensor, name, refuse)
        if device == "cuda":
            torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            if device == "cuda":
                torch.cuda.set_sync_debug_mode(0)


def torch_reference(st, **kw):
    """torch.optim.AdamW's one step (at STEP) on CPU copies of the state."""
    copies = [[t.cpu() for t in st[k]] for k in ("params", "grads", "exp_avgs", "exp_avg_sqs")]
    return torch_adamw(*copies, steps=1, first_step=STEP, **kw, **HYPER)


def test_dispatch_takes_the_compiled_kernel_on_the_cpu(impl):
    """So that the `compiled` cases below check csrc/adamw.cpp, not the reference again."""
    _, module, _ = dispatch.choose("fused_adamw", torch.device("cpu"))
    assert (module is not None) == (impl == "compiled")


@pytest.mark.parametrize("mixed", [False, True], ids=["fp32", "bf16-grads-and-copies"])
@pytest.mark.parametrize("device", DEVICES)
def test_device_scale_matches_torch_adamw(impl, device, mixed):
    st = make_state(device, mixed)
    want = torch_reference(st, grad_scale=SCALE)
    scale = torch.tensor([SCALE], device=device)
    with no_host_reads(device):
        found = step(st, grad_scale=scale, check_finite=False)
    assert found is False
    got = [st[k] for k in ("params", "exp_avgs", "exp_avg_sqs")]
    for g, w in zip(got, want):
        assert_adamw_close([t.cpu() for t in g], w)
    if mixed:  # the model copy is the bf16 rounding of the new fp32 param
        for c, p in zip(st["model_copies"], st["params"]):
            assert torch.equal(c, p.bfloat16())


@pytest.mark.parametrize("shape", [(1,), ()], ids=["1-element", "0-dim"])
@pytest.mark.parametrize("device", DEVICES)
def test_device_scale_is_bitwise_the_float_scale(impl, device, shape):
    """The device path reads the same number: 1 / scale rounded once to fp32, as the float
    path derives it (in double, then fp32)."""
    a, b = make_state(device, mixed=True), make_state(device, mixed=True)
    step(a, grad_scale=SCALE, check_finite=False)
    step(b, grad_scale=torch.full(shape, SCALE, device=device), check_finite=False)
    for x, y in zip(tensors_of(a), tensors_of(b)):
        assert torch.equal(x, y)


@pytest.mark.parametrize("at", [1, STEP, 10_000], ids=["step-1", f"step-{STEP}", "step-10000"])
@pytest.mark.parametrize("device", DEVICES)
def test_device_step_is_the_float_step(impl, device, at):
    """A step number in a tensor gives the float step's update: bitwise on the CPU (the kernel
    reads it from host memory and derives the same doubles); on a GPU the bias corrections are
    computed in the kernel, in double, to within the last bit of fp32."""
    a, b = make_state(device, mixed=True), make_state(device, mixed=True)
    step(a, at, grad_scale=SCALE, check_finite=False)
    at_tensor = torch.tensor([float(at)], device=device)
    with no_host_reads(device):
        step(b, at_tensor, grad_scale=torch.tensor([SCALE], device=device), check_finite=False)
    for x, y in zip(tensors_of(a), tensors_of(b)):
        if device == "cpu":
            assert torch.equal(x, y)
        else:  # a step off by one moves params by ~1e-3 here; one fp32 ulp of the bias
            torch.testing.assert_close(y.float(), x.float(), rtol=1e-6, atol=1e-8)
    assert at_tensor.item() == at  # the caller's count is left as it was


@pytest.mark.parametrize("device", DEVICES)
def test_device_step_matches_torch_adamw(impl, device):
    st = make_state(device)
    want = torch_reference(st)
    step(st, torch.tensor([float(STEP)], device=device), check_finite=False)
    for g, w in zip([st[k] for k in ("params", "exp_avgs", "exp_avg_sqs")], want):
        assert_adamw_close([t.cpu() for t in g], w)


@pytest.mark.parametrize(
    "flag",
    [
        (torch.bool, True),
        (torch.int32, 7),
        (torch.float32, 1.0),
        (torch.float32, float("nan")),  # nonzero: a nan flag skips too
    ],
    ids=["bool", "int32", "fp32", "fp32-nan"],
)
@pytest.mark.parametrize("device", DEVICES)
def test_found_inf_updates_nothing(impl, device, flag):
    dtype, value = flag
    st = make_state(device, mixed=True)
    before = [t.clone() for t in tensors_of(st)]
    found_inf = torch.tensor([value], dtype=dtype, device=device)
    flag_before = found_inf.clone()
    with no_host_reads(device):
        result = step(st, grad_scale=torch.tensor([SCALE], device=device), check_finite=False,
                      found_inf=found_inf)  # fmt: skip
    assert result is False  # unchecked: nothing is read back, the caller owns the flag
    for x, y in zip(tensors_of(st), before):
        assert torch.equal(x, y)
    # with check_finite the call reads its flags back anyway, and reports the skip
    assert step(st, grad_scale=SCALE, check_finite=True, found_inf=found_inf) is True
    for x, y in zip(tensors_of(st), before):
        assert torch.equal(x, y)
    # the caller's flag is left as it was (the CUDA check writes into a copy of it)
    torch.testing.assert_close(found_inf, flag_before, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("device", DEVICES)
def test_clear_found_inf_steps_as_without_it(impl, device):
    a, b = make_state(device), make_state(device)
    step(a, grad_scale=SCALE, check_finite=False)
    clear = torch.zeros(1, dtype=torch.bool, device=device)
    assert step(b, grad_scale=SCALE, check_finite=True, found_inf=clear) is False
    for x, y in zip(tensors_of(a), tensors_of(b)):
        assert torch.equal(x, y)


@pytest.mark.parametrize(
    "bad, needle",
    [
        (dict(grad_scale=torch.tensor([SCALE, SCALE])), "grad_scale must be a float or a 1-"),
        (dict(grad_scale=torch.tensor([SCALE], dtype=torch.float64)), "float32 tensor"),
        (dict(found_inf=torch.zeros(2, dtype=torch.bool)), "found_inf must be a float or"),
        (dict(found_inf=torch.zeros(1, dtype=torch.int64)), "bool/int32/float32"),
        (dict(at=torch.tensor([1.0, 2.0])), "step must be a float or a 1-element float32"),
        (dict(at=torch.tensor([1], dtype=torch.int64)), "step must be .* float32 tensor"),
    ],
    ids=["scale-2-elements", "scale-fp64", "flag-2-elements", "flag-int64", "step-2", "step-int"],
)
def test_bad_device_scalars_are_one_line_errors(bad, needle):
    st = make_state("cpu")
    with pytest.raises(ValueError, match=needle):
        step(st, check_finite=False, **bad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_scalars_on_another_device_are_refused():
    st = make_state("cuda")
    with pytest.raises(ValueError, match="on cuda"):
        step(st, grad_scale=torch.tensor([SCALE]), check_finite=False)
