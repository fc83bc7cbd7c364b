"""Random-number streams for dropout under tensor parallelism.

Outside tensor-parallel regions every TP rank holds the same activations, so dropout there must
draw the same mask on every TP rank: it uses the default generator, seeded identically across
the TP group. Inside a region each rank holds different heads / features / sequence slices, so
its masks must differ: `tracker.fork()` swaps in a stream seeded per TP rank.

`checkpoint` is activation recomputation that replays both: torch.utils.checkpoint restores the
default generator (CPU, and CUDA for the inputs' devices) before rerunning the function, and
we rewind the tracker's streams to where they were when the function first ran, so the rerun
draws the very same dropout masks. Afterwards the streams are put back where they had got to.
"""

import contextlib
import random

import numpy as np
import torch
import torch.utils.checkpoint

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


class _TrackerReplay:
    """The two contexts torch.utils.checkpoint's `context_fn` asks for: one around the first
    run (remember the tracker's streams), one around the rerun (replay from there)."""

    def __init__(self):
        self.saved = None

    @contextlib.contextmanager
    def first_run(self):
        # fork() replaces entries rather than mutating the state tensors: a shallow copy is
        # a snapshot.
        self.saved = dict(tracker.states)
        yield

    @contextlib.contextmanager
    def rerun(self):
        current = tracker.states
        tracker.states = dict(self.saved)
        try:
            yield
        finally:
            tracker.states = current


def checkpoint(function, *args):
    """function(*args), keeping only the inputs; reruns it in backward with the same RNG."""
    replay = _TrackerReplay()
    return torch.utils.checkpoint.checkpoint(
        function,
        *args,
        use_reentrant=False,
        preserve_rng_state=True,
        context_fn=lambda: (replay.first_run(), replay.rerun()),
    )


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
    """Every RNG's state as plain values and tensors only, so the checkpoint file holding it
    loads with torch.load(weights_only=True): numpy's legacy state tuple becomes a dict with
    its uint32 key as an int64 tensor, Python's state tuple a list."""
    version, internal, gauss_next = random.getstate()
    name, key, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    return {
        "python": [version, list(internal), gauss_next],
        "numpy": {
            "bit_generator": str(name),
            "key": torch.from_numpy(key.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": dict(tracker.states),
    }


def set_rng_state(rng: dict) -> None:
    """What get_rng_state() returned; also the tuples that checkpoints written before the
    weights_only format hold (numpy's state with its ndarray key)."""
    version, internal, gauss_next = rng["python"]
    random.setstate((version, tuple(internal), gauss_next))
    numpy_state = rng["numpy"]
    if isinstance(numpy_state, dict):
        numpy_state = (
            numpy_state["bit_generator"],
            numpy_state["key"].numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    np.random.set_state(numpy_state)
    torch.set_rng_state(rng["torch"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    tracker.states = dict(rng["tracker"])
