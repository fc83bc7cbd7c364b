"""Dynamic loss scaling for fp16: scale the loss so small grads survive fp16's range.

On an inf/nan the step is skipped; after `hysteresis` such overflows the scale halves (not
below `min_scale`). After `window` clean steps in a row it doubles. bf16 has fp32's range and
needs none of this.

The state (scale, clean steps, overflows left) lives on the training device and `update` runs
there, from the step's device flag (torch.where: no host read), so an fp16 step reads nothing
back. The host reads it only where it reads anyway: the log line (`scale`) and checkpoints
(`state_dict`, plain floats and ints, the format of the earlier host-side scaler).
"""

import torch


class DynamicLossScaler:
    def __init__(self, initial_scale=2.0**16, window=1000, hysteresis=2, min_scale=1.0):
        self.window, self.hysteresis, self.min_scale = int(window), int(hysteresis), min_scale
        # the scale in double, as the host kept it; `loss_scale` is its fp32 rounding, what
        # the loss and the grads are multiplied and divided by (as a float scale would be)
        self._scale = torch.tensor(float(initial_scale), dtype=torch.float64)
        self.loss_scale = self._scale.float()
        self._clean_steps = torch.zeros((), dtype=torch.int64)  # in a row
        self._overflows_left = torch.tensor(self.hysteresis, dtype=torch.int64)

    def to(self, device) -> "DynamicLossScaler":
        """Moves the state to the training device (the optimizer does, once)."""
        for name in ("_scale", "loss_scale", "_clean_steps", "_overflows_left"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    # -- host views (each a read of the device) ------------------------------------------------
    @property
    def scale(self) -> float:
        return float(self._scale)

    @scale.setter
    def scale(self, value):
        self._scale.fill_(float(value))
        self.loss_scale.copy_(self._scale)

    @property
    def clean_steps(self) -> int:
        return int(self._clean_steps)

    @property
    def overflows_left(self) -> int:
        return int(self._overflows_left)

    # -- the step -------------------------------------------------------------------------------
    @torch.no_grad()
    def update(self, found_inf) -> None:
        """found_inf: the step's overflow flag (a device bool, or a bool)."""
        overflow = torch.as_tensor(found_inf, device=self._scale.device).reshape(()).bool()
        clean = torch.where(overflow, 0, self._clean_steps + 1)
        left = self._overflows_left - 1
        back_off = overflow & (left <= 0)
        grow = ~overflow & (clean % self.window == 0)
        scale = torch.where(
            back_off,
            (self._scale / 2.0).clamp(min=self.min_scale),
            torch.where(grow, self._scale * 2.0, self._scale),
        )
        left = torch.where(
            back_off | grow, self.hysteresis, torch.where(overflow, left, self._overflows_left)
        )
        self._scale.copy_(scale)
        self.loss_scale.copy_(scale)
        self._clean_steps.copy_(clean)
        self._overflows_left.copy_(left)

    # -- checkpoints ----------------------------------------------------------------------------
    def state_dict(self):
        scale, clean, left = torch.stack(  # one read; the counts are exact in double
            (self._scale, self._clean_steps.double(), self._overflows_left.double())
        ).tolist()
        return {
            "scale": scale,
            "window": self.window,
            "hysteresis": self.hysteresis,
            "min_scale": self.min_scale,
            "clean_steps": int(clean),
            "overflows_left": int(left),
        }

    def load_state_dict(self, sd):
        self.window, self.hysteresis = int(sd["window"]), int(sd["hysteresis"])
        self.min_scale = sd["min_scale"]
        self.scale = sd["scale"]
        self._clean_steps.fill_(int(sd["clean_steps"]))
        self._overflows_left.fill_(int(sd["overflows_left"]))
