"""GPT built from tensor-parallel layers: GPT-2 style or Llama style, one code path.

The model knows nothing of schedules or optimizers. A pipeline stage is a GPTModel with
`pre_process` (owns the embedding), `post_process` (owns final norm, output layer, loss) and
the global numbers of its layers; the layers live in a ModuleDict keyed by their global
number so that parameter names (`layers.7.mlp.linear_fc1.weight`) are the same in every
layout, which is what makes initialisation and checkpoints layout-independent.

Activations are [seq, batch, hidden] ([seq/tp, batch, hidden] between TP regions with
sequence parallelism).

Activation recomputation trades compute for memory: `full` keeps only each layer's input and
reruns the layer in backward (for the first `recompute_num_layers` layers of the stage);
`selective` reruns only attention's core (softmax(QK^T)V, whose [b, n, s, s] activations are
the big ones). Both replay dropout exactly (`megalite.parallel.random.checkpoint`), so results
are bitwise those without recomputation.
"""

from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from megalite import ops
from megalite.config import Config, ModelConfig
from megalite.parallel import state
from megalite.parallel.cross_entropy import vocab_parallel_cross_entropy
from megalite.parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    column_parallel_linear,
    group_replicas,
    init_parameters,
)
from megalite.parallel.random import checkpoint, tracker
from megalite.parallel.tags import tag
from megalite.parallel.tensor import gather_from_tp, scatter_to_sp


def make_norm(cfg: ModelConfig, sequence_parallel: bool, dtype=None) -> nn.Module:
    if cfg.normalization == "RMSNorm":
        norm = ops.FusedRMSNorm(cfg.hidden_size, eps=cfg.norm_epsilon, dtype=dtype)
    else:
        norm = ops.FusedLayerNorm(cfg.hidden_size, eps=cfg.norm_epsilon, dtype=dtype)
    for name, p in norm.named_parameters():
        tag(
            p,
            init=("ones",) if name == "weight" else ("zeros",),
            sequence_parallel=sequence_parallel,
        )
    return norm


def dropout(x, p, training, in_tp_region):
    """Dropout whose mask differs per TP rank only where the activations do."""
    if p == 0.0 or not training:
        return x
    if in_tp_region:
        with tracker.fork():
            return F.dropout(x, p, True)
    return F.dropout(x, p, True)


class RotaryEmbedding(nn.Module):
    """RoPE, "rotate half" convention (GPT-NeoX, Megatron, Hugging Face Llama)."""

    def __init__(self, head_dim: int, base: float):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, seq_len: int, device, position_ids=None) -> tuple:
        """(cos, sin) of [s, 1, 1, d], or [s, b, 1, d] for per-sample positions [b, s]
        (packed sequences: each conversation starts again at position 0)."""
        if position_ids is None:
            pos = torch.arange(seq_len, device=device, dtype=torch.float32)[:, None]  # [s, 1]
        else:
            pos = position_ids.t().float()  # [s, b]
        freqs = pos[..., None] * self.inv_freq.to(device)  # [s, 1 or b, d/2]
        emb = torch.cat([freqs, freqs], dim=-1)[:, :, None, :]  # [s, 1 or b, 1, d]
        return emb.cos(), emb.sin()


