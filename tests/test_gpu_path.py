"""The GPU path of a run, checked as far as a CPU allows (issue 12, items 3, 4 and 9).

- GPU selection: LOCAL_RANK modulo the visible devices, on every path of state.initialize, and
  handed to init_process_group as device_id (torch.cuda's functions monkeypatched: no GPU).
- Pipeline p2p: one batch_isend_irecv per Comm on the pipeline group, with no device-wide
  synchronisation (two gloo ranks).
- Host reads per step: none on iterations that do not log, one on those that do (a read is any
  Tensor.item/tolist/__bool__/__float__/__int__), counted over train_step, maybe_log and
  should_exit, in fp32, bf16 and fp16 (its loss scaler updates on the device), also with the
  grad-norm spike skip on (--skip-spike-factor, judged on the device). Divergence is still one
  line, raised at the next read, naming the iteration, and never saved. On a GPU the same run
  goes under torch.cuda.set_sync_debug_mode("error").
"""

import os

import pytest
import torch
import torch.distributed as dist

from conftest import rank_guard, spawn
from megalite.errors import MegaliteError
from megalite.parallel import state

# -- GPU selection ----------------------------------------------------------------------------


@pytest.mark.parametrize("visible", [1, 4, 8])
def test_device_index_is_local_rank_modulo_visible_devices(visible):
    # torchrun on 8 GPUs: rank i -> GPU i; srun with one GPU per task: always 0; 4 GPUs for 8
    # local ranks: round-robin.
    expected = {1: [0] * 8, 4: [0, 1, 2, 3, 0, 1, 2, 3], 8: list(range(8))}[visible]
    assert [state.device_index(r, visible) for r in range(8)] == expected


def test_no_visible_gpu_is_one_line():
    with pytest.raises(MegaliteError, match="sees no GPU; check CUDA_VISIBLE_DEVICES"):
        state.device_index(0, 0)


class _Joined(Exception):
    """Raised by the fake init_process_group: the test has seen what it needs."""


@pytest.fixture
def fake_gpus(monkeypatch):
    """Four visible GPUs, LOCAL_RANK 6: records set_device and init_process_group calls."""
    calls = []
    monkeypatch.setenv("LOCAL_RANK", "6")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", d)))

    def init_process_group(**kw):
        calls.append(("init_process_group", kw))
        raise _Joined

    monkeypatch.setattr(dist, "init_process_group", init_process_group)
    yield calls
    state.set_state(state.ParallelState())


def test_joining_sets_the_device_first_and_passes_device_id(fake_gpus):
    with pytest.raises(_Joined):
        state.initialize(1, 1, rank=0, world_size=2, init_method="tcp://127.0.0.1:1")
    (what, device), (what2, kw) = fake_gpus
    assert (what, what2) == ("set_device", "init_process_group")
    assert device == torch.device("cuda", 2)  # 6 % 4
    assert kw["device_id"] == torch.device("cuda", 2) and kw["backend"] == "nccl"


def test_an_already_joined_world_sets_the_device_too(fake_gpus, monkeypatch):
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 1)
    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    monkeypatch.setattr(dist, "new_group", lambda ranks: object())
    st = state.initialize(1, 1)
    assert fake_gpus == [("set_device", torch.device("cuda", 2))]
    assert st.device == torch.device("cuda", 2)


def test_one_process_sets_the_device_and_joins_nothing(fake_gpus):
    st = state.initialize(1, 1)
    assert fake_gpus == [("set_device", torch.device("cuda", 2))]
    assert st.device == torch.device("cuda", 2) and st.tp_group is None


def test_an_explicit_device_index_is_kept(fake_gpus):
    st = state.initialize(1, 1, device=torch.device("cuda", 3))
    assert fake_gpus == [("set_device", torch.device("cuda", 3))]
    assert st.device == torch.device("cuda", 3)


def test_a_cpu_run_touches_no_gpu(fake_gpus):
    with pytest.raises(_Joined):
        state.initialize(1, 1, device=torch.device("cpu"), rank=0, world_size=2,
                         init_method="tcp://127.0.0.1:1")  # fmt: skip
    ((what, kw),) = fake_gpus
    assert what == "init_process_group" and kw["device_id"] is None and kw["backend"] == "gloo"


# -- pipeline p2p -----------------------------------------------------------------------------


