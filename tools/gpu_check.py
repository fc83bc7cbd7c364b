"""`make gpu-check`: everything megalite can only show on a GPU, in one command and one report.

    python tools/gpu_check.py [--report gpu-check.md] [--time-limit 480]
    make gpu-check REPORT=$OUT/gpu-check.md GPU_CHECK_ARGS='--time-limit 540'

On a CUDA machine, with no network, in stages that share one deadline (--time-limit seconds):

  build    `python setup.py build_ext --inplace` with MEGALITE_BUILD_CUDA=1, for this GPU's
           architecture only (TORCH_CUDA_ARCH_LIST from its compute capability), MAX_JOBS = the
           cores: megalite._C and megalite._cuda against the installed torch, in the checkout.
  tests    pytest over every CUDA test of tests/ (`is_cuda_test`: "cuda" in its id, or a skip
           marker whose reason names CUDA or a GPU), compile-only tests last. A failure, an error
           or a skip on this CUDA machine is a problem (except a test that skips because torch
           has CUDA: `EXPECTED_SKIP_ON_CUDA`).
  kernels  CUDA-event medians of alternating runs (tools/bench/kernels.py's `compare`): the
           device-to-device copy bandwidth (bytes read + written), fused AdamW fp32 and mixed
           precision against torch.optim.AdamW(fused=True) (and apex's FusedAdam when importable),
           as % of that bandwidth; LayerNorm/RMSNorm fwd+bwd against torch (and apex); the grad
           norm's sum of squares against torch._foreach_norm; flash attention through SDPA.
  train    `python -m megalite.train` (the real command line) on GPT ~1.3B and ~350M, bf16, seq
           2048, mock data, each with megalite's kernels and with MEGALITE_KERNELS=reference;
           tokens/s, TFLOP/s, MFU (the trainer's own figures, from --metrics-file: medians of
           the logged windows after the warm-up) and peak memory.

Goals on one H100/H200: fused AdamW >= 85% of the copy bandwidth and >= 1.0x torch's fused
AdamW; the norms >= 1.0x torch; GPT 1.3B bf16 >= 50% MFU.

Every stage runs in a subprocess with a timeout cut from the deadline, so that later stages keep
their minimum time (`stage_timeout`); a failure is reported and the next stage runs. The report
(markdown: the device, driver, CUDA, torch, megalite commit, every figure with its goal) is
rewritten after each stage, so a run cut short still leaves one with what finished and "not run
(time)" for the rest; at the end it is printed to stdout too. Exit status 1 when the build failed,
a CUDA test failed or skipped, or a stage did not finish; goals missed are reported, not errors.
Without CUDA it prints one line and exits 0.

Hidden, for tests/test_gpu_check.py: `--device cpu --tiny` runs the same code paths at tiny
sizes on the CPU (with `--skip-build`, and `--tests-path` pointing pytest at other tests).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, "tools", "bench")
NO_TIME = "not run (time)"

# ---- the plan: stages, their caps and floors, one deadline -------------------------------------


@dataclasses.dataclass(frozen=True)
class Stage:
    """`cap`: the most seconds the stage may take; `floor`: the fewest worth starting it with."""

    name: str
    cap: float
    floor: float


def stage_plan(train_runs: list) -> list:
    """The stages in order: build, tests, kernels, then one per (model, kernels) training run.
    Caps: about what each takes on one H100/H200 with room to spare; the build's is the largest
    because nothing after it means much without it."""
    return [Stage("build", 240, 60), Stage("tests", 120, 20), Stage("kernels", 90, 20)] + [
        Stage(f"train {m} {k}", *((80, 40) if "1.3B" in m else (60, 25))) for m, k in train_runs
    ]


def stage_timeout(left: float, stage: Stage, later: list) -> float | None:
    """Seconds `stage` may run, `left` seconds before the deadline, keeping the floors of the
    `later` stages free; None when that is under its own floor (the stage is not run)."""
    budget = min(stage.cap, left - sum(s.floor for s in later))
    return budget if budget >= stage.floor else None


# ---- device, build and versions ---------------------------------------------------------------


def _run_text(argv, timeout=20) -> str | None:
    """stdout of a short command, or None if it is missing or fails."""
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def machine_info(device: torch.device, commit=None) -> dict:
    """What the report's header says about the machine and the code (`commit`: given, for a copy
    of the checkout without .git)."""
    from megalite.training.metrics import peak_tflops_of

    info = {"torch": torch.__version__, "python": sys.version.split()[0]}
    info["torch CUDA"] = torch.version.cuda or "none"
    nvcc = shutil.which("nvcc")
    release = _run_text([nvcc, "--version"]) if nvcc else None
    found = re.search(r"release ([\d.]+)", release or "")
    info["nvcc"] = found.group(1) if found else "not found"
    commit = commit or _run_text(["git", "rev-parse", "--short=12", "HEAD"])
    if commit and os.path.isdir(os.path.join(REPO, ".git")):
        dirty = _run_text(["git", "status", "--porcelain", "--untracked-files=no"])
        commit += " (with uncommitted changes)" if dirty else ""
    info["megalite commit"] = commit or "unknown (no git checkout)"
    if device.type != "cuda":
        info["device"] = f"CPU: {_bench().cpu_name()}, {os.cpu_count()} cores"
        info["peak"] = "none (CPU)"
        return info
    props = torch.cuda.get_device_properties(device)
    name = torch.cuda.get_device_name(device)
    info["device"] = (
        f"{name} (compute capability {props.major}.{props.minor}, "
        f"{props.multi_processor_count} SMs, {props.total_memory / 2**30:.1f} GiB)"
    )
    smi = _run_text(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    info["driver"] = (smi.splitlines()[0] if smi else None) or "unknown (no nvidia-smi)"
    try:
        v = torch._C._cuda_getDriverVersion()
        info["driver CUDA"] = f"{v // 1000}.{v % 1000 // 10}"
    except (AttributeError, RuntimeError):
        info["driver CUDA"] = "unknown"
    peak, source = peak_tflops_of(name, low_precision=True)
    info["peak"] = f"{peak:g} bf16 TFLOP/s ({source})" if peak else f"none: {source}"
    return info


def build_command(capability: tuple, cores: int) -> tuple[list, dict]:
    """(argv, env) that build megalite._C and megalite._cuda in the checkout, for this GPU's
    architecture only (a fraction of the default list's compile time)."""
    env = dict(
        os.environ,
        MEGALITE_BUILD_CUDA="1",
        TORCH_CUDA_ARCH_LIST=f"{capability[0]}.{capability[1]}",
        MAX_JOBS=str(cores),
    )
    return [sys.executable, "setup.py", "build_ext", "--inplace"], env


# Run after the build: it must import the kernels it just built (torch first: they link to it).
IMPORT_CHECK = (
    "import os, torch, megalite._C, megalite._cuda as c; "
    "print(os.path.basename(c.__file__), *getattr(c, 'compiled_archs', list)())"
)


# ---- subprocesses with a timeout ---------------------------------------------------------------


class Children:
    """The stage's running subprocess, so that SIGTERM or a timeout ends it with its group."""

    current = None

    @classmethod
    def run(cls, argv, env, timeout, log_path) -> tuple[int | None, float]:
        """(exit status, or None when cut at `timeout`; seconds). Output goes to log_path."""
        t0 = time.monotonic()
        with open(log_path, "w") as log:
            proc = subprocess.Popen(
                argv,
                cwd=REPO,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: nvcc, pytest's children...
            )
            cls.current = proc
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                rc = None
            finally:  # also on SIGTERM (Terminated): nothing of the stage outlives it
                cls.kill()
        return rc, time.monotonic() - t0

    @classmethod
    def kill(cls):
        """End the current child and whatever it left in its process group (e.g. nvcc)."""
        proc, cls.current = cls.current, None
        if proc is None:
            return
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()


_ERROR_LINE = re.compile(r"^(error: |\w+(Error|Exception): )")


def log_tail(path, lines=15, width=240) -> str:
    """The last lines of a log, each cut to `width` characters (a tensor's repr can be long),
    after the last error line if that came earlier (an exception's message can span many)."""
    try:
        with open(path, errors="replace") as f:
            all_lines = f.read().splitlines()
    except OSError:
        return "(no log)"
    tail = all_lines[-lines:]
    errors = [ln for ln in all_lines if _ERROR_LINE.match(ln)]
    if errors and errors[-1] not in tail:
        tail = [errors[-1], "..."] + tail
    return "\n".join(ln if len(ln) <= width else ln[:width] + " ..." for ln in tail) or "(empty)"


def read_jsonl(path) -> list:
    """The complete records of a JSON-lines file (a line cut off by a kill is dropped)."""
    out = []
    try:
        with open(path) as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
    except OSError:
        pass
    return out


def child_env(**extra) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("MEGALITE_KERNELS", None)  # megalite's kernels unless a run asks for the reference
    env.update(extra)
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


# ---- stage: CUDA tests -------------------------------------------------------------------------

_CUDA_WORDS = re.compile(r"cuda|\bgpus?\b", re.I)
# Skips that are right on a CUDA machine: tests of what happens without CUDA.
EXPECTED_SKIP_ON_CUDA = re.compile(
    r"\b(torch|machine) has (a )?CUDA\b|\bonly without (a )?(CUDA|GPU)\b", re.I
)


def is_cuda_test(nodeid: str, skip_reasons: list) -> bool:
    """A test for the GPU: named for CUDA, or skipped for a reason that names CUDA or a GPU."""
    return "cuda" in nodeid.lower() or any(_CUDA_WORDS.search(r or "") for r in skip_reasons)


class CudaTestRecorder:
    """pytest plugin: keeps only the CUDA tests (compile-only ones last, so the checks of the
    kernels come first if time runs out) and appends each result to a JSON-lines file as it
    happens, so a run killed at its timeout still says what passed."""

    def __init__(self, path):
        self.path = path

    def _write(self, record):
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def pytest_collection_modifyitems(self, session, config, items):
        def reasons(item):
            marks = list(item.iter_markers("skipif")) + list(item.iter_markers("skip"))
            return [str(m.kwargs.get("reason", m.args[-1] if m.args else "")) for m in marks]

        chosen = [is_cuda_test(it.nodeid, reasons(it)) for it in items]
        keep = [it for it, c in zip(items, chosen) if c]
        dropped = [it for it, c in zip(items, chosen) if not c]
        keep.sort(key=lambda it: "compile" in it.name or it.get_closest_marker("slow") is not None)
        if dropped:
            config.hook.pytest_deselected(items=dropped)
        items[:] = keep
        self._write({"selected": [it.nodeid for it in keep], "deselected": len(dropped)})

    def pytest_runtest_logreport(self, report):
        if report.when == "call" or report.failed or (report.when == "setup" and report.skipped):
            outcome = report.outcome
            if hasattr(report, "wasxfail"):
                outcome = "xfailed" if report.skipped else "xpassed"
            elif report.when != "call" and report.failed:
                outcome = "error"
            self._write(
                {
                    "nodeid": report.nodeid,
                    "outcome": outcome,
                    "when": report.when,
                    "duration": report.duration,
                    "detail": _report_detail(report),
                }
            )


def _report_detail(report) -> str:
    """A skip's reason or a failure's one-line message."""
    longrepr = report.longrepr
    if longrepr is None:
        return ""
    if isinstance(longrepr, tuple):  # (path, line, "Skipped: reason")
        return str(longrepr[-1]).removeprefix("Skipped: ")
    crash = getattr(longrepr, "reprcrash", None)
    text = crash.message if crash is not None else str(longrepr)
    return " ".join(text.split())[:300]


def pytest_child(results_path, pytest_args) -> int:
    """Run pytest in this process with the recorder (the tests stage's subprocess)."""
    import pytest

    sys.path.insert(0, REPO)  # the megalite built in place
    return pytest.main(list(pytest_args), plugins=[CudaTestRecorder(results_path)])


def summarise_tests(records: list, on_cuda: bool) -> dict:
    """Counts per outcome over the selected tests, and the problems: failures, errors, skips on
    a CUDA machine (unless expected there), tests that did not run (time)."""
    header = next((r for r in records if "selected" in r), None)
    if header is None:
        return {"counts": {}, "problems": ["pytest collected nothing (see the log)"], "tests": 0}
    outcome = {}
    detail = {}
    for r in records:
        if "nodeid" not in r:
            continue
        # a teardown error after a pass makes the test an error; a setup skip stays a skip
        if r["nodeid"] not in outcome or r["outcome"] in ("failed", "error"):
            outcome[r["nodeid"]] = r["outcome"]
            detail[r["nodeid"]] = r["detail"]
    counts, problems = {}, []
    for nodeid in header["selected"]:
        o = outcome.get(nodeid, NO_TIME)
        counts[o] = counts.get(o, 0) + 1
        d = detail.get(nodeid, "")
        if o in ("failed", "error", "xpassed"):
            problems.append(f"{o}: `{nodeid}`: {d}")
        elif o == "skipped" and on_cuda and not EXPECTED_SKIP_ON_CUDA.search(d):
            problems.append(f"skipped on a CUDA machine: `{nodeid}`: {d}")
        elif o == NO_TIME:
            problems.append(f"{NO_TIME}: `{nodeid}`")
    return {"counts": counts, "problems": problems, "tests": len(header["selected"])}


# ---- stage: kernel benchmarks (run in a subprocess) --------------------------------------------


@dataclasses.dataclass(frozen=True)
class KernelSizes:
    copy_bytes: int
    adam_params: int
    adam_tensors: int
    norm_shapes: tuple
    repeats: int
    warmup: int
    attention: tuple  # (batch, heads, seq, head dim) per model


GPU_SIZES = KernelSizes(
    copy_bytes=2 << 30,
    adam_params=512_000_000,
    adam_tensors=256,
    norm_shapes=((16384, 2048), (8192, 4096)),
    repeats=15,
    warmup=3,
    attention=((8, 16, 2048, 64), (4, 16, 2048, 128)),
)
TINY_SIZES = KernelSizes(
    copy_bytes=8 << 20,
    adam_params=400_000,
    adam_tensors=8,
    norm_shapes=((256, 256),),
    repeats=3,
    warmup=1,
    attention=(),
)
ADAM_HYPER = dict(lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
COPY_GOAL = 0.85  # fused AdamW's bytes per second / the device-to-device copy's
RATIO_GOAL = 1.0  # fused AdamW and the norms against torch


def tensor_sizes(numel: int, tensors: int) -> list:
    """`tensors` sizes from 1/2 to 3/2 of the mean (a model's mix, deterministic), about
    `numel` in all."""
    weights = [0.5 + (i * 37 % tensors) / tensors for i in range(tensors)]
    total = sum(weights)
    return [max(1, round(numel * w / total)) for w in weights]


def _bench():
    if BENCH not in sys.path:
        sys.path.insert(0, BENCH)
    import kernels

    return kernels


def _free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _comparison(row, group, baseline, bytes_moved, copy_gbps, goal_ratio=None, goal_pct=None):
    """A kernels.compare row as the report's: times, ratio, bandwidth and its share of the copy."""
    gbps = bytes_moved / (row["ours_ms"] * 1e-3) / 1e9
    return {
        "case": row["case"],
        "group": group,
        "baseline": baseline,
        "ours_ms": row["ours_ms"],
        "baseline_ms": row["baseline_ms"],
        "ratio": row["ratio"],
        "ratio_paired": row["ratio_paired"],
        "GBps": gbps,
        "pct_copy": gbps / copy_gbps if copy_gbps else None,
        "goal_ratio": goal_ratio,
        "goal_pct": goal_pct,
    }


def case_copy(device, sizes, kb, copy_gbps):
    """Device-to-device copy of a large buffer: the bandwidth ceiling, read + write bytes."""
    src = torch.empty(sizes.copy_bytes // 4, device=device).uniform_()
    dst = torch.empty_like(src)
    for _ in range(3 * sizes.warmup):
        dst.copy_(src)
    times = [kb.timed(lambda: dst.copy_(src), device) for _ in range(2 * sizes.repeats)]
    t = statistics.median(times)
    yield {
        "case": f"device-to-device copy, {sizes.copy_bytes / 2**20:g} MiB",
        "group": "copy",
        "ms": t * 1e3,
        "GBps": 2 * sizes.copy_bytes / t / 1e9,
    }


def _adam_inputs(device, sizes):
    gen = torch.Generator(device=device).manual_seed(0)
    lens = tensor_sizes(sizes.adam_params, sizes.adam_tensors)
    params = [torch.randn(n, generator=gen, device=device) for n in lens]
    grads = [torch.randn(n, generator=gen, device=device) * 1e-3 for n in lens]
    return params, grads, sum(lens)


def _with_grads(params, grads, dtype=torch.float32):
    ps = [torch.nn.Parameter(p.to(dtype, copy=True)) for p in params]
    for p, g in zip(ps, grads):
        p.grad = g.to(dtype, copy=True)
    return ps


def _apex(module):
    try:
        return __import__(module, fromlist=["_"])
    except Exception:  # apex missing, or built for another torch/CUDA: no apex column
        return None


def case_adamw_fp32(device, sizes, kb, copy_gbps):
    """FusedAdamW().step() against torch.optim.AdamW(fused=True).step() (and apex's FusedAdam),
    fp32 params and grads: 28 bytes per param (read p, g, m, v; write p, m, v)."""
    from megalite.optim import FusedAdamW

    p0, g0, numel = _adam_inputs(device, sizes)
    name = f"AdamW fp32, {numel / 1e6:.4g}M params in {len(p0)} tensors"
    ours = FusedAdamW(_with_grads(p0, g0), **ADAM_HYPER)
    bytes_moved = 28 * numel
    baselines = {"torch.optim.AdamW(fused=True)": torch.optim.AdamW}
    apex = _apex("apex.optimizers")
    if apex is not None and device.type == "cuda":
        baselines["apex FusedAdam"] = apex.FusedAdam
    for label, cls in baselines.items():
        extra = {"fused": True} if cls is torch.optim.AdamW else {"adam_w_mode": True}
        base = cls(_with_grads(p0, g0), **ADAM_HYPER, **extra)
        row = kb.compare(name, ours.step, base.step, device, sizes.repeats, warmup=sizes.warmup)
        is_torch = cls is torch.optim.AdamW
        yield _comparison(
            row,
            "adamw_fp32",
            label,
            bytes_moved,
            copy_gbps,
            goal_ratio=RATIO_GOAL if is_torch else None,
            goal_pct=COPY_GOAL if is_torch else None,
        )
        del base
        _free(device)


def case_adamw_mixed(device, sizes, kb, copy_gbps):
    """The mixed-precision step: fp32 master params and moments, bf16 grads, a bf16 model copy
    written in the same pass (ops.fused_adamw_, check_finite=False as the trainer calls it):
    28 bytes per param (read 4+2+4+4, write 4+4+4+2). torch's way to the same result: the grads
    upcast into the masters' .grad, AdamW(fused=True), the masters copied to the model."""
    import megalite.ops as ops

    p0, g0, numel = _adam_inputs(device, sizes)
    name = f"AdamW mixed (fp32 master, bf16 grads + copy), {numel / 1e6:.4g}M params"
    master = [p.clone() for p in p0]
    grads = [g.bfloat16() for g in g0]
    m = [torch.zeros_like(p) for p in master]
    v = [torch.zeros_like(p) for p in master]
    copies = [p.bfloat16() for p in master]
    step = [0]
    beta1, beta2 = ADAM_HYPER["betas"]
    hyper = dict(lr=ADAM_HYPER["lr"], beta1=beta1, beta2=beta2, eps=ADAM_HYPER["eps"])

    def ours():
        step[0] += 1
        ops.fused_adamw_(
            master,
            grads,
            m,
            v,
            weight_decay=ADAM_HYPER["weight_decay"],
            step=step[0],
            model_copies=copies,
            check_finite=False,
            **hyper,
        )

    t_master = _with_grads(p0, g0)
    t_grads = [g.bfloat16() for g in g0]
    t_copies = [p.bfloat16() for p in p0]
    opt = torch.optim.AdamW(t_master, **ADAM_HYPER, fused=True)
    t_master_grads = [p.grad for p in t_master]

    def baseline():
        torch._foreach_copy_(t_master_grads, t_grads)
        opt.step()
        torch._foreach_copy_(t_copies, t_master)

    row = kb.compare(name, ours, baseline, device, sizes.repeats, warmup=sizes.warmup)
    yield _comparison(
        row,
        "adamw_mixed",
        "torch: grads upcast + AdamW(fused=True) + copy to bf16",
        28 * numel,
        copy_gbps,
        goal_ratio=RATIO_GOAL,
        goal_pct=COPY_GOAL,
    )


def case_norms(device, sizes, kb, copy_gbps):
    """LayerNorm and RMSNorm fwd+bwd, bf16, megalite against torch (F.layer_norm, F.rms_norm)
    and apex's fused functions when importable; bytes: x, y; dy, x, dx."""
    apex = _apex("apex.normalization.fused_layer_norm") if device.type == "cuda" else None
    for kind in ("layer_norm", "rms_norm"):
        for rows, hidden in sizes.norm_shapes:
            sides, make, bytes_moved = kb.norm_fwd_bwd(device, kind, rows, hidden, torch.bfloat16)
            baselines = {f"F.{kind}": sides["torch"]}
            if apex is not None and kind == "layer_norm":
                baselines["apex"] = make(
                    lambda x, w, b, eps: apex.fused_layer_norm_affine(x, w, b, (hidden,), eps)
                )
            elif apex is not None:
                baselines["apex"] = make(
                    lambda x, w, b, eps: apex.fused_rms_norm_affine(x, w, (hidden,), eps)
                )
            name = f"{kind} {rows}x{hidden} bf16 fwd+bwd"
            for label, fn in baselines.items():
                row = kb.compare(
                    name, sides["ours"], fn, device, sizes.repeats, warmup=sizes.warmup
                )
                goal = RATIO_GOAL if label.startswith("F.") else None
                yield _comparison(row, kind, label, bytes_moved, copy_gbps, goal_ratio=goal)
            del sides, make, baselines
            _free(device)


def case_grad_norm(device, sizes, kb, copy_gbps):
    """The grad norm's pass (ops.sum_of_squares) against torch._foreach_norm, fp32 grads."""
    row = kb.bench_sum_of_squares(
        device, sizes.adam_params, sizes.adam_tensors, sizes.repeats, warmup=sizes.warmup
    )
    yield _comparison(row, "grad_norm", "torch._foreach_norm", 4 * sizes.adam_params, copy_gbps)


def case_flash_attention(device, sizes, kb, copy_gbps):
    """Whether SDPA's flash backend runs at the models' attention shapes (bf16, causal): torch
    tries it first, so where it runs, the trainer's attention is flash attention."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for b, h, s, d in sizes.attention:
        q, k, v = (torch.randn(b, h, s, d, device=device, dtype=torch.bfloat16) for _ in "qkv")
        try:
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                F.scaled_dot_product_attention(q, k, v, is_causal=True)
            torch.cuda.synchronize(device)
            value = "runs (the backend torch picks first)"
        except RuntimeError as e:
            value = f"not available: {str(e).splitlines()[0][:200]}"
        yield {
            "case": f"flash attention (SDPA), [{b}, {h}, {s}, {d}] bf16 causal",
            "group": "info",
            "value": value,
        }


KERNEL_CASES = (
    case_copy,
    case_adamw_fp32,
    case_adamw_mixed,
    case_norms,
    case_grad_norm,
    case_flash_attention,
)


def kernels_child(results_path, device_name, tiny) -> int:
    """Run every kernel case, appending each row to results_path as soon as it is measured;
    a case that raises is recorded and the next one runs."""
    sys.path.insert(0, REPO)
    device = torch.device(device_name)
    sizes = TINY_SIZES if tiny else GPU_SIZES
    if device.type == "cpu":
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    kb = _bench()
    copy_gbps = None
    with open(results_path, "a", buffering=1) as out:
        for case in KERNEL_CASES:
            try:
                for row in case(device, sizes, kb, copy_gbps):
                    if row["group"] == "copy":
                        copy_gbps = row["GBps"]
                    out.write(json.dumps(row) + "\n")
            except (
                Exception
            ) as e:  # recorded (the report lists it as a problem); the next case runs
                what = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
                out.write(json.dumps({"case": case.__name__, "group": "error", "error": what}))
                out.write("\n")
            _free(device)
    return 0


# ---- stage: training ---------------------------------------------------------------------------

# GPT-3 Medium and XL shapes (GPT-2 style: learned positions, LayerNorm, GeLU, tied head).
MODELS = {
    "GPT 1.3B": dict(num_layers=24, hidden_size=2048, num_attention_heads=16, micro_batch=4),
    "GPT 350M": dict(num_layers=24, hidden_size=1024, num_attention_heads=16, micro_batch=8),
}
TINY_MODELS = {"GPT tiny": dict(num_layers=2, hidden_size=64, num_attention_heads=4, micro_batch=2)}


@dataclasses.dataclass(frozen=True)
class TrainShape:
    seq_length: int
    vocab_size: int
    micro_batches: int  # per iteration (gradient accumulation): the optimizer step amortised
    train_iters: int
    log_interval: int
    warmup_iters: int  # logged windows ending at or before this are left out of the medians


GPU_TRAIN = TrainShape(2048, 50257, 4, 24, 2, 6)
TINY_TRAIN = TrainShape(64, 512, 1, 6, 1, 2)
MFU_GOAL = 0.50  # GPT 1.3B, bf16, megalite's kernels


def train_command(model: dict, shape: TrainShape, device: str, kernels: str, metrics: str):
    """(argv, env) of one training run through the trainer's real command line."""
    flags = {
        "--num-layers": model["num_layers"],
        "--hidden-size": model["hidden_size"],
        "--num-attention-heads": model["num_attention_heads"],
        "--seq-length": shape.seq_length,
        "--vocab-size": shape.vocab_size,
        "--micro-batch-size": model["micro_batch"],
        "--global-batch-size": model["micro_batch"] * shape.micro_batches,
        "--train-iters": shape.train_iters,
        "--log-interval": shape.log_interval,
        "--eval-interval": 10**9,
        "--split": "100,0,0",
        "--lr": 1e-4,
        "--device": device,
        "--metrics-file": metrics,
    }
    argv = [sys.executable, "-m", "megalite.train", "--mock-data", "--model-style", "gpt2"]
    argv += ["--bf16"] + [str(x) for kv in flags.items() for x in kv]
    extra = {"MEGALITE_KERNELS": "reference"} if kernels == "reference" else {}
    if device == "cpu":
        extra["OMP_NUM_THREADS"] = "1"
    return argv, child_env(**extra)


def summarise_training(records: list, warmup_iters: int) -> dict | None:
    """Medians over the logged windows after the warm-up (tokens/s, TFLOP/s, MFU, iteration
    time) and the peak memory; None when no window after the warm-up was logged."""
    timed = [r for r in records if "tokens_per_sec" in r and r["iteration"] > warmup_iters]
    if not timed:
        return None
    mfus = [r["mfu"] for r in timed if r.get("mfu") is not None]
    return {
        "tokens_per_sec": statistics.median(r["tokens_per_sec"] for r in timed),
        "tflops": statistics.median(r["tflops_per_device"] for r in timed),
        "mfu": statistics.median(mfus) if mfus else None,
        "iter_ms": statistics.median(r["iter_time_s"] for r in timed) * 1e3,
        "mem_gb": max(r["mem_peak_gb"] for r in records if "mem_peak_gb" in r),
        "windows": len(timed),
        "last_iteration": max(r["iteration"] for r in records if "iteration" in r),
        "loss": timed[-1]["loss"],
    }


# ---- the report --------------------------------------------------------------------------------


def _fmt(x, spec, unit=""):
    return "n/a" if x is None else f"{x:{spec}}{unit}"


def _met(value, goal):
    if goal is None:
        return ""
    if value is None:
        return "not measured"
    return "met" if value >= goal else "**not met**"


class Report:
    """The markdown report: a header, a goal summary, one section per stage. write() replaces the
    file whole (written to a temporary name, then renamed), after every change."""

    def __init__(self, path, info, plan):
        self.path, self.info = path, info
        self.t0 = time.monotonic()
        self.sections = {s: f"{NO_TIME}." for s in plan}
        self.goals = []  # (what, figure, goal, met)
        self.problems = []
        self.status = "running"

    def elapsed(self):
        return time.monotonic() - self.t0

    def set(self, stage, text):
        self.sections[stage] = text
        self.write()

    def render(self) -> str:
        out = ["# megalite gpu-check", ""]
        out += ["| | |", "|---|---|"]
        out += [f"| {k} | {v} |" for k, v in self.info.items()]
        out += [f"| run | {self.status}, {self.elapsed():.0f} s |", ""]
        out += ["## Goals", "", "| check | figure | goal | result |", "|---|---|---|---|"]
        out += [f"| {w} | {f} | {g} | {m} |" for w, f, g, m in self.goals] or ["| none yet |||"]
        out += [""]
        if self.problems:
            out += ["## Problems", ""] + [f"- {p}" for p in self.problems] + [""]
        for stage, text in self.sections.items():
            out += [f"## {stage}", "", text.rstrip(), ""]
        return "\n".join(out)

    def write(self):
        if not self.path:
            return
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, exist_ok=True)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.write(self.render())
        os.replace(tmp, self.path)


def render_tests(summary: dict, rc, seconds, log_path) -> str:
    counts = ", ".join(f"{n} {o}" for o, n in sorted(summary["counts"].items())) or "none"
    text = f"{summary['tests']} CUDA tests selected: {counts} ({seconds:.0f} s"
    text += ", cut at its timeout)" if rc is None else f", pytest exit status {rc})"
    if summary["problems"]:
        text += "\n\n" + "\n".join(f"- {p}" for p in summary["problems"][:40])
        if len(summary["problems"]) > 40:
            text += f"\n- ... {len(summary['problems']) - 40} more (see {log_path})"
    return text


def render_kernels(rows: list) -> str:
    copy = next((r for r in rows if r["group"] == "copy"), None)
    lines = []
    if copy:
        lines.append(
            f"Copy bandwidth: **{copy['GBps']:.0f} GB/s** ({copy['case']}, "
            f"{copy['ms']:.3f} ms, bytes read + written)."
        )
        lines.append("")
    lines += [
        "| case | against | ours ms | theirs ms | speed-up | paired | GB/s | % of copy |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["group"] in ("copy", "info", "error"):
            continue
        lines.append(
            f"| {r['case']} | {r['baseline']} | {r['ours_ms']:.3f} | {r['baseline_ms']:.3f} | "
            f"{r['ratio']:.2f}x | {r['ratio_paired']:.2f}x | {r['GBps']:.0f} | "
            f"{_fmt(r['pct_copy'] and 100 * r['pct_copy'], '.0f', '%')} |"
        )
    for r in rows:
        if r["group"] == "info":
            lines += ["", f"- {r['case']}: {r['value']}"]
        elif r["group"] == "error":
            lines += ["", f"- **{r['case']} failed**: {r['error']}"]
    return "\n".join(lines)


def kernel_goals(rows: list) -> list:
    """(what, figure, goal, met) of every kernel row that has a goal."""
    goals = []
    for r in rows:
        if r.get("goal_pct") is not None:
            pct = r["pct_copy"]
            goals.append(
                (
                    f"{r['case']}: bandwidth",
                    _fmt(pct and 100 * pct, ".0f", "% of copy"),
                    f">= {100 * r['goal_pct']:.0f}%",
                    _met(pct, r["goal_pct"]),
                )
            )
        if r.get("goal_ratio") is not None:
            goals.append(
                (
                    f"{r['case']}: vs {r['baseline']}",
                    f"{r['ratio']:.2f}x",
                    f">= {r['goal_ratio']:.1f}x",
                    _met(r["ratio"], r["goal_ratio"]),
                )
            )
    return goals


def render_training(runs: list) -> str:
    lines = [
        "| model | kernels | status | tokens/s | TFLOP/s | MFU | ms/iter | peak mem GiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        s = run.get("summary")
        if s is None:
            lines.append(f"| {run['model']} | {run['kernels']} | {run['status']} |||||")
            continue
        lines.append(
            f"| {run['model']} | {run['kernels']} | {run['status']} | "
            f"{s['tokens_per_sec']:,.0f} | {s['tflops']:.3g} | "
            f"{_fmt(s['mfu'] and 100 * s['mfu'], '.1f', '%')} | {s['iter_ms']:.0f} | "
            f"{s['mem_gb']:.1f} |"
        )
    by = {(r["model"], r["kernels"]): r.get("summary") for r in runs}
    for model in dict.fromkeys(r["model"] for r in runs):
        fused, ref = by.get((model, "megalite")), by.get((model, "reference"))
        if fused and ref:
            speedup = fused["tokens_per_sec"] / ref["tokens_per_sec"]
            lines += ["", f"- {model}: megalite's kernels / reference = {speedup:.2f}x tokens/s"]
    for run in runs:
        if run.get("tail"):
            lines += [
                "",
                f"{run['model']} ({run['kernels']}), the end of its log:",
                "",
                "```",
                run["tail"],
                "```",
            ]
    return "\n".join(lines)


# ---- the driver --------------------------------------------------------------------------------


class Terminated(Exception):
    pass


def _on_sigterm(signum, frame):
    raise Terminated()


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--report", default="gpu-check.md", help="markdown report (default %(default)s)")
    p.add_argument(
        "--time-limit",
        type=float,
        default=480.0,
        help="seconds for everything, build included (default %(default)s)",
    )
    p.add_argument(
        "--work-dir",
        default=os.path.join(REPO, "build", "gpu-check"),
        help="logs, metrics and results files (default build/gpu-check)",
    )
    p.add_argument(
        "--micro-batch-size",
        action="append",
        default=[],
        metavar="MODEL=N",
        help="override a model's micro-batch size, e.g. 1.3B=8 (repeatable)",
    )
    p.add_argument("--skip-build", action="store_true", help="use the kernels already built")
    p.add_argument("--commit", help="the megalite commit to report, where the checkout has no .git")
    hidden = argparse.SUPPRESS
    p.add_argument("--device", choices=["cuda", "cpu"], default=None, help=hidden)
    p.add_argument("--tiny", action="store_true", help=hidden)
    p.add_argument("--tests-path", action="append", default=None, help=hidden)
    p.add_argument("--pytest-child", metavar="RESULTS", help=hidden)
    p.add_argument("--kernels-child", metavar="RESULTS", help=hidden)
    p.add_argument("pytest_args", nargs="*", help=hidden)
    return p.parse_args(argv)


def models_for(args) -> dict:
    models = {k: dict(v) for k, v in (TINY_MODELS if args.tiny else MODELS).items()}
    for item in args.micro_batch_size:
        key, _, n = item.partition("=")
        match = [m for m in models if m.split()[-1].lower() == key.strip().lower()]
        if not match or not n.isdigit() or int(n) < 1:
            sys.exit(
                f"error: --micro-batch-size {item}: want MODEL=N, MODEL one of "
                f"{[m.split()[-1] for m in models]}"
            )
        models[match[0]]["micro_batch"] = int(n)
    return models


class Check:
    """One gpu-check run: the stages in order against one deadline, writing the report."""

    def __init__(self, args, device):
        self.args, self.device = args, device
        self.deadline = time.monotonic() + args.time_limit
        self.work = args.work_dir
        os.makedirs(self.work, exist_ok=True)
        self.models = models_for(args)
        self.shape = TINY_TRAIN if args.tiny else GPU_TRAIN
        self.train_runs = [(m, k) for m in self.models for k in ("megalite", "reference")]
        self.plan = stage_plan(self.train_runs)
        sections = ["build", "CUDA tests", "kernels", "training"]
        self.report = Report(args.report, machine_info(device, args.commit), sections)
        self.built = args.skip_build
        self.train_results = []

    def timeout_for(self, index):
        left = self.deadline - time.monotonic() - 3  # the last report write
        return stage_timeout(left, self.plan[index], self.plan[index + 1 :])

    def problem(self, text):
        self.report.problems.append(text)

    def started(self, section, what):
        self.report.set(
            section,
            f"{what}: started at +{self.report.elapsed():.0f} s, not "
            "finished (the run ended first).",
        )

    def stage_build(self, timeout):
        if self.args.skip_build:
            self.report.set("build", "skipped (--skip-build): the kernels already built are used.")
            return
        if self.device.type != "cuda":
            self.built = True  # nothing to build for the CPU: the installed kernels run
            self.report.set("build", "skipped: no CUDA device (the installed kernels are used).")
            return
        self.started("build", "build")
        cap = torch.cuda.get_device_capability(self.device)
        argv, env = build_command(cap, os.cpu_count() or 1)
        log = os.path.join(self.work, "build.log")
        rc, secs = Children.run(argv, env, timeout, log)
        text = (
            f"`{' '.join(argv[1:])}` with TORCH_CUDA_ARCH_LIST={env['TORCH_CUDA_ARCH_LIST']}, "
            f"MAX_JOBS={env['MAX_JOBS']}: "
        )
        if rc == 0:
            check = _run_text([sys.executable, "-c", IMPORT_CHECK], timeout=60)
            if check:
                self.built = True
                text += f"built in {secs:.0f} s; imports: `{check}`."
                env_report = _run_text([sys.executable, "-m", "megalite.env"], timeout=60)
                text += f"\n\n`python -m megalite.env`:\n\n```\n{env_report or '(failed)'}\n```"
            else:
                text += f"built in {secs:.0f} s, but `import megalite._cuda` fails."
        else:
            why = f"cut at {timeout:.0f} s" if rc is None else f"exit status {rc}"
            text += f"**failed** ({why}, {secs:.0f} s). The end of {log}:\n\n```\n"
            text += log_tail(log) + "\n```"
        if not self.built:
            self.problem("the build failed: the CUDA tests and kernels are not megalite's")
        self.report.set("build", text)

    def stage_tests(self, timeout):
        self.started("CUDA tests", "pytest")
        results = os.path.join(self.work, "tests.jsonl")
        if os.path.exists(results):
            os.remove(results)
        log = os.path.join(self.work, "tests.log")
        paths = self.args.tests_path or ["tests"]
        argv = [sys.executable, os.path.abspath(__file__), "--pytest-child", results, "--"]
        argv += ["-q", "-rs", "-p", "no:cacheprovider", *paths]
        rc, secs = Children.run(argv, child_env(), timeout, log)
        summary = summarise_tests(read_jsonl(results), self.device.type == "cuda")
        counts = summary["counts"]
        passed = counts.get("passed", 0)
        ok = not summary["problems"] and passed > 0
        self.report.goals.append(
            (
                "CUDA tests",
                f"{passed}/{summary['tests']} passed",
                "all pass, none skipped",
                "met" if ok else "**not met**",
            )
        )
        for p in summary["problems"][:10]:
            self.problem(f"CUDA tests: {p}")
        if rc is None:
            self.problem(f"CUDA tests: cut at their {timeout:.0f} s timeout")
        self.report.set("CUDA tests", render_tests(summary, rc, secs, log))

    def stage_kernels(self, timeout):
        if not self.built:
            self.report.set("kernels", "not run: the build failed (this would time fallbacks).")
            return
        self.started("kernels", "kernel benchmarks")
        results = os.path.join(self.work, "kernels.jsonl")
        if os.path.exists(results):
            os.remove(results)
        log = os.path.join(self.work, "kernels.log")
        argv = [sys.executable, os.path.abspath(__file__), "--kernels-child", results]
        argv += ["--device", self.device.type] + (["--tiny"] if self.args.tiny else [])
        rc, secs = Children.run(argv, child_env(), timeout, log)
        rows = read_jsonl(results)
        text = render_kernels(rows)
        text += f"\n\n({len(rows)} rows in {secs:.0f} s"
        if rc is None:
            text += f"; cut at its {timeout:.0f} s timeout: the cases after these did not run)"
            self.problem("kernels: cut at their timeout")
        elif rc != 0:
            text += f"; exit status {rc}). The end of {log}:\n\n```\n{log_tail(log)}\n```"
            self.problem(f"kernels: exit status {rc}")
        else:
            text += ")"
        for r in rows:
            if r["group"] == "error":
                self.problem(f"kernels: {r['case']} failed: {r['error']}")
        self.report.goals.extend(kernel_goals(rows))
        self.report.set("kernels", text)

    def stage_train(self, model_name, kernels, timeout):
        metrics = os.path.join(self.work, f"train-{model_name.split()[-1]}-{kernels}.jsonl")
        if os.path.exists(metrics):
            os.remove(metrics)
        log = metrics.replace(".jsonl", ".log")
        argv, env = train_command(
            self.models[model_name], self.shape, self.device.type, kernels, metrics
        )
        run = {"model": model_name, "kernels": kernels, "status": "running"}
        self.train_results.append(run)
        self.report.set("training", self._training_text())
        rc, secs = Children.run(argv, env, timeout, log)
        run["summary"] = summarise_training(read_jsonl(metrics), self.shape.warmup_iters)
        if rc == 0 and run["summary"]:
            run["status"] = f"ok ({secs:.0f} s)"
        else:
            why = f"cut at {timeout:.0f} s" if rc is None else f"exit status {rc}"
            if rc == 0:
                why = f"no window logged after iteration {self.shape.warmup_iters}"
            run["status"] = f"**{why}**"
            run["tail"] = log_tail(log, 12)
            self.problem(f"training {model_name} ({kernels}): {why}")
        if kernels == "megalite" and "1.3B" in model_name:
            mfu = run["summary"] and run["summary"]["mfu"]
            self.report.goals.append(
                (
                    f"{model_name} bf16 MFU (megalite's kernels)",
                    _fmt(mfu and 100 * mfu, ".1f", "%"),
                    f">= {100 * MFU_GOAL:.0f}%",
                    _met(mfu, MFU_GOAL),
                )
            )
        self.report.set("training", self._training_text())

    def _training_text(self):
        m = self.shape
        head = (
            "`python -m megalite.train --mock-data --model-style gpt2 --bf16`, "
            f"seq {m.seq_length}, vocab {m.vocab_size}, "
            f"micro-batches per iteration: {m.micro_batches}, "
            f"{m.train_iters} iterations, medians of the windows of {m.log_interval} logged after "
            f"iteration {m.warmup_iters}; attention: F.scaled_dot_product_attention. Shapes: "
            + "; ".join(
                f"{k} = {v['num_layers']} layers, hidden {v['hidden_size']}, "
                f"{v['num_attention_heads']} heads, micro-batch {v['micro_batch']}"
                for k, v in self.models.items()
            )
            + ". `reference`: MEGALITE_KERNELS=reference."
        )
        if not self.built:
            head += " **The build failed: both kernels columns ran megalite's fallbacks.**"
        done = {(r["model"], r["kernels"]) for r in self.train_results}
        pending = [
            {"model": m, "kernels": k, "status": NO_TIME}
            for m, k in self.train_runs
            if (m, k) not in done
        ]
        return head + "\n\n" + render_training(self.train_results + pending)

    def run(self) -> int:
        steps = [self.stage_build, self.stage_tests, self.stage_kernels]
        steps += [lambda t, m=m, k=k: self.stage_train(m, k, t) for m, k in self.train_runs]
        section_of = ["build", "CUDA tests", "kernels"] + ["training"] * len(self.train_runs)
        self.report.write()
        try:
            for i, step in enumerate(steps):
                timeout = self.timeout_for(i)
                if timeout is None:
                    self.problem(f"{self.plan[i].name}: {NO_TIME}")
                    if section_of[i] == "training":
                        self.report.set("training", self._training_text())
                    continue
                print(
                    f"gpu-check: {self.plan[i].name} (up to {timeout:.0f} s) at "
                    f"+{self.report.elapsed():.0f} s",
                    file=sys.stderr,
                    flush=True,
                )
                try:
                    step(timeout)
                except Terminated:
                    raise
                except Exception as e:  # a broken stage is reported; the next one runs
                    self.problem(f"{self.plan[i].name} raised {type(e).__name__}: {e}")
            self.report.status = "finished"
        except Terminated:
            Children.kill()
            self.report.status = "stopped by SIGTERM"
            self.problem("stopped by SIGTERM before the end")
        self.report.write()
        return 1 if self.report.problems else 0


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.pytest_child:
        return pytest_child(args.pytest_child, args.pytest_args)
    if args.kernels_child:
        return kernels_child(args.kernels_child, args.device or "cuda", args.tiny)
    if args.device is None and not torch.cuda.is_available():
        print(
            f"gpu-check: no CUDA device (torch {torch.__version__}, cuda available: False): "
            "nothing to check"
        )
        return 0
    sys.path.insert(0, REPO)
    signal.signal(signal.SIGTERM, _on_sigterm)
    device = torch.device(args.device or "cuda")
    check = Check(args, device)
    rc = check.run()
    print(check.report.render())
    if args.report:
        print(f"\ngpu-check: report written to {args.report}", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
