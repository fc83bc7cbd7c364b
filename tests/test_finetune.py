"""Fine-tuning through the command line (issue 17, items 2-4): LoRA on packed instruction data
from a base checkpoint of another layout.

The base: 3 pretraining iterations at TP=2 (mock data). Then `--sft --finetune --lora-rank 4`
for 10 iterations on packed conversations with loss masks, at TP=1 (the reference), TP=2 with
sequence parallelism, TP=4 (more ranks than key/value groups), PP=2 (every stage reads the
segments) and DP=2 (the token-weighted loss over ranks): every loss within 1e-4 of TP=1.
Only the adapters train: the trainable count logged is the one computed here by hand, grads
and optimizer state are the adapters' alone (measured from the storages), a checkpoint holds
the adapters and names its base, and resuming one gives the straight run's losses bitwise.
Misuse gets one line."""

import json
import os

import numpy as np
import pytest

from conftest import metric, metrics, run_cli, train_cli, trainer
from megalite.data.indexed import IndexedDatasetWriter

pytestmark = pytest.mark.slow

H, FFN, LAYERS, RANK, VOCAB = 64, 176, 2, 4, 256
MODEL = (
    f"--model-style llama --num-query-groups 2 --num-layers {LAYERS} --hidden-size {H} "
    f"--ffn-hidden-size {FFN} --num-attention-heads 4 --seq-length 32 --vocab-size {VOCAB} "
    "--micro-batch-size 2 --global-batch-size 8 --log-interval 1 --hidden-dropout 0 "
    "--attention-dropout 0 --eval-interval 1000"
).split()
LORA = f"--lora-rank {RANK} --lora-alpha 8 --lr 1e-2 --lr-warmup-iters 0 --train-iters 10".split()
TOLERANCE = 1e-4


def write_sft_shards(prefix, n=300, seed=0):
    """Conversations of 4..40 tokens counting up from a random start (learnable: the loss
    falls), each with one or two random target spans: the token shard and its uint8
    loss-mask shard, as `tools/preprocess.py --sft` writes them."""
    rng = np.random.default_rng(seed)
    with (
        IndexedDatasetWriter(prefix, np.uint16) as tokens,
        IndexedDatasetWriter(prefix + "_loss_mask", np.uint8) as masks,
    ):
        for _ in range(n):
            length = int(rng.integers(4, 41))
            mask = np.zeros(length, np.uint8)
            for _ in range(int(rng.integers(1, 3))):
                start = int(rng.integers(1, length))
                mask[start : start + int(rng.integers(1, 8))] = 1
            ids = (int(rng.integers(0, VOCAB)) + np.arange(length)) % (VOCAB - 1) + 1
            tokens.add_document(ids.astype(np.uint16), [length])
            masks.add_document(mask, [length])
    return prefix


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("finetune")
    data = write_sft_shards(str(d / "chat_sft_document"))
    train_cli(2, MODEL, "--mock-data", "--train-iters", "3", "--lr", "1e-3",
              "--tensor-model-parallel-size", "2", "--save", str(d / "base"))  # fmt: skip
    return d, data


def finetune(d, data, name, nproc, *extra, load=None):
    m = d / f"{name}.jsonl"
    p = train_cli(nproc, MODEL, *LORA, "--sft", "--data-path", data, "--split", "90,10,0",
                  "--load", str(load or d / "base"), "--finetune", "--metrics-file", str(m),
                  *extra)  # fmt: skip
    return metric(m), metrics(m), p.stdout + p.stderr