def _p2p_worker(rank, world, port, out_dir):
    from megalite.parallel import p2p

    with rank_guard(out_dir, rank):
        # TP=2, PP=2: my pipeline is [rank % 2, rank % 2 + 2], not the world.
        st = state.initialize(2, 2, rank=rank, world_size=world,
                              init_method=f"tcp://127.0.0.1:{port}")  # fmt: skip
        groups = []
        real = dist.batch_isend_irecv

        def recording(ops):
            groups.extend(op.group for op in ops)
            return real(ops)

        dist.batch_isend_irecv = recording
        torch.cuda.synchronize = None  # calling it would fail: exchange must not drain a device
        peer = p2p.next_rank()  # with PP = 2 both neighbours are the same rank
        assert peer == st.pp_ranks[1 - st.pp_rank] and peer % 2 == rank % 2
        fwd, bwd = torch.full((3,), float(rank)), torch.full((2,), 10.0 + rank)
        got_fwd, got_bwd = torch.empty(3), torch.empty(2)
        # the forward transfers first on both sides, as a schedule's Comm lists them
        if st.pp_rank == 0:
            p2p.exchange([(True, fwd, peer), (False, got_bwd, peer)])
        else:
            p2p.exchange([(False, got_fwd, peer), (True, bwd, peer)])
            assert torch.equal(got_fwd, torch.full((3,), float(peer)))
        if st.pp_rank == 0:
            assert torch.equal(got_bwd, torch.full((2,), 10.0 + peer))
        assert groups and all(g is st.pp_group for g in groups), groups


def test_p2p_runs_on_the_pipeline_group_without_a_device_sync(tmp_path):
    spawn(_p2p_worker, 4, tmp_path)


# -- the sharded grad norm without a boolean index ----------------------------------------------


def _norm_worker(rank, world, port, out_dir):
    from megalite.config import MODEL_STYLES, ModelConfig
    from megalite.model.gpt import GPTModel
    from megalite.optim.grad_norm import global_grad_norm, sharded_grad_norm
    from megalite.parallel.layers import init_parameters

    with rank_guard(out_dir, rank):
        state.initialize(2, 1, rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}")
        # one kv head on TP = 2: both ranks hold its rows, and rank 1's copy must not count
        cfg = ModelConfig(**MODEL_STYLES["gpt2"], num_layers=1, hidden_size=64,
                          num_attention_heads=4, num_query_groups=1, seq_length=16)  # fmt: skip
        model = GPTModel(cfg, 256)
        init_parameters(model, 1)
        g = torch.Generator().manual_seed(rank)
        params = list(model.parameters())
        grads = [torch.randn(p.shape, generator=g) for p in params]
        want = global_grad_norm(params, grads)  # trims the replicated rows with narrow
        # pieces cut anywhere (a ZeRO-1 shard boundary need not fall on a row)
        pieces = []
        for p, gr in zip(params, grads):
            flat, cut = gr.reshape(-1), p.numel() // 3
            pieces += [(p, flat[:cut], 0, cut), (p, flat[cut:], cut, p.numel())]
        got = sharded_grad_norm(pieces)  # the same rows masked out, as zeros
        everything = torch.stack([x.square().sum() for x in grads]).sum()
        dist.all_reduce(everything)
        assert any(p.tag.group_layout for p in params)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
        assert abs(everything.sqrt() - want) > 1e-3 * want  # replicas do change a naive sum


def test_sharded_norm_counts_replicated_kv_rows_once(tmp_path):
    spawn(_norm_worker, 2, tmp_path)


# -- host reads per step ------------------------------------------------------------------------

TINY = (
    "--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 32 "
    "--micro-batch-size 2 --global-batch-size 4 --vocab-size 256 --mock-data "
    "--lr 1e-3 --lr-warmup-iters 2 --clip-grad 1.0 --eval-interval 1000 --log-interval 4"
).split()


def tiny_run(tmp_path, *flags, device="cpu", prefetch=8):
    """An in-process run of the tiny model; its first `prefetch` micro-batches read into a
    list, so that the data loader's own (host) work stays out of the counts."""
    from megalite.config import parse_config
    from megalite.training import loop

    cfg = parse_config([*TINY, "--train-iters", "8", "--device", device, *flags], world_size=1)
    run = loop.setup(cfg)
    run.train_iter = iter([next(run.train_iter) for _ in range(prefetch * 2)])
    return run


class HostReads:
    """Counts the Python-level reads of tensor values while active."""

    NAMES = ("item", "tolist", "__bool__", "__float__", "__int__")

    def __init__(self, monkeypatch):
        self.count = 0
        for name in self.NAMES:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._counting(original))

    def _counting(self, original):
        def read(t, *args, **kwargs):
            self.count += 1
            return original(t, *args, **kwargs)

        return read


def one_iteration(run, preemption):
    from megalite.training import loop

    stats = loop.train_step(run)
    loop.maybe_log(run, stats)
    assert loop.should_exit(run, preemption) is None


