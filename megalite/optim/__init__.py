"""Optimizers, schedules, loss scaling and gradient clipping."""

from megalite.optim.fused_adamw import FusedAdamW
from megalite.optim.grad_norm import clip_coefficient, global_grad_norm
from megalite.optim.loss_scaler import DynamicLossScaler
from megalite.optim.lr_schedule import LRSchedule


def no_weight_decay(name: str, param) -> bool:
    """Biases, norm weights and other 1-D parameters are not decayed (GPT-2, Megatron)."""
    return param.ndim < 2 or name.endswith(".bias")


def build_optimizer(model, cfg) -> FusedAdamW:
    """FusedAdamW with two groups: decayed weight matrices, undecayed biases and norms."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if no_weight_decay(name, p) else decay).append(p)
    o = cfg.optimizer
    return FusedAdamW(
        [{"params": decay, "weight_decay": o.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=o.lr, betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_eps)


def build_lr_schedule(cfg) -> LRSchedule:
    o = cfg.optimizer
    return LRSchedule(o.lr, o.min_lr, o.lr_warmup_iters,
                      o.lr_decay_iters or cfg.training.train_iters, o.lr_decay_style,
                      o.lr_wsd_decay_iters, o.lr_wsd_decay_style)


__all__ = ["FusedAdamW", "DynamicLossScaler", "LRSchedule", "build_optimizer",
           "build_lr_schedule", "global_grad_norm", "clip_coefficient", "no_weight_decay"]
