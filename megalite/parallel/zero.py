"""ZeRO-2 and ZeRO-3 (Rajbhandari et al., 2020): grads, then params, sharded over DP ranks.

--data-parallel-sharding-strategy (Megatron-FSDP's names) picks the data-parallel object:

    no_shard            DistributedDataParallel       18 B/param (bf16 params; fp32 grads,
    optim (ZeRO-1)      DistributedDataParallel,       2 + 4 + 12/DP  main params, moments)
                        distributed optimizer
    optim_grads         ShardedGradDataParallel        2 + 16/DP
    optim_grads_params  FullyShardedDataParallel       18/DP, plus the units gathered now

All three sharded strategies use the distributed optimizer (optim/distributed.py): rank r
steps the r-th 1/DP of every bucket. What changes is where the full-size tensors live.

ZeRO-2 (`ShardedGradDataParallel`). The only grads that live across a step are this rank's
fp32 shards, one per bucket (`grad_shard`). A bucket's full fp32 buffer is made when its
first grad of a micro-batch arrives (`_before_grad`; params' `main_grad` are views of it),
reduced as soon as its last grad is in (or at the end of backward: an autograd-engine
callback launches what is left), folded into the shard (copied on the step's first
micro-batch, added after) and dropped. At most `IN_FLIGHT` buckets are being reduced at once,
so the transient memory is a few buckets. With gradient accumulation each micro-batch's
grads are reduced as its backward produces them (DeepSpeed's ZeRO-2 does the same): M
reductions per step instead of one, and no full grad buffer between micro-batches. Params
stay whole (in the flat param buffer), all-gathered after the step as with ZeRO-1.

ZeRO-3 (`FullyShardedDataParallel`). The params are sharded too. Each *unit* (a transformer
layer; the rest of a model chunk, embedding, final norm and head, is the chunk's root unit)
owns one flat buffer of its params in their dtype, and a rank keeps only its 1/DP of it
(`param_shard`, what the optimizer updates). A unit's bucket is the unit, so its grad shard
and param shard cover the same elements. The flat buffer is gathered into on use and its
storage freed (`resize_(0)`; the params stay views of it) when done:

  forward   a layer's pre-hook gathers it (waiting for the prefetch) and prefetches the next
            layer; its post-hook frees it, except the last layer, which backward needs first.
            The root unit is gathered when the chunk's forward starts and stays so until its
            grads are reduced (the tied head reads the embedding at the end of forward, and
            its grad is the last of backward).
  backward  a hook on each layer's output gathers the layer before its backward (recomputing
            it, with --recompute-granularity full, finds it whole) and prefetches the layer
            before it; once the unit's last grad is in, its grads are reduced as in ZeRO-2
            and its params freed.

So per micro-batch each layer is gathered twice (for forward and for backward; the last
layer once), as torch FSDP does with reshard_after_forward; with gradient accumulation
that is 2M gathers per step. Every param is in some unit: none stay replicated. Outside the
hooks (checkpoint save and load) `full_params()` gathers every unit for as long as it is
needed, and writes loaded values back into the shards.

Pipeline parallelism is refused (config) with ZeRO-2/3: a stage already holds 1/PP of the
model, and 1F1B's interleaved forwards and backwards would keep most units gathered anyway.
TP composes: each TP rank shards its own TP slices over its DP group.
"""

from __future__ import annotations

import contextlib

import torch

from megalite import timers
from megalite.parallel.ddp import (
    Bucket,
    DistributedDataParallel,
    _all_gather_into,
    _reduce_scatter,
)

IN_FLIGHT = 2  # ZeRO-2/3: buckets whose reduction may run at once (each holds a full buffer)


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


