"""Gradient bucketing: bucket assignment (DDP's bookkeeping) and multi-tensor flatten/unflatten,
compiled vs reference."""

import random

import pytest
import torch

import megalite.ops as ops
from megalite.ops import dispatch
from megalite.parallel.ddp import assign_buckets


def test_assign_buckets_example():
    f32, bf16 = torch.float32, torch.bfloat16
    # Reverse order of use. A bucket closes once it holds >= 100 elements; each dtype has its own.
    numels = [60, 50, 10, 300, 5, 70, 40, 1]
    dtypes = [f32, f32, bf16, f32, f32, bf16, bf16, f32]
    assert assign_buckets(numels, dtypes, 100) == [[0, 1], [2, 5, 6], [3], [4, 7]]
    assert assign_buckets([], [], 10) == []
    assert assign_buckets([0, 0, 5], [f32] * 3, 1) == [[0, 1, 2]]
    assert assign_buckets([3], [f32], 10**12) == [[0]]


def test_assign_buckets_random_properties():
    rng = random.Random(0)
    kinds = [torch.float32, torch.bfloat16, torch.float16]
    for _ in range(200):
        n = rng.randint(0, 40)
        numels = [rng.choice([0, 1, 7, 100, 4096, 10**6]) for _ in range(n)]
        dtypes = [rng.choice(kinds[: rng.randint(1, 3)]) for _ in range(n)]
        size = rng.choice([1, 50, 5000, 2 * 10**6])
        got = assign_buckets(numels, dtypes, size)
        # Every param exactly once, in order inside a bucket, and never two dtypes in a bucket;
        # buckets ordered by their first param.
        assert sorted(i for b in got for i in b) == list(range(n))
        assert [b[0] for b in got] == sorted(b[0] for b in got)
        for b in got:
            assert b == sorted(b) and len({dtypes[i] for i in b}) == 1
        for dt in set(dtypes):
            # Only the last bucket of each dtype may be under size, and a bucket closes as
            # soon as it reaches the size (without its last param it was under).
            sizes = [(sum(numels[i] for i in b), numels[b[-1]]) for b in got if dtypes[b[0]] == dt]
            assert all(s >= size and s - last < size for s, last in sizes[:-1])


def test_assign_buckets_errors():
    with pytest.raises(ValueError, match="positive"):
        assign_buckets([1], [torch.float32], 0)
    with pytest.raises(ValueError, match="dtypes"):
        assign_buckets([1, 2], [torch.float32], 10)


def _tensors(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(1,), (0,), (17,), (3, 5, 7), (100_003,), (2, 1), (999,)]
    return [
        torch.randn(s, generator=g).to(dtype)
        if dtype.is_floating_point
        else torch.randint(-1000, 1000, s, generator=g).to(dtype)
        for s in shapes
    ]


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.uint8]
)
def test_flatten_round_trip_exact(impl, dtype):
    src = _tensors(dtype)
    total = sum(t.numel() for t in src)
    buf = torch.full((total + 13,), 7, dtype=dtype)  # padding at the end must stay as it is
    ops.flatten_into(src, buf)
    assert torch.equal(buf[:total], torch.cat([t.reshape(-1) for t in src]))
    assert torch.equal(buf[total:], torch.full((13,), 7, dtype=dtype))
    out = [torch.empty_like(t) for t in src]
    ops.unflatten_from(buf, out)
    for a, b in zip(out, src):
        assert torch.equal(a, b)


def test_flatten_non_contiguous_and_views(impl):
    base = torch.randn(40, 30)
    src = [base.t(), base[::3, 1:], torch.randn(5)]  # two strided views
    buf = torch.empty(sum(t.numel() for t in src))
    ops.flatten_into(src, buf)
    assert torch.equal(buf, torch.cat([t.reshape(-1) for t in src]))
    dst = [torch.zeros(40, 30).t(), torch.zeros(40, 29)[::3], torch.zeros(5)]
    ops.unflatten_from(buf, dst)
    for a, b in zip(dst, src):
        assert torch.equal(a, b)


def test_flatten_many_threads_agree():
    src = _tensors(torch.float32, seed=1)
    results = []
    old = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            buf = torch.empty(sum(t.numel() for t in src))
            ops.flatten_into(src, buf)
            results.append(buf)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(results[0], results[1])


def test_flatten_errors(impl):
    with pytest.raises(ValueError, match="only 3"):
        ops.flatten_into([torch.zeros(2), torch.zeros(2)], torch.zeros(3))
    with pytest.raises(ValueError, match="dtype"):
        ops.flatten_into([torch.zeros(2, dtype=torch.float16)], torch.zeros(3))
    with pytest.raises(ValueError, match="1-D"):
        ops.unflatten_from(torch.zeros(2, 2), [torch.zeros(4)])


def test_compiled_kernels_used(monkeypatch):
    monkeypatch.delenv("MEGALITE_KERNELS", raising=False)
    impl, _, reason = dispatch.choose("flatten", "cpu")
    assert impl == "cpp", reason


def test_flatten_large_streaming(impl):
    """Above 16 MB the C++ copy uses streaming stores; misaligned buffer views included."""
    src = [torch.randn(n) for n in (3, 4_500_000, 7, 1_000_001)]
    total = sum(t.numel() for t in src)
    storage = torch.zeros(total + 2)
    buf = storage[1 : 1 + total]
    ops.flatten_into(src, buf)
    assert torch.equal(buf, torch.cat(src))
    assert storage[0].item() == 0 and storage[-1].item() == 0
    out = [torch.empty_like(t) for t in src]
    ops.unflatten_from(buf, out)
    for a, b in zip(out, src):
        assert torch.equal(a, b)
