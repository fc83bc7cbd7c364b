"""ops.sum_of_squares (the global grad norm's one pass) against a float64 sum, on awkward sizes
and mixed dtypes; inf/nan propagation; the same bits for any thread count."""

import pytest
import torch

import megalite.ops as ops
from megalite.ops import dispatch

# Odd lengths, one element, empty, and enough to span several of the kernel's 64K-element
# blocks and both threads, with a block boundary inside a tensor.
SIZES = [(1,), (7,), (0,), (33, 17), (255,), (257,), (100_003,), (70_000,)]


def _tensors(dtypes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(s, generator=g) * 3).to(dt) for s, dt in zip(SIZES, dtypes)]


def _exact(tensors):
    return sum(float((t.double() ** 2).sum()) for t in tensors)


def _rel(impl):
    # The kernel sums 16 squares at a time in fp32 and the rest in double; the reference is
    # torch's fp32 _foreach_norm, squared.
    return 1e-6 if impl == "compiled" else 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_float64_sum(impl, dtype):
    ts = _tensors([dtype] * len(SIZES))
    got = ops.sum_of_squares(ts)
    assert got.dtype == torch.float32 and got.dim() == 0
    assert got.item() == pytest.approx(_exact(ts), rel=_rel(impl))


def test_mixed_dtypes_and_non_contiguous(impl):
    ts = _tensors([torch.float32, torch.bfloat16, torch.float16, torch.float32] * 2)
    ts.append(torch.randn(40, 30)[:, ::3])  # a strided view: no kernel, still counted
    ts.append(torch.randn(50, dtype=torch.float64))  # no kernel for fp64 either
    assert ops.sum_of_squares(ts).item() == pytest.approx(_exact(ts), rel=_rel(impl))


def test_empty_lists_and_tensors(impl):
    assert ops.sum_of_squares([]).item() == 0.0
    assert ops.sum_of_squares([torch.empty(0), torch.empty(0, 5)]).item() == 0.0


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_inf_and_nan_propagate(impl, bad):
    for where in (0, len(SIZES) - 1):
        ts = _tensors([torch.bfloat16] + [torch.float32] * (len(SIZES) - 1))
        ts[where].view(-1)[-1] = bad
        got = ops.sum_of_squares(ts).item()
        assert (got != got) if bad != bad else got == float("inf")


def test_same_bits_for_any_thread_count():
    impl, _, _ = dispatch.choose("sum_of_squares", "cpu")
    ts = _tensors([torch.float32] * len(SIZES)) + [torch.randn(1_000_003)]
    old = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(ops.sum_of_squares(ts).item())
    finally:
        torch.set_num_threads(old)
    assert results[0] == results[1] == results[2], (impl, results)
