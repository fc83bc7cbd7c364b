"""Loss spikes and NaNs survived (issue 13): --skip-spike-factor skips an update whose grad norm
is far above its running median, on the device; --rollback-on-nan reloads the last checkpoint
on a non-finite loss or grad norm, skips the data that led there, and goes on (at most K times).

Faults are injected by the tests only: `inject_faults` wraps the loop's train_step and
finalize_model_grads, in-process through monkeypatch, and in `python -m megalite.train` (and
under torchrun) through a sitecustomize.py that the test puts on PYTHONPATH with the spec in
MEGALITE_TEST_FAULTS. Nothing in megalite reads that variable.
"""

import json
import math
import os
import shutil
import statistics
from collections import deque

import pytest
import torch

from conftest import REPO, run_cli, sitecustomize_env, trainer
from megalite.errors import MegaliteError

TESTS = os.path.join(REPO, "tests")
FAULTS_ENV = "MEGALITE_TEST_FAULTS"
LATEST = "latest_checkpointed_iteration.txt"

TINY = (
    "--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 32 "
    "--micro-batch-size 4 --global-batch-size 8 --log-interval 1 --eval-interval 1000 "
    "--eval-iters 2 --lr 3e-3 --lr-warmup-iters 3 --split 95,5,0 --vocab-size 256"
).split()
GBS = 8
SPIKES = ["--skip-spike-factor", "10", "--skip-spike-window", "4"]  # judged from iteration 5


def inject_faults(spec: str, patch=setattr) -> None:
    """Test-only faults, made on rank 0 before the DP grad reduction, which carries them to
    every rank as it would a real one. spec: comma-separated KIND@WHEN; KIND "spike" multiplies
    the step's grads by 1e4, "nan" fills them with nan; WHEN "sN" is the step that starts at N
    consumed samples (its data: a rollback skips it), "iN" iteration N, every time it runs."""
    from megalite.parallel import state
    from megalite.training import loop

    faults = [(kind, when[0], int(when[1:])) for kind, when in
              (item.split("@") for item in spec.split(","))]  # fmt: skip
    current = {}
    real_step, real_finalize = loop.train_step, loop.finalize_model_grads

    def train_step(run):
        current.update(s=run.consumed_samples, i=run.iteration + 1)
        return real_step(run)

    def finalize_model_grads(chunks, ddp):
        if state.get().rank == 0:
            for kind, key, at in faults:
                if current[key] == at:
                    for buf in ddp.grad_buffers.values():
                        buf.mul_(1e4) if kind == "spike" else buf.fill_(float("nan"))
        real_finalize(chunks, ddp)

    patch(loop, "train_step", train_step)
    patch(loop, "finalize_model_grads", finalize_model_grads)


def faults_env(tmp_path, spec) -> dict:
    lines = ["from test_loss_spikes import inject_faults",
             f"inject_faults(os.environ[{FAULTS_ENV!r}])"]  # fmt: skip
    return sitecustomize_env(tmp_path / "faults_site", lines, {FAULTS_ENV: spec})


def train(corpus, *args, nproc=1, env=None, timeout=300):
    return run_cli([*trainer(nproc), *TINY, "--data-path", corpus, *args], env=env,
                   timeout=timeout)  # fmt: skip


def records(path):
    with open(path) as fh:
        return [json.loads(line) for line in fh]


def step_records(path):
    return [r for r in records(path) if "loss" in r]


def assert_one_line_error(proc, *needles):
    assert proc.returncode == 1, proc.stdout + proc.stderr
    err = proc.stderr.strip()
    assert "Traceback" not in err, err
    last = err.splitlines()[-1]
    assert last.startswith("error: ") and all(n in last for n in needles), err
    assert len([line for line in err.splitlines() if line.startswith("error: ")]) == 1


