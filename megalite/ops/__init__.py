"""Python face of megalite's kernels.

Every op dispatches CUDA kernel -> C++ kernel -> pure-PyTorch reference (see dispatch.py);
`MEGALITE_KERNELS=reference` forces the reference and `kernel_report()` says what runs where.
"""

from megalite.ops.adamw import fused_adamw_, multi_tensor_adamw_
from megalite.ops.bucketing import assign_buckets, flatten_into, unflatten_from
from megalite.ops.dispatch import kernel_report
from megalite.ops.reductions import sum_of_squares
from megalite.ops.norms import FusedLayerNorm, FusedRMSNorm, layer_norm, rms_norm

__all__ = [
    "layer_norm", "rms_norm", "FusedLayerNorm", "FusedRMSNorm",
    "fused_adamw_", "multi_tensor_adamw_",
    "assign_buckets", "flatten_into", "unflatten_from", "sum_of_squares",
    "kernel_report",
]
