"""The training loop, top to bottom.

    pretrain(cfg)
      1. join the process groups, seed every RNG stream
      2. build the model (this rank's stage and TP slice), optimizer, LR schedule
      3. resume from --load (weights, optimizer, schedule, RNG, consumed samples)
      4. loop: one global batch per iteration = forward/backward over the micro-batches,
         finalize grads (TP/PP/DP), clip, step; log, evaluate, save, maybe exit
"""

from __future__ import annotations

import math
import os
import signal
import time

import torch
import torch.distributed as dist

from megalite.errors import MegaliteError
from megalite.model.gpt import GPTModel, flops_per_token, num_parameters, padded_vocab_size
from megalite.optim import build_lr_schedule, build_optimizer, cast_params, model_dtype
from megalite.parallel import random as prandom
from megalite.parallel import state
from megalite.parallel.data import DistributedDataParallel, finalize_model_grads
from megalite.parallel.layers import init_parameters
from megalite.parallel.pipeline import (get_forward_backward_func, p2p_tensor_shape,
                                       pipeline_layout, pipeline_mean_loss, stage_module,
                                       virtual_pipeline_size)
from megalite.training import checkpoint as ckpt
from megalite.training.data import batch_iterator, build_datasets, resolve_vocab_size
from megalite.training.metrics import MetricsWriter, memory_stats, peak_tflops


class _Preemption:
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


def build_model(cfg, vocab_size, device, unpadded_vocab_size=None):
    """This rank's part of the model: its model chunks (one per virtual pipeline stage, one
    without interleaving), each initialised from the seed alone."""
    st, p = state.get(), cfg.parallel
    vp = virtual_pipeline_size(cfg.model.num_layers, st.pp,
                               p.num_layers_per_virtual_pipeline_stage)
    layout = pipeline_layout(cfg.model.num_layers, st.pp, vp,
                             p.decoder_first_pipeline_num_layers,
                             p.decoder_last_pipeline_num_layers)
    chunks = []
    for c, layers in enumerate(layout[st.pp_rank]):
        # The embedding lives on the first virtual stage, head and loss on the last.
        model = GPTModel(cfg.model, vocab_size, pre_process=st.is_first_stage and c == 0,
                         post_process=st.is_last_stage and c == vp - 1, layer_numbers=layers,
                         sequence_parallel=cfg.parallel.sequence_parallel,
                         unpadded_vocab_size=unpadded_vocab_size,
                         recompute_granularity=cfg.parallel.recompute_granularity,
                         recompute_num_layers=cfg.parallel.recompute_num_layers)
        init_parameters(model, cfg.training.seed)
        chunks.append(model.to(device))
    return chunks


@torch.no_grad()
def evaluate(chunks, cfg, valid_ds, vocab_size, device):
    """Mean loss over the first eval_iters global batches of the validation split (the same
    batches every time, so successive evaluations compare like with like)."""
    st = state.get()
    for c in chunks:
        c.eval()
    it = batch_iterator(valid_ds, cfg.training.micro_batch_size, 0, 0, vocab_size, device)
    n_micro = cfg.num_microbatches(st.world_size)
    forward_backward = get_forward_backward_func(st.pp, len(chunks))
    losses = []
    for _ in range(cfg.training.eval_iters):
        losses += forward_backward(chunks, it, n_micro, forward_only=True,
                                   tensor_shape=p2p_tensor_shape(cfg, st.tp))
    for c in chunks:
        c.train()
    loss = pipeline_mean_loss(losses)   # computed on the last stage, known on every stage
    if st.dp > 1:
        dist.all_reduce(loss, group=st.dp_group)
        loss /= st.dp
    return loss.item()


