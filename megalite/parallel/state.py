"""Every process group of a run, built from one rank grid.

    world = TP x DP x PP,   rank = tp_rank + TP * (dp_rank + DP * pp_rank)

TP varies fastest so that a tensor-parallel group sits on one node (NVLink); a pipeline stage
spans whole data-parallel groups. `group_ranks` is the one place the grid is turned into rank
lists; `initialize` builds a torch.distributed group from each list. One `ParallelState` owns
the groups; the module-level getters read the current one. Before `initialize()` (a plain
single-process run) every size is 1 and every group is None, and the parallel layers reduce to
ordinary ones with no communication at all.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

from megalite.errors import MegaliteError


@dataclass
class ParallelState:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    tp_group: Optional[dist.ProcessGroup] = None
    pp_group: Optional[dist.ProcessGroup] = None
    dp_group: Optional[dist.ProcessGroup] = None
    mp_group: Optional[dist.ProcessGroup] = None  # TP x PP: one full model replica
    embedding_group: Optional[dist.ProcessGroup] = None  # first + last pipeline stage
    # The global ranks of each of my groups (tests and logs read them; so does pipeline p2p).
    tp_ranks: tuple = (0,)
    dp_ranks: tuple = (0,)
    pp_ranks: tuple = (0,)  # my pipeline, by stage
    mp_ranks: tuple = (0,)
    embedding_ranks: tuple = (0,)  # () on a middle pipeline stage

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def dp_rank(self) -> int:
        return (self.rank // self.tp) % self.dp

    @property
    def pp_rank(self) -> int:
        return self.rank // (self.tp * self.dp)

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1


_STATE = ParallelState()


def get() -> ParallelState:
    return _STATE


def rank_of(tp_rank: int, dp_rank: int, pp_rank: int, tp: int, dp: int) -> int:
    return tp_rank + tp * (dp_rank + dp * pp_rank)


def check_layout(world_size: int, tp: int, pp: int) -> int:
    """Return the data-parallel size, or raise naming the numbers that do not factor."""
    if tp < 1 or pp < 1:
        raise MegaliteError(f"parallel sizes must be >= 1, got TP={tp} PP={pp}")
    if world_size % (tp * pp):
        raise MegaliteError(
            f"world size {world_size} is not divisible by tensor-parallel {tp} x "
            f"pipeline-parallel {pp}; launch a multiple of {tp * pp} processes"
        )
    return world_size // (tp * pp)


def group_ranks(tp: int, pp: int, dp: int) -> dict[str, list[list[int]]]:
    """Every group of the grid, as lists of global ranks, in creation order.

    tp:        same (dp, pp), tp = 0..TP-1     (one layer split over a node)
    dp:        same (tp, pp), dp = 0..DP-1     (replicas that average grads)
    pp:        same (tp, dp), pp = 0..PP-1     (one pipeline, by stage)
    mp:        same dp                         (TP x PP: one whole model)
    embedding: first and last rank of each pipeline (the tied embedding's two copies)
    """
    R = lambda t, d, p: rank_of(t, d, p, tp, dp)  # noqa: E731
    pipelines = [[R(t, d, p) for p in range(pp)] for d in range(dp) for t in range(tp)]
    return {
        "tp": [[R(t, d, p) for t in range(tp)] for p in range(pp) for d in range(dp)],
        "dp": [[R(t, d, p) for d in range(dp)] for p in range(pp) for t in range(tp)],
        "pp": pipelines,
        "mp": [[R(t, d, p) for p in range(pp) for t in range(tp)] for d in range(dp)],
        "embedding": [sorted({r[0], r[-1]}) for r in pipelines],
    }


def device_index(local_rank: int, device_count: int) -> int:
    """The GPU a process drives, among those it sees. torchrun on a node of 8 GPUs: local rank
    i drives GPU i. srun with one task per GPU (CUDA_VISIBLE_DEVICES leaves each task one GPU,
    while LOCAL_RANK still counts the node's tasks): every task drives its device 0. Two
    processes per GPU (a test on a small machine) share round-robin."""
    if device_count < 1:
        raise MegaliteError(
            "--device cuda but this process sees no GPU; check CUDA_VISIBLE_DEVICES or train "
            "with --device cpu"
        )
    return local_rank % device_count


def local_device(device: torch.device) -> torch.device:
    """`device` with this process's GPU index: the one asked for, or else LOCAL_RANK's
    (`device_index`)."""
    if device.index is not None:
        return device
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    return torch.device("cuda", device_index(local_rank, torch.cuda.device_count()))


def initialize(
    tp: int = 1,
    pp: int = 1,
    backend: Optional[str] = None,
    device: Optional[torch.device] = None,
    timeout_minutes: float = 10.0,
    *,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
    init_method: Optional[str] = None,
) -> ParallelState:
    """Build every group. Joins torch.distributed if needed: from torchrun's environment
    (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), or explicitly (tests spawning ranks pass
    rank, world_size and an init_method such as tcp://127.0.0.1:PORT).

    The layout is checked before the process group is joined, so an impossible layout fails
    at once on every rank instead of waiting in a collective. Calling it again in a joined
    world (tests trying several TP sizes) builds a fresh set of groups.

    On CUDA every path (one process, joining, or a world already joined) first makes this
    process's GPU current (`local_device`): LOCAL_RANK modulo the visible devices. The GPU is
    also handed to init_process_group as device_id, so NCCL forms its communicators at once
    (and splits the sub-groups from them) instead of on the first collective.

    Over ~60 lines (a third of it the signature): joining, building every group in the
    collective order, and recording mine are one sequence every rank must run alike.
    """
    global _STATE
    if dist.is_initialized():
        world = dist.get_world_size()
    else:
        world = world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", 1))
    dp = check_layout(world, tp, pp)
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        device = local_device(device)
        torch.cuda.set_device(device)
    if world == 1 and not dist.is_initialized():
        _STATE = ParallelState(device=device)
        return _STATE

    if not dist.is_initialized():
        kw = {} if rank is None else dict(rank=rank, world_size=world)
        dist.init_process_group(
            backend=backend or ("nccl" if device.type == "cuda" else "gloo"),
            init_method=init_method,
            timeout=datetime.timedelta(minutes=timeout_minutes),
            device_id=device if device.type == "cuda" else None,
            **kw,
        )
        # Tear the groups down before the interpreter does: left to its final teardown, a
        # gloo group's worker threads can be destroyed unjoined, and the process aborts
        # ("terminate called without an active exception") after a run that succeeded.
        atexit.register(destroy)
    me = dist.get_rank()

    # new_group is collective over the whole world: every rank creates every group, in the
    # same order, and keeps the one it belongs to.
    mine = {}
    for kind, lists in group_ranks(tp, pp, dp).items():
        for ranks in lists:
            g = dist.new_group(ranks)
            if me in ranks:
                mine[kind] = (g, tuple(ranks))
    # A middle pipeline stage (PP > 2) holds no embedding copy: it is in no embedding group.
    embedding_group, embedding_ranks = mine.get("embedding", (None, ()))
    _STATE = ParallelState(
        tp=tp,
        pp=pp,
        dp=dp,
        rank=me,
        device=device,
        tp_group=mine["tp"][0],
        dp_group=mine["dp"][0],
        pp_group=mine["pp"][0],
        mp_group=mine["mp"][0],
        embedding_group=embedding_group,
        tp_ranks=mine["tp"][1],
        dp_ranks=mine["dp"][1],
        pp_ranks=mine["pp"][1],
        mp_ranks=mine["mp"][1],
        embedding_ranks=embedding_ranks,
    )
    return _STATE


def destroy() -> None:
    global _STATE
    if dist.is_initialized():
        dist.destroy_process_group()
    _STATE = ParallelState()


@contextlib.contextmanager
def as_rank(tp: int, pp: int, tp_rank: int, pp_rank: int, dp: int = 1, device=None):
    """Within it, this process reads as rank (tp_rank, DP rank 0, pp_rank) of a TP x DP x PP
    layout, with no process group of its own: for building another rank's model chunks on the
    meta device (their names, tags and sizes), as the checkpoint converters and the planner
    do."""
    saved = get()
    rank = rank_of(tp_rank, 0, pp_rank, tp, dp)
    device = torch.device("cpu") if device is None else torch.device(device)
    set_state(ParallelState(tp=tp, pp=pp, dp=dp, rank=rank, device=device))
    try:
        yield
    finally:
        set_state(saved)


def set_state(state: ParallelState) -> None:
    """Install a state (tests use this to build the single-process reference model inside a
    multi-process test, or to construct a layer as if it were one TP rank)."""
    global _STATE
    _STATE = state
