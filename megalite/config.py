"""One typed config for a run: frozen dataclasses, a YAML file, and Megatron-style flags.

Every field of every section is a command-line flag: `num_layers` is `--num-layers`. A YAML
file (`--config run.yaml`) may set any field, flat (`num_layers: 4`) or under its section
(`model: {num_layers: 4}`); flags given on the command line override it. Field names are
unique across sections so that a flag names exactly one field.

A Config is a value. `parse_config` (flags + YAML) and `make_config` (a dict) return it
finished: presets applied, every default that follows from other settings resolved (global
batch, FFN size, bucket size, device, backend...), and the whole layout checked against the
world size once, before any process group exists. Nothing changes it afterwards; a variant is
a new Config (`make_config` again, or `dataclasses.replace` of a section). This module imports
neither the model nor the parallel code: the layout arithmetic it checks lives in
`megalite.layout`, shared with the code that builds the model.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Literal, Optional

import torch

from megalite.errors import MegaliteError
from megalite.layout import pipeline_layout, virtual_pipeline_size


def _f(default, help, **kw):
    return field(default=default, metadata={"help": help, **kw})


def _list(help):
    return field(default_factory=list, metadata={"help": help})


def _set(obj, name, value):
    object.__setattr__(obj, name, value)  # resolving a default while a frozen value is built


def default_ffn_hidden_size(hidden_size: int, swiglu: bool) -> int:
    if swiglu:  # keep the MLP's parameter count at that of a 4h GeLU MLP
        return 64 * math.ceil(8 * hidden_size / 3 / 64)
    return 4 * hidden_size


def default_bucket_size(dp: int) -> int:
    """Megatron's default: big enough that the per-collective latency does not matter."""
    return max(40_000_000, 1_000_000 * dp)


@dataclass(frozen=True)
class ModelConfig:
    model_style: Optional[Literal["gpt2", "llama"]] = _f(
        None,
        "preset: gpt2 = learned positions, LayerNorm, GeLU, tied embeddings, biases; "
        "llama = RoPE, RMSNorm, SwiGLU, untied, no biases. Explicit flags override the preset",
    )
    num_layers: int = _f(2, "number of transformer layers")
    hidden_size: int = _f(64, "transformer hidden size")
    ffn_hidden_size: Optional[int] = _f(
        None, "MLP hidden size (default 4*hidden, or 8/3*hidden rounded up to 64 with SwiGLU)"
    )
    num_attention_heads: int = _f(4, "number of attention heads")
    num_query_groups: Optional[int] = _f(
        None, "key/value heads for grouped-query attention (default: one per attention head)"
    )
    seq_length: int = _f(128, "training sequence length")
    max_position_embeddings: Optional[int] = _f(
        None, "size of the learned position table (default: --seq-length)"
    )
    position_embedding_type: Literal["learned_absolute", "rope"] = _f(
        "learned_absolute", "position encoding"
    )
    rotary_base: float = _f(10000.0, "RoPE base")
    normalization: Literal["LayerNorm", "RMSNorm"] = _f("LayerNorm", "normalization layer")
    norm_epsilon: float = _f(1e-5, "epsilon of the normalization layers")
    swiglu: bool = _f(False, "SwiGLU MLP instead of GeLU")
    untie_embeddings_and_output_weights: bool = _f(
        False, "separate output-layer weight instead of reusing the input embedding"
    )
    disable_bias_linear: bool = _f(False, "no biases in the linear layers")
    hidden_dropout: float = _f(0.0, "dropout on the residual branches and embeddings")
    attention_dropout: float = _f(0.0, "dropout on the attention probabilities")
    init_method_std: float = _f(0.02, "std of the normal initialisation")
    vocab_size: Optional[int] = _f(
        None, "vocabulary size (default: the tokenizer's); padded up for efficiency"
    )
    make_vocab_size_divisible_by: int = _f(
        128, "pad the vocabulary to a multiple of this times the tensor-parallel size"
    )

    def __post_init__(self):
        # Defaults that follow from other fields are filled in here, so every ModelConfig
        # (parsed, built by hand, or read from a checkpoint) has them and the model code
        # never re-derives them.
        if self.ffn_hidden_size is None:
            _set(self, "ffn_hidden_size", default_ffn_hidden_size(self.hidden_size, self.swiglu))
        if self.num_query_groups is None:
            _set(self, "num_query_groups", self.num_attention_heads)
        if self.max_position_embeddings is None:
            _set(self, "max_position_embeddings", self.seq_length)


