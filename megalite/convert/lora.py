"""LoRA checkpoints out of megalite: the adapters folded into their base (`merge-lora`,
`export-hf --merge-lora`) or written for `peft` (`export-peft`), all in one process.

A LoRA run's checkpoint holds the adapters alone (A [r, in], B [out, r] of each target
linear, any layout) and names its base in metadata.json (`lora_base`: a plain checkpoint of
any layout). Merging gives W' = W + (alpha / r) B A for every target (model/lora.py's
`lora_update`, in fp32, cast back to W's dtype); the result is a plain model, in the base's
TP x PP layout, recording the LoRA run's config without its "lora" section.

`peft` keeps one adapter per Hugging Face module, so the fused megalite factors are split the
way hf.py splits the weights: B takes the rows of the module's weight (the grouped QKV B into
[all q; all k; all v] for GPT-2's c_attn, into q_proj / k_proj / v_proj for Llama; SwiGLU's
[gate; up] B into gate_proj / up_proj), and A, which multiplies the input, is the same for
every module split out of one linear. peft's adapter is lora_B(lora_A(x)) * alpha / r with
lora_A.weight [r, in] and lora_B.weight [out, r] for Linear and Conv1D alike (GPT-2's Conv1D
only changes how peft merges: fan_in_fan_out).
"""

from __future__ import annotations

import json
import os
from typing import Optional


from megalite.config import Config
from megalite.errors import MegaliteError
from megalite.model.lora import lora_update
from megalite.training import checkpoint as ckpt

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# model settings whose difference between the base and the adapters' run changes shapes
SHAPE_KEYS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
              "num_query_groups", "swiglu", "untie_embeddings_and_output_weights")  # fmt: skip


def _iteration(root: str, iteration: Optional[int]) -> int:
    it = ckpt.latest_iteration(root) if iteration is None else iteration
    if it is None:
        raise MegaliteError(f"{root} holds no checkpoint ({ckpt.LATEST} is missing)")
    return it


def lora_meta(lora_dir: str, iteration: Optional[int] = None) -> dict:
    """metadata.json of a LoRA checkpoint; a one-line error for any other checkpoint."""
    it = _iteration(lora_dir, iteration)
    meta = ckpt.read_metadata(lora_dir, it)
    if meta.get("lora_base") is None:
        raise MegaliteError(
            f"{ckpt.iter_dir(lora_dir, it)} is not a LoRA checkpoint (its metadata.json names "
            f"no lora_base): it holds the whole model already; use it as it is"
        )
    return meta


def read_lora(lora_dir: str, iteration: Optional[int] = None, base: Optional[str] = None):
    """(adapters, meta, base state, base meta) of a LoRA checkpoint: its full A and B tensors,
    its metadata, and the full state dict of its base (`base` overrides the directory that
    metadata.json names, for a base that has moved; its iteration stays the recorded one).
    One-line errors for a base that is missing, itself a LoRA checkpoint, or of other shapes."""
    meta = lora_meta(lora_dir, iteration)
    adapters, _ = ckpt.load_full_model_state(lora_dir, meta["iteration"])
    root, base_it = base or meta["lora_base"]["path"], meta["lora_base"]["iteration"]
    where = ckpt.iter_dir(root, base_it)
    if not os.path.isdir(where):
        named = "--base" if base else f"named by {ckpt.iter_dir(lora_dir, meta['iteration'])}"
        raise MegaliteError(
            f"the LoRA base model {where} ({named}) is missing: restore it, or pass where it "
            f"is now with --base DIR"
        )
    base_meta = ckpt.read_metadata(root, base_it)
    if base_meta.get("lora_base") is not None:
        raise MegaliteError(f"the LoRA base {where} is itself a LoRA checkpoint: merge it first")
    ours, theirs = meta["config"]["model"], base_meta["config"]["model"]
    for key in SHAPE_KEYS:
        if ours.get(key) != theirs.get(key):
            raise MegaliteError(
                f"the LoRA base {where} does not match the adapters: {key} {theirs.get(key)} "
                f"there, {ours.get(key)} in the run that trained them"
            )
    base_state, _ = ckpt.load_full_model_state(root, base_it)
    for name in adapters:
        if name.endswith(".lora.a"):
            _check_shapes(name[: -len(".lora.a")], adapters, base_state, where)
    return adapters, meta, base_state, base_meta


def _check_shapes(linear: str, adapters: dict, base: dict, where: str) -> None:
    a, b = adapters[linear + ".lora.a"], adapters.get(linear + ".lora.b")
    w = base.get(linear + ".weight")
    if (
        b is None
        or w is None
        or tuple(w.shape) != (b.shape[0], a.shape[1])
        or (a.shape[0] != b.shape[1])
    ):
        have = "no such weight" if w is None else f"{tuple(w.shape)}"
        want = "?" if b is None else f"({b.shape[0]}, {a.shape[1]})"
        raise MegaliteError(
            f"the LoRA base {where} does not match the adapters: {linear}.weight is {have}, "
            f"the adapters need {want}"
        )


