"""Distributed-optimizer checkpoints through the command line (issue 7 §5).

DP=2 with --use-distributed-optimizer, bf16 params (so the fp32 main params must come back from
the optimizer shards, not from the bf16 weights), overlapped grad reduce and param gather:
10 iterations straight, against 5 + save + resume 5: bitwise the same losses and grad norms.
The iteration-5 checkpoint then loads under DP=4 (each rank re-cuts its shard from the two
saved ones) and continues with the losses of the DP=2 run. In-process, exact re-sharding
DP=2 <-> DP=4 is checked in test_data_parallel.py.
"""

import json
import os
import shutil

import pytest
import torch

from conftest import run_cli, trainer

ARGS = (
    "--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 32 "
    "--micro-batch-size 2 --global-batch-size 8 --train-iters 10 --log-interval 1 "
    "--eval-interval 1000 --lr 3e-3 --lr-warmup-iters 2 --vocab-size 256 --split 95,5,0 "
    "--device cpu --bf16 --use-distributed-optimizer --overlap-grad-reduce "
    "--overlap-param-gather --ddp-bucket-size 20000"
).split()


def train(corpus, nproc, metrics, *args):
    p = run_cli(
        [
            *trainer(nproc),
            *ARGS,
            "--data-path",
            corpus,
            "--metrics-file",
            str(metrics),
            *args,
        ],
        timeout=240,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def records(path):
    with open(path) as fh:
        return {r["iteration"]: r for r in map(json.loads, fh) if "loss" in r}


@pytest.fixture(scope="module")
def runs(byte_corpus, tmp_path_factory):
    d = tmp_path_factory.mktemp("distopt")
    ck = d / "ck"
    train(byte_corpus, 2, d / "straight.jsonl")
    p = train(byte_corpus, 2, d / "split.jsonl", "--save", str(ck), "--exit-interval", "5")
    assert "exiting at iteration 5" in p.stdout
    shutil.copytree(ck, d / "ck5")
    train(byte_corpus, 2, d / "split.jsonl", "--save", str(ck), "--load", str(ck))
    return d


def test_checkpoint_holds_one_optimizer_shard_per_dp_rank(runs):
    it = runs / "ck5" / "iter_0000005"
    names = sorted(os.listdir(it))
    assert names == [
        "metadata.json",
        "mp_rank_00_000.pt",
        "optim_tp00_pp000_dp000.pt",
        "optim_tp00_pp000_dp001.pt",
    ], names
    shards = [torch.load(it / f"optim_tp00_pp000_dp00{r}.pt", weights_only=False) for r in range(2)]
    main = torch.load(it / "mp_rank_00_000.pt", weights_only=False)
    assert main["optimizer"]["sharded"] and "pieces" not in main["optimizer"]
    # the two shards together cover every param exactly once
    model = main["model"]
    for name, w in model.items():
        covered = sorted((s, e) for sh in shards for s, e, *_ in sh.get(name, []))
        assert covered[0][0] == 0 and covered[-1][1] == w.numel(), name
        assert all(a[1] == b[0] for a, b in zip(covered, covered[1:])), name
        # the saved fp32 main params are the bf16 weights before rounding
        full = torch.cat([m for sh in shards for _, _, _, m, _, _ in sh.get(name, [])])
        assert full.dtype == torch.float32 and w.dtype == torch.bfloat16
        assert torch.equal(full.to(torch.bfloat16), w.view(-1)), name


def test_resume_is_bitwise_exact(runs):
    straight, split = records(runs / "straight.jsonl"), records(runs / "split.jsonl")
    assert sorted(split) == list(range(1, 11))
    for i in range(1, 11):
        for key in ("loss", "grad_norm"):
            assert split[i][key] == straight[i][key], (i, key, split[i][key], straight[i][key])


def test_resume_under_another_dp_size_reshards(runs, byte_corpus):
    """DP=2's shards loaded by 4 ranks: same data, same state, other reduction order."""
    ck = runs / "ck5"
    train(byte_corpus, 4, runs / "dp4.jsonl", "--load", str(ck), "--save", str(ck))
    straight, dp4 = records(runs / "straight.jsonl"), records(runs / "dp4.jsonl")
    assert sorted(dp4) == list(range(6, 11))
    for i in range(6, 11):
        # bf16 activations: a different summation order moves the loss by bf16 rounding
        assert dp4[i]["loss"] == pytest.approx(straight[i]["loss"], rel=2e-3), (i, dp4, straight)
    meta = json.load(open(ck / "iter_0000010" / "metadata.json"))
    assert meta["data_parallel_size"] == 4
    assert len([f for f in os.listdir(ck / "iter_0000010") if f.startswith("optim_")]) == 4


def test_missing_shard_is_a_clear_error(tmp_path):
    from megalite.errors import MegaliteError
    from megalite.training.checkpoint import optimizer_shard_reader

    (tmp_path / "iter_0000005").mkdir()
    with pytest.raises(MegaliteError, match="optim_tp00_pp000_dp001.pt is missing"):
        optimizer_shard_reader(str(tmp_path), 5)(1)


def test_foreign_optimizer_state_is_a_clear_error():
    from megalite.config import ModelConfig
    from megalite.errors import MegaliteError
    from megalite.model.gpt import GPTModel
    from megalite.optim import MixedPrecisionOptimizer
    from megalite.parallel.ddp import DistributedDataParallel

    model = GPTModel(ModelConfig(num_layers=1, hidden_size=32, num_attention_heads=2), 128)
    ddp = DistributedDataParallel(model)
    opt = MixedPrecisionOptimizer([{"params": list(model.parameters())}], ddp)
    with pytest.raises(MegaliteError, match="--no-load-optim"):
        opt.load_state_dict({"state": {}, "param_groups": []})  # a torch.optim state
    sd = opt.state_dict()
    sd["pieces"].pop("final_norm.weight")
    with pytest.raises(MegaliteError, match="final_norm.weight is missing"):
        opt.load_state_dict(sd)


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--overlap-param-gather"], "--overlap-param-gather needs --use-distributed-optimizer"),
        (["--ddp-bucket-size", "0"], "--ddp-bucket-size must be a positive number of elements"),
        (["--fp16", "--hysteresis", "0"], "--hysteresis must be positive"),
    ],
)
def test_bad_flags_are_one_line_errors(flags, needle):
    from megalite.config import parse_config
    from megalite.errors import MegaliteError

    with pytest.raises(MegaliteError, match=needle):
        parse_config(["--mock-data", "--vocab-size", "64", *flags], world_size=2)
