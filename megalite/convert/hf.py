"""Hugging Face export and import: GPT-2 style as GPT2LMHeadModel, Llama style as
LlamaForCausalLM. Only local directories; the files are read and written with `safetensors`
and JSON (`transformers` is not needed).

The names differ, and so do three layouts:
- megalite fuses q, k, v into one weight laid out group by group (each key/value group's
  query heads, then its key head, then its value head); HF's GPT-2 has [all q; all k; all v]
  in `c_attn`, HF's Llama separate q/k/v projections. Query head j of group g is head
  g * (heads / groups) + j in both, so GQA needs no other reordering.
- HF's GPT-2 uses Conv1D, whose weights are [in, out]: the transposes of megalite's.
- SwiGLU's fc1 is [gate; up] in megalite, gate_proj and up_proj in HF.
Rotary needs no permutation: megalite applies RoPE with the "rotate half" convention on the
unpermuted head dim, as HF's Llama does on its own q/k layout.
The vocabulary padding (a multiple of 128 x TP) is stripped on export and padded on import.
"""

from __future__ import annotations

import json
import os
import shutil

import torch

from megalite.config import make_config
from megalite.errors import MegaliteError
from megalite.layout import padded_vocab_size

SAFETENSORS = "model.safetensors"
INDEX = SAFETENSORS + ".index.json"
# Buffers some HF versions save beside the weights; they carry no learned value.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")


def style_of(m) -> str:
    """'gpt2' or 'llama' for a ModelConfig whose architecture one of the two HF classes holds."""
    gpt2 = dict(position_embedding_type="learned_absolute", normalization="LayerNorm",
                swiglu=False, disable_bias_linear=False)  # fmt: skip
    llama = dict(position_embedding_type="rope", normalization="RMSNorm", swiglu=True,
                 disable_bias_linear=True)  # fmt: skip
    for name, want in (("gpt2", gpt2), ("llama", llama)):
        if all(getattr(m, k) == v for k, v in want.items()):
            if name == "gpt2" and m.num_query_groups != m.num_attention_heads:
                break
            return name
    raise MegaliteError(
        f"this model ({m.position_embedding_type}, {m.normalization}, "
        f"{'SwiGLU' if m.swiglu else 'GeLU'}, biases {not m.disable_bias_linear}, "
        f"{m.num_query_groups} query groups) is neither GPT-2 style (learned positions, "
        f"LayerNorm, GeLU, biases, no GQA) nor Llama style (RoPE, RMSNorm, SwiGLU, no biases); "
        f"only those two export to Hugging Face"
    )


# -- the fused tensors ------------------------------------------------------------------------


def split_qkv(w, m):
    """megalite's grouped [g x (q heads, k, v)] rows -> (q, k, v) rows in head order."""
    d = m.hidden_size // m.num_attention_heads
    g, per = m.num_query_groups, m.num_attention_heads // m.num_query_groups
    blocks = w.reshape(g, per + 2, d, *w.shape[1:])
    q = blocks[:, :per].reshape(g * per * d, *w.shape[1:])
    k = blocks[:, per].reshape(g * d, *w.shape[1:])
    v = blocks[:, per + 1].reshape(g * d, *w.shape[1:])
    return q, k, v


def fuse_qkv(q, k, v, m):
    """The inverse of split_qkv."""
    d = m.hidden_size // m.num_attention_heads
    g, per = m.num_query_groups, m.num_attention_heads // m.num_query_groups
    rest = q.shape[1:]
    blocks = torch.cat(
        [q.reshape(g, per, d, *rest), k.reshape(g, 1, d, *rest), v.reshape(g, 1, d, *rest)],
        dim=1,
    )
    return blocks.reshape(g * (per + 2) * d, *rest)


# -- one table per style: megalite name -> [(HF name, to HF, from HF)] -------------------------
# A fused megalite tensor maps to several HF tensors; `to_hf(t)` returns them in table order and
# `from_hf(*ts)` fuses them back.


def _same(t):
    return t


def _t(t):
    return t.t().contiguous()


