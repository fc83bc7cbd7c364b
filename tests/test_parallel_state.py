"""Process groups from the rank grid (docs/ARCHITECTURE.md, "Ranks and process groups").

    rank = tp_rank + TP * (dp_rank + DP * pp_rank)

For a world of 8 (TP=2, PP=2, DP=2) every group is checked against lists written out by hand
and against the formula, then 8 gloo ranks build the groups for real and check, with a
collective on each, that they hold exactly those ranks. A layout that does not factor fails
with one line before anything joins or waits.
"""

import itertools
import os
import time

import pytest
import torch

from conftest import free_port, join_gloo, rank_guard, spawn
from megalite.errors import MegaliteError
from megalite.parallel import state

TP, PP, DP = 2, 2, 2

# World of 8, by hand: TP neighbours are adjacent ranks, a PP stage is 4 consecutive ranks.
EXPECTED = {
    "tp": [[0, 1], [2, 3], [4, 5], [6, 7]],
    "dp": [[0, 2], [1, 3], [4, 6], [5, 7]],
    "pp": [[0, 4], [1, 5], [2, 6], [3, 7]],
    "mp": [[0, 1, 4, 5], [2, 3, 6, 7]],
    "embedding": [[0, 4], [1, 5], [2, 6], [3, 7]],
}


def coords(rank, tp=TP, dp=DP):
    return rank % tp, (rank // tp) % dp, rank // (tp * dp)


def by_formula(rank, tp=TP, pp=PP, dp=DP):
    """My groups, from the formula alone: who shares which coordinates with me."""
    t, d, p = coords(rank, tp, dp)
    world = range(tp * pp * dp)
    c = {r: coords(r, tp, dp) for r in world}
    pipeline = sorted((r for r in world if c[r][:2] == (t, d)), key=lambda r: c[r][2])
    return {
        "tp": sorted((r for r in world if c[r][1:] == (d, p)), key=lambda r: c[r][0]),
        "dp": sorted((r for r in world if (c[r][0], c[r][2]) == (t, p)), key=lambda r: c[r][1]),
        "pp": pipeline,
        "mp": sorted(r for r in world if c[r][1] == d),
        "embedding": sorted({pipeline[0], pipeline[-1]}),
    }


def test_group_lists_for_a_world_of_8():
    assert state.group_ranks(TP, PP, DP) == EXPECTED


@pytest.mark.parametrize(
    "tp, pp, dp", [(2, 2, 2), (4, 1, 2), (1, 4, 2), (2, 4, 1), (8, 1, 1), (1, 1, 8), (2, 3, 2)]
)
def test_group_lists_follow_the_formula(tp, pp, dp):
    groups = state.group_ranks(tp, pp, dp)
    for kind, lists in groups.items():
        members = sorted(r for ranks in lists for r in ranks)
        if kind == "embedding":  # first and last stage only
            assert members == sorted(
                r for r in range(tp * pp * dp) if coords(r, tp, dp)[2] in (0, pp - 1)
            ), kind
        else:
            assert members == list(range(tp * pp * dp)), kind  # a partition of the world
    for rank in range(tp * pp * dp):
        mine = {
            kind: next((ranks for ranks in lists if rank in ranks), None)
            for kind, lists in groups.items()
        }
        want = by_formula(rank, tp, pp, dp)
        if 0 < coords(rank, tp, dp)[2] < pp - 1:
            want["embedding"] = None  # a middle stage holds no embedding
        assert mine == want, rank
        assert state.rank_of(*coords(rank, tp, dp), tp, dp) == rank


def test_check_layout_errors():
    assert state.check_layout(8, 2, 2) == 2
    with pytest.raises(
        MegaliteError,
        match="world size 6 is not divisible by tensor-parallel "
        "4 x pipeline-parallel 1; launch a multiple of 4",
    ):
        state.check_layout(6, 4, 1)
    with pytest.raises(MegaliteError, match="parallel sizes must be >= 1"):
        state.check_layout(4, 0, 1)


def test_bad_layout_fails_before_joining():
    """No other rank will ever come: the error must not wait for one."""
    tic = time.time()
    with pytest.raises(MegaliteError, match="world size 6 is not divisible"):
        state.initialize(
            4,
            backend="gloo",
            device=torch.device("cpu"),
            rank=0,
            world_size=6,
            init_method=f"tcp://127.0.0.1:{free_port()}",
        )
    assert time.time() - tic < 5
    assert not torch.distributed.is_initialized()


def _worker(rank, world, port, out_dir):
    import torch.distributed as dist

    with rank_guard(out_dir, rank):
        st = join_gloo(rank, world, port, TP, PP, timeout_minutes=1)
        want = by_formula(rank)
        got = {
            "tp": st.tp_group,
            "dp": st.dp_group,
            "pp": st.pp_group,
            "mp": st.mp_group,
            "embedding": st.embedding_group,
        }
        report = {
            "coords": (st.tp_rank, st.dp_rank, st.pp_rank),
            "first_last": (st.is_first_stage, st.is_last_stage),
            "recorded": {
                "tp": list(st.tp_ranks),
                "dp": list(st.dp_ranks),
                "pp": list(st.pp_ranks),
                "mp": list(st.mp_ranks),
                "embedding": list(st.embedding_ranks),
            },
            "ranks": {},
            "sums": {},
            "want": want,
        }
        for kind, group in got.items():
            report["ranks"][kind] = dist.get_process_group_ranks(group)
            # a collective on the group proves its members, not only its bookkeeping
            x = torch.tensor([float(rank)])
            dist.all_reduce(x, group=group)
            report["sums"][kind] = x.item()
        torch.save(report, os.path.join(out_dir, f"rank{rank}.pt"))


def test_groups_of_a_real_world_of_8(tmp_path):
    world = TP * PP * DP
    spawn(_worker, world, tmp_path, timeout=120)
    for rank in range(world):
        r = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        want = by_formula(rank)
        assert r["coords"] == coords(rank)
        assert r["first_last"] == (coords(rank)[2] == 0, coords(rank)[2] == PP - 1)
        for kind in EXPECTED:
            assert want[kind] in EXPECTED[kind], (rank, kind)
            assert r["recorded"][kind] == want[kind], (rank, kind, r["recorded"][kind])
            assert sorted(r["ranks"][kind]) == sorted(want[kind]), (rank, kind, r["ranks"][kind])
            assert r["sums"][kind] == sum(want[kind]), (rank, kind)
    # every (tp, dp, pp) coordinate appears exactly once
    assert sorted(coords(r) for r in range(world)) == sorted(
        (t, d, p) for t, d, p in itertools.product(range(TP), range(DP), range(PP))
    )
