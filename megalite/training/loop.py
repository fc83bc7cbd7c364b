"""The training loop, top to bottom (docs/ARCHITECTURE.md, "One training step").

run = setup(cfg)        process groups and RNG; the model parallelised in one order (plain
                        model for this rank's stage and TP slice, cast, DDP buffers,
                        optimizer); LR schedule; resume from --load; data
loop:
    stats = train_step(run)      one optimizer step over the global batch
    maybe_log, maybe_evaluate, maybe_save, should_exit
    a divergence (Diverged, found reading a window): roll_back (--rollback-on-nan), or stop

Host synchronisations: a step reads nothing back from the device (with fp16, one read of its
skip flags: see MixedPrecisionOptimizer.step). Its loss, grad norm and "stepped" flag stay
there as tensors; `read_window` reads all of a log window's at once (one transfer), on log
iterations and before a save, and raises "training diverged" then (`Diverged`: with
--rollback-on-nan the loop reloads the last checkpoint instead, `roll_back`). The stop flags'
all-reduce is read one iteration late on CUDA (`RankFlags`). On the CPU the same code runs,
and its reads cost nothing.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import time
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
import torch.distributed as dist

from megalite import timers
from megalite.config import Config
from megalite.errors import MegaliteError
from megalite.layout import padded_vocab_size
from megalite.model.gpt import build_model, cast_params, flops_per_token, num_parameters
from megalite.model.lora import add_lora, parameter_counts
from megalite.optim import build_lr_schedule, build_optimizer
from megalite.optim.grad_norm import SpikeFilter
from megalite.optim.mixed_precision import memory_footprint
from megalite.parallel import heartbeat
from megalite.parallel import random as prandom
from megalite.parallel import state
from megalite.parallel.ddp import DistributedDataParallel, finalize_model_grads
from megalite.parallel.zero import data_parallel
from megalite.parallel.pipeline import forward_backward, global_mean_loss, p2p_tensor_shape
from megalite.training import checkpoint as ckpt
from megalite.training.batches import (
    batch_iterator,
    build_datasets,
    describe_data,
    global_batch,
    vocab_size,
)
from megalite.training.metrics import MetricsWriter, memory_stats, peak_tflops


class StepClock:
    """The time of one step. On the CPU, the host's clock. On CUDA the host runs ahead of the
    device (a step reads nothing back), so its time is that between two events on the current
    stream, which the window reads once they have completed (`read_window` waits for them)."""

    def __init__(self, device: torch.device):
        self.events = None
        if device.type == "cuda":
            self.events = tuple(torch.cuda.Event(enable_timing=True) for _ in range(2))
            self.events[0].record()
        self.host_s = None
        self.started = time.perf_counter()

    def stop(self) -> "StepClock":
        if self.events is not None:
            self.events[1].record()
        self.host_s = time.perf_counter() - self.started
        return self

    def seconds(self) -> float:
        if self.events is None:
            return self.host_s
        return self.events[0].elapsed_time(self.events[1]) / 1000


@dataclass
class Window:
    """What the log line averages over: the iterations since the last one. `pending` holds
    the steps whose stats are still on the device; `read_window` moves them to the lists."""

    pending: list = field(default_factory=list)  # StepStats
    losses: list = field(default_factory=list)  # floats, in iteration order
    grad_norms: list = field(default_factory=list)
    time_s: float = 0.0
    skipped: int = 0  # fp16: steps the loss scaler skipped (an inf/nan grad)
    loss_scale: float = 0.0  # fp16: the scale after the last step read
    spikes: int = 0  # --skip-spike-factor: updates skipped as grad-norm spikes
    times: dict = field(default_factory=dict)  # --timing-log-level: {part: seconds}, summed


@dataclass
class Run:
    """Everything a training run holds. One handle on the model: `chunks`, this rank's model
    chunks (one per virtual pipeline stage), used by the schedule, DDP, optimizer and
    checkpoints alike."""

    cfg: Config
    chunks: list
    ddp: DistributedDataParallel
    optimizer: object  # MixedPrecisionOptimizer or DistributedOptimizer
    lr_schedule: object
    train_iter: Iterator
    train_ds: Optional[object]  # what train_iter reads (a rollback restarts it elsewhere)
    valid_ds: Optional[object]
    log: MetricsWriter
    vocab_size: int
    p2p_shape: tuple  # every activation passed between pipeline stages
    flops_per_iter: float
    peak_tflops: Optional[float]
    iteration: int = 0
    consumed_samples: int = 0
    last_saved: Optional[int] = None
    window: Window = field(default_factory=Window)
    best_valid: float = math.inf
    evals_without_gain: int = 0
    exit_reason: Optional[str] = None
    heartbeat: Optional[heartbeat.Heartbeat] = None  # watches the next rank (lost nodes)
    start_time: float = field(default_factory=time.time)
    stop_flags: Optional["RankFlags"] = None  # should_exit's, made on first use
    rollbacks: int = 0  # --rollback-on-nan: how many this process has made
    spikes_total: int = 0  # the spike filter's count, as of the last read_window
    saves: Optional[ckpt.BackgroundSaves] = None  # --async-save: the checkpoint being written
    timers: Optional[timers.Timers] = None  # --timing-log-level 1 or 2 (megalite/timers.py)


@dataclass
class StepStats:
    """One step. loss, grad_norm and stepped are 0-dim tensors on the device: the loop reads
    them only in `read_window`, a whole window's at once."""

    iteration: int  # the iteration this step completed
    consumed_samples: int  # after it (a rollback skips the data up to here)
    loss: torch.Tensor  # the global batch's mean loss
    lr: float
    grad_norm: torch.Tensor
    stepped: torch.Tensor  # bool; False: a grad held inf/nan and the step was skipped
    clock: StepClock
    timing: Optional[timers.StepTiming] = None  # --timing-log-level >= 1: the step's parts


