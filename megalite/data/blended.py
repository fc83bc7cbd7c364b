"""Blend several datasets by weight (Megatron's --data-path 0.3 A 0.7 B).

Global sample i is assigned to one dataset by the chairman-assignment rule (Tijdeman, 1980):
among the datasets at least delta = 1/(2D-2) samples behind their share after sample i, the one
that would fall a whole sample behind soonest. Every prefix of the blend then holds, for each
dataset d, within 1 - delta < 1 sample of weight_d * n. (Megatron's plain "largest deficit"
greedy can drift to 1.3 samples with skewed weights; this rule cannot.)

The assignment is sequential by nature, so it runs in C++ (csrc/data_index.cpp, reached through
ctypes in the megalite._C library) when that is built, and in plain Python otherwise; both give
bit-identical results. Indices are cached as `.npy` like GPTDataset's.
"""

import ctypes
import importlib.util
import logging
import math
import os
import time

import numpy as np

from megalite.data.gpt_dataset import INDEX_FORMAT, CachedIndices, IndexCache
from megalite.errors import MegaliteError

logger = logging.getLogger("megalite.data")

_native_fn = None


def _native():
    """The C++ kernel from megalite._C, or None (not built, or MEGALITE_KERNELS=reference)."""
    global _native_fn
    if os.environ.get("MEGALITE_KERNELS", "").lower() == "reference":
        return None
    if _native_fn is None:
        _native_fn = False
        try:
            spec = importlib.util.find_spec("megalite._C")
            if spec is not None and spec.origin:
                import torch  # noqa: F401  -- megalite._C links libtorch; load it first

                _native_fn = load_blending_kernel(spec.origin)
        except (ImportError, OSError, AttributeError):
            _native_fn = False
    return _native_fn or None


def load_blending_kernel(library_path):
    """`megalite_build_blending_indices` from a shared library (tests load a standalone build)."""
    fn = ctypes.CDLL(library_path).megalite_build_blending_indices
    fn.restype = ctypes.c_int64
    fn.argtypes = [
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_void_p,
        ctypes.c_void_p,
    ]
    return fn


def _blend_python(weights, size, dataset_index, dataset_sample_index):
    # Mirrors csrc/data_index.cpp operation for operation, so both round identically.
    w = [float(x) for x in weights]
    num = len(w)
    delta = 1.0 / (2 * num - 2) if num > 1 else 0.5
    counts = [0] * num
    for i in range(size):
        n = float(i + 1)
        best, best_deadline = -1, 0.0
        for d in range(num):
            if w[d] > 0.0 and w[d] * n - counts[d] >= delta:
                deadline = (counts[d] + 1 - delta) / w[d]
                if best < 0 or deadline < best_deadline:
                    best, best_deadline = d, deadline
        if best < 0:  # only reachable through rounding: fall back to the largest deficit
            best = max(range(num), key=lambda d: (w[d] * n - counts[d], -d))
        dataset_index[i] = best
        dataset_sample_index[i] = counts[best]
        counts[best] += 1


def build_blending_indices(weights, size, kernel=None):
    """(dataset_index int16[size], dataset_sample_index int64[size]) for normalised weights."""
    weights = np.ascontiguousarray(weights, dtype=np.float64)
    if len(weights) > np.iinfo(np.int16).max:
        raise MegaliteError(f"{len(weights)} datasets in one blend; at most 32767 are supported")
    dataset_index = np.zeros(size, dtype=np.int16)
    dataset_sample_index = np.zeros(size, dtype=np.int64)
    kernel = kernel if kernel is not None else _native()
    if kernel:
        rc = kernel(
            weights.ctypes.data,
            len(weights),
            size,
            dataset_index.ctypes.data,
            dataset_sample_index.ctypes.data,
        )
        if rc != 0:
            raise RuntimeError(f"megalite_build_blending_indices failed with code {rc}")
    else:
        if size > 2_000_000:
            logger.warning("megalite._C not built: blending %d samples in Python (slow)", size)
        _blend_python(weights, size, dataset_index, dataset_sample_index)
    return dataset_index, dataset_sample_index


