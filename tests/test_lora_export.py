"""LoRA checkpoints out of megalite (tools/convert.py merge-lora, export-hf --merge-lora,
export-peft), against the LoRA model itself and against transformers / peft.

A tiny base (2 layers, hidden 64) trained in one process, LoRA-finetuned at TP=2 with a high
learning rate so that B moves well away from zero. The reference is load_pretrained of the
LoRA checkpoint: the base with the adapters attached, unmerged (model/lora.py's forward).
"""

import json
import os

import pytest
import torch

from conftest import run_cli, train_cli

transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed (pip install transformers)"
)
peft = pytest.importorskip("peft", reason="peft is not installed (pip install peft)")
pytest.importorskip("safetensors", reason="safetensors is not installed")

from megalite import load_pretrained  # noqa: E402
from megalite.convert.lora import lora_meta, merged_state  # noqa: E402
from megalite.errors import MegaliteError  # noqa: E402
from megalite.training.checkpoint import load_full_model_state  # noqa: E402

VOCAB = 300
MODEL = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
         "--seq-length", "32", "--max-position-embeddings", "32",
         "--vocab-size", str(VOCAB)]  # fmt: skip
STYLES = {
    "gpt2": ["--model-style", "gpt2"],
    "llama": ["--model-style", "llama", "--num-query-groups", "2", "--ffn-hidden-size", "96"],
}
RUN = ["--mock-data", "--micro-batch-size", "2", "--global-batch-size", "4", "--device", "cpu",
       "--log-interval", "1"]  # fmt: skip


def ids(n=2, s=16, seed=0):
    return torch.randint(0, VOCAB, (n, s), generator=torch.Generator().manual_seed(seed))


def logits_of(model, x):
    with torch.no_grad():
        out = model(x)
    return getattr(out, "logits", out)


