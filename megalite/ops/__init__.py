"""Python face of megalite's kernels.

Every op dispatches CUDA kernel -> C++ kernel -> pure-PyTorch reference (see dispatch.py);
`MEGALITE_KERNELS=reference` forces the reference and `kernel_report()` says what runs where.
"""

from megalite.ops.activations import gelu_tanh, swiglu
from megalite.ops.adamw import fused_adamw_, multi_tensor_adamw_
from megalite.ops.bucketing import flatten_into, unflatten_from
from megalite.ops.dispatch import kernel_report
from megalite.ops.linear import linear
from megalite.ops.norms import FusedLayerNorm, FusedRMSNorm, layer_norm, rms_norm
from megalite.ops.reductions import sum_of_squares

__all__ = [
    "FusedLayerNorm",
    "FusedRMSNorm",
    "flatten_into",
    "fused_adamw_",
    "gelu_tanh",
    "kernel_report",
    "layer_norm",
    "linear",
    "multi_tensor_adamw_",
    "rms_norm",
    "sum_of_squares",
    "swiglu",
    "unflatten_from",
]