class ShardedGradDataParallel(DistributedDataParallel):
    """ZeRO-2: DistributedDataParallel with only this rank's shard of each bucket's grads
    kept; see the module docstring."""

    strategy = "optim_grads"

    def __init__(self, modules, *, bucket_size=None, overlap_grad_reduce=False,
                 overlap_param_gather=False, **reduce_kw):  # fmt: skip
        self._in_flight = []  # buckets whose reduction was launched, oldest first
        self._callback_queued = False
        super().__init__(
            modules,
            bucket_size=bucket_size,
            overlap_grad_reduce=overlap_grad_reduce,
            use_distributed_optimizer=True,
            overlap_param_gather=overlap_param_gather,
            **reduce_kw,
        )

    def _make_buckets(self, tied):
        buckets = super()._make_buckets(tied)
        self.grad_buffers = {}  # no full grad buffer lives across the step
        for b in buckets:
            b.grad_data = None
            b.grad_shard = torch.zeros(b.shard_size, dtype=torch.float32, device=self.device)
            b.shard_written = False  # this step's grads are in grad_shard
            for p in b.params:
                p.main_grad = None
        return buckets

    # -- the transient full buffers -----------------------------------------------------
    def _before_grad(self, b):
        if not self._callback_queued:  # once per backward pass: flush what is left at its end
            torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)
            self._callback_queued = True
        if b.grad_data is None:
            b.grad_data = torch.empty(b.numel, dtype=torch.float32, device=self.device)
            for p in b.params:
                s, e = b.offsets[p]
                p.main_grad = b.grad_data[s:e].view(p.shape)
            used = sum(e - s for s, e in b.offsets.values())
            b.grad_data[used:].zero_()  # the padding to a multiple of DP (empty if none)

    def _syncs_now(self, param) -> bool:
        return True  # every micro-batch: no full grad buffer is kept between them

    def _launch(self, b):
        self._before_grad(b)
        self._zero_missing(b)
        if self.dp == 1:
            b.grad_work = None
        elif self.reduce_scatter:
            shard = b.shard(b.grad_data, self.dp_rank)
            b.grad_work = _reduce_scatter(shard, b.grad_data, group=self.group, async_op=True)
        else:  # gloo: its all-reduce is faster than its reduce-scatter (see ddp.py)
            b.grad_work = self._all_reduce(b.grad_data)
        self._in_flight.append(b)
        while len(self._in_flight) > IN_FLIGHT:
            self._fold(self._in_flight.pop(0))

    @torch.no_grad()
    def _fold(self, b):
        """Wait for a bucket's reduction, add my shard of it into grad_shard, drop the rest."""
        if b.grad_work is not None:
            with timers.timed("dp_comm"):
                b.grad_work.wait()
            b.grad_work = None
        mine = b.shard(b.grad_data, self.dp_rank)
        if b.shard_written:
            b.grad_shard.add_(mine)
        else:
            b.grad_shard.copy_(mine)
            b.shard_written = True
        b.grad_data = None
        for p in b.params:
            p.main_grad = None
        b.ready.clear()
        b.has_grad.clear()

    def _end_of_backward(self):
        """The autograd engine's callback at the end of each backward pass (one micro-batch):
        reduce the buckets that did not complete (unused params, no overlap), in order."""
        self._callback_queued = False
        for b in self.buckets[self._next_launch :]:
            self._launch(b)
        self._next_launch = 0
        while self._in_flight:
            self._fold(self._in_flight.pop(0))

    @torch.no_grad()
    def finish_grad_sync(self):
        while self._in_flight:
            self._fold(self._in_flight.pop(0))
        for b in self.buckets:
            if not b.shard_written:  # no backward this step reached it
                b.grad_shard.zero_()
                b.shard_written = True

    def zero_grad_buffer(self):
        while self._in_flight:  # an aborted step: never leave a collective behind
            b = self._in_flight.pop(0)
            if b.grad_work is not None:
                b.grad_work.wait()
        for b in self.buckets:
            b.grad_work, b.grad_data, b.shard_written = None, None, False
            b.ready.clear()
            b.has_grad.clear()
        self._next_launch = 0
        for p in self.params:
            p.grad = None

    # -- what the optimizer and finalize_model_grads read -----------------------------------
    def _shard_range(self, param, start, end):
        """(bucket, lo, hi): elements [start, end) of param as a range of its bucket's grad
        shard (clipped to the shard: the caller asks only for what this rank owns)."""
        b = self._bucket_of[param]
        s, _ = b.offsets[param]
        base = self.dp_rank * b.shard_size
        lo = min(max(s + start - base, 0), b.shard_size)
        hi = min(max(s + end - base, 0), b.shard_size)
        return b, lo, hi

    def grad_piece(self, param, start, end):
        b, lo, hi = self._shard_range(param, start, end)
        return b.grad_shard[lo:hi]

    def synced_grads(self, params):
        """The part of each param's grad in my shards (possibly empty): every TP rank and both
        embedding stages shard alike, so these line up across the group."""
        out = []
        for p in params:
            b, lo, hi = self._shard_range(p, 0, p.numel())
            if hi > lo:
                out.append(b.grad_shard[lo:hi])
        return out

    def grad_tensors(self):
        return [b.grad_shard for b in self.buckets]