# -- setup ------------------------------------------------------------------------------------


def setup(cfg: Config) -> Run:
    """Join the process groups, build and parallelise the model, resume, open the data."""
    t, par = cfg.training, cfg.parallel
    st = state.initialize(
        par.tensor_model_parallel_size,
        par.pipeline_model_parallel_size,
        backend=par.distributed_backend,
        device=torch.device(t.device),
        timeout_minutes=par.distributed_timeout_minutes,
    )
    if st.world_size != cfg.world_size:
        raise MegaliteError(
            f"the config was checked for {cfg.world_size} processes but this run has "
            f"{st.world_size}; parse it with world_size={st.world_size}"
        )
    prandom.seed_everything(t.seed, st.device)
    log = MetricsWriter(
        st.rank == st.world_size - 1, cfg.logging.metrics_file, cfg.logging.tensorboard_dir
    )
    vocab = vocab_size(cfg)
    padded = padded_vocab_size(vocab, cfg.model.make_vocab_size_divisible_by, st.tp)
    chunks, ddp, optimizer = parallelize(cfg, padded, vocab)
    counts = num_parameters(cfg.model, padded)
    log.print(
        f"megalite: {counts['total'] / 1e6:.2f}M parameters "
        f"({counts['non_embedding'] / 1e6:.2f}M non-embedding), vocab {vocab} "
        f"(padded {padded}), layout TP={st.tp} PP={st.pp} DP={st.dp}, "
        f"{'bf16' if t.bf16 else 'fp16' if t.fp16 else 'fp32'} on {st.device}"
    )
    trainable, total = parameter_counts(chunks)
    if trainable != total:
        lo = cfg.lora
        log.print(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.3f}"
                  f"%): LoRA rank {lo.lora_rank} alpha {lo.scaling * lo.lora_rank:g} on "
                  f"{lo.lora_target_modules}, the base frozen")  # fmt: skip
    log.record({"iteration": 0, "trainable_parameters": trainable, "parameters": total})
    report_memory(log, chunks, ddp, optimizer)
    if ddp.shm is not None:
        log.print(f"data-parallel grads: summed through shared memory ({st.dp} ranks on one "
                  "node; --no-shm-grad-reduce: over gloo)")  # fmt: skip
    peak, peak_why = peak_tflops(st.device, t.bf16 or t.fp16, cfg.logging.peak_tflops)
    if peak is None:
        log.print(f"MFU not reported: {peak_why}")
    flops = flops_per_token(cfg.model, padded) * t.global_batch_size * cfg.model.seq_length
    run = Run(cfg, chunks, ddp, optimizer, build_lr_schedule(cfg), None, None, None, log,
              vocab, p2p_tensor_shape(cfg, st.tp), flops, peak)  # fmt: skip
    run.timers = timers.build(cfg.logging.timing_log_level, st.device)
    _resume(run)
    if cfg.checkpoint.async_save:
        run.saves = ckpt.BackgroundSaves()
    run.train_ds, run.valid_ds, _ = build_datasets(cfg, vocab)
    blend = describe_data(run.train_ds)
    if blend:
        log.print(blend)
    run.train_iter = train_batches(run)
    # Started last: building indices for a large corpus can hold the GIL for minutes, and a
    # starved heartbeat would look like a lost rank.
    run.heartbeat = heartbeat.start(st.rank, st.world_size, par.heartbeat_timeout)
    return run


