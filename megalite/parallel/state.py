"""Every process group of a run, built from one rank grid.

    world = TP x DP x PP,   rank = tp_rank + TP * (dp_rank + DP * pp_rank)

TP varies fastest so that a tensor-parallel group sits on one node (NVLink); a pipeline stage
spans whole data-parallel groups. One `ParallelState` owns the groups; the module-level
getters read the current one. Before `initialize()` (a plain single-process run) every size is
1 and every group is None, and the parallel layers reduce to ordinary ones with no
communication at all.
"""

from __future__ import annotations

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
    mp_group: Optional[dist.ProcessGroup] = None         # TP x PP: one full model replica
    embedding_group: Optional[dist.ProcessGroup] = None  # first + last pipeline stage
    pp_ranks: tuple = (0,)                               # global ranks of my pipeline, by stage
    embedding_ranks: tuple = (0,)

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
            f"pipeline-parallel {pp}; launch a multiple of {tp * pp} processes")
    return world_size // (tp * pp)


def initialize(tp: int = 1, pp: int = 1, backend: Optional[str] = None,
               device: Optional[torch.device] = None, timeout_minutes: float = 10.0
               ) -> ParallelState:
    """Build every group. Joins torch.distributed from torchrun's environment if needed.

    The layout is checked against WORLD_SIZE before the process group is joined, so an
    impossible layout fails at once on every rank instead of waiting in a collective.
    """
    global _STATE
    world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", 1))
    dp = check_layout(world, tp, pp)
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if world == 1 and not dist.is_initialized():
        _STATE = ParallelState(device=device)
        return _STATE

    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            device = torch.device("cuda", torch.cuda.current_device())
        dist.init_process_group(
            backend=backend or ("nccl" if device.type == "cuda" else "gloo"),
            timeout=datetime.timedelta(minutes=timeout_minutes))
    rank = dist.get_rank()

    # Every rank must create every group, in the same order, even those it is not in.
    def make(groups):
        mine = None
        for ranks in groups:
            g = dist.new_group(ranks)
            if rank in ranks:
                mine = (g, tuple(ranks))
        return mine

    R = lambda t, d, p: rank_of(t, d, p, tp, dp)  # noqa: E731
    tp_group, _ = make([[R(t, d, p) for t in range(tp)] for p in range(pp) for d in range(dp)])
    dp_group, _ = make([[R(t, d, p) for d in range(dp)] for p in range(pp) for t in range(tp)])
    pp_group, pp_ranks = make([[R(t, d, p) for p in range(pp)] for d in range(dp) for t in range(tp)])
    mp_group, _ = make([[R(t, d, p) for p in range(pp) for t in range(tp)] for d in range(dp)])
    emb = [sorted({r[0], r[-1]}) for r in
           ([R(t, d, p) for p in range(pp)] for d in range(dp) for t in range(tp))]
    embedding_group, embedding_ranks = make(emb)

    _STATE = ParallelState(
        tp=tp, pp=pp, dp=dp, rank=rank, device=device, tp_group=tp_group, pp_group=pp_group,
        dp_group=dp_group, mp_group=mp_group, embedding_group=embedding_group,
        pp_ranks=pp_ranks, embedding_ranks=embedding_ranks)
    return _STATE


def destroy() -> None:
    global _STATE
    if dist.is_initialized():
        dist.destroy_process_group()
    _STATE = ParallelState()


def set_state(state: ParallelState) -> None:
    """Install a state (tests use this to run a model as if it were one TP rank)."""
    global _STATE
    _STATE = state