def shifted_copy(src, iteration, consumed_samples, dst) -> str:
    """A --load directory holding only checkpoint `iteration` of src, its consumed_samples
    set by hand (what a resume from there with the data shifted needs)."""
    name = f"iter_{iteration:07d}"
    shutil.copytree(os.path.join(src, name), os.path.join(dst, name))
    meta_path = os.path.join(dst, name, "metadata.json")
    meta = json.load(open(meta_path))
    meta["consumed_samples"] = consumed_samples
    json.dump(meta, open(meta_path, "w"))
    open(os.path.join(dst, LATEST), "w").write(f"{iteration}\n")
    return str(dst)


# -- the spike filter against a running-median reference ----------------------------------------


def reference_decisions(norms, factor, window):
    """Pure Python: skip x when at least min(10, window) norms were accepted and x is finite
    and above factor x the lower median of the last `window` accepted ones."""
    accepted, spikes = deque(maxlen=window), []
    for x in norms:
        spike = (len(accepted) >= min(10, window) and math.isfinite(x)
                 and x > factor * statistics.median_low(accepted))  # fmt: skip
        spikes.append(spike)
        if math.isfinite(x) and not spike:
            accepted.append(x)
    return spikes, accepted


def spike_sequence(n, seed):
    g = torch.Generator().manual_seed(seed)
    norms = (torch.randn(n, generator=g) * 0.3).exp().tolist()  # log-normal, around 1
    for i in range(n):  # spikes, a run of them, and non-finite norms (found_inf, not spikes)
        if i % 17 == 11 or i in (40, 41, 42):
            norms[i] *= 50.0
        if i % 23 == 5:
            norms[i] = float("nan") if i % 2 else float("inf")
    return norms


@pytest.mark.parametrize("window", [4, 12, 25])
def test_spike_filter_matches_a_running_median_reference(window):
    from megalite.optim.grad_norm import SpikeFilter

    norms, factor = spike_sequence(120, window), 3.0
    want, accepted = reference_decisions(norms, factor, window)
    f = SpikeFilter(factor, window, torch.device("cpu"))
    got = [bool(f(torch.tensor(x))) for x in norms]
    assert got == want
    assert sum(want) >= 8 and int(f.skipped) == sum(want)
    kept = sorted(x for x in f.history.tolist() if math.isfinite(x))
    assert kept == sorted(torch.tensor(list(accepted)).tolist())  # spikes never entered


@pytest.mark.parametrize("new_window", [6, 25])
def test_spike_filter_state_loads_into_another_window(new_window):
    from megalite.optim.grad_norm import SpikeFilter

    norms = spike_sequence(90, 7)
    saved = SpikeFilter(3.0, 12, torch.device("cpu"))
    for x in norms[:60]:
        saved(torch.tensor(x))
    restored = SpikeFilter(3.0, new_window, torch.device("cpu"))
    restored.load_state_dict({k: v.clone() for k, v in saved.state_dict().items()})
    # the reference: the accepted norms the saved filter held, the newest new_window of them
    _, held = reference_decisions(norms[:60], 3.0, 12)
    accepted = deque(held, maxlen=new_window)
    want, skipped = [], int(saved.skipped)
    for x in norms[60:]:
        spike = (len(accepted) >= min(10, new_window) and math.isfinite(x)
                 and x > 3.0 * statistics.median_low(accepted))  # fmt: skip
        want.append(spike)
        if math.isfinite(x) and not spike:
            accepted.append(x)
    assert [bool(restored(torch.tensor(x))) for x in norms[60:]] == want
    assert int(restored.skipped) == skipped + sum(want)


# -- spike skip in a run ------------------------------------------------------------------------


def in_process_run(corpus, *flags):
    from megalite.config import parse_config
    from megalite.training import loop

    return loop.setup(parse_config([*TINY, "--data-path", corpus, *flags], world_size=1))


