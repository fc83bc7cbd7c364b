"""Pipeline schedules, pure Python: in which order each rank runs its forwards, backwards and
transfers (which layers each stage owns is `megalite.layout`).

A schedule is data. `one_f_one_b(pp, rank, M)` and `interleaved_1f1b(pp, rank, M, vp)` return
the exact sequence of operations rank `rank` performs: Forward(chunk, mb), Backward(chunk, mb)
and Comm (one batch_isend_irecv group of sends/receives, waited on). The executor
(`pipeline.py`) plays that list on the model; `schedule_sim.py` plays every rank's list against
the others with no processes at all. Both read the same lists, so the simulation test checks
the schedule that runs, not a copy of it.
"""

from __future__ import annotations

from dataclasses import dataclass

from megalite.errors import MegaliteError


# -- operations -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Forward:
    chunk: int
    mb: int


@dataclass(frozen=True)
class Backward:
    chunk: int
    mb: int


@dataclass(frozen=True)
class P2P:
    """One transfer of one batch: send or receive, the forward activation ("fwd": from the
    previous rank / to the next) or its gradient ("bwd": from the next / to the previous), of
    this rank's (chunk, mb): a send carries its output (fwd) or input grad (bwd), a receive
    brings its input (fwd) or output grad (bwd)."""

    send: bool
    kind: str
    chunk: int
    mb: int


@dataclass(frozen=True)
class Comm:
    ops: tuple


def _comm(ops: list, *transfers) -> None:
    """Append one batch of transfers (None entries skipped), forward ones first: between two
    ranks, transfers are matched in posting order, and with PP = 2 the two neighbours are
    the same rank (see p2p.py)."""
    batch = sorted((t for t in transfers if t is not None), key=lambda t: t.kind != "fwd")
    if batch:
        ops.append(Comm(tuple(batch)))


def one_f_one_b(pp, rank, num_microbatches, forward_only=False) -> list:
    """Rank `rank`'s operations under 1F1B (PipeDream-Flush, Megatron's default schedule).

    Warmup: min(PP - rank - 1, M) forwards; steady state: one forward, one backward; cooldown:
    the remaining backwards. At most PP - rank micro-batches are ever in flight on a stage,
    whatever M. Forward-only (evaluation) is all warmup.
    """
    M, ops = num_microbatches, []
    first, last = rank == 0, rank == pp - 1
    recv_fwd = lambda mb: None if first else P2P(False, "fwd", 0, mb)  # noqa: E731
    send_fwd = lambda mb: None if last else P2P(True, "fwd", 0, mb)  # noqa: E731
    recv_bwd = lambda mb: None if last else P2P(False, "bwd", 0, mb)  # noqa: E731
    send_bwd = lambda mb: None if first else P2P(True, "bwd", 0, mb)  # noqa: E731

    warmup = M if forward_only else min(pp - rank - 1, M)
    steady = M - warmup
    for mb in range(warmup):
        _comm(ops, recv_fwd(mb))
        ops.append(Forward(0, mb))
        _comm(ops, send_fwd(mb))
    if steady:
        _comm(ops, recv_fwd(warmup))
    for i in range(steady):
        f, b = warmup + i, i
        ops.append(Forward(0, f))
        _comm(ops, send_fwd(f), recv_bwd(b))
        ops.append(Backward(0, b))
        _comm(ops, send_bwd(b), recv_fwd(f + 1) if i < steady - 1 else None)
    for b in range(steady, M if not forward_only else 0):
        _comm(ops, recv_bwd(b))
        ops.append(Backward(0, b))
        _comm(ops, send_bwd(b))
    return ops


