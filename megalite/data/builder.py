"""build_train_valid_test_datasets: --data-path + --split -> (train, valid, test) datasets.

In a distributed run rank 0 of `group` builds every index (and writes the cache) while the other
ranks wait in a broadcast; then they memory-map what rank 0 wrote. A failure on rank 0 is
broadcast, so every rank raises it and none hangs; a failure while loading on any rank is
all-gathered likewise. A rank that finds no cache after rank 0 succeeded (cache directory not
shared between nodes) builds its own copy, which is identical because the build is deterministic.
"""

import math
import operator
import os
import sys

from megalite.data.blended import BlendedDataset, blend_weights
from megalite.data.gpt_dataset import (
    SPLIT_NAMES,
    GPTDataset,
    data_path_has_weights,
    default_cache_dir,
    parse_data_path,
    parse_split,
    split_document_ranges,
)
from megalite.data.indexed import IndexedDataset
from megalite.errors import MegaliteError

# Megatron's margin: each blended dataset is built with 0.5% more samples than its share.
BLEND_MARGIN = 1.005


def _as_int(x):
    try:
        return operator.index(x)  # int, numpy integers; not floats or bools-as-strings
    except TypeError:
        return None


def _check_args(split, seq_length, num_samples, seed):
    if _as_int(seq_length) is None or seq_length < 1:
        raise MegaliteError(f"seq_length must be a positive integer, got {seq_length!r}")
    num_samples = tuple(num_samples)
    if len(num_samples) != 3 or any(_as_int(n) is None or n < 0 for n in num_samples):
        raise MegaliteError(
            "num_samples must be three non-negative integers (train, valid, test), got "
            f"{num_samples!r}"
        )
    if _as_int(seed) is None or not 0 <= seed < 2**32:
        raise MegaliteError(f"seed must be an integer in [0, 2**32), got {seed!r}")
    return parse_split(split), tuple(int(n) for n in num_samples)


def _materialize(prefixes, weights, split_weights, seq_length, num_samples, seed, cache_dir,
                 temperature=1.0, by_tokens=False):  # fmt: skip
    """Open the shards and build or load every index; the same on every rank."""
    indexed = {p: IndexedDataset(p) for p in prefixes}
    tokens = [indexed[p].num_tokens for p in prefixes]
    base = weights
    if by_tokens or temperature != 1.0:  # (otherwise the weights as given, to the last bit)
        base = blend_weights(tokens) if by_tokens else weights
        weights = blend_weights(base, temperature).tolist()
    result = []
    for s, name in enumerate(SPLIT_NAMES):
        if num_samples[s] == 0 or split_weights[s] == 0:
            result.append(None)
            continue
        parts, kept = [], []
        for k, (prefix, w) in enumerate(zip(prefixes, weights)):
            if w == 0:
                continue
            kept.append(k)
            ds = indexed[prefix]
            (begin, end), n = split_part(prefix, ds.num_documents, split_weights, s, w,
                                         num_samples[s], len(prefixes) > 1)  # fmt: skip
            parts.append(
                (GPTDataset(ds, name, (begin, end), seq_length, max(n, 1), seed, cache_dir), w)
            )
        if len(parts) == 1:
            result.append(parts[0][0])
        else:
            blend_dir = cache_dir or default_cache_dir(prefixes[0])
            origin = {
                "temperature": temperature,
                "by_tokens": by_tokens,
                "base": [float(base[k]) for k in kept],
                "tokens": [tokens[k] for k in kept],
            }
            result.append(
                BlendedDataset(
                    [p[0] for p in parts],
                    [p[1] for p in parts],
                    num_samples[s],
                    blend_dir,
                    name,
                    names=[os.path.basename(prefixes[k]) for k in kept],
                    origin=origin,
                )
            )
    return tuple(result)


def _describe(err):
    msg = str(err) if isinstance(err, MegaliteError) else f"{type(err).__name__}: {err}"
    return " ".join(msg.split()) or type(err).__name__


