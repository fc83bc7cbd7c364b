"""Step timers (--timing-log-level, Megatron's flag): where a training step's time goes.

    level 0   (default) nothing: `active` is None, so each instrumented site costs one global
              read and a None check (`timed` returns one shared no-op context)
    level 1   every logged iteration: this rank's split of the step, averaged per iteration
              over the log window, as the metrics record's time_*_s keys and a compact split
              on the console line
    level 2   level 1, plus every rank's split, gathered once per log line (one small
              all-gather: ranks never wait for each other per op): a metrics record per rank
              ({"iteration", "rank", "time_*_s"}), and time_*_max_s (the max over ranks, as
              Megatron's timers report) in the main record and on the console

A leaf module (torch only, and megalite's parallel state at log time), so that the parallel
code (tensor, ddp, zero, pipeline) can mark its regions without importing the training loop.

**The parts.** A step is cut into consecutive intervals at every region boundary, and each
interval belongs to the innermost region open during it. Regions nest (a TP all-reduce inside
a layer's forward, a data fetch inside the first stage's forward, a ZeRO-2 bucket wait inside
backward); the outer one's time excludes the inner one's, so nothing counts twice and

    time_step_s = forward + backward + tp_comm + dp_comm + pp_comm + bubble + optimizer
                  + data + other

up to the few microseconds between the step's clock and the first mark (`StepClock` in
training/loop.py measures time_step_s = iter_time_s on its own).

    forward    a model chunk's forward pass, per micro-batch
    backward   its backward pass: with --recompute-granularity the recomputed forward too, the
               DDP grad hooks, and the launches of bucket reductions that then overlap it
    tp_comm    blocked in a tensor-parallel collective (parallel/tensor.py's regions, and the
               sequence-parallel grads' all-reduce in finalize_model_grads)
    dp_comm    blocked on data parallelism, i.e. what backward did not hide: finish_grad_sync
               (launching the buckets backward did not, waiting for all), ZeRO-2/3 waiting for
               a bucket's reduction, every wait for a param all-gather (ZeRO-1 after the step
               or in the next forward's pre-hooks, ZeRO-3's per-layer gathers), the loss's
               mean over DP
    pp_comm    blocked in the pipeline's point-to-point transfers of the steady state; the
               tied embedding's grad all-reduce; the loss's sum over the pipeline
    bubble     PP > 1: the pipeline's fill and drain. The schedule says which transfers those
               are: every one before the rank's first backward (waiting for the first
               activation, and for the first gradient to come back) or after its last forward
               (cool-down), and one wait at the end of forward_backward for the slowest stage
               (a 1-element all-reduce over the pipeline, made only when timing: otherwise a
               later stage's idle tail would be counted in its optimizer, whose grad-norm
               all-reduce is the first to wait for stage 0). With equal stages and free
               transfers these waits sum to (PP - 1) x (t_fwd + t_bwd) per step on every
               stage, and the steady state's to 0; transfers inside fill and drain count as
               bubble, and unequal stages show up as bubble too
    optimizer  optimizer.step(): the grad norm (and its all-reduce over TP x PP, ZeRO's over
               DP), clipping, AdamW, and the launch of ZeRO-1's param all-gather
    data       next(data iterator): reading and collating the micro-batch, starting its copy
               to the device
    other      the rest: the LR, finalize_model_grads' own work, zero_grad, the loss's mean,
               Python between the parts

**Clocks.** On the CPU (gloo) a collective returns when it is done, so the host's clock
around it is the time the step was blocked. On CUDA the host runs ahead of the device: a mark
is an event recorded on the current stream (the same stream all step long: autograd runs
backward on the forward's stream), and an interval is the device's time between two events.
A collective the stream waits for (NCCL's work.wait(), a synchronous collective, a p2p wait)
then counts as exactly its exposed time, and an asynchronous one the stream does not wait for
(a bucket's all-reduce overlapping backward) counts nothing. A host-side part (data) counts
the time the device waited for it, which is 0 while the host keeps ahead. Nothing
synchronizes: a step's events are read once its last one has completed (Event.query(), at the
start of a later step), at the latest when the log window is read (which waits for the device
anyway), and go back to a pool; so the pool holds about two steps' events.
"""

