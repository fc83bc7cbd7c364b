"""The training loop, top to bottom (docs/ARCHITECTURE.md, "One training step").

run = setup(cfg)        process groups and RNG; the model parallelised in one order (plain
                        model for this rank's stage and TP slice, cast, DDP buffers,
                        optimizer); LR schedule; resume from --load; data
loop:
    stats = train_step(run)      one optimizer step over the global batch
    maybe_log, maybe_evaluate, maybe_save, should_exit
"""

from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
import torch.distributed as dist

from megalite.config import Config
from megalite.errors import MegaliteError
from megalite.layout import padded_vocab_size
from megalite.model.gpt import build_model, cast_params, flops_per_token, num_parameters
from megalite.optim import build_lr_schedule, build_optimizer
from megalite.parallel import random as prandom
from megalite.parallel import state
from megalite.parallel.ddp import DistributedDataParallel, finalize_model_grads
from megalite.parallel.pipeline import forward_backward, global_mean_loss, p2p_tensor_shape
from megalite.training import checkpoint as ckpt
from megalite.training.batches import batch_iterator, build_datasets, vocab_size
from megalite.training.metrics import MetricsWriter, memory_stats, peak_tflops


@dataclass
class Window:
    """What the log line averages over: the iterations since the last one."""

    loss: float = 0.0
    iters: int = 0
    time_s: float = 0.0
    skipped: int = 0


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
    start_time: float = field(default_factory=time.time)


@dataclass
class StepStats:
    loss: float
    lr: float
    grad_norm: float
    stepped: bool  # False: a grad held inf/nan and the step was skipped (fp16)
    time_s: float


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
    peak, peak_why = peak_tflops(st.device, t.bf16 or t.fp16, cfg.logging.peak_tflops)
    if peak is None:
        log.print(f"MFU not reported: {peak_why}")
    flops = flops_per_token(cfg.model, padded) * t.global_batch_size * cfg.model.seq_length
    run = Run(cfg, chunks, ddp, optimizer, build_lr_schedule(cfg), None, None, log, vocab,
              p2p_tensor_shape(cfg, st.tp), flops, peak)  # fmt: skip
    _resume(run)
    # The data loader's position is the number of consumed samples, nothing else.
    train_ds, run.valid_ds, _ = build_datasets(cfg, vocab)
    run.train_iter = batch_iterator(
        train_ds, t.micro_batch_size, run.consumed_samples, cfg.data.num_workers, vocab, st.device
    )
    return run


def parallelize(cfg: Config, vocab_size: int, unpadded_vocab_size: int):
    """Parallelism, applied in this one order; returns (chunks, ddp, optimizer)."""
    par = cfg.parallel
    # 1. the plain model of this rank's pipeline stage(s), each layer holding its TP slice
    #    (initialised from (seed, parameter name), so every layout starts from one model);
    chunks = build_model(cfg, vocab_size, unpadded_vocab_size)
    # 2. the training dtype: bf16/fp16 params (fp32 main params live in the optimizer);
    cast_params(chunks, cfg.training.params_dtype)
    # 3. data parallelism: fp32 grad buffers in buckets, synced during backward with
    #    --overlap-grad-reduce, params in a flat buffer with --use-distributed-optimizer;
    ddp = DistributedDataParallel(
        chunks,
        bucket_size=par.ddp_bucket_size,
        overlap_grad_reduce=par.overlap_grad_reduce,
        use_distributed_optimizer=par.use_distributed_optimizer,
        overlap_param_gather=par.overlap_param_gather,
    )
    # 4. the optimizer over those buffers (ZeRO-1 with --use-distributed-optimizer; it owns
    #    clipping and the fp16 loss scaler).
    return chunks, ddp, build_optimizer(chunks, cfg, ddp)


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
    run.iteration, run.consumed_samples, where = resumed
    if ck.load == ck.save:
        run.last_saved = run.iteration
    run.log.print(
        f"resumed from {where} (iteration {run.iteration}, {run.consumed_samples} samples consumed)"
    )


# -- one step ---------------------------------------------------------------------------------


def train_step(run: Run) -> StepStats:
    """One optimizer step over the global batch."""
    cfg, opt = run.cfg, run.optimizer
    tic = time.perf_counter()
    lr = run.lr_schedule(run.iteration)
    for group in opt.param_groups:
        group["lr"] = lr
    # Every micro-batch through this rank's chunks under the layout's schedule; the grads
    # of each chunk's last backward start their bucket's DP reduction.
    losses = forward_backward(
        run.chunks,
        run.train_iter,
        cfg.num_microbatches,
        loss_scale=opt.loss_scale,
        no_sync=run.ddp.no_sync,
        tensor_shape=run.p2p_shape,
    )
    finalize_model_grads(run.chunks, run.ddp)  # DP mean; SP sums over TP; tied embedding
    # The global grad norm (over TP, PP and DP shards) is also the inf/nan check; clipping,
    # unscaling and the fp16 loss-scale update happen inside the step.
    stepped, grad_norm = opt.step()
    opt.zero_grad()
    loss = global_mean_loss(losses).item()
    if opt.scaler is None and not (stepped and math.isfinite(loss)):
        what = f"gradient norm is {grad_norm}" if not stepped else f"loss is {loss}"
        raise MegaliteError(
            f"the {what} at iteration {run.iteration + 1} (loss {loss:.4g}): "
            f"training diverged; lower --lr, raise --lr-warmup-iters or use "
            f"--clip-grad, then resume from the last checkpoint"
        )
    run.iteration += 1
    run.consumed_samples += cfg.training.global_batch_size
    return StepStats(loss, lr, grad_norm, stepped, time.perf_counter() - tic)