@pytest.fixture
def preemption():
    from megalite.training.loop import Preemption

    p = Preemption()
    yield p
    p.restore()


# the spike filter judges from iteration 5 on (a window of 4 norms)
SPIKE_SKIP = ["--skip-spike-factor", "3", "--skip-spike-window", "4"]
FP16 = ["--fp16", "--initial-loss-scale", "1024"]
PRECISIONS = pytest.mark.parametrize(
    "precision",
    [[], ["--bf16"], ["--bf16", *SPIKE_SKIP], FP16, [*FP16, *SPIKE_SKIP]],
    ids=["fp32", "bf16", "bf16-spike-skip", "fp16", "fp16-spike-skip"],
)


@PRECISIONS
def test_no_host_read_between_log_iterations_and_one_on_them(tmp_path, monkeypatch, precision,
                                                             preemption):  # fmt: skip
    run = tiny_run(tmp_path, *precision)
    reads = HostReads(monkeypatch)
    per_iteration = []
    for _ in range(8):
        before = reads.count
        one_iteration(run, preemption)
        per_iteration.append(reads.count - before)
    assert per_iteration == [0, 0, 0, 1, 0, 0, 0, 1]  # --log-interval 4
    assert run.optimizer.step_count == 8 - run.spikes_total  # a skipped step is not counted
    if SPIKE_SKIP[0] in precision:  # it did judge: iterations 5-8, with 4 norms and more
        assert int(run.optimizer.spike_filter.count) + run.spikes_total == 8


def poison_grads_at(monkeypatch, iteration):
    """Make one grad nan after backward of the given iteration (a diverging step)."""
    from megalite.training import loop

    real = loop.finalize_model_grads

    def finalize(chunks, ddp):
        real(chunks, ddp)
        if ddp_iteration[0] == iteration:
            next(iter(ddp.params)).main_grad.fill_(float("nan"))
        ddp_iteration[0] += 1

    ddp_iteration = [1]
    monkeypatch.setattr(loop, "finalize_model_grads", finalize)


def test_divergence_is_raised_at_the_next_read_naming_its_iteration(tmp_path, monkeypatch,
                                                                    preemption):  # fmt: skip
    from megalite.training import loop

    save = str(tmp_path / "ck")
    run = tiny_run(tmp_path, "--save", save)
    poison_grads_at(monkeypatch, 2)
    one_iteration(run, preemption)
    weights = [p.detach().clone() for p in run.optimizer.ddp.params]
    one_iteration(run, preemption)  # iteration 2 diverges: no error yet, nothing updated
    assert all(torch.equal(p, w) for p, w in zip(run.optimizer.ddp.params, weights))
    assert all(torch.isfinite(p).all() for p in run.optimizer.ddp.params)
    one_iteration(run, preemption)
    with pytest.raises(MegaliteError) as e:
        one_iteration(run, preemption)  # iteration 4 logs: the window is read
    msg = str(e.value)
    assert "gradient norm is nan at iteration 2" in msg and "training diverged" in msg
    assert "\n" not in msg
    with pytest.raises(MegaliteError, match="at iteration 2"):
        loop.save(run)  # the window still holds the diverged step: nothing is written
    assert not os.path.exists(save)


def test_a_diverged_state_is_never_saved(tmp_path, monkeypatch, preemption):
    from megalite.training import loop

    save = str(tmp_path / "ck")
    run = tiny_run(tmp_path, "--save", save)
    poison_grads_at(monkeypatch, 1)
    stats = loop.train_step(run)
    run.window.pending.append(stats)  # iteration 1 does not log: its stats are unread
    with pytest.raises(MegaliteError, match="gradient norm is nan at iteration 1"):
        loop.save(run)
    assert not os.path.exists(save)


# -- the same on a GPU --------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@PRECISIONS
def test_gpu_steps_do_not_synchronise(tmp_path, monkeypatch, precision, preemption):
    """Under sync debug mode "error" any synchronising CUDA call (a .item(), a blocking copy,
    a boolean-mask index, torch.cuda.synchronize) raises, over iterations that do not log. The
    fourth logs: exactly one synchronising call (the window's read)."""
    import warnings

    run = tiny_run(tmp_path, *precision, device="cuda")
    one_iteration(run, preemption)  # iteration 1, a warm-up: lazy initialisation (cuBLAS...)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):  # iterations 2 and 3
            one_iteration(run, preemption)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            one_iteration(run, preemption)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, [str(w.message) for w in syncs]
    assert len(run.window.losses) == 0  # the log line was written and the window reset