def report_memory(log: MetricsWriter, chunks, ddp, optimizer) -> None:
    """Once, at start: every rank's bytes of params, grads and optimizer state, measured from
    the real storages (memory_footprint), as one metrics record per rank and one line (bytes
    per parameter: over all of the rank's params, frozen ones (LoRA's base) included)."""
    st = state.get()
    mine = memory_footprint(ddp, optimizer)
    mine["numel"] = sum(p.numel() for c in chunks for p in c.parameters())
    every = [mine]
    if dist.is_initialized():
        every = [None] * st.world_size
        dist.all_gather_object(every, mine)
    for rank, m in enumerate(every):
        sizes = {f"mem_{k}_bytes": m[k] for k in ("params", "grads", "optimizer")}
        log.record({"iteration": 0, "rank": rank, **sizes, "mem_numel": m["numel"]})
    worst = max(range(len(every)), key=lambda r: every[r]["total"])
    parts = []
    for rank in dict.fromkeys([0, worst]):
        m = every[rank]
        parts.append(
            f"rank {rank}: params {m['params'] / 2**20:.1f} MiB, grads {m['grads'] / 2**20:.1f} "
            f"MiB, optimizer {m['optimizer'] / 2**20:.1f} MiB "
            f"({m['total'] / max(m['numel'], 1):.2f} B per param of its {m['numel']:,})"
        )
    log.print(f"memory ({ddp.strategy}): " + "; ".join(parts))


def train_batches(run: Run) -> Iterator:
    """This rank's training micro-batches from run.consumed_samples on: the data loader's
    position is the number of consumed samples, nothing else."""
    cfg = run.cfg
    return batch_iterator(run.train_ds, cfg.training.micro_batch_size, run.consumed_samples,
                          cfg.data.num_workers, run.vocab_size, state.get().device)  # fmt: skip


def parallelize(cfg: Config, vocab_size: int, unpadded_vocab_size: int, build=build_model):
    """Parallelism, applied in this one order; returns (chunks, ddp, optimizer). build: the
    model's builder (the planner passes one that builds on the meta device)."""
    par = cfg.parallel
    # 1. the plain model of this rank's pipeline stage(s), each layer holding its TP slice
    #    (initialised from (seed, parameter name), so every layout starts from one model);
    chunks = build(cfg, vocab_size, unpadded_vocab_size)
    # 1b. LoRA (--lora-rank): adapters beside the target linears, split as they are, and
    #     every other param frozen, so that DDP and the optimizer below see adapters alone;
    if cfg.lora.lora_rank:
        add_lora(chunks, cfg.lora, cfg.training.seed)
    # 2. the training dtype: bf16/fp16 params (fp32 main params live in the optimizer);
    cast_params(chunks, cfg.training.params_dtype)
    # 3. data parallelism: fp32 grad buffers in buckets, synced during backward with
    #    --overlap-grad-reduce, params in a flat buffer with --use-distributed-optimizer;
    #    ZeRO-2 keeps only this rank's grad shards, ZeRO-3 its param shards too (gathered
    #    per transformer layer around its use: parallel/zero.py);
    ddp = data_parallel(chunks, par)
    # 4. the optimizer over those buffers (ZeRO-1 with --use-distributed-optimizer; it owns
    #    clipping, the fp16 loss scaler and the grad-norm spike filter).
    optimizer = build_optimizer(chunks, cfg, ddp)
    t = cfg.training
    if t.skip_spike_factor is not None:
        optimizer.spike_filter = SpikeFilter(
            t.skip_spike_factor, t.skip_spike_window, state.get().device
        )
    return chunks, ddp, optimizer


