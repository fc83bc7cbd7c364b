"""tools/scaling.py (issue 16, item 4): a strong-scaling sweep over 1, 2 and 4 processes of
a tiny model through launch/pretrain.sh writes scaling.md, scaling.json and the three plots,
a rerun measures nothing again, and --slurm --dry-run writes one sbatch script per point."""

import json

import pytest

from conftest import run_cli

TINY = (
    "--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 32 "
    "--micro-batch-size 2 --global-batch-size 8 --mock-data --vocab-size 256 "
    "--eval-interval 1000"
).split()

pytest.importorskip("matplotlib", reason="tools/scaling.py plots with matplotlib")


@pytest.mark.slow
def test_strong_sweep_writes_every_output(tmp_path):
    out = tmp_path / "sweep"
    args = ["tools/scaling.py", "--mode", "strong", "--gpus", "1,2,4", "--output", str(out),
            "--iters", "2", "--warmup", "1", "--", *TINY]  # fmt: skip
    p = run_cli(args, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr[-3000:]
    result = json.load(open(out / "scaling.json"))
    points = result["points"]
    assert result["mode"] == "strong" and [q["gpus"] for q in points] == [1, 2, 4]
    assert points[0]["efficiency"] == 1.0
    for q in points:
        assert q["tokens_per_sec"] > 0 and q["state_bytes_per_rank"] > 0
        # efficiency: tokens/s per GPU against the first point's
        want = q["tokens_per_sec"] / q["gpus"] / points[0]["tokens_per_sec"]
        assert abs(q["efficiency"] - want) < 1e-9
    table = (out / "scaling.md").read_text().splitlines()
    assert len([row for row in table if row.startswith("| ") and row[2].isdigit()]) == 3
    for name in ("throughput", "efficiency", "memory"):
        assert (out / f"scaling_{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    print("\n" + "\n".join(table))
    # resumable: every point is measured already, so nothing runs again
    again = run_cli(args, timeout=120)
    assert again.returncode == 0 and not (out / "point_8.log").exists()
    assert again.stdout.count("tokens/s") == 3


def test_slurm_dry_run_writes_one_script_per_point(tmp_path):
    out = tmp_path / "weak"
    p = run_cli(["tools/scaling.py", "--mode", "weak", "--gpus", "8,16", "--gpus-per-node", "8",
                 "--slurm", "--dry-run", "--layout", "16=--tensor-model-parallel-size=2",
                 "--output", str(out), "--", *TINY])  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert "pending points" in p.stdout
    s8, s16 = (out / "point_8.sbatch").read_text(), (out / "point_16.sbatch").read_text()
    assert "#SBATCH --nodes=1" in s8 and "#SBATCH --nodes=2" in s16
    # weak: the global batch doubles with the GPUs; the layout flags go to their point only
    assert (
        "'--global-batch-size' '8'" in s8
        and "'--global-batch-size' '16'" in s16
        and "'--tensor-model-parallel-size' '2'" in s16
    )
    assert "tensor-model-parallel-size" not in s8


def test_plan_picks_each_points_layout(tmp_path):
    """--plan: a count without --layout gets the planner's fastest layout (here on H100s: a
    tiny model, so pure data parallelism with the largest micro-batch that divides)."""
    out = tmp_path / "planned"
    p = run_cli(["tools/scaling.py", "--mode", "strong", "--gpus", "8", "--slurm", "--dry-run",
                 "--plan", "H100", "--output", str(out), "--", *TINY, "--train-iters", "5",
                 "--global-batch-size", "64"])  # fmt: skip
    assert p.returncode == 0, p.stderr
    script = (out / "point_8.sbatch").read_text()
    assert "'--data-parallel-sharding-strategy'" in script
    assert "'--tensor-model-parallel-size' '1'" in script, script
