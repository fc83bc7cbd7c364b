"""Lost-node detection: a heartbeat ring over the rendezvous store (docs/ARCHITECTURE.md,
"When a node is lost").

A rank that dies outright closes its sockets, so its peers' next collective fails at once
("Connection reset by peer"; `lost_peer_message` turns that into one line). A node that
freezes, or whose link goes down, closes nothing: its peers would sit in their collective for
the whole --distributed-timeout-minutes. So every rank runs a daemon thread that, each
`interval` seconds, bumps its own counter in torchrun's rendezvous store (MASTER_ADDR:
MASTER_PORT), reads the counter of the next rank in a ring (rank r watches r + 1 mod world)
and reads a shared abort flag. When the watched counter has not moved for `timeout` seconds,
the watcher raises the flag with the lost rank's name; every rank that sees the flag, and a
rank that cannot reach the store for `timeout` seconds (its own network is gone), prints one
line and leaves with status 1 at once: os._exit, because the main thread may be blocked inside
a collective, where no Python exception can reach it. Nothing is saved on the way out (the
last checkpoint stays the one to resume from).

Cost: four small store operations per rank per interval, whatever the world size. A rank that
finishes marks itself done, so a slower peer still saving does not take it for lost.
"""

from __future__ import annotations

import datetime
import os
import re
import socket
import sys
import threading
import time
import traceback
from typing import Optional

import torch.distributed as dist

EXIT_STATUS = 1


class Heartbeat:
    def __init__(self, rank: int, world_size: int, timeout: float, interval: float = 5.0):
        self.rank, self.world = rank, world_size
        self.timeout, self.interval = float(timeout), float(interval)
        self.host = os.environ["MASTER_ADDR"]
        self.port = int(os.environ["MASTER_PORT"])
        # A restarted group (torchrun --max-restarts) meets the same store: keys of this
        # attempt only.
        self.prefix = f"megalite/heartbeat/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
        self._stop = threading.Event()
        self._store = dist.TCPStore(
            self.host,
            self.port,
            is_master=False,
            timeout=datetime.timedelta(seconds=self.timeout),
            wait_for_workers=False,
        )
        node = os.environ.get("GROUP_RANK", "?")
        self._store.set(self._key("where", rank), f"node {node} ({socket.gethostname()})")
        self._last_ok = time.monotonic()
        # Two threads: one talks to the store (a call can block without end when the link
        # is down: a half-open connection), the other judges how long ago it last got through.
        self._threads = [
            threading.Thread(target=fn, name=f"megalite-heartbeat-{fn.__name__}", daemon=True)
            for fn in (self._beat, self._judge)
        ]
        for t in self._threads:
            t.start()

    def _key(self, kind: str, rank: Optional[int] = None) -> str:
        return self.prefix + kind + ("" if rank is None else f"/{rank}")

    def stop(self) -> None:
        """A clean end: mark this rank done (its watcher stops watching), stop the thread."""
        self._stop.set()
        for t in self._threads:
            t.join(timeout=self.interval + 5)
        try:
            self._store.add(self._key("done", self.rank), 1)
        except Exception:  # the store's host already left: nobody is watching any more
            pass

    def _beat(self) -> None:
        watched = (self.rank + 1) % self.world
        last_seen, last_change = -1, time.monotonic()
        while not self._stop.wait(self.interval):
            try:
                self._store.add(self._key("beat", self.rank), 1)
                if self._store.add(self._key("abort"), 0):
                    self._die(self._store.get(self._key("why")).decode())
                beat = self._store.add(self._key("beat", watched), 0)
                done = self._store.add(self._key("done", watched), 0)
            except Exception:  # a timeout or a reset connection: _judge decides when to stop
                continue
            now = self._last_ok = time.monotonic()
            if done or beat != last_seen:
                last_seen, last_change = beat, now
            elif now - last_change >= self.timeout:
                why = (
                    f"lost rank {watched} ({self._where(watched)}): no heartbeat for "
                    f"{now - last_change:.0f} s (the node died, froze or lost its network)"
                )
                try:
                    self._store.set(self._key("why"), why)
                    self._store.add(self._key("abort"), 1)
                except Exception:
                    pass
                self._die(why)

    def _judge(self) -> None:
        while not self._stop.wait(self.interval):
            silent = time.monotonic() - self._last_ok
            if silent >= self.timeout:
                self._die(
                    f"lost contact with the rendezvous store at {self.host}:{self.port} for "
                    f"{silent:.0f} s: this node's network, or node 0, failed"
                )

    def _where(self, rank: int) -> str:
        try:
            return self._store.get(self._key("where", rank)).decode()
        except Exception:
            return "node unknown"

    def _die(self, why: str) -> None:
        print(
            f"error: rank {self.rank}: {why}; training stopped. Restart the job: it resumes "
            f"from the last checkpoint (--load). --heartbeat-timeout sets how long a silent "
            f"rank is waited for (0: off)",
            file=sys.stderr,
            flush=True,
        )
        os._exit(EXIT_STATUS)


def start(rank: int, world_size: int, timeout: float) -> Optional[Heartbeat]:
    """A Heartbeat when there is something to watch (several ranks launched by torchrun,
    whose store lives at MASTER_ADDR:MASTER_PORT) and timeout > 0; else None."""
    if world_size < 2 or timeout <= 0 or "MASTER_ADDR" not in os.environ:
        return None
    if "TORCHELASTIC_RUN_ID" not in os.environ:  # not under torchrun: no store to lean on
        return None
    return Heartbeat(rank, world_size, timeout)


def lost_peer_message(exc: BaseException) -> Optional[str]:
    """One line for a collective that failed because a peer went away, else None: the peer's
    address when the backend names it, and the megalite function that was waiting."""
    text = str(exc)
    signs = (
        "Connection reset by peer",
        "Connection closed by peer",
        "Broken pipe",
        "Connection refused",
        "NCCL communicator was aborted",
        "remote process exited",
    )
    sign = next((s for s in signs if s in text), None)
    if sign is None:
        return None
    peer = re.search(r"\[([0-9A-Za-z.:_-]+)\]:\d+", text)
    where = [f for f in traceback.extract_tb(exc.__traceback__) if "/megalite/" in f.filename]
    op = ""
    if where:
        f = where[-1]
        op = f" in {f.name} ({os.path.basename(f.filename)}:{f.lineno})"
    return (
        f"lost a peer during a collective{op}: "
        f"{sign.lower()}{f' ({peer.group(1)})' if peer else ''}: a node or process died; "
        f"check the other nodes' logs, then restart the job: it resumes from the last "
        f"checkpoint (--load)"
    )