@dataclass(frozen=True)
class ParallelConfig:
    tensor_model_parallel_size: int = _f(1, "tensor-parallel size (ranks splitting each layer)")
    pipeline_model_parallel_size: int = _f(1, "pipeline-parallel size (stages of layers)")
    num_layers_per_virtual_pipeline_stage: Optional[int] = _f(
        None,
        "interleaved 1F1B: layers per model chunk; each stage holds num_layers / (PP x "
        "this) chunks, which cuts the pipeline bubble by that factor",
    )
    decoder_first_pipeline_num_layers: Optional[int] = _f(
        None,
        "uneven pipeline: layers on the first stage (the other stages share the rest "
        "evenly); it also holds the embedding",
    )
    decoder_last_pipeline_num_layers: Optional[int] = _f(
        None, "uneven pipeline: layers on the last stage (which also holds the head and loss)"
    )
    sequence_parallel: bool = _f(
        False, "split norms, dropout and residuals along the sequence over TP ranks"
    )
    recompute_granularity: Optional[Literal["full", "selective"]] = _f(
        None, "recompute activations in backward: full layers, or only attention's core"
    )
    recompute_num_layers: Optional[int] = _f(
        None, "full recompute: how many layers of each stage recompute (default: all)"
    )
    use_distributed_optimizer: bool = _f(
        False,
        "ZeRO-1: shard the fp32 main params and AdamW moments over data-parallel ranks "
        "(each steps 1/DP of every grad bucket, then the params are all-gathered)",
    )
    data_parallel_sharding_strategy: Optional[
        Literal["no_shard", "optim", "optim_grads", "optim_grads_params"]
    ] = _f(
        None,
        "what is sharded over data-parallel ranks: nothing; the optimizer state (ZeRO-1, "
        "= --use-distributed-optimizer); also the grads (ZeRO-2); also the params (ZeRO-3, "
        "gathered per transformer layer around its use). Default: optim with "
        "--use-distributed-optimizer, else no_shard",
    )
    overlap_grad_reduce: bool = _f(
        False,
        "start each grad bucket's all-reduce (reduce-scatter with the distributed "
        "optimizer) during backward, as soon as the bucket's last grad is in",
    )
    overlap_param_gather: bool = _f(
        False,
        "distributed optimizer: all-gather the updated params in the background; each "
        "module waits for its bucket in the next forward",
    )
    ddp_bucket_size: Optional[int] = _f(
        None, "elements per data-parallel grad bucket (default: max(40M, 1M x DP), Megatron's)"
    )
    no_shm_grad_reduce: bool = _f(
        False,
        "CPU: sum grad buckets over gloo's sockets even when every data-parallel rank is on "
        "one node (by default such ranks sum through shared memory: megalite/parallel/shm.py)",
    )
    distributed_backend: Optional[Literal["nccl", "gloo"]] = _f(
        None, "torch.distributed backend (default: nccl on CUDA, gloo on CPU)"
    )
    distributed_timeout_minutes: float = _f(
        10.0,
        "how long a collective may wait for its peers before failing (a hung rank; a dead "
        "or cut-off node is caught sooner by --heartbeat-timeout)",
    )
    heartbeat_timeout: float = _f(
        60.0,
        "seconds without a heartbeat after which a rank counts as lost and every rank stops "
        "with an error naming it (under torchrun, several ranks; 0: off)",
    )