def apply_rotary(x, cos, sin):
    # x [s, b, n, d]
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class Attention(nn.Module):
    """Causal self-attention; heads (and key/value groups) split over TP ranks.

    The fused QKV weight is laid out group by group: for each key/value group, its query
    heads, then its key head, then its value head. With TP <= groups a contiguous slice of
    rows is a whole number of groups, so column-parallel splitting needs no reordering. With
    TP > groups (TP a multiple of groups) the TP/groups ranks of one group each take a slice
    of its query heads and a replica of its key and value heads (the tag's `group_layout`).
    """

    def __init__(
        self,
        cfg: ModelConfig,
        sequence_parallel: bool,
        output_std: float,
        dtype=None,
        recompute_core: bool = False,
    ):
        super().__init__()
        tp = state.get().tp
        self.head_dim = d = cfg.hidden_size // cfg.num_attention_heads
        groups = cfg.num_query_groups
        q_per_group = cfg.num_attention_heads // groups
        layout = (groups, q_per_group * d, 2 * d)  # per group: q heads | k, v (rows)
        replicas = group_replicas(layout, tp)
        self.local_groups = max(groups // tp, 1)
        self.q_per_group = q_per_group // replicas  # query heads per local group
        self.attention_dropout = cfg.attention_dropout
        self.recompute_core = recompute_core
        bias = not cfg.disable_bias_linear
        qkv_out = groups * (q_per_group + 2) * d
        self.linear_qkv = ColumnParallelLinear(
            cfg.hidden_size,
            qkv_out,
            bias=bias,
            sequence_parallel=sequence_parallel,
            init_std=cfg.init_method_std,
            group_layout=layout,
            dtype=dtype,
        )
        self.linear_proj = RowParallelLinear(
            cfg.num_attention_heads * self.head_dim,
            cfg.hidden_size,
            bias=bias,
            sequence_parallel=sequence_parallel,
            init_std=output_std,
            dtype=dtype,
        )

    def forward(self, x, rotary=None, attention_mask=None):
        """attention_mask: None (causal) or a bool [b, 1, s, s], True where a query may attend
        to a key (packed sequences: causal within each conversation, `segment_mask`)."""
        qkv = self.linear_qkv(x)  # [s, b, g*(q+2)*d] (g local groups)
        s, b = qkv.shape[:2]
        qkv = qkv.view(s, b, self.local_groups, self.q_per_group + 2, self.head_dim)
        # One split (its backward is one cat) rather than three slices (each of which would
        # backpropagate through a zero-filled tensor of qkv's size).
        q, k, v = qkv.split([self.q_per_group, 1, 1], dim=3)
        q = q.reshape(s, b, -1, self.head_dim)  # [s, b, n, d]
        k, v = k.squeeze(3), v.squeeze(3)  # [s, b, g, d]
        if rotary is not None:
            cos, sin = rotary
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # [b, heads, s, d]
        if self.recompute_core and torch.is_grad_enabled():
            o = checkpoint(self.core_attention, q, k, v, attention_mask)
        else:
            o = self.core_attention(q, k, v, attention_mask)  # [b, n, s, d]
        o = o.permute(2, 0, 1, 3).reshape(s, b, -1)  # [s, b, n*d]
        return self.linear_proj(o)  # [s, b, h]

    def core_attention(self, q, k, v, attention_mask=None):
        # Heads differ per TP rank, so dropout on the probabilities uses the TP-rank stream.
        p = self.attention_dropout if self.training else 0.0
        with tracker.fork() if p > 0 else contextlib.nullcontext():
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=attention_mask, dropout_p=p,
                is_causal=attention_mask is None, enable_gqa=self.q_per_group > 1,
            )  # fmt: skip


class MLP(nn.Module):
    """GeLU MLP, or SwiGLU with the gate and up projections fused into one (strided) weight."""

    def __init__(self, cfg: ModelConfig, sequence_parallel: bool, output_std: float, dtype=None):
        super().__init__()
        ffn = cfg.ffn_hidden_size
        self.swiglu = cfg.swiglu
        bias = not cfg.disable_bias_linear
        self.linear_fc1 = ColumnParallelLinear(
            cfg.hidden_size,
            2 * ffn if self.swiglu else ffn,
            bias=bias,
            sequence_parallel=sequence_parallel,
            init_std=cfg.init_method_std,
            stride=2 if self.swiglu else 1,
            dtype=dtype,
        )
        self.linear_fc2 = RowParallelLinear(
            ffn,
            cfg.hidden_size,
            bias=bias,
            sequence_parallel=sequence_parallel,
            init_std=output_std,
            dtype=dtype,
        )

    def forward(self, x):
        h = self.linear_fc1(x)  # [s, b, ffn/tp] (x2 for SwiGLU)
        # fused kernels: silu(gate) * up, gelu_tanh, each one pass fwd and one bwd
        h = ops.swiglu(h) if self.swiglu else ops.gelu_tanh(h)
        return self.linear_fc2(h)  # [s, b, h]


