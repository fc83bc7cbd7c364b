"""Fused AdamW (functional ops.fused_adamw_ and the FusedAdamW optimizer) against
torch.optim.AdamW, on awkward sizes; the inf/nan contract. The oracle is torch's optimizer, never
megalite.ops.reference, so the MEGALITE_KERNELS=reference runs (the `impl` fixture) check the
reference too."""

import copy
import pickle

import pytest
import torch

from megalite import ops
from megalite.ops import dispatch
from megalite.optim.fused_adamw import FusedAdamW

# Not multiples of any vector width, a single element, empty, and one big enough to be split
# between threads (the C++ kernel's grain is 32K elements).
SIZES = [(1,), (7,), (0,), (33, 17), (3, 5, 7), (1000,), (100_003,)]
HYPER = {"lr": 1e-2, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.1}


def _model(seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in SIZES]


def _set_grads(params, step, scale=1.0):
    g = torch.Generator().manual_seed(1000 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * scale


def torch_adamw(
    params,
    grads,
    exp_avgs,
    exp_avg_sqs,
    steps,
    lr,
    beta1,
    beta2,
    eps,
    weight_decay,
    grad_scale=1.0,
    first_step=1,
):
    """The oracle: torch.optim.AdamW run for steps first_step, first_step + 1, ... (`steps` of
    them) with the same grads every step, on copies of params and moments (any start values),
    with the grads upcast to fp32 and divided by grad_scale. Returns the new (params, exp_avgs,
    exp_avg_sqs)."""
    ps = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = torch.optim.AdamW(
        ps, lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay, foreach=False
    )
    for p, m, v in zip(ps, exp_avgs, exp_avg_sqs):
        opt.state[p] = {
            "step": torch.tensor(float(first_step - 1)),
            "exp_avg": m.clone(),
            "exp_avg_sq": v.clone(),
        }
    for _ in range(steps):
        for p, g in zip(ps, grads):
            p.grad = g.float() / grad_scale
        opt.step()
    return (
        [p.detach() for p in ps],
        [opt.state[p]["exp_avg"] for p in ps],
        [opt.state[p]["exp_avg_sq"] for p in ps],
    )


def assert_adamw_close(got, want, rtol=1e-6, atol=1e-7):
    """Params and moments (lists of equal length) at torch.optim.AdamW's fp32 rounding (the
    CUDA tests allow more: FMA contraction, and millions of elements)."""
    assert len(got) == len(want)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def _groups(params):
    # Two groups with different lr and weight decay: one kernel call must honour both.
    return [
        {"params": params[::2], "weight_decay": 0.1},
        {"params": params[1::2], "weight_decay": 0.0, "lr": 3e-3},
    ]


def _step_side_by_side(opt, ref, ours, theirs, steps):
    """The same grads for both optimizers at each step; then their params must agree."""
    for step in steps:
        _set_grads(ours, step)
        _set_grads(theirs, step)
        opt.step()
        ref.step()
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_matches_torch_adamw_10_steps(impl):
    ours, theirs = _model(0), _model(0)
    opt = FusedAdamW(_groups(ours), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.05)
    ref = torch.optim.AdamW(
        _groups(theirs), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.05
    )
    for step in range(10):
        _set_grads(ours, step)
        _set_grads(theirs, step)
        opt.step()
        ref.step()
        assert not opt.found_inf
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opt.state[p][key], ref.state[q][key], rtol=1e-6, atol=1e-7)
        assert opt.state[p]["step"].item() == ref.state[q]["step"].item() == 10


def test_state_dict_round_trip_with_torch_adamw():
    ours, theirs = _model(1), _model(1)
    opt = FusedAdamW(_groups(ours), lr=1e-2)
    for step in range(3):
        _set_grads(ours, step)
        opt.step()
    # FusedAdamW -> torch.optim.AdamW: torch continues exactly where we stopped.
    with torch.no_grad():
        for p, q in zip(ours, theirs):
            q.copy_(p)
    ref = torch.optim.AdamW(_groups(theirs), lr=1e-2)
    # deepcopy stands for torch.save/torch.load: state_dict() returns references to live state.
    ref.load_state_dict(copy.deepcopy(opt.state_dict()))
    _step_side_by_side(opt, ref, ours, theirs, range(3, 6))
    # torch.optim.AdamW -> FusedAdamW.
    again = _model(2)
    with torch.no_grad():
        for p, q in zip(again, theirs):
            p.copy_(q)
    opt2 = FusedAdamW(_groups(again), lr=1.0)  # lr comes from the loaded groups
    opt2.load_state_dict(copy.deepcopy(ref.state_dict()))
    assert opt2.param_groups[1]["lr"] == 3e-3
    _set_grads(again, 6)
    _set_grads(theirs, 6)
    opt2.step()
    ref.step()
    for p, q in zip(again, theirs):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        assert opt2.state[p]["step"].item() == 7