def _resume(run: Run) -> None:
    ck = run.cfg.checkpoint
    if ck.load == ck.save:
        run.last_saved = 0  # nothing to save before the first step
    if not ck.load:
        return
    resumed = ckpt.load_checkpoint(run.cfg, run.chunks, run.optimizer)
    if resumed is None:
        run.log.print(f"no checkpoint in {ck.load} yet: starting from scratch")
        return
    run.iteration, run.consumed_samples, where, note = resumed
    if note:
        run.log.print(note)
    if ck.load == ck.save:
        run.last_saved = run.iteration
    run.log.print(
        f"resumed from {where} (iteration {run.iteration}, {run.consumed_samples} samples consumed)"
    )


# -- one step ---------------------------------------------------------------------------------


def train_step(run: Run) -> StepStats:
    """One optimizer step over the global batch. It reads nothing back from the device (in
    any precision): divergence is found when the window is read."""
    cfg, opt, tm = run.cfg, run.optimizer, run.timers
    if tm is not None:
        tm.read_completed()
    # The step's clock and the timers' first and last marks are adjacent: on the host, the
    # parts sum to time_step_s within microseconds (nothing that allocates lies between).
    clock = StepClock(state.get().device)
    if tm is not None:
        tm.start_step()  # forward_backward and the rest mark their parts (megalite/timers.py)
    lr = run.lr_schedule(run.iteration)
    for group in opt.param_groups:
        group["lr"] = lr
    # --sft: the loss is a mean over the global batch's target tokens, so their number is
    # counted (over DP) before any backward.
    data = global_batch(run.train_iter, cfg) if cfg.data.sft else run.train_iter
    # Every micro-batch through this rank's chunks under the layout's schedule; the grads
    # of each chunk's last backward start their bucket's DP reduction.
    losses = forward_backward(
        run.chunks,
        data,
        cfg.num_microbatches,
        loss_scale=opt.loss_scale,
        no_sync=run.ddp.no_sync,
        tensor_shape=run.p2p_shape,
        packed=cfg.data.sft,
    )
    finalize_model_grads(run.chunks, run.ddp)  # DP mean; SP sums over TP; tied embedding
    # The global grad norm (over TP, PP and DP shards) is also the inf/nan check; clipping,
    # unscaling and the fp16 loss-scale update happen inside the step.
    with timers.timed("optimizer"):
        stepped, grad_norm = opt.step()
    opt.zero_grad()
    loss = global_mean_loss(losses)
    run.iteration += 1
    run.consumed_samples += cfg.training.global_batch_size
    timing = tm.stop_step() if tm is not None else None
    clock.stop()
    return StepStats(
        run.iteration, run.consumed_samples, loss, lr, grad_norm, stepped, clock, timing
    )


class Diverged(MegaliteError):
    """A step without a loss scaler whose loss or grad norm is not finite (its update was
    skipped on the device). `pretrain` rolls back on it (--rollback-on-nan) or stops with its
    one line."""

    def __init__(self, what: str, iteration: int, consumed_samples: int, loss: float):
        super().__init__(
            f"the {what} at iteration {iteration} (loss {loss:.4g}): training diverged; lower "
            f"--lr, raise --lr-warmup-iters or use --clip-grad, then resume from the last "
            f"checkpoint"
        )
        self.what, self.iteration, self.consumed_samples = what, iteration, consumed_samples