@dataclass(frozen=True)
class TrainingConfig:
    micro_batch_size: int = _f(4, "sequences per micro-batch per data-parallel rank")
    global_batch_size: Optional[int] = _f(
        None, "sequences per optimizer step (default: micro-batch * data-parallel size)"
    )
    train_iters: int = _f(100, "number of optimizer steps")
    seed: int = _f(1234, "random seed: weights, data order and dropout depend only on it")
    bf16: bool = _f(False, "bfloat16 mixed precision")
    fp16: bool = _f(False, "float16 mixed precision with a dynamic loss scaler")
    initial_loss_scale: float = _f(2.0**16, "fp16: starting loss scale")
    loss_scale_window: int = _f(1000, "fp16: steps without overflow before the scale doubles")
    hysteresis: int = _f(2, "fp16: overflows tolerated before the scale is halved")
    eval_interval: int = _f(1000, "evaluate on the validation split every N iterations")
    eval_iters: int = _f(10, "validation batches per evaluation")
    early_stop_patience: Optional[int] = _f(
        None, "stop after N evaluations without a better validation loss"
    )
    exit_interval: Optional[int] = _f(None, "save and exit when the iteration is a multiple of N")
    exit_duration_in_mins: Optional[float] = _f(None, "save and exit after this many minutes")
    skip_spike_factor: Optional[float] = _f(
        None,
        "skip an update whose global grad norm exceeds this many times the median of the "
        "last --skip-spike-window accepted norms (logged, counted as skipped_spikes; off)",
    )
    skip_spike_window: int = _f(
        100,
        "--skip-spike-factor: accepted grad norms in the running median (no skip before "
        "min(10, N) are in)",
    )
    rollback_on_nan: int = _f(
        0,
        "fp32/bf16: on a non-finite loss or grad norm reload the last checkpoint in --save, "
        "skip the data from it up to the failed iteration and go on, at most this many times "
        "(0: stop with the error)",
    )
    device: Optional[Literal["cpu", "cuda"]] = _f(None, "device (default: cuda if available)")
    debug: bool = _f(False, "show full tracebacks for errors")

    @property
    def params_dtype(self) -> torch.dtype:
        """The dtype of the model's parameters (and of forward/backward)."""
        return torch.bfloat16 if self.bf16 else torch.float16 if self.fp16 else torch.float32


@dataclass(frozen=True)
class OptimizerConfig:
    lr: float = _f(3e-4, "peak learning rate")
    min_lr: float = _f(0.0, "learning rate at the end of decay")
    lr_warmup_iters: int = _f(0, "linear warmup iterations")
    lr_decay_iters: Optional[int] = _f(
        None, "iterations over which to decay (default: train iters)"
    )
    lr_decay_style: Literal["cosine", "linear", "constant", "wsd"] = _f("cosine", "decay shape")
    lr_wsd_decay_iters: Optional[int] = _f(
        None, "wsd: length of the final decay phase (default: 20%% of the decay iterations)"
    )
    lr_wsd_decay_style: Literal["linear", "cosine", "exponential"] = _f(
        "linear", "wsd: shape of the final decay phase"
    )
    weight_decay: float = _f(0.01, "decoupled weight decay (not applied to biases and norms)")
    clip_grad: float = _f(1.0, "clip the global gradient norm to this (0 disables)")
    adam_beta1: float = _f(0.9, "AdamW beta1")
    adam_beta2: float = _f(0.95, "AdamW beta2")
    adam_eps: float = _f(1e-8, "AdamW epsilon")


@dataclass(frozen=True)
class DataConfig:
    data_path: list = _list(
        "dataset prefixes, optionally weighted: PREFIX or 0.3 PREFIX_A 0.7 PREFIX_B"
    )
    split: str = _f("969,30,1", "train,valid,test weights over the documents")
    tokenizer_type: Optional[Literal["sentencepiece", "huggingface"]] = _f(
        None, "tokenizer kind (default: from the model file's suffix)"
    )
    tokenizer_model: Optional[str] = _f(None, "tokenizer model file (.model or tokenizer.json)")
    data_blend_temperature: float = _f(
        1.0,
        "temperature T of the blend: dataset i is sampled in proportion to w_i^(1/T) (w: the "
        "--data-path weights, or the token counts with --data-blend-by-tokens); T > 1 "
        "upsamples small datasets, T = 1 keeps the weights",
    )
    data_blend_by_tokens: bool = _f(
        False,
        "blend by the datasets' token counts (then tempered by --data-blend-temperature) "
        "instead of --data-path weights; give the prefixes alone",
    )
    data_cache_path: Optional[str] = _f(None, "where sample indices are cached")
    mock_data: bool = _f(False, "random tokens instead of --data-path (benchmarks, smoke tests)")
    sft: bool = _f(
        False,
        "instruction tuning: --data-path names shards of `tools/preprocess.py --sft` (tokens "
        "and a loss mask); conversations are packed into --seq-length samples with attention "
        "confined to each, and the loss is the mean over the global batch's response tokens",
    )
    num_workers: int = _f(0, "data loader worker processes")


