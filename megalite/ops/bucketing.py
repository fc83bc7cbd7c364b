"""Flat buffers: copying a list of tensors into and out of one flat buffer.

(Which params share a data-parallel grad bucket is bookkeeping over sizes: `assign_buckets`
in megalite/parallel/ddp.py.) flatten_into / unflatten_from move a list of tensors
into and out of a flat buffer with one call (one multi-tensor kernel instead of one copy per
tensor: it matters for models with hundreds of small params).
"""

import torch

from megalite.ops import reference
from megalite.ops.dispatch import choose


def _module(tensors, buffer):
    _, module, _ = choose("flatten", buffer.device)
    return module


def flatten_into(tensors, buffer):
    """Copy tensors back to back into the preallocated flat 1-D buffer (same dtype and device).
    The buffer may be longer than the tensors (padding is left alone)."""
    tensors = list(tensors)
    module = _module(tensors, buffer)
    if module is None:
        return reference.flatten_into(tensors, buffer)
    reference._check_flat(tensors, buffer, "flatten_into")
    with torch.no_grad():
        module.flatten_into(tensors, buffer)


def unflatten_from(buffer, tensors):
    """Copy the flat buffer back out into tensors, the inverse of flatten_into."""
    tensors = list(tensors)
    module = _module(tensors, buffer)
    if module is None:
        return reference.unflatten_from(buffer, tensors)
    reference._check_flat(tensors, buffer, "unflatten_from")
    with torch.no_grad():
        module.unflatten_from(buffer, tensors)
