"""Step timers (--timing-log-level, megalite/timers.py; issue 16).

Without processes: regions nest and their exclusive times add up to the step; level 0 enters
no region; the CUDA path's logic (events from a pool, read only once completed, never waited
for) on a fake event; the bubble's definition (fill and drain transfers, plus the wait for the
slowest stage) equals each stage's idle time in the schedule simulator for 1F1B and the
interleaved schedule, with the steady state's waits exactly 0.
In one process: level 0 builds no Timers and enters no region; a data loader delayed 50 ms
per micro-batch shows up as data time. Two spawned ranks: a TP all-reduce delayed 50 ms shows
up as tp_comm, a DP bucket's all-reduce delayed 200 ms as dp_comm, and nowhere else.
The command line at DP=2, PP=2 and TP=2 (level 1) and PP=2 (level 2): every time_* key, each
part >= 0, the parts add up to time_step_s, and each communication part is non-zero exactly
where its kind of parallelism is.
"""

import json
import os
import time

import pytest

from conftest import rank_guard, run_cli, spawn, trainer
from megalite import timers

NAMED = ("forward", "backward", "tp_comm", "dp_comm", "pp_comm", "bubble", "optimizer", "data")


# -- without processes ------------------------------------------------------------------------


class FakeClock(timers.HostClock):
    """The host clock's interface on a time the test moves."""

    def __init__(self):
        self.now = 0.0

    def mark(self):
        return self.now


@pytest.fixture
def clean_active():
    yield
    timers.active = None


def test_regions_nest_and_add_up_to_the_step(clean_active):
    clock = FakeClock()
    t = timers.Timers(1, clock)
    t.start_step()
    clock.now += 1  # other
    with timers.timed("forward"):
        clock.now += 2
        with timers.timed("data"):
            clock.now += 5
        clock.now += 1
        with timers.timed("tp_comm"):
            clock.now += 3
        clock.now += 4
    clock.now += 6  # other
    with timers.timed("optimizer"):
        clock.now += 1
        with timers.timed("dp_comm"):  # ZeRO-1's param gather wait inside the step
            clock.now += 7
    step = t.stop_step()
    assert timers.active is None
    got = step.totals()
    want = dict.fromkeys(timers.PARTS, 0.0)
    want.update(other=7, forward=7, data=5, tp_comm=3, optimizer=1, dp_comm=7)
    assert got == want
    assert sum(got.values()) == clock.now  # no interval counted twice or lost
    # nothing is recorded outside a step
    with timers.timed("forward"):
        clock.now += 100
    assert timers.active is None


def test_level_0_is_a_shared_no_op(clean_active):
    import torch

    assert timers.build(0, torch.device("cpu")) is None
    assert timers.active is None
    a, b = timers.timed("forward"), timers.timed("tp_comm")
    assert a is b is timers._NULL
    with a:
        pass


class FakeEvent:
    """torch.cuda.Event's interface on a fake device that completes work when told."""

    made = 0
    device_now = 0.0
    completed = -1  # events recorded at or before this sequence number are done
    seq = 0

    def __init__(self, enable_timing=False):
        assert enable_timing
        FakeEvent.made += 1
        self.at = None

    def record(self):
        FakeEvent.seq += 1
        self.n, self.at = FakeEvent.seq, FakeEvent.device_now

    def query(self):
        return self.n <= FakeEvent.completed

    def elapsed_time(self, other):
        assert self.query() and other.query(), "an event read before it completed"
        return (other.at - self.at) * 1000


def test_cuda_path_reads_completed_events_only_and_reuses_them(monkeypatch, clean_active):
    import torch

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    FakeEvent.made, FakeEvent.device_now, FakeEvent.completed, FakeEvent.seq = 0, 0.0, -1, 0
    clock = timers.EventClock()
    t = timers.Timers(1, clock)
    steps, last_mark = [], []
    for k in range(20):
        t.read_completed()  # as train_step does, before the step's clock
        t.start_step()
        for _ in range(3):  # three micro-batches
            with timers.timed("forward"):
                FakeEvent.device_now += 2
                with timers.timed("tp_comm"):
                    FakeEvent.device_now += 1
            with timers.timed("backward"):
                FakeEvent.device_now += 4
        steps.append(t.stop_step())
        last_mark.append(steps[-1].marks[-1].n)
        # the device runs a step behind the host: the step before this one is done now
        FakeEvent.completed = last_mark[-2] if k else -1
    per_step = 2 + 3 * 3 * 2  # the step's first and last marks, two per region entered
    assert len(steps[-1].marks) == per_step
    # never more than about two steps' events alive (and pooled), however long the window
    assert FakeEvent.made <= 3 * per_step
    FakeEvent.completed = FakeEvent.seq  # the window's read waits for the device
    window = {}
    for s in steps:
        timers.add(window, s)
    assert window["forward"] == pytest.approx(20 * 3 * 2)
    assert window["tp_comm"] == pytest.approx(20 * 3 * 1)
    assert window["backward"] == pytest.approx(20 * 3 * 4)