@pytest.mark.parametrize(
    "flags",
    [[], ["--bf16", "--use-distributed-optimizer"], ["--fp16", "--initial-loss-scale", "1024"]],
    ids=["fp32", "bf16-zero1", "fp16"],
)
def test_a_spike_update_is_skipped_and_counted(byte_corpus, monkeypatch, capsys, flags):
    from megalite.training import loop

    inject_faults("spike@i7", monkeypatch.setattr)
    run = in_process_run(byte_corpus, *SPIKES, "--train-iters", "9", *flags)
    opt = run.optimizer  # the model's weights and the fp32 state behind them
    params = [*opt.ddp.params, opt.main_flat, opt.exp_avg_flat, opt.exp_avg_sq_flat]
    weights = {}
    for it in range(1, 10):
        weights[it - 1] = [p.detach().clone() for p in params]
        loop.maybe_log(run, loop.train_step(run))
    weights[9] = [p.detach().clone() for p in params]

    def changed(it):  # did the update of iteration `it` change any weight or moment?
        return any(not torch.equal(a, b) for a, b in zip(weights[it - 1], weights[it]))

    assert not changed(7)  # the spike: no update at all
    assert all(changed(it) for it in range(1, 10) if it != 7)
    out = capsys.readouterr().out
    assert "iteration 7: grad norm" in out and "over 10 x its running median" in out
    lines = [line for line in out.splitlines() if line.startswith("iter ")]
    assert "spikes skipped 1 (1 in all)" in lines[6] and "spikes skipped 0 (1 in all)" in lines[8]
    assert run.spikes_total == 1 and int(run.optimizer.spike_filter.skipped) == 1
    held = [x for x in run.optimizer.spike_filter.history.tolist() if x != float("inf")]
    assert len(held) == 4 and max(held) < 1e3  # the spike's norm (~1e4 x) never entered
    if "--fp16" in flags:  # the scaler's own skips stay separate; a spike is no overflow
        assert run.optimizer.scaler.scale == 1024 and "skipped 0 |" in lines[6]
    assert run.optimizer.step_count == 8  # only steps taken count (on the device)


def test_the_flag_changes_nothing_without_a_spike(byte_corpus, tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    common = ["--train-iters", "24", "--hidden-dropout", "0.1"]
    assert train(byte_corpus, *common, "--metrics-file", str(a)).returncode == 0
    p = train(byte_corpus, *common, *SPIKES, "--metrics-file", str(b))
    assert p.returncode == 0, p.stderr
    ra, rb = step_records(a), step_records(b)
    assert [r["loss"] for r in ra] == [r["loss"] for r in rb]  # bitwise on the CPU
    assert [r["grad_norm"] for r in ra] == [r["grad_norm"] for r in rb]
    assert [r["skipped_spikes_total"] for r in rb] == [0] * 24
    assert "skipped_spikes" not in ra[0]


# -- rollback -----------------------------------------------------------------------------------

# A spike at iteration 6 (samples 40..47), saves every 4 iterations, a nan at iteration 11
# (samples 80..87): back to iteration 8, skipping samples 64..87 (iterations 9-11).
ROLLBACK_FAULTS = "spike@s40,nan@s80"
ROLLBACK = ["--train-iters", "20", "--save-interval", "4", "--rollback-on-nan", "2",
            "--hidden-dropout", "0.1", *SPIKES]  # fmt: skip


@pytest.fixture(scope="module")
def rolled_back(byte_corpus, tmp_path_factory):
    """One run through a spike and a nan, with its checkpoints, metrics and TensorBoard."""
    d = tmp_path_factory.mktemp("rollback")
    m, tb = d / "m.jsonl", d / "tb"
    p = train(byte_corpus, *ROLLBACK, "--save", str(d / "ck"), "--metrics-file", str(m),
              "--tensorboard-dir", str(tb), env=faults_env(d, ROLLBACK_FAULTS))  # fmt: skip
    return p, d, m, tb


def after_rollback(metrics):
    recs = records(metrics)
    at = next(i for i, r in enumerate(recs) if "rolled_back_to" in r)
    steps = [r for r in recs[:at] if "loss" in r]  # (saves have records of their own)
    return steps, recs[at], [r for r in recs[at + 1 :] if "loss" in r]


def test_rollback_reloads_skips_the_data_and_finishes(rolled_back):
    p, d, m, tb = rolled_back
    assert p.returncode == 0, p.stdout + p.stderr
    rollbacks = [line for line in p.stdout.splitlines() if line.startswith("rollback ")]
    assert len(rollbacks) == 1, p.stdout
    assert rollbacks[0] == (
        f"rollback 1/2 at iteration 11 (the gradient norm is nan): reloaded "
        f"{d / 'ck' / 'iter_0000008'} (iteration 8) and skipped samples 64..87 (24 samples, "
        f"iterations 9..11)"
    )
    before, event, after = after_rollback(m)
    assert [r["iteration"] for r in before if "loss" in r] == list(range(1, 11))
    assert event == {"iteration": 11, "rollbacks": 1, "rolled_back_to": 8, "samples_skipped": 24}
    assert [r["iteration"] for r in after] == list(range(9, 21))
    assert [r["consumed_samples"] for r in after] == [88 + GBS * k for k in range(1, 13)]
    assert all(r["rollbacks"] == 1 for r in after) and before[-1]["rollbacks"] == 0
    spikes = [r["skipped_spikes"] for r in before]
    assert spikes == [0] * 5 + [1] + [0] * 4 and sum(r["skipped_spikes"] for r in after) == 0
    # the total is the checkpoint's after the reload: iteration 8 was saved after the spike
    assert [r["skipped_spikes_total"] for r in after] == [1] * 12
    assert open(os.path.join(d, "ck", LATEST)).read() == "20\n"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"rollbacks", "samples_skipped", "skipped_spikes", "skipped_spikes_total"} <= tags
    assert [e.value for e in acc.Scalars("samples_skipped")] == [24]