def read_window(run: Run) -> None:
    """Read the window's pending steps from the device: one transfer for all of them (and the
    spike filter's count, fp16's loss scale). Raises Diverged if one diverged (without a loss
    scaler: a non-finite loss or grad norm). Its update was skipped on the device, so the
    params are still finite, and this runs before any save. A step skipped as a grad-norm
    spike (a finite norm, not stepped) gets a line of its own."""
    w, spike_filter, scaler = run.window, run.optimizer.spike_filter, run.optimizer.scaler
    if not w.pending:
        return
    values = [t for s in w.pending for t in (s.loss, s.grad_norm, s.stepped.to(s.loss.dtype))]
    if spike_filter is not None:
        values.append(spike_filter.skipped.to(values[0].dtype))
    if scaler is not None:
        values.append(scaler.loss_scale.to(values[0].dtype))
    rows = torch.stack(values).tolist()
    extras = rows[3 * len(w.pending) :]
    for i, s in enumerate(w.pending):
        loss, grad_norm, stepped = rows[3 * i : 3 * i + 3]
        spike = not stepped and math.isfinite(grad_norm)  # found_inf is a non-finite norm
        if run.optimizer.scaler is None and not (math.isfinite(loss) and (stepped or spike)):
            what = f"gradient norm is {grad_norm}" if not stepped else f"loss is {loss}"
            raise Diverged(what, s.iteration, s.consumed_samples, loss)
        if spike:
            run.log.print(
                f"iteration {s.iteration}: grad norm {grad_norm:.4g} is over "
                f"{spike_filter.factor:g} x its running median: update skipped"
            )
        w.losses.append(loss)
        w.grad_norms.append(grad_norm)
        w.skipped += int(not stepped and not spike)
        w.spikes += int(spike)
        w.time_s += s.clock.seconds()
        if s.timing is not None:
            timers.add(w.times, s.timing)
    if spike_filter is not None:
        run.spikes_total = int(extras.pop(0))
    if scaler is not None:
        w.loss_scale = extras.pop(0)
    w.pending = []


# -- around the step --------------------------------------------------------------------------


def maybe_log(run: Run, stats: StepStats) -> None:
    """Every --log-interval iterations: the window's mean loss and throughput (the one read
    from the device of those iterations, `read_window`)."""
    w, cfg, scaler = run.window, run.cfg, run.optimizer.scaler
    w.pending.append(stats)
    if run.iteration % cfg.logging.log_interval and run.iteration != cfg.training.train_iters:
        return
    read_window(run)
    iters = len(w.losses)
    dt = w.time_s / iters
    tps = cfg.training.global_batch_size * cfg.model.seq_length / dt
    tflops = run.flops_per_iter / dt / cfg.world_size / 1e12
    grad_norm = w.grad_norms[-1]
    rec = {
        "iteration": run.iteration,
        "loss": sum(w.losses) / iters,
        "lr": stats.lr,
        "grad_norm": grad_norm,
        "tokens_per_sec": tps,
        "tflops_per_device": tflops,
        "mfu": tflops / run.peak_tflops if run.peak_tflops else None,
        "iter_time_s": dt,
        "consumed_samples": run.consumed_samples,
        **memory_stats(state.get().device),
    }
    line = (
        f"iter {run.iteration:6d}/{cfg.training.train_iters} | loss {rec['loss']:.4f} | "
        f"lr {stats.lr:.3e} | grad norm {grad_norm:.3f} | {tps:,.0f} tok/s | "
        f"{tflops:.2f} TFLOP/s"
        + (f" | MFU {rec['mfu']:.1%}" if run.peak_tflops else "")
        + f" | {dt * 1000:.0f} ms/it | mem {rec['mem_peak_gb']:.2f} GB"
    )
    if scaler is not None:
        rec.update(loss_scale=w.loss_scale, skipped_iters=w.skipped)
        line += f" | scale {w.loss_scale:g} | skipped {w.skipped}"
    if run.optimizer.spike_filter is not None:
        rec.update(skipped_spikes=w.spikes, skipped_spikes_total=run.spikes_total)
        line += f" | spikes skipped {w.spikes} ({run.spikes_total} in all)"
    if cfg.training.rollback_on_nan:
        rec["rollbacks"] = run.rollbacks
        line += f" | rollbacks {run.rollbacks}"
    if run.timers is not None:  # every rank: level 2 gathers the ranks' parts
        times, split = timers.report(run.timers, w.times, iters, dt, run.log, run.iteration)
        rec.update(times)
        line += f" | {split}" if split else ""
    run.log.log(rec, line)
    run.window = Window()


@torch.no_grad()
def evaluate(run: Run) -> float:
    """Mean loss over the first eval_iters global batches of the validation split (the same
    batches every time, so successive evaluations compare like with like)."""
    cfg = run.cfg
    for c in run.chunks:
        c.eval()
    it = batch_iterator(
        run.valid_ds, cfg.training.micro_batch_size, 0, 0, run.vocab_size, state.get().device
    )
    losses = []
    for _ in range(cfg.training.eval_iters):
        data = global_batch(it, cfg) if cfg.data.sft else it
        losses += forward_backward(run.chunks, data, cfg.num_microbatches, forward_only=True,
                                   tensor_shape=run.p2p_shape, packed=cfg.data.sft)  # fmt: skip
    for c in run.chunks:
        c.train()
    return global_mean_loss(losses).item()