@dataclass(frozen=True)
class CheckpointConfig:
    save: Optional[str] = _f(None, "directory to save checkpoints in")
    load: Optional[str] = _f(None, "directory to resume from (its latest checkpoint)")
    save_interval: Optional[int] = _f(None, "save every N iterations")
    keep_last: Optional[int] = _f(None, "keep only the newest N checkpoints")
    no_load_optim: bool = _f(False, "load weights only (fresh optimizer and scheduler)")
    no_load_rng: bool = _f(False, "do not restore RNG states")
    finetune: bool = _f(
        False,
        "start training from the weights in --load: iteration 0, no optimizer or RNG state "
        "loaded (implies --no-load-optim --no-load-rng), as for an imported checkpoint",
    )
    save_failure: Literal["stop", "continue"] = _f(
        "stop",
        "when a checkpoint cannot be written (a full disk): stop with the error, or warn and "
        "keep training (the next save tries again); the previous checkpoint stays intact",
    )
    async_save: bool = _f(
        False,
        "write checkpoints in the background: training stops only while the state is copied "
        "to host memory (which holds a copy of it from then on); a save waits for the "
        "previous one, and the final and SIGTERM saves are written before the exit",
    )


LORA_TARGETS = ("qkv", "proj", "fc1", "fc2")


@dataclass(frozen=True)
class LoRAConfig:
    lora_rank: int = _f(
        0,
        "LoRA: train rank-R adapters on the --lora-target-modules linears, the base model "
        "frozen (no grads, no optimizer state); checkpoints hold the adapters (0: off)",
    )
    lora_alpha: Optional[float] = _f(None, "LoRA scale alpha: updates are alpha/R B A (default R)")
    lora_dropout: float = _f(0.0, "LoRA: dropout on the adapters' input")
    lora_target_modules: str = _f(
        ",".join(LORA_TARGETS), "LoRA: which linears get adapters, comma-separated, of "
        "qkv (attention's fused QKV), proj (its output), fc1, fc2 (the MLP's)",
    )  # fmt: skip

    @property
    def targets(self) -> tuple:
        return tuple(t.strip() for t in self.lora_target_modules.split(",") if t.strip())

    @property
    def scaling(self) -> float:
        return (self.lora_alpha if self.lora_alpha is not None else self.lora_rank) / max(
            self.lora_rank, 1
        )


@dataclass(frozen=True)
class LoggingConfig:
    log_interval: int = _f(10, "log every N iterations")
    metrics_file: Optional[str] = _f(None, "append one JSON object per logged iteration here")
    tensorboard_dir: Optional[str] = _f(None, "write TensorBoard scalars here")
    peak_tflops: Optional[float] = _f(
        None, "peak TFLOP/s of one device, for MFU (default: from a table of known GPUs)"
    )
    timing_log_level: Literal[0, 1, 2] = _f(
        0,
        "step timers on the log line and in the metrics file (time_*_s): 0 none; 1 this "
        "rank's forward, backward, exposed TP/DP/PP communication, pipeline bubble, "
        "optimizer and data time; 2 also every rank's and the max over ranks",
    )


SECTIONS = {
    "model": ModelConfig,
    "parallel": ParallelConfig,
    "training": TrainingConfig,
    "optimizer": OptimizerConfig,
    "data": DataConfig,
    "checkpoint": CheckpointConfig,
    "lora": LoRAConfig,
    "logging": LoggingConfig,
}

MODEL_STYLES = {
    "gpt2": dict(
        position_embedding_type="learned_absolute",
        normalization="LayerNorm",
        swiglu=False,
        untie_embeddings_and_output_weights=False,
        disable_bias_linear=False,
    ),
    "llama": dict(
        position_embedding_type="rope",
        normalization="RMSNorm",
        swiglu=True,
        untie_embeddings_and_output_weights=True,
        disable_bias_linear=True,
    ),
}


