"""Several "nodes" on one machine (issue 13): network namespaces joined by a bridge.

    with Cluster(2, tmp_path) as c:                 # skips the test where netns is refused
        procs = [c.launch(i, ["--num-layers", "2", ...], nproc=2) for i in range(2)]
        c.wait(procs, timeout=180)                   # every node's exit status
        c.log(0)                                     # node 0's output

Each node is a namespace with one interface, `eth0`, holding 10.A.B.(i+1)/24 on a bridge that
lives in a namespace of its own (the "switch"), so nothing is added to the host's network and
the addresses exist only inside those namespaces. A node runs `launch/pretrain.sh` with the
real multi-node variables (NNODES, NODE_RANK, MASTER_ADDR = node 0's address, MASTER_PORT),
exactly as a user would on two machines. Faults: `kill_node(i)` SIGKILLs every process of node
i's launcher (its own process group), `link_down(i)` cuts node i's cable.

Teardown always runs (also after a failure or a timeout): every process group this harness
started is killed, then the namespaces are deleted (which deletes their interfaces). Only
processes started here are ever signalled.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO

_COUNTER = itertools.count()


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read()
    except OSError:
        return b""


def _descendants(root: int) -> list[int]:
    """Every live process below `root`, children before their parents' parents."""
    parent = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as fh:
                    # pid (comm) state ppid ...: comm may hold spaces, so split after ')'
                    parent[int(d)] = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    out, frontier = [], [root]
    while frontier:
        kids = [c for c, pp in parent.items() if pp in frontier]
        out = kids + out
        frontier = kids
    return out


def worker_pids(launcher: int) -> list[int]:
    """PIDs of the training processes (`-m megalite.train` under torchrun) below `launcher`."""
    return [d for d in _descendants(launcher) if b"megalite.train" in _cmdline(d)
            and b"torch.distributed.run" not in _cmdline(d)]  # fmt: skip


def kill_launch(p: subprocess.Popen) -> None:
    """SIGKILL a launcher and everything under it: torchrun starts each worker in a session
    of its own, so the launcher's process group alone would miss them."""
    if p.poll() is None:
        for pid in [*_descendants(p.pid), p.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    try:
        p.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass


def _ip(*args, check=True):
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


class Cluster:
    def __init__(self, nnodes: int, workdir, port: int = 29500):
        n = next(_COUNTER)
        self.tag = f"ml{os.getpid() % 100000}x{n}"  # unique per test process and cluster
        self.switch = f"{self.tag}sw"
        self.names = [f"{self.tag}n{i}" for i in range(nnodes)]
        # 10.200-249.x.0/24: private, and per process/cluster so parallel runs never meet.
        self.subnet = f"10.{200 + os.getpid() % 50}.{n % 250}"
        self.addrs = [f"{self.subnet}.{i + 1}" for i in range(nnodes)]
        self.port = port
        self.workdir = str(workdir)
        self.procs: list[tuple[int, subprocess.Popen]] = []
        self._created: list[str] = []

    # -- set up / tear down ---------------------------------------------------------------
    def __enter__(self) -> "Cluster":
        try:
            self._create()
        except (OSError, subprocess.CalledProcessError) as e:
            self._teardown()
            why = getattr(e, "stderr", "") or str(e)
            pytest.skip(f"network namespaces unavailable here: {why.strip()}")
        return self

    def _create(self):
        for ns in [self.switch, *self.names]:
            _ip("netns", "add", ns)
            self._created.append(ns)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        for i, ns in enumerate(self.names):
            port = f"p{i}"
            _ip("link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", port,
                "netns", self.switch)  # fmt: skip
            _ip("-n", self.switch, "link", "set", port, "master", "br0")
            _ip("-n", self.switch, "link", "set", port, "up")
            _ip("-n", ns, "addr", "add", f"{self.addrs[i]}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")

    def __exit__(self, *exc):
        self._teardown()
        return False

    def _teardown(self):
        for _, p in self.procs:
            kill_launch(p)
        for ns in reversed(self._created):
            _ip("netns", "del", ns, check=False)
        self._created.clear()

    # -- running --------------------------------------------------------------------------
    def launch(self, node: int, args, nproc: int = 1, env=None, ifname="eth0"):
        """Start `launch/pretrain.sh args` on `node` (in a new process group); returns it.
        ifname=None leaves GLOO_SOCKET_IFNAME unset (the launcher picks the interface)."""
        var = {
            "NNODES": str(len(self.names)),
            "NODE_RANK": str(node),
            "NPROC": str(nproc),
            "MASTER_ADDR": self.addrs[0],
            "MASTER_PORT": str(self.port),
            "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
            "PYTHON": os.environ.get("PYTHON", sys.executable),
        }
        if ifname:
            var["GLOO_SOCKET_IFNAME"] = ifname
        full = dict(os.environ, **var, **(env or {}))
        if not ifname:
            full.pop("GLOO_SOCKET_IFNAME", None)
        log = open(self.log_path(node), "w")
        cmd = ["ip", "netns", "exec", self.names[node], "bash", "launch/pretrain.sh", *args]
        p = subprocess.Popen(
            cmd, cwd=REPO, env=full, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        self.procs.append((node, p))
        return p

    def log_path(self, node: int) -> str:
        return os.path.join(self.workdir, f"node{node}.log")

    def log(self, node: int) -> str:
        with open(self.log_path(node)) as fh:
            return fh.read()

    def wait(self, procs, timeout: float) -> list[int]:
        """Every process's exit status; after `timeout` seconds the rest are killed and
        the test fails with the end of every node's log."""
        deadline = time.time() + timeout
        codes = []
        for p in procs:
            try:
                codes.append(p.wait(timeout=max(1.0, deadline - time.time())))
            except subprocess.TimeoutExpired:
                for q in procs:
                    kill_launch(q)
                pytest.fail(f"nodes still running after {timeout} s\n" + self.tails())
        return codes

    def tails(self, chars: int = 3000) -> str:
        return "\n".join(
            f"--- node {i} ---\n{self.log(i)[-chars:]}" for i in range(len(self.names))
        )

    # -- faults ---------------------------------------------------------------------------
    def kill_node(self, node: int) -> None:
        """SIGKILL every process of `node` (its launcher, torchrun and the workers)."""
        for i, p in self.procs:
            if i == node:
                kill_launch(p)

    def workers(self, node: int) -> list[int]:
        """PIDs of node's training processes (`-m megalite.train` under its torchrun)."""
        return [pid for i, p in self.procs if i == node for pid in worker_pids(p.pid)]

    def link_down(self, node: int) -> None:
        _ip("-n", self.names[node], "link", "set", "eth0", "down")
