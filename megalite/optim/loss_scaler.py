"""Dynamic loss scaling for fp16: scale the loss so small grads survive fp16's range.

On an inf/nan the step is skipped; after `hysteresis` such overflows the scale halves. After
`window` clean steps in a row it doubles. bf16 has fp32's range and needs none of this.
"""


class DynamicLossScaler:
    def __init__(self, initial_scale=2.0**16, window=1000, hysteresis=2, min_scale=1.0):
        self.scale = float(initial_scale)
        self.window, self.hysteresis, self.min_scale = window, hysteresis, min_scale
        self.clean_steps = 0
        self.overflows_left = hysteresis

    def update(self, found_inf: bool) -> None:
        if found_inf:
            self.clean_steps = 0
            self.overflows_left -= 1
            if self.overflows_left <= 0:
                self.scale = max(self.scale / 2.0, self.min_scale)
                self.overflows_left = self.hysteresis
            return
        self.clean_steps += 1
        if self.clean_steps % self.window == 0:
            self.scale *= 2.0
            self.overflows_left = self.hysteresis

    def state_dict(self):
        return dict(vars(self))

    def load_state_dict(self, sd):
        vars(self).update(sd)