def _gpt2_layer(m, i):
    hf = f"transformer.h.{i}."
    L = f"layers.{i}."

    def qkv_to(t):  # [q; k; v] rows, then Conv1D's [in, out]
        return [torch.cat(split_qkv(t, m), dim=0).t().contiguous()]

    def qkv_to_bias(t):
        return [torch.cat(split_qkv(t, m), dim=0)]

    def qkv_from(w):
        return fuse_qkv(*w.t().chunk(3, dim=0), m).contiguous()

    def qkv_from_bias(b):
        return fuse_qkv(*b.chunk(3, dim=0), m)

    table = {
        L + "attention.linear_qkv.weight": ([hf + "attn.c_attn.weight"], qkv_to, qkv_from),
        L + "attention.linear_qkv.bias": ([hf + "attn.c_attn.bias"], qkv_to_bias, qkv_from_bias),
        L + "attention.linear_proj.weight": ([hf + "attn.c_proj.weight"], _t, _t),
        L + "attention.linear_proj.bias": ([hf + "attn.c_proj.bias"], _same, _same),
        L + "mlp.linear_fc1.weight": ([hf + "mlp.c_fc.weight"], _t, _t),
        L + "mlp.linear_fc1.bias": ([hf + "mlp.c_fc.bias"], _same, _same),
        L + "mlp.linear_fc2.weight": ([hf + "mlp.c_proj.weight"], _t, _t),
        L + "mlp.linear_fc2.bias": ([hf + "mlp.c_proj.bias"], _same, _same),
    }
    for ours, theirs in (("input_norm", "ln_1"), ("pre_mlp_norm", "ln_2")):
        for p in ("weight", "bias"):
            table[f"{L}{ours}.{p}"] = ([f"{hf}{theirs}.{p}"], _same, _same)
    return table


def _llama_layer(m, i):
    hf = f"model.layers.{i}."
    L = f"layers.{i}."
    proj = [hf + f"self_attn.{x}_proj.weight" for x in "qkv"]
    return {
        L + "attention.linear_qkv.weight": (
            proj,
            lambda t: list(split_qkv(t, m)),
            lambda q, k, v: fuse_qkv(q, k, v, m),
        ),
        L + "attention.linear_proj.weight": ([hf + "self_attn.o_proj.weight"], _same, _same),
        L + "mlp.linear_fc1.weight": (
            [hf + "mlp.gate_proj.weight", hf + "mlp.up_proj.weight"],
            lambda t: list(t.chunk(2, dim=0)),
            lambda gate, up: torch.cat([gate, up], dim=0),
        ),
        L + "mlp.linear_fc2.weight": ([hf + "mlp.down_proj.weight"], _same, _same),
        L + "input_norm.weight": ([hf + "input_layernorm.weight"], _same, _same),
        L + "pre_mlp_norm.weight": ([hf + "post_attention_layernorm.weight"], _same, _same),
    }


def name_table(m) -> dict:
    """{megalite name: ([HF names], to_hf, from_hf)} of a full (one-process) model."""
    style = style_of(m)
    untied = m.untie_embeddings_and_output_weights
    if style == "gpt2":
        table = {
            "embedding.word_embeddings.weight": (["transformer.wte.weight"], _same, _same),
            "embedding.position_embeddings.weight": (["transformer.wpe.weight"], _same, _same),
            "final_norm.weight": (["transformer.ln_f.weight"], _same, _same),
            "final_norm.bias": (["transformer.ln_f.bias"], _same, _same),
        }
        layer = _gpt2_layer
    else:
        table = {
            "embedding.word_embeddings.weight": (["model.embed_tokens.weight"], _same, _same),
            "final_norm.weight": (["model.norm.weight"], _same, _same),
        }
        layer = _llama_layer
    if untied:
        table["output_layer.weight"] = (["lm_head.weight"], _same, _same)
    for i in range(m.num_layers):
        table.update(layer(m, i))
    return table


VOCAB_ROWS = ("embedding.word_embeddings.weight", "output_layer.weight")


# -- configs ----------------------------------------------------------------------------------


