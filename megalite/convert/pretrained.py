"""`load_pretrained(DIR)`: the whole model of a checkpoint of any layout, in this process.

The checkpoint's TP x PP shards are merged (`load_full_model_state`) into one GPTModel built
at TP = PP = 1 from the checkpoint's saved config; no process group is needed (uninitialised,
`parallel.state` reads as one rank, and every TP region function is the identity). A LoRA
checkpoint (adapters only) gives its base model with the adapters on, unmerged, as trained.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn as nn

from megalite.config import Config
from megalite.errors import MegaliteError
from megalite.model.gpt import GPTModel, cast_params
from megalite.model.lora import add_lora
from megalite.parallel import state
from megalite.training.checkpoint import load_full_model_state


class PretrainedGPT(nn.Module):
    """A GPTModel with the Hugging Face face: input_ids [b, s] -> logits [b, s, vocab] over
    the real (unpadded) vocabulary. `config` is the run's Config, `gpt` the GPTModel."""

    def __init__(self, gpt: GPTModel, config: Config, vocab_size: int):
        super().__init__()
        self.gpt, self.config, self.vocab_size = gpt, config, vocab_size

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        logits = self.gpt(input_ids)  # [s, b, padded vocab]
        return logits.transpose(0, 1)[..., : self.vocab_size]


def real_vocab_size(cfg: Config, padded: int) -> int:
    """The unpadded vocabulary: --vocab-size, else the run's tokenizer's (if its file is still
    there), else the padded size (no tokenizer to tell: every row counts as real)."""
    if cfg.model.vocab_size:
        return cfg.model.vocab_size
    d = cfg.data
    if d.tokenizer_model and os.path.exists(d.tokenizer_model):
        from megalite.data import build_tokenizer

        return build_tokenizer(d.tokenizer_type, d.tokenizer_model).vocab_size
    return padded


def load_pretrained(
    root: str,
    iteration: Optional[int] = None,
    dtype: torch.dtype = torch.float32,
    device="cpu",
) -> PretrainedGPT:
    """The model of checkpoint directory `root` (its latest iteration unless `iteration`),
    in eval mode, in `dtype` (fp32 by default, whatever it was trained in), on `device`.
    A LoRA checkpoint: its base (the one metadata.json names) with the adapters attached."""
    st = state.get()
    if st.tp > 1 or st.pp > 1:
        raise MegaliteError(
            f"load_pretrained builds a one-process model, but this process is tensor-parallel "
            f"rank of {st.tp} x pipeline {st.pp}; call it before state.initialize or in "
            f"another process"
        )
    full, meta = load_full_model_state(root, iteration)
    cfg = Config.from_dict(meta["config"])
    adapters = None
    if meta.get("lora_base") is not None:  # a LoRA checkpoint: its base, with the adapters
        from megalite.convert.lora import read_lora

        adapters, meta, full, _ = read_lora(root, iteration)
    padded = full["embedding.word_embeddings.weight"].shape[0]
    gpt = GPTModel(cfg.model, padded, unpadded_vocab_size=real_vocab_size(cfg, padded))
    if adapters is not None:
        add_lora([gpt], cfg.lora, cfg.training.seed)
        full.update(adapters)
    if not hasattr(gpt, "output_layer"):
        # A tied model saved with PP > 1 also holds the last stage's copy of the embedding.
        full.pop("output_layer.weight", None)
    gpt.load_state_dict(full)
    cast_params(gpt, dtype)  # the parameters only: RoPE's inverse frequencies stay fp32
    return PretrainedGPT(gpt, cfg, gpt.unpadded_vocab_size).to(device).eval()
