"""Builds megalite and its compiled kernels.

megalite._C    C++ CPU kernels (csrc/*.cpp), always built; a compile error fails the install.
megalite._cuda CUDA kernels (csrc/cuda/*.cu + the thin torch binding csrc/cuda/*.cpp), built when
               torch has CUDA and nvcc is found; MEGALITE_BUILD_CUDA=1 forces it (and fails
               loudly if it cannot), =0 skips it.

Install with `pip install --no-build-isolation -e .` so the build uses the torch you have.

No -march=native: the hot loops are compiled for several ISAs and picked at run time
(see csrc/megalite.h), so a wheel built here runs on any x86-64.

CUDA code is compiled to machine code (SASS) for compute capabilities 7.0, 7.5, 8.0, 8.6, 8.9
and 9.0 (V100, T4, A100, A10/RTX 30xx, L4/L40/RTX 40xx, H100/H200), each one only where the
installed nvcc still supports it (`nvcc --list-gpu-arch`: CUDA 13 dropped 7.0, so with it the
list starts at 7.5), plus PTX of the newest (compute_90), which the driver compiles at load time
for newer GPUs. TORCH_CUDA_ARCH_LIST (torch's syntax, e.g. "8.0;9.0+PTX") replaces the list.
What was built is recorded in the module (megalite._cuda.compiled_archs()); a GPU that none of
it runs on gets the reference kernels instead (megalite/ops/dispatch.py), and
`python -m megalite.env` says which path each GPU takes.
"""

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

try:
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError:
    sys.exit(
        "megalite builds its kernels against the torch you have installed, and this build "
        "environment has none: install torch first, then `pip install "
        "--no-build-isolation -e .`"
    )

HERE = os.path.dirname(os.path.abspath(__file__))

# -fopenmp: at::parallel_for is a header template whose OpenMP pragma must be compiled here; the
# libgomp it links is the one torch has already loaded, so there is one thread pool, not two.
# -fno-math-errno lets sqrt vectorise; -ffp-contract=off keeps results identical whichever ISA
# clone runs (no FMA in one clone and not in another).
CXX_FLAGS = [
    "-O3",
    "-fopenmp",
    "-fno-math-errno",
    "-ffp-contract=off",
    "-Wall",
    "-Wno-unknown-pragmas",
]
NVCC_FLAGS = ["-O3", "-lineinfo"]  # no --use_fast_math: the optimizer wants IEEE sqrt and division
# Compute capabilities that get machine code (see the docstring); the last one also gets PTX.
CUDA_ARCHS = ["7.0", "7.5", "8.0", "8.6", "8.9", "9.0"]


def _fail(msg):
    sys.exit(f"megalite setup: {msg}")


def cpp_extension():
    sources = sorted(glob.glob("csrc/*.cpp"))
    # megalite._C has one module init (csrc/bindings.cpp); a second PYBIND11_MODULE would fail at
    # link time with a cryptic duplicate symbol, so say what to do instead.
    for path in sources:
        if os.path.basename(path) != "bindings.cpp":
            with open(path) as f:
                if re.search(r"^\s*PYBIND11_MODULE\s*\(", f.read(), re.M):
                    _fail(
                        f"{path} defines PYBIND11_MODULE, but csrc/bindings.cpp owns megalite._C's "
                        "module init: register functions with MEGALITE_REGISTER (csrc/megalite.h)"
                    )
    return CppExtension(
        "megalite._C",
        sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args=CXX_FLAGS,
        extra_link_args=["-fopenmp"],
    )


def nvcc_path():
    """The nvcc torch's build uses (CUDA_HOME's), else the one on PATH; None if there is none."""
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        return os.path.join(CUDA_HOME, "bin", "nvcc")
    return shutil.which("nvcc")