def hf_config(m, vocab: int, eod=None) -> dict:
    """config.json of the HF model holding megalite ModelConfig `m` with `vocab` real ids."""
    common = dict(vocab_size=vocab, tie_word_embeddings=not m.untie_embeddings_and_output_weights,
                  bos_token_id=eod, eos_token_id=eod, initializer_range=m.init_method_std,
                  torch_dtype="float32")  # fmt: skip
    if style_of(m) == "gpt2":
        return dict(common, architectures=["GPT2LMHeadModel"], model_type="gpt2",
                    n_embd=m.hidden_size, n_layer=m.num_layers, n_head=m.num_attention_heads,
                    n_inner=m.ffn_hidden_size, n_positions=m.max_position_embeddings,
                    activation_function="gelu_new", layer_norm_epsilon=m.norm_epsilon,
                    resid_pdrop=m.hidden_dropout, embd_pdrop=m.hidden_dropout,
                    attn_pdrop=m.attention_dropout)  # fmt: skip
    return dict(common, architectures=["LlamaForCausalLM"], model_type="llama",
                hidden_size=m.hidden_size, num_hidden_layers=m.num_layers,
                num_attention_heads=m.num_attention_heads,
                num_key_value_heads=m.num_query_groups, intermediate_size=m.ffn_hidden_size,
                max_position_embeddings=m.max_position_embeddings, hidden_act="silu",
                rms_norm_eps=m.norm_epsilon, rope_theta=m.rotary_base,
                rope_parameters={"rope_type": "default", "rope_theta": m.rotary_base},
                head_dim=m.hidden_size // m.num_attention_heads, attention_bias=False,
                mlp_bias=False, attention_dropout=m.attention_dropout)  # fmt: skip


def model_settings(hf: dict, path: str) -> dict:
    """megalite model settings (make_config keys) from an HF config.json."""
    kind = hf.get("model_type")
    tied = hf.get("tie_word_embeddings", True)
    if kind == "gpt2":
        if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
            raise MegaliteError(
                f"{path}: activation {hf['activation_function']!r}; megalite's GPT-2 MLP is "
                f"GeLU with the tanh approximation (gelu_new)"
            )
        if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("reorder_and_upcast_attn"):
            raise MegaliteError(f"{path}: scale_attn_by_inverse_layer_idx is not supported")
        return dict(model_style="gpt2", num_layers=hf["n_layer"], hidden_size=hf["n_embd"],
                    num_attention_heads=hf["n_head"],
                    ffn_hidden_size=hf.get("n_inner") or 4 * hf["n_embd"],
                    max_position_embeddings=hf["n_positions"],
                    seq_length=hf["n_positions"], norm_epsilon=hf["layer_norm_epsilon"],
                    untie_embeddings_and_output_weights=not tied,
                    vocab_size=hf["vocab_size"])  # fmt: skip
    if kind == "llama":
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise MegaliteError(
                f"{path}: RoPE scaling {rope_type!r} is not supported (megalite has plain RoPE)"
            )
        heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
        if head_dim * heads != hf["hidden_size"]:
            raise MegaliteError(f"{path}: head_dim {head_dim} x heads {heads} != hidden_size")
        if hf.get("attention_bias") or hf.get("mlp_bias") or hf.get("hidden_act") != "silu":
            raise MegaliteError(f"{path}: biases or a non-SiLU MLP are not Llama style")
        return dict(model_style="llama", num_layers=hf["num_hidden_layers"],
                    hidden_size=hf["hidden_size"], num_attention_heads=heads,
                    num_query_groups=hf.get("num_key_value_heads") or heads,
                    ffn_hidden_size=hf["intermediate_size"],
                    max_position_embeddings=hf["max_position_embeddings"],
                    seq_length=hf["max_position_embeddings"],
                    norm_epsilon=hf.get("rms_norm_eps", 1e-6),
                    rotary_base=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
                    untie_embeddings_and_output_weights=not tied,
                    vocab_size=hf["vocab_size"])  # fmt: skip
    raise MegaliteError(
        f"{path}: model_type {kind!r}; megalite imports gpt2 (GPT2LMHeadModel) and llama "
        f"(LlamaForCausalLM)"
    )


# -- state dicts ------------------------------------------------------------------------------