def _stage_split(pp, m, vp, f, b):
    """Per stage (bubble, steady-state waits, idle) of the ideal pipeline: the simulator's
    timeline, each gap before a compute op charged to the transfers just before it as the
    executor charges them (pipeline._steady_state), and the wait for the slowest stage."""
    from megalite.parallel.pipeline import _steady_state
    from megalite.parallel.schedule_sim import simulate
    from megalite.parallel.schedules import Comm, schedule_ops

    res = simulate(pp, m, vp, forward_cost=f, backward_cost=b)
    makespan = max(r.end for r in res)
    out = []
    for rank in range(pp):
        ops = schedule_ops(pp, rank, m, vp)
        fill_end, drain_start = _steady_state(ops)
        compute = iter(res[rank].timeline)
        t, comms, bubble, steady = 0.0, [], makespan - res[rank].end, 0.0
        for i, op in enumerate(ops):
            if isinstance(op, Comm):
                comms.append(fill_end < i < drain_start)
                continue
            _, start, end = next(compute)
            if start > t:
                assert len(set(comms)) == 1  # the waiting transfers are of one kind
                if comms[0]:
                    steady += start - t
                else:
                    bubble += start - t
            t, comms = end, []
        out.append((bubble, steady, makespan - res[rank].busy))
    return out


@pytest.mark.parametrize("pp", [2, 4])
@pytest.mark.parametrize("vp", [1, 2])
def test_bubble_is_the_idle_time_of_the_ideal_pipeline(pp, vp):
    for m in (1, 2, pp, 2 * pp, 8):
        if vp > 1 and m % pp:
            continue
        for f, b in ((1.0, 2.0), (1.0, 1.0), (1.0, 3.0)):
            for bubble, steady, idle in _stage_split(pp, m, vp, f, b):
                assert steady == 0.0, (pp, m, vp, f, b)
                assert bubble == pytest.approx(idle), (pp, m, vp, f, b)
    # 1F1B: every stage idles (PP - 1) x (t_fwd + t_bwd) per step
    if vp == 1:
        assert all(x[0] == pytest.approx((pp - 1) * 3.0) for x in _stage_split(pp, 8, 1, 1, 2))


def test_report_keys_and_console_split(clean_active):
    t = timers.Timers(1, FakeClock())
    totals = dict(forward=0.2, backward=0.4, dp_comm=0.06, optimizer=0.02, other=0.01)
    rec, line = timers.report(t, totals, 2, 0.5, log=None, iteration=7)
    assert set(rec) == {f"time_{p}_s" for p in timers.PARTS} | {"time_step_s"}
    assert rec["time_forward_s"] == pytest.approx(0.1) and rec["time_tp_comm_s"] == 0.0
    assert rec["time_step_s"] == 0.5
    assert line == "fwd 100.0 | bwd 200.0 | dp 30.0 | opt 10.0 | other 5.0 ms"


# -- in one process ---------------------------------------------------------------------------

TINY = (
    "--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 32 "
    "--micro-batch-size 2 --global-batch-size 4 --vocab-size 256 --mock-data "
    "--lr 1e-3 --lr-warmup-iters 2 --eval-interval 1000 --log-interval 3 --train-iters 6"
).split()


@pytest.fixture
def one_thread():
    """As the command line runs here (OMP_NUM_THREADS=1): two threads on two busy cores
    spin against each other and make the tiny model's step ten times slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_run(tmp_path, *flags):
    """The tiny model's run in this process, writing tmp_path/m.jsonl."""
    from megalite.config import parse_config
    from megalite.training import loop

    m = str(tmp_path / "m.jsonl")
    return loop.setup(parse_config([*TINY, "--metrics-file", m, *flags], world_size=1))