# -- around the step --------------------------------------------------------------------------


def maybe_log(run: Run, stats: StepStats) -> None:
    """Every --log-interval iterations: the window's mean loss and throughput."""
    w, cfg, scaler = run.window, run.cfg, run.optimizer.scaler
    w.loss, w.iters, w.time_s = w.loss + stats.loss, w.iters + 1, w.time_s + stats.time_s
    w.skipped += int(not stats.stepped)
    if run.iteration % cfg.logging.log_interval and run.iteration != cfg.training.train_iters:
        return
    dt = w.time_s / w.iters
    tps = cfg.training.global_batch_size * cfg.model.seq_length / dt
    tflops = run.flops_per_iter / dt / cfg.world_size / 1e12
    rec = {
        "iteration": run.iteration,
        "loss": w.loss / w.iters,
        "lr": stats.lr,
        "grad_norm": stats.grad_norm,
        "tokens_per_sec": tps,
        "tflops_per_device": tflops,
        "mfu": tflops / run.peak_tflops if run.peak_tflops else None,
        "iter_time_s": dt,
        "consumed_samples": run.consumed_samples,
        **memory_stats(state.get().device),
    }
    line = (
        f"iter {run.iteration:6d}/{cfg.training.train_iters} | loss {rec['loss']:.4f} | "
        f"lr {stats.lr:.3e} | grad norm {stats.grad_norm:.3f} | {tps:,.0f} tok/s | "
        f"{tflops:.2f} TFLOP/s"
        + (f" | MFU {rec['mfu']:.1%}" if run.peak_tflops else "")
        + f" | {dt * 1000:.0f} ms/it | mem {rec['mem_peak_gb']:.2f} GB"
    )
    if scaler is not None:
        rec.update(loss_scale=scaler.scale, skipped_iters=w.skipped)
        line += f" | scale {scaler.scale:g} | skipped {w.skipped}"
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
        losses += forward_backward(
            run.chunks, it, cfg.num_microbatches, forward_only=True, tensor_shape=run.p2p_shape
        )
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


def save(run: Run) -> None:
    """Save the current iteration under --save (once; every exit path calls this)."""
    # Params all-gathered in the background must be whole before they are saved (and
    # before the process exits).
    run.ddp.finish_param_sync()
    if run.cfg.checkpoint.save and run.last_saved != run.iteration:
        run.last_saved = run.iteration
        where = ckpt.save_checkpoint(
            run.cfg, run.iteration, run.consumed_samples, run.chunks, run.optimizer
        )
        run.log.print(f"saved checkpoint {where}")


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


def any_rank(flags: list[bool], device) -> list[bool]:
    """Each flag True on every rank if it is True on any rank (so all ranks stop together);
    one small all-reduce per iteration for all of them."""
    if not dist.is_initialized():
        return flags
    t = torch.tensor([1.0 if f else 0.0 for f in flags], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def should_exit(run: Run, preemption: Preemption) -> Optional[str]:
    """Why to stop now (SIGTERM, --exit-interval, --exit-duration-in-mins, early stop, or
    another rank's reason), or None. Every rank gets the same answer."""
    t = run.cfg.training
    reason = run.exit_reason
    if t.exit_interval and run.iteration % t.exit_interval == 0:
        reason = reason or f"--exit-interval {t.exit_interval}"
    minutes = (time.time() - run.start_time) / 60
    if t.exit_duration_in_mins and minutes >= t.exit_duration_in_mins:
        reason = reason or f"--exit-duration-in-mins {t.exit_duration_in_mins}"
    sigterm, stop = any_rank([preemption.requested, reason is not None], state.get().device)
    if sigterm:
        return "SIGTERM"
    return (reason or "another rank") if stop else None


# -- the loop ---------------------------------------------------------------------------------


def pretrain(cfg: Config) -> int:
    """Train per `cfg`; returns the last iteration (saved, when --save is given)."""
    run = setup(cfg)
    preemption = Preemption()
    try:
        while run.iteration < cfg.training.train_iters:
            stats = train_step(run)
            maybe_log(run, stats)
            maybe_evaluate(run)
            maybe_save(run)
            reason = should_exit(run, preemption)
            if reason:
                save(run)
                run.log.print(f"exiting at iteration {run.iteration}: {reason}")
                return run.iteration
        save(run)
        return run.iteration
    finally:
        preemption.restore()
        run.log.close()
