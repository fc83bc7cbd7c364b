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
    assert vars(s2) == vars(s)


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
