"""LR schedules against their closed forms; the fp16 loss scaler's state machine; clipping."""

import math

import pytest
import torch

from megalite.optim import LRSchedule, DynamicLossScaler, clip_coefficient, global_grad_norm


def test_warmup_then_cosine_to_min_lr():
    s = LRSchedule(lr=1.0, min_lr=0.1, warmup_iters=10, decay_iters=110, style="cosine")
    assert s(0) == pytest.approx(0.1) and s(9) == pytest.approx(1.0)
    assert s(10) == pytest.approx(1.0)
    assert s(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert s(110) == pytest.approx(0.1) and s(500) == pytest.approx(0.1)
    lrs = [s(i) for i in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # monotone decay


def test_linear_constant_wsd():
    lin = LRSchedule(1.0, 0.0, 0, 100, "linear")
    assert lin(25) == pytest.approx(0.75)
    const = LRSchedule(1.0, 0.0, 5, 100, "constant")
    assert const(2) == pytest.approx(0.6) and const(90) == 1.0
    wsd = LRSchedule(1.0, 0.0, 10, 100, "wsd", wsd_decay_iters=20)
    assert wsd(50) == 1.0 and wsd(79) == 1.0  # stable phase holds the peak
    assert wsd(90) == pytest.approx(0.5)  # halfway through the linear tail
    assert wsd(100) == 0.0


def test_loss_scaler_backs_off_with_hysteresis_and_grows():
    s = DynamicLossScaler(initial_scale=1024, window=3, hysteresis=2)
    s.update(True)
    assert s.scale == 1024  # first overflow tolerated
    s.update(True)
    assert s.scale == 512  # second halves it
    for _ in range(3):
        s.update(False)
    assert s.scale == 1024  # window of clean steps doubles it
    s2 = DynamicLossScaler()
    s2.load_state_dict(s.state_dict())
    assert s2.state_dict() == s.state_dict()


class HostLossScaler:
    """The reference: the host-side scaler the device one replaced (its update, verbatim)."""

    def __init__(self, initial_scale, window, hysteresis, min_scale):
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


DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    ),
]


@pytest.mark.parametrize(
    "initial_scale, window, hysteresis, min_scale",
    [(1024.0, 3, 2, 1.0), (8.0, 2, 1, 2.0), (2.0**16, 5, 3, 0.3), (3.0, 1, 2, 1.0)],
    ids=["hysteresis-2", "min-scale-2", "min-scale-0.3", "window-1"],
)
@pytest.mark.parametrize("device", DEVICES)
def test_device_loss_scaler_follows_the_host_one(device, initial_scale, window, hysteresis,
                                                 min_scale):  # fmt: skip
    """Random overflow sequences (sparse, even, dense) through both: after every update the
    same scale, counts and state dict. The flags are device tensors, as the step hands them."""
    params = (initial_scale, window, hysteresis, min_scale)
    hits = {"doubled": 0, "at_min_scale": 0, "held_by_hysteresis": 0}
    for seed, p_overflow in enumerate((0.1, 0.5, 0.9)):
        ours, ref = DynamicLossScaler(*params).to(device), HostLossScaler(*params)
        flags = torch.rand(300, generator=torch.Generator().manual_seed(seed)) < p_overflow
        for flag in flags.tolist():
            before = ref.scale
            ours.update(torch.tensor(flag, device=device))
            ref.update(flag)
            assert ours.state_dict() == ref.state_dict()
            assert ours.loss_scale.dtype == torch.float32 and ours.loss_scale.device.type == device
            assert ours.loss_scale.item() == torch.tensor(ref.scale).float().item()
            hits["doubled"] += ref.scale > before
            hits["at_min_scale"] += flag and ref.scale == min_scale
            hits["held_by_hysteresis"] += flag and ref.scale == before and before > min_scale
    # the sequences reached every branch (hysteresis 1 backs off at once: no holding)
    assert hits["doubled"] and hits["at_min_scale"]
    assert bool(hits["held_by_hysteresis"]) == (hysteresis > 1)


def test_grad_norm_and_clip_coefficient():
    a = torch.nn.Parameter(torch.zeros(3))
    b = torch.nn.Parameter(torch.zeros(2, 2))
    a.grad = torch.tensor([3.0, 0.0, 0.0])
    b.grad = torch.tensor([[0.0, 4.0], [0.0, 0.0]])
    assert global_grad_norm([a, b]).item() == pytest.approx(5.0)
    assert clip_coefficient(5.0, 1.0) == pytest.approx(0.2, rel=1e-5)
    assert clip_coefficient(0.5, 1.0) == 1.0 and clip_coefficient(5.0, 0.0) == 1.0
    b.grad[0, 0] = float("nan")
    assert math.isnan(global_grad_norm([a, b]).item())