def _snapshot(opt, params):
    return [p.detach().clone() for p in params], copy.deepcopy(opt.state_dict())


def _assert_untouched(opt, params, snapshot):
    before, state_before = snapshot
    for p, b in zip(params, before):
        assert torch.equal(p, b)
    after = opt.state_dict()
    for k, s in state_before["state"].items():
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(after["state"][k][key], s[key])


def test_grad_scale_is_checked_and_skips_on_inf(impl):
    """A step given a grad scale is checked (torch's fused AdamW under a GradScaler): an
    overflowed grad skips the whole step and sets found_inf; the default optimizer does this."""
    params = _model(3)
    opt = FusedAdamW(params, lr=1e-2)
    twin = copy.deepcopy(params)
    opt_twin = FusedAdamW(twin, lr=1e-2)
    _set_grads(params, 0, scale=1024.0)
    _set_grads(twin, 0)
    opt.step(grad_scale=1024.0)
    opt_twin.step()
    assert not opt.found_inf
    for p, q in zip(params, twin):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    snapshot = _snapshot(opt, params)
    _set_grads(params, 1, scale=1024.0)
    params[-1].grad[5] = float("inf")
    opt.step(grad_scale=1024.0)
    assert opt.found_inf
    _assert_untouched(opt, params, snapshot)
    # grad_scale=1.0 given explicitly is a scaled step too (a GradScaler at scale 1).
    params[-1].grad[5] = float("nan")
    opt.step(grad_scale=1.0)
    assert opt.found_inf
    _assert_untouched(opt, params, snapshot)
    _set_grads(params, 1, scale=1024.0)
    opt.step(grad_scale=1024.0)
    assert not opt.found_inf and opt.state[params[0]]["step"].item() == 2


def test_default_does_not_check_like_torch(impl):
    """FusedAdamW() without a grad scale follows torch.optim.AdamW: no inf/nan pass, an inf grad
    propagates into the weights exactly where torch's does, and found_inf stays False."""
    ours, theirs = _model(4), _model(4)
    opt = FusedAdamW(_groups(ours), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.05)
    assert opt.check_finite is None
    ref = torch.optim.AdamW(_groups(theirs), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.05)
    _step_side_by_side(opt, ref, ours, theirs, range(2))
    _set_grads(ours, 2)
    _set_grads(theirs, 2)
    for ps in (ours, theirs):
        ps[3].grad.view(-1)[10] = float("inf")
        ps[5].grad.view(-1)[0] = float("nan")
    opt.step()
    ref.step()
    assert not opt.found_inf
    assert opt.state[ours[0]]["step"].item() == 3
    for p, q in zip(ours, theirs):
        assert torch.equal(torch.isfinite(p), torch.isfinite(q))
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, equal_nan=True)
    assert not torch.isfinite(ours[3]).all() and not torch.isfinite(ours[5]).all()
    assert torch.isfinite(ours[0]).all()


def test_check_finite_true_checks_every_step(impl):
    """check_finite=True: every step is checked, with or without a grad scale."""
    params = _model(6)
    opt = FusedAdamW(params, lr=1e-2, check_finite=True)
    _set_grads(params, 0)
    opt.step()
    assert not opt.found_inf
    snapshot = _snapshot(opt, params)
    _set_grads(params, 1)
    params[0].grad[0] = float("-inf")
    opt.step()
    assert opt.found_inf
    _assert_untouched(opt, params, snapshot)
    _set_grads(params, 1)
    opt.step()
    assert not opt.found_inf and opt.state[params[0]]["step"].item() == 2


def test_check_finite_false_never_checks_even_scaled(impl):
    """check_finite=False: the caller vouches, even for a scaled step (the grads are divided
    by the scale, nothing is looked for)."""
    params = _model(7)
    opt = FusedAdamW(params, lr=1e-2, check_finite=False)
    _set_grads(params, 0, scale=8.0)
    params[3].grad.view(-1)[2] = float("nan")
    opt.step(grad_scale=8.0)
    assert not opt.found_inf
    assert torch.isnan(params[3].view(-1)[2]) and torch.isfinite(params[3].view(-1)[3])
    assert opt.state[params[0]]["step"].item() == 1


