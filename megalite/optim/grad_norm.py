"""The global gradient norm over unique parameters, and clipping by it.

Every rank holds some parameters in full that others hold too. Each unique parameter must
count once: a TP-replicated parameter (norms, row biases, position embeddings) on TP rank 0
only, the last pipeline stage's copy of a tied embedding not at all (the first stage counts
it). Squares are summed locally, then over the model-parallel group (TP x PP); data-parallel
replicas hold the same (all-reduced) grads and are not summed again.
"""

import torch
import torch.distributed as dist

from megalite.parallel import state


def counts_in_norm(p) -> bool:
    st = state.get()
    if getattr(p, "shared_embedding", False):
        return False
    if getattr(p, "tp_partition_dim", None) is None and st.tp_rank != 0:
        return False
    return True


def global_grad_norm(params) -> torch.Tensor:
    """The L2 norm of every grad in the model, as a 0-dim fp32 tensor (inf/nan propagate)."""
    st = state.get()
    grads = [p.grad for p in params if p.grad is not None and counts_in_norm(p)]
    device = grads[0].device if grads else st.device
    if grads:
        norms = torch._foreach_norm([g.float() if g.dtype != torch.float32 else g for g in grads])
        sq = torch.stack(norms).square().sum()
    else:
        sq = torch.zeros((), device=device)
    if st.mp_group is not None and st.tp * st.pp > 1:
        dist.all_reduce(sq, group=st.mp_group)
    return sq.sqrt()


def clip_coefficient(total_norm: float, max_norm: float) -> float:
    """Multiply grads by this to clip (1.0 when the norm is already small enough)."""
    if max_norm <= 0:
        return 1.0
    return min(1.0, max_norm / (total_norm + 1e-6))
