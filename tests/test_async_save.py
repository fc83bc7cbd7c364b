"""--async-save (issue 14): the loop stops only for the snapshot (the state copied to host
memory), the files are written in a background thread, and what ends up on disk is what a
synchronous save of the same run writes, byte for byte.

The references are independent of the code under test: a synchronous run of the same flags
(its files, compared byte for byte; its losses), and `latest`/metadata.json read with json
and torch.load directly. Slow background writes are made by the tests only:
`slow_background_writes` wraps checkpoint._torch_save_fsync so that a file written off the
main thread waits first; in `python -m megalite.train` it is installed by a sitecustomize.py
that the test puts on PYTHONPATH, with the delay in MEGALITE_TEST_SLOW_WRITE. Nothing in
megalite reads that variable.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from conftest import REPO, run_cli, sitecustomize_env, trainer
from test_faults import TINY as FAULTS_TINY
from test_faults import complete_latest, small_disk  # noqa: F401 (a fixture)

TESTS = os.path.join(REPO, "tests")
SLOW_ENV = "MEGALITE_TEST_SLOW_WRITE"
LATEST = "latest_checkpointed_iteration.txt"
TINY = (
    "--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 32 "
    "--micro-batch-size 2 --global-batch-size 4 --log-interval 1 --eval-interval 1000 "
    "--lr 3e-3 --lr-warmup-iters 2 --vocab-size 256 --mock-data --split 100,0,0 "
    "--hidden-dropout 0.1"
).split()
SAVES = ["--train-iters", "10", "--save-interval", "3"]  # saves 3, 6 and 9, then 10 (the last)


def slow_background_writes(spec: str) -> None:
    """Test-only, off the main thread (in a background save): every checkpoint file waits
    SECONDS before it is written. spec: "SECONDS" or "SECONDS,LATE": a save that fails ends
    its thread LATE seconds after the failure on rank 0 (on the others at once)."""
    from megalite.parallel import state
    from megalite.training import checkpoint

    seconds, late = (float(x) for x in (spec + ",0").split(",")[:2])
    real_file, real_write = checkpoint._torch_save_fsync, checkpoint.write

    def background():
        return threading.current_thread() is not threading.main_thread()

    def slow_file(obj, path):
        if background():
            time.sleep(seconds)
        return real_file(obj, path)

    def late_failure(snap, group=None):
        try:
            return real_write(snap, group)
        except checkpoint.SaveFailed:
            if background() and state.get().rank == 0:
                time.sleep(late)
            raise

    checkpoint._torch_save_fsync, checkpoint.write = slow_file, late_failure


def slow_env(tmp_path, spec, faults=None) -> dict:
    """The environment that makes a trainer's background writes slow (`slow_background_writes`
    spec) and, with `faults`, injects test_loss_spikes' faults too (one sitecustomize.py takes
    effect, so it does both)."""
    lines = ["from test_async_save import slow_background_writes",
             f"slow_background_writes(os.environ[{SLOW_ENV!r}])"]  # fmt: skip
    if faults:
        lines += ["from test_loss_spikes import inject_faults", f"inject_faults({faults!r})"]
    return sitecustomize_env(tmp_path / "slow_site", lines, {SLOW_ENV: str(spec)})


def child_env(env=None) -> dict:
    """The environment of a Popen'd trainer, as run_cli's (which runs `-m megalite.train` from
    this checkout, so it imports this checkout's megalite)."""
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env or {}))


def train(*args, nproc=1, env=None):
    p = run_cli([*trainer(nproc), *TINY, *map(str, args)], env=env)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return p


def records(path):
    with open(path) as fh:
        return [json.loads(line) for line in fh]


def losses(path):
    return [(r["iteration"], r["loss"]) for r in records(path) if "loss" in r]


def save_records(path):
    return [r for r in records(path) if "checkpoint_blocking_s" in r]


def checkpoint_files(root) -> dict:
    """{iteration: {file name: its bytes}} of every complete checkpoint under root (but
    metadata.json, which holds the run's own flags), read with plain file reads."""
    out = {}
    for name in sorted(os.listdir(root)):
        if name.startswith("iter_") and name[5:].isdigit():
            d = os.path.join(root, name)
            out[int(name[5:])] = {
                f: open(os.path.join(d, f), "rb").read()
                for f in sorted(os.listdir(d))
                if f != "metadata.json"
            }
    return out


def file_records(root, iteration) -> dict:
    with open(os.path.join(root, f"iter_{iteration:07d}", "metadata.json")) as fh:
        return json.load(fh)["files"]