def _functional_inputs(grad_dtype, copy_dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = [torch.randn(s, generator=g) for s in SIZES]
    grads = [(torch.randn(s, generator=g) * 3).to(grad_dtype) for s in SIZES]
    m = [torch.randn(s, generator=g) * 0.1 for s in SIZES]
    v = [torch.rand(s, generator=g) * 0.01 for s in SIZES]
    copies = None if copy_dtype is None else [torch.zeros(s, dtype=copy_dtype) for s in SIZES]
    return p, grads, m, v, copies


@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("copy_dtype", [None, torch.bfloat16, torch.float16, torch.float32])
def test_mixed_precision_matches_fp32_reference(impl, grad_dtype, copy_dtype):
    """fp32 main params and moments, low-precision grads (scaled by the loss scale), model copy
    written in the same pass: against the reference run on the grads upcast to fp32."""
    p, grads, m, v, copies = _functional_inputs(grad_dtype, copy_dtype)
    want = torch_adamw(p, grads, m, v, 3, grad_scale=8.0, **HYPER)
    for step in (1, 2, 3):
        found = ops.fused_adamw_(
            p, grads, m, v, step=step, grad_scale=8.0, model_copies=copies, **HYPER
        )
        assert found is False
    assert_adamw_close(p + m + v, sum(want, []))
    if copies is not None:
        for c, a in zip(copies, p):
            # The copy is the updated param rounded to nearest (even) in the copy's dtype.
            assert c.dtype == copy_dtype and torch.equal(c, a.to(copy_dtype))


@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_inf_nan_leaves_everything_untouched(impl, grad_dtype, bad):
    for tensor_index, element in [(0, 0), (3, 100), (len(SIZES) - 1, -1), (len(SIZES) - 1, 50_000)]:
        p, grads, m, v, copies = _functional_inputs(grad_dtype, torch.bfloat16, seed=tensor_index)
        grads[tensor_index].view(-1)[element] = bad
        before = [t.clone() for t in p + m + v + copies]
        found = ops.fused_adamw_(p, grads, m, v, step=1, model_copies=copies, **HYPER)
        assert found is True
        for a, b in zip(p + m + v + copies, before):
            assert torch.equal(a, b)


@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
def test_unchecked_step_same_result_and_no_check(impl, grad_dtype):
    """check_finite=False: with finite grads the very same bytes as the checked step; with a nan
    it really does not look (the nan reaches that param, as in torch.optim.AdamW), so the
    caller's guarantee is what keeps the params clean."""
    p, grads, m, v, copies = _functional_inputs(grad_dtype, torch.bfloat16)
    q, qm, qv, qc = (copy.deepcopy(t) for t in (p, m, v, copies))
    for step in (1, 2):
        assert ops.fused_adamw_(p, grads, m, v, step=step, model_copies=copies, **HYPER) is False
        assert (
            ops.fused_adamw_(
                q, grads, qm, qv, step=step, model_copies=qc, check_finite=False, **HYPER
            )
            is False
        )
    for a, b in zip(p + m + v + copies, q + qm + qv + qc):
        assert torch.equal(a, b)
    grads[3].view(-1)[7] = float("nan")
    assert (
        ops.fused_adamw_(q, grads, qm, qv, step=3, model_copies=qc, check_finite=False, **HYPER)
        is False
    )
    assert torch.isnan(q[3].view(-1)[7]) and torch.isfinite(q[3].view(-1)[8])
    assert torch.isfinite(q[0]).all()


def test_fused_adamw_check_finite_false_matches_torch(impl):
    ours, theirs = _model(5), _model(5)
    opt = FusedAdamW(
        _groups(ours), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.05, check_finite=False
    )
    ref = torch.optim.AdamW(_groups(theirs), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.05)
    _step_side_by_side(opt, ref, ours, theirs, range(3))
    ours[1].grad[0] = float("inf")  # not looked at: torch's behaviour, found_inf stays False
    opt.step()
    assert not opt.found_inf and not torch.isfinite(ours[1]).all()
    sd = opt.state_dict()  # the flag is not a param-group key: torch's state dict
    assert "check_finite" not in sd["param_groups"][0]


def test_pickled_optimizer_keeps_its_contract():
    """check_finite survives pickling and deepcopy; a pickle without it (older megalite) gets
    today's default."""
    params = _model(8)
    for flag in (True, False, None):
        opt = FusedAdamW(params, lr=1e-2, check_finite=flag)
        assert copy.deepcopy(opt).check_finite is flag
        assert pickle.loads(pickle.dumps(opt)).check_finite is flag
    state = opt.__getstate__()
    state.pop("check_finite")
    old = FusedAdamW.__new__(FusedAdamW)
    old.__setstate__(state)
    assert old.check_finite is None


def test_threads_do_not_change_results():
    results = []
    old = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            p, grads, m, v, copies = _functional_inputs(torch.float32, torch.bfloat16)
            ops.fused_adamw_(p, grads, m, v, step=4, model_copies=copies, **HYPER)
            results.append(p + m + v + copies)
    finally:
        torch.set_num_threads(old)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_fallbacks_and_errors(impl):
    p, grads, m, v, _ = _functional_inputs(torch.float32, None)
    # A non-contiguous grad takes the reference path; the result is the same.
    grads_nc = [torch.stack([g, g], dim=-1)[..., 0] if g.dim() else g for g in grads]
    assert not grads_nc[3].is_contiguous()
    want = torch_adamw(p, grads, m, v, 1, **HYPER)
    ops.fused_adamw_(p, grads_nc, m, v, step=1, **HYPER)
    assert_adamw_close(p + m + v, sum(want, []))
    with pytest.raises(ValueError, match="7 params but 6 grads"):
        ops.fused_adamw_(p, grads[:-1], m, v, step=1, **HYPER)
    with pytest.raises(ValueError, match="elements"):
        ops.fused_adamw_(p[:1], [torch.zeros(2)], m[:1], v[:1], step=1, **HYPER)
    with pytest.raises(ValueError, match="grad_scale"):
        ops.fused_adamw_(p, grads, m, v, step=1, grad_scale=0.0, **HYPER)
    assert ops.fused_adamw_([], [], [], [], step=1, **HYPER) is False


def test_bf16_params_without_master_weights():
    """bf16 params (no fp32 master) are legal for FusedAdamW, like for torch.optim.AdamW."""
    ours = [torch.nn.Parameter(torch.randn(37).bfloat16())]
    theirs = [torch.nn.Parameter(ours[0].detach().clone())]
    opt, ref = FusedAdamW(ours, lr=1e-2), torch.optim.AdamW(theirs, lr=1e-2)
    for step in range(3):
        grad = torch.randn(37, generator=torch.Generator().manual_seed(step)).bfloat16()
        ours[0].grad, theirs[0].grad = grad.clone(), grad.clone()
        opt.step()
        ref.step()
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-2, atol=1e-2)