def merged_config(meta: dict, base_meta: dict) -> dict:
    """The config of the merged model: the LoRA run's, without adapters, at the base's
    layout (its parallel section; world size TP x PP)."""
    d = {k: v for k, v in meta["config"].items() if k not in ("lora", "world_size")}
    d["parallel"] = dict(base_meta["config"]["parallel"])
    p = d["parallel"]
    d["world_size"] = p.get("tensor_model_parallel_size", 1) * p.get(
        "pipeline_model_parallel_size", 1
    )
    return d


def merged_state(lora_dir: str, iteration: Optional[int] = None, base: Optional[str] = None):
    """(full state dict, metadata) of the model a LoRA checkpoint stands for: its base with
    every adapter folded in (W + scaling B A), no adapter left; the metadata's config is the
    merged one (`merged_config`)."""
    adapters, meta, full, base_meta = read_lora(lora_dir, iteration, base)
    scaling = Config.from_dict(meta["config"]).lora.scaling
    for name, a in adapters.items():
        if name.endswith(".lora.a"):
            linear = name[: -len(".lora.a")]
            w = full[linear + ".weight"]
            update = lora_update(a, adapters[linear + ".lora.b"], scaling)
            full[linear + ".weight"] = (w.float() + update).to(w.dtype)
    out = {k: v for k, v in meta.items() if k != "lora_base"}
    out["config"] = merged_config(meta, base_meta)
    for key in ("tensor_model_parallel_size", "pipeline_model_parallel_size"):
        out[key] = base_meta[key]
    return full, out


def merge_lora(
    lora_dir: str, save_dir: str, iteration: Optional[int] = None, base: Optional[str] = None
) -> tuple:
    """Write the merged model of a LoRA checkpoint as iteration 0 of a weights-only checkpoint
    under save_dir, at its base's TP x PP layout. Returns (directory, Config)."""
    from megalite.model.gpt import rank_parameters

    full, meta = merged_state(lora_dir, iteration, base)
    cfg = Config.from_dict(meta["config"])
    padded = full["embedding.word_embeddings.weight"].shape[0]

    def rank_params(tp_rank, pp_rank):
        return rank_parameters(cfg, padded, tp_rank, pp_rank)

    return ckpt.save_weights_checkpoint(cfg, rank_params, full, save_dir), cfg


# -- peft -------------------------------------------------------------------------------------


def peft_state(adapters: dict, m) -> tuple:
    """({peft key: tensor}, target_modules) of megalite's full adapters for the HF model that
    export-hf makes of ModelConfig `m`. Keys as peft saves them:
    base_model.model.<module>.lora_A.weight [r, in] / .lora_B.weight [out, r]."""
    from megalite.convert.hf import name_table, style_of

    conv1d = style_of(m) == "gpt2"  # Conv1D weights are [in, out]: to_hf transposes them
    table = name_table(m)
    state, targets = {}, []
    for name in sorted(adapters):
        if not name.endswith(".lora.a"):
            continue
        linear = name[: -len(".lora.a")]
        a, b = adapters[name], adapters[linear + ".lora.b"]
        hf_names, to_hf, _ = table[linear + ".weight"]
        parts = to_hf(b)  # B's rows are laid out as W's: split / reordered as W is
        parts = parts if isinstance(parts, list) else [parts]
        layer = int(linear.split(".")[1])
        for hf_name, part in zip(hf_names, parts):
            module = hf_name[: -len(".weight")]
            part = part.t() if conv1d else part
            # (separate storage for each: safetensors refuses tensors that share memory)
            state[f"base_model.model.{module}.lora_A.weight"] = a.float().clone()
            state[f"base_model.model.{module}.lora_B.weight"] = part.float().contiguous().clone()
            suffix = module.split(f".{layer}.", 1)[1]  # attn.c_attn, self_attn.q_proj, ...
            if suffix not in targets:
                targets.append(suffix)
    return state, targets


def export_peft(
    lora_dir: str,
    out_dir: str,
    iteration: Optional[int] = None,
    base_model: Optional[str] = None,
) -> list:
    """Write a LoRA checkpoint's adapters as a peft adapter directory (adapter_config.json,
    adapter_model.safetensors) for the HF export of its base (`export-hf` of the base);
    `base_model` is recorded as base_model_name_or_path. Returns the files written."""
    from safetensors.torch import save_file

    from megalite.convert.hf import style_of

    meta = lora_meta(lora_dir, iteration)
    cfg = Config.from_dict(meta["config"])
    style_of(cfg.model)  # fails early on a model HF cannot hold
    adapters, _ = ckpt.load_full_model_state(lora_dir, meta["iteration"])
    state, targets = peft_state(adapters, cfg.model)
    lo = cfg.lora
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": lo.lora_rank,
        "lora_alpha": lo.scaling * lo.lora_rank,
        "lora_dropout": lo.lora_dropout,
        "target_modules": targets,
        "fan_in_fan_out": style_of(cfg.model) == "gpt2",
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }
    os.makedirs(out_dir, exist_ok=True)
    save_file(state, os.path.join(out_dir, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    with open(os.path.join(out_dir, ADAPTER_CONFIG), "w") as fh:
        json.dump(config, fh, indent=2)
    return [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
