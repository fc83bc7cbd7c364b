"""Gradient bucketing: which params share a bucket, and copying tensors in and out of flat buffers.

The data-parallel grad buffer lays params out in reverse order of use (the order backward
produces their grads) and cuts the buffer into buckets, so the all-reduce of the first bucket
overlaps with the rest of the backward. flatten_into / unflatten_from move a list of tensors
into and out of a flat buffer with one call (one multi-tensor kernel instead of one copy per
tensor: it matters for models with hundreds of small params).
"""

import torch

from megalite.ops import reference
from megalite.ops.dispatch import choose


def assign_buckets(numels, dtypes, bucket_size_numel):
    """Group params (given in reverse order of use) into buckets of at least bucket_size_numel
    elements (the last bucket of each dtype may be smaller); buckets never mix dtypes.
    Returns a list of buckets, each a list of param indices, ordered by their first index."""
    numels = [int(n) for n in numels]
    dtypes = list(dtypes)
    bucket_size_numel = int(bucket_size_numel)
    _, module, _ = choose("assign_buckets")
    if module is None:
        return reference.assign_buckets(numels, dtypes, bucket_size_numel)
    if len(numels) != len(dtypes):
        raise ValueError(f"assign_buckets: {len(numels)} numels but {len(dtypes)} dtypes")
    # The kernel only needs to tell dtypes apart: number them in order of first appearance.
    ids = {}
    dtype_ids = [ids.setdefault(dt, len(ids)) for dt in dtypes]
    return module.assign_buckets(numels, dtype_ids, bucket_size_numel)


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