def adapter_parameters() -> int:
    """By hand: A [r, in] and B [out, r] on qkv, proj, fc1 (SwiGLU: 2 x ffn), fc2."""
    qkv_out = 2 * (2 + 2) * (H // 4)  # 2 groups x (2 query heads + k + v) x head dim
    per_layer = (
        RANK * H + qkv_out * RANK  # qkv
        + RANK * H + H * RANK  # proj
        + RANK * H + 2 * FFN * RANK  # fc1
        + RANK * FFN + H * RANK  # fc2
    )  # fmt: skip
    return LAYERS * per_layer


@pytest.fixture(scope="module")
def reference(base):
    d, data = base
    return finetune(d, data, "tp1", 1, "--save", str(d / "lora"), "--save-interval", "5")


def test_only_adapters_train(reference):
    losses, records, out = reference
    assert len(losses) == 10 and losses[-1] < losses[0], losses
    counts = next(r for r in records if "trainable_parameters" in r)
    assert counts["trainable_parameters"] == adapter_parameters()
    assert f"trainable parameters: {adapter_parameters():,} of" in out
    assert "LoRA: base weights from" in out
    mem = next(r for r in records if "mem_grads_bytes" in r)
    # fp32: 4 B of grad, 4 + 4 B of Adam moments (+ 4 B of main param at most) per adapter
    # param; the frozen base (~16x more params) has none
    assert mem["mem_grads_bytes"] == 4 * adapter_parameters()
    assert mem["mem_optimizer_bytes"] <= 12 * adapter_parameters()
    assert mem["mem_params_bytes"] == 4 * counts["parameters"]


def test_checkpoint_holds_adapters_and_names_its_base(base, reference):
    import torch

    d, _ = base
    it = d / "lora" / "iter_0000010"
    meta = json.loads((it / "metadata.json").read_text())
    assert meta["lora_base"] == {"path": str(d / "base"), "iteration": 3}
    shard = torch.load(it / "mp_rank_00_000.pt", weights_only=True)
    names = list(shard["model"])
    assert names and all(".lora." in n for n in names)
    assert len(names) == LAYERS * 4 * 2


@pytest.mark.parametrize(
    "layout",
    [
        ("tp2-sp", 2, ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
        ("pp2", 2, ["--pipeline-model-parallel-size", "2"]),
        ("dp2", 2, ["--use-distributed-optimizer"]),
        # TP 4 > 2 key/value groups: B's k/v rows replicated (their grads summed over the
        # replicas), the vocabulary padded to 512 rows instead of the base's 256
        ("tp4-sp-gqa", 4, ["--tensor-model-parallel-size", "4", "--sequence-parallel"]),
    ],
    ids=lambda x: x[0],
)
def test_layouts_match_one_process(base, reference, layout):
    d, data = base
    name, nproc, flags = layout
    losses, _, _ = finetune(d, data, name, nproc, *flags)
    diff = max(abs(a - b) for a, b in zip(losses, reference[0]))
    print(f"LoRA + SFT {name}: max |loss - TP1| over 10 iterations {diff:.3g}")
    assert len(losses) == 10 and diff <= TOLERANCE


def test_resume_is_exact(base, reference):
    import shutil

    d, data = base
    shutil.copytree(d / "lora", d / "resumed")
    (d / "resumed" / "latest_checkpointed_iteration.txt").write_text("5")
    shutil.rmtree(d / "resumed" / "iter_0000010")
    m = d / "resumed.jsonl"
    resumed = str(d / "resumed")
    train_cli(1, MODEL, *LORA, "--sft", "--data-path", data, "--split", "90,10,0", "--load",
              resumed, "--save", resumed, "--metrics-file", str(m))  # fmt: skip
    assert metric(m) == reference[0][5:]


def test_misuse_gets_one_line(base, reference):
    d, data = base
    sft = [*MODEL, "--sft", "--data-path", data, "--train-iters", "2"]
    cases = [
        (["--load", str(d / "lora")], "holds LoRA adapters only"),
        (["--load", str(d / "base"), "--lora-rank", "4"], "with --finetune"),
        (["--lora-rank", "4"], "--lora-rank needs --load"),
        (["--load", str(d / "lora"), "--lora-rank", "8"], "made with --lora-rank 4"),
        (["--load", str(d / "base"), "--finetune", "--lora-rank", "4",
          "--lora-target-modules", "qkv,mlp"], "unknown ['mlp']"),
    ]  # fmt: skip
    for flags, want in cases:
        p = run_cli([*trainer(1), *sft, *flags])
        assert p.returncode != 0 and want in p.stderr, (flags, p.stderr[-800:])
        assert "Traceback" not in p.stderr
    # the base of a LoRA checkpoint gone: named, with the way out
    moved = d / "orphan"
    os.makedirs(moved)
    import shutil

    shutil.copytree(d / "lora", moved / "lora")
    meta_path = moved / "lora" / "iter_0000010" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["lora_base"]["path"] = str(d / "missing")
    meta_path.write_text(json.dumps(meta))
    p = run_cli([*trainer(1), *sft, "--load", str(moved / "lora"), "--lora-rank", "4",
                 "--lora-alpha", "8"])  # fmt: skip
    assert p.returncode != 0 and "LoRA base model" in p.stderr and "missing" in p.stderr


def test_lora_from_an_imported_hugging_face_model(base, reference):
    """--finetune from `import-hf` of the base's Hugging Face export (the round trip is
    exact) trains as from the base itself."""
    pytest.importorskip("safetensors", reason="export-hf/import-hf need safetensors")
    d, data = base
    for cmd in (["export-hf", "--load", str(d / "base"), "--output", str(d / "hf")],
                ["import-hf", "--input", str(d / "hf"), "--save", str(d / "imported"),
                 "--tensor-model-parallel-size", "2"]):  # fmt: skip
        p = run_cli(["tools/convert.py", *cmd])
        assert p.returncode == 0, p.stderr[-2000:]
    losses, _, _ = finetune(d, data, "imported", 1, load=d / "imported")
    assert losses == reference[0]
