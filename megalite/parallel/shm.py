"""Node-local all-reduce through shared memory: the CPU data-parallel grad sum.

Gloo moves a CPU all-reduce through TCP sockets even between two processes of one machine: a
15 MB grad bucket between two local ranks takes ~19 ms on an idle 2-core machine, and the
kernel's socket copies compete with the ranks' compute. Ranks of one node can sum through
one mapped segment instead (DeepSpeed's CPU `shm` comm and oneCCL's intra-node path do the
same): here, about three memory sweeps of the bucket per rank, 3-6 ms for that bucket (and
9-13 ms against gloo's 42 with four ranks on the two cores: a waiting rank sleeps on a futex
after a short spin, so it gives its core to the peer it waits for).

Segment (one per group, created by its first rank in /dev/shm and unlinked as soon as every
rank has mapped it, so nothing outlives the processes): a header of one cache line per rank
(an arrival counter and the pid: csrc/shm_barrier.cpp), then W input slots and one output
area of CHUNK bytes each. A tensor is summed chunk by chunk:

    1. every rank copies its chunk into its own slot            barrier
    2. rank r sums the r-th 1/W of every slot, in rank order,
       into the output area                                     barrier
    3. every rank copies the output area back into its tensor

Each element is summed once, by one rank, in one order, so every rank gets the same bits.
The barrier of the next chunk's step 1 keeps a rank from overwriting its slot or the output
while another still reads them.

Used when every rank of the group is a CPU process of one machine under one torchrun node
(the same host, boot and torchrun node rank: the simulated nodes of the multi-node tests share
a kernel but not a node rank, and keep gloo) and --no-shm-grad-reduce is not given. A peer
that dies is noticed by pid within milliseconds and one that hangs after
--distributed-timeout-minutes: both raise a one-line error instead of waiting.
"""

from __future__ import annotations

import mmap
import os
import socket
import uuid
from typing import Optional

import torch
import torch.distributed as dist

from megalite.errors import MegaliteError

CHUNK = 4 << 20  # bytes per slot: 3 sweeps of a 4 MB chunk stay in a large L2/L3 slice
_LINE = 64  # header bytes per rank (csrc/shm_barrier.cpp's RankLine)
_ALIGN = 64  # each rank's share of a chunk starts on a cache line
SPIN_POLLS = 2000  # pause-polls before a barrier sleeps on its futex (csrc/shm_barrier.cpp)


