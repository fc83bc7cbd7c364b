"""FusedAdamW: torch.optim.AdamW's arithmetic, every param of every group in one kernel call.

Like apex's FusedAdam and DeepSpeed's FusedAdam, but its state is laid out exactly like
torch.optim.AdamW's ('step' as an fp32 scalar tensor, 'exp_avg', 'exp_avg_sq'; the same param
group keys), so a state_dict moves between the two in both directions.

inf/nan: torch's contract. With default arguments `step()` looks for no inf/nan, like
torch.optim.AdamW(fused=True) on its own: one sweep over param, grad and moments (28 bytes per
fp32 param), and an inf/nan grad reaches the weights as it would in torch. The grads are
checked, before anything is written, when

  * a grad scale is given, `step(grad_scale=s)` (fp16 loss scaling: the grads are divided by
    s on the fly). That is torch's fused AdamW under a GradScaler, whose unscale pass finds the
    infs and whose step is then skipped;
  * the caller asks for it, `FusedAdamW(..., check_finite=True)`: every step is checked.

`check_finite=False` never checks, not even with a grad scale (a loop that has computed the
global norm of the scaled grads already knows they are finite: the trainer's mixed-precision
optimizer gets its check from the grad norm this way). The check is one extra read of every
grad (on a memory-bound CPU it makes the step 20-30% longer: 0.79-0.84x torch's fused AdamW on 50M
fp32 params, 2 cores; on CUDA one host synchronisation).

`optimizer.found_inf` after a step: True when the step checked and found an inf/nan in some
grad; the step was then skipped entirely (no param, moment or step count changed). False when
the step ran, whether checked or not: after an unchecked step, False means "not looked for",
not "finite".
"""

import torch

from megalite.ops import reference
from megalite.ops.adamw import multi_tensor_adamw_


class FusedAdamW(torch.optim.Optimizer):
    def __init__(
        self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, *, check_finite=None
    ):
        if not 0.0 <= float(lr):
            raise ValueError(f"FusedAdamW: invalid learning rate {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"FusedAdamW: invalid eps {eps}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"FusedAdamW: invalid betas {betas} (each must be in [0, 1))")
        if not 0.0 <= weight_decay:
            raise ValueError(f"FusedAdamW: invalid weight_decay {weight_decay}")
        # The same keys as torch.optim.AdamW's param groups, so its load_state_dict finds them.
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "amsgrad": False,
            "maximize": False,
            "foreach": None,
            "capturable": False,
            "differentiable": False,
            "fused": None,
            "decoupled_weight_decay": True,
        }
        super().__init__(params, defaults)
        # None: check only steps given a grad scale; True: every step; False: never (see the
        # module docstring). Not a group key, so state dicts stay torch's.
        self.check_finite = None if check_finite is None else bool(check_finite)
        self.found_inf = False

    def __getstate__(self):  # torch's keeps only defaults, state and groups
        return {**super().__getstate__(), "check_finite": self.check_finite}

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("check_finite", None)
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)

    @torch.no_grad()
    def step(self, closure=None, *, grad_scale=None):
        """One AdamW step, the grads divided by grad_scale (None: 1, unscaled). Returns the
        closure's loss (if a closure is given). Checks for inf/nan when a grad scale is given or
        check_finite=True (never with check_finite=False) and sets self.found_inf: True when a
        grad held inf/nan and nothing was updated (see the module docstring).

        Longer than ~60 lines on purpose: torch.optim's contract (closure, per-group options,
        lazy state, found_inf) and the one fused kernel call read best in one place."""
        check = self.check_finite if self.check_finite is not None else grad_scale is not None
        grad_scale = 1.0 if grad_scale is None else float(grad_scale)
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
                lists = by_device.setdefault(
                    p.device,
                    {
                        k: []
                        for k in (
                            "params",
                            "grads",
                            "exp_avgs",
                            "exp_avg_sqs",
                            "steps",
                            "lr",
                            "beta1",
                            "beta2",
                            "eps",
                            "weight_decay",
                            "step",
                        )
                    },
                )
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
        if (
            check
            and len(by_device) > 1
            and reference.any_non_finite(
                [g for lists in by_device.values() for g in lists["grads"]]
            )
        ):
            self.found_inf = True
            return loss

        found_inf = False
        for lists in by_device.values():
            steps = lists.pop("steps")
            found_inf |= multi_tensor_adamw_(
                lists.pop("params"),
                lists.pop("grads"),
                lists.pop("exp_avgs"),
                lists.pop("exp_avg_sqs"),
                grad_scale=grad_scale,
                check_finite=check,
                **lists,
            )
            if not found_inf:
                torch._foreach_add_(steps, 1.0)
        self.found_inf = bool(found_inf)
        return loss
