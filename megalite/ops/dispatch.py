"""Which implementation runs each op: CUDA kernel, C++ kernel, or the pure-PyTorch reference.

Order: the CUDA kernel when the tensors are on a CUDA device and `megalite._cuda` was built,
then the C++ kernel (`megalite._C`) for CPU tensors, then `megalite.ops.reference`.
`MEGALITE_KERNELS=reference` forces the reference everywhere (read at call time, so a test or a
debugging session can flip it without re-importing). `kernel_report()` says what each op uses
and, when it is not the fastest, why; `python -m megalite.env` prints it.
"""

import importlib
import os

import torch

# The ops megalite compiles, each with the function names it needs in the extension modules.
OPS = {
    "layer_norm": ("layer_norm_fwd", "layer_norm_bwd"),
    "rms_norm": ("rms_norm_fwd", "rms_norm_bwd"),
    "fused_adamw": ("fused_adamw",),
    "flatten": ("flatten_into", "unflatten_from"),
    "sum_of_squares": ("sum_of_squares",),
    "gelu_tanh": ("gelu_tanh_fwd", "gelu_tanh_bwd"),
    "swiglu": ("swiglu_fwd", "swiglu_bwd"),
}
# Ops whose CUDA path is torch's own kernel: sum_of_squares' multi-tensor _foreach_norm (already
# one launch over the list); the activations' F.gelu / F.silu * up (megalite has no CUDA kernel).
TORCH_ON_CUDA = {"sum_of_squares", "gelu_tanh", "swiglu"}


def _try_import(name):
    """Import an extension module; return (module, None) or (None, why it is missing)."""
    try:
        return importlib.import_module(f"megalite.{name}"), None
    except ImportError as e:
        return None, f"megalite.{name} not importable ({e})"


_C, _C_ERROR = _try_import("_C")
if _C is None:
    _C_ERROR = (
        "C++ kernels not built: " + _C_ERROR + "; run `pip install --no-build-isolation -e .`"
    )

if not torch.cuda.is_available() and torch.version.cuda is None:
    _cuda, _CUDA_ERROR = None, "CUDA kernels not built: torch has no CUDA"
else:
    _cuda, _CUDA_ERROR = _try_import("_cuda")
    if _cuda is None:
        _CUDA_ERROR = (
            "CUDA kernels not built: "
            + _CUDA_ERROR
            + " (needs nvcc at install time; MEGALITE_BUILD_CUDA=1 forces the build)"
        )


def forced_reference():
    return os.environ.get("MEGALITE_KERNELS", "").strip().lower() == "reference"


def _has(module, op):
    return module is not None and all(hasattr(module, fn) for fn in OPS[op])


def choose(op, device=None):
    """Return ('cuda'|'cpp'|'torch'|'reference', module or None, reason) for `op` on `device`
    ('torch': torch's own kernel is the fast path, run through the reference code).

    reason is '' when the fastest implementation for that device is used, otherwise why not."""
    if forced_reference():
        return "reference", None, "MEGALITE_KERNELS=reference"
    device = torch.device("cpu") if device is None else torch.device(device)
    if device.type == "cuda" and op in TORCH_ON_CUDA:
        return "torch", None, ""
    if device.type == "cuda":
        if _has(_cuda, op):
            return "cuda", _cuda, ""
        why = _CUDA_ERROR or f"megalite._cuda has no {op} kernel (rebuild the extension)"
        return "reference", None, why
    if device.type != "cpu":
        return "reference", None, f"no compiled kernel for device type {device.type}"
    if _has(_C, op):
        return "cpp", _C, ""
    why = _C_ERROR or f"megalite._C has no {op} kernel (rebuild the extension)"
    return "reference", None, why


def cpu_isa():
    """Which ISA clone of the C++ kernels runs on this CPU (None without megalite._C)."""
    return _C.cpu_isa() if _C is not None and hasattr(_C, "cpu_isa") else None


def kernel_report():
    """One dict per op: {'op', 'impl', 'reason'} for the device a model would use here
    (CUDA when available, else CPU). reason says why a faster implementation is not used."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    report = []
    for op in OPS:
        impl, _, reason = choose(op, device)
        if not reason and impl == "cpp":
            reason = _CUDA_ERROR or "no CUDA device"
            if cpu_isa():
                reason += f" (CPU kernels: {cpu_isa()} clones)"
        report.append({"op": op, "impl": impl, "reason": reason})
    # linear is no compiled kernel: oneDNN's GEMM or torch's F.linear (megalite/ops/linear.py).
    from megalite.ops.linear import impl_report

    impl, reason = impl_report()
    report.append({"op": "linear", "impl": impl, "reason": reason})
    return report