def assert_same_checkpoints(ref, other, iterations):
    a, b = checkpoint_files(ref), checkpoint_files(other)
    assert sorted(a) == sorted(b) == iterations, (sorted(a), sorted(b))
    for it in iterations:
        assert a[it].keys() == b[it].keys(), it
        for name in a[it]:
            assert a[it][name] == b[it][name], f"iteration {it}: {name} differs"
        assert file_records(ref, it) == file_records(other, it)  # sizes and sha256


def wait_for(path, cond, proc, timeout=120):
    """Poll a metrics file until cond(its records) holds; fail if the process ended first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.exists(path):
            with open(path) as fh:
                recs = [json.loads(line) for line in fh if line.endswith("\n")]
            if cond(recs):
                return recs
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    raise TimeoutError(f"{path}: condition not met in {timeout} s")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The synchronous run every async run is compared with: 10 iterations, saving 3, 6, 9, 10."""
    d = tmp_path_factory.mktemp("sync")
    train(*SAVES, "--save", d / "ck", "--metrics-file", d / "m.jsonl")
    return d


# -- in one process: the host copies ------------------------------------------------------------


def test_host_copies_are_copies_reused_and_keep_the_files_layout():
    from megalite.training.checkpoint import HostCopies

    flat = torch.arange(10, dtype=torch.float32)
    param = torch.randn(3, 4)
    obj = {"w": param, "main": param.view(-1), "piece": flat[2:6], "step": 7, "t": (flat[:2],)}
    copies = HostCopies()
    first = copies.copy(obj)
    assert first["step"] == 7 and torch.equal(first["w"], param)
    assert torch.equal(first["piece"], flat[2:6]) and torch.equal(first["t"][0], flat[:2])
    # a tensor over its whole storage shares it with the others over it, as torch.save keeps
    # them (one storage); a view into a larger storage gets its own bytes only
    assert first["w"].untyped_storage().data_ptr() == first["main"].untyped_storage().data_ptr()
    assert first["piece"].untyped_storage().nbytes() == 16
    assert first["w"].data_ptr() != param.data_ptr()  # a copy: training may go on
    param.add_(1.0)
    flat.zero_()
    assert not torch.equal(first["w"], param) and first["piece"].tolist() == [2, 3, 4, 5]
    again = copies.copy(obj)  # the next save copies into the same memory
    assert again["w"].data_ptr() == first["w"].data_ptr() and torch.equal(again["w"], param)
    assert again["piece"].data_ptr() == first["piece"].data_ptr()
    assert again["piece"].tolist() == [0, 0, 0, 0] and len(copies.buffers) == 3


def test_async_save_needs_save():
    from megalite.config import parse_config
    from megalite.errors import MegaliteError

    with pytest.raises(MegaliteError, match="--async-save needs --save DIR"):
        parse_config([*TINY, "--async-save"])


# -- the command line ---------------------------------------------------------------------------


def test_async_files_resume_and_metrics_equal_a_sync_save(reference, tmp_path):
    ck, m = tmp_path / "ck", tmp_path / "m.jsonl"
    # saves 3 and 6 in the background, then exits at 6 (after waiting for it) ...
    p = train(*SAVES, "--async-save", "--save", ck, "--metrics-file", m, "--exit-interval", 6)
    assert "exiting at iteration 6" in p.stdout
    assert open(ck / LATEST).read() == "6\n"
    # ... and resumes from it: 9 in the background, 10 at the end
    p = train(*SAVES, "--async-save", "--save", ck, "--load", ck, "--metrics-file", m)
    assert "(iteration 6," in p.stdout
    assert_same_checkpoints(reference / "ck", ck, [3, 6, 9, 10])
    assert losses(m) == losses(reference / "m.jsonl")  # bitwise, before and after the resume
    assert len(losses(m)) == 10
    # every save has its record, sync and async alike
    for path in (m, reference / "m.jsonl"):
        recs = save_records(path)
        assert [r["iteration"] for r in recs] == [3, 6, 9, 10], recs
        assert all(set(r) == {"iteration", "checkpoint_blocking_s", "checkpoint_total_s"}
                   and r["checkpoint_blocking_s"] >= 0 and r["checkpoint_total_s"] > 0
                   for r in recs)  # fmt: skip
    for r in save_records(reference / "m.jsonl"):  # sync: the loop waits for all of it
        assert r["checkpoint_blocking_s"] >= r["checkpoint_total_s"]
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("saved checkpoint")]
    assert len(lines) == 2 and all(" | blocking " in ln and " s | total " in ln for ln in lines)


