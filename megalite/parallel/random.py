"""Random-number streams for dropout under tensor parallelism.

Outside tensor-parallel regions every TP rank holds the same activations, so dropout there must
draw the same mask on every TP rank: it uses the default generator, seeded identically across
the TP group. Inside a region each rank holds different heads / features / sequence slices, so
its masks must differ: `tracker.fork()` swaps in a stream seeded per TP rank.
"""

import contextlib
import random

import numpy as np
import torch

from megalite.parallel import state

TP_STREAM = "tensor-parallel"


def _get_state(device):
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_state(device, rng):
    if device.type == "cuda":
        torch.cuda.set_rng_state(rng, device)
    else:
        torch.set_rng_state(rng)


class RNGTracker:
    def __init__(self):
        self.states = {}
        self.device = torch.device("cpu")

    def add(self, name, seed):
        saved = _get_state(self.device)
        (torch.cuda.manual_seed if self.device.type == "cuda" else torch.manual_seed)(seed)
        self.states[name] = _get_state(self.device)
        _set_state(self.device, saved)

    @contextlib.contextmanager
    def fork(self, name=TP_STREAM):
        if name not in self.states:  # not seeded (a bare module in a test): default stream
            yield
            return
        saved = _get_state(self.device)
        _set_state(self.device, self.states[name])
        try:
            yield
        finally:
            self.states[name] = _get_state(self.device)
            _set_state(self.device, saved)


tracker = RNGTracker()


def seed_everything(seed: int, device: torch.device) -> None:
    """Seed python, numpy, torch (same across the TP group) and the per-TP-rank stream.

    Pipeline stages get different seeds so that their (different) layers do not draw
    correlated masks; data-parallel replicas share the seed (Megatron does the same).
    """
    st = state.get()
    stage_seed = seed + 100 * st.pp_rank
    random.seed(stage_seed)
    np.random.seed(stage_seed % 2**32)
    torch.manual_seed(stage_seed)
    tracker.device = device
    tracker.states.clear()
    tracker.add(TP_STREAM, stage_seed + 2718 + st.tp_rank)


def get_rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": dict(tracker.states),
    }


def set_rng_state(rng: dict) -> None:
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    tracker.states = dict(rng["tracker"])