def pretrain(cfg):
    t = cfg.training

    # 1. Process groups (layout checked before anything waits), RNG streams.
    device = torch.device(t.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    world = int(os.environ.get("WORLD_SIZE", 1))
    cfg.validate(world)
    st = state.initialize(cfg.parallel.tensor_model_parallel_size,
                          cfg.parallel.pipeline_model_parallel_size,
                          backend=cfg.parallel.distributed_backend, device=device,
                          timeout_minutes=cfg.parallel.distributed_timeout_minutes)
    device = st.device
    prandom.seed_everything(t.seed, device)
    log = MetricsWriter(st.rank == st.world_size - 1, cfg.logging.metrics_file,
                        cfg.logging.tensorboard_dir)

    # 2. Model, optimizer, schedule.
    tokenizer, vocab = resolve_vocab_size(cfg)
    vocab_padded = padded_vocab_size(vocab, cfg.model.make_vocab_size_divisible_by, st.tp)
    chunks = build_model(cfg, vocab_padded, device, unpadded_vocab_size=vocab)
    model = stage_module(chunks)   # all chunks as one module: optimizer, checkpoints, grads
    forward_backward = get_forward_backward_func(st.pp, len(chunks))
    p2p_shape = p2p_tensor_shape(cfg, st.tp)   # every activation passed between stages
    # Mixed precision: bf16/fp16 params, fp32 grads (in the DDP buffers) and fp32 main params
    # (in the optimizer, which also owns the fp16 loss scaler). Data parallel: bucketed grad
    # sync, overlapped with backward; with --use-distributed-optimizer, ZeRO-1.
    cast_params(chunks, model_dtype(t))
    par = cfg.parallel
    ddp = DistributedDataParallel(chunks, bucket_size=par.ddp_bucket_size,
                                  overlap_grad_reduce=par.overlap_grad_reduce,
                                  use_distributed_optimizer=par.use_distributed_optimizer,
                                  overlap_param_gather=par.overlap_param_gather)
    no_sync = ddp.no_sync if len(chunks) == 1 else ddp.no_sync_per_chunk()
    optimizer = build_optimizer(model, cfg, ddp)
    schedule = build_lr_schedule(cfg)
    scaler = optimizer.scaler
    counts = num_parameters(cfg.model, vocab_padded)
    log.print(f"megalite: {counts['total'] / 1e6:.2f}M parameters "
              f"({counts['non_embedding'] / 1e6:.2f}M non-embedding), vocab {vocab} "
              f"(padded {vocab_padded}), layout TP={st.tp} PP={st.pp} DP={st.dp}, "
              f"{'bf16' if t.bf16 else 'fp16' if t.fp16 else 'fp32'} on {device}")

    # 3. Resume.
    iteration, consumed = 0, 0
    if cfg.checkpoint.load:
        loaded = ckpt.load_checkpoint(cfg.checkpoint.load)
        if loaded is None:
            if cfg.checkpoint.load != cfg.checkpoint.save:
                raise MegaliteError(
                    f"--load {cfg.checkpoint.load} holds no checkpoint (no "
                    f"{ckpt.LATEST}); check the path, or drop --load to start from scratch")
            log.print(f"no checkpoint in {cfg.checkpoint.load} yet: starting from scratch")
        else:
            meta, shard = loaded
            model.load_state_dict(shard["model"])
            optimizer.reload_model_params()   # fp32 main params <- the loaded weights
            if not cfg.checkpoint.no_load_optim:
                iteration, consumed = meta["iteration"], meta["consumed_samples"]
                optimizer.load_state_dict(shard["optimizer"], ckpt.optimizer_shard_reader(
                    cfg.checkpoint.load, meta["iteration"]))
                if scaler is not None and shard["loss_scaler"]:
                    scaler.load_state_dict(shard["loss_scaler"])
            if not cfg.checkpoint.no_load_rng:
                prandom.set_rng_state(shard["rng"])
            log.print(f"resumed from {ckpt.iter_dir(cfg.checkpoint.load, meta['iteration'])} "
                      f"(iteration {iteration}, {consumed} samples consumed)")

    # 4. Data: the loader's position is the number of consumed samples, nothing else.
    train_ds, valid_ds, _ = build_datasets(cfg, vocab)
    train_iter = batch_iterator(train_ds, t.micro_batch_size, consumed, cfg.data.num_workers,
                                vocab, device)
    n_micro = cfg.num_microbatches(st.world_size)
    tokens_per_iter = t.global_batch_size * cfg.model.seq_length
    peak, peak_why = peak_tflops(device, t.bf16 or t.fp16, cfg.logging.peak_tflops)
    if peak is None:
        log.print(f"MFU not reported: {peak_why}")
    flops_per_iter = flops_per_token(cfg.model, vocab_padded) * tokens_per_iter

    last_saved = iteration if cfg.checkpoint.load == cfg.checkpoint.save else None

    def save():
        nonlocal last_saved
        # Params all-gathered in the background must be whole before they are saved (and
        # before the process exits: every exit path saves).
        ddp.finish_param_sync()
        if cfg.checkpoint.save and last_saved != iteration:
            last_saved = iteration
            ckpt.save_checkpoint(cfg.checkpoint.save, iteration, model, optimizer, schedule,
                                 scaler, consumed, cfg, prandom.get_rng_state(),
                                 cfg.checkpoint.keep_last)
            log.print(f"saved checkpoint {ckpt.iter_dir(cfg.checkpoint.save, iteration)}")

    preemption = _Preemption()
    start_time = time.time()
    best_valid, evals_without_gain = math.inf, 0
    window_loss, window_iters, window_time, skipped = 0.0, 0, 0.0, 0
    exit_reason = None
    try:
        while iteration < t.train_iters:
            # -- one optimizer step over the global batch --
            tic = time.perf_counter()
            lr = schedule(iteration)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_scale = optimizer.loss_scale
            losses = forward_backward(chunks, train_iter, n_micro, loss_scale=loss_scale,
                                      tensor_shape=p2p_shape, no_sync=no_sync)
            finalize_model_grads(model, ddp)
            # The global norm (over TP, PP and DP shards), the inf/nan check, clipping,
            # unscaling and the fp16 loss-scale update all happen in the optimizer's step.
            stepped, grad_norm = optimizer.step()
            if not stepped and scaler is None:
                raise MegaliteError(
                    f"the gradient norm is {grad_norm} at iteration {iteration + 1} (loss "
                    f"{pipeline_mean_loss(losses).item():.4g}): training diverged; lower --lr, "
                    f"raise --lr-warmup-iters or use --clip-grad, then resume from the last "
                    f"checkpoint")
            skipped += int(not stepped)
            optimizer.zero_grad()
            iteration += 1
            consumed += t.global_batch_size
            loss = pipeline_mean_loss(losses)   # computed on the last stage, known on all
            if st.dp > 1:
                dist.all_reduce(loss, group=st.dp_group)
                loss /= st.dp
            loss = loss.item()
            if not math.isfinite(loss) and scaler is None:
                raise MegaliteError(f"the loss is {loss} at iteration {iteration}: training "
                                    f"diverged; lower --lr or raise --lr-warmup-iters, then "
                                    f"resume from the last checkpoint")
            elapsed = time.perf_counter() - tic
            window_loss += loss
            window_iters += 1
            window_time += elapsed

            # -- report --
            if iteration % cfg.logging.log_interval == 0 or iteration == t.train_iters:
                dt = window_time / window_iters
                tps = tokens_per_iter / dt
                tflops = flops_per_iter / dt / st.world_size / 1e12
                rec = {"iteration": iteration, "loss": window_loss / window_iters,
                       "lr": lr, "grad_norm": grad_norm, "tokens_per_sec": tps,
                       "tflops_per_device": tflops, "mfu": tflops / peak if peak else None,
                       "iter_time_s": dt, "consumed_samples": consumed,
                       **memory_stats(device)}
                if scaler is not None:
                    rec.update(loss_scale=scaler.scale, skipped_iters=skipped)
                line = (f"iter {iteration:6d}/{t.train_iters} | loss {rec['loss']:.4f} | "
                        f"lr {lr:.3e} | grad norm {grad_norm:.3f} | {tps:,.0f} tok/s | "
                        f"{tflops:.2f} TFLOP/s" + (f" | MFU {rec['mfu']:.1%}" if peak else "")
                        + f" | {dt * 1000:.0f} ms/it | mem {rec['mem_peak_gb']:.2f} GB")
                if scaler is not None:
                    line += f" | scale {scaler.scale:g} | skipped {skipped}"
                log.log(rec, line)
                window_loss, window_iters, window_time, skipped = 0.0, 0, 0.0, 0

            # -- evaluate, early stop --
            if valid_ds is not None and iteration % t.eval_interval == 0:
                valid_loss = evaluate(chunks, cfg, valid_ds, vocab, device)
                log.log({"iteration": iteration, "valid_loss": valid_loss,
                         "valid_ppl": math.exp(min(valid_loss, 50))},
                        f"validation at iter {iteration}: loss {valid_loss:.4f} | "
                        f"ppl {math.exp(min(valid_loss, 50)):.2f}")
                if valid_loss < best_valid:
                    best_valid, evals_without_gain = valid_loss, 0
                else:
                    evals_without_gain += 1
                if t.early_stop_patience and evals_without_gain >= t.early_stop_patience:
                    exit_reason = (f"early stop: no better validation loss in "
                                   f"{evals_without_gain} evaluations")

            # -- save, exit --
            if cfg.checkpoint.save_interval and iteration % cfg.checkpoint.save_interval == 0:
                save()
            if t.exit_interval and iteration % t.exit_interval == 0:
                exit_reason = exit_reason or f"--exit-interval {t.exit_interval}"
            minutes = (time.time() - start_time) / 60
            if t.exit_duration_in_mins and minutes >= t.exit_duration_in_mins:
                exit_reason = exit_reason or f"--exit-duration-in-mins {t.exit_duration_in_mins}"
            sigterm, stop = any_rank([preemption.requested, exit_reason is not None], device)
            if sigterm:
                exit_reason = "SIGTERM"
            if sigterm or stop:
                save()
                log.print(f"exiting at iteration {iteration}: {exit_reason or 'another rank'}")
                return iteration
        save()
        return iteration
    finally:
        preemption.restore()
        log.close()