class FullyShardedDataParallel(ShardedGradDataParallel):
    """ZeRO-3: params sharded over DP in units, gathered around their use; see the module
    docstring."""

    strategy = "optim_grads_params"

    def __init__(self, modules, *, bucket_size=None, overlap_grad_reduce=False,
                 overlap_param_gather=False, **reduce_kw):  # fmt: skip
        self._units_of_chunk = None  # set by _bucket_indices
        super().__init__(modules, bucket_size=bucket_size, overlap_grad_reduce=True, **reduce_kw)
        self.overlap_param_gather = False  # gathers are driven by the unit hooks instead
        self._install_unit_hooks()

    # -- units ------------------------------------------------------------------------------
    def _bucket_indices(self, tied):
        """One bucket per unit, in the order backward completes them: each chunk's layers
        from last to first, then its root unit (embedding, final norm, head)."""
        index = {p: i for i, p in enumerate(self.params)}
        buckets, self._units_of_chunk = [], []
        for chunk in reversed(self.modules):
            layers = list(chunk.layers.values()) if hasattr(chunk, "layers") else []
            in_layers = {p for layer in layers for p in layer.parameters()}
            units = [(layer, [index[p] for p in layer.parameters() if p in index])
                     for layer in layers]  # fmt: skip
            root = [index[p] for p in chunk.parameters() if p in index and p not in in_layers]
            for _, idx in reversed(units):
                if idx:
                    buckets.append(sorted(idx))
            if root:
                buckets.append(sorted(root))
            self._units_of_chunk.insert(0, (chunk, units, sorted(root)))
        return buckets

    def _make_buckets(self, tied):
        """Per unit: a flat buffer of its params (their dtype; freed when not in use) and my
        persistent shard of it."""
        layout, _ = self._layout(tied)
        buckets = []
        for k, (dtype, bparams, offsets, n, _) in enumerate(layout):
            flat = torch.zeros(n, dtype=dtype, device=self.device)
            for p in bparams:
                s, e = offsets[p]
                view = flat[s:e].view(p.shape)
                view.copy_(p.detach())
                p.data = view
                p.main_grad = None
            b = Bucket(k, bparams, offsets, n, None, flat, self.dp)
            b.param_shard = b.shard(flat, self.dp_rank).clone()
            b.param_bytes = flat.untyped_storage().nbytes()
            b.grad_shard = torch.zeros(b.shard_size, dtype=torch.float32, device=self.device)
            b.shard_written, b.gathered = False, True
            buckets.append(b)
        self.grad_buffers, self.param_buffers = {}, {}
        for b in buckets:
            self._free(b)
        return buckets

    @torch.no_grad()
    def _gather(self, b, wait=True):
        """Make the unit's params whole (start it, or start and wait for it)."""
        if not b.gathered:
            b.param_data.untyped_storage().resize_(b.param_bytes)
            if self.dp == 1:
                b.param_data.copy_(b.param_shard)
            else:
                b.param_work = _all_gather_into(
                    b.param_data, b.param_shard, group=self.group, async_op=True
                )
            b.gathered = True
        if wait and b.param_work is not None:
            with timers.timed("dp_comm"):
                b.param_work.wait()
            b.param_work = None

    def _free(self, b):
        if b.gathered:
            if b.param_work is not None:
                b.param_work.wait()
                b.param_work = None
            b.param_data.untyped_storage().resize_(0)
            b.gathered = False

    def _install_unit_hooks(self):
        for chunk, units, root in self._units_of_chunk:
            layer_buckets = [self._bucket_of[self.params[idx[0]]] for _, idx in units if idx]
            root_bucket = self._bucket_of[self.params[root[0]]] if root else None
            layers = [layer for layer, idx in units if idx]
            for i, layer in enumerate(layers):
                b = layer_buckets[i]
                after = layer_buckets[i + 1] if i + 1 < len(layers) else None
                before = layer_buckets[i - 1] if i > 0 else None
                last = i == len(layers) - 1
                layer.register_forward_pre_hook(self._pre_forward(b, after))
                layer.register_forward_hook(self._post_forward(b, before, last))
            if root_bucket is not None:
                chunk.register_forward_pre_hook(lambda m, args, b=root_bucket: self._gather(b))
                chunk.register_forward_hook(self._root_post_forward(root_bucket))

    def _pre_forward(self, b, after):
        def hook(module, args):
            self._gather(b)
            if after is not None and not _in_backward():
                self._gather(after, wait=False)  # prefetch: hides behind this layer's compute

        return hook

    def _post_forward(self, b, before, last):
        def pre_backward(grad):
            self._gather(b)
            if before is not None:
                self._gather(before, wait=False)  # prefetch the layer backward reaches next
            return grad

        def hook(module, args, output):
            if _in_backward():  # recomputation (full recompute): backward still needs it
                return output
            if torch.is_grad_enabled() and output.requires_grad:
                output.register_hook(pre_backward)
                if last:  # backward starts with it: keep it
                    return output
            self._free(b)
            return output

        return hook

    def _root_post_forward(self, b):
        def hook(module, args, output):
            if not torch.is_grad_enabled():  # evaluation: no backward will need it
                self._free(b)
            return output

        return hook

    def _launch(self, b):
        super()._launch(b)
        self._free(b)  # its grads are in: backward is done with its params

    # -- the step and checkpoints ---------------------------------------------------------
    def param_piece(self, param, start, end):
        b, lo, hi = self._shard_range(param, start, end)
        return b.param_shard[lo:hi]

    def start_param_sync(self, overlap=None):
        """Nothing to gather after the step: the next forward gathers each unit."""

    def finish_param_sync(self):
        for b in self.buckets:
            if b.param_work is not None:
                b.param_work.wait()
                b.param_work = None

    def param_tensors(self):
        return [b.param_shard for b in self.buckets] + [b.param_data for b in self.buckets]

    @contextlib.contextmanager
    def full_params(self):
        """Every unit gathered (to save or load the model's state dict), then freed; values
        loaded into the params meanwhile are written back into my shards."""
        for b in self.buckets:
            self._gather(b, wait=False)
        for b in self.buckets:
            self._gather(b)
        try:
            yield
        finally:
            with torch.no_grad():
                for b in self.buckets:
                    b.param_shard.copy_(b.shard(b.param_data, self.dp_rank))
                    self._free(b)


def data_parallel(modules, par) -> DistributedDataParallel:
    """The data-parallel object of --data-parallel-sharding-strategy (par: ParallelConfig)."""
    common = dict(bucket_size=par.ddp_bucket_size, overlap_grad_reduce=par.overlap_grad_reduce,
                  overlap_param_gather=par.overlap_param_gather,
                  shm_grad_reduce=not par.no_shm_grad_reduce,
                  timeout_s=60 * par.distributed_timeout_minutes)  # fmt: skip
    strategy = par.data_parallel_sharding_strategy
    if strategy == "optim_grads":
        return ShardedGradDataParallel(modules, **common)
    if strategy == "optim_grads_params":
        return FullyShardedDataParallel(modules, **common)
    return DistributedDataParallel(modules, use_distributed_optimizer=strategy == "optim", **common)