def to_hf_state(full: dict, m, vocab: int) -> dict:
    """HF state dict from a full megalite state dict (vocabulary padding stripped)."""
    out = {}
    for name, (hf_names, to_hf, _) in name_table(m).items():
        t = full[name]
        if name in VOCAB_ROWS:
            t = t[:vocab]
        tensors = to_hf(t)
        for hf_name, value in zip(hf_names, tensors if isinstance(tensors, list) else [tensors]):
            out[hf_name] = value.contiguous()
    return out


def from_hf_state(hf: dict, m, padded_vocab: int, path: str) -> dict:
    """Full megalite state dict from an HF state dict (vocabulary padded with zero rows)."""
    table = name_table(m)
    wanted = {n for names, _, _ in table.values() for n in names}
    if not m.untie_embeddings_and_output_weights:
        hf = {k: v for k, v in hf.items() if k != "lm_head.weight"}  # tied: a copy of wte
    extra = [k for k in hf if k not in wanted and not k.endswith(IGNORED_SUFFIXES)]
    missing = sorted(wanted - set(hf))
    if missing or extra:
        what = f"lacks {missing[0]}" if missing else f"has {extra[0]}, which megalite lacks"
        raise MegaliteError(f"{path} {what}: it does not match its config.json")
    full = {}
    for name, (hf_names, _, from_hf) in table.items():
        t = from_hf(*[hf[n] for n in hf_names])
        if name in VOCAB_ROWS and t.shape[0] < padded_vocab:
            t = torch.cat([t, t.new_zeros(padded_vocab - t.shape[0], *t.shape[1:])])
        full[name] = t.contiguous()
    return full


# -- safetensors files ------------------------------------------------------------------------


def parse_size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    s = str(text).strip().upper()
    for unit, factor in sorted(units.items(), key=lambda u: -len(u[0])):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * factor)
    return int(s)


def write_safetensors(state: dict, out_dir: str, max_shard_bytes: int) -> list:
    """model.safetensors, or model-0000k-of-0000n.safetensors with an index (HF's names) when
    the tensors exceed max_shard_bytes. Returns the files written."""
    from safetensors.torch import save_file

    shards, size = [[]], 0
    for name, t in state.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(state, os.path.join(out_dir, SAFETENSORS), metadata=meta)
        return [SAFETENSORS]
    files, weight_map = [], {}
    for k, names in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: state[n] for n in names}, os.path.join(out_dir, fname), metadata=meta)
        files.append(fname)
        weight_map.update({n: fname for n in names})
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    with open(os.path.join(out_dir, INDEX), "w") as fh:
        json.dump(index, fh, indent=2)
    return files + [INDEX]


def read_safetensors(in_dir: str) -> dict:
    """Every tensor of model.safetensors, or of the shards its index names."""
    from safetensors.torch import load_file

    single, index = os.path.join(in_dir, SAFETENSORS), os.path.join(in_dir, INDEX)
    if os.path.exists(index):
        with open(index) as fh:
            files = sorted(set(json.load(fh)["weight_map"].values()))
    elif os.path.exists(single):
        files = [SAFETENSORS]
    else:
        raise MegaliteError(
            f"{in_dir} has neither {SAFETENSORS} nor {INDEX}; save the model with "
            f"save_pretrained(..., safe_serialization=True)"
        )
    state = {}
    for f in files:
        state.update(load_file(os.path.join(in_dir, f)))
    return state


# -- tokenizer files --------------------------------------------------------------------------

TOKENIZER_FILES = {"sentencepiece": "tokenizer.model", "huggingface": "tokenizer.json"}


def copy_tokenizer(data_cfg, out_dir: str):
    """Copy the run's tokenizer into out_dir under HF's name; returns (file name, eod) or
    (None, None) when the run had no tokenizer file."""
    path = data_cfg.tokenizer_model
    if not path or not os.path.exists(path):
        return None, None
    from megalite.data import build_tokenizer

    tok = build_tokenizer(data_cfg.tokenizer_type, path)
    src = getattr(tok, "model_path", path)
    name = TOKENIZER_FILES.get(tok.name)
    if name is None:
        return None, tok.eod
    shutil.copyfile(src, os.path.join(out_dir, name))
    cls = "LlamaTokenizer" if tok.name == "sentencepiece" else "PreTrainedTokenizerFast"
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as fh:
        json.dump({"tokenizer_class": cls, "model_max_length": 1 << 30}, fh, indent=2)
    return name, tok.eod


