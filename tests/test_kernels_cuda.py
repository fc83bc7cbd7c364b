"""CUDA kernels.

Wherever nvcc exists, GPU or not: megalite._cuda is built as setup.py builds it (torch's nvcc
flags and arch-flag rules, every arch setup.py compiles, the binding against torch's headers),
linked and imported; the multi-tensor launcher's bookkeeping runs on the host; and the choice
between a GPU's kernels and the reference (its capability against the archs compiled) is checked
as a pure function.

On a CUDA machine megalite._cuda must have been built (a missing build fails, it does not skip),
and every kernel is checked against torch's own ops (F.layer_norm / F.rms_norm and their autograd
in float64, torch.optim.AdamW, plain copies) at sizes that reach the multi-block paths: norms up
to 20000 x 4096 and 9 x 40001, multi-tensor launches of well over 320 chunks and 24 tensors.
CUDA and CPU results agree to tolerance, not bit for bit: nvcc contracts a * b + c into FMAs,
while the CPU kernels are built with -ffp-contract=off.
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import types

import pytest
import torch
from test_kernels_adamw import assert_adamw_close, torch_adamw
from test_kernels_norms import assert_norm_close, torch_layer_norm, torch_rms_norm

import megalite.ops as ops
from megalite import env
from megalite.ops import dispatch, norms

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_DIR = os.path.join(ROOT, "csrc", "cuda")
NVCC = shutil.which("nvcc") or (
    os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc") if os.environ.get("CUDA_HOME") else None
)
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found")
# The ops megalite._cuda implements (the others run torch's own kernels on CUDA).
CUDA_OPS = [op for op in dispatch.OPS if op not in dispatch.TORCH_ON_CUDA]


@pytest.fixture(scope="module")
def setup_py():
    """setup.py as a module (its `if __name__ == "__main__"` part, the build, does not run)."""
    spec = importlib.util.spec_from_file_location("megalite_setup", os.path.join(ROOT, "setup.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---- which GPUs get the CUDA kernels ----------------------------------------------------------

# What setup.py builds with CUDA 13's nvcc (which has no sm_70 any more).
CUDA13_BUILD = ["sm_75", "sm_80", "sm_86", "sm_89", "sm_90", "compute_90"]


@pytest.mark.parametrize(
    "capability, compiled, expected",
    [
        ((9, 0), CUDA13_BUILD, ("sass", "sm_90")),  # H100/H200
        ((8, 0), CUDA13_BUILD, ("sass", "sm_80")),
        ((8, 7), CUDA13_BUILD, ("sass", "sm_86")),  # 8.6 machine code runs on 8.7
        ((7, 5), CUDA13_BUILD, ("sass", "sm_75")),
        ((7, 0), CUDA13_BUILD, (None, None)),  # V100: no machine code, PTX 9.0 > 7.0
        ((10, 0), CUDA13_BUILD, ("ptx", "compute_90")),  # B200: the driver compiles the PTX
        ((12, 0), CUDA13_BUILD, ("ptx", "compute_90")),
        ((10, 0), ["sm_80", "sm_90"], (None, None)),  # no PTX: nothing for a newer major
        ((8, 6), ["sm_80", "sm_90"], ("sass", "sm_80")),
        ((7, 5), ["sm_80", "compute_80"], (None, None)),  # PTX runs on >= its arch only
        ((8, 9), ["sm_80", "compute_86"], ("sass", "sm_80")),  # machine code before PTX
        ((9, 0), ["sm_80", "compute_86"], ("ptx", "compute_86")),
        ((9, 0), ["sm_90a"], ("sass", "sm_90a")),
        ((10, 0), ["sm_90a", "compute_90a"], (None, None)),  # "a": its own capability only
        ((10, 3), ["sm_100f"], ("sass", "sm_100f")),  # "f": its major
        ((12, 0), ["sm_100f"], (None, None)),
        ((9, 0), [], (None, None)),
    ],
)
def test_cuda_code_for_capability(capability, compiled, expected):
    assert dispatch.cuda_code_for(capability, compiled) == expected


def _fake_cuda_machine(monkeypatch, capabilities, compiled=CUDA13_BUILD):
    """dispatch and env as on a machine with GPUs of these capabilities and a megalite._cuda
    built for `compiled` (a stand-in module with the kernel names)."""
    fake = types.SimpleNamespace(
        compiled_archs=lambda: list(compiled),
        **{fn: None for op in CUDA_OPS for fn in dispatch.OPS[op]},
    )
    monkeypatch.delenv("MEGALITE_KERNELS", raising=False)
    monkeypatch.setattr(dispatch, "_cuda", fake)
    monkeypatch.setattr(dispatch, "_CUDA_DEVICE_ROUTES", {})
    monkeypatch.setattr(norms, "_MODULES", {})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(capabilities))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: capabilities[i])
    monkeypatch.setattr(
        torch.cuda,
        "get_device_properties",
        lambda i: types.SimpleNamespace(
            name=f"GPU{i}",
            total_memory=80 << 30,
            major=capabilities[i][0],
            minor=capabilities[i][1],
        ),
    )
    return fake


def test_gpus_without_gpu_code_get_the_reference(monkeypatch):
    """A GPU whose capability has no machine code and no usable PTX in megalite._cuda runs the
    reference kernels (instead of failing at the first launch); the others run the CUDA ones,
    and megalite.env says which and why, per GPU."""
    fake = _fake_cuda_machine(monkeypatch, [(9, 0), (7, 0), (10, 0)])
    for op in CUDA_OPS:
        assert dispatch.choose(op, "cuda:0")[:2] == ("cuda", fake)
        assert dispatch.choose(op, "cuda:2")[:2] == ("cuda", fake)
        impl, module, why = dispatch.choose(op, "cuda:1")
        assert (impl, module) == ("reference", None)
        assert "capability 7.0" in why and "TORCH_CUDA_ARCH_LIST=7.0" in why, why
    # the norms take their kernels from dispatch, per device (not per device type)
    x1 = types.SimpleNamespace(dtype=torch.float32, device=torch.device("cuda:1"))
    x0 = types.SimpleNamespace(dtype=torch.float32, device=torch.device("cuda:0"))
    assert norms._impl("layer_norm", x1) is norms.reference
    assert norms._impl("layer_norm", x0) is fake
    assert dispatch.choose("layer_norm", "cuda")[0] == "cuda"  # current device: 0
    gpus = {k: v for k, v in env.report() if k.startswith("cuda:")}
    assert "capability 9.0 -> CUDA kernels (sm_90 machine code)" in gpus["cuda:0"]
    assert "capability 7.0 -> reference kernels (megalite._cuda has no GPU code" in gpus["cuda:1"]
    assert "capability 10.0 -> CUDA kernels (compute_90 PTX" in gpus["cuda:2"]
    assert dict(env.report())["CUDA kernels"] == "built for " + " ".join(CUDA13_BUILD)
    monkeypatch.setenv("MEGALITE_KERNELS", "reference")
    assert "-> reference kernels (MEGALITE_KERNELS=reference)" in dict(env.report())["cuda:0"]


def test_archs_setup_builds(setup_py, monkeypatch):
    """Every arch of the issue's list that nvcc supports, the newest also as PTX; the user's
    TORCH_CUDA_ARCH_LIST instead when set; the flags and recorded names by torch's rules."""
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    cuda12 = {"5.0", "6.0", "7.0", "7.5", "8.0", "8.6", "8.7", "8.9", "9.0", "10.0", "12.0"}
    cuda13 = cuda12 - {"5.0", "6.0", "7.0"}
    for supported, expected in (
        (cuda12, "7.0;7.5;8.0;8.6;8.9;9.0+PTX"),
        (cuda13, "7.5;8.0;8.6;8.9;9.0+PTX"),
        (None, "7.0;7.5;8.0;8.6;8.9;9.0+PTX"),  # an nvcc that cannot list its archs
    ):
        monkeypatch.setattr(setup_py, "nvcc_capabilities", lambda nvcc, s=supported: s)
        assert setup_py.cuda_arch_list("nvcc") == expected
    flags, codes = setup_py.cuda_arch_flags("7.5;8.0;8.6;8.9;9.0+PTX")
    assert codes == CUDA13_BUILD
    assert "-gencode=arch=compute_90,code=compute_90" in flags
    assert "-gencode=arch=compute_75,code=sm_75" in flags
    assert setup_py.cuda_arch_flags("Ampere")[1] == ["sm_80", "sm_86", "compute_86"]
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0 9.0")
    assert setup_py.cuda_arch_list("nvcc") == "8.0 9.0"
    assert setup_py.cuda_arch_flags("8.0 9.0")[1] == ["sm_80", "sm_90"]


