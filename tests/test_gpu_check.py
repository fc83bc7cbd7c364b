"""tools/gpu_check.py (`make gpu-check`): its plan, test selection and summaries as functions, and
its real command line on the CPU (`--device cpu --tiny`: the same stages at tiny sizes), since the
one GPU run it gets must work the first time."""

import os
import signal
import statistics
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from conftest import REPO, run_cli

sys.path.insert(0, os.path.join(REPO, "tools"))
import gpu_check as gc  # noqa: E402

from megalite.config import parse_config  # noqa: E402
from megalite.layout import padded_vocab_size  # noqa: E402
from megalite.model.gpt import num_parameters  # noqa: E402

# ---- the plan ----------------------------------------------------------------------------------


def test_stage_timeout_keeps_the_later_stages_floors():
    build, tests = gc.Stage("build", cap=240, floor=60), gc.Stage("tests", cap=120, floor=20)
    later = [tests, gc.Stage("train", cap=80, floor=25)]
    assert gc.stage_timeout(1000, build, later) == 240  # capped
    assert gc.stage_timeout(200, build, later) == 200 - 45  # leaves 45 s for the rest
    assert gc.stage_timeout(100, build, later) is None  # 55 s < its 60 s floor: not run
    assert gc.stage_timeout(30, tests, []) == 30
    assert gc.stage_timeout(19, tests, []) is None


def test_the_default_plan_fits_the_default_time_limit():
    """Even when every stage runs to its timeout, each one starts (with at least its floor) and
    the last ends before the deadline: a cut-short stage never starves the ones after it."""
    args = gc.parse_args([])
    runs = [(m, k) for m in gc.models_for(args) for k in ("megalite", "reference")]
    plan = gc.stage_plan(runs)
    assert [s.name for s in plan[:3]] == ["build", "tests", "kernels"] and len(plan) == 7
    left = args.time_limit - 3  # what Check.timeout_for leaves for the last report write
    for i, stage in enumerate(plan):
        timeout = gc.stage_timeout(left, stage, plan[i + 1 :])
        assert timeout is not None and timeout >= stage.floor, stage
        left -= timeout
    assert left >= 0


def test_build_command_targets_this_gpu_only():
    argv, env = gc.build_command((9, 0), cores=16)
    assert argv[1:] == ["setup.py", "build_ext", "--inplace"]
    assert env["TORCH_CUDA_ARCH_LIST"] == "9.0"
    assert env["MEGALITE_BUILD_CUDA"] == "1" and env["MAX_JOBS"] == "16"
    assert gc.build_command((8, 6), 4)[1]["TORCH_CUDA_ARCH_LIST"] == "8.6"


# ---- test selection and the tests' summary -----------------------------------------------------


@pytest.mark.parametrize(
    "nodeid, reasons, expected",
    [
        ("tests/test_kernels_cuda.py::test_norms[64]", [], True),
        ("tests/test_x.py::test_step_syncs", ["needs a CUDA device"], True),
        ("tests/test_x.py::test_step_syncs", ["needs GPUs"], True),
        ("tests/test_x.py::test_thing", ["megalite._cuda not built"], True),
        ("tests/test_x.py::test_thing", ["nvcc not found"], False),
        ("tests/test_x.py::test_thing", [], False),
        ("tests/test_gpu_check.py::test_summary", [], False),
    ],
    ids=["named", "reason", "plural", "module", "nvcc", "plain", "gpu-named"],
)
def test_selection_of_gpu_tests(nodeid, reasons, expected):
    assert gc.is_cuda_test(nodeid, reasons) is expected


def _records(*results):
    selected = [r[0] for r in results]
    recs = [{"selected": selected, "deselected": 3}]
    for nodeid, outcome, detail in results:
        if outcome is not None:
            recs.append({"nodeid": nodeid, "outcome": outcome, "when": "call", "detail": detail})
    return recs


