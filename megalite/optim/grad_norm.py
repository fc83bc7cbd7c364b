"""The global gradient norm over unique parameters, and clipping by it.

Every rank holds some parameters in full that others hold too. Each unique parameter must
count once: a TP-replicated parameter (norms, row biases, position embeddings) on TP rank 0
only, the last pipeline stage's copy of a tied embedding not at all (the first stage counts
it). Squares are summed locally, then over the model-parallel group (TP x PP); data-parallel
replicas hold the same (all-reduced) grads and are not summed again. With the distributed
optimizer each DP rank holds a disjoint shard of every grad (`sharded_grad_norm`): each shard
counts once and the squares are summed over DP, then over TP x PP.
"""

import torch
import torch.distributed as dist

from megalite.ops import sum_of_squares
from megalite.parallel import state
from megalite.parallel.layers import unique_part
from megalite.parallel.tags import tag_of


def counts_in_norm(p) -> bool:
    t = tag_of(p)
    if t.tied_embedding == "output":  # the input embedding on stage 0 counts
        return False
    return t.partition_dim is not None or state.get().tp_rank == 0


def global_grad_norm(params, grads=None) -> torch.Tensor:
    """The L2 norm of every grad in the model, as a 0-dim fp32 tensor (inf/nan propagate).
    grads: one per param (default p.grad; the data-parallel buffers pass p.main_grad)."""
    st = state.get()
    grads = [p.grad for p in params] if grads is None else list(grads)
    # unique_part: trims grouped-query key/value rows that several TP ranks replicate
    grads = [
        unique_part(p, g) for p, g in zip(params, grads) if g is not None and counts_in_norm(p)
    ]
    device = grads[0].device if grads else st.device
    sq = sum_of_squares(grads).to(device) if grads else torch.zeros((), device=device)
    if st.mp_group is not None and st.tp * st.pp > 1:
        dist.all_reduce(sq, group=st.mp_group)
    return sq.sqrt()


def _unique_mask(p):
    """Which elements of p (flattened) count in the norm on this rank; None for all of them.
    Kept on the param: its layout never changes, and building the mask takes an index per
    element (8 bytes each), too much to do every step."""
    if not hasattr(p, "_norm_mask"):
        idx = torch.arange(p.numel(), device=p.device).view(p.shape)
        kept = unique_part(p, idx)
        mask = None
        if kept.numel() != p.numel():
            mask = torch.zeros(p.numel(), dtype=torch.bool, device=p.device)
            mask[kept.reshape(-1)] = True
        p._norm_mask = mask
    return p._norm_mask


def sharded_grad_norm(pieces) -> torch.Tensor:
    """The global norm when each DP rank holds a disjoint piece of every grad.

    pieces: (param, grad_piece, start, end): grad_piece holds elements [start, end) of the
    flattened grad of param. Each piece counts once; squares are summed over DP and TP x PP."""
    st = state.get()
    grads = []
    for p, g, start, end in pieces:
        if not counts_in_norm(p):
            continue
        if tag_of(p).group_layout is not None:
            mask = _unique_mask(p)
            if mask is not None:  # zeros, not g[mask]: a boolean index syncs with the host
                g = torch.where(mask[start:end], g, 0.0)
        grads.append(g)
    sq = sum_of_squares(grads).to(st.device) if grads else torch.zeros((), device=st.device)
    if st.dp_group is not None and st.dp > 1:
        dist.all_reduce(sq, group=st.dp_group)  # the DP shards of my stage and TP slice
    if st.mp_group is not None and st.tp * st.pp > 1:
        dist.all_reduce(sq, group=st.mp_group)  # then over TP x PP, as for plain DP
    return sq.sqrt()


def clip_coefficient(total_norm, max_norm: float):
    """Multiply grads by this to clip (1.0 when the norm is already small enough; always 1.0
    when clipping is off). total_norm: a float, or a tensor: then the coefficient is a tensor
    computed on its device, so the trainer never reads the norm back to clip (a nan norm gives
    a nan coefficient; the step is skipped then anyway)."""
    if max_norm <= 0:
        return 1.0
    if isinstance(total_norm, torch.Tensor):
        return (max_norm / (total_norm + 1e-6)).clamp_(max=1.0)
    return min(1.0, max_norm / (total_norm + 1e-6))


class SpikeFilter:
    """--skip-spike-factor: flags a step whose global grad norm exceeds `factor` x the median
    of the last `window` accepted norms, on the device (no host read).

    A spike is a finite norm over the threshold; an inf/nan norm is the caller's found_inf,
    not a spike. Neither enters the history, so one spike cannot raise the median for the next
    one. No decision is made until min(10, window) norms are in it. Every rank holds the same
    history and decides alike, because the norm it is fed is global (TP, PP and DP).

    State: `history`, a ring of accepted norms (+inf in slots never written: they sort last),
    `count` (norms written; the next goes to slot count % window) and `skipped` (spikes so
    far), all on the device and saved with the optimizer."""

    MIN_NORMS = 10

    def __init__(self, factor: float, window: int, device):
        self.factor, self.window = float(factor), int(window)
        self.min_norms = min(self.MIN_NORMS, self.window)
        self.history = torch.full((self.window,), float("inf"), device=device)
        self.count = torch.zeros((), dtype=torch.long, device=device)
        self.skipped = torch.zeros((), dtype=torch.long, device=device)
        self._slots = torch.arange(self.window, device=device)

    def median(self) -> torch.Tensor:
        """The lower median of the accepted norms (+inf while there are none). Sort and
        gather: neither reads back to the host (a boolean index or nanmedian could)."""
        filled = self.count.clamp(max=self.window)
        k = ((filled - 1).clamp(min=0) // 2).reshape(1)
        return torch.sort(self.history).values.gather(0, k).reshape(())

    def __call__(self, norm: torch.Tensor) -> torch.Tensor:
        """Whether `norm` (a 0-dim fp32 device tensor) is a spike, as a 0-dim bool tensor; a
        finite norm that is not one joins the history."""
        finite = torch.isfinite(norm)
        decided = self.count >= self.min_norms
        spike = decided & finite & (norm > self.factor * self.median())
        accepted = finite & ~spike
        slot = (self._slots == self.count % self.window) & accepted
        self.history.copy_(torch.where(slot, norm.to(self.history.dtype), self.history))
        self.count += accepted.long()
        self.skipped += spike.long()
        return spike

    def state_dict(self) -> dict:
        """Views of the live state (save_checkpoint moves them to the host as it writes)."""
        return {"history": self.history, "count": self.count, "skipped": self.skipped}

    @torch.no_grad()
    def load_state_dict(self, sd: dict) -> None:
        """What state_dict() saved, possibly with another window: the newest accepted norms
        that fit, oldest first from slot 0."""
        history, count = sd["history"].float().cpu(), int(sd["count"])
        saved_window = history.numel()
        if count > saved_window:  # the ring wrapped: the oldest norm is at slot count % window
            history = torch.roll(history, -(count % saved_window))
        newest = history[: min(count, saved_window)][-self.window :]
        self.history.fill_(float("inf"))
        self.history[: newest.numel()].copy_(newest)
        self.count.fill_(newest.numel())
        self.skipped.fill_(int(sd["skipped"]))