def convert(*args):
    r = run_cli(["tools/convert.py", *args], timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def report(what, got, want):
    diff = (got - want).abs().max().item()
    print(f"\n{what}: max |logit diff| {diff:.2e}")
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("style", list(STYLES))
def test_peft_factors_are_split_as_the_weights(style):
    """No training: for random W, A, B, each HF module's weight plus its peft update
    (B_hf A, transposed for Conv1D) is the HF export of W + B A."""
    from megalite.config import make_config
    from megalite.convert.hf import name_table
    from megalite.convert.lora import peft_state
    from megalite.model.gpt import rank_parameters

    flags = dict(zip([f[2:].replace("-", "_") for f in MODEL[::2]], MODEL[1::2]))
    flags.update(zip([f[2:].replace("-", "_") for f in STYLES[style][::2]], STYLES[style][1::2]))
    cfg = make_config(flags)
    params = rank_parameters(cfg, 384, 0, 0)
    g = torch.Generator().manual_seed(0)
    weights, adapters = {}, {}
    for name, p in params.items():
        linear = name[: -len(".weight")]
        if name.endswith(".weight") and linear.split(".")[-1].startswith("linear_"):
            out, inp = p.shape
            weights[name] = torch.randn(out, inp, generator=g)
            adapters[linear + ".lora.a"] = torch.randn(3, inp, generator=g)
            adapters[linear + ".lora.b"] = torch.randn(out, 3, generator=g)
    state, targets = peft_state(adapters, cfg.model)
    assert len(targets) == (4 if style == "gpt2" else 7)
    table = name_table(cfg.model)
    checked = 0
    for name, w in weights.items():
        linear = name[: -len(".weight")]
        a, b = adapters[linear + ".lora.a"], adapters[linear + ".lora.b"]
        hf_names, to_hf, _ = table[name]
        parts = [x if isinstance(x, list) else [x] for x in (to_hf(w), to_hf(w + b @ a))]
        for hf_name, before, after in zip(hf_names, *parts):
            module = "base_model.model." + hf_name[: -len(".weight")]
            delta = state[module + ".lora_B.weight"] @ state[module + ".lora_A.weight"]
            delta = delta.t() if style == "gpt2" else delta
            torch.testing.assert_close(before + delta, after, atol=1e-4, rtol=0)
            checked += 1
    assert checked == 2 * len(targets) and len(state) == 2 * checked


@pytest.fixture(scope="module", params=list(STYLES))
def run(request, tmp_path_factory):
    """(style, base dir, LoRA dir, reference logits of the LoRA model on ids())."""
    style = request.param
    root = tmp_path_factory.mktemp(f"lora_{style}")
    flags = MODEL + STYLES[style] + RUN
    base, lora = str(root / "base"), str(root / "lora")
    train_cli(1, flags, "--train-iters", "2", "--lr", "1e-3", "--save", base)
    train_cli(2, flags, "--train-iters", "3", "--lr", "5e-2", "--load", base, "--finetune",
              "--lora-rank", "4", "--lora-alpha", "8", "--tensor-model-parallel-size", "2",
              "--save", lora)  # fmt: skip
    x = ids()
    want = logits_of(load_pretrained(lora), x)
    moved = (want - logits_of(load_pretrained(base), x)).abs().max().item()
    print(f"\n{style}: LoRA model vs its base: max |logit diff| {moved:.2e}")
    assert moved > 1e-2, "the adapters should change the model"
    return style, base, lora, want


@pytest.mark.slow
def test_merge_lora_equals_the_lora_model(run, tmp_path):
    style, base, lora, want = run
    out = str(tmp_path / "merged")
    printed = convert("merge-lora", "--load", lora, "--save", out)
    assert "TP=1 PP=1" in printed  # the base's layout
    full, meta = load_full_model_state(out)
    assert not [n for n in full if ".lora." in n] and "lora_base" not in meta
    assert meta["config"]["lora"]["lora_rank"] == 0
    report(f"{style} merge-lora -> load_pretrained", logits_of(load_pretrained(out), ids()), want)


@pytest.mark.slow
def test_export_hf_merge_lora_loads_in_transformers(run, tmp_path):
    style, base, lora, want = run
    out = str(tmp_path / "hf")
    r = run_cli(["tools/convert.py", "export-hf", "--load", lora, "--output", out])
    assert r.returncode != 0 and "--merge-lora" in r.stderr and "export-peft" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    convert("export-hf", "--load", lora, "--output", out, "--merge-lora")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    report(f"{style} export-hf --merge-lora -> transformers", logits_of(hf, ids()), want)


@pytest.mark.slow
def test_export_peft_loads_onto_the_base_export(run, tmp_path):
    style, base, lora, want = run
    base_hf, adapter = str(tmp_path / "base_hf"), str(tmp_path / "adapter")
    convert("export-hf", "--load", base, "--output", base_hf)
    convert("export-peft", "--load", lora, "--save", adapter, "--base-model", base_hf)
    with open(os.path.join(adapter, "adapter_config.json")) as fh:
        config = json.load(fh)
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["base_model_name_or_path"]
    model = transformers.AutoModelForCausalLM.from_pretrained(base_hf).eval()
    model = peft.PeftModel.from_pretrained(model, adapter).eval()
    lora_layers = [m for m in model.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    assert len(lora_layers) == 2 * (4 if style == "gpt2" else 7)
    report(f"{style} export-peft -> peft on export-hf of the base", logits_of(model, ids()), want)
    # and peft's own merge gives the same model as ours
    merged = model.merge_and_unload()
    report(f"{style} export-peft -> peft merge_and_unload", logits_of(merged, ids()), want)


@pytest.mark.slow
@pytest.mark.parametrize("run", ["gpt2"], indirect=True)  # the errors do not depend on it
def test_one_line_errors(run, tmp_path):
    style, base, lora, _ = run
    with pytest.raises(MegaliteError, match="not a LoRA checkpoint"):
        merged_state(base)
    with pytest.raises(MegaliteError, match="is missing"):
        merged_state(lora, base=str(tmp_path / "nowhere"))
    # a base of other shapes, where the LoRA checkpoint's base should be
    other = str(tmp_path / "other")
    it = lora_meta(lora)["lora_base"]["iteration"]
    small = [a if a != "64" else "32" for a in MODEL] + STYLES[style] + RUN
    train_cli(1, small, "--train-iters", str(it), "--save", other)
    with pytest.raises(MegaliteError, match="does not match the adapters"):
        merged_state(lora, base=other)
    r = run_cli(["tools/convert.py", "merge-lora", "--load", base, "--save", str(tmp_path / "x")])
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1, r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("run", ["llama"], indirect=True)
def test_merged_checkpoint_finetunes_on_two_ranks(run, tmp_path):
    style, base, lora, _ = run
    merged = str(tmp_path / "merged")
    convert("merge-lora", "--load", lora, "--save", merged)
    p = train_cli(2, MODEL + STYLES[style] + RUN, "--train-iters", "1", "--load", merged,
                  "--finetune", "--tensor-model-parallel-size", "2")  # fmt: skip
    assert "iteration 0" in p.stdout + p.stderr