def test_summarise_tests_counts_and_problems():
    recs = _records(
        ("t::a", "passed", ""),
        ("t::b", "failed", "assert 1 == 2"),
        ("t::c", "skipped", "needs a CUDA device"),
        ("t::d", "skipped", "torch has CUDA: the forced build can succeed"),
        ("t::e", None, ""),  # never reported: the run was cut
    )
    recs.append({"nodeid": "t::a", "outcome": "error", "when": "teardown", "detail": "boom"})
    on_gpu = gc.summarise_tests(recs, on_cuda=True)
    assert on_gpu["tests"] == 5
    assert on_gpu["counts"] == {"error": 1, "failed": 1, "skipped": 2, gc.NO_TIME: 1}
    problems = "\n".join(on_gpu["problems"])
    assert "error: `t::a`: boom" in problems and "failed: `t::b`: assert 1 == 2" in problems
    assert "skipped on a CUDA machine: `t::c`" in problems
    assert "t::d" not in problems  # a test of the machine without CUDA skips rightly there
    assert f"{gc.NO_TIME}: `t::e`" in problems
    off_gpu = gc.summarise_tests(recs, on_cuda=False)
    assert not any("t::c" in p for p in off_gpu["problems"])  # skips are right off the GPU
    assert gc.summarise_tests([], on_cuda=True)["problems"]  # nothing collected is a problem


# ---- kernels and training: helpers -------------------------------------------------------------


@pytest.mark.parametrize("numel, tensors", [(512_000_000, 256), (400_000, 8), (1000, 3)])
def test_tensor_sizes(numel, tensors):
    sizes = gc.tensor_sizes(numel, tensors)
    assert len(sizes) == tensors
    assert abs(sum(sizes) - numel) <= tensors
    mean = numel / tensors
    assert min(sizes) >= 0.5 * mean - 1 and max(sizes) <= 1.5 * mean + 1
    assert len(set(sizes)) > tensors // 2  # a mix, not one size


def test_kernel_goals_judge_each_row():
    row = {"case": "AdamW fp32", "baseline": "torch", "ratio": 1.2, "pct_copy": 0.8}
    goals = gc.kernel_goals([dict(row, goal_ratio=1.0, goal_pct=0.85)])
    assert [(g[0], g[3]) for g in goals] == [
        ("AdamW fp32: bandwidth", "**not met**"),
        ("AdamW fp32: vs torch", "met"),
    ]
    assert gc.kernel_goals([dict(row, goal_ratio=None, goal_pct=None)]) == []


def _window(it, tps, mfu=0.4, mem=10.0):
    return {"iteration": it, "loss": 5.0, "tokens_per_sec": tps, "tflops_per_device": tps / 100,
            "mfu": mfu, "iter_time_s": 1 / tps, "mem_peak_gb": mem}  # fmt: skip


def test_summarise_training_leaves_out_the_warm_up():
    recs = [_window(2, 10.0, mem=30.0), _window(4, 100.0), _window(6, 110.0), _window(8, 90.0)]
    s = gc.summarise_training(recs, warmup_iters=2)
    assert s["tokens_per_sec"] == 100.0 and s["tflops"] == 1.0 and s["mfu"] == 0.4
    assert s["windows"] == 3 and s["iter_ms"] == pytest.approx(10.0)
    assert s["mem_gb"] == 30.0  # the peak of the whole run, warm-up included
    assert gc.summarise_training(recs, warmup_iters=8) is None
    no_peak = gc.summarise_training([_window(4, 1.0, mfu=None)], warmup_iters=2)
    assert no_peak["mfu"] is None


