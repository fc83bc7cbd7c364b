"""CUDA kernels: every .cu file compiles with nvcc for sm_80 and sm_90 (wherever nvcc exists, GPU
or not), and on a CUDA machine the kernels match the pure-PyTorch references."""

import glob
import os
import shutil
import subprocess
import sysconfig

import pytest
import torch

import megalite.ops as ops
from megalite.ops import dispatch, reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_DIR = os.path.join(ROOT, "csrc", "cuda")
NVCC = shutil.which("nvcc") or (
    os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc") if os.environ.get("CUDA_HOME") else None
)

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


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
def test_cuda_sources_compile(tmp_path):
    """One test, all compiles in parallel: each .cu for sm_80 and sm_90 (-c only), the torch
    binding against torch's (CPU) headers, and a run of the launcher bookkeeping check."""
    archs = ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"]
    jobs = {}
    for cu in sorted(glob.glob(os.path.join(CUDA_DIR, "*.cu"))):
        obj = tmp_path / (os.path.basename(cu) + ".o")
        jobs[cu] = [NVCC, "-c", "-std=c++17", "-O2", *archs, f"-I{CUDA_DIR}", cu, "-o", str(obj)]
    assert jobs, "no .cu files found"
    mta = tmp_path / "mta_test.cu"
    mta.write_text(MTA_TEST)
    jobs["multi_tensor_apply check"] = [
        NVCC,
        "-std=c++17",
        f"-I{CUDA_DIR}",
        str(mta),
        "-o",
        str(tmp_path / "mta"),
    ]
    from torch.utils.cpp_extension import include_paths

    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx:
        jobs["bindings.cpp"] = [
            cxx,
            "-std=c++20",
            "-fsyntax-only",
            "-Wall",
            "-Werror=return-type",
            *[f"-I{p}" for p in include_paths()],
            f"-I{sysconfig.get_paths()['include']}",
            f"-I{CUDA_DIR}",
            "-DTORCH_EXTENSION_NAME=_cuda",
            "-DTORCH_API_INCLUDE_EXTENSION_H",
            os.path.join(CUDA_DIR, "bindings.cpp"),
        ]
    procs = {
        name: subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for name, cmd in jobs.items()
    }
    failures = []
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=300)
        if proc.returncode != 0:
            failures.append(f"{name}:\n{out}")
    assert not failures, "\n\n".join(failures)
    run = subprocess.run([str(tmp_path / "mta")], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and "OK" in run.stdout, run.stdout + run.stderr


# ---- on a CUDA machine: the kernels against the references ------------------------------------

HAS_CUDA_KERNELS = torch.cuda.is_available() and dispatch._cuda is not None
needs_cuda = pytest.mark.skipif(
    not HAS_CUDA_KERNELS, reason="needs a CUDA device and megalite._cuda"
)


@needs_cuda
def test_cuda_kernels_are_dispatched(monkeypatch):
    monkeypatch.delenv("MEGALITE_KERNELS", raising=False)
    for op in ("layer_norm", "rms_norm", "fused_adamw", "flatten"):
        assert dispatch.choose(op, "cuda")[0] == "cuda"
    assert {r["op"]: r["impl"] for r in ops.kernel_report()}["layer_norm"] == "cuda"


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "shape", [(0, 8), (1, 1), (3, 17), (5, 100), (64, 768), (7, 2053), (2, 8192)]
)
def test_cuda_norms_match_reference(shape, dtype):
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    g = torch.Generator().manual_seed(shape[-1])
    x = (torch.randn(shape, generator=g) * 2 + 0.5).to(dtype)
    w, b = torch.randn(shape[-1], generator=g), torch.randn(shape[-1], generator=g)
    dy = torch.randn(shape, generator=g).to(dtype)
    for rms in (False, True):
        for affine in (True, False):
            wc = w.cuda().requires_grad_() if affine else None
            bc = b.cuda().requires_grad_() if affine and not rms else None
            xc = x.cuda().requires_grad_()
            y = ops.rms_norm(xc, wc, 1e-5) if rms else ops.layer_norm(xc, wc, bc, 1e-5)
            y.backward(dy.cuda())
            if rms:
                ry, rstd = reference.rms_norm_fwd(x, w if affine else None, 1e-5)
                rdx, rdw = reference.rms_norm_bwd(dy, x, rstd, w if affine else None)
                rdb = None
            else:
                ry, mean, rstd = reference.layer_norm_fwd(
                    x, w if affine else None, b if affine else None, 1e-5
                )
                rdx, rdw, rdb = reference.layer_norm_bwd(
                    dy, x, mean, rstd, w if affine else None, affine
                )
            torch.testing.assert_close(y.float().cpu(), ry.float(), **tol)
            torch.testing.assert_close(xc.grad.float().cpu(), rdx.float(), **tol)
            if affine:
                scale = max(1.0, rdw.abs().max().item())
                torch.testing.assert_close(wc.grad.cpu() / scale, rdw / scale, **tol)
            if bc is not None:
                scale = max(1.0, rdb.abs().max().item())
                torch.testing.assert_close(bc.grad.cpu() / scale, rdb / scale, **tol)