def interleaved_1f1b(pp, rank, num_microbatches, vp, forward_only=False) -> list:
    """Rank `rank`'s operations under interleaved 1F1B with `vp` model chunks per rank
    (Narayanan et al. 2021; Megatron's order). The bubble shrinks by vp; the price is vp times
    more point-to-point transfers and, on the first stage, up to PP + (PP - 1) / vp stages'
    worth of activations instead of PP.

    Virtual micro-batch k (0 .. M*vp - 1) runs chunk (k mod PP*vp) // PP on micro-batch
    (k // PP*vp) * PP + k mod PP: groups of PP micro-batches go through chunk 0, then chunk 1,
    ... (backwards through the chunks in reverse). Hence M must be a multiple of PP.

    One function on purpose (~80 lines): warmup, steady state and cooldown read top to
    bottom against Megatron's order; the simulator (schedule_sim) checks every (PP, vp, M).
    """
    M, V = num_microbatches, vp
    if M % pp:
        raise MegaliteError(
            f"the interleaved schedule needs the number of micro-batches ({M}) "
            f"to be a multiple of --pipeline-model-parallel-size {pp}"
        )
    total, group = M * V, pp * V
    first, last = rank == 0, rank == pp - 1
    chunk_of = lambda k, fwd: (k % group) // pp if fwd else V - 1 - (k % group) // pp  # noqa
    mb_of = lambda k: (k // group) * pp + k % pp  # noqa
    # Receives bring the next micro-batch of a chunk, in order: count them per chunk.
    n_in, n_grad = [0] * V, [0] * V

    def recv_fwd(c):
        n_in[c] += 1
        return P2P(False, "fwd", c, n_in[c] - 1)

    def recv_bwd(c):
        n_grad[c] += 1
        return P2P(False, "bwd", c, n_grad[c] - 1)

    def send_fwd(k):
        c = chunk_of(k, True)
        return None if last and c == V - 1 else P2P(True, "fwd", c, mb_of(k))

    def send_bwd(k):
        c = chunk_of(k, False)
        return None if first and c == 0 else P2P(True, "bwd", c, mb_of(k))

    # Warmup: every rank runs vp - 1 rounds of PP micro-batches, and earlier stages 2 more per
    # stage ahead of them, before the first backward can come back.
    warmup = total if forward_only else min((pp - rank - 1) * 2 + (V - 1) * pp, total)
    all_warmup = warmup == total and not forward_only
    steady = total - warmup
    ops = []
    _comm(ops, None if first else recv_fwd(0))
    for k in range(warmup):
        ops.append(Forward(chunk_of(k, True), mb_of(k)))
        nxt = chunk_of(k + 1, True)
        recv = None if (first and nxt == 0) or k == total - 1 else recv_fwd(nxt)
        if k == warmup - 1 and not forward_only and not all_warmup:
            # The last warmup step also fetches the first backward's gradient.
            _comm(ops, send_fwd(k), recv, None if last else recv_bwd(V - 1))
        else:
            _comm(ops, send_fwd(k), recv)
    for i in range(steady):
        fk, bk = warmup + i, i
        ops.append(Forward(chunk_of(fk, True), mb_of(fk)))
        ops.append(Backward(chunk_of(bk, False), mb_of(bk)))
        # Which chunk receives next. The first rank gets its chunk c > 0 inputs from the last
        # rank, PP - 1 virtual steps behind; the last rank its gradients from the first.
        if first:
            c = chunk_of(fk - (pp - 1), True)
            recv = None if c == V - 1 else (c + 1)
        else:
            recv = chunk_of(fk + 1, True)
        if last:
            c = chunk_of(bk - (pp - 1), False)
            recv_g = None if c == 0 else (c - 1)
        else:
            recv_g = chunk_of(bk + 1, False)
        if i == steady - 1:
            recv = None
        _comm(
            ops,
            send_fwd(fk),
            send_bwd(bk),
            None if recv is None else recv_fwd(recv),
            None if recv_g is None else recv_bwd(recv_g),
        )
    if not forward_only:
        if all_warmup and not last:
            _comm(ops, recv_bwd(V - 1))
        for k in range(steady, total):
            ops.append(Backward(chunk_of(k, False), mb_of(k)))
            nxt = chunk_of(k + 1, False)
            recv_g = None if (last and nxt == V - 1) or k == total - 1 else recv_bwd(nxt)
            _comm(ops, send_bwd(k), recv_g)
    return ops


def all_forward_all_backward(pp, rank, num_microbatches, forward_only=False) -> list:
    """GPipe's order: every forward, then every backward. Not used for training (a stage holds
    all M micro-batches); kept as the contrast in the memory test and the benchmark."""
    M, ops = num_microbatches, []
    first, last = rank == 0, rank == pp - 1
    for mb in range(M):
        _comm(ops, None if first else P2P(False, "fwd", 0, mb))
        ops.append(Forward(0, mb))
        _comm(ops, None if last else P2P(True, "fwd", 0, mb))
    for mb in range(M if not forward_only else 0):
        _comm(ops, None if last else P2P(False, "bwd", 0, mb))
        ops.append(Backward(0, mb))
        _comm(ops, None if first else P2P(True, "bwd", 0, mb))
    return ops


def schedule_ops(pp, rank, num_microbatches, vp=1, forward_only=False) -> list:
    """The operations of the schedule megalite runs for this layout (PP = 1: 1F1B with no
    transfers, i.e. F0 B0 F1 B1 ...)."""
    if vp > 1:
        return interleaved_1f1b(pp, rank, num_microbatches, vp, forward_only)
    return one_f_one_b(pp, rank, num_microbatches, forward_only)