def test_compiled_kernel_used(monkeypatch):
    monkeypatch.delenv("MEGALITE_KERNELS", raising=False)
    impl, _, reason = dispatch.choose("fused_adamw", "cpu")
    assert impl == "cpp", reason


def test_large_step_streams_model_copies(impl):
    """Above 4M elements the C++ kernel streams the model copies past the cache (another code
    path); misaligned copies (views into a flat buffer) included."""
    sizes = [4_000_001, 3, 600_000]
    p, grads, m, v, _ = _functional_inputs(torch.bfloat16, None)
    g = torch.Generator().manual_seed(9)
    p = [torch.randn(n, generator=g) for n in sizes]
    grads = [torch.randn(n, generator=g).bfloat16() for n in sizes]
    m = [torch.zeros(n) for n in sizes]
    v = [torch.zeros(n) for n in sizes]
    flat = torch.zeros(sum(sizes) + 1, dtype=torch.bfloat16)
    copies, offset = [], 1
    for n in sizes:
        copies.append(flat[offset : offset + n])
        offset += n
    want = torch_adamw(p, grads, m, v, 1, **HYPER)
    assert ops.fused_adamw_(p, grads, m, v, step=1, model_copies=copies, **HYPER) is False
    assert_adamw_close(p + m + v, sum(want, []))
    for c, a in zip(copies, p):
        assert torch.equal(c, a.bfloat16())
    assert flat[0].item() == 0


def test_some_params_without_model_copy(impl):
    """model_copies may hold None for params that have no low-precision copy (one call for all)."""
    p, grads, m, v, copies = _functional_inputs(torch.float32, torch.bfloat16)
    copies[1] = copies[4] = None
    want = torch_adamw(p, grads, m, v, 1, first_step=2, **HYPER)
    assert ops.fused_adamw_(p, grads, m, v, step=2, model_copies=copies, **HYPER) is False
    assert_adamw_close(p + m + v, sum(want, []))
    for c, a in zip(copies, p):
        assert c is None or torch.equal(c, a.bfloat16())
