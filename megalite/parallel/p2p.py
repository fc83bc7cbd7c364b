"""Point-to-point transfers between adjacent pipeline stages.

A pipeline schedule moves two kinds of tensor between neighbours: activations forward
(stage r -> r+1) and their gradients backward (r+1 -> r). Every transfer has the same shape,
fixed by the config ([seq, micro_batch, hidden], [seq/tp, ...] with sequence parallelism), so
a receiver can allocate its buffer before the data arrives and no shapes are exchanged.

One `exchange` call is one `batch_isend_irecv` group on the pipeline group, waited on before
the schedule goes on. On NCCL that wait orders the current CUDA stream after NCCL's and does not
block the host: the next kernel that reads a received tensor runs after the transfer, and
nothing drains the device (a torch.cuda.synchronize() here would also wait for the DP
reductions and param gathers in flight, which --overlap-param-gather exists to hide).
The schedule decides what goes in a group and in what order (pipeline.py's `Comm`): sends and
receives between a pair of ranks are matched in posting order (NCCL matches that way; gloo per
tag, and we use one tag), which is why every group lists its forward transfers before its
backward ones. With PP = 2 both neighbours are the same rank, and only a fixed order makes the
activation meet the activation buffer and the gradient meet the gradient buffer.
"""

from __future__ import annotations

import torch.distributed as dist

from megalite.parallel import state


def next_rank() -> int:
    """Global rank of the next pipeline stage (wrapping: the last stage's next is the first,
    which is where an interleaved schedule's chunk k+1 lives)."""
    st = state.get()
    return st.pp_ranks[(st.pp_rank + 1) % st.pp]


def prev_rank() -> int:
    st = state.get()
    return st.pp_ranks[(st.pp_rank - 1) % st.pp]


def exchange(transfers) -> None:
    """Run one group of transfers and wait for all of them.

    transfers: [(is_send, tensor, peer_global_rank)] in the order to post them; every peer
    is in my pipeline group. A received tensor is written in place; a sent tensor must stay
    alive until this returns (after it, its memory may be reused by work on the current
    stream, which now runs after the send).
    """
    if not transfers:
        return
    group = state.get().pp_group  # P2POp takes the peer as a global rank of this group
    ops = [
        dist.P2POp(dist.isend if is_send else dist.irecv, t, peer, group=group)
        for is_send, t, peer in transfers
    ]
    for req in dist.batch_isend_irecv(ops):
        req.wait()
