"""FusedAdamW: torch.optim.AdamW's arithmetic, every param of every group in one kernel call.

Like apex's FusedAdam and DeepSpeed's FusedAdam, but its state is laid out exactly like
torch.optim.AdamW's ('step' as an fp32 scalar tensor, 'exp_avg', 'exp_avg_sq'; the same param
group keys), so a state_dict moves between the two in both directions.

One difference, on purpose: if any grad holds an inf or nan, the step is skipped (no param,
moment or step count changes) and `optimizer.found_inf` is True, where torch would write nans
into the weights. `step(grad_scale=s)` divides the grads by s on the fly (fp16 loss scaling).

The check reads every grad once more before the update (on a CPU that is bound by memory reads,
about 20% of the step; on CUDA, one host synchronisation). A loop that already knows the grads
are finite, for example because it computed their norm (`clip_grad_norm_(...,
error_if_nonfinite=True)`, or a finite norm it tested itself), builds the optimizer with
check_finite=False and gets torch's single sweep; found_inf then stays False.
"""

import torch

from megalite.ops import reference
from megalite.ops.adamw import multi_tensor_adamw_


class FusedAdamW(torch.optim.Optimizer):
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, *,
                 check_finite=True):
        if not 0.0 <= float(lr):
            raise ValueError(f"FusedAdamW: invalid learning rate {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"FusedAdamW: invalid eps {eps}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"FusedAdamW: invalid betas {betas} (each must be in [0, 1))")
        if not 0.0 <= weight_decay:
            raise ValueError(f"FusedAdamW: invalid weight_decay {weight_decay}")
        # The same keys as torch.optim.AdamW's param groups, so its load_state_dict finds them.
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=False,
                        maximize=False, foreach=None, capturable=False, differentiable=False,
                        fused=None, decoupled_weight_decay=True)
        super().__init__(params, defaults)
        self.check_finite = bool(check_finite)   # not a group key: state dicts stay torch's
        self.found_inf = False

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("check_finite", True)
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)

    @torch.no_grad()
    def step(self, closure=None, *, grad_scale=1.0):
        """One AdamW step. Returns the closure's loss (if a closure is given). Sets
        self.found_inf (True: a grad held inf/nan and nothing was updated)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        by_device = {}  # device -> dict of parallel lists
        for group in self.param_groups:
            if group.get("amsgrad") or group.get("maximize"):
                raise ValueError("FusedAdamW: amsgrad and maximize are not supported")
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ValueError("FusedAdamW: sparse gradients are not supported")
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                lists = by_device.setdefault(p.device, {k: [] for k in (
                    "params", "grads", "exp_avgs", "exp_avg_sqs", "steps",
                    "lr", "beta1", "beta2", "eps", "weight_decay", "step")})
                lists["params"].append(p)
                lists["grads"].append(p.grad)
                lists["exp_avgs"].append(state["exp_avg"])
                lists["exp_avg_sqs"].append(state["exp_avg_sq"])
                lists["steps"].append(state["step"])
                lists["lr"].append(float(group["lr"]))
                lists["beta1"].append(float(beta1))
                lists["beta2"].append(float(beta2))
                lists["eps"].append(float(group["eps"]))
                lists["weight_decay"].append(float(group["weight_decay"]))
                lists["step"].append(float(state["step"]) + 1.0)

        # With params on several devices, one kernel call per device: check every grad first so
        # that an inf on the second device cannot leave the first one updated.
        if self.check_finite and len(by_device) > 1 and reference.any_non_finite(
                [g for lists in by_device.values() for g in lists["grads"]]):
            self.found_inf = True
            return loss

        found_inf = False
        for lists in by_device.values():
            steps = lists.pop("steps")
            found_inf |= multi_tensor_adamw_(
                lists.pop("params"), lists.pop("grads"), lists.pop("exp_avgs"), lists.pop("exp_avg_sqs"),
                grad_scale=grad_scale, check_finite=self.check_finite, **lists)
            if not found_inf:
                torch._foreach_add_(steps, 1.0)
        self.found_inf = bool(found_inf)
        return loss
