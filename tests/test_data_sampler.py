"""PretrainingSampler: resume from consumed_samples, DP slices, and the DataLoader contract."""

import numpy as np
import pytest

from megalite.data import PretrainingSampler
from megalite.errors import MegaliteError


def batches(total, consumed, mbs, rank, dp, **kw):
    return list(PretrainingSampler(total, consumed, mbs, rank, dp, **kw))


@pytest.mark.parametrize("mbs,dp", [(1, 1), (2, 1), (3, 2), (2, 4)])
def test_resume_equals_uninterrupted(mbs, dp):
    total = 103
    gbs = mbs * dp
    for rank in range(dp):
        full = batches(total, 0, mbs, rank, dp)
        assert len(full) == total // gbs == len(PretrainingSampler(total, 0, mbs, rank, dp))
        for step in range(len(full) + 1):
            assert batches(total, step * gbs, mbs, rank, dp) == full[step:]


def test_union_over_ranks_is_the_global_order_for_every_dp_size():
    total, gbs = 96, 8
    reference = None
    for dp in (1, 2, 4, 8):
        mbs = gbs // dp
        per_rank = [batches(total, 16, mbs, r, dp) for r in range(dp)]
        steps = [sum((per_rank[r][k] for r in range(dp)), []) for k in range(len(per_rank[0]))]
        assert steps == [list(range(16 + k * gbs, 16 + (k + 1) * gbs)) for k in range(len(steps))]
        reference = reference or steps
        assert steps == reference


def test_tail_without_drop_last():
    got = [batches(10, 0, 2, r, 2, drop_last=False) for r in range(2)]
    assert got[0] == [[0, 1], [4, 5], [8]] and got[1] == [[2, 3], [6, 7], [9]]
    assert len(PretrainingSampler(10, 0, 2, 0, 2, drop_last=False)) == 3


@pytest.mark.parametrize(
    "args,match",
    [
        ((10, 11, 1, 0, 1), "consumed_samples"),
        ((10, 0, 1, 2, 2), "data_parallel_rank"),
        ((10, 0, 0, 0, 1), "micro_batch_size"),
        ((0, 0, 1, 0, 1), "no samples"),
    ],
)
def test_bad_arguments(args, match):
    with pytest.raises(MegaliteError, match=match):
        PretrainingSampler(*args)


def test_with_dataloader():
    from torch.utils.data import DataLoader

    data = [np.full(5, i, dtype=np.int64) for i in range(20)]
    loader = DataLoader(data, batch_sampler=PretrainingSampler(20, 6, 2, 1, 2))
    firsts = [b[:, 0].tolist() for b in loader]
    assert firsts == [[8, 9], [12, 13], [16, 17]]