@needs_nvcc
def test_installed_nvcc_arch_list(setup_py, monkeypatch):
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    supported = setup_py.nvcc_capabilities(NVCC)
    archs = setup_py.cuda_arch_list(NVCC).split(";")
    assert archs[-1].endswith("+PTX") and archs[-1] == setup_py.CUDA_ARCHS[-1] + "+PTX"
    assert [a.removesuffix("+PTX") for a in archs] == [
        a for a in setup_py.CUDA_ARCHS if supported is None or a in supported
    ]


# ---- the build --------------------------------------------------------------------------------

# Host-only check of the multi-tensor launcher's bookkeeping: every chunk of every tensor is
# handed to exactly one block, launches never exceed their capacity. Runs without a GPU (the
# "launch" just records its arguments).
MTA_TEST = r"""
#include <cstdio>
#include <vector>
#include "common.cuh"
using namespace megalite_cuda;
struct Meta { int id; int64_t n; };
template <int T, int B> int run(const std::vector<int64_t>& sizes, int64_t chunk) {
  std::vector<Meta> metas;
  for (size_t i = 0; i < sizes.size(); ++i) metas.push_back({int(i), sizes[i]});
  std::vector<std::vector<int>> seen(sizes.size());
  for (size_t i = 0; i < sizes.size(); ++i) seen[i].assign((sizes[i] + chunk - 1) / chunk, 0);
  using Args = MultiTensorArgs<Meta, T, B>;
  cudaError_t err = multi_tensor_apply<Args, T, B>(metas.data(), int(metas.size()), chunk,
      [](const Meta& m) { return m.n; },
      [&](const Args& a, int blocks) {
        if (blocks < 1 || blocks > B) return cudaErrorInvalidValue;
        for (int b = 0; b < blocks; ++b) {
          if (a.block_tensor[b] >= T) return cudaErrorInvalidValue;
          const Meta& m = a.tensors[a.block_tensor[b]];
          seen[m.id][a.block_chunk[b]] += 1;
        }
        return cudaSuccess;
      });
  if (err != cudaSuccess) return 1;
  for (auto& s : seen) for (int c : s) if (c != 1) return 2;
  return 0;
}
int main() {
  std::vector<int64_t> sizes;
  for (int i = 0; i < 200; ++i) sizes.push_back((i * 7919) % 5000 * (i % 3) + (i % 5 == 0 ? 0 : 1));
  int rc = run<3, 5>(sizes, 64) | run<24, 320>(sizes, 16) | run<2, 1>(sizes, 1000) |
           run<1, 7>({0, 1, 1000, 0}, 10);
  std::printf(rc ? "FAIL %d\n" : "OK\n", rc);
  return rc;
}
"""


