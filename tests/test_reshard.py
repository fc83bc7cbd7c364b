"""Checkpoints that change layout (issue 14, item 1): 10 iterations at TP=2 x PP=2 x DP=2 with
the distributed optimizer, saved, then resumed at TP=1 x PP=1 x DP=4, TP=4 x DP=2 and PP=4
interleaved (VP=2) for 10 more give every loss of 20 straight iterations in one process
within 1e-5 (dropout 0, fp32; TP=4 also changes the vocabulary padding, 256 -> 512 rows).
`tools/convert.py reshard` does the same offline, and a round trip through another layout
gives back every saved tensor bitwise."""

import json
import os

import pytest
import torch

from conftest import metric, run_cli, train_cli, trainer

TINY = (
    "--num-layers 8 --hidden-size 64 --num-attention-heads 4 --seq-length 32 "
    "--micro-batch-size 2 --global-batch-size 8 --log-interval 1 --mock-data --vocab-size "
    "256 --lr 3e-3 --lr-warmup-iters 2 --eval-interval 1000 --train-iters 20 "
    "--hidden-dropout 0 --attention-dropout 0"
).split()
TOLERANCE = 1e-5


def train(nproc, *args, timeout=300):
    return train_cli(nproc, TINY, *args, timeout=timeout)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """20 iterations in one process (the reference), and the first 10 at TP2 x PP2 x DP2."""
    d = tmp_path_factory.mktemp("reshard")
    train(1, "--metrics-file", str(d / "one.jsonl"))
    train(8, "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
          "--use-distributed-optimizer", "--exit-interval", "10", "--save", str(d / "saved"),
          "--metrics-file", str(d / "first.jsonl"))  # fmt: skip
    one = metric(d / "one.jsonl")
    assert len(one) == 20
    first = metric(d / "first.jsonl")
    assert max(abs(a - b) for a, b in zip(first, one[:10])) <= TOLERANCE
    return d, one


def resume_from(d, src, name, nproc, *layout):
    """Copy checkpoint `src` to `name`, resume there for the last 10 iterations; returns the
    run's losses and output."""
    import shutil

    shutil.copytree(d / src, d / name)
    p = train(nproc, "--load", str(d / name), "--save", str(d / name),
              "--metrics-file", str(d / f"{name}.jsonl"), *layout)  # fmt: skip
    return metric(d / f"{name}.jsonl"), p.stdout + p.stderr


RESUMED = {
    "tp1-pp1-dp4": (4, ["--use-distributed-optimizer"]),
    "tp4-dp2": (8, ["--tensor-model-parallel-size", "4"]),
    "pp4-vp2": (4, ["--pipeline-model-parallel-size", "4",
                    "--num-layers-per-virtual-pipeline-stage", "1"]),
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(RESUMED))
def test_resume_under_another_layout_matches_one_process(runs, layout):
    d, one = runs
    nproc, flags = RESUMED[layout]
    got, out = resume_from(d, "saved", layout, nproc, *flags)
    assert len(got) == 10
    worst = max(abs(a - b) for a, b in zip(got, one[10:]))
    print(f"\n{layout}: max |loss - one process| over iterations 11-20 = {worst:.2e}")
    assert worst <= TOLERANCE, (got, one[10:])
    # one log line says what was re-cut and that the RNG was re-seeded
    assert "re-cut checkpoint" in out and "from TP=2 PP=2 VP=1 DP=2" in out, out[-3000:]
    assert "RNG re-seeded from --seed 1234 + iteration 10" in out


def convert(*args):
    p = run_cli(["tools/convert.py", "reshard", *args])
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout


def saved_state(root):
    """{(name, kind): full tensor} of a checkpoint, for every kind reshard moves."""
    from megalite.training import checkpoint as ckpt
    from megalite.training.reshard import OPTIMIZER_TENSORS

    saved = ckpt.saved_checkpoint(root, ckpt.latest_iteration(root))
    return saved, {
        (n, k): saved.full(n, k) for n in saved.stage_of for k in ("weight", *OPTIMIZER_TENSORS)
    }


def test_offline_round_trip_is_bitwise(runs):
    """TP2 x PP2 (distributed optimizer, DP2) -> TP4 x PP1 (vocab padded to 512) -> TP1 x PP4
    VP2 -> TP2 x PP2: every weight, main param and moment comes back bit for bit, and so do
    the step count, the iteration and the consumed samples."""
    d, _ = runs
    src = str(d / "saved")
    convert("--load", src, "--save", str(d / "off_tp4"), "--tensor-model-parallel-size", "4",
            "--pipeline-model-parallel-size", "1")  # fmt: skip
    convert("--load", str(d / "off_tp4"), "--save", str(d / "off_pp4"),
            "--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "4",
            "--num-layers-per-virtual-pipeline-stage", "1")  # fmt: skip
    out = convert("--load", str(d / "off_pp4"), "--save", str(d / "off_back"),
                  "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
                  "--num-layers-per-virtual-pipeline-stage", "4")  # fmt: skip
    assert "TP=2 PP=2 VP=1" in out
    before, want = saved_state(src)
    after, got = saved_state(str(d / "off_back"))
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert torch.equal(got[key], value), key
    tp4, _ = saved_state(str(d / "off_tp4"))
    assert tp4.shard(0, 0)["model"]["embedding.word_embeddings.weight"].shape[0] == 512 // 4
    for field in ("step", "param_groups", "loss_scaler"):
        assert after.optimizer[field] == before.optimizer[field], field
    meta = [json.load(open(os.path.join(r, "iter_0000010", "metadata.json")))
            for r in (src, str(d / "off_back"))]  # fmt: skip
    assert [m["consumed_samples"] for m in meta] == [80, 80]


@pytest.mark.slow
def test_offline_reshard_resumes_like_one_process(runs):
    d, one = runs
    convert("--load", str(d / "saved"), "--save", str(d / "off_tp2"),
            "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "1")  # fmt: skip
    got, out = resume_from(d, "off_tp2", "off_tp2_run", 4, "--tensor-model-parallel-size", "2")
    assert "re-cut" not in out  # already in this layout: loaded as it is
    assert "holds no RNG state; RNG re-seeded" in out
    worst = max(abs(a - b) for a, b in zip(got, one[10:]))
    print(f"\noffline TP2 x PP1, DP2: max |loss - one process| = {worst:.2e}")
    assert len(got) == 10 and worst <= TOLERANCE


def test_another_model_is_one_line(runs, tmp_path):
    d, _ = runs
    p = run_cli(["tools/convert.py", "reshard", "--load", str(d / "saved"), "--save",
                 str(tmp_path / "x"), "--tensor-model-parallel-size", "3"])  # fmt: skip
    assert p.returncode != 0 and "divisible" in p.stderr.strip().splitlines()[-1], p.stderr
    import shutil

    shutil.copytree(d / "saved", tmp_path / "six")
    p = run_cli([*trainer(1), *TINY, "--num-layers", "6", "--load", str(tmp_path / "six")])
    last = p.stderr.strip().splitlines()[-1]
    assert p.returncode != 0 and "has 8 layers, this model 6" in last, p.stderr[-2000:]
    os.remove(tmp_path / "six" / "iter_0000010" / "optim_tp01_pp001_dp001.pt")
    p = run_cli([*trainer(1), *TINY, "--load", str(tmp_path / "six")])
    last = p.stderr.strip().splitlines()[-1]
    assert p.returncode != 0 and "optim_tp01_pp001_dp001.pt is missing" in last, p.stderr[-2000:]
