"""Shared test helpers: paths, a byte-level corpus, and a way to run the CLI."""

import contextlib
import json
import os
import socket
import subprocess
import sys
import traceback

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAKESPEARE = os.path.join(os.path.dirname(REPO), "shared", "data", "tinyshakespeare.txt")


def pytest_configure(config):
    # `make test` (and CI) runs everything; a quick local run skips these:
    #   make test PYTEST_ARGS='-m "not slow"'
    config.addinivalue_line("markers", "slow: over ~30 s on 2 cores; skipped by -m 'not slow'")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(args, timeout=300, env=None, **kw):
    """Run a command (list) from the repo root with this Python; return CompletedProcess."""
    full_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env or {}))
    cmd = [sys.executable] + list(args)
    return subprocess.run(
        cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=full_env, **kw
    )


def sitecustomize_env(site_dir, lines, env) -> dict:
    """The environment of a child trainer whose Python first runs `lines` (a
    sitecustomize.py in site_dir, a pathlib.Path): how the fault tests patch a trainer from
    outside. Returns env with PYTHONPATH leading there."""
    site_dir.mkdir(exist_ok=True)
    # sys.path does not hold the working directory yet when sitecustomize runs: name this
    # checkout, or `import megalite` could find another (an installed one)
    tests = os.path.join(REPO, "tests")
    (site_dir / "sitecustomize.py").write_text(
        f"import os, sys\nsys.path[:0] = [{REPO!r}, {tests!r}]\n" + "".join(f"{x}\n" for x in lines)
    )
    path = os.pathsep.join(p for p in (str(site_dir), os.environ.get("PYTHONPATH")) if p)
    return {"PYTHONPATH": path, **env}


def train_cli(nproc, flags, *args, timeout=300):
    """The trainer through its command line with `flags` + args; it must succeed."""
    p = run_cli([*trainer(nproc), *flags, *args], timeout=timeout)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    return p


def metrics(path) -> list:
    """The records of a --metrics-file."""
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def metric(path, key="loss") -> list:
    """One key of every record of a --metrics-file that has it (the losses, by default)."""
    return [r[key] for r in metrics(path) if key in r]


def trainer(nproc: int = 1) -> list:
    """The trainer's command line as users run it: `-m megalite.train` for one process,
    under torchrun (`--standalone`) for several. Arguments for run_cli."""
    if nproc == 1:
        return ["-m", "megalite.train"]
    return ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
            "-m", "megalite.train"]  # fmt: skip


@pytest.fixture(scope="session")
def byte_corpus(tmp_path_factory):
    """Tiny Shakespeare as a byte-level (vocab 256) Megatron shard, one document per
    blank-line-separated speech: real text, no tokenizer needed. Returns the prefix."""
    from megalite.data import IndexedDatasetWriter

    prefix = str(tmp_path_factory.mktemp("corpus") / "shakespeare_bytes_text_document")
    with open(SHAKESPEARE, "rb") as fh:
        speeches = [s for s in fh.read().split(b"\n\n") if s.strip()]
    writer = IndexedDatasetWriter(prefix, dtype=np.uint16)
    for s in speeches:
        tokens = np.frombuffer(s + b"\n\n", dtype=np.uint8)
        writer.add_document(tokens, [tokens.size])
    writer.finalize()
    return prefix


def spawn(fn, nprocs, out_dir, timeout=150):
    """Run fn(rank, nprocs, port, out_dir) in nprocs CPU processes; fail, never hang.

    forkserver: the server imports torch once and forks each rank from it, which on 2 busy
    cores is ~10x faster than 'spawn' re-importing torch in every rank, and unlike plain fork
    it copies no thread pool of this (pytest) process. A rank that fails writes rank{N}.err
    (see `rank_guard`), which the assertion quotes.
    """
    import multiprocessing
    import time

    import torch.multiprocessing as mp

    multiprocessing.set_forkserver_preload(
        ["torch", "torch.distributed", "megalite.parallel.state"]
    )
    ctx = mp.start_processes(
        fn,
        args=(nprocs, free_port(), str(out_dir)),
        nprocs=nprocs,
        join=False,
        start_method="forkserver",
    )
    deadline = time.time() + timeout
    try:
        while not ctx.join(timeout=2):
            if time.time() > deadline:
                raise TimeoutError(f"{nprocs} ranks did not finish in {timeout} s")
    except Exception as e:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
        errs = [
            open(os.path.join(out_dir, f)).read()
            for f in sorted(os.listdir(out_dir))
            if f.endswith(".err")
        ]
        raise AssertionError(f"{e}\n" + "\n".join(errs)) from None


def join_gloo(rank, world, port, tp=1, pp=1, timeout_minutes=2):
    """In a spawned rank: one compute thread, then megalite's process groups over gloo on
    127.0.0.1:port (the port `spawn` hands each rank). Returns the ParallelState."""
    import torch

    from megalite.parallel import state

    torch.set_num_threads(1)
    return state.initialize(
        tp,
        pp,
        backend="gloo",
        device=torch.device("cpu"),
        timeout_minutes=timeout_minutes,
        rank=rank,
        world_size=world,
        init_method=f"tcp://127.0.0.1:{port}",
    )


@contextlib.contextmanager
def rank_guard(out_dir, rank):
    """In a spawned rank: record a failure as rank{N}.err for `spawn`, always leave the
    process groups."""
    from megalite.parallel import state

    try:
        yield
    except BaseException:
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as fh:
            fh.write(traceback.format_exc())
        raise
    finally:
        state.destroy()


@pytest.fixture(params=["compiled", "reference"])
def impl(request, monkeypatch):
    """Run a kernel test through the default dispatch (C++ here, CUDA on a GPU) and through
    the forced pure-PyTorch reference."""
    if request.param == "reference":
        monkeypatch.setenv("MEGALITE_KERNELS", "reference")
    else:
        monkeypatch.delenv("MEGALITE_KERNELS", raising=False)
    return request.param