from __future__ import annotations

import time
from typing import Optional

import torch

# In the order of the records and the console line.
PARTS = (
    "forward",
    "backward",
    "tp_comm",
    "dp_comm",
    "pp_comm",
    "bubble",
    "optimizer",
    "data",
    "other",
)
SHORT = {"forward": "fwd", "backward": "bwd", "tp_comm": "tp", "dp_comm": "dp", "pp_comm": "pp",
         "bubble": "bubble", "optimizer": "opt", "data": "data", "other": "other"}  # fmt: skip


# -- clocks -----------------------------------------------------------------------------------


class HostClock:
    """The host's clock (CPU runs): a mark is a perf_counter() reading."""

    mark = staticmethod(time.perf_counter)

    def done(self, mark) -> bool:
        return True

    def seconds(self, a, b) -> float:
        return b - a

    def release(self, marks) -> None:
        pass


class EventClock:
    """CUDA: a mark is an event recorded on the current stream, taken from a pool."""

    def __init__(self):
        self.free = []

    def mark(self):
        e = self.free.pop() if self.free else torch.cuda.Event(enable_timing=True)
        e.record()
        return e

    def done(self, mark) -> bool:
        return mark.query()  # no wait

    def seconds(self, a, b) -> float:
        return a.elapsed_time(b) / 1000

    def release(self, marks) -> None:
        self.free.extend(marks)


# -- one step ---------------------------------------------------------------------------------


class StepTiming:
    """One step's marks and the part of each interval between them; `totals()` reads them
    (once: then the marks go back to the clock's pool)."""

    __slots__ = ("clock", "marks", "parts", "_totals")

    def __init__(self, clock, marks, parts):
        self.clock, self.marks, self.parts, self._totals = clock, marks, parts, None

    def ready(self) -> bool:
        """Whether totals() can be read without waiting (every mark is on one stream, so the
        last one done means all are)."""
        return self._totals is not None or self.clock.done(self.marks[-1])

    def totals(self) -> dict:
        """{part: seconds} of this step."""
        if self._totals is None:
            out = dict.fromkeys(PARTS, 0.0)
            m, seconds = self.marks, self.clock.seconds
            for i, part in enumerate(self.parts):
                out[part] += seconds(m[i], m[i + 1])
            self.clock.release(m)
            self.marks, self._totals = None, out
        return self._totals


class _Region:
    """`with` one part; stateless (the stack is the Timers'), so regions of a part nest."""

    __slots__ = ("timers", "part")

    def __init__(self, timers, part):
        self.timers, self.part = timers, part

    def __enter__(self):
        self.timers.push(self.part)

    def __exit__(self, *exc):
        self.timers.pop()
        return False


class _Null:
    __slots__ = ()

    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


_NULL = _Null()

# The Timers of the step in progress (level >= 1, between start_step and stop_step), else
# None: evaluation, saves and everything between steps are never timed.
active: Optional["Timers"] = None


def timed(part: str):
    """`with timed("dp_comm"): work.wait()`: a region of the step in progress, or nothing."""
    t = active
    return _NULL if t is None else t.regions[part]


