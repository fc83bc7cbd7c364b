"""Plan a run before launching it: memory per rank from the real code, step time from a model.

    plan = plan_layout(cfg, cluster)      # one layout (cfg: the trainer's Config)
    plans = search(cfg, cluster)          # every valid layout, fitting ones fastest first

**Memory is measured, not estimated.** Under a "fake" process group of the full world size
(torch's: its collectives do nothing) and `state.as_rank`, the planner runs the trainer's own
`parallelize` for a rank of each pipeline stage with the model on the meta device: the real
layers, `DistributedDataParallel` (or ZeRO-2/3's), grad buckets with their padding, and the
real optimizer, then counts their storages with the same `memory_footprint` the trainer
reports at start. So params + grads + optimizer are what the trainer will hold, to the byte.

Activations are traced the same way: one micro-batch of a stage's chunks runs forward on
meta tensors under `saved_tensors_hooks`, counting every tensor autograd saves for backward
(parameters excluded; each storage once), with the layout's recompute setting and sequence
parallelism. Attention on meta is counted as the fused (flash / memory-efficient) SDPA
kernels save it: q, k, v, the output and the fp32 log-sum-exp, not the [s, s] probabilities
of the math fallback that meta tensors would otherwise take. The rest of the model runs the
autograd Functions of megalite's CUDA kernels (on meta: their reference kernels, which save
the same tensors). The peak is the per-micro-batch bytes times the most micro-batches a stage
holds in flight in its schedule (`schedule_sim.simulate`: PP - stage for 1F1B, more when
interleaved), plus the transient buffers: the p2p tensors in flight, ZeRO-2/3's reduced
buckets, ZeRO-3's gathered layers. A 70B model on 1024 GPUs plans in seconds: only a layer's
worth of saved bytes is traced per distinct shape (a chunk of one layer and of two; their
difference is a layer's).

**Time is a model,** documented by its inputs (`Cluster`):
  compute      FLOPs per token (model.gpt.flops_per_token, x 4/3 with full recompute) x the
               step's tokens / world / (peak x `efficiency`, the achievable fraction of peak)
  TP           the collectives the model issues per micro-batch on the busiest stage (as
               parallel/tensor.py's regions run them): per layer 2 all-reduces of the [s, b, h]
               activation forward and 2 backward (with SP each is an all-gather and a
               reduce-scatter: the same bytes, twice the calls), the forward's again but the
               last with full recompute; the embedding's and the output layer's; the loss's 3
               all-reduces of [s, b] fp32. Ring formula 2(t-1)/t x bytes / bandwidth plus
               `latency` per ring step; not overlapped (megalite does not)
  DP           ring reduce of the fp32 grads, one collective per bucket (all-reduce; ZeRO:
               reduce-scatter, then the params' all-gather; on a `cpu` cluster always an
               all-reduce, and within a node a shared-memory sum at memory bandwidth (three
               copies of the bytes: parallel/shm.py); ZeRO-2/3 reduce every micro-batch,
               ZeRO-3 per unit, and gathers each unit twice per micro-batch); overlapped with
               backward when --overlap-grad-reduce (and ZeRO-3's prefetch), so only what
               exceeds backward's time is exposed
  PP           each micro-batch's activation across each stage boundary, both ways, exposed
  small        the other all-reduces of every step (`step_collectives`: the loss, the grad
               norm, the SP norms' and the tied embedding's grads, --sft's target count)
  latency      every message costs `latency` besides its bytes (ring steps, p2p); a ZeRO-3
               gather is one collective per layer
  overhead     `layer_overhead` host seconds per layer and micro-batch (0 by default: a GPU
               run of a large model is GEMM-bound; a tiny model or a CPU run is not), x
               `recompute_overhead` with full recompute
  bubble       the schedule's idle fraction (schedule_sim, forward 1 : backward 2) of a
               stage's busy time: its compute and its TP collectives, which lie on the path
  optimizer    AdamW is memory-bound: ~22 bytes read and written per owned param / HBM
               bandwidth
  contention   on a `cpu` cluster whose processes outnumber its cores (`cores_per_node`), the
               cores are shared: a step takes at least processes / cores x a rank's busy time
               (compute, optimizer), while its waits (collectives, bubble) let the other
               processes run. The step is the larger of that and busy + waits (the fluid
               limit: a lower bound); the busy parts stretch to fill it.
A group of ranks within one node uses `intra_node_bandwidth`, one that spans nodes
`inter_node_bandwidth` (per GPU). Ranks are laid out TP fastest, then DP, then PP, so a DP
group spans nodes once TP x DP > GPUs per node, and pipeline neighbours once TP x DP >= it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megalite.config import Config, make_config
from megalite.errors import MegaliteError
from megalite.layout import padded_vocab_size
from megalite.model.gpt import GPTModel, cast_params, flops_per_token, model_chunks
from megalite.optim.mixed_precision import memory_footprint
from megalite.parallel import state
from megalite.parallel.schedule_sim import bubble_fraction, simulate
from megalite.parallel.zero import IN_FLIGHT
from megalite.training.loop import parallelize

GB = 1e9
# name: (memory GiB, dense bf16 TFLOP/s, HBM TB/s, NVLink GB/s per GPU, network GB/s per GPU).
# Bandwidths are achievable bus bandwidths (nccl-tests' busbw), below the datasheets' peaks:
# NVLink 4 (H100/H200) 900 GB/s peak both ways; 8 x 400 Gb/s InfiniBand per node.
GPUS = {
    "H100": (80, 989.5, 3.35, 360.0, 45.0),
    "H200": (141, 989.5, 4.8, 360.0, 45.0),
    "A100": (80, 312.0, 2.0, 230.0, 22.0),
    "B200": (180, 2250.0, 8.0, 720.0, 45.0),
}


@dataclass
class Cluster:
    nodes: int = 1
    gpus_per_node: int = 8
    memory_bytes: float = 80 * 2**30
    peak_tflops: float = 989.5
    hbm_bandwidth: float = 3.35e12  # bytes/s
    intra_node_bandwidth: float = 360e9  # bytes/s per GPU
    inter_node_bandwidth: float = 45e9
    efficiency: float = 0.5  # achievable fraction of peak in the model's GEMMs
    headroom: float = 0.9  # the fraction of memory a plan may fill: the CUDA context, NCCL's
    # buffers and the allocator's fragmentation take the rest
    latency: float = 10e-6  # seconds per message of a collective's ring step or a p2p
    overlap: float = 1.0  # how much of the DP traffic can hide behind backward: 1 on GPUs
    # (copy engines and NCCL's own SMs), 0 on a CPU (gloo works on the cores that compute)
    layer_overhead: float = 0.0  # host seconds per layer and micro-batch (fwd + bwd), beside
    # the FLOPs: launches and Python; what dominates a tiny model (and a CPU run)
    recompute_overhead: float = 1.5  # layer_overhead's factor under full recompute (the
    # forward again, and the checkpoint's bookkeeping)
    cpu: bool = False  # CPU processes over gloo: grad reductions are all-reduces, through
    # shared memory (at hbm_bandwidth, the memory's) when the DP group is within a node
    cores_per_node: int = 0  # a cpu cluster's cores, shared by its processes (0: one each)

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @classmethod
    def of(cls, gpu: str, **overrides) -> "Cluster":
        key = next((k for k in GPUS if k.lower() in gpu.lower()), None)
        if key is None:
            raise MegaliteError(
                f"no figures known for GPU {gpu!r} (known: {', '.join(GPUS)}); pass "
                f"--gpu-memory-gb, --peak-tflops and the bandwidths instead"
            )
        mem, tflops, hbm, nvlink, net = GPUS[key]
        base = dict(memory_bytes=mem * 2**30, peak_tflops=tflops, hbm_bandwidth=hbm * 1e12,
                    intra_node_bandwidth=nvlink * 1e9, inter_node_bandwidth=net * 1e9)  # fmt: skip
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)


@dataclass
class Plan:
    cfg: Config
    layout: dict  # tp, pp, vp, dp, strategy, recompute, micro_batch_size
    ranks: list  # per pipeline stage: bytes of params, grads, optimizer, activations, buffers
    peak_bytes: int  # the largest rank's total
    fits: bool
    time: dict  # seconds per step: compute, forward, backward, tp, dp, pp, bubble, optimizer
    step_s: float
    tokens_per_s: float
    mfu: float

    def as_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "cfg"}


# -- the fake world ---------------------------------------------------------------------------


@contextlib.contextmanager
def fake_world(size: int):
    """A process group of `size` ranks whose collectives do nothing (torch's "fake" backend),
    so the real layers and data-parallel objects can be built and run on meta tensors."""
    try:
        from torch.testing._internal.distributed.fake_pg import FakeStore
    except ImportError as e:  # a torch build without its testing package
        raise MegaliteError(
            f"the planner needs torch's fake process group ({e}); use a full torch install"
        ) from e

    if dist.is_initialized():
        raise MegaliteError("the planner runs in a process without a process group")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _meta_chunks(cfg, vocab_size, unpadded):
    with torch.device("meta"):
        return model_chunks(cfg, vocab_size, unpadded)


class _FlashOnMeta(torch.autograd.Function):
    """What the fused SDPA kernels save for backward: q, k, v, the output and the fp32
    log-sum-exp per query row."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@contextlib.contextmanager
def _fused_attention_on_meta():
    real = F.scaled_dot_product_attention

    def sdpa(q, k, v, *args, **kwargs):
        if q.device.type == "meta":
            return _FlashOnMeta.apply(q, k, v)
        return real(q, k, v, *args, **kwargs)

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = real


# -- memory -----------------------------------------------------------------------------------


def _sizes(cfg: Config) -> tuple:
    p = cfg.parallel
    return p.tensor_model_parallel_size, p.pipeline_model_parallel_size, cfg.data_parallel_size


_CACHE = {}  # a search plans many layouts that share a stage's state or a chunk's trace


def _cached(key, compute):
    if key not in _CACHE:
        _CACHE[key] = compute()
    return _CACHE[key]


def state_bytes(cfg: Config, padded: int, vocab: int, pp_rank: int) -> dict:
    """Bytes of params, grads and optimizer state of TP rank 0, DP rank 0 of stage pp_rank,
    counted from the real objects built on the meta device (inside `fake_world`)."""
    p = cfg.parallel
    key = ("state", repr(cfg.model), cfg.training.params_dtype, cfg.data_parallel_size,
           p.tensor_model_parallel_size, repr(cfg.pipeline_layout()[pp_rank]),
           p.pipeline_model_parallel_size, p.data_parallel_sharding_strategy,
           p.ddp_bucket_size, padded, pp_rank)  # fmt: skip
    return _cached(key, lambda: _state_bytes(cfg, padded, vocab, pp_rank))


def _state_bytes(cfg: Config, padded: int, vocab: int, pp_rank: int) -> dict:
    tp, pp, dp = _sizes(cfg)
    with state.as_rank(tp, pp, 0, pp_rank, dp=dp, device="meta"):
        _, ddp, optimizer = parallelize(cfg, padded, vocab, build=_meta_chunks)
        out = memory_footprint(ddp, optimizer)
        out["numel"] = sum(q.numel() for q in ddp.params)
        out["largest_bucket"] = max((b.numel for b in ddp.buckets), default=0)
        out["largest_unit_bytes"] = max(
            (b.numel * b.params[0].element_size() for b in ddp.buckets), default=0
        )
    return out


def _saved_bytes(chunk, cfg: Config, tokens_shape, dtype, tp) -> int:
    """Bytes autograd saves for backward in one micro-batch through `chunk` (meta tensors)."""
    params = {q.untyped_storage()._cdata for q in chunk.parameters()}
    saved = {}

    def pack(t):
        s = t.untyped_storage()
        if s._cdata not in params:
            saved[s._cdata] = s.nbytes()
        return t

    b, s = tokens_shape
    tokens = torch.zeros(b, s, dtype=torch.long, device="meta")
    kw = {"labels": tokens} if chunk.post_process else {}
    if chunk.pre_process:
        kw["tokens"] = tokens
    else:
        seq = s // tp if cfg.parallel.sequence_parallel and tp > 1 else s
        h = torch.empty(seq, b, cfg.model.hidden_size, dtype=dtype, device="meta")
        kw["hidden_states"] = h.requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        chunk(**kw)
    return sum(saved.values())


def activation_bytes(cfg: Config, padded: int, vocab: int, pp_rank: int) -> list:
    """Saved bytes of one micro-batch, per model chunk of stage pp_rank. A chunk is its
    embedding/head part plus its layers: a probe chunk of one layer and one of two are traced
    (their difference is a layer's bytes), with the recompute setting and, for full recompute
    of only the first k layers, also without it."""
    p, t = cfg.parallel, cfg.training
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    shape = (t.micro_batch_size, cfg.model.seq_length)
    layout = cfg.pipeline_layout()[pp_rank]
    cache = _CACHE

    def traced(n, pre, post, recompute):
        key = ("trace", repr(cfg.model), t.params_dtype, tp, p.sequence_parallel, shape, padded,
               n, pre, post, recompute)  # fmt: skip
        if key not in cache:
            with torch.device("meta"):
                chunk = GPTModel(cfg.model, padded, pre_process=pre, post_process=post,
                                 layer_numbers=list(range(n)), unpadded_vocab_size=vocab,
                                 sequence_parallel=p.sequence_parallel,
                                 recompute_granularity=recompute)  # fmt: skip
            cast_params(chunk, t.params_dtype)
            cache[key] = _saved_bytes(chunk, cfg, shape, t.params_dtype, tp)
        return cache[key]

    out = []
    with state.as_rank(tp, pp, 0, pp_rank, device="meta"), _fused_attention_on_meta():
        for c, layers in enumerate(layout):
            pre, post = pp_rank == 0 and c == 0, pp_rank == pp - 1 and c == len(layout) - 1
            rec = p.recompute_granularity
            one, two = traced(1, pre, post, rec), traced(2, pre, post, rec)
            per_layer, base, n = two - one, 2 * one - two, len(layers)
            k = (
                n
                if rec != "full" or p.recompute_num_layers is None
                else min(p.recompute_num_layers, n)
            )
            plain = traced(2, pre, post, None) - traced(1, pre, post, None)
            out.append(base + k * per_layer + (n - k) * plain)
    return out


def buffer_bytes(cfg: Config, sizes: dict) -> int:
    """Transient buffers beside the saved activations: the p2p tensors of a pipeline (a send
    and a receive of each direction), ZeRO-2/3's full buckets being reduced (IN_FLIGHT + 1,
    fp32) and ZeRO-3's gathered units (three layers and the root at most)."""
    p, t, m = cfg.parallel, cfg.training, cfg.model
    act = t.micro_batch_size * m.seq_length * m.hidden_size * t.params_dtype.itemsize
    if p.sequence_parallel:
        act //= p.tensor_model_parallel_size
    out = 4 * act if p.pipeline_model_parallel_size > 1 else 0
    if p.data_parallel_sharding_strategy in ("optim_grads", "optim_grads_params"):
        out += (IN_FLIGHT + 1) * sizes["largest_bucket"] * 4
    if p.data_parallel_sharding_strategy == "optim_grads_params":
        out += 4 * sizes["largest_unit_bytes"]
    return out


# -- time -------------------------------------------------------------------------------------


def _ring(nbytes, n, bandwidth, latency, passes=2, count=1) -> float:
    """`count` ring collectives over n ranks moving `nbytes` in all (the alpha-beta model):
    passes = 2 for an all-reduce, 1 for a reduce-scatter or an all-gather; each pass is
    n - 1 steps, each step a message of every collective."""
    if n <= 1:
        return 0.0
    return passes * (n - 1) * (count * latency + nbytes / n / bandwidth)


def _shm_sum(nbytes, n, memory_bandwidth, count, barrier) -> float:
    """`count` shared-memory all-reduces over n ranks of one node moving `nbytes` in all
    (parallel/shm.py): each rank copies its data in (read + write), sums its 1/n of all n
    slots (n + 1 sweeps of 1/n) and copies the result out (read + write); 2 barriers per
    4 MB chunk, `barrier` seconds each (a few microseconds spinning; a scheduler's wake-up
    when the processes outnumber the cores and wait on the futex)."""
    if n <= 1:
        return 0.0
    chunks = max(count, math.ceil(nbytes / (4 << 20)))
    return (4 + (n + 1) / n) * nbytes / memory_bandwidth + 2 * chunks * barrier


def _last_stage(cfg: Config) -> tuple:
    """(layers, of them rerun by full recompute) of the last pipeline stage: each chunk
    recomputes its first --recompute-num-layers (all by default; model/gpt.py)."""
    chunks = cfg.pipeline_layout()[-1]
    n = cfg.parallel.recompute_num_layers
    rerun = sum(min(n or len(c), len(c)) for c in chunks)
    return sum(map(len, chunks)), rerun if cfg.parallel.recompute_granularity == "full" else 0


def tp_collectives(cfg: Config) -> dict:
    """The TP collectives of one micro-batch, forward and backward, on the busiest stage (the
    last: its layers, the output layer and the loss; with one stage the embedding too), as
    parallel/tensor.py's regions issue them: all-reduces of the [s, b, h] activation, its
    all-gathers + reduce-scatters (SP), all-reduces of [s, b] fp32 (the loss's), and the
    all-gathers of the key/value weight grads that TP ranks replicate (grouped-query
    attention with TP > groups). LoRA's rank-r collectives are not counted."""
    p, m = cfg.parallel, cfg.model
    layers, rerun = _last_stage(cfg)
    sp = 2 if p.sequence_parallel else 1  # SP: an all-gather + a reduce-scatter per all-reduce
    # attention and MLP, each a column- and a row-parallel linear: 2 forward, 2 backward.
    # Full recompute reruns the forward's, but not the last: torch's non-reentrant checkpoint
    # stops once it has what backward saved, which is nothing of the layer's output unless
    # a dropout mask follows it.
    again = 2 * sp - (m.hidden_dropout == 0)
    activations = layers * 4 * sp + rerun * again
    # the output layer's column-parallel input (backward), the embedding's reduce (forward)
    first = p.pipeline_model_parallel_size == 1
    activations += (1 + first) * sp
    replicated = p.tensor_model_parallel_size > (m.num_query_groups or m.num_attention_heads)
    out = dict(all_reduce=activations, gather_scatter=0, loss_all_reduce=3,
               replica_gather=layers * (1 + (not m.disable_bias_linear)) * replicated)  # fmt: skip
    if p.sequence_parallel:  # and the learned positions' scatter to SP (backward: a gather)
        learned = first and m.position_embedding_type == "learned_absolute"
        out.update(all_reduce=0, gather_scatter=activations + learned)
    return out


def step_collectives(cfg: Config, padded: int) -> list:
    """The all-reduces of every step beside the model's and the DP grad reduction, each as
    (the part the timers count it in, group size, count, bytes in all):
      dp_comm     the loss's mean; with --sft the batch's target count (training/batches.py)
      pp_comm     the loss's sum; the tied embedding's fp32 grad between the first and last
                  stage (parallel/ddp.py's finalize_model_grads)
      tp_comm     with SP, the SP-tagged fp32 grads (norms, row-parallel biases), coalesced
      optimizer   the grad norm over TP x PP, and over DP when sharded (optim/grad_norm.py)
    (The stop flags' all-reduce runs after the step's clock, as training/loop.py times it.)"""
    p, m = cfg.parallel, cfg.model
    tp, pp, dp = _sizes(cfg)
    sharded = p.data_parallel_sharding_strategy != "no_shard" or p.use_distributed_optimizer
    tied = pp > 1 and not m.untie_embeddings_and_output_weights
    layers, _ = _last_stage(cfg)
    norm = m.hidden_size * (2 if m.normalization == "LayerNorm" else 1)
    sp_params = layers * (2 * norm + 2 * m.hidden_size * (not m.disable_bias_linear)) + norm
    return [
        ("dp_comm", dp, 1 + cfg.data.sft, 4 * (1 + cfg.data.sft)),
        ("pp_comm", pp, 1, 4),
        ("pp_comm", 2, int(tied), 4 * padded // tp * m.hidden_size * tied),
        ("tp_comm", tp, int(p.sequence_parallel), 4 * sp_params * p.sequence_parallel),
        ("optimizer", tp * pp, 1, 4),
        ("optimizer", dp, int(sharded), 4 * sharded),
    ]


def step_time(cfg: Config, cluster: Cluster, padded: int, numel: int) -> dict:
    """Seconds per step of each part (module docstring); numel: params of a rank."""
    p, t, m = cfg.parallel, cfg.training, cfg.model
    tp, pp, dp = _sizes(cfg)
    vp, micro = cfg.virtual_pipeline_size, cfg.num_microbatches
    layers, rerun = _last_stage(cfg)
    rerun = rerun / layers  # the fraction of layers full recompute reruns
    tokens = t.global_batch_size * m.seq_length
    flops = flops_per_token(m, padded) * tokens / cluster.world_size
    flops *= 1 + rerun / 3  # their forward once more
    compute = flops / (cluster.peak_tflops * 1e12 * cluster.efficiency)
    compute += (
        cluster.layer_overhead * layers * micro * (1 + (cluster.recompute_overhead - 1) * rerun)
    )
    g = cluster.gpus_per_node
    share = g / cluster.cores_per_node if cluster.cpu and cluster.cores_per_node else 1.0
    bw = {True: cluster.intra_node_bandwidth, False: cluster.inter_node_bandwidth}
    act = t.micro_batch_size * m.seq_length * m.hidden_size * t.params_dtype.itemsize
    lat = cluster.latency
    calls = tp_collectives(cfg)
    tp_bw = bw[tp <= g]
    loss_bytes = 4 * t.micro_batch_size * m.seq_length
    kv_rows = 2 * m.hidden_size // m.num_attention_heads  # one group's key and value rows
    replica_layers = calls["replica_gather"] // (1 + (not m.disable_bias_linear))
    tp_s = micro * (
        _ring(act * calls["all_reduce"], tp, tp_bw, lat, 2, calls["all_reduce"])
        + _ring(act * calls["gather_scatter"], tp, tp_bw, lat, 1, calls["gather_scatter"])
        + _ring(loss_bytes * calls["loss_all_reduce"], tp, tp_bw, lat, 2, calls["loss_all_reduce"])
        # every rank's grad of the replicated weight rows, gathered: tp x their bytes, once
        # per layer (a bias's gather beside it moves next to nothing)
        + _ring(tp * kv_rows * m.hidden_size * t.params_dtype.itemsize * replica_layers,
                tp, tp_bw, lat, 1, calls["replica_gather"])
    )  # fmt: skip
    grads = 4 * numel
    dp_bw = bw[tp * dp <= g]
    strategy = p.data_parallel_sharding_strategy
    params = numel * t.params_dtype.itemsize
    # collectives per reduction: one per bucket (ZeRO-3: per unit, the layers and the root)
    buckets = layers + 1 if strategy == "optim_grads_params" else -(-numel // p.ddp_bucket_size)
    # As parallel/ddp.py reduces: a reduce-scatter when sharded, but on the CPU (gloo) always
    # an all-reduce, through shared memory when the DP group is within a node (shm.py).
    shm = cluster.cpu and tp * dp <= g and not p.no_shm_grad_reduce
    passes = 1 if strategy != "no_shard" and not cluster.cpu else 2

    def reduce():  # one sum of every grad over DP
        if shm:
            barrier = lat if share > 1 else 5e-6
            return _shm_sum(grads, dp, cluster.hbm_bandwidth, buckets, barrier)
        return _ring(grads, dp, dp_bw, lat, passes, buckets)

    def gather():  # the params' all-gather (ZeRO-1/2 after the step; ZeRO-3 per use)
        return _ring(params, dp, dp_bw, lat, 1, buckets)

    if strategy == "no_shard":
        dp_s = reduce()
    elif strategy == "optim":
        dp_s = reduce() + gather()
    elif strategy == "optim_grads":  # every micro-batch reduced
        dp_s = micro * reduce() + gather()
    else:  # ZeRO-3: and each unit gathered for forward and for backward (the last layer once)
        dp_s = micro * reduce() + micro * (2 * gather() - _ring(0, dp, dp_bw, lat, 1))
    backward = compute * 2 / 3
    overlapped = p.overlap_grad_reduce or strategy == "optim_grads_params"
    hidden = cluster.overlap * min(backward, dp_s * (1 - 1 / max(micro * layers, 1)))
    dp_exposed = dp_s - hidden if overlapped else dp_s
    pp_s = 0.0
    if pp > 1:
        pp_s = 2 * micro * vp * (lat + act / bw[tp * dp < g])
    bubble = 0.0
    if pp > 1:
        results = _cached(("schedule", pp, micro, vp), lambda: simulate(pp, micro, vp))
        fraction = bubble_fraction(results)
        bubble = fraction / (1 - fraction) * (compute + tp_s)
    owned = numel / (dp if strategy != "no_shard" else 1)
    optimizer = 22 * owned / cluster.hbm_bandwidth
    parts = dict(forward=compute / 3, backward=backward, tp_comm=tp_s, dp_comm=dp_exposed,
                 pp_comm=pp_s, bubble=bubble, optimizer=optimizer)  # fmt: skip
    # the tied embedding's group joins a rank of the first stage and one of the last
    within = {"dp_comm": tp * dp <= g, "pp_comm": (pp - 1) * tp * dp < g, "tp_comm": tp <= g,
              "optimizer": cfg.world_size <= g}  # fmt: skip
    for part, n, count, nbytes in step_collectives(cfg, padded):
        parts[part] += _ring(nbytes, n, bw[within[part]], lat, 2, count)
    busy = compute + optimizer
    waits = sum(parts.values()) - busy
    if share * busy > busy + waits:  # the cores are the bottleneck: the busy parts stretch
        stretch = (share * busy - waits) / busy
        parts["forward"] *= stretch
        parts["backward"] *= stretch
        parts["optimizer"] += optimizer * (stretch - 1)
    return parts


# -- plans ------------------------------------------------------------------------------------


def plan_layout(cfg: Config, cluster: Cluster, vocab: Optional[int] = None) -> Plan:
    """Memory per pipeline stage (TP rank 0, DP rank 0: every rank of a stage is alike up to
    padding) and the predicted step of cfg's layout on the cluster."""
    if cfg.world_size != cluster.world_size:
        raise MegaliteError(
            f"the config is for {cfg.world_size} processes, the cluster has "
            f"{cluster.world_size} GPUs"
        )
    p, t = cfg.parallel, cfg.training
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    vocab = vocab or cfg.model.vocab_size
    if not vocab:
        raise MegaliteError("the planner needs --vocab-size (or a --tokenizer-model)")
    padded = padded_vocab_size(vocab, cfg.model.make_vocab_size_divisible_by, tp)
    vp, micro = cfg.virtual_pipeline_size, cfg.num_microbatches
    results = _cached(("schedule", pp, micro, vp), lambda: simulate(pp, micro, vp))
    ranks = []
    with fake_world(cfg.world_size):
        for pp_rank in range(pp):
            sizes = state_bytes(cfg, padded, vocab, pp_rank)
            per_chunk = activation_bytes(cfg, padded, vocab, pp_rank)
            # the peak holds `peak_in_flight` (chunk, micro-batch) forwards at once
            in_flight = results[pp_rank].peak_in_flight
            acts = math.ceil(in_flight / len(per_chunk)) * sum(per_chunk)
            buffers = buffer_bytes(cfg, sizes)
            total = sizes["params"] + sizes["grads"] + sizes["optimizer"] + acts + buffers
            ranks.append(dict(stage=pp_rank, params=sizes["params"], grads=sizes["grads"],
                              optimizer=sizes["optimizer"], activations=acts,
                              activations_per_microbatch=sum(per_chunk),
                              microbatches_in_flight=in_flight, buffers=buffers, total=total,
                              numel=sizes["numel"]))  # fmt: skip
    peak = max(r["total"] for r in ranks)
    numel = max(r["numel"] for r in ranks)
    parts = step_time(cfg, cluster, padded, numel)
    step = sum(parts.values())
    tokens = t.global_batch_size * cfg.model.seq_length
    mfu = flops_per_token(cfg.model, padded) * tokens / step / cluster.world_size
    layout = dict(tp=tp, pp=pp, vp=cfg.virtual_pipeline_size, dp=cfg.data_parallel_size,
                  strategy=p.data_parallel_sharding_strategy, recompute=p.recompute_granularity,
                  sequence_parallel=p.sequence_parallel,
                  micro_batch_size=t.micro_batch_size)  # fmt: skip
    fits = peak <= cluster.headroom * cluster.memory_bytes
    return Plan(cfg, layout, ranks, peak, fits, parts, step,
                tokens / step, mfu / (cluster.peak_tflops * 1e12))  # fmt: skip


def candidates(cfg: Config, cluster: Cluster):
    """Every valid layout of cfg's model and batch on the cluster (a Config each)."""
    m = cfg.model
    world, g = cluster.world_size, cluster.gpus_per_node
    base = cfg.to_dict()
    base.pop("world_size", None)
    for tp in (1, 2, 4, 8):
        if tp > g or world % tp:
            continue
        for pp in (d for d in range(1, m.num_layers + 1) if m.num_layers % d == 0):
            if world % (tp * pp) or pp > 64:
                continue
            vps = [None] + [n for n in (1, 2, 4) if pp > 1 and m.num_layers // pp > n
                            and (m.num_layers // pp) % n == 0]  # fmt: skip
            strategies = ("optim",) if pp > 1 else ("optim", "optim_grads", "optim_grads_params")
            for vp, strategy, recompute, mbs in itertools.product(
                vps, strategies, (None, "selective", "full"), (1, 2, 4, 8)
            ):
                par = dict(base["parallel"], tensor_model_parallel_size=tp,
                           pipeline_model_parallel_size=pp,
                           num_layers_per_virtual_pipeline_stage=vp,
                           data_parallel_sharding_strategy=strategy,
                           use_distributed_optimizer=False, sequence_parallel=tp > 1,
                           recompute_granularity=recompute, recompute_num_layers=None,
                           overlap_grad_reduce=True, ddp_bucket_size=None)  # fmt: skip
                training = dict(base["training"], micro_batch_size=mbs)
                try:
                    yield make_config(dict(base, parallel=par, training=training),
                                      world_size=world, source="planner")  # fmt: skip
                except MegaliteError:
                    continue  # not a valid layout for this model and batch


def search(cfg: Config, cluster: Cluster, vocab: Optional[int] = None, top: int = 10) -> list:
    """The `top` fastest layouts that fit, fastest first (then, if fewer fit, the ones that
    do not, smallest first)."""
    plans, seen = [], set()
    for c in candidates(cfg, cluster):
        plan = plan_layout(c, cluster, vocab)
        # one of the layouts that differ only in a setting that changes nothing (selective
        # recompute, when fused attention saves no [s, s] probabilities)
        same = tuple(v for k, v in plan.layout.items() if k != "recompute")
        key = (same, round(plan.peak_bytes / 2**20), round(plan.step_s, 4))
        if key not in seen:
            seen.add(key)
            plans.append(plan)
    fitting = sorted((p for p in plans if p.fits), key=lambda p: p.step_s)
    rest = sorted((p for p in plans if not p.fits), key=lambda p: p.peak_bytes)
    return (fitting + rest)[:top]