def _adam_inputs(sizes, grad_dtype, copy_dtype, device):
    g = torch.Generator().manual_seed(0)
    p = [torch.randn(n, generator=g) for n in sizes]
    grads = [(torch.randn(n, generator=g) * 3).to(grad_dtype) for n in sizes]
    m = [torch.randn(n, generator=g) * 0.1 for n in sizes]
    v = [torch.rand(n, generator=g) * 0.01 for n in sizes]
    copies = None if copy_dtype is None else [torch.zeros(n, dtype=copy_dtype) for n in sizes]

    def move(ts):
        return None if ts is None else [t.to(device) for t in ts]

    return move(p), move(grads), move(m), move(v), move(copies)


# More tensors than one launch holds (24) and more chunks than one launch's blocks (320).
ADAM_SIZES = (
    [0, 1, 7, 4095, 4097, 100_003] + [(i * 7919) % 50_000 + 1 for i in range(40)] + [3_000_001]
)


@needs_cuda
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("copy_dtype", [None, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("check_finite", [True, False])
def test_cuda_adamw_matches_reference(grad_dtype, copy_dtype, check_finite):
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, grad_scale=4.0)
    p, grads, m, v, copies = _adam_inputs(ADAM_SIZES, grad_dtype, copy_dtype, "cuda")
    rp, rgrads, rm, rv, _ = _adam_inputs(ADAM_SIZES, grad_dtype, None, "cpu")
    rgrads = [x.float() for x in rgrads]
    for step in (1, 2, 3):
        assert (
            ops.fused_adamw_(
                p, grads, m, v, step=step, model_copies=copies, check_finite=check_finite, **hyper
            )
            is False
        )
        reference.fused_adamw_(rp, rgrads, rm, rv, step=step, **hyper)
    for a, b in zip(p + m + v, rp + rm + rv):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-5, atol=1e-6)
    if copies is not None:
        for c, a in zip(copies, p):
            assert torch.equal(c, a.to(copy_dtype))


@needs_cuda
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_cuda_adamw_inf_leaves_everything_untouched(bad):
    for where in (0, len(ADAM_SIZES) // 2, len(ADAM_SIZES) - 1):
        p, grads, m, v, copies = _adam_inputs(ADAM_SIZES, torch.bfloat16, torch.bfloat16, "cuda")
        if grads[where].numel() == 0:
            continue
        grads[where][-1] = bad
        before = [t.clone() for t in p + m + v + copies]
        assert (
            ops.fused_adamw_(
                p,
                grads,
                m,
                v,
                lr=1e-2,
                beta1=0.9,
                beta2=0.95,
                eps=1e-8,
                weight_decay=0.1,
                step=1,
                model_copies=copies,
            )
            is True
        )
        for a, b in zip(p + m + v + copies, before):
            assert torch.equal(a, b)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.uint8])
def test_cuda_flatten_round_trip(dtype):
    shapes = [(1,), (0,), (17,), (3, 5, 7), (100_003,), (2, 1)] + [(i % 97 + 1,) for i in range(60)]
    src = [torch.randint(0, 100, s).to(dtype).cuda() for s in shapes]
    src.append(torch.randn(40, 30).to(dtype).cuda().t())  # strided
    total = sum(t.numel() for t in src)
    buf = torch.full((total + 5,), 3, dtype=dtype, device="cuda")
    ops.flatten_into(src, buf)
    assert torch.equal(buf[:total], torch.cat([t.reshape(-1) for t in src]))
    assert torch.equal(buf[total:].cpu(), torch.full((5,), 3, dtype=dtype))
    out = [torch.empty_like(t) for t in src]
    ops.unflatten_from(buf, out)
    for a, b in zip(out, src):
        assert torch.equal(a, b)
    # Misaligned slices of the buffer take the narrower copy paths.
    ops.flatten_into(src[:3], buf[1:])
    assert torch.equal(buf[1 : 1 + 18], torch.cat([t.reshape(-1) for t in src[:3]]))


@pytest.mark.skipif(
    torch.version.cuda is not None, reason="torch has CUDA: the forced build can succeed"
)
def test_forced_cuda_build_fails_loudly_without_cuda():
    """MEGALITE_BUILD_CUDA=1 on a machine that cannot build the CUDA kernels is an error, not a
    silent CPU-only install; a bad value of the flag is one too."""
    import sys

    for value, message in (("1", "MEGALITE_BUILD_CUDA=1 but torch"), ("yes", "must be 0 or 1")):
        env = dict(os.environ, MEGALITE_BUILD_CUDA=value)
        run = subprocess.run(
            [sys.executable, "setup.py", "--version"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert run.returncode != 0 and message in run.stderr, run.stderr