class TransformerLayer(nn.Module):
    def __init__(
        self, cfg: ModelConfig, sequence_parallel: bool, dtype=None, recompute_core: bool = False
    ):
        super().__init__()
        # GPT-2 / Megatron scaled init: residual-branch outputs get std / sqrt(2 L).
        output_std = cfg.init_method_std / math.sqrt(2.0 * cfg.num_layers)
        self.input_norm = make_norm(cfg, sequence_parallel, dtype)
        self.attention = Attention(cfg, sequence_parallel, output_std, dtype, recompute_core)
        self.pre_mlp_norm = make_norm(cfg, sequence_parallel, dtype)
        self.mlp = MLP(cfg, sequence_parallel, output_std, dtype)
        self.hidden_dropout = cfg.hidden_dropout
        self.sequence_parallel = sequence_parallel

    def forward(self, x, rotary=None, attention_mask=None):
        # x [s, b, h]
        def drop(t):
            return dropout(t, self.hidden_dropout, self.training, self.sequence_parallel)

        x = x + drop(self.attention(self.input_norm(x), rotary, attention_mask))
        return x + drop(self.mlp(self.pre_mlp_norm(x)))


class GPTModel(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        vocab_size: int,
        *,
        sequence_parallel: bool = False,
        pre_process: bool = True,
        post_process: bool = True,
        layer_numbers: Optional[list[int]] = None,
        dtype=None,
        unpadded_vocab_size: Optional[int] = None,
        recompute_granularity: Optional[str] = None,
        recompute_num_layers: Optional[int] = None,
    ):
        """vocab_size: the padded vocabulary; unpadded_vocab_size: the real one (the loss
        ignores the padding ids, so it is the same for every TP size; default: all real).
        layer_numbers: global numbers of this stage's layers (default: all).
        recompute_granularity: None, "full" (the first recompute_num_layers layers of this
        stage, default all) or "selective" (attention's core in every layer).

        Over ~60 lines (half of it the signature): the model's modules, listed once in
        forward order."""
        super().__init__()
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.unpadded_vocab_size = unpadded_vocab_size or vocab_size
        if recompute_granularity not in (None, "full", "selective"):
            raise ValueError(
                f"recompute_granularity {recompute_granularity!r}: use None, 'full' or 'selective'"
            )
        self.pre_process, self.post_process = pre_process, post_process
        self.sequence_parallel = sequence_parallel and state.get().tp > 1
        sp = self.sequence_parallel
        self.tied = not cfg.untie_embeddings_and_output_weights
        std = cfg.init_method_std

        if pre_process:
            self.embedding = nn.Module()
            self.embedding.word_embeddings = VocabParallelEmbedding(
                vocab_size, cfg.hidden_size, sequence_parallel=sp, init_std=std, dtype=dtype
            )
            if self.tied:
                tag(self.embedding.word_embeddings.weight, tied_embedding="input")
            if cfg.position_embedding_type == "learned_absolute":
                self.embedding.position_embeddings = nn.Embedding(
                    cfg.max_position_embeddings, cfg.hidden_size, dtype=dtype
                )
                tag(self.embedding.position_embeddings.weight, init=("normal", std))
        self.rotary = (
            RotaryEmbedding(cfg.hidden_size // cfg.num_attention_heads, cfg.rotary_base)
            if cfg.position_embedding_type == "rope"
            else None
        )

        numbers = list(range(cfg.num_layers) if layer_numbers is None else layer_numbers)
        selective = recompute_granularity == "selective"
        self.layers = nn.ModuleDict(
            {str(i): TransformerLayer(cfg, sp, dtype, selective) for i in numbers}
        )
        # full recompute: the first N layers of this stage (Megatron's "block" method)
        self.recompute_layers = 0
        if recompute_granularity == "full":
            self.recompute_layers = min(recompute_num_layers or len(numbers), len(numbers))

        if post_process:
            self.final_norm = make_norm(cfg, sp, dtype)
            if not (self.tied and pre_process):
                self.output_layer = ColumnParallelLinear(
                    cfg.hidden_size,
                    vocab_size,
                    bias=False,
                    sequence_parallel=sp,
                    init_std=std,
                    dtype=dtype,
                )
                if self.tied:
                    # The last pipeline stage's copy of the tied embedding: it starts equal to
                    # the first stage's and their grads are summed over the embedding group.
                    tag(
                        self.output_layer.weight,
                        tied_embedding="output",
                        init_name="embedding.word_embeddings.weight",
                    )

    def output_weight(self):
        if hasattr(self, "output_layer"):
            return self.output_layer.weight
        return self.embedding.word_embeddings.weight

    def embed(self, tokens, position_ids=None):
        # tokens [b, s] -> [s, b, h] ([s/tp, b, h] with sequence parallelism)
        x = self.embedding.word_embeddings(tokens)
        if hasattr(self.embedding, "position_embeddings"):
            if position_ids is None:
                pos = torch.arange(tokens.shape[1], device=tokens.device)
                pos = self.embedding.position_embeddings(pos).unsqueeze(1)  # [s, 1, h]
            else:  # packed sequences: [b, s] positions, restarting per conversation
                pos = self.embedding.position_embeddings(position_ids.t())  # [s, b, h]
            x = x + (scatter_to_sp(pos) if self.sequence_parallel else pos)
        return dropout(x, self.cfg.hidden_dropout, self.training, self.sequence_parallel)

    def forward(
        self, tokens=None, labels=None, hidden_states=None, position_ids=None, segment_ids=None
    ):
        """First stage: tokens [b, s]; later stages: hidden_states [s, b, h] from the stage
        before. Last stage returns the per-token loss [b, s] (fp32) when labels are given,
        else vocab-parallel logits [s, b, v/tp]; other stages return hidden states.

        Packed sequences (--sft): position_ids [b, s] restart at 0 for each conversation and
        segment_ids [b, s] number the conversations of a sample; attention is causal within
        a conversation and never crosses into another (`segment_mask`). Every stage needs
        both, so with them every pipeline stage reads the batch."""
        x = self.embed(tokens, position_ids) if self.pre_process else hidden_states
        rotary = None
        if self.rotary is not None:
            seq = x.shape[0] * (state.get().tp if self.sequence_parallel else 1)
            rotary = self.rotary(seq, x.device, position_ids)
        mask = None if segment_ids is None else segment_mask(segment_ids)
        for i, layer in enumerate(self.layers.values()):
            if i < self.recompute_layers and torch.is_grad_enabled():
                x = checkpoint(layer, x, rotary, mask)  # keeps only x; reruns in backward
            else:
                x = layer(x, rotary, mask)  # [s, b, h] ([s/tp, b, h] with SP)
        if not self.post_process:
            return x
        x = self.final_norm(x)
        # [s, b, v/tp]; a tied head on the embedding's stage reuses the embedding weight
        output = column_parallel_linear(x, self.output_weight(), None, self.sequence_parallel)
        if labels is None:
            return output
        loss = vocab_parallel_cross_entropy(
            output, labels.t(), vocab_size=self.unpadded_vocab_size
        )  # [s, b]
        return loss.t()  # [b, s]

    @torch.no_grad()
    def full_logits(self, tokens, **packing):
        """Logits over the whole padded vocabulary, gathered over TP: [b, s, v]. packing:
        position_ids and segment_ids of packed sequences (see forward)."""
        return gather_from_tp(self(tokens, **packing)).transpose(0, 1)


def segment_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """The block-diagonal causal mask of packed sequences: [b, s] segment ids -> bool
    [b, 1, s, s], True where query i may attend to key j (j <= i, same segment). SDPA takes
    it as is (on CUDA its memory-efficient kernel supports such masks)."""
    s = segment_ids.shape[1]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]  # [b, s, s]
    causal = torch.ones(s, s, dtype=torch.bool, device=segment_ids.device).tril()
    return (same & causal).unsqueeze(1)


