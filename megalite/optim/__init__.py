"""Optimizers, schedules, loss scaling and gradient clipping."""

from megalite.optim.fused_adamw import FusedAdamW
from megalite.optim.grad_norm import clip_coefficient, global_grad_norm
from megalite.optim.loss_scaler import DynamicLossScaler
from megalite.optim.lr_schedule import LRSchedule
from megalite.optim.mixed_precision import MixedPrecisionOptimizer
from megalite.optim.distributed import DistributedOptimizer


def no_weight_decay(param) -> bool:
    """Biases, norm weights and other 1-D parameters are not decayed (GPT-2, Megatron)."""
    return param.ndim < 2


def build_optimizer(model, cfg, ddp=None):
    """Two groups: decayed weight matrices, undecayed biases and norms.

    Without `ddp`: a FusedAdamW over the params and their .grad. With the
    DistributedDataParallel that owns the grad buffers: the mixed-precision optimizer (fp32
    main params, clipping, the fp16 loss scaler), sharded over DP with
    --use-distributed-optimizer. model: a module or a list of model chunks."""
    decay, no_decay = [], []
    for chunk in model if isinstance(model, (list, tuple)) else [model]:
        for name, p in chunk.named_parameters():
            if p.requires_grad:
                (no_decay if no_weight_decay(p) else decay).append(p)
    o, t = cfg.optimizer, cfg.training
    groups = [
        {"params": decay, "weight_decay": o.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if ddp is None:
        return FusedAdamW(groups, lr=o.lr, betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_eps)
    scaler = (
        DynamicLossScaler(t.initial_loss_scale, t.loss_scale_window, t.hysteresis)
        if t.fp16
        else None
    )
    cls = DistributedOptimizer if ddp.use_distributed_optimizer else MixedPrecisionOptimizer
    return cls(
        groups,
        ddp,
        lr=o.lr,
        betas=(o.adam_beta1, o.adam_beta2),
        eps=o.adam_eps,
        clip_grad=o.clip_grad,
        loss_scaler=scaler,
    )


def build_lr_schedule(cfg) -> LRSchedule:
    o = cfg.optimizer
    return LRSchedule(
        o.lr,
        o.min_lr,
        o.lr_warmup_iters,
        o.lr_decay_iters,
        o.lr_decay_style,
        o.lr_wsd_decay_iters,
        o.lr_wsd_decay_style,
    )


__all__ = [
    "FusedAdamW",
    "DynamicLossScaler",
    "LRSchedule",
    "build_optimizer",
    "build_lr_schedule",
    "global_grad_norm",
    "clip_coefficient",
    "no_weight_decay",
    "MixedPrecisionOptimizer",
    "DistributedOptimizer",
]