def test_losses_after_a_rollback_equal_a_resume_with_the_data_shifted(
    rolled_back, byte_corpus, tmp_path
):
    # independently: checkpoint 8 as it was saved, resumed by the ordinary path with its
    # consumed samples moved past the skipped ones (64 + 24), and no fault
    p, d, m, _ = rolled_back
    assert p.returncode == 0, p.stderr
    load = shifted_copy(d / "ck", 8, 88, tmp_path / "shifted")
    ref = tmp_path / "ref.jsonl"
    q = train(byte_corpus, *ROLLBACK, "--load", load, "--save", str(tmp_path / "s"),
              "--metrics-file", str(ref))  # fmt: skip
    assert q.returncode == 0, q.stderr
    _, _, after = after_rollback(m)
    assert [r["loss"] for r in step_records(ref)] == [r["loss"] for r in after]  # bitwise


def test_a_resume_from_a_checkpoint_saved_after_the_rollback_goes_on_alike(
    rolled_back, byte_corpus, tmp_path
):
    p, d, m, _ = rolled_back
    assert p.returncode == 0, p.stderr
    meta = json.load(open(d / "ck" / "iter_0000012" / "metadata.json"))
    assert meta["consumed_samples"] == 88 + 4 * GBS  # the skip is in what was saved
    load = shifted_copy(d / "ck", 12, meta["consumed_samples"], tmp_path / "after")
    ref = tmp_path / "ref.jsonl"
    q = train(byte_corpus, *ROLLBACK, "--load", load, "--save", load, "--metrics-file", str(ref))
    assert q.returncode == 0, q.stderr
    _, _, after = after_rollback(m)
    assert [r["loss"] for r in step_records(ref)] == [r["loss"] for r in after[4:]]


