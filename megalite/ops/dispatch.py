"""Which implementation runs each op: CUDA kernel, C++ kernel, or the pure-PyTorch reference.

Order: the CUDA kernel when the tensors are on a CUDA device, `megalite._cuda` was built and
it holds GPU code that runs on that device (`cuda_code_for`), then the C++ kernel
(`megalite._C`) for CPU tensors, then `megalite.ops.reference`.
`MEGALITE_KERNELS=reference` forces the reference everywhere (read at call time, so a test or a
debugging session can flip it without re-importing). `kernel_report()` says what each op uses
and, when it is not the fastest, why; `python -m megalite.env` prints it.
"""

import importlib
import os
import re

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


def cuda_code_for(capability, compiled):
    """Which of the compiled GPU code (`megalite._cuda.compiled_archs()`: "sm_XY" machine code,
    "compute_XY" PTX) runs on a device of `capability` (major, minor). Returns ("sass", code)
    or ("ptx", code), the best of its kind, machine code first; (None, None) if nothing runs.

    The driver's rules: SASS for X.Y runs on X.Z for Z >= Y (same major); PTX for X.Y is
    compiled at load time for any capability >= X.Y. An "a" arch (sm_90a) runs on its own
    capability only, an "f" arch (sm_100f) within its major."""
    device = tuple(capability)
    best = {}
    for code in compiled:
        m = re.fullmatch(r"(sm|compute)_(\d+)(\d)([af]?)", code)
        if m is None:
            continue
        kind, arch, suffix = ("sass" if m[1] == "sm" else "ptx"), (int(m[2]), int(m[3])), m[4]
        if suffix == "a":
            runs = arch == device
        elif kind == "sass" or suffix == "f":
            runs = arch[0] == device[0] and arch[1] <= device[1]
        else:
            runs = arch <= device
        if runs and (kind not in best or arch > best[kind][0]):
            best[kind] = (arch, code)
    for kind in ("sass", "ptx"):
        if kind in best:
            return kind, best[kind][1]
    return None, None


_CUDA_DEVICE_ROUTES = {}  # device index -> (runs?, detail), fixed once the extension is loaded


def cuda_device_route(index=None):
    """(True, what runs) or (False, why not) for megalite._cuda's kernels on CUDA device
    `index` (None: the current device). Assumes megalite._cuda was imported."""
    try:
        index = torch.cuda.current_device() if index is None else index
        if index not in _CUDA_DEVICE_ROUTES:
            _CUDA_DEVICE_ROUTES[index] = _route(torch.cuda.get_device_capability(index))
    except (RuntimeError, AssertionError) as e:  # no such device, or no driver
        return False, f"no usable CUDA device {index}: {e}"
    return _CUDA_DEVICE_ROUTES[index]


def _route(capability):
    if not hasattr(_cuda, "compiled_archs"):  # built before the archs were recorded: trust it
        return True, "compiled archs not recorded (an older build)"
    compiled = list(_cuda.compiled_archs())
    major, minor = capability
    kind, code = cuda_code_for((major, minor), compiled)
    if kind == "sass":
        return True, f"{code} machine code"
    if kind == "ptx":
        return True, f"{code} PTX, compiled by the driver when first loaded"
    return False, (
        f"megalite._cuda has no GPU code for capability {major}.{minor} (built for "
        f"{' '.join(compiled)}): reinstall with TORCH_CUDA_ARCH_LIST={major}.{minor} and an "
        "nvcc that supports it"
    )


def cuda_device_path(index):
    """('cuda' | 'reference', why) for megalite's CUDA kernels on CUDA device `index`: what
    `python -m megalite.env` prints per GPU."""
    if forced_reference():
        return "reference", "MEGALITE_KERNELS=reference"
    if _cuda is None:
        return "reference", _CUDA_ERROR
    runs, detail = cuda_device_route(index)
    return ("cuda" if runs else "reference"), detail


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
        if not _has(_cuda, op):
            why = _CUDA_ERROR or f"megalite._cuda has no {op} kernel (rebuild the extension)"
            return "reference", None, why
        runs, why = cuda_device_route(device.index)
        return ("cuda", _cuda, "") if runs else ("reference", None, why)
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