def blend_weights(weights, temperature=1.0):
    """Effective proportions: w_i^(1/T) normalised (weights: the blend's weights or the
    datasets' token counts). T > 1 flattens the blend (small datasets are upsampled), T < 1
    sharpens it; a weight of 0 stays 0."""
    w = np.asarray(weights, dtype=np.float64)
    if (w < 0).any() or not np.isfinite(w).all() or w.sum() <= 0:
        raise MegaliteError(
            f"blend weights {w.tolist()} must be non-negative, finite and not all zero"
        )
    if not (math.isfinite(temperature) and temperature > 0):
        raise MegaliteError(f"the blend temperature must be positive, got {temperature}")
    w = w / w.max()  # token counts can be large: w^(1/T) on [0, 1]
    if temperature != 1.0:
        w = np.where(w > 0, w ** (1.0 / temperature), 0.0)
    return w / w.sum()


class BlendedDataset(CachedIndices):
    """Item i -> datasets[dataset_index[i]][dataset_sample_index[i]]; len = size exactly."""

    KINDS = ("dataset_index", "dataset_sample_index")

    def __init__(self, datasets, weights, size, cache_dir, split_name="train", allow_build=True,
                 names=None, origin=None):  # fmt: skip
        if len(datasets) != len(weights) or not datasets:
            raise ValueError("need one weight per dataset")
        weights = np.asarray(weights, dtype=np.float64)
        if (weights < 0).any() or weights.sum() <= 0:
            raise MegaliteError(
                f"blend weights {weights.tolist()} must be non-negative and not all zero"
            )
        self.datasets = list(datasets)
        self.weights = weights / weights.sum()
        self.names = list(names) if names is not None else [repr(d) for d in self.datasets]
        self.origin = origin  # how the weights came about, for describe()
        self.size = int(size)
        self.split_name = split_name
        # The assignment depends only on the weights and the size.
        key = {
            "class": "BlendedDataset",
            "format": INDEX_FORMAT,
            "weights": [float.hex(float(w)) for w in self.weights],
            "size": self.size,
        }
        self.cache = IndexCache(cache_dir, key, split_name, self.KINDS)
        arrays = self.cache.load()
        if arrays is None:
            if not allow_build:
                raise MegaliteError(
                    f"blend cache {self.cache.description} missing; it should have been built by "
                    "rank 0"
                )
            t0 = time.perf_counter()
            di, dsi = build_blending_indices(self.weights, self.size)
            self.cache.save(
                {"dataset_index": di, "dataset_sample_index": dsi},
                {"split": split_name, "build_seconds": round(time.perf_counter() - t0, 3)},
            )
            arrays = self.cache.load() or {"dataset_index": di, "dataset_sample_index": dsi}
        self.dataset_index = arrays["dataset_index"]
        self.dataset_sample_index = arrays["dataset_sample_index"]
        # Each dataset must hold every sample the blend asks of it.
        counts = np.bincount(self.dataset_index, minlength=len(self.datasets))
        for d, (ds, need) in enumerate(zip(self.datasets, counts)):
            if need > len(ds):
                raise MegaliteError(
                    f"blend needs {need} samples from {ds!r} which has {len(ds)}; build it with "
                    "more samples"
                )

    def __len__(self):
        return self.size

    def __getitem__(self, idx):
        idx = int(idx)
        if not 0 <= idx < self.size:
            raise IndexError(f"sample {idx} out of range for {self.size} samples")
        return self.datasets[int(self.dataset_index[idx])][int(self.dataset_sample_index[idx])]

    def describe(self):
        """One line: every dataset's effective proportion (and what it was made from)."""
        o = self.origin or {}
        how = []
        if o.get("by_tokens"):
            how.append("by token counts")
        if o.get("temperature", 1.0) != 1.0:
            how.append(f"temperature {o['temperature']:g}")
        base = o.get("base")
        parts = []
        for i, (name, w) in enumerate(zip(self.names, self.weights)):
            was = ""
            if base is not None and o.get("by_tokens"):
                was = f" ({o['tokens'][i]:,} tokens, {base[i]:.4f} by size)"
            elif base is not None and o.get("temperature", 1.0) != 1.0:
                was = f" (weight {base[i]:.4f})"
            parts.append(f"{name} {w:.4f}{was}")
        head = f"data blend ({self.split_name}, {self.size:,} samples"
        head += (", " + ", ".join(how)) if how else ""
        return head + "): " + "; ".join(parts)

    def __repr__(self):
        weights = np.round(self.weights, 4).tolist()
        return f"BlendedDataset({self.split_name}, {self.size} samples, weights {weights})"