def train_and_read(run, tmp_path, steps=3):
    """`steps` iterations (one log window); its metrics record."""
    from megalite.training import loop

    try:
        for _ in range(steps):
            loop.maybe_log(run, loop.train_step(run))
    finally:
        run.log.close()
    with open(tmp_path / "m.jsonl") as fh:
        (rec,) = [r for r in map(json.loads, fh) if "loss" in r]
    return rec


def test_level_0_builds_no_timers_and_enters_no_region(tmp_path, monkeypatch, one_thread):
    def refuse(*a, **k):
        raise AssertionError("a Timers at level 0")

    entered = []
    real_timed = timers.timed
    monkeypatch.setattr(timers.Timers, "__init__", refuse)
    monkeypatch.setattr(timers, "timed", lambda part: entered.append(timers.active) or
                        real_timed(part))  # fmt: skip
    run = tiny_run(tmp_path)
    assert run.timers is None
    rec = train_and_read(run, tmp_path)
    assert entered and set(entered) == {None}  # every site asked, none found a step timed
    assert not [k for k in rec if k.startswith("time_")]


def test_a_slow_data_loader_shows_up_as_data_time(tmp_path, one_thread):
    run = tiny_run(tmp_path, "--timing-log-level", "1")
    batches = run.train_iter

    def slow():
        for batch in batches:
            time.sleep(0.05)
            yield batch

    run.train_iter = slow()
    rec = train_and_read(run, tmp_path)
    m = 2  # micro-batches per step
    assert rec["time_data_s"] >= 0.05 * m
    assert rec["time_forward_s"] < 0.05 * m  # the fetch is inside forward, not counted there
    parts = sum(rec[f"time_{p}_s"] for p in timers.PARTS)
    assert parts == pytest.approx(rec["time_step_s"], rel=0.01)  # one clock, cut in pieces
    assert rec["time_step_s"] == rec["iter_time_s"]
    assert [rec[f"time_{q}_s"] for q in ("tp_comm", "dp_comm", "pp_comm", "bubble")] == [0] * 4


# -- two spawned ranks: a delayed collective lands in its part ---------------------------------


class SlowCollectives:
    """A torch.distributed stand-in for one module: its all_reduce sleeps first."""

    def __init__(self, real, delay):
        self.real, self.delay, self.calls = real, delay, 0

    def __getattr__(self, name):
        return getattr(self.real, name)

    def all_reduce(self, *args, **kwargs):
        self.calls += 1
        time.sleep(self.delay)
        return self.real.all_reduce(*args, **kwargs)


DELAYED = {
    # name: (flags, module whose all-reduces are slowed, by how long, the part they land in);
    # one micro-batch per step
    "tp": (["--tensor-model-parallel-size", "2", "--global-batch-size", "2"],
           "megalite.parallel.tensor", 0.05, "tp_comm"),
    # (gloo's all-reduce: the shared-memory one calls no torch.distributed; the command-line
    # test below sees it in dp_comm)
    "dp": (["--global-batch-size", "4", "--no-shm-grad-reduce"], "megalite.parallel.ddp", 0.2,
           "dp_comm"),
}  # fmt: skip
STEPS = 3


def _delay_worker(rank, world, port, out_dir):
    import importlib

    import torch
    import torch.distributed as dist

    from megalite.config import parse_config
    from megalite.training import loop

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    calls = {}
    with rank_guard(out_dir, rank):
        for name, (flags, module, delay, _) in DELAYED.items():
            m = os.path.join(out_dir, f"{name}.jsonl")
            cfg = parse_config([*TINY, "--num-layers", "1",
                                "--log-interval", str(STEPS), "--timing-log-level", "1",
                                "--metrics-file", m, *flags], world_size=world)  # fmt: skip
            run = loop.setup(cfg)
            mod = importlib.import_module(module)
            mod.dist = slow = SlowCollectives(dist, delay)
            try:
                for _ in range(STEPS):
                    loop.maybe_log(run, loop.train_step(run))
            finally:
                mod.dist = dist
                run.log.close()
            calls[name] = slow.calls / STEPS
    with open(os.path.join(out_dir, f"calls{rank}.json"), "w") as fh:
        json.dump(calls, fh)