def _distributed():
    """torch.distributed when a process group is up (torch is never imported just to ask)."""
    if "torch" not in sys.modules:
        return None
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def build_train_valid_test_datasets(
    data_path,
    split,
    seq_length,
    num_samples,
    seed,
    cache_dir=None,
    group=None,
    blend_temperature=1.0,
    blend_by_tokens=False,
):
    """(train, valid, test): GPTDataset, BlendedDataset or None (weight 0 or 0 samples).

    data_path: Megatron style ['0.3', 'A', '0.7', 'B'], ['A'] or ['A', 'B']; split: '969,30,1';
    num_samples: (train, valid, test); group: the torch.distributed group whose rank 0 builds
    the indices (None: the world, when initialised). The blend samples dataset i in proportion
    to w_i^(1/blend_temperature), w being the weights or, with blend_by_tokens, the datasets'
    token counts (blend_weights); the order is a function of those proportions and the sizes
    alone, so it is the same on every rank and after a resume.
    """
    prefixes, weights = parse_data_path(data_path)
    if blend_by_tokens and data_path_has_weights(data_path):
        raise MegaliteError(
            "--data-blend-by-tokens takes the blend weights from the datasets' token counts; "
            "give --data-path the prefixes alone"
        )
    if not (math.isfinite(blend_temperature) and blend_temperature > 0):
        raise MegaliteError(
            f"--data-blend-temperature must be a positive number, got {blend_temperature}"
        )
    split_weights, num_samples = _check_args(split, seq_length, num_samples, seed)
    seq_length, seed = int(seq_length), int(seed)
    args = (prefixes, weights, split_weights, seq_length, num_samples, seed, cache_dir,
            float(blend_temperature), bool(blend_by_tokens))  # fmt: skip

    return rank0_first(_materialize, args, group, "data")


def split_part(prefix, num_documents, split_weights, s, weight, num_samples, blended,
               what="documents"):  # fmt: skip
    """((begin, end) documents of split s of one dataset, samples to build from it): all
    of num_samples alone, its share (plus BLEND_MARGIN) in a blend. An empty needed split is
    one line."""
    begin, end = split_document_ranges(num_documents, split_weights)[s]
    name = SPLIT_NAMES[s]
    if end <= begin:
        raise MegaliteError(
            f"the {name} split of {prefix} is empty ({num_documents} {what}, split weights "
            f"{[round(x, 4) for x in split_weights]}); raise its --split weight or request no "
            f"{name} samples"
        )
    n = int(math.ceil(num_samples * weight * BLEND_MARGIN)) if blended else num_samples
    return (begin, end), n


def rank0_first(materialize, args, group=None, what="data"):
    """materialize(*args) on rank 0 of `group` first (it builds the index caches), then on
    the others (they load them, or build an identical copy where the cache directory is not
    shared); a failure on any rank is raised on every rank. Without torch.distributed: just
    materialize(*args)."""
    dist = _distributed()
    if dist is None:
        return materialize(*args)
    group = group if group is not None else dist.group.WORLD
    rank = dist.get_rank(group)
    src = dist.get_global_rank(group, 0)
    result, error = None, None
    status = [None]
    if rank == 0:
        try:
            result = materialize(*args)
        except Exception as e:  # noqa: BLE001 -- every failure must reach the other ranks
            error = e
            status = [_describe(e)]
    dist.broadcast_object_list(status, src=src, group=group)
    if status[0] is not None:
        if error is not None:
            raise error
        raise MegaliteError(f"rank {src} failed to build the {what} indices: {status[0]}")

    if rank != 0:
        try:
            result = materialize(*args)
        except Exception as e:  # noqa: BLE001
            error = e
    statuses = [None] * dist.get_world_size(group)
    mine = None if error is None else (dist.get_rank(), _describe(error))
    dist.all_gather_object(statuses, mine, group=group)
    failed = [s for s in statuses if s is not None]
    if failed:
        if error is not None:
            raise error
        r, msg = failed[0]
        raise MegaliteError(f"rank {r} failed to load the {what} indices: {msg}")
    return result