def want_cuda():
    """(build?, reason). MEGALITE_BUILD_CUDA=1 turns every missing piece into an error."""
    import torch

    flag = os.environ.get("MEGALITE_BUILD_CUDA", "").strip()
    if flag not in ("", "0", "1"):
        _fail(f"MEGALITE_BUILD_CUDA must be 0 or 1, got {flag!r}")
    if flag == "0":
        return False, "MEGALITE_BUILD_CUDA=0"
    problems = []
    if torch.version.cuda is None:
        problems.append(f"torch {torch.__version__} has no CUDA")
    if nvcc_path() is None:
        problems.append("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    if problems and flag == "1":
        _fail("MEGALITE_BUILD_CUDA=1 but " + "; ".join(problems))
    return not problems, "; ".join(problems)


def nvcc_capabilities(nvcc):
    """The compute capabilities this nvcc compiles for ({"7.5", "8.0", ...}), from
    `nvcc --list-gpu-arch`; None if it cannot say (an nvcc older than CUDA 11)."""
    try:
        out = subprocess.run(
            [nvcc, "--list-gpu-arch"], capture_output=True, text=True, timeout=120, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return {f"{m[1]}.{m[2]}" for m in re.finditer(r"^compute_(\d+)(\d)$", out, re.M)} or None


def cuda_arch_list(nvcc):
    """The TORCH_CUDA_ARCH_LIST to build: the user's if set, else the CUDA_ARCHS that nvcc
    supports, the newest with +PTX."""
    user = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if user:
        return user
    supported = nvcc_capabilities(nvcc)
    archs = [a for a in CUDA_ARCHS if supported is None or a in supported]
    if not archs:
        _fail(
            f"{nvcc} compiles for none of {', '.join(CUDA_ARCHS)}: set TORCH_CUDA_ARCH_LIST "
            "to the compute capability of your GPU"
        )
    return ";".join(archs[:-1] + [archs[-1] + "+PTX"])


def cuda_arch_flags(arch_list):
    """nvcc's -gencode flags for arch_list, by torch's own rules (named archs, "+PTX"), and the
    GPU code they produce, ordered by capability: "sm_XY" (SASS) and "compute_XY" (PTX)."""
    from torch.utils.cpp_extension import _get_cuda_arch_flags

    saved = os.environ.get("TORCH_CUDA_ARCH_LIST")
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
    try:
        flags = _get_cuda_arch_flags()
    except ValueError as e:
        _fail(f"TORCH_CUDA_ARCH_LIST={arch_list!r}: {e}")
    finally:
        if saved is None:
            del os.environ["TORCH_CUDA_ARCH_LIST"]
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = saved
    codes = {re.fullmatch(r"-gencode=arch=\w+,code=(\w+)", f)[1] for f in flags}
    return flags, sorted(
        codes, key=lambda c: (int(re.search(r"\d+", c)[0]), c.startswith("compute"))
    )


def cuda_build_args():
    """What megalite._cuda is built from: (sources relative to this directory, include dirs,
    cxx flags, nvcc flags, the GPU code compiled: "sm_XY" / "compute_XY"). Also used by
    tests/test_kernels_cuda.py, which builds the same thing by hand where torch has no CUDA."""
    sources = sorted(glob.glob("csrc/cuda/*.cu", root_dir=HERE))
    sources += sorted(glob.glob("csrc/cuda/*.cpp", root_dir=HERE))
    arch_flags, codes = cuda_arch_flags(cuda_arch_list(nvcc_path()))
    # The binding reports what was built (compiled_archs()); '+' separates, nvcc splits on ','.
    record = "-DMEGALITE_CUDA_ARCHS=" + "+".join(codes)
    include_dirs = [os.path.join(HERE, "csrc", "cuda")]
    return (
        sources,
        include_dirs,
        ["-O3", "-Wall", record],
        NVCC_FLAGS + arch_flags + [record],
        codes,
    )


def cuda_extension():
    from torch.utils.cpp_extension import CUDAExtension

    sources, include_dirs, cxx_flags, nvcc_flags, codes = cuda_build_args()
    print(f"megalite setup: building megalite._cuda for {' '.join(codes)}", file=sys.stderr)
    return CUDAExtension(
        "megalite._cuda",
        sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
    )


if __name__ == "__main__":  # (tests import this file for its functions)
    ext_modules = [cpp_extension()]
    build_cuda, why_not = want_cuda()
    if build_cuda:
        ext_modules.append(cuda_extension())
    else:
        print(f"megalite setup: not building megalite._cuda ({why_not})", file=sys.stderr)

    setup(
        name="megalite",
        version="0.1.0",
        description="Megatron-style 3D-parallel GPT pretraining on torch.distributed",
        packages=find_packages(include=["megalite", "megalite.*"]),
        python_requires=">=3.10",
        install_requires=["torch>=2.1", "numpy", "pyyaml", "sentencepiece", "tqdm", "safetensors"],
        extras_require={"dev": ["pytest", "psutil"], "tensorboard": ["tensorboard"]},
        ext_modules=ext_modules,
        cmdclass={"build_ext": BuildExtension},
    )
