"""Builds megalite and its compiled kernels.

megalite._C    C++ CPU kernels (csrc/*.cpp), always built; a compile error fails the install.
megalite._cuda CUDA kernels (csrc/cuda/*.cu + the thin torch binding csrc/cuda/*.cpp), built when
               torch has CUDA and nvcc is found; MEGALITE_BUILD_CUDA=1 forces it (and fails
               loudly if it cannot), =0 skips it.

Install with `pip install --no-build-isolation -e .` so the build uses the torch you have.

No -march=native: the hot loops are compiled for several ISAs and picked at run time
(see csrc/megalite.h), so a wheel built here runs on any x86-64. CUDA code is compiled for
sm_80 and sm_90 (plus PTX for newer GPUs) unless TORCH_CUDA_ARCH_LIST says otherwise.
"""

import glob
import os
import re
import shutil
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
CUDA_ARCHS = ["80", "90"]


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
    from torch.utils.cpp_extension import CUDA_HOME

    if not (
        shutil.which("nvcc")
        or (CUDA_HOME and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")))
    ):
        problems.append("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    if problems and flag == "1":
        _fail("MEGALITE_BUILD_CUDA=1 but " + "; ".join(problems))
    return not problems, "; ".join(problems)


def cuda_extension():
    from torch.utils.cpp_extension import CUDAExtension

    sources = sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
    nvcc = list(NVCC_FLAGS)
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        for arch in CUDA_ARCHS:
            nvcc.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
        nvcc.append(f"-gencode=arch=compute_{CUDA_ARCHS[-1]},code=compute_{CUDA_ARCHS[-1]}")
    return CUDAExtension(
        "megalite._cuda",
        sources,
        include_dirs=[os.path.join(HERE, "csrc", "cuda")],
        extra_compile_args={"cxx": ["-O3", "-Wall"], "nvcc": nvcc},
    )


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
    install_requires=["torch>=2.1", "numpy", "pyyaml", "sentencepiece", "tqdm"],
    extras_require={"dev": ["pytest", "psutil"], "tensorboard": ["tensorboard"]},
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExtension},
)
