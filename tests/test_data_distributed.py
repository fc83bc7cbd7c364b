"""Index building across ranks (gloo, 2 processes): one rank builds, a failure reaches all."""

import json
import os
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.multiprocessing as tmp  # noqa: E402

from megalite.data import IndexedDatasetWriter  # noqa: E402

TIMEOUT = 120  # seconds for the whole run; a hang fails the test instead of the suite


def _rank_main(rank, world, init_file, prefix, bad_prefix, cache, out_dir):
    import torch.distributed as dist

    from megalite.data import builder
    from megalite.data.gpt_dataset import GPTDataset
    from megalite.errors import MegaliteError

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    report = {}
    try:
        # 1. Rank 0 builds; the others must only load what it wrote.
        real_build = GPTDataset._build
        if rank != 0:

            def no_build(self):
                raise AssertionError(f"rank {rank} built an index")

            GPTDataset._build = no_build
        train, valid, _ = builder.build_train_valid_test_datasets(
            [prefix], "90,10,0", 16, (40, 8, 0), 1234, cache
        )
        report["samples"] = [train[i].tolist() for i in range(0, len(train), 7)]
        report["valid_len"] = len(valid)
        GPTDataset._build = real_build

        # 2. The build fails on rank 0 (truncated .bin): every rank raises, none hangs.
        try:
            builder.build_train_valid_test_datasets([bad_prefix], "1", 16, (10, 0, 0), 1, cache)
            report["build_failure"] = None
        except MegaliteError as e:
            report["build_failure"] = str(e)

        # 3. Loading fails on rank 1 only: rank 0 hears of it too.
        real = builder._materialize
        if rank == 1:

            def broken(*a, **k):
                raise MegaliteError("cannot map the cache on this node")

            builder._materialize = broken
        try:
            builder.build_train_valid_test_datasets(
                [prefix], "90,10,0", 16, (40, 8, 0), 1234, cache
            )
            report["load_failure"] = None
        except MegaliteError as e:
            report["load_failure"] = str(e)
        builder._materialize = real
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(report, f)
    dist.barrier()
    dist.destroy_process_group()
    # Skip interpreter teardown: gloo's threads occasionally abort() there on a loaded machine
    # ("terminate called without an active exception"), which says nothing about this test.
    os._exit(0)


def test_two_ranks_build_once_and_fail_together(tmp_path):
    prefix, bad = str(tmp_path / "good_text_document"), str(tmp_path / "bad_text_document")
    rng = np.random.default_rng(0)
    for p in (prefix, bad):
        lengths = rng.integers(1, 50, 200)
        with IndexedDatasetWriter(p, np.uint16) as w:
            w.add_documents(rng.integers(0, 1000, lengths.sum()).astype(np.uint16), lengths)
    os.truncate(bad + ".bin", 100)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    args = (2, str(tmp_path / "init"), prefix, bad, str(tmp_path / "cache"), str(out_dir))
    ctx = tmp.start_processes(_rank_main, args=args, nprocs=2, join=False, start_method="spawn")
    deadline = time.time() + TIMEOUT
    try:
        while not ctx.join(timeout=1):
            if time.time() > deadline:
                pytest.fail(f"ranks still running after {TIMEOUT} s: a collective hangs")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    r0, r1 = (json.load(open(out_dir / f"rank{r}.json")) for r in range(2))

    assert r0["samples"] == r1["samples"] and len(r0["samples"]) > 3
    assert r0["valid_len"] == r1["valid_len"] > 0
    assert "truncated" in r0["build_failure"] and bad + ".bin" in r0["build_failure"]
    assert r1["build_failure"].startswith("rank 0 failed to build the data indices:")
    assert "truncated" in r1["build_failure"] and bad + ".bin" in r1["build_failure"]
    assert r1["load_failure"] == "cannot map the cache on this node"
    assert (
        r0["load_failure"]
        == "rank 1 failed to load the data indices: cannot map the cache on this node"
    )
    # Exactly one set of index files: rank 1 built nothing of its own.
    assert len([f for f in os.listdir(tmp_path / "cache") if f.endswith("description.json")]) == 2