def maybe_evaluate(run: Run) -> None:
    """Every --eval-interval iterations: validation loss, and early stopping."""
    t = run.cfg.training
    if run.valid_ds is None or run.iteration % t.eval_interval:
        return
    loss = evaluate(run)
    ppl = math.exp(min(loss, 50))
    run.log.log(
        {"iteration": run.iteration, "valid_loss": loss, "valid_ppl": ppl},
        f"validation at iter {run.iteration}: loss {loss:.4f} | ppl {ppl:.2f}",
    )
    if loss < run.best_valid:
        run.best_valid, run.evals_without_gain = loss, 0
    else:
        run.evals_without_gain += 1
    if t.early_stop_patience and run.evals_without_gain >= t.early_stop_patience:
        run.exit_reason = (
            f"early stop: no better validation loss in {run.evals_without_gain} evaluations"
        )


def save(run: Run, wait: bool = False) -> None:
    """Save the current iteration under --save (once; every exit path calls this, with
    wait=True). Synchronous: the loop waits for the whole save. --async-save: it waits for the
    previous checkpoint to be complete, and for the snapshot (the state copied to host
    memory); the files are written in the background (`ckpt.BackgroundSaves`). wait=True
    writes this one in the foreground, so the process never exits before it is complete."""
    # Params all-gathered in the background must be whole before they are saved (and
    # before the process exits).
    run.ddp.finish_param_sync()
    read_window(run)  # a diverged run stops here, with its one-line error, and is never saved
    if not run.cfg.checkpoint.save:
        return
    since = time.perf_counter()  # the loop is stopped for the save from here
    finish_save(run)  # the previous checkpoint (one at a time), or its failure
    if run.last_saved == run.iteration:
        return
    args = (run.cfg, run.iteration, run.consumed_samples, run.chunks, run.optimizer)
    try:
        with run.ddp.full_params():  # ZeRO-3: whole params to save (or to snapshot)
            if run.saves is not None and not wait:
                run.saves.start(*args, since=since)
                return  # reported when its thread has ended: poll_save, finish_save
            started = time.perf_counter()
            where = ckpt.save_checkpoint(*args)
    except ckpt.SaveFailed as e:
        _save_failed(run, e)
        return
    done = time.perf_counter()
    _saved(run, ckpt.Saved(run.iteration, where, done - since, done - started))


def _saved(run: Run, saved: ckpt.Saved) -> None:
    """A checkpoint is complete: the log line and the metrics record of what it cost."""
    run.last_saved = saved.iteration
    run.log.log(
        {"iteration": saved.iteration, "checkpoint_blocking_s": saved.blocking_s,
         "checkpoint_total_s": saved.total_s},
        f"saved checkpoint {saved.directory} | blocking {saved.blocking_s:.3f} s | total "
        f"{saved.total_s:.3f} s",
    )  # fmt: skip


def _save_failed(run: Run, e: ckpt.SaveFailed) -> None:
    if run.cfg.checkpoint.save_failure == "stop":
        raise e
    run.log.print(f"warning: {e}; training goes on (--save-failure continue)")


def finish_save(run: Run) -> None:
    """--async-save: wait for the checkpoint being written in the background, if any, and
    report it (`_saved`), or its failure (raised with --save-failure stop, else a warning).
    Every rank calls it at the same point, so they all agree on `run.last_saved` after it."""
    if run.saves is None:
        return
    try:
        saved = run.saves.wait()
    except ckpt.SaveFailed as e:
        _save_failed(run, e)
        return
    if saved is not None:
        _saved(run, saved)


def poll_save(run: Run) -> None:
    """Once an iteration, with no collective: a background save whose thread has ended is
    reported (its record on the logging rank). A failure that stops the run (SaveFailed with
    --save-failure stop, anything else) is left to should_exit, which raises it on every rank
    at the same iteration; each rank's thread ends at its own moment."""
    s = run.saves
    if s is None or not s.done():
        return
    failure = s.failure()
    warned = isinstance(failure, ckpt.SaveFailed) and run.cfg.checkpoint.save_failure == "continue"
    if failure is None or warned:
        finish_save(run)