@dataclass(frozen=True)
class Config:
    """A finished run config. world_size is the number of processes it was checked for."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    world_size: int = 1

    def __post_init__(self):
        _check(self)
        _resolve(self)

    @property
    def data_parallel_size(self) -> int:
        p = self.parallel
        return self.world_size // (p.tensor_model_parallel_size * p.pipeline_model_parallel_size)

    @property
    def num_microbatches(self) -> int:
        """Micro-batches per data-parallel rank in one global batch."""
        t = self.training
        return t.global_batch_size // (t.micro_batch_size * self.data_parallel_size)

    @property
    def virtual_pipeline_size(self) -> int:
        return virtual_pipeline_size(
            self.model.num_layers,
            self.parallel.pipeline_model_parallel_size,
            self.parallel.num_layers_per_virtual_pipeline_stage,
        )

    def pipeline_layout(self) -> list:
        """layers[pp_rank][chunk]: the global layer numbers of every model chunk."""
        p = self.parallel
        return pipeline_layout(
            self.model.num_layers,
            p.pipeline_model_parallel_size,
            self.virtual_pipeline_size,
            p.decoder_first_pipeline_num_layers,
            p.decoder_last_pipeline_num_layers,
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        """The config a checkpoint saved (sections + world_size)."""
        d = dict(d)
        p = d.get("parallel", {})
        # A config saved before world_size was recorded: the smallest world of its layout.
        world = d.pop(
            "world_size",
            p.get("tensor_model_parallel_size", 1) * p.get("pipeline_model_parallel_size", 1),
        )
        return make_config(d, world_size=int(world), source="checkpoint config")


# -- checks and derived defaults --------------------------------------------------------------


def _positive(name, value):
    if value is None or value <= 0:
        raise MegaliteError(f"--{name.replace('_', '-')} must be a positive number, got {value}")


def _check(cfg: Config) -> None:
    """Raise a MegaliteError naming the first inconsistent value."""
    m, p, t, o = cfg.model, cfg.parallel, cfg.training, cfg.optimizer
    for name in (
        "num_layers",
        "hidden_size",
        "num_attention_heads",
        "seq_length",
        "make_vocab_size_divisible_by",
    ):
        _positive(name, getattr(m, name))
    for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size"):
        _positive(name, getattr(p, name))
    for name in ("micro_batch_size", "train_iters", "eval_interval"):
        _positive(name, getattr(t, name))
    _positive("log_interval", cfg.logging.log_interval)
    if not 0.0 <= m.hidden_dropout < 1.0 or not 0.0 <= m.attention_dropout < 1.0:
        raise MegaliteError("--hidden-dropout and --attention-dropout must be in [0, 1)")
    if m.hidden_size % m.num_attention_heads:
        raise MegaliteError(
            f"--hidden-size {m.hidden_size} is not divisible by --num-attention-heads "
            f"{m.num_attention_heads}; choose sizes where it is"
        )
    if m.num_attention_heads % m.num_query_groups:
        raise MegaliteError(
            f"--num-attention-heads {m.num_attention_heads} is not divisible by "
            f"--num-query-groups {m.num_query_groups}"
        )
    if m.position_embedding_type == "rope" and (m.hidden_size // m.num_attention_heads) % 2:
        raise MegaliteError("RoPE needs an even head dimension (hidden / heads)")
    if m.position_embedding_type == "learned_absolute" and m.max_position_embeddings < m.seq_length:
        raise MegaliteError(
            f"--seq-length {m.seq_length} exceeds --max-position-embeddings "
            f"{m.max_position_embeddings}"
        )
    if t.bf16 and t.fp16:
        raise MegaliteError("--bf16 and --fp16 are exclusive; pick one")
    _check_sharding(p)
    if p.ddp_bucket_size is not None and p.ddp_bucket_size <= 0:
        raise MegaliteError(
            f"--ddp-bucket-size must be a positive number of elements, got {p.ddp_bucket_size}"
        )
    if t.initial_loss_scale <= 0 or t.loss_scale_window <= 0 or t.hysteresis <= 0:
        raise MegaliteError(
            "--initial-loss-scale, --loss-scale-window and --hysteresis must be positive"
        )
    if o.min_lr > o.lr:
        raise MegaliteError(f"--min-lr {o.min_lr} is larger than --lr {o.lr}")
    if o.lr_warmup_iters < 0 or o.clip_grad < 0 or o.weight_decay < 0:
        raise MegaliteError("--lr-warmup-iters, --clip-grad and --weight-decay must be >= 0")
    if cfg.checkpoint.finetune and not cfg.checkpoint.load:
        raise MegaliteError("--finetune needs --load DIR (the weights to start from)")
    if cfg.checkpoint.save_interval is not None and not cfg.checkpoint.save:
        raise MegaliteError("--save-interval needs --save DIR")
    if cfg.checkpoint.async_save and not cfg.checkpoint.save:
        raise MegaliteError("--async-save needs --save DIR")
    _check_fault_handling(t, cfg.checkpoint)
    _check_data(cfg.data)
    _check_lora(cfg)
    _check_layout(cfg)


def _check_lora(cfg) -> None:
    lo = cfg.lora
    if lo.lora_rank < 0:
        raise MegaliteError(f"--lora-rank must be >= 0, got {lo.lora_rank}")
    if not lo.lora_rank:
        return
    bad = [t for t in lo.targets if t not in LORA_TARGETS]
    if bad or not lo.targets:
        raise MegaliteError(
            f"--lora-target-modules {lo.lora_target_modules!r}: unknown {bad or 'empty'}; "
            f"choose among {','.join(LORA_TARGETS)}"
        )
    if not cfg.checkpoint.load:
        raise MegaliteError(
            "--lora-rank needs --load DIR: the model to adapt (with --finetune), or a LoRA "
            "checkpoint to resume"
        )
    if not 0.0 <= lo.lora_dropout < 1.0:
        raise MegaliteError(f"--lora-dropout must be in [0, 1), got {lo.lora_dropout}")
    if cfg.parallel.data_parallel_sharding_strategy in ("optim_grads", "optim_grads_params"):
        raise MegaliteError(
            "LoRA trains only the adapters, whose state is small: use "
            "--data-parallel-sharding-strategy no_shard or optim, not "
            f"{cfg.parallel.data_parallel_sharding_strategy}"
        )


def _check_data(d: DataConfig) -> None:
    if d.sft and (d.mock_data or not d.data_path):
        raise MegaliteError(
            "--sft needs --data-path PREFIX: shards written by `tools/preprocess.py --sft`"
        )
    T = d.data_blend_temperature
    if not (math.isfinite(T) and T > 0):
        raise MegaliteError(f"--data-blend-temperature must be a positive number, got {T}")


def _check_sharding(p: ParallelConfig) -> None:
    """--data-parallel-sharding-strategy against --use-distributed-optimizer, PP and
    --overlap-param-gather."""
    strategy = p.data_parallel_sharding_strategy
    if strategy == "no_shard" and p.use_distributed_optimizer:
        raise MegaliteError(
            "--use-distributed-optimizer is --data-parallel-sharding-strategy optim, not "
            "no_shard; drop one of them"
        )
    if strategy in ("optim_grads", "optim_grads_params") and p.pipeline_model_parallel_size > 1:
        raise MegaliteError(
            f"--data-parallel-sharding-strategy {strategy} does not support pipeline "
            f"parallelism (--pipeline-model-parallel-size {p.pipeline_model_parallel_size}); "
            f"use optim with PP, or PP 1"
        )
    if p.overlap_param_gather and not (
        p.use_distributed_optimizer or strategy in ("optim", "optim_grads")
    ):
        raise MegaliteError(
            "--overlap-param-gather needs --use-distributed-optimizer or sharding strategy "
            "optim / optim_grads (they all-gather params after the step; optim_grads_params "
            "gathers each layer before use, prefetching the next)"
        )


def _check_fault_handling(t: TrainingConfig, ck: CheckpointConfig) -> None:
    """--skip-spike-factor and --rollback-on-nan."""
    if t.skip_spike_factor is not None and not t.skip_spike_factor > 1:
        raise MegaliteError(
            f"--skip-spike-factor must be above 1 (it multiplies the running median of the "
            f"grad norm), got {t.skip_spike_factor}"
        )
    _positive("skip_spike_window", t.skip_spike_window)
    if t.rollback_on_nan < 0:
        raise MegaliteError(f"--rollback-on-nan must be >= 0, got {t.rollback_on_nan}")
    if t.rollback_on_nan and not ck.save:
        raise MegaliteError(
            "--rollback-on-nan needs --save DIR: it reloads the last checkpoint saved there"
        )
    if t.rollback_on_nan and t.fp16:
        raise MegaliteError(
            "--rollback-on-nan is for fp32 and bf16; with --fp16 the loss scaler skips "
            "non-finite steps: drop one of them"
        )


def _check_layout(cfg: Config) -> None:
    """TP x PP must divide the world; the batch must divide into micro-batches per DP rank."""
    m, p, t = cfg.model, cfg.parallel, cfg.training
    tp, pp, world = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, cfg.world_size
    if world < 1 or world % (tp * pp):
        raise MegaliteError(
            f"world size {world} is not divisible by tensor-parallel {tp} x "
            f"pipeline-parallel {pp}; launch a multiple of {tp * pp} processes"
        )
    _check_tensor_parallel(m, p)
    dp = world // (tp * pp)
    gbs = t.global_batch_size or t.micro_batch_size * dp
    if gbs % (t.micro_batch_size * dp):
        raise MegaliteError(
            f"--global-batch-size {gbs} is not divisible by --micro-batch-size "
            f"{t.micro_batch_size} x data-parallel size {dp}; use a multiple of "
            f"{t.micro_batch_size * dp}"
        )
    vp = cfg.virtual_pipeline_size
    cfg.pipeline_layout()  # raises on a stage split that does not fit
    n_micro = gbs // (t.micro_batch_size * dp)
    if vp > 1 and n_micro % pp:
        raise MegaliteError(
            f"the interleaved schedule needs the number of micro-batches to be a multiple "
            f"of --pipeline-model-parallel-size {pp}; --global-batch-size {gbs} / "
            f"(--micro-batch-size {t.micro_batch_size} x data-parallel size {dp}) = {n_micro}"
        )


def _check_tensor_parallel(m: ModelConfig, p: ParallelConfig) -> None:
    """What tensor parallelism (and sequence parallelism, recomputation) needs to divide."""
    tp, groups = p.tensor_model_parallel_size, m.num_query_groups
    if m.num_attention_heads % tp:
        raise MegaliteError(
            f"--num-attention-heads {m.num_attention_heads} is not divisible by "
            f"--tensor-model-parallel-size {tp}: each TP rank computes whole heads"
        )
    if groups % tp and tp % groups:
        raise MegaliteError(
            f"--num-query-groups {groups} and --tensor-model-parallel-size {tp}: one "
            f"must divide the other (key/value heads are split over TP ranks when the "
            f"groups are a multiple of TP, replicated when TP is a multiple of the groups)"
        )
    if m.ffn_hidden_size % tp:
        raise MegaliteError(
            f"the MLP hidden size {m.ffn_hidden_size} (--ffn-hidden-size) is not divisible by "
            f"--tensor-model-parallel-size {tp}"
        )
    if p.sequence_parallel and tp > 1 and m.seq_length % tp:
        raise MegaliteError(
            f"--seq-length {m.seq_length} is not divisible by --tensor-model-parallel-size "
            f"{tp}: --sequence-parallel splits the sequence over TP ranks"
        )
    if p.recompute_num_layers is not None:
        if p.recompute_granularity != "full":
            raise MegaliteError(
                "--recompute-num-layers needs --recompute-granularity full "
                "(selective recomputation applies to every layer)"
            )
        # a stage (or model chunk) with fewer layers recomputes all of them
        if not 1 <= p.recompute_num_layers <= m.num_layers:
            raise MegaliteError(
                f"--recompute-num-layers {p.recompute_num_layers} must be between 1 and "
                f"--num-layers {m.num_layers}"
            )


def _resolve(cfg: Config) -> None:
    """Fill in the defaults that depend on the layout or the machine (checked already)."""
    p, t, o = cfg.parallel, cfg.training, cfg.optimizer
    dp = cfg.data_parallel_size
    if t.global_batch_size is None:
        _set(cfg, "training", dataclasses.replace(t, global_batch_size=t.micro_batch_size * dp))
    if t.device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        _set(cfg, "training", dataclasses.replace(cfg.training, device=device))
    par = {}
    if p.ddp_bucket_size is None:
        par["ddp_bucket_size"] = default_bucket_size(dp)
    if p.distributed_backend is None:
        par["distributed_backend"] = "nccl" if cfg.training.device == "cuda" else "gloo"
    if p.data_parallel_sharding_strategy is None:
        par["data_parallel_sharding_strategy"] = (
            "optim" if p.use_distributed_optimizer else "no_shard"
        )
    # every strategy but no_shard shards the optimizer: the distributed optimizer
    par["use_distributed_optimizer"] = (
        par.get("data_parallel_sharding_strategy", p.data_parallel_sharding_strategy) != "no_shard"
    )
    if par:
        _set(cfg, "parallel", dataclasses.replace(p, **par))
    if o.lr_decay_iters is None:
        _set(cfg, "optimizer", dataclasses.replace(o, lr_decay_iters=t.train_iters))
    if cfg.checkpoint.finetune:  # Megatron's --finetune: the weights alone
        ck = dataclasses.replace(cfg.checkpoint, no_load_optim=True, no_load_rng=True)
        _set(cfg, "checkpoint", ck)


# -- flags and YAML ---------------------------------------------------------------------------


def _fields():
    """(section, dataclass field, resolved type) for every config field."""
    out = []
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            out.append((section, f, hints[f.name]))
    return out


def _unwrap_optional(tp):
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0]
    return tp


class _OneLineParser(argparse.ArgumentParser):
    """argparse that raises MegaliteError (one line) instead of printing usage and exiting."""

    def error(self, message):
        raise MegaliteError(f"{message} (see --help)")


def build_parser(prog="python -m megalite.train") -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog=prog,
        allow_abbrev=False,
        description="Pretrain a GPT model. Flags follow Megatron-LM's names; a YAML file "
        "given with --config sets defaults that flags override.",
    )
    parser.add_argument("--config", help="YAML file with any of the fields below")
    for _section, f, tp in _fields():
        flag = "--" + f.name.replace("_", "-")
        base = _unwrap_optional(tp)
        kw = dict(dest=f.name, default=argparse.SUPPRESS, help=f.metadata["help"])
        if base is bool:
            parser.add_argument(flag, action="store_true", **kw)
            continue
        if typing.get_origin(base) is Literal:
            kw["choices"] = list(typing.get_args(base))
            kw["type"] = type(kw["choices"][0])
        elif base is list:
            kw["nargs"] = "+"
        else:
            kw["type"] = base
        kw["metavar"] = f.name.upper() if "choices" not in kw else None
        parser.add_argument(flag, **{k: v for k, v in kw.items() if v is not None})
    return parser


def _flatten(values: dict) -> dict:
    """A flat or sectioned dict (YAML, a checkpoint's config) as {field name: value}."""
    flat = {}
    for key, value in values.items():
        if key in SECTIONS and isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return flat


def _coerce(name, value, tp, source):
    base = _unwrap_optional(tp)
    if value is None:
        if base is not tp:
            return None
        raise MegaliteError(f"setting '{name}' in {source} may not be empty")
    try:
        if typing.get_origin(base) is Literal:
            if value not in typing.get_args(base):
                raise ValueError
            return value
        if base is bool:
            if not isinstance(value, bool):
                raise ValueError
            return value
        if base is list:
            return [str(v) for v in (value if isinstance(value, list) else str(value).split())]
        if base is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        return base(value)
    except (TypeError, ValueError):
        choices = typing.get_args(base) if typing.get_origin(base) is Literal else None
        want = f"one of {list(choices)}" if choices else getattr(base, "__name__", str(base))
        raise MegaliteError(f"setting '{name}' in {source} must be {want}, got {value!r}")


def _typed(values: dict, source: str) -> dict:
    """{field: value} checked against the fields' types; unknown keys get a suggestion."""
    by_name = {f.name: tp for _, f, tp in _fields()}
    out = {}
    for key, value in _flatten(values).items():
        key_ = key.replace("-", "_")
        if key_ not in by_name:
            close = difflib.get_close_matches(key_, list(by_name), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise MegaliteError(f"unknown setting '{key}' in {source}{hint}")
        out[key_] = _coerce(key_, value, by_name[key_], source)
    return out


def make_config(*layers: dict, world_size: int = 1, source: str = "settings") -> Config:
    """The finished Config from dicts of settings (flat or sectioned; later ones win), for
    `world_size` processes. A model_style preset fills in the architecture fields that no
    layer sets explicitly."""
    values = {}
    for layer in layers:
        values.update(_typed(layer, source))
    style = values.get("model_style")
    if style:
        for k, v in MODEL_STYLES[style].items():
            values.setdefault(k, v)
    kwargs = {name: {} for name in SECTIONS}
    for section, f, _ in _fields():
        if f.name in values:
            kwargs[section][f.name] = values[f.name]
    return Config(
        **{name: SECTIONS[name](**kw) for name, kw in kwargs.items()}, world_size=world_size
    )


def _read_yaml(path: str) -> dict:
    import yaml

    try:
        with open(path) as fh:
            data = yaml.safe_load(fh) or {}
    except FileNotFoundError:
        raise MegaliteError(f"config file {path} not found")
    except yaml.YAMLError as e:
        raise MegaliteError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}")
    if not isinstance(data, dict):
        raise MegaliteError(f"config file {path} must hold a mapping of settings")
    return data


def parse_config(argv=None, world_size: Optional[int] = None) -> Config:
    """The finished Config from (optional) YAML + command-line flags, for `world_size`
    processes (default: $WORLD_SIZE, as torchrun sets it, else 1). Unknown flags are errors."""
    flags = vars(build_parser().parse_args(argv))
    config_file = flags.pop("config", None)
    from_file = _typed(_read_yaml(config_file), config_file) if config_file else {}
    flags = _typed(flags, "command line")
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", 1))
    return make_config(from_file, flags, world_size=world_size, source="command line")
