"""Checkpoints are safe to load and verified: every file loads with weights_only=True (a crafted
pickle runs nothing and is refused in one line), and metadata.json's size and sha256 of each
file catch a flipped or truncated byte, naming the file."""

import hashlib
import io
import json
import os
import pickle
import random
import shutil

import numpy as np
import pytest
import torch

from conftest import run_cli, trainer
from megalite.parallel import random as prandom

TINY = (
    "--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 32 "
    "--micro-batch-size 4 --global-batch-size 8 --log-interval 1 --eval-interval 1000 "
    "--eval-iters 2 --lr 3e-3 --lr-warmup-iters 5 --split 95,5,0 --vocab-size 256 "
    "--use-distributed-optimizer"
).split()
SHARD, OPTIM = "mp_rank_00_000.pt", "optim_tp00_pp000_dp000.pt"


def train(corpus, *args):
    return run_cli([*trainer(), *TINY, "--data-path", corpus, *args])


def assert_one_line_error(proc, *needles):
    assert proc.returncode != 0, proc.stdout + proc.stderr
    err = proc.stderr.strip()
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and err.splitlines()[-1] == errors[0], err
    assert all(n in errors[0] for n in needles), err


@pytest.fixture(scope="module")
def saved(byte_corpus, tmp_path_factory):
    """A ZeRO-1 checkpoint of iteration 2 (an mp_rank file and an optimizer shard)."""
    ck = tmp_path_factory.mktemp("saved") / "ck"
    p = train(byte_corpus, "--train-iters", "2", "--save", str(ck))
    assert p.returncode == 0, p.stderr
    return ck


@pytest.fixture
def ck(saved, tmp_path):
    """A copy of the saved checkpoint to damage."""
    return shutil.copytree(saved, tmp_path / "ck")


def record(ck, name):
    """Record name's size and sha256 in metadata.json, as save_checkpoint does."""
    meta_path = ck / "iter_0000002" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    data = (ck / "iter_0000002" / name).read_bytes()
    meta["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    meta_path.write_text(json.dumps(meta))


def test_metadata_records_every_file(saved):
    meta = json.loads((saved / "iter_0000002" / "metadata.json").read_text())
    assert sorted(meta["files"]) == [SHARD, OPTIM]
    for name, rec in meta["files"].items():
        data = (saved / "iter_0000002" / name).read_bytes()
        assert rec == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


@pytest.mark.parametrize("name", [SHARD, OPTIM])
def test_flipped_byte_names_the_file(byte_corpus, ck, name):
    path = ck / "iter_0000002" / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    p = train(byte_corpus, "--train-iters", "3", "--load", str(ck))
    assert_one_line_error(p, f"{name} is corrupt (checksum mismatch", "earlier iteration")


def test_truncated_file_names_both_sizes(byte_corpus, ck):
    path = ck / "iter_0000002" / OPTIM
    size = path.stat().st_size
    path.write_bytes(path.read_bytes()[: size - 100])
    p = train(byte_corpus, "--train-iters", "3", "--load", str(ck))
    assert_one_line_error(p, f"{OPTIM} is corrupt or truncated ({size - 100} bytes", str(size))


class _RunsCode:
    """Unpickling this runs a shell command: what a crafted checkpoint would do."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_crafted_pickle_is_refused(byte_corpus, ck, tmp_path):
    marker = tmp_path / "code_ran"
    path = ck / "iter_0000002" / SHARD
    torch.save({"model": _RunsCode(f"touch {marker}")}, path)
    record(ck, SHARD)  # size and checksum match: only the weights_only barrier stands
    p = train(byte_corpus, "--train-iters", "3", "--load", str(ck))
    assert_one_line_error(p, f"{SHARD} holds code to run on loading (a pickle of ", "system)")
    assert not marker.exists()
    # the file is live: an unsafe load would have run it
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_crafted_plain_pickle_is_refused(byte_corpus, ck, tmp_path):
    """Not torch.save's zip format at all: refused before anything is unpickled."""
    marker = tmp_path / "code_ran"
    path = ck / "iter_0000002" / SHARD
    path.write_bytes(pickle.dumps(_RunsCode(f"touch {marker}")))
    record(ck, SHARD)
    p = train(byte_corpus, "--train-iters", "3", "--load", str(ck))
    assert_one_line_error(p, SHARD)
    assert not marker.exists()


def test_rng_state_is_weights_only_and_round_trips():
    random.seed(3)
    np.random.seed(5)
    np.random.randn()  # leaves numpy a cached gaussian
    torch.manual_seed(7)
    buf = io.BytesIO()
    torch.save(prandom.get_rng_state(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)

    def draws():
        return random.random(), np.random.randn(), np.random.rand(3).tolist(), torch.rand(3)

    first = draws()
    prandom.set_rng_state(state)
    again = draws()
    assert first[:3] == again[:3] and torch.equal(first[3], again[3])


def test_old_format_checkpoint_resumes_like_the_new(byte_corpus, ck, tmp_path):
    """A checkpoint written before this format (numpy's RNG state as a tuple with an ndarray,
    Python's as a tuple; no file records) loads through the exact numpy allowlist, and resumes
    to the same losses as the same state in the new format."""
    new = shutil.copytree(ck, tmp_path / "new")
    path = ck / "iter_0000002" / SHARD
    shard = torch.load(path, weights_only=True)
    rng = shard["rng"]
    n = rng["numpy"]
    key = n["key"].numpy().astype(np.uint32)
    rng["numpy"] = (n["bit_generator"], key, n["pos"], n["has_gauss"], n["cached_gaussian"])
    rng["python"] = (rng["python"][0], tuple(rng["python"][1]), rng["python"][2])
    torch.save(shard, path)
    meta_path = ck / "iter_0000002" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    del meta["files"]
    meta_path.write_text(json.dumps(meta))
    assert torch.serialization.get_unsafe_globals_in_checkpoint(str(path))  # numpy's globals

    def resumed_losses(load):
        m = tmp_path / f"{load.name}.jsonl"
        p = train(byte_corpus, "--train-iters", "4", "--load", str(load), "--metrics-file", str(m))
        assert p.returncode == 0, p.stderr
        return [r["loss"] for r in map(json.loads, m.read_text().splitlines()) if "loss" in r]

    old_losses = resumed_losses(ck)
    assert len(old_losses) == 2 and old_losses == resumed_losses(new)
