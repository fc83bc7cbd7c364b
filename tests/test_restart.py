"""Restart and resume under torchrun on one node (issue 13): MAX_RESTARTS=N in
launch/pretrain.sh is torchrun's --max-restarts N. With 2 processes (DP=2) and --save = --load,
a worker SIGKILLed mid-run makes torchrun restart the group, which resumes from the last
checkpoint and finishes with exit 0; its iterations are bitwise those of a run never
interrupted. Without MAX_RESTARTS the kill ends the run with a non-zero exit. The 2-node case
and the shared helpers are in tests/test_multinode.py."""

import os
import signal
import subprocess
import sys

from conftest import REPO
from netns import kill_launch, worker_pids
from test_multinode import (  # noqa: F401 (uninterrupted: a fixture)
    KILL_AFTER,
    RESTART_ARGS,
    assert_resumed_bitwise,
    attempts,
    resumable,
    uninterrupted,
    wait_for_records,
)

PRETRAIN = os.path.join(REPO, "launch", "pretrain.sh")


def kill_a_worker_mid_run(tmp_path, env):
    """launch/pretrain.sh with 2 processes, --save = --load; one worker is SIGKILLed once
    KILL_AFTER iterations are logged. Returns (exit status, output, metrics file)."""
    m, ck = tmp_path / "m.jsonl", str(tmp_path / "ck")
    args = [*RESTART_ARGS, *resumable(ck), "--metrics-file", str(m)]
    env = dict(os.environ, NPROC="2", PYTHON=sys.executable, OMP_NUM_THREADS="1",
               PYTHONUNBUFFERED="1", **env)  # fmt: skip
    if env["MAX_RESTARTS"] is None:
        del env["MAX_RESTARTS"]  # the launcher's default
    with open(tmp_path / "log", "w") as log:
        p = subprocess.Popen(["bash", PRETRAIN, *args], cwd=REPO, env=env, stdout=log,
                             stderr=subprocess.STDOUT)  # fmt: skip
    try:
        wait_for_records(m, KILL_AFTER, lambda: p.poll() is None)
        workers = worker_pids(p.pid)
        assert len(workers) == 2, workers
        os.kill(max(workers), signal.SIGKILL)
        code = p.wait(timeout=120)
    finally:
        kill_launch(p)  # a no-op once it has exited
    return code, (tmp_path / "log").read_text(), m


def test_killed_worker_restarts_and_resumes_bitwise(tmp_path, uninterrupted):  # noqa: F811
    code, log, metrics = kill_a_worker_mid_run(tmp_path, {"MAX_RESTARTS": "1"})
    assert code == 0, log[-3000:]
    assert_resumed_bitwise(metrics, log, uninterrupted)


def test_without_max_restarts_a_killed_worker_ends_the_run(tmp_path):
    code, log, metrics = kill_a_worker_mid_run(tmp_path, {"MAX_RESTARTS": None})
    assert code != 0, log[-3000:]
    assert len(attempts(metrics)) == 1 and "resumed from" not in log, log[-3000:]
    assert "lost a peer during a collective" in log, log[-3000:]  # the survivor's one line


def test_bad_max_restarts_is_one_line():
    p = subprocess.run(["bash", PRETRAIN, "--mock-data"], capture_output=True, text=True,
                       env=dict(os.environ, MAX_RESTARTS="-1"))  # fmt: skip
    assert p.returncode == 1 and p.stderr.strip().splitlines() == [
        "error: MAX_RESTARTS must be a whole number (torchrun's --max-restarts), not '-1'"
    ], p.stderr