class Timers:
    """A run's timers (one per process, level >= 1). `start_step` / `stop_step` bracket a
    training step; between them the instrumented sites enter regions through `timed`."""

    def __init__(self, level: int, clock):
        if level not in (1, 2):
            raise ValueError(f"timing level {level}: Timers are for levels 1 and 2")
        self.level, self.clock = level, clock
        self.regions = {p: _Region(self, p) for p in PARTS}
        self.unread = []  # StepTimings whose marks have not been read yet
        self.marks, self.parts, self.stack = [], [], []

    def read_completed(self) -> None:
        """Read the steps that have completed since (no waiting): their events go back to
        the pool, which so stays at about two steps' worth on CUDA. Called before the step's
        own clock starts (train_step), so that this work is in neither."""
        waiting = []
        for t in self.unread:
            if t.ready():
                t.totals()
            else:
                waiting.append(t)
        self.unread = waiting
        self.marks, self.parts, self.stack = [], [], []  # a step that raised left its own

    def start_step(self) -> None:
        global active
        active = self
        # No new object here (one could start a garbage collection between the two clocks):
        # the lists are the empty ones that __init__ or stop_step left.
        self.parts.append("other")
        self.marks.append(self.clock.mark())  # last: the step's clock started just before

    def push(self, part: str) -> None:
        self.marks.append(self.clock.mark())
        self.stack.append(self.parts[-1])
        self.parts.append(part)

    def pop(self) -> None:
        self.marks.append(self.clock.mark())
        self.parts.append(self.stack.pop())

    def stop_step(self) -> StepTiming:
        global active
        active = None
        step = StepTiming(self.clock, self.marks, self.parts)
        self.unread.append(step)
        self.marks, self.parts, self.stack = [], [], []
        step.marks.append(self.clock.mark())  # last: the step's clock stops just after
        return step


def build(level: int, device: torch.device) -> Optional[Timers]:
    """The run's Timers for --timing-log-level, or None at level 0."""
    if not level:
        return None
    return Timers(level, EventClock() if device.type == "cuda" else HostClock())


def add(totals: dict, step: StepTiming) -> None:
    """Add a step's parts into a window's running totals (read_window)."""
    for part, s in step.totals().items():
        totals[part] = totals.get(part, 0.0) + s


# -- the log line -----------------------------------------------------------------------------


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def _split(means: dict) -> str:
    """'fwd 12.0 | bwd 20.1 | dp 3.2 | opt 2.0 ms': the parts entered at all (exactly 0 means
    never entered: no TP region without TP, and so on)."""
    shown = [f"{SHORT[p]} {_ms(means[p])}" for p in PARTS if means[p] > 0]
    return " | ".join(shown) + " ms" if shown else ""


def gather_ranks(means: dict) -> list:
    """Every rank's means ([rank] -> {part: s}), by one all-gather over the world: level 2,
    once per log line, on every rank alike."""
    import torch.distributed as dist

    from megalite.parallel import state

    if not dist.is_initialized():
        return [means]
    st = state.get()
    mine = torch.tensor([means[p] for p in PARTS], dtype=torch.float64, device=st.device)
    every = torch.empty(st.world_size * len(PARTS), dtype=mine.dtype, device=st.device)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(every, mine)  # rank-major
    return [dict(zip(PARTS, row)) for row in every.view(st.world_size, -1).tolist()]


def report(timers: Timers, totals: dict, iters: int, step_s: float, log, iteration: int):
    """The log line's timing: (record keys, console text), averages per iteration over the
    window's `iters` steps (whose mean time is `step_s`). Level 2 also writes every rank's
    record (`log.record`) and the max over ranks. Called on every rank (level 2 gathers)."""
    means = {p: totals.get(p, 0.0) / iters for p in PARTS}
    rec = {f"time_{p}_s": means[p] for p in PARTS}
    rec["time_step_s"] = step_s
    if timers.level < 2:
        return rec, _split(means)
    every = gather_ranks(means)
    for rank, m in enumerate(every):
        log.record({"iteration": iteration, "rank": rank, **{f"time_{p}_s": m[p] for p in PARTS}})
    worst = {p: max(m[p] for m in every) for p in PARTS}
    rec.update({f"time_{p}_max_s": worst[p] for p in PARTS})
    text = _split(means)
    return rec, text + (f" | max over ranks: {_split(worst)}" if text else "")
