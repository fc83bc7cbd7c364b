"""Schedules: run the forward and backward passes of one global batch's micro-batches.

A schedule takes (model, data_iterator, num_microbatches) and returns each micro-batch's mean
loss (on the last pipeline stage; empty elsewhere). Every micro-batch's loss is divided by
num_microbatches before backward, so the accumulated grads are those of the global batch mean.
"""

import contextlib

import torch


def microbatch_loss(model, batch, autocast):
    """Mean per-token loss of one micro-batch (fp32 scalar)."""
    with autocast():
        per_token = model(batch["tokens"], labels=batch["labels"])   # [b, s] fp32
    return per_token.float().mean()


def forward_backward_no_pipelining(model, data_iterator, num_microbatches, *,
                                   forward_only=False, loss_scale=1.0,
                                   autocast=contextlib.nullcontext, no_sync=None):
    """Gradient accumulation over micro-batches on a single pipeline stage.

    no_sync: a context manager factory that suppresses data-parallel gradient sync; it wraps
    every micro-batch but the last, so the sync happens once, during the last backward.
    """
    no_sync = no_sync or contextlib.nullcontext
    losses = []
    for i in range(num_microbatches):
        last = i == num_microbatches - 1
        with (contextlib.nullcontext() if last or forward_only else no_sync()):
            loss = microbatch_loss(model, next(data_iterator), autocast)
            if not forward_only:
                (loss * (loss_scale / num_microbatches)).backward()
        losses.append(loss.detach())
    return losses