@pytest.mark.parametrize("kernels", ["megalite", "reference"])
def test_train_command_is_the_trainer_command_line(kernels, monkeypatch, tmp_path):
    """The flags parse with the trainer's own parser into the shapes the report claims."""
    monkeypatch.setenv("MEGALITE_KERNELS", "reference")  # a user's setting must not leak in
    metrics = str(tmp_path / "m.jsonl")
    model = gc.MODELS["GPT 1.3B"]
    argv, env = gc.train_command(model, gc.GPU_TRAIN, "cuda", kernels, metrics)
    assert argv[:3] == [sys.executable, "-m", "megalite.train"]
    assert env.get("MEGALITE_KERNELS") == ("reference" if kernels == "reference" else None)
    cfg = parse_config(argv[3:], world_size=1)
    m, t = cfg.model, cfg.training
    assert (m.num_layers, m.hidden_size, m.num_attention_heads) == (24, 2048, 16)
    assert m.seq_length == 2048 and m.normalization == "LayerNorm"
    assert t.bf16 and t.device == "cuda" and cfg.data.mock_data
    assert t.micro_batch_size == model["micro_batch"]
    assert cfg.num_microbatches == gc.GPU_TRAIN.micro_batches
    assert cfg.logging.metrics_file == metrics
    assert cfg.logging.log_interval == gc.GPU_TRAIN.log_interval
    assert t.train_iters > gc.GPU_TRAIN.warmup_iters + 3 * gc.GPU_TRAIN.log_interval


@pytest.mark.parametrize(
    "name, low, high", [("GPT 350M", 300e6, 420e6), ("GPT 1.3B", 1.2e9, 1.45e9)]
)
def test_models_are_the_sizes_they_are_called(name, low, high):
    argv, _ = gc.train_command(gc.MODELS[name], gc.GPU_TRAIN, "cuda", "megalite", "m.jsonl")
    cfg = parse_config(argv[3:], world_size=1)
    total = num_parameters(cfg.model, padded_vocab_size(gc.GPU_TRAIN.vocab_size, 128, 1))["total"]
    assert low < total < high


def test_micro_batch_override():
    args = gc.parse_args(["--micro-batch-size", "1.3B=8", "--micro-batch-size", "350m=2"])
    models = gc.models_for(args)
    assert models["GPT 1.3B"]["micro_batch"] == 8 and models["GPT 350M"]["micro_batch"] == 2
    assert gc.MODELS["GPT 1.3B"]["micro_batch"] == 4  # the defaults stay
    with pytest.raises(SystemExit):
        gc.models_for(gc.parse_args(["--micro-batch-size", "7B=2"]))


# ---- the command line --------------------------------------------------------------------------

SCRIPT = "tools/gpu_check.py"
SYNTHETIC_TESTS = """
    import time

    import pytest
    import torch

    needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


    def test_cuda_passes():
        pass


    def test_cuda_fails():
        assert 1 == 2, "one is not two"


    @needs_gpu
    def test_on_the_gpu():
        pass


    def test_plain_cpu():  # not a CUDA test: not selected
        pass


    def test_cuda_sleeps():
        time.sleep(float(__import__("os").environ.get("SYNTHETIC_SLEEP", "0")))
"""


@pytest.fixture
def synthetic_tests(tmp_path):
    path = tmp_path / "synthetic" / "test_synthetic.py"
    path.parent.mkdir()
    path.write_text(textwrap.dedent(SYNTHETIC_TESTS))
    return str(path)


def _cpu_args(tmp_path, tests, *extra):
    report = str(tmp_path / "out" / "report.md")
    work = str(tmp_path / "work")
    argv = [SCRIPT, "--device", "cpu", "--tiny", "--skip-build", "--tests-path", tests]
    return argv + ["--report", report, "--work-dir", work, *extra], report, work


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: it would check it")
def test_without_a_gpu_one_line_and_success(tmp_path):
    report = tmp_path / "r.md"
    out = run_cli([SCRIPT, "--report", str(report)], timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        f"gpu-check: no CUDA device (torch {torch.__version__}, cuda available: False): "
        "nothing to check"
    ]
    assert not report.exists()


