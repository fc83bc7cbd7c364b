"""The node-local shared-memory all-reduce (megalite/parallel/shm.py) against gloo's.

Each rank's tensor is made from (seed, rank), so every rank also computes the sum of all of
them on its own in float64: the independent reference. gloo's all-reduce of the same tensors
is the second: with two ranks a sum is one addition, so the bits must match exactly.
"""

import json
import os

import pytest
import torch

from conftest import join_gloo, rank_guard, run_cli, spawn, trainer

SIZES = [1, 17, 1000, 1 << 20, (4 << 20) // 4 * 2 + 12345]  # up to 2 chunks and a remainder
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


def _tensor(rank, n, dtype):
    g = torch.Generator().manual_seed(1000 * rank + n)
    return torch.randn(n, generator=g, dtype=torch.float64).to(dtype)


def _sum_worker(rank, world, port, out_dir):
    import torch.distributed as dist

    from megalite.parallel import shm

    with rank_guard(out_dir, rank):
        join_gloo(rank, world, port)
        comm = shm.for_group(dist.group.WORLD, timeout_s=60)
        res = {"made": comm is not None, "cases": {}}
        for name, dtype in DTYPES.items():
            for n in SIZES:
                mine = _tensor(rank, n, dtype)
                got = comm.all_reduce_(mine.clone())
                ref = sum(_tensor(r, n, dtype).double() for r in range(world))
                res["cases"][f"{name}-{n}"] = {
                    "err": (got.double() - ref).abs().max().item(),
                    "scale": ref.abs().max().item(),
                    "checksum": got.double().sum().item(),
                    "same_as_gloo": (
                        torch.equal(got, _gloo_sum(mine))
                        if world == 2 and dtype != torch.bfloat16
                        else None
                    ),
                }
        with open(os.path.join(out_dir, f"sum{rank}.json"), "w") as fh:
            json.dump(res, fh)


def _gloo_sum(t):
    import torch.distributed as dist

    t = t.clone()
    dist.all_reduce(t)
    return t


@pytest.mark.parametrize("world", [2, 3])
def test_shared_memory_sum_matches_the_reference_on_every_rank(tmp_path, world):
    spawn(_sum_worker, world, str(tmp_path), timeout=240)
    res = [json.load(open(tmp_path / f"sum{r}.json")) for r in range(world)]
    assert all(r["made"] for r in res)
    for case, c in res[0]["cases"].items():
        dtype = case.split("-")[0]
        # one rounding of a sum of `world` values in the dtype (bf16: 8 bits of mantissa)
        tol = {"float64": 1e-15, "float32": 1e-6, "bfloat16": 1e-2}[dtype] * world
        assert c["err"] <= tol * max(1.0, c["scale"]), (case, c)
        # every rank got the same bits (each element is summed once, by one rank)
        assert all(r["cases"][case]["checksum"] == c["checksum"] for r in res), case
        if c["same_as_gloo"] is not None:
            assert all(r["cases"][case]["same_as_gloo"] for r in res), case


def _dead_peer_worker(rank, world, port, out_dir):
    import time

    import torch.distributed as dist

    from megalite.errors import MegaliteError
    from megalite.parallel import shm

    with rank_guard(out_dir, rank):
        join_gloo(rank, world, port)
        comm = shm.for_group(dist.group.WORLD, timeout_s=60)
        comm.all_reduce_(torch.ones(10))  # both alive: fine
        dist.barrier()
        if rank == 1:
            os._exit(0)  # dies between two steps, closing nothing the survivor watches
        tic = time.time()
        try:
            comm.all_reduce_(torch.ones(10))
            msg = "no error"
        except MegaliteError as e:
            msg = str(e)
        with open(os.path.join(out_dir, "dead.json"), "w") as fh:
            json.dump({"msg": msg, "seconds": time.time() - tic}, fh)
        os._exit(0)  # the gloo group's peer is gone too: do not wait on its teardown


def test_a_dead_peer_is_one_line_at_once_not_a_hang(tmp_path):
    try:
        spawn(_dead_peer_worker, 2, str(tmp_path), timeout=120)
    except Exception:
        pass  # the ranks leave with os._exit; what counts is what rank 0 wrote
    got = json.load(open(tmp_path / "dead.json"))
    assert got["msg"].startswith("lost a peer during a collective"), got
    assert "rank 1 of this data-parallel group has ended" in got["msg"], got
    assert "\n" not in got["msg"]
    assert got["seconds"] < 10, got  # noticed by pid, not after the 60 s timeout


def _other_nodes_worker(rank, world, port, out_dir):
    import torch.distributed as dist

    from megalite.parallel import shm

    with rank_guard(out_dir, rank):
        os.environ["GROUP_RANK"] = str(rank)  # as torchrun sets it on two nodes
        join_gloo(rank, world, port)
        made = shm.for_group(dist.group.WORLD, timeout_s=60) is not None
        with open(os.path.join(out_dir, f"nodes{rank}.json"), "w") as fh:
            json.dump({"made": made}, fh)


def test_ranks_of_different_nodes_keep_gloo(tmp_path):
    spawn(_other_nodes_worker, 2, str(tmp_path), timeout=120)
    for r in range(2):
        assert json.load(open(tmp_path / f"nodes{r}.json")) == {"made": False}


CLI = (
    "--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 32 "
    "--micro-batch-size 2 --global-batch-size 8 --log-interval 1 --mock-data --vocab-size "
    "256 --lr 1e-3 --lr-warmup-iters 2 --eval-interval 1000 --train-iters 4"
).split()


@pytest.mark.parametrize("flags", [[], ["--use-distributed-optimizer", "--overlap-grad-reduce"]],
                         ids=["ddp", "distopt-overlap"])  # fmt: skip
def test_the_trainer_over_shared_memory_matches_gloo_bitwise(tmp_path, flags):
    losses = {}
    for side, extra in (("shm", []), ("gloo", ["--no-shm-grad-reduce"])):
        m = tmp_path / f"{side}.jsonl"
        p = run_cli([*trainer(2), *CLI, *flags, *extra, "--metrics-file", str(m)], timeout=240)
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
        losses[side] = [r["loss"] for r in map(json.loads, open(m)) if "loss" in r]
        assert ("summed through shared memory (2 ranks" in p.stdout) == (side == "shm")
    assert len(losses["shm"]) == 4
    assert losses["shm"] == losses["gloo"]