@pytest.mark.slow
def test_two_ranks_distributed_optimizer_equal_a_sync_save(tmp_path):
    dist = ["--use-distributed-optimizer", "--ddp-bucket-size", "20000"]
    ref, ck = tmp_path / "sync", tmp_path / "async"
    train(*SAVES, *dist, "--save", ref, "--metrics-file", tmp_path / "ref.jsonl", nproc=2)
    train(*SAVES, *dist, "--async-save", "--save", ck, "--metrics-file", tmp_path / "m.jsonl",
          "--exit-interval", 6, nproc=2)  # fmt: skip
    train(*SAVES, *dist, "--async-save", "--save", ck, "--load", ck, "--metrics-file",
          tmp_path / "m.jsonl", nproc=2)  # fmt: skip
    assert_same_checkpoints(ref, ck, [3, 6, 9, 10])
    assert set(checkpoint_files(ck)[9]) == {
        "mp_rank_00_000.pt", "optim_tp00_pp000_dp000.pt", "optim_tp00_pp000_dp001.pt"}  # fmt: skip
    assert losses(tmp_path / "m.jsonl") == losses(tmp_path / "ref.jsonl")
    assert [r["iteration"] for r in save_records(tmp_path / "m.jsonl")] == [3, 6, 9, 10]


def test_training_goes_on_while_the_files_are_written(reference, tmp_path):
    delay = 2.0
    ck, m = tmp_path / "ck", tmp_path / "m.jsonl"
    train(*SAVES, "--async-save", "--save", ck, "--metrics-file", m, env=slow_env(tmp_path, delay))
    recs = records(m)
    at = next(i for i, r in enumerate(recs) if r.get("checkpoint_total_s") and r["iteration"] == 3)
    ran = [r["iteration"] for r in recs[:at] if "loss" in r]
    assert ran[-1] > 3, ran  # iterations after 3 ran while iteration 3 was being written ...
    three = recs[at]
    assert three["checkpoint_total_s"] >= delay and three["checkpoint_blocking_s"] < delay / 4
    # ... and what was written is iteration 3's state, not theirs: a sync save's bytes
    assert_same_checkpoints(reference / "ck", ck, [3, 6, 9, 10])
    assert losses(m) == losses(reference / "m.jsonl")