def test_no_time_leaves_a_report_of_stages_not_run(tmp_path, synthetic_tests):
    argv, report, _ = _cpu_args(tmp_path, synthetic_tests, "--time-limit", "1")
    out = run_cli(argv, timeout=120)
    assert out.returncode == 1, out.stderr
    text = open(report).read()
    assert out.stdout.startswith(text)  # the same report on stdout
    for section in ("## CUDA tests", "## kernels"):
        assert text.split(section)[1].split("##")[0].strip() == f"{gc.NO_TIME}."
    training = text.split("## training")[1]
    assert training.count(f"| {gc.NO_TIME} |") == 2  # both runs of the tiny model
    for stage in ("tests", "kernels", "train GPT tiny megalite", "train GPT tiny reference"):
        assert f"- {stage}: {gc.NO_TIME}" in text


@pytest.mark.slow
def test_cpu_smoke_runs_every_stage(tmp_path, synthetic_tests):
    """The whole check at tiny sizes: pytest through the recorder, every kernel case, the trainer's
    command line twice; the report's figures are the ones in the results files."""
    argv, report, work = _cpu_args(tmp_path, synthetic_tests, "--time-limit", "400")
    out = run_cli(argv, timeout=420)
    text = open(report).read()
    assert out.returncode == 1, text  # the synthetic failure is a problem
    assert "| run | finished" in text

    tests = text.split("## CUDA tests")[1].split("##")[0]
    assert "4 CUDA tests selected: 1 failed, 2 passed, 1 skipped" in tests
    assert "test_plain_cpu" not in text
    assert "failed: `" in tests and "one is not two" in tests

    rows = gc.read_jsonl(os.path.join(work, "kernels.jsonl"))
    errors = [r for r in rows if r["group"] == "error"]
    assert not errors, errors
    groups = [r["group"] for r in rows]
    for group in ("copy", "adamw_fp32", "adamw_mixed", "layer_norm", "rms_norm", "grad_norm"):
        assert group in groups
    copy = rows[groups.index("copy")]
    numel = sum(gc.tensor_sizes(gc.TINY_SIZES.adam_params, gc.TINY_SIZES.adam_tensors))
    for r in rows[1:]:
        assert r["ratio"] == pytest.approx(r["baseline_ms"] / r["ours_ms"])
        assert r["pct_copy"] == pytest.approx(r["GBps"] / copy["GBps"])
        if r["group"].startswith("adamw"):  # 28 bytes per param
            assert r["GBps"] * r["ours_ms"] * 1e6 == pytest.approx(28 * numel)
        assert f"| {r['case']} | {r['baseline']} | {r['ours_ms']:.3f} |" in text

    for kernels in ("megalite", "reference"):
        recs = gc.read_jsonl(os.path.join(work, f"train-tiny-{kernels}.jsonl"))
        timed = [r for r in recs if r["iteration"] > gc.TINY_TRAIN.warmup_iters]
        assert recs[-1]["iteration"] == gc.TINY_TRAIN.train_iters and timed
        tps = statistics.median(r["tokens_per_sec"] for r in timed)
        assert f"| GPT tiny | {kernels} | ok (" in text
        assert f" | {tps:,.0f} | " in text


def _pids_with(fragment):
    """Our own processes whose command line holds `fragment` (a unique temporary path)."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if fragment.encode() in f.read():
                    pids.append(int(pid))
        except OSError:
            pass
    return pids


def test_sigterm_ends_the_stage_and_keeps_the_report(tmp_path, synthetic_tests):
    argv, report, work = _cpu_args(tmp_path, synthetic_tests, "--time-limit", "400")
    env = dict(os.environ, SYNTHETIC_SLEEP="60", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, *argv], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    results = os.path.join(work, "tests.jsonl")
    deadline = time.monotonic() + 120
    while not gc.read_jsonl(results) and time.monotonic() < deadline:  # pytest has collected
        time.sleep(0.5)
    assert _pids_with(results), "the pytest child is not running"
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1
    text = open(report).read()
    assert "| run | stopped by SIGTERM" in text
    assert "## training" in text and f"{gc.NO_TIME}." in text.split("## kernels")[1]
    assert out.decode().startswith(text)
    assert _pids_with(results) == []  # the stage's child went with it
