"""The sum of squares over a list of tensors: the one pass of the global gradient norm.

On the CPU torch._foreach_norm reduces one tensor at a time at well under the memory bandwidth;
the C++ kernel is one read sweep over the whole list (2.3x faster for 50M fp32 grads in 50
tensors, see tools/bench/kernels.py), summed in double in a fixed block order, so the result is
the same for any thread count. On CUDA torch's multi-tensor _foreach_norm is already one launch
over the list, and it is what runs.
"""

import torch

from megalite.ops import reference
from megalite.ops.dispatch import choose

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def sum_of_squares(tensors) -> torch.Tensor:
    """sum(x * x) over every element of every tensor, as a 0-dim fp32 tensor on their device
    (an inf or nan anywhere makes it inf or nan)."""
    tensors = [t for t in tensors if t.numel()]
    if not tensors:
        return torch.zeros(())
    device = tensors[0].device
    _, module, _ = choose("sum_of_squares", device)
    if module is None:
        return reference.sum_of_squares(tensors)
    fast, rest = [], []
    for t in tensors:  # the kernel takes contiguous fp32/bf16/fp16; the rest goes to torch
        (fast if t.is_contiguous() and t.dtype in _DTYPES and t.device == device else rest).append(
            t
        )
    total = torch.tensor(module.sum_of_squares(fast), dtype=torch.float32, device=device)
    return total + reference.sum_of_squares(rest).to(device) if rest else total