@needs_nvcc
def test_multi_tensor_apply_bookkeeping(tmp_path):
    src = tmp_path / "mta_test.cu"
    src.write_text(MTA_TEST)
    build = subprocess.run(
        [NVCC, "-std=c++17", f"-I{CUDA_DIR}", str(src), "-o", str(tmp_path / "mta")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    run = subprocess.run([str(tmp_path / "mta")], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and "OK" in run.stdout, run.stdout + run.stderr


# Run in a fresh process on the built module: it must import (Python loads extensions with
# RTLD_NOW, so every symbol, each launcher included, must resolve), report the archs it was
# built for, carry every kernel, and reject a CPU tensor with its one-line message.
CHECK_MODULE = r"""
import importlib, json, sys
import torch
sys.path.insert(0, sys.argv[1])
m = importlib.import_module("_cuda")
try:
    m.layer_norm_fwd(torch.zeros(2, 3), None, None, 1e-5)
    error = None
except RuntimeError as e:
    error = str(e).splitlines()[0]
print(json.dumps({"archs": m.compiled_archs(), "names": dir(m), "error": error}))
"""


def _run_jobs(jobs, timeout):
    """Start every command at once (nvcc per file, the C++ compiler), wait for all."""
    procs = {
        name: subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for name, cmd in jobs.items()
    }
    failures = []
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=timeout)
        if proc.returncode != 0:
            failures.append(f"{name}: {' '.join(jobs[name])}\n{out}")
    assert not failures, "\n\n".join(failures)


def _build_by_hand(setup_py, out_dir):
    """megalite._cuda built where torch has no CUDA, as torch's BuildExtension would build it:
    each .cu with torch's nvcc flags plus setup.py's (all its archs), the binding against
    torch's headers with setup.py's C++ flags, then one shared library. torch's CPU wheel has no
    libc10_cuda, which the binding does not need (its device guard is c10's generic one)."""
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS, include_paths, library_paths

    sources, include_dirs, cxx_flags, nvcc_flags, _ = setup_py.cuda_build_args()
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    common = [
        *[f"-I{p}" for p in [*include_dirs, *include_paths(), sysconfig.get_paths()["include"]]],
        "-DTORCH_API_INCLUDE_EXTENSION_H",
        "-DTORCH_EXTENSION_NAME=_cuda",
        abi,
        "-std=c++17",
    ]
    cxx = shutil.which("c++") or shutil.which("g++")
    jobs, objects = {}, []
    for src in sources:
        obj = os.path.join(out_dir, os.path.basename(src) + ".o")
        objects.append(obj)
        path = os.path.join(ROOT, src)
        if src.endswith(".cu"):
            flags = [*COMMON_NVCC_FLAGS, "--compiler-options", "-fPIC", *nvcc_flags]
            jobs[src] = [NVCC, "-c", path, "-o", obj, *common, *flags]
        else:
            jobs[src] = [cxx, "-c", path, "-o", obj, "-fPIC", *common, *cxx_flags]
    _run_jobs(jobs, timeout=900)
    libs = [f"-L{p}" for p in library_paths()] + ["-lc10", "-ltorch", "-ltorch_cpu"]
    libs += ["-ltorch_python"]
    so = os.path.join(out_dir, "_cuda" + sysconfig.get_config_var("EXT_SUFFIX"))
    _run_jobs({"link": [NVCC, "-shared", "-o", so, *objects, *libs]}, timeout=300)


def _build_with_torch(setup_py, out_dir):
    """On a machine whose torch has CUDA: the real CUDAExtension, by torch's own build
    (torch.utils.cpp_extension.load) from setup.py's sources and flags."""
    from torch.utils.cpp_extension import load

    sources, include_dirs, cxx_flags, nvcc_flags, _ = setup_py.cuda_build_args()
    load(
        name="_cuda",
        sources=[os.path.join(ROOT, s) for s in sources],
        extra_cflags=cxx_flags,
        extra_cuda_cflags=nvcc_flags,
        extra_include_paths=include_dirs,
        build_directory=out_dir,
    )


@needs_nvcc
@pytest.mark.slow
def test_cuda_extension_builds_links_and_imports(setup_py, tmp_path, monkeypatch):
    """The strongest build this machine allows: all of setup.py's archs, torch's flags, a
    linked module that imports (see CHECK_MODULE) and reports those archs."""
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    codes = setup_py.cuda_build_args()[-1]
    if torch.version.cuda is None:
        _build_by_hand(setup_py, str(tmp_path))
    else:
        _build_with_torch(setup_py, str(tmp_path))
    run = subprocess.run(
        [sys.executable, "-c", CHECK_MODULE, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    built = json.loads(run.stdout.splitlines()[-1])
    assert built["archs"] == codes
    for op in CUDA_OPS:
        for fn in dispatch.OPS[op]:
            assert fn in built["names"], f"megalite._cuda lacks {fn}"
    assert built["error"] == "layer_norm_fwd: expects CUDA tensors, got one on cpu"


@pytest.mark.skipif(
    torch.version.cuda is not None, reason="torch has CUDA: the forced build can succeed"
)
def test_forced_cuda_build_fails_loudly_without_cuda():
    """MEGALITE_BUILD_CUDA=1 on a machine that cannot build the CUDA kernels is an error, not a
    silent CPU-only install; a bad value of the flag is one too."""
    for value, message in (("1", "MEGALITE_BUILD_CUDA=1 but torch"), ("yes", "must be 0 or 1")):
        env_vars = dict(os.environ, MEGALITE_BUILD_CUDA=value)
        run = subprocess.run(
            [sys.executable, "setup.py", "--version"],
            cwd=ROOT,
            env=env_vars,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert run.returncode != 0 and message in run.stderr, run.stderr


# ---- on a CUDA machine: the kernels against torch ---------------------------------------------

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def _assert_cuda_kernels_built():
    assert dispatch._cuda is not None, dispatch._CUDA_ERROR
    runs, why = dispatch.cuda_device_route(torch.cuda.current_device())
    assert runs, why


@needs_gpu
def test_cuda_kernels_are_built_where_cuda_is_available():
    """On a machine with a GPU, megalite._cuda must import and run there: a missing build (no
    nvcc at install time) or a GPU it has no code for is a failure, not a skip."""
    _assert_cuda_kernels_built()


@pytest.fixture
def cuda_kernels(monkeypatch):
    """Every GPU test runs megalite's CUDA kernels, never a silent fallback to the reference."""
    monkeypatch.delenv("MEGALITE_KERNELS", raising=False)
    _assert_cuda_kernels_built()
    for op in CUDA_OPS:
        impl, _, why = dispatch.choose(op, "cuda")
        assert impl == "cuda", f"{op}: {why}"
    return dispatch._cuda


def _norm_inputs(shape, dtype, seed, storage_offset=0):
    """x, weight, bias, dy on the GPU; x starts `storage_offset` elements into its storage."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    h, n = shape[-1], shape[0] * shape[-1]
    flat = torch.randn(n + storage_offset, generator=g, device="cuda") * 2 + 0.5
    x = flat.to(dtype)[storage_offset:].view(shape).requires_grad_()
    w = (torch.randn(h, generator=g, device="cuda") * 0.5 + 1).requires_grad_()
    b = (torch.randn(h, generator=g, device="cuda") * 0.1).requires_grad_()
    dy = torch.randn(shape, generator=g, device="cuda").to(dtype)
    return x, w, b, dy


def _check_norms(x, w, b, dy, variants):
    dtype = x.dtype
    for rms, with_w, with_b in variants:
        wv, bv = (w if with_w else None), (b if with_b else None)
        if rms:
            y = ops.rms_norm(x, wv, 1e-5)
            want = torch_rms_norm(x, wv, 1e-5, dy)
            params = (x, wv)
        else:
            y = ops.layer_norm(x, wv, bv, 1e-5)
            want = torch_layer_norm(x, wv, bv, 1e-5, dy)
            params = (x, wv, bv)
        assert y.dtype == dtype and y.is_cuda
        ts = [t for t in params if t is not None]
        grads = iter(torch.autograd.grad(y, ts, dy))
        got = [y] + [None if t is None else next(grads) for t in params]
        assert_norm_close(got, want, dtype)


ALL_VARIANTS = [  # (rms, weight, bias)
    (False, True, True),
    (False, True, False),
    (False, False, False),
    (False, False, True),
    (True, True, False),
    (True, False, False),
]

# Rows x hidden that reach every path of norms.cu: many rows per block (20000 x 4096: ~76 rows
# per block on an H100), fewer rows than blocks, no rows; 8 and 32 columns per thread (hidden
# up to 4096 / above), one column slice and several (hidden > 16384), the 16-byte vector path
# (hidden % 4 == 0 for fp32, % 8 for bf16/fp16) and the scalar one (hidden 1004 in bf16, odd
# hidden), one element per row.
NORM_SHAPES = [
    (4096, 1024),
    (20000, 4096),
    (3, 4096),
    (0, 1024),
    (1, 1),
    (37, 1004),
    (64, 2053),
    (17, 5004),
    (9, 20000),
    (5, 40001),
]


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", NORM_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_cuda_norms_match_torch(cuda_kernels, shape, dtype):
    x, w, b, dy = _norm_inputs(shape, dtype, seed=shape[-1])
    # the largest shape with the model's variants only (LayerNorm with bias, RMSNorm): time
    variants = ALL_VARIANTS if shape[0] * shape[1] <= 4096 * 1024 else ALL_VARIANTS[::4]
    _check_norms(x, w, b, dy, variants)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_norms_misaligned_inputs(cuda_kernels, dtype):
    """x starting one element into its storage (not 16-byte aligned): the scalar path at a
    hidden size that would otherwise be vectorised; also a misaligned weight."""
    x, w, b, dy = _norm_inputs((300, 1024), dtype, seed=1, storage_offset=1)
    assert x.data_ptr() % 16 != 0
    _check_norms(x, w, b, dy, ALL_VARIANTS)
    w_view = torch.randn(1025, device="cuda")[1:].requires_grad_()
    _check_norms(x, w_view, b, dy, [(False, True, True), (True, True, False)])


@needs_gpu
def test_cuda_norm_backward_is_deterministic(cuda_kernels):
    """dweight/dbias partials are summed in a fixed order: the same bits on every run."""
    x, w, b, dy = _norm_inputs((20000, 4096), torch.bfloat16, seed=2)
    runs = []
    for _ in range(2):
        runs.append(torch.autograd.grad(ops.layer_norm(x, w, b, 1e-5), (x, w, b), dy))
        runs.append(torch.autograd.grad(ops.rms_norm(x, w, 1e-5), (x, w), dy))
    for a, c in zip(runs[:2], runs[2:]):
        for g1, g2 in zip(a, c):
            assert torch.equal(g1, g2)


@needs_gpu
def test_cuda_norm_bindings_check_their_arguments(cuda_kernels):
    """Statistics and params of the wrong size, dtype, device or layout are refused with one
    line, before any kernel reads out of bounds."""
    m = cuda_kernels
    x = torch.randn(8, 64, device="cuda")
    dy, w = torch.randn_like(x), torch.ones(64, device="cuda")
    y, mean, rstd = m.layer_norm_fwd(x, w, None, 1e-5)
    bad = [
        (lambda: m.layer_norm_bwd(dy, x, mean[:-1], rstd, w, True), "mean must be a float32"),
        (lambda: m.layer_norm_bwd(dy, x, mean, rstd.half(), w, True), "rstd must be a float32"),
        (lambda: m.rms_norm_bwd(dy, x, rstd[:4], w), "rstd must be a float32 vector of 8"),
        (lambda: m.layer_norm_bwd(dy, x, mean.cpu(), rstd, w, True), "expects CUDA tensors"),
        (lambda: m.layer_norm_bwd(dy, x, mean, rstd, w[:32], True), "weight must be a float32"),
        (lambda: m.layer_norm_fwd(x, w, torch.ones(65, device="cuda"), 1e-5), "bias must be"),
        (lambda: m.layer_norm_fwd(x, w.half(), None, 1e-5), "weight must be a float32"),
        (lambda: m.layer_norm_fwd(x.t(), None, None, 1e-5), "contiguous"),
        (lambda: m.layer_norm_bwd(dy[:4], x, mean, rstd, w, True), "dy must have x's shape"),
        (lambda: m.rms_norm_fwd(x.double(), None, 1e-5), "unsupported dtype"),
    ]
    for call, message in bad:
        with pytest.raises(RuntimeError, match=message) as info:
            call()
        assert "\n" not in str(info.value).split("\nException raised from")[0].strip()


# Run in a process of its own (2+ GPUs): torch's ops on cuda:1 first (if torch itself opens a
# context on GPU 0, megalite's cannot be told apart), then megalite's.
NO_CONTEXT_ON_GPU0 = r"""
import json, torch, torch.nn.functional as F
import megalite.ops as ops
x = torch.randn(64, 512, device="cuda:1", requires_grad=True)
w = torch.ones(512, device="cuda:1", requires_grad=True)
F.layer_norm(x, (512,), w).sum().backward()
torch.cuda.synchronize(1)
torch_opened = torch._C._cuda_hasPrimaryContext(0)
ops.layer_norm(x, w, None, 1e-5).sum().backward()
ops.rms_norm(x, w, 1e-5).sum().backward()
p = [torch.randn(1000, device="cuda:1")]
ops.fused_adamw_(p, [torch.randn_like(p[0])], [torch.zeros_like(p[0])], [torch.zeros_like(p[0])],
                 lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, step=1)
ops.flatten_into(p, torch.empty(1000, device="cuda:1"))
torch.cuda.synchronize(1)
print(json.dumps({"torch": torch_opened, "megalite": torch._C._cuda_hasPrimaryContext(0)}))
"""


@needs_gpu
def test_cuda_guard_runs_on_the_tensors_device(cuda_kernels):
    """The bindings run on their tensors' device (every GPU here, each from device 0) and give
    the current device back. With 2+ GPUs also: working on GPU 1 opens no context on GPU 0
    (the launchers' old cudaSetDevice(previous) did); one GPU cannot show that."""
    before = torch.cuda.current_device()
    for index in range(torch.cuda.device_count()):
        x, w, b, dy = _norm_inputs((33, 256), torch.float32, seed=index)
        if index:
            x, w, b = (t.detach().to(f"cuda:{index}").requires_grad_() for t in (x, w, b))
            dy = dy.to(f"cuda:{index}")
        _check_norms(x, w, b, dy, [(False, True, True), (True, True, False)])
        assert torch.cuda.current_device() == before
    if torch.cuda.device_count() < 2:
        return
    run = subprocess.run(
        [sys.executable, "-c", NO_CONTEXT_ON_GPU0],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    opened = json.loads(run.stdout.splitlines()[-1])
    assert opened["torch"] or not opened["megalite"], "megalite created a context on GPU 0"


# Multi-tensor apply: more tensors than one launch holds (24) and one tensor of 489 chunks of
# 16K elements (a launch holds 320 blocks), so tensors straddle launches.
ADAM_SIZES = [0, 1, 7, 4095, 4097, 100_003] + [(i * 7919) % 50_000 + 1 for i in range(124)]
ADAM_SIZES += [8_000_003]
HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)


def _adam_inputs(sizes, grad_dtype, copy_dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)

    def randn(n, scale=1.0):
        return torch.randn(n, generator=g, device="cuda") * scale

    p = [randn(n) for n in sizes]
    grads = [randn(n, 3.0).to(grad_dtype) for n in sizes]
    m = [randn(n, 0.1) for n in sizes]
    v = [torch.rand(n, generator=g, device="cuda") * 0.01 for n in sizes]
    copies = None if copy_dtype is None else [torch.zeros_like(t, dtype=copy_dtype) for t in p]
    return p, grads, m, v, copies


@needs_gpu
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("copy_dtype", [None, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("check_finite", [True, False])
def test_cuda_adamw_matches_torch(cuda_kernels, grad_dtype, copy_dtype, check_finite):
    p, grads, m, v, copies = _adam_inputs(ADAM_SIZES, grad_dtype, copy_dtype)
    want = torch_adamw(p, grads, m, v, 3, grad_scale=4.0, **HYPER)
    for step in (1, 2, 3):
        found = ops.fused_adamw_(
            p,
            grads,
            m,
            v,
            step=step,
            grad_scale=4.0,
            model_copies=copies,
            check_finite=check_finite,
            **HYPER,
        )
        assert found is False
    assert_adamw_close(p + m + v, sum(want, []), rtol=1e-5, atol=1e-6)
    if copies is not None:
        for c, a in zip(copies, p):
            assert torch.equal(c, a.to(copy_dtype))


@needs_gpu
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_cuda_adamw_inf_leaves_everything_untouched(cuda_kernels, bad):
    for where in (1, len(ADAM_SIZES) // 2, len(ADAM_SIZES) - 1):  # first, middle, 489-chunk one
        p, grads, m, v, copies = _adam_inputs(ADAM_SIZES, torch.bfloat16, torch.bfloat16)
        grads[where][-1] = bad
        before = [t.clone() for t in p + m + v + copies]
        found = ops.fused_adamw_(p, grads, m, v, step=1, model_copies=copies, **HYPER)
        assert found is True
        for a, b in zip(p + m + v + copies, before):
            assert torch.equal(a, b)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.uint8])
def test_cuda_flatten_round_trip(cuda_kernels, dtype):
    """Over 320 chunks of 64 KB (a 32 MB tensor alone has 489) and over 48 tensors: several
    launches, a tensor straddling two; a strided tensor (torch's copy) and misaligned views
    (the narrower copy widths)."""
    g = torch.Generator(device="cuda").manual_seed(3)
    shapes = [(1,), (0,), (17,), (3, 5, 7), (100_003,), (2, 1), (8_000_003,)]
    shapes += [(i % 97 + 1,) for i in range(60)]
    src = [torch.randint(0, 100, s, generator=g, device="cuda").to(dtype) for s in shapes]
    src.append(torch.randn(40, 30, generator=g, device="cuda").to(dtype).t())  # strided
    total = sum(t.numel() for t in src)
    buf = torch.full((total + 5,), 3, dtype=dtype, device="cuda")
    ops.flatten_into(src, buf)
    assert torch.equal(buf[:total], torch.cat([t.reshape(-1) for t in src]))
    assert torch.equal(buf[total:].cpu(), torch.full((5,), 3, dtype=dtype))
    out = [torch.empty_like(t) for t in src]
    ops.unflatten_from(buf, out)
    for a, b in zip(out, src):
        assert torch.equal(a, b)
    ops.flatten_into(src[:7], buf[1:])  # misaligned by one element
    n = sum(t.numel() for t in src[:7])
    assert torch.equal(buf[1 : 1 + n], torch.cat([t.reshape(-1) for t in src[:7]]))