@pytest.mark.slow
def test_kill_9_during_a_background_write_keeps_the_last_checkpoint(reference, tmp_path):
    ck, m = tmp_path / "ck", tmp_path / "m.jsonl"
    args = [*trainer(1), *TINY, "--save-interval", "4", "--save", ck, "--load", ck, "--async-save"]
    # (the LR schedule of the 10 iterations of the reference, over a run that is killed)
    args += ["--train-iters", "1000", "--lr-decay-iters", "10", "--metrics-file", m]
    proc = subprocess.Popen([sys.executable, *map(str, args)], cwd=REPO,
                            env=child_env(slow_env(tmp_path, 3.0)), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        # iteration 4 is complete; iteration 8's write has started (iteration 9 ran after it)
        wait_for(m, lambda rs: any(r.get("checkpoint_total_s") for r in rs)
                 and any(r.get("iteration") == 9 and "loss" in r for r in rs), proc)  # fmt: skip
        assert not (ck / "iter_0000008").exists()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert complete_latest(str(ck)) == 4
    assert (ck / "iter_0000008.tmp").is_dir() and not (ck / "iter_0000008").exists()
    # the resume (no delay now) starts from 4 and runs as the uninterrupted reference did
    p = train("--save-interval", 4, "--save", ck, "--load", ck, "--async-save", "--train-iters", 10,
              "--metrics-file", tmp_path / "resumed.jsonl")  # fmt: skip
    assert "(iteration 4," in p.stdout
    assert losses(tmp_path / "resumed.jsonl") == losses(reference / "m.jsonl")[4:]
    assert complete_latest(str(ck)) == 10 and not [n for n in os.listdir(ck) if ".tmp" in n]


def test_sigterm_during_a_background_write_waits_saves_and_exits_zero(tmp_path):
    delay = 3.0
    ck, m = tmp_path / "ck", tmp_path / "m.jsonl"
    args = [*trainer(1), *TINY, "--save-interval", "3", "--save", ck, "--async-save",
            "--train-iters", "100000", "--metrics-file", m]  # fmt: skip
    proc = subprocess.Popen([sys.executable, *map(str, args)], cwd=REPO,
                            env=child_env(slow_env(tmp_path, delay)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        # iteration 3 is being written (for `delay` s): iteration 4 ran, 3 is not complete
        recs = wait_for(m, lambda rs: any(r.get("iteration") == 4 and "loss" in r for r in rs),
                        proc)  # fmt: skip
        assert not any("checkpoint_total_s" in r for r in recs)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert "SIGTERM" in out
    last = max(r["iteration"] for r in records(m) if "loss" in r)
    assert complete_latest(str(ck)) == last and f"exiting at iteration {last}: SIGTERM" in out
    saves = {r["iteration"]: r for r in save_records(m)}
    assert 3 in saves and last in saves, saves  # the one in flight completed, then the last
    assert saves[3]["checkpoint_total_s"] >= delay
    assert (ck / "iter_0000003" / "metadata.json").exists()
    assert not [n for n in os.listdir(ck) if n.endswith(".tmp")]


def test_background_write_on_a_full_disk_stops_in_one_line(small_disk):  # noqa: F811
    ck = os.path.join(small_disk, "ck")
    p = run_cli([*trainer(1), *FAULTS_TINY, "--train-iters", "12", "--save-interval", "2",
                 "--save", ck, "--async-save"])  # fmt: skip
    assert p.returncode != 0, p.stdout[-2000:]
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and "not saved" in lines[0] and ck in lines[0], p.stderr[-2000:]
    last = complete_latest(ck)
    assert last is not None and last < 12 and f"iter_{last:07d} is intact" in lines[0]
    assert f"saved checkpoint {ck}/iter_{last:07d} |" in p.stdout
    assert not [n for n in os.listdir(ck) if n.endswith(".tmp")]  # the partial save is gone


def test_background_write_on_a_full_disk_with_save_failure_continue(small_disk):  # noqa: F811
    ck = os.path.join(small_disk, "ck")
    p = run_cli([*trainer(1), *FAULTS_TINY, "--train-iters", "12", "--save-interval", "2",
                 "--save", ck, "--async-save", "--save-failure", "continue"])  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    warnings = [ln for ln in p.stdout.splitlines() if ln.startswith("warning: ")]
    assert warnings and all("not saved" in w for w in warnings), p.stdout[-3000:]
    assert "iter     12/12" in p.stdout
    last = complete_latest(ck)
    assert last is not None and f"saved checkpoint {ck}/iter_{last:07d} |" in p.stdout
    assert not [n for n in os.listdir(ck) if n.endswith(".tmp")]


@pytest.mark.slow
def test_rollback_waits_for_the_write_and_equals_a_sync_rollback(byte_corpus, tmp_path):
    """A nan at iteration 11 while iteration 8 is being written (slowly): the rollback waits
    for it and goes back to it, as test_loss_spikes' synchronous rollback does."""
    from test_loss_spikes import ROLLBACK, ROLLBACK_FAULTS
    from test_loss_spikes import TINY as SPIKES_TINY

    args = [*SPIKES_TINY, "--data-path", byte_corpus, *ROLLBACK]
    runs = {}
    for side, flags, delay in (("sync", [], 0), ("async", ["--async-save"], 2.0)):
        d = tmp_path / side
        d.mkdir()
        p = run_cli([*trainer(1), *args, *flags, "--save", str(d / "ck"), "--metrics-file",
                     str(d / "m.jsonl")], env=slow_env(d, delay, ROLLBACK_FAULTS))  # fmt: skip
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
        runs[side] = d
    sync, async_ = (records(runs[s] / "m.jsonl") for s in ("sync", "async"))
    event = [r for r in async_ if "rolled_back_to" in r]
    assert event == [r for r in sync if "rolled_back_to" in r] and event[0]["rolled_back_to"] == 8
    assert losses(runs["async"] / "m.jsonl") == losses(runs["sync"] / "m.jsonl")
    assert [r["iteration"] for r in save_records(runs["async"] / "m.jsonl")] == [4, 8, 12, 16, 20]
    assert_same_checkpoints(runs["sync"] / "ck", runs["async"] / "ck", [4, 8, 12, 16, 20])


@pytest.mark.slow
def test_two_ranks_stop_together_on_a_full_disk(small_disk, tmp_path):  # noqa: F811
    """Each rank's thread ends at its own moment (here rank 0's 3 s after rank 1's): the
    failure is agreed in should_exit, so both ranks stop at the same iteration, each with its
    one line about the same save, and neither sees the other vanish mid-collective."""
    ck = os.path.join(small_disk, "ck")
    p = run_cli([*trainer(2), *FAULTS_TINY, "--train-iters", "40", "--save-interval", "2",
                 "--save", ck, "--async-save", "--use-distributed-optimizer"],
                env=slow_env(tmp_path, "0,3"))  # fmt: skip
    assert p.returncode != 0, p.stdout[-2000:]
    lines = [ln for ln in p.stderr.splitlines() if "error: " in ln]
    assert len(lines) == 2 and all("not saved" in ln for ln in lines), p.stderr[-3000:]
    # (the same save; each rank names its own failed write)
    assert len({ln.split("error: ")[1].split(": ")[0] for ln in lines}) == 1, lines
    assert "lost a peer" not in p.stderr
    last = complete_latest(ck)
    assert last is not None and f"iter_{last:07d} is intact" in lines[0]
    assert not [n for n in os.listdir(ck) if n.endswith(".tmp")]