def _node_key() -> str:
    """What ranks that may share a segment have in common."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            boot = fh.read().strip()
    except OSError:
        boot = ""
    return "|".join(
        (socket.gethostname(), boot, os.environ.get("GROUP_RANK", ""),
         os.environ.get("TORCHELASTIC_RUN_ID", ""))
    )  # fmt: skip


class SharedMemoryAllReduce:
    """`all_reduce_(tensor)`: the in-place sum over a node-local group (see the module doc).
    Build it with `for_group`, collectively over the group."""

    def __init__(self, segment: mmap.mmap, rank: int, world: int, timeout_s: float, kernels):
        self.rank, self.world, self.timeout_s, self._C = rank, world, timeout_s, kernels
        self._segment = segment  # the mapping lives as long as this object
        buf = torch.frombuffer(segment, dtype=torch.uint8)
        header = world * _LINE
        self.header = buf[:header]
        data = buf[header : header + (world + 1) * CHUNK]
        self.slots = [data[i * CHUNK : (i + 1) * CHUNK] for i in range(world)]
        self.output = data[world * CHUNK :]
        self.arrivals = 0
        self.spin_polls = SPIN_POLLS
        kernels.shm_register(self.header, rank, world)

    @staticmethod
    def segment_bytes(world: int) -> int:
        return world * _LINE + (world + 1) * CHUNK

    def _barrier(self) -> None:
        self.arrivals += 1
        status, peer = self._C.shm_barrier(
            self.header, self.rank, self.world, self.arrivals, self.timeout_s, self.spin_polls
        )
        if status == 1:
            raise MegaliteError(  # the words of heartbeat.lost_peer_message, for one grep
                f"lost a peer during a collective in the shared-memory all-reduce: the "
                f"process of rank {peer} of this data-parallel group has ended; check its log, "
                f"then restart the job: it resumes from the last checkpoint (--load)"
            )
        if status == 2:
            raise MegaliteError(
                f"shared-memory all-reduce: rank {peer} of this data-parallel group did not "
                f"arrive within {self.timeout_s:.0f} s (--distributed-timeout-minutes); it hangs "
                "or is far behind"
            )

    def _share(self, k: int, es: int) -> tuple:
        """This rank's element range of a k-element chunk: W nearly equal parts, each on a
        cache line."""
        step = _ALIGN // es
        per = -(-k // (self.world * step)) * step
        return min(k, self.rank * per), min(k, (self.rank + 1) * per)

    @torch.no_grad()
    def all_reduce_(self, tensor: torch.Tensor) -> torch.Tensor:
        if not tensor.is_contiguous() or tensor.device.type != "cpu":
            raise ValueError("shared-memory all-reduce: a contiguous CPU tensor")
        flat, dtype, es = tensor.view(-1), tensor.dtype, tensor.element_size()
        per_chunk = CHUNK // es
        slots = [s.view(dtype) for s in self.slots]
        output = self.output.view(dtype)
        for start in range(0, flat.numel(), per_chunk):
            piece = flat[start : start + per_chunk]
            k = piece.numel()
            slots[self.rank][:k].copy_(piece)
            self._barrier()
            lo, hi = self._share(k, es)
            if hi > lo:
                mine = output[lo:hi]
                torch.add(slots[0][lo:hi], slots[1][lo:hi], out=mine)
                for s in slots[2:]:
                    mine.add_(s[lo:hi])
            self._barrier()
            piece.copy_(output[:k])
        return tensor


def for_group(group, timeout_s: float) -> Optional[SharedMemoryAllReduce]:
    """A SharedMemoryAllReduce over `group` if its ranks can share memory, else None (the
    caller keeps the process group). Collective over the group; every rank gets the same
    answer."""
    from megalite.ops.dispatch import _C

    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if world < 2 or _C is None or not hasattr(_C, "shm_barrier"):
        return None
    keys = [None] * world
    dist.all_gather_object(keys, _node_key(), group=group)
    if len(set(keys)) != 1:
        return None
    size = SharedMemoryAllReduce.segment_bytes(world)
    path = [None]
    if rank == 0:
        try:
            path[0] = f"/dev/shm/megalite-{uuid.uuid4().hex}"
            fd = os.open(path[0], os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
            try:
                # Allocated now, not on first touch: a full /dev/shm fails here (and the
                # group keeps gloo) instead of killing a rank with SIGBUS mid-step.
                os.posix_fallocate(fd, 0, size)
            finally:
                os.close(fd)
        except OSError:
            if path[0] is not None and os.path.exists(path[0]):
                os.unlink(path[0])  # created, but /dev/shm had no room: leave nothing behind
            path[0] = None
    dist.broadcast_object_list(path, src=dist.get_global_rank(group, 0), group=group)
    segment = None
    if path[0] is not None:
        try:
            fd = os.open(path[0], os.O_RDWR)
            try:
                segment = mmap.mmap(fd, size)
            finally:
                os.close(fd)
        except OSError:
            segment = None
    ok = torch.tensor([int(segment is not None)])
    dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=group)  # every rank mapped it: unlink
    if rank == 0 and path[0] is not None:
        os.unlink(path[0])
    if not ok.item():
        return None
    shm = SharedMemoryAllReduce(segment, rank, world, timeout_s, _C)
    dist.barrier(group=group)  # every header line written before the first barrier reads it
    return shm