def _finish_save_on_error(run: Run) -> None:
    """Leaving by an exception: the checkpoint being written is completed (never abandoned
    halfway by the exit), and its own failure, a warning line, does not hide that exception."""
    try:
        saved = run.saves.wait()
    except Exception as e:
        run.log.print(f"warning: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
        return
    if saved is not None:
        _saved(run, saved)


def maybe_save(run: Run) -> None:
    interval = run.cfg.checkpoint.save_interval
    if interval and run.iteration % interval == 0:
        save(run)


class Preemption:
    """SIGTERM (a cluster's preemption notice) sets a flag; the loop saves and exits 0."""

    def __init__(self):
        self.requested = False
        self._old = signal.signal(signal.SIGTERM, self._handler)

    def _handler(self, signum, frame):
        self.requested = True

    def restore(self):
        signal.signal(signal.SIGTERM, self._old)


class RankFlags:
    """Flags that every rank must see alike: each call OR-s them over the ranks with one small
    MAX all-reduce, launched every call. On the CPU (gloo), or in a single process, the result
    is read at once, at no cost. On CUDA it is copied to pinned host memory behind an event and
    read at the next call, after waiting for that event: work queued a whole iteration
    earlier, so the wait never drains the device (it only keeps the host from running more
    than a step ahead of it). So on CUDA a flag takes effect one call after it was raised, on
    every rank at the same call."""

    def __init__(self, device: torch.device, n: int):
        self.device, self.pending = device, None
        self.lagged = dist.is_initialized() and device.type == "cuda"
        if self.lagged:  # pinned: both copies run on the stream, without the host
            self.host_in = torch.zeros(n, pin_memory=True)
            self.host_out = torch.zeros(n, pin_memory=True)

    def __call__(self, flags: list[bool]) -> Optional[list[bool]]:
        """The flags OR-ed over every rank: these (CPU), or the previous call's (CUDA; None
        at the first call)."""
        if not dist.is_initialized():
            return flags
        if not self.lagged:
            t = torch.tensor([1.0 if f else 0.0 for f in flags], device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            return [bool(v) for v in t.tolist()]
        agreed = None
        if self.pending is not None:
            self.pending.synchronize()  # recorded a step ago: already done, or nearly
            agreed = [bool(v) for v in self.host_out.tolist()]
        # host_in and host_out are free again: the event waited for covers both copies
        self.host_in.copy_(torch.tensor([1.0 if f else 0.0 for f in flags]))
        t = self.host_in.to(self.device, non_blocking=True)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        self.host_out.copy_(t, non_blocking=True)
        self.pending = torch.cuda.Event()
        self.pending.record()
        return agreed


def should_exit(run: Run, preemption: Preemption) -> Optional[str]:
    """Why to stop now (SIGTERM, --exit-interval, --exit-duration-in-mins, early stop, or
    another rank's reason), or None. Every rank gets the same answer at the same iteration.

    --exit-interval and early stopping follow from numbers every rank shares (the iteration,
    the all-reduced validation loss), so they act at once. SIGTERM and the time limit are one
    rank's own, and are OR-ed over the ranks (`RankFlags`): on the CPU at once; on CUDA one
    iteration late, so a stop there comes at most one iteration (and its save) after the
    signal or the limit."""
    t = run.cfg.training
    minutes = (time.time() - run.start_time) / 60
    out_of_time = bool(t.exit_duration_in_mins and minutes >= t.exit_duration_in_mins)
    # a background save that failed, and that poll_save left to be raised on every rank
    save_failed = run.saves is not None and run.saves.failure() is not None
    if run.stop_flags is None:
        run.stop_flags = RankFlags(state.get().device, 3)
    agreed = run.stop_flags([preemption.requested, out_of_time, save_failed])
    sigterm, time_up, save_failed = agreed if agreed is not None else (False, False, False)
    if save_failed:
        # every rank's save failed (the write agrees on that), each thread ends soon after
        finish_save(run)  # raises
    if sigterm:
        return "SIGTERM"
    if run.exit_reason:
        return run.exit_reason
    if t.exit_interval and run.iteration % t.exit_interval == 0:
        return f"--exit-interval {t.exit_interval}"
    if time_up:
        return f"--exit-duration-in-mins {t.exit_duration_in_mins}" + (
            "" if out_of_time else " (another rank)"
        )
    return None


# -- the loop ---------------------------------------------------------------------------------


def roll_back(run: Run, diverged: Diverged) -> None:
    """--rollback-on-nan (PaLM's remedy for a loss spike): reload the last checkpoint this run
    saved (or resumed from) in --save, with its optimizer state and RNG, and restart the data
    at the samples consumed by the end of the diverged iteration, so that the batches from the
    checkpoint up to that one are never seen again. The iteration (and so the LR) is the
    checkpoint's. Every rank gets here at the same read (the loss and grad norm are global),
    and the checkpoint saved consumed_samples after the skip, so a resumed run goes on alike.
    Raises the divergence's one line after K rollbacks, or when there is nothing to go back
    to."""
    cfg, ck = run.cfg, run.cfg.checkpoint
    allowed = cfg.training.rollback_on_nan
    if not allowed:
        raise diverged
    if run.rollbacks >= allowed:
        raise MegaliteError(f"{diverged} (after {run.rollbacks} rollbacks: --rollback-on-nan "
                            f"{allowed})") from diverged  # fmt: skip
    # A checkpoint being written is completed first: the load must not race its write (nor
    # tidy its .tmp directory away), and it may be the one to go back to.
    finish_save(run)
    latest = ckpt.latest_iteration(ck.save) if ck.save else None
    if not run.last_saved or latest != run.last_saved:
        raise MegaliteError(f"{diverged} (--rollback-on-nan: no checkpoint of this run in "
                            f"{ck.save} yet to roll back to)") from diverged  # fmt: skip
    run.ddp.finish_param_sync()  # a background param gather must not land after the load
    reload = dataclasses.replace(ck, load=ck.save, no_load_optim=False, no_load_rng=False)
    iteration, saved_samples, where, _ = ckpt.load_checkpoint(
        dataclasses.replace(cfg, checkpoint=reload), run.chunks, run.optimizer
    )
    run.iteration, run.consumed_samples = iteration, diverged.consumed_samples
    run.last_saved = iteration
    run.rollbacks += 1
    run.window = Window()
    if run.optimizer.spike_filter is not None:  # the checkpoint's count (a rollback is rare)
        run.spikes_total = int(run.optimizer.spike_filter.skipped)
    close = getattr(run.train_iter, "close", None)
    if close is not None:
        close()  # its loader's workers go now
    run.train_iter = train_batches(run)
    skipped = diverged.consumed_samples - saved_samples
    run.log.log(
        {"iteration": diverged.iteration, "rollbacks": run.rollbacks, "rolled_back_to": iteration,
         "samples_skipped": skipped},
        f"rollback {run.rollbacks}/{allowed} at iteration {diverged.iteration} (the "
        f"{diverged.what}): reloaded {where} (iteration {iteration}) and skipped samples "
        f"{saved_samples}..{diverged.consumed_samples - 1} ({skipped} samples, iterations "
        f"{iteration + 1}..{diverged.iteration})",
    )  # fmt: skip


def _train(run: Run, preemption: "Preemption") -> int:
    """Steps until --train-iters or an exit; returns the last iteration, saved."""
    while run.iteration < run.cfg.training.train_iters:
        stats = train_step(run)
        maybe_log(run, stats)
        maybe_evaluate(run)
        poll_save(run)
        maybe_save(run)
        reason = should_exit(run, preemption)
        if reason:
            save(run, wait=True)
            run.log.print(f"exiting at iteration {run.iteration}: {reason}")
            return run.iteration
    save(run, wait=True)
    return run.iteration


def pretrain(cfg: Config) -> int:
    """Train per `cfg`; returns the last iteration (saved, when --save is given)."""
    run = setup(cfg)
    preemption = Preemption()
    try:
        while True:
            try:
                return _train(run, preemption)
            except Diverged as diverged:  # found where a window is read, before any save
                roll_back(run, diverged)  # or raises its one line
    except RuntimeError as e:  # torch.distributed's errors: a peer that went away gets one line
        lost = heartbeat.lost_peer_message(e)
        if lost is None:
            raise
        raise MegaliteError(lost) from e
    finally:
        if run.saves is not None:  # (none is in flight after a clean exit: it waited)
            _finish_save_on_error(run)
        preemption.restore()
        run.log.close()
        if run.heartbeat is not None:
            run.heartbeat.stop()