@pytest.fixture(scope="module")
def delayed(tmp_path_factory):
    out = tmp_path_factory.mktemp("delayed")
    spawn(_delay_worker, 2, str(out), timeout=240)
    with open(out / "calls1.json") as fh:  # rank 1 logs
        calls = json.load(fh)
    recs = {}
    for name in DELAYED:
        with open(out / f"{name}.jsonl") as fh:
            (recs[name],) = [r for r in map(json.loads, fh) if "loss" in r]
    return calls, recs


@pytest.mark.parametrize("name", list(DELAYED))
def test_a_delayed_collective_lands_in_its_part(delayed, name):
    calls, recs = delayed
    _, _, delay, part = DELAYED[name]
    rec, injected = recs[name], calls[name] * delay  # seconds of sleep per step
    assert calls[name] >= 1
    got, step = rec[f"time_{part}_s"], rec["time_step_s"]
    print(f"\n{name}: {calls[name]:.0f} calls/step x {delay * 1e3:.0f} ms: {part} "
          f"{got * 1e3:.0f} ms of {step * 1e3:.0f} ms/step")  # fmt: skip
    assert rec[f"time_{part}_s"] >= injected
    for p in timers.PARTS:  # the sleep is nowhere else: the rest is the tiny model's compute
        if p != part:
            assert rec[f"time_{p}_s"] < injected / 2, (p, rec)


# -- the command line -------------------------------------------------------------------------

CLI = (
    "--num-layers 4 --hidden-size 64 --num-attention-heads 4 --seq-length 32 "
    "--micro-batch-size 2 --global-batch-size 8 --log-interval 2 --mock-data --vocab-size "
    "256 --lr 1e-3 --lr-warmup-iters 2 --eval-interval 1000 --train-iters 4"
).split()

LAYOUTS = {
    # name: (processes, level, flags, parts that must be > 0; the other comm parts are 0)
    "dp2": (2, 1, [], {"dp_comm"}),
    "pp2": (2, 1, ["--pipeline-model-parallel-size", "2"], {"pp_comm", "bubble"}),
    "tp2": (2, 1, ["--tensor-model-parallel-size", "2"], {"tp_comm"}),
    "pp2-level2": (2, 2, ["--pipeline-model-parallel-size", "2"], {"pp_comm", "bubble"}),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_command_line_records_every_part(tmp_path, layout):
    nproc, level, flags, nonzero = LAYOUTS[layout]
    m = tmp_path / "m.jsonl"
    p = run_cli([*trainer(nproc), *CLI, "--timing-log-level", str(level), "--metrics-file",
                 str(m), *flags], timeout=240)  # fmt: skip
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    with open(m) as fh:
        records = [json.loads(line) for line in fh]
    logged = [r for r in records if "loss" in r]
    assert len(logged) == 2
    for rec in logged:
        parts = {q: rec[f"time_{q}_s"] for q in timers.PARTS}
        assert all(v >= 0 for v in parts.values()), parts
        step = rec["time_step_s"]
        assert step == rec["iter_time_s"]
        assert sum(parts[q] for q in NAMED) == pytest.approx(step, rel=0.10), parts
        assert sum(parts.values()) == pytest.approx(step, rel=0.01), parts
        for q in ("tp_comm", "dp_comm", "pp_comm", "bubble"):
            assert (parts[q] > 0) == (q in nonzero), (q, parts)
        assert parts["forward"] > 0 and parts["backward"] > 0 and parts["optimizer"] > 0
        assert ("max over ranks" in p.stdout) == (level == 2)
        if level == 2:
            for q in timers.PARTS:
                assert rec[f"time_{q}_max_s"] >= parts[q]
    assert "| fwd " in p.stdout and "| bwd " in p.stdout
    per_rank = [r for r in records if "rank" in r and "time_forward_s" in r]
    if level == 2:
        assert sorted(r["rank"] for r in per_rank) == [0, 0, 1, 1]
        # the first stage reads the data and waits at its first backward; the max is theirs
        first = [r for r in per_rank if r["rank"] == 0]
        assert all(r["time_bubble_s"] > 0 and r["time_data_s"] > 0 for r in first)
    else:
        assert not per_rank


def test_level_0_command_line_writes_no_time_keys(tmp_path):
    m = tmp_path / "m.jsonl"
    p = run_cli([*trainer(1), *CLI, "--metrics-file", str(m)], timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    with open(m) as fh:
        records = [json.loads(line) for line in fh]
    assert records and not [k for r in records for k in r if k.startswith("time_")]
    assert "| fwd " not in p.stdout