def test_after_k_rollbacks_the_divergence_stops_the_run(byte_corpus, tmp_path):
    # a fault tied to the iteration, not the data: it comes back after every rollback
    ck = str(tmp_path / "ck")
    p = train(byte_corpus, "--train-iters", "10", "--save-interval", "4", "--save", ck,
              "--rollback-on-nan", "2", env=faults_env(tmp_path, "nan@i6"))  # fmt: skip
    assert_one_line_error(p, "the gradient norm is nan at iteration 6", "training diverged",
                          "(after 2 rollbacks: --rollback-on-nan 2)")  # fmt: skip
    rollbacks = [line for line in p.stdout.splitlines() if line.startswith("rollback ")]
    assert [line.split(":")[0] for line in rollbacks] == [
        "rollback 1/2 at iteration 6 (the gradient norm is nan)",
        "rollback 2/2 at iteration 6 (the gradient norm is nan)",
    ]
    # the second skips from the checkpoint's data position too: the first's samples and its own
    assert "(iteration 4) and skipped samples 32..47 (16 samples," in rollbacks[0]
    assert "(iteration 4) and skipped samples 32..63 (32 samples," in rollbacks[1]
    assert open(os.path.join(ck, LATEST)).read() == "4\n"  # the diverged state: never saved


def test_with_no_checkpoint_yet_the_divergence_says_so(byte_corpus, tmp_path, monkeypatch):
    from megalite.config import parse_config
    from megalite.training import loop

    inject_faults("nan@i2", monkeypatch.setattr)
    cfg = parse_config([*TINY, "--data-path", byte_corpus, "--train-iters", "6", "--save",
                        str(tmp_path / "ck"), "--save-interval", "4", "--rollback-on-nan", "1"],
                       world_size=1)  # fmt: skip
    with pytest.raises(MegaliteError) as e:
        loop.pretrain(cfg)
    msg = str(e.value)
    assert msg.startswith("the gradient norm is nan at iteration 2") and "\n" not in msg
    assert "no checkpoint of this run in" in msg and "yet to roll back to" in msg
    assert not os.path.exists(tmp_path / "ck")


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--rollback-on-nan", "1"], "--rollback-on-nan needs --save DIR"),
        (["--rollback-on-nan", "1", "--save", "d", "--fp16"], "--rollback-on-nan is for fp32"),
        (["--skip-spike-factor", "1"], "--skip-spike-factor must be above 1"),
        (["--skip-spike-factor", "3", "--skip-spike-window", "0"], "--skip-spike-window must"),
    ],
)
def test_bad_flags_are_one_line_at_parse_time(flags, needle):
    from megalite.config import parse_config

    with pytest.raises(MegaliteError, match=needle) as e:
        parse_config(["--mock-data", "--vocab-size", "256", *flags], world_size=1)
    assert "\n" not in str(e.value)


def test_two_dp_ranks_skip_and_roll_back_alike(byte_corpus, tmp_path):
    """torchrun, DP = 2 with the distributed optimizer: the faults are made on rank 0 only and
    reach rank 1 through the grad reduction; both ranks skip the spike and roll back at the same
    iteration (a rank that did not would hang or fail the run), and what follows equals a
    two-rank resume from checkpoint 8 with the data shifted."""
    ck, m = str(tmp_path / "ck"), tmp_path / "m.jsonl"
    dp2 = ["--use-distributed-optimizer", "--micro-batch-size", "4", "--global-batch-size", "8"]
    p = train(byte_corpus, *ROLLBACK, *dp2, "--save", ck, "--metrics-file", str(m), nproc=2,
              env=faults_env(tmp_path, ROLLBACK_FAULTS))  # fmt: skip
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.count("rollback 1/2 at iteration 11 (") == 1  # the last rank logs
    assert p.stdout.count("iteration 6: grad norm") == 1
    before, event, after = after_rollback(m)
    assert event["rolled_back_to"] == 8 and event["samples_skipped"] == 24
    assert [r["skipped_spikes"] for r in before][5] == 1
    load = shifted_copy(ck, 8, 88, tmp_path / "shifted")
    ref = tmp_path / "ref.jsonl"
    q = train(byte_corpus, *ROLLBACK, *dp2, "--load", load, "--save", str(tmp_path / "s"),
              "--metrics-file", str(ref), nproc=2)  # fmt: skip
    assert q.returncode == 0, q.stderr
    assert [r["loss"] for r in step_records(ref)] == [r["loss"] for r in after]
