"""Play every rank's pipeline schedule against the others, with no processes: a proof that a
schedule cannot deadlock or mix up tensors, and a timeline of its ideal bubble.

The operations are the very lists the executor runs (`pipeline.schedule_ops`). The model of
communication is the strict one: a Comm (one batch_isend_irecv group, then wait) is complete
only when each of its sends has met the matching receive and each receive its send; matching
is in posting order per (sender, receiver) pair, as NCCL does. A matched pair must carry the
same tensor: the activation (or grad) of the same micro-batch across the same boundary
between virtual stages. Compute takes `forward_cost` / `backward_cost` per stage (split evenly
over its chunks) and transfers take no time, so the timeline's idle time is the schedule's own
bubble; the benchmark plugs in measured op times and a transfer latency instead (`cost`,
`comm_cost`) to predict a real run.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from megalite.parallel.schedules import Comm, Forward, schedule_ops


class ScheduleError(AssertionError):
    """A schedule that deadlocks, mismatches a transfer or breaks a data dependency."""


@dataclass
class RankResult:
    busy: float = 0.0  # time spent computing
    end: float = 0.0  # when its last operation finished
    peak_in_flight: int = 0  # most (chunk, micro-batch) pairs forwarded, not backwarded
    timeline: list = field(default_factory=list)  # (op, start, end) of compute ops


def message(op, rank, pp, vp):
    """What a transfer carries: (kind, boundary, micro-batch), where boundary b is the edge
    between virtual stages b and b + 1 (virtual stage = chunk * PP + rank)."""
    v = op.chunk * pp + rank
    upstream = op.kind == "fwd" and op.send or op.kind == "bwd" and not op.send
    return (op.kind, v if upstream else v - 1, op.mb)


def simulate(
    pp,
    num_microbatches,
    vp=1,
    forward_only=False,
    forward_cost=1.0,
    backward_cost=2.0,
    programs=None,
    cost=None,
    comm_cost=0.0,
):
    """Run the schedule of every rank; return [RankResult] or raise ScheduleError.

    programs: per-rank operation lists to play instead of megalite's schedule (tests use it
    to show that a broken schedule is caught). cost(rank, op): compute time of an op, instead
    of forward_cost / backward_cost. comm_cost: time a batch of transfers takes once both
    sides have posted it.

    Over ~60 lines: three closures (compute, post, try_complete) over one shared state (each
    rank's clock, posted transfers and what it holds) and the loop that plays them; apart,
    they would pass that whole state around.
    """
    M, V = num_microbatches, vp
    progs = programs or [schedule_ops(pp, r, M, V, forward_only) for r in range(pp)]
    pc, clock = [0] * pp, [0.0] * pp
    posted = [None] * pp  # the open Comm of each rank: [(stream, index, is_send)]
    sends = defaultdict(list)  # (src, dst) -> [(message, time posted)] in posting order
    recvs = defaultdict(list)
    have = [set() for _ in range(pp)]  # what each rank holds: ("in"/"grad"/"out"/"dgrad", c, mb)
    in_flight = [0] * pp
    res = [RankResult() for _ in range(pp)]

    def peer(r, op):
        forward_direction = (op.kind == "fwd") == op.send
        return (r + 1) % pp if forward_direction else (r - 1) % pp

    def compute(r, op):
        c, mb = op.chunk, op.mb
        first, last = r == 0 and c == 0, r == pp - 1 and c == V - 1
        if isinstance(op, Forward):
            if not first and ("in", c, mb) not in have[r]:
                raise ScheduleError(f"rank {r} runs {op} before receiving its input")
            have[r].add(("out", c, mb))
            in_flight[r] += 0 if forward_only else 1
            t = forward_cost / V
        else:
            if ("out", c, mb) not in have[r]:
                raise ScheduleError(f"rank {r} runs {op} before its forward")
            if not last and ("grad", c, mb) not in have[r]:
                raise ScheduleError(f"rank {r} runs {op} before receiving its output grad")
            have[r].add(("dgrad", c, mb))
            in_flight[r] -= 1
            t = backward_cost / V
        if cost is not None:
            t = cost(r, op)
        res[r].peak_in_flight = max(res[r].peak_in_flight, in_flight[r])
        res[r].timeline.append((op, clock[r], clock[r] + t))
        clock[r] += t
        res[r].busy += t

    def post(r, comm):
        posted[r] = []
        for op in comm.ops:
            if op.send and ("out" if op.kind == "fwd" else "dgrad", op.chunk, op.mb) not in have[r]:
                raise ScheduleError(f"rank {r} sends {op} before computing it")
            key = (r, peer(r, op)) if op.send else (peer(r, op), r)
            table = sends if op.send else recvs
            table[key].append((message(op, r, pp, V), clock[r]))
            posted[r].append((key, len(table[key]) - 1, op))

    def try_complete(r):
        done_at = clock[r]
        for key, i, op in posted[r]:
            other = (recvs if op.send else sends)[key]
            if len(other) <= i:
                return False
            mine = (sends if op.send else recvs)[key][i]
            if mine[0] != other[i][0]:
                sent, got = (mine[0], other[i][0]) if op.send else (other[i][0], mine[0])
                raise ScheduleError(
                    f"transfer {i} from rank {key[0]} to rank {key[1]} sends "
                    f"{sent} into the receive of {got}"
                )
            done_at = max(done_at, other[i][1])
        for key, i, op in posted[r]:
            if not op.send:
                have[r].add(("in" if op.kind == "fwd" else "grad", op.chunk, op.mb))
        clock[r], posted[r] = done_at + comm_cost, None
        return True

    progress = True
    while progress:
        progress = False
        for r in range(pp):
            while pc[r] < len(progs[r]):
                op = progs[r][pc[r]]
                if isinstance(op, Comm):
                    if posted[r] is None:
                        post(r, op)
                        progress = True
                    if not try_complete(r):
                        break
                else:
                    compute(r, op)
                pc[r] += 1
                progress = True
    stuck = [r for r in range(pp) if pc[r] < len(progs[r])]
    if stuck:
        raise ScheduleError(
            "deadlock: " + "; ".join(f"rank {r} waits in {progs[r][pc[r]]}" for r in stuck)
        )
    for key in set(sends) | set(recvs):
        if len(sends[key]) != len(recvs[key]):
            raise ScheduleError(
                f"rank {key[0]} sends {len(sends[key])} tensors to rank "
                f"{key[1]}, which receives {len(recvs[key])}"
            )
    for r in range(pp):
        want = {
            (k, c, mb)
            for c in range(V)
            for mb in range(M)
            for k in (("out",) if forward_only else ("out", "dgrad"))
        }
        done = {h for h in have[r] if h[0] in ("out", "dgrad")}
        if done != want:
            raise ScheduleError(f"rank {r} computed {sorted(done ^ want)[:4]}... wrongly")
        res[r].end = clock[r]
    return res


def bubble_fraction(results) -> float:
    """Idle share of the iteration, averaged over ranks: 1 - busy / makespan."""
    makespan = max(r.end for r in results)
    return sum(1 - r.busy / makespan for r in results) / len(results)


def theoretical_bubble(pp, num_microbatches, vp=1) -> float:
    """(PP - 1) / (M + PP - 1), divided by the virtual stages for the interleaved schedule."""
    return (pp - 1) / (num_microbatches + pp - 1) / vp
