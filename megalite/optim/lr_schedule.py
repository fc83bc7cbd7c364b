"""Learning-rate schedule: linear warmup, then cosine / linear / constant / WSD decay to min_lr.

A pure function of the iteration, so resuming needs only the iteration number (its settings
are in the checkpoint's config).
"""

import math


class LRSchedule:
    def __init__(
        self,
        lr,
        min_lr,
        warmup_iters,
        decay_iters,
        style="cosine",
        wsd_decay_iters=None,
        wsd_decay_style="linear",
    ):
        self.lr, self.min_lr = lr, min_lr
        self.warmup_iters, self.decay_iters = warmup_iters, max(decay_iters, 1)
        self.style = style
        # WSD: warmup, hold the peak ("stable"), then decay over the last wsd_decay_iters.
        self.wsd_decay_iters = (
            wsd_decay_iters if wsd_decay_iters is not None else max(1, int(0.2 * self.decay_iters))
        )
        self.wsd_decay_style = wsd_decay_style

    def __call__(self, it: int) -> float:
        """Learning rate for iteration `it` (0-based count of steps already taken)."""
        if self.warmup_iters > 0 and it < self.warmup_iters:
            return self.lr * (it + 1) / self.warmup_iters
        if self.style == "constant":
            return self.lr
        if it >= self.decay_iters:
            return self.min_lr
        if self.style == "wsd":
            decay_start = self.decay_iters - self.wsd_decay_iters
            if it < decay_start:
                return self.lr
            return self._decay((it - decay_start) / self.wsd_decay_iters, self.wsd_decay_style)
        span = self.decay_iters - self.warmup_iters
        progress = (it - self.warmup_iters) / span if span > 0 else 1.0
        return self._decay(progress, self.style)

    def _decay(self, progress, style):
        progress = min(max(progress, 0.0), 1.0)
        if style == "cosine":
            coeff = 0.5 * (1.0 + math.cos(math.pi * progress))
        elif style == "linear":
            coeff = 1.0 - progress
        elif style == "exponential":  # WSD's exponential tail: lr -> min_lr geometrically
            if self.min_lr <= 0:
                coeff = 1.0 - progress
            else:
                return self.lr * (self.min_lr / self.lr) ** progress
        else:
            raise ValueError(f"unknown decay style {style}")
        return self.min_lr + coeff * (self.lr - self.min_lr)
