"""Data parallelism: grads in contiguous fp32 buffers, reduced bucket by bucket during backward.

    ddp = DistributedDataParallel(chunks, overlap_grad_reduce=True)
    with ddp.no_sync():                 # every micro-batch but the last: accumulate only
        loss.backward()
    loss.backward()                     # the last: a bucket's all-reduce starts the moment its
                                        # last grad is in, while backward goes on
    finalize_model_grads(chunks, ddp)   # wait for the buckets; SP grads over TP; tied embedding
    optimizer.step()                    # reads param.main_grad
    ddp.zero_grad_buffer()

`no_sync(chunk)` is the one way to say "don't sync yet": the pipeline executor enters it
around every backward but each model chunk's last.

Layout (Megatron's). Every trainable parameter gets `param.main_grad`, an fp32 view into one
flat buffer per parameter dtype, laid out in reverse order of registration (roughly the order
in which backward produces the grads). The buffer is cut into buckets by
`assign_buckets`. A post-accumulate-grad hook adds the freshly computed grad (any dtype),
divided by DP, into main_grad, frees it (so a bf16 model holds one fp32 grad per param, not
two) and, on the last micro-batch with --overlap-grad-reduce, marks the param ready; a bucket
whose params are all ready launches its async collective.

Gradient-accumulation fusion (Megatron's): a linear layer's backward may write its weight
grad straight into main_grad (`param.accumulate_main_grad`, called by `ops.linear` with a
function that runs the GEMM with beta 0 on the step's first micro-batch, 1 after), so that
the grad is never materialised, added or copied; the hook then only marks the param.

Buckets launch in index order only, so every rank issues the same collectives in the same
order (a requirement of gloo and NCCL).

With the distributed optimizer (ZeRO-1) each bucket is padded to a multiple of DP and rank r
owns the r-th 1/DP of it: the bucket is reduce-scattered (each rank needs only its shard
summed), and the parameters themselves live in a second flat buffer with the same layout, so
that after the optimizer has updated its shard one all-gather per bucket rebuilds every param
in place. With --overlap-param-gather those all-gathers run in the background and each module
waits for its own bucket in a forward pre-hook, so the gather hides behind the next forward.

The object is deliberately not an nn.Module wrapper: the model keeps its own parameter names,
state dict and tags, which the checkpoint, the tensor-parallel code and the pipeline
schedules all read. It holds references to the model's parameters and hooks them.

finalize_model_grads is the one place a step's grads are made consistent before the optimizer:
the data-parallel sync, sequence-parallel partial sums over TP, the tied embedding over the
first and last pipeline stages.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from megalite import timers
from megalite.config import default_bucket_size
from megalite.errors import MegaliteError
from megalite.parallel import shm, state
from megalite.parallel.tags import tag_of

# Older torch names them *_tensor; 2.13 prefers *_single (the old names warn).
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class _Done:
    """The handle of a collective that finished when it was called."""

    @staticmethod
    def wait():
        return True


_DONE = _Done()


def _chunks(modules):
    return list(modules) if isinstance(modules, (list, tuple)) else [modules]


def assign_buckets(numels, dtypes, bucket_size_numel):
    """Group params (given in reverse order of use) into buckets of at least bucket_size_numel
    elements (the last bucket of each dtype may be smaller); buckets never mix dtypes.
    Returns a list of buckets, each a list of param indices, ordered by their first index."""
    numels, dtypes = [int(n) for n in numels], list(dtypes)
    if len(numels) != len(dtypes):
        raise ValueError(f"assign_buckets: {len(numels)} numels but {len(dtypes)} dtypes")
    if bucket_size_numel <= 0:
        raise ValueError(
            f"assign_buckets: bucket_size_numel must be positive, got {bucket_size_numel}"
        )
    open_bucket, filled, buckets = {}, {}, []
    for i, (n, dt) in enumerate(zip(numels, dtypes)):
        if n < 0:
            raise ValueError(f"assign_buckets: param {i} has negative numel {n}")
        if dt not in open_bucket:
            open_bucket[dt], filled[dt] = [], 0
            buckets.append(open_bucket[dt])
        open_bucket[dt].append(i)
        filled[dt] += n
        if filled[dt] >= bucket_size_numel:  # full: the next param of this dtype opens one
            del open_bucket[dt]
    return sorted((b for b in buckets if b), key=lambda b: b[0])


class Bucket:
    """A contiguous run of the grad buffer (and of the param buffer, with the distributed
    optimizer) whose params are reduced by one collective."""

    def __init__(self, index, params, offsets, numel, grad_data, param_data, dp):
        self.index = index
        self.params = params  # in buffer order
        self.offsets = offsets  # param -> (start, end) within this bucket
        self.numel = numel  # padded to a multiple of DP with a sharded optimizer
        self.grad_data = grad_data  # 1-D fp32 view of the grad buffer (ZeRO-2/3: transient)
        self.param_data = param_data  # 1-D view of the param buffer, or None
        self.shard_size = numel // dp
        self.ready = set()  # params whose last grad of the step is in
        self.has_grad = set()  # params whose main_grad holds this step's grad
        self.grad_work = None
        self.param_work = None

    def shard(self, flat, rank):
        """This rank's 1/DP of a bucket-sized flat tensor (distributed optimizer)."""
        return flat[rank * self.shard_size : (rank + 1) * self.shard_size]


