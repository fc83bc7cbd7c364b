"""Shared test helpers: paths, a byte-level corpus, and a way to run the CLI."""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAKESPEARE = os.path.join(os.path.dirname(REPO), "shared", "data", "tinyshakespeare.txt")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(args, timeout=300, env=None, **kw):
    """Run a command (list) from the repo root with this Python; return CompletedProcess."""
    full_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env or {}))
    cmd = [sys.executable] + list(args)
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env=full_env, **kw)


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
