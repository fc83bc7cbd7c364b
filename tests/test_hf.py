"""Hugging Face export/import (tools/convert.py) and load_pretrained, against transformers.

Tiny models (2 layers, hidden 64). References: the HF model's own logits (transformers'
GPT2LMHeadModel / LlamaForCausalLM), and the one-process model of a TP = 1 run.
"""

import os

import pytest
import torch

from conftest import run_cli, trainer

transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed (pip install transformers)"
)
pytest.importorskip("safetensors", reason="safetensors is not installed")

from megalite import load_pretrained  # noqa: E402
from megalite.training.checkpoint import load_full_model_state  # noqa: E402

VOCAB = 300  # not a multiple of 128: the padding is stripped on export, added on import
MODEL = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
         "--seq-length", "32", "--vocab-size", str(VOCAB)]  # fmt: skip


def ids(n=2, s=16, seed=0):
    return torch.randint(0, VOCAB, (n, s), generator=torch.Generator().manual_seed(seed))


def hf_model(style):
    torch.manual_seed(1)
    if style == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=64, n_layer=2,
                                      n_head=4, resid_pdrop=0.0, embd_pdrop=0.0,
                                      attn_pdrop=0.0)  # fmt: skip
        model = transformers.GPT2LMHeadModel(cfg)
    else:  # GQA (4 heads, 2 groups), a non-default RoPE theta, untied
        cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                                       num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, max_position_embeddings=64,
                                       rope_theta=50000.0, rms_norm_eps=1e-5,
                                       tie_word_embeddings=False)  # fmt: skip
        model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():  # HF zero-inits biases and ones-inits norms: make them count
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def convert(*args):
    r = run_cli(["tools/convert.py", *args], timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def logits_of(model, x):
    with torch.no_grad():
        out = model(x)
    return getattr(out, "logits", out)


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_import_matches_hf_in_every_layout(tmp_path, style):
    ref = hf_model(style)
    ref.save_pretrained(tmp_path / "hf")
    x = ids()
    want = logits_of(ref, x)
    for tp, pp in ((2, 1), (1, 2)):
        ck = str(tmp_path / f"tp{tp}pp{pp}")
        convert("import-hf", "--input", str(tmp_path / "hf"), "--save", ck,
                "--tensor-model-parallel-size", str(tp),
                "--pipeline-model-parallel-size", str(pp))  # fmt: skip
        got = logits_of(load_pretrained(ck), x)
        assert got.shape == (2, 16, VOCAB)
        print(
            f"\n{style} import at TP={tp} PP={pp}: max |logit diff| {(got - want).abs().max():.2e}"
        )
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_sharded_safetensors_import(tmp_path):
    ref = hf_model("llama")
    ref.save_pretrained(tmp_path / "hf", max_shard_size="40KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    assert not (tmp_path / "hf" / "model.safetensors").exists()
    convert("import-hf", "--input", str(tmp_path / "hf"), "--save", str(tmp_path / "ck"))
    x = ids()
    torch.testing.assert_close(
        logits_of(load_pretrained(str(tmp_path / "ck")), x), logits_of(ref, x), atol=1e-4, rtol=0
    )


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_hf_import_export_round_trip_is_bitwise(tmp_path, style):
    from safetensors.torch import load_file

    ref = hf_model(style)
    ref.save_pretrained(tmp_path / "hf")
    convert("import-hf", "--input", str(tmp_path / "hf"), "--save", str(tmp_path / "ck"),
            "--tensor-model-parallel-size", "2")  # fmt: skip
    convert("export-hf", "--load", str(tmp_path / "ck"), "--output", str(tmp_path / "back"),
            "--max-shard-size", "30KB")  # fmt: skip
    assert (tmp_path / "back" / "model.safetensors.index.json").exists()
    original = load_file(tmp_path / "hf" / "model.safetensors")
    from megalite.convert.hf import read_safetensors

    back = read_safetensors(str(tmp_path / "back"))
    assert set(back) == set(original)
    for name, t in original.items():
        assert torch.equal(back[name], t), name


# -- checkpoints trained by the CLI -----------------------------------------------------------


def train(out, nproc, *layout, style="gpt2"):
    run = ["--model-style", style, "--mock-data", "--train-iters", "1", "--micro-batch-size",
           "2", "--global-batch-size", "2", "--device", "cpu", "--save", str(out)]  # fmt: skip
    args = trainer(nproc) + MODEL + run + list(layout)
    r = run_cli(args, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return str(out)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The same gpt2-style run (1 step) at TP=1, TP=2 and PP=2."""
    root = tmp_path_factory.mktemp("trained")
    return {
        "tp1": train(root / "tp1", 1),
        "tp2": train(root / "tp2", 2, "--tensor-model-parallel-size", "2"),
        "pp2": train(root / "pp2", 2, "--pipeline-model-parallel-size", "2"),
    }


@pytest.mark.slow
def test_load_pretrained_any_layout_equals_one_process(trained):
    x = ids()
    one = logits_of(load_pretrained(trained["tp1"]), x)
    assert one.shape == (2, 16, VOCAB)
    for layout in ("tp2", "pp2"):
        model = load_pretrained(trained[layout])
        assert not model.training and next(model.parameters()).dtype == torch.float32
        torch.testing.assert_close(logits_of(model, x), one, atol=1e-4, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_export_loads_in_transformers(tmp_path, trained, layout):
    out = str(tmp_path / "hf")
    convert("export-hf", "--load", trained[layout], "--output", out)
    for f in ("config.json", "model.safetensors", "generation_config.json"):
        assert os.path.exists(os.path.join(out, f)), f
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == "GPT2LMHeadModel"
    x = ids()
    got, want = logits_of(hf, x), logits_of(load_pretrained(trained[layout]), x)
    print(f"\nexport from {layout}: max |logit diff| {(got - want).abs().max():.2e}")
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    # and back: a trained TP=2 checkpoint -> HF -> TP=2 checkpoint is the same, bitwise
    ck = str(tmp_path / "ck")
    convert("import-hf", "--input", out, "--save", ck, "--tensor-model-parallel-size", "2",
            "--seq-length", "32")  # fmt: skip
    before, _ = load_full_model_state(trained[layout])
    after, _ = load_full_model_state(ck)
    if layout == "pp2":  # the last stage's copy of the tied embedding exists only with PP > 1
        assert torch.equal(before.pop("output_layer.weight"), before[
            "embedding.word_embeddings.weight"])  # fmt: skip
    assert set(after) == set(before)
    for name, t in before.items():
        # the vocabulary's padding rows (to 128 x TP) are not exported: compare the real ones
        rows = VOCAB if name == "embedding.word_embeddings.weight" else t.shape[0]
        assert torch.equal(after[name][:rows], t[:rows]), name


@pytest.mark.slow
def test_imported_checkpoint_finetunes_on_two_ranks(tmp_path):
    hf_model("llama").save_pretrained(tmp_path / "hf")
    ck = str(tmp_path / "ck")
    printed = convert("import-hf", "--input", str(tmp_path / "hf"), "--save", ck,
                      "--tensor-model-parallel-size", "2", "--seq-length", "32")  # fmt: skip
    flags = printed.split("train from it with: ")[1].split()
    base = trainer(2) + flags + ["--tensor-model-parallel-size", "2", "--mock-data",
                                 "--train-iters", "2", "--micro-batch-size", "2",
                                 "--global-batch-size", "2", "--device", "cpu",
                                 "--log-interval", "1"]  # fmt: skip
    # without --finetune: one line saying what to do (the file holds no optimizer state)
    bad = [a for a in base if a != "--finetune"]
    r = run_cli(bad, timeout=300)
    assert r.returncode != 0 and "--finetune" in r.stderr
    r = run_cli(base + ["--save", str(tmp_path / "ft")], timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout + r.stderr
    assert "(iteration 0, 0 samples consumed)" in out
    assert os.path.isdir(tmp_path / "ft" / "iter_0000002")