class DistributedDataParallel:
    """Grad buffers, buckets and hooks for this rank's model (a module or a list of model
    chunks); see the module docstring. bucket_size is in elements (--ddp-bucket-size)."""

    def __init__(
        self,
        modules,
        *,
        bucket_size=None,
        overlap_grad_reduce=False,
        use_distributed_optimizer=False,
        overlap_param_gather=False,
        shm_grad_reduce=True,
        timeout_s=600.0,
    ):
        st = state.get()
        self.modules = _chunks(modules)
        self.dp, self.dp_rank, self.group = st.dp, st.dp_rank, st.dp_group
        self.overlap_grad_reduce = overlap_grad_reduce
        self.use_distributed_optimizer = use_distributed_optimizer
        self.overlap_param_gather = overlap_param_gather and use_distributed_optimizer
        self.bucket_size = int(bucket_size or default_bucket_size(self.dp))
        if self.bucket_size <= 0:
            raise MegaliteError(f"--ddp-bucket-size must be positive, got {bucket_size}")
        # gloo has a reduce-scatter, but on CPU it is slower than its all-reduce (a 4 MB
        # bucket between two local processes: ~30 ms against ~7 ms), so on gloo the
        # distributed optimizer all-reduces its buckets and reads its shard of the result.
        self.reduce_scatter = (
            use_distributed_optimizer and self.dp > 1 and dist.get_backend(self.group) != "gloo"
        )
        # CPU ranks of one node sum their buckets through shared memory (shm.py: ~3x faster
        # than gloo's sockets, and no socket copies competing with compute); collective.
        self.shm = None
        if shm_grad_reduce and self.dp > 1 and dist.get_backend(self.group) == "gloo":
            self.shm = shm.for_group(self.group, timeout_s)

        named = []
        self._chunk_of = {}
        for c, module in enumerate(self.modules):
            for name, p in module.named_parameters():
                if p.requires_grad and p not in self._chunk_of:
                    named.append((name, p, module))
                    self._chunk_of[p] = c
        self._chunk_sync = {c: True for c in range(len(self.modules))}
        self.names = {p: n for n, p, _ in named}
        self.params = [p for _, p, _ in named][::-1]  # reverse order of use
        tied = {p for _, p, _ in named if tag_of(p).tied_embedding is not None}

        self.buckets = self._make_buckets(tied)
        self._bucket_of = {p: b for b in self.buckets for p in b.params}
        self._next_launch = 0
        self._fused = set()  # params whose grad a GEMM wrote into main_grad
        self._hooks = [p.register_post_accumulate_grad_hook(self._grad_hook) for p in self.params]
        for p in self.params:
            p.accumulate_main_grad = functools.partial(self._accumulate_fused, p)
        if self.overlap_param_gather:
            self._install_forward_pre_hooks()

    @property
    def strategy(self) -> str:
        """Its --data-parallel-sharding-strategy."""
        return "optim" if self.use_distributed_optimizer else "no_shard"

    # -- layout -----------------------------------------------------------------------------
    def _bucket_indices(self, tied):
        """Buckets of param indices (reverse order of use), by size and dtype."""
        params = self.params
        # With the distributed optimizer a tied embedding gets a bucket of its own: its grad
        # is summed over the first and last pipeline stage after the DP reduce-scatter, which
        # is only right if both stages shard it the same way (Megatron does the same).
        isolate = tied if (self.use_distributed_optimizer and state.get().pp > 1) else set()
        groups, run = [], []
        for i, p in enumerate(params):
            if p in isolate:
                groups += [run, [i]] if run else [[i]]
                run = []
            else:
                run.append(i)
        if run:
            groups.append(run)
        index_buckets = []
        for g in groups:
            assigned = assign_buckets(
                [params[i].numel() for i in g], [params[i].dtype for i in g], self.bucket_size
            )
            index_buckets += [[g[j] for j in b] for b in assigned if b]
        return sorted(index_buckets, key=lambda b: b[0])

    def _layout(self, tied):
        """[(dtype, params, {p: (start, end)}, padded numel, offset in its dtype's buffer)]
        per bucket, and {dtype: buffer numel}."""
        params = self.params
        pad = self.dp if self.use_distributed_optimizer else 1
        layout = []  # (dtype, params, {p: (start, end)}, padded numel, offset)
        sizes = {}
        for idx in self._bucket_indices(tied):
            bparams = [params[i] for i in idx]
            offsets, n = {}, 0
            for p in bparams:
                offsets[p] = (n, n + p.numel())
                n += p.numel()
            n = -(-n // pad) * pad
            dtype = bparams[0].dtype
            layout.append((dtype, bparams, offsets, n, sizes.get(dtype, 0)))
            sizes[dtype] = sizes.get(dtype, 0) + n
        return layout, sizes

    @property
    def device(self):
        return self.params[0].device if self.params else state.get().device

    def _make_buckets(self, tied):
        """Bucket the params, then give each dtype one flat fp32 grad buffer (and a flat
        param buffer with the distributed optimizer) that the buckets are views of."""
        layout, sizes = self._layout(tied)
        device = self.device
        self.grad_buffers = {
            dt: torch.zeros(n, dtype=torch.float32, device=device) for dt, n in sizes.items()
        }
        self.param_buffers = {}
        if self.use_distributed_optimizer:
            self.param_buffers = {
                dt: torch.zeros(n, dtype=dt, device=device) for dt, n in sizes.items()
            }
        buckets = []
        for k, (dtype, bparams, offsets, n, base) in enumerate(layout):
            grad_data = self.grad_buffers[dtype][base : base + n]
            param_data = (
                self.param_buffers[dtype][base : base + n]
                if self.use_distributed_optimizer
                else None
            )
            for p in bparams:
                s, e = offsets[p]
                p.main_grad = grad_data[s:e].view(p.shape)
                if param_data is not None:
                    # The param now lives in the flat buffer, so one all-gather per bucket
                    # updates it in place. (Anything that re-creates param tensors, such as
                    # module.to(), must happen before this object is built.)
                    view = param_data[s:e].view(p.shape)
                    view.copy_(p.detach())
                    p.data = view
            buckets.append(Bucket(k, bparams, offsets, n, grad_data, param_data, self.dp))
        return buckets

    # -- backward ---------------------------------------------------------------------------
    def _accumulate_fused(self, param, wgrad_into):
        """`ops.linear`'s backward hands over its weight-grad GEMM: out = beta*out + alpha*dW,
        with beta 0 on the step's first micro-batch (nothing to zero, nothing copied)."""
        b = self._bucket_of[param]
        self._before_grad(b)
        wgrad_into(param.main_grad, 1.0 if param in b.has_grad else 0.0, 1.0 / self.dp)
        b.has_grad.add(param)
        self._fused.add(param)

    @torch.no_grad()
    def _grad_hook(self, param):
        b = self._bucket_of[param]
        self._before_grad(b)
        grad, main, s = param.grad, param.main_grad, 1.0 / self.dp
        if param in self._fused:  # already in main_grad; grad is a placeholder
            self._fused.discard(param)
            param.grad = None
        elif grad is not None:
            # Each grad goes in divided by DP, so the all-reduced sum is the mean with no
            # extra pass over the buffer (exact for power-of-two DP: the same numbers as
            # dividing the sum). The first micro-batch copies: no zeroing pass either.
            if param in b.has_grad:
                main.add_(grad, alpha=s)
            elif s == 1.0:
                main.copy_(grad)
            elif grad.dtype == main.dtype:
                torch.mul(grad, s, out=main)
            else:  # bf16/fp16 grad: scale in fp32
                main.copy_(grad).mul_(s)
            b.has_grad.add(param)
            param.grad = None
        if self._syncs_now(param):
            if b.grad_work is not None:
                raise MegaliteError(
                    f"the grad of {self.names[param]} arrived after its bucket's reduction "
                    f"had started (the param was used in two backward passes of the last "
                    f"micro-batch?); run without --overlap-grad-reduce"
                )
            b.ready.add(param)
            while self._next_launch < len(self.buckets) and len(
                self.buckets[self._next_launch].ready
            ) == len(self.buckets[self._next_launch].params):
                self._launch(self.buckets[self._next_launch])
                self._next_launch += 1

    def _before_grad(self, bucket):
        """Called before a grad goes into the bucket (ZeRO-2/3 make its buffer here)."""

    def _syncs_now(self, param) -> bool:
        """Whether a param's grad arriving now counts toward launching its bucket: on the
        last micro-batch of its chunk, with --overlap-grad-reduce."""
        return self.overlap_grad_reduce and self._chunk_sync[self._chunk_of[param]] and self.dp > 1

    @contextlib.contextmanager
    def no_sync(self, chunk=None):
        """Accumulate grads without reducing them (every micro-batch but the last): of every
        chunk, or of one model chunk (interleaved pipelines end each chunk's backward at a
        different time, and each chunk's buckets may start as soon as its own last one)."""
        chunks = range(len(self.modules)) if chunk is None else [chunk]
        old = {c: self._chunk_sync[c] for c in chunks}
        for c in chunks:
            self._chunk_sync[c] = False
        try:
            yield
        finally:
            self._chunk_sync.update(old)

    def _zero_missing(self, b):
        # A param that got no grad this step (unused) still holds last step's values.
        for p in b.params:
            if p not in b.has_grad:
                p.main_grad.zero_()
                b.has_grad.add(p)

    def _launch(self, b):
        self._zero_missing(b)
        if self.reduce_scatter:
            b.grad_work = _reduce_scatter(
                b.shard(b.grad_data, self.dp_rank), b.grad_data, group=self.group, async_op=True
            )
        else:
            b.grad_work = self._all_reduce(b.grad_data)

    def _all_reduce(self, flat):
        """Start a bucket's sum over DP; returns what finish_grad_sync waits on. Through
        shared memory the sum is done when this returns (each bucket's turn still comes in
        the same order on every rank)."""
        if self.shm is not None:
            with timers.timed("dp_comm"):  # inside backward too, with --overlap-grad-reduce
                self.shm.all_reduce_(flat)
            return _DONE
        return dist.all_reduce(flat, group=self.group, async_op=True)

    @torch.no_grad()
    def finish_grad_sync(self):
        """Launch the buckets backward did not (no overlap, or unused params), wait for all.
        Afterwards main_grad holds the DP mean: all of it, or with reduce-scatter only this
        rank's shard of each bucket."""
        if self.dp == 1:
            for b in self.buckets:
                self._zero_missing(b)
            return
        # The step's exposed DP time (timers' dp_comm): what backward did not launch, and
        # the wait for all of it; buckets that finished during backward cost nothing here.
        with timers.timed("dp_comm"):
            for b in self.buckets[self._next_launch :]:
                self._launch(b)
            self._next_launch = len(self.buckets)
            for b in self.buckets:
                b.grad_work.wait()
                b.grad_work = None

    def zero_grad_buffer(self):
        """Start a new step. No pass over memory: the first grad of each param is copied in."""
        for b in self.buckets:
            if b.grad_work is not None:  # an aborted step: never leave a collective behind
                b.grad_work.wait()
                b.grad_work = None
            b.ready.clear()
            b.has_grad.clear()
        self._next_launch = 0
        for p in self.params:
            p.grad = None

    # -- what the optimizer, finalize_model_grads and the memory report read ---------------
    def grad_piece(self, param, start, end) -> torch.Tensor:
        """The fp32 grad of elements [start, end) of the flattened param, after the sync."""
        return param.main_grad.view(-1)[start:end]

    def param_piece(self, param, start, end) -> torch.Tensor:
        """The storage of elements [start, end) of the flattened param that the optimizer
        writes its update into (the param itself here; ZeRO-3: this rank's shard)."""
        return param.detach().view(-1)[start:end]

    def synced_grads(self, params) -> list:
        """The grads of `params` that hold this step's DP-synced values, to be summed over
        another group (SP over TP, the tied embedding): the whole main_grad here."""
        return [p.main_grad for p in params]

    def param_tensors(self) -> list:
        """Every tensor that holds parameter values (for the memory report)."""
        return [p for m in self.modules for p in m.parameters()]

    def grad_tensors(self) -> list:
        return list(self.grad_buffers.values())

    def full_params(self):
        """A context in which every param is whole (ZeRO-3 gathers them; here they are)."""
        return contextlib.nullcontext()

    # -- params (distributed optimizer) ----------------------------------------------------
    @torch.no_grad()
    def start_param_sync(self, overlap=None):
        """All-gather every bucket's updated shards into the param buffer. With overlap the
        gathers run in the background (first-used bucket first) and the next forward waits
        bucket by bucket; otherwise this returns once every param is whole again."""
        if not self.use_distributed_optimizer or self.dp == 1:
            return
        overlap = self.overlap_param_gather if overlap is None else overlap
        self.finish_param_sync()
        for b in reversed(self.buckets):  # the last bucket holds the first-used params
            b.param_work = _all_gather_into(
                b.param_data, b.shard(b.param_data, self.dp_rank), group=self.group, async_op=True
            )
        if not overlap:
            self.finish_param_sync()

    def finish_param_sync(self):
        for b in self.buckets:
            if b.param_work is not None:
                with timers.timed("dp_comm"):
                    b.param_work.wait()
                b.param_work = None

    def _install_forward_pre_hooks(self):
        """Each module waits, before its forward, for the buckets of its own params. A param
        used outside its module's forward (a tied LM head reads the embedding weight) is
        caught by the chunk's pre-hook: the first forward records which modules run, and
        from then on the chunk waits up front for the buckets of every module that did not."""
        self._seen = set()
        self._unhooked = None  # buckets the chunk pre-hook waits for

        def wait_for(module):
            self._seen.add(module)
            for b in self._module_buckets.get(module, ()):
                if b.param_work is not None:
                    with timers.timed("dp_comm"):
                        b.param_work.wait()
                    b.param_work = None

        def chunk_hook(chunk, args):
            if self._unhooked is None and any(b.param_work is not None for b in self.buckets):
                self._unhooked = {
                    self._bucket_of[p]
                    for m, bs in self._module_params.items()
                    if m not in self._seen
                    for p in bs
                }
            for b in self._unhooked or ():
                if b.param_work is not None:
                    with timers.timed("dp_comm"):
                        b.param_work.wait()
                    b.param_work = None
            wait_for(chunk)

        self._module_buckets, self._module_params = {}, {}
        for chunk in self.modules:
            for module in chunk.modules():
                own = [p for p in module.parameters(recurse=False) if p in self._bucket_of]
                if own:
                    self._module_params[module] = own
                    self._module_buckets[module] = sorted(
                        {self._bucket_of[p] for p in own}, key=lambda b: b.index
                    )
                if module is not chunk:
                    module.register_forward_pre_hook(lambda m, args: wait_for(m))
            chunk.register_forward_pre_hook(chunk_hook)


def _all_reduce_coalesced(grads, group, scale=1.0):
    if not grads:
        return
    flat = _flatten_dense_tensors(grads)
    if scale != 1.0:
        flat.mul_(scale)
    dist.all_reduce(flat, group=group)
    for g, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
        g.copy_(synced)


@torch.no_grad()
def finalize_model_grads(model, ddp=None) -> None:
    """Make a step's grads consistent: DP mean, SP partial sums over TP, the tied embedding.

    model: a module or a list of model chunks. With `ddp` the grads are each param's
    main_grad (fp32) and the DP mean comes from its buckets (in flight since backward with
    --overlap-grad-reduce); without it the plain path reduces p.grad with one coalesced
    all-reduce per group (tests of single features use it)."""
    st = state.get()
    chunks = _chunks(model)
    if ddp is not None:
        ddp.finish_grad_sync()

    def grads(ps):
        return ddp.synced_grads(ps) if ddp is not None else [p.grad for p in ps]

    params = [
        p
        for m in chunks
        for p in m.parameters()
        if p.requires_grad and (ddp is not None or p.grad is not None)
    ]
    # SP and tied-embedding sums run after the DP sync: all three are sums over disjoint
    # groups, so the order does not change the result. With the distributed optimizer only
    # this rank's shard of main_grad is meaningful, and it is the same shard on every TP rank
    # (same bucket layout) and on both embedding stages (the tied embedding has a bucket of
    # its own), so reducing whole tensors keeps the shards right.
    if st.tp > 1:
        sp_grads = grads([p for p in params if tag_of(p).sequence_parallel])
        with timers.timed("tp_comm"):
            _all_reduce_coalesced(sp_grads, st.tp_group)
    if st.pp > 1 and st.embedding_group is not None and len(st.embedding_ranks) > 1:
        tied_grads = grads([p for p in params if tag_of(p).tied_embedding])
        with timers.timed("pp_comm"):
            _all_reduce_coalesced(tied_grads, st.embedding_group)
    if ddp is None and st.dp > 1:
        _all_reduce_coalesced(grads(params), st.dp_group, scale=1.0 / st.dp)