# -- the two directions -----------------------------------------------------------------------


def export_hf(
    load_dir: str, out_dir: str, max_shard_size="5GB", iteration=None, merge_lora=False
) -> list:
    """Write a megalite checkpoint (any layout) as an HF model directory; returns its files.
    A LoRA checkpoint (adapters only) needs merge_lora: its adapters folded into its base."""
    from megalite.config import Config
    from megalite.convert.lora import merged_state
    from megalite.convert.pretrained import real_vocab_size
    from megalite.training.checkpoint import load_full_model_state

    if merge_lora:
        full, meta = merged_state(load_dir, iteration)
    else:
        full, meta = load_full_model_state(load_dir, iteration)
        if meta.get("lora_base") is not None:
            raise MegaliteError(
                f"{load_dir} is a LoRA checkpoint (adapters only): add --merge-lora for the "
                f"merged model, or write the adapters for peft with export-peft"
            )
    cfg = Config.from_dict(meta["config"])
    m = cfg.model
    style_of(m)  # fails early, before anything is written, on a model HF cannot hold
    vocab = real_vocab_size(cfg, full["embedding.word_embeddings.weight"].shape[0])
    os.makedirs(out_dir, exist_ok=True)
    tok_file, eod = copy_tokenizer(cfg.data, out_dir)
    state = {k: v.float() if v.is_floating_point() else v for k, v in full.items()}
    files = write_safetensors(to_hf_state(state, m, vocab), out_dir, parse_size(max_shard_size))
    with open(os.path.join(out_dir, "config.json"), "w") as fh:
        json.dump(hf_config(m, vocab, eod), fh, indent=2)
    gen = {"bos_token_id": eod, "eos_token_id": eod, "max_length": m.max_position_embeddings}
    with open(os.path.join(out_dir, "generation_config.json"), "w") as fh:
        json.dump(gen, fh, indent=2)
    return files + ["config.json", "generation_config.json"] + ([tok_file] if tok_file else [])


def import_hf(in_dir: str, save_dir: str, settings: dict) -> tuple:
    """Write the HF model directory in_dir as a megalite checkpoint (iteration 0, weights
    only) under save_dir, at the layout `settings` asks for (make_config keys: layout flags,
    or anything else the run should record). Returns (directory, Config)."""
    from megalite.model.gpt import rank_parameters
    from megalite.training.checkpoint import save_weights_checkpoint

    path = os.path.join(in_dir, "config.json")
    if not os.path.exists(path):
        raise MegaliteError(f"{in_dir} has no config.json; pass a Hugging Face model directory")
    with open(path) as fh:
        hf = json.load(fh)
    model = model_settings(hf, path)
    data = {}
    os.makedirs(save_dir, exist_ok=True)
    for kind, name in TOKENIZER_FILES.items():
        if os.path.exists(os.path.join(in_dir, name)):
            dst = os.path.abspath(os.path.join(save_dir, name))
            shutil.copyfile(os.path.join(in_dir, name), dst)
            data = dict(tokenizer_model=dst, tokenizer_type=kind)
            break
    p = {**settings}
    world = p.get("tensor_model_parallel_size", 1) * p.get("pipeline_model_parallel_size", 1)
    cfg = make_config(model, data, p, world_size=world, source="import-hf")
    m = cfg.model
    tp = cfg.parallel.tensor_model_parallel_size
    padded = padded_vocab_size(m.vocab_size, m.make_vocab_size_divisible_by, tp)
    full = from_hf_state(read_safetensors(in_dir), m, padded, in_dir)

    def rank_params(tp_rank, pp_rank):
        return rank_parameters(cfg, padded, tp_rank, pp_rank)

    return save_weights_checkpoint(cfg, rank_params, full, save_dir), cfg