def num_parameters(cfg: ModelConfig, vocab_size: int) -> dict:
    """Parameter counts of the full (unsharded) model, for FLOPs and logs."""
    h, L = cfg.hidden_size, cfg.num_layers
    heads = cfg.num_attention_heads
    groups = cfg.num_query_groups
    d = h // heads
    bias = 0 if cfg.disable_bias_linear else 1
    ffn = cfg.ffn_hidden_size
    fc1_out = 2 * ffn if cfg.swiglu else ffn
    norm = h * (2 if cfg.normalization == "LayerNorm" else 1)
    qkv_out = groups * (heads // groups + 2) * d
    layer = (
        h * qkv_out
        + bias * qkv_out
        + heads * d * h
        + bias * h
        + h * fc1_out
        + bias * fc1_out
        + ffn * h
        + bias * h
        + 2 * norm
    )
    embedding = vocab_size * h
    position = (
        h * cfg.max_position_embeddings if cfg.position_embedding_type == "learned_absolute" else 0
    )
    output = 0 if not cfg.untie_embeddings_and_output_weights else vocab_size * h
    total = L * layer + embedding + position + output + norm
    return {"total": total, "non_embedding": L * layer + norm}


def flops_per_token(cfg: ModelConfig, vocab_size: int) -> float:
    """Training FLOPs (forward + backward) per token: 6 per weight-matrix parameter plus
    attention's score and value products (causal masking not subtracted, as Megatron does)."""
    n = num_parameters(cfg, vocab_size)["non_embedding"]
    attention = 12 * cfg.num_layers * cfg.hidden_size * cfg.seq_length
    return 6 * n + attention + 6 * vocab_size * cfg.hidden_size


# -- this rank's model ------------------------------------------------------------------------


def model_chunks(cfg: Config, vocab_size: int, unpadded_vocab_size: int) -> list:
    """This rank's model chunks (one per virtual pipeline stage; one without interleaving),
    built for its pipeline stage and TP slice, uninitialised, on the current default device."""
    st = state.get()
    vp = cfg.virtual_pipeline_size
    chunks = []
    for c, layers in enumerate(cfg.pipeline_layout()[st.pp_rank]):
        # The embedding lives on the first virtual stage, head and loss on the last.
        chunks.append(
            GPTModel(
                cfg.model,
                vocab_size,
                pre_process=st.is_first_stage and c == 0,
                post_process=st.is_last_stage and c == vp - 1,
                layer_numbers=layers,
                sequence_parallel=cfg.parallel.sequence_parallel,
                unpadded_vocab_size=unpadded_vocab_size,
                recompute_granularity=cfg.parallel.recompute_granularity,
                recompute_num_layers=cfg.parallel.recompute_num_layers,
            )
        )
    return chunks


def build_model(cfg: Config, vocab_size: int, unpadded_vocab_size: int) -> list:
    """This rank's model chunks, each initialised from the seed alone, on the config's
    device, in fp32 (`cast_params` turns them into the training dtype)."""
    chunks = model_chunks(cfg, vocab_size, unpadded_vocab_size)
    for model in chunks:
        init_parameters(model, cfg.training.seed)
    return [model.to(state.get().device) for model in chunks]


def rank_parameters(cfg: Config, vocab_size: int, tp_rank: int, pp_rank: int) -> dict:
    """{name: param} of the chunks that rank (tp_rank, pp_rank) of cfg's layout builds, on the
    meta device (names, shapes and tags only): what a converter writes for that rank."""
    tp, pp = cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size
    with state.as_rank(tp, pp, tp_rank, pp_rank), torch.device("meta"):
        chunks = model_chunks(cfg, vocab_size, vocab_size)
    return {n: p for chunk in chunks for n, p in chunk.named_parameters()}


@torch.no_grad()
def cast_params(modules, dtype) -> None:
    """Turn the parameters (not the buffers: RoPE's inverse frequencies stay fp32) into dtype.
    Do it before the data-parallel grad buffers are built: they take the params as they are."""
    for module in modules if isinstance(modules, (list, tuple)) else [modules]:
        for p in module.parameters():
            if p.dtype != dtype:
                p.data = p.data.to(dtype)
