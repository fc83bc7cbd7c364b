"""Data parallelism: averaging grads over data-parallel replicas (plain all-reduce for now).

finalize_model_grads is the one place a step's grads are made consistent before the
optimizer: sequence-parallel partial sums over TP, the tied embedding over the first and last
pipeline stages, then the data-parallel mean.
"""

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from megalite.parallel import state


def _all_reduce_coalesced(grads, group, scale=1.0):
    if not grads:
        return
    flat = _flatten_dense_tensors(grads)
    if scale != 1.0:
        flat.mul_(scale)
    dist.all_reduce(flat, group=group)
    for g, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
        g.copy_(synced)


@torch.no_grad()
def finalize_model_grads(model) -> None:
    st = state.get()
    params = [p for p in model.parameters() if p.grad is not None]
    if st.tp > 1:
        sp = [p.grad for p in params if getattr(p, "sequence_parallel", False)]
        _all_reduce_coalesced(sp, st.tp_group)
    if st.pp > 1 and st.embedding_group is not None and len(st.embedding_ranks) > 1:
        tied = [p.grad for n, p in model.named_parameters() if p.grad is not None and (
            getattr(p, "shared_embedding", False)
            or (n == "embedding.word_embeddings.weight" and not model.cfg.untie_embeddings_and_output_weights))]
        _all_reduce_coalesced(tied, st.embedding_group)
    if st.dp > 1:
        _all_reduce_coalesced([p.grad for p in params], st.dp_group, scale=1.0 / st.dp)
