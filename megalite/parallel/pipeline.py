"""Pipeline parallelism: the executor that plays a schedule on this rank's model chunks.

    schedules.py  each schedule's list of operations (megalite.layout: which layers where)
    p2p.py        the transfers between neighbouring stages
    here          the executor and `forward_backward`, the one entry point for every layout:
                  PP = 1 is the 1F1B program with no communication (F0 B0 F1 B1 ...: plain
                  gradient accumulation), PP > 1 is 1F1B, interleaved with virtual stages

A schedule is data: `schedules.one_f_one_b(pp, rank, M)` is the exact list of Forward,
Backward and Comm operations rank `rank` performs. The executor plays that list on the model;
`schedule_sim` plays every rank's list against the others with no processes at all, to prove
that each send meets its receive, in order, and that no stage holds more micro-batches than
the 1F1B bound. Both read the same lists, so the test checks the schedule that runs.

`forward_backward(model_chunks, data_iterator, num_microbatches)` returns each micro-batch's
mean loss on the last stage (an empty list elsewhere). A loss is divided by num_microbatches
before backward, so the accumulated grads are those of the global batch mean.

Memory: a stage keeps, per micro-batch in flight, what its backward needs: the autograd graph
and the received input (whose grad is sent back). The output it sent forward is freed at once
(`deallocate_output`): only its autograd node is kept as the root of the backward pass.
"""

from __future__ import annotations

import contextlib
import time

import torch
import torch.distributed as dist

from megalite import timers
from megalite.errors import MegaliteError
from megalite.parallel import p2p, state
from megalite.parallel.schedules import Backward, Forward, schedule_ops


# -- executor ---------------------------------------------------------------------------------


def deallocate_output(out: torch.Tensor) -> None:
    """Free a sent output's data but keep the tensor: its grad_fn is the root of this
    micro-batch's backward. Safe when no autograd node saved the output itself: a stage
    ends with a residual add, whose backward needs no operand. (Megatron's trick.)"""
    if out._base is not None or hasattr(out.grad_fn, "_saved_result"):
        return  # a view of something bigger, or an op (tanh, exp...) that saves its result
    out.data = torch.empty((1,), device=out.device, dtype=out.dtype)


def backward_from(out: torch.Tensor, grad: torch.Tensor) -> None:
    """out.backward(grad) for an `out` whose data was freed: torch.autograd.backward would
    check grad's shape against out's (now [1]), so call the engine directly, as Megatron's
    custom_backward does."""
    torch.autograd.Variable._execution_engine.run_backward(
        tensors=(out,),
        grad_tensors=(grad,),
        keep_graph=False,
        create_graph=False,
        inputs=(),
        allow_unreachable=True,
        accumulate_grad=True,
    )


class _Executor:
    """Plays one rank's list of operations on its model chunks."""

    def __init__(
        self,
        chunks,
        data_iterator,
        num_microbatches,
        *,
        forward_only=False,
        loss_scale=1.0,
        no_sync=None,
        tensor_shape=None,
        dtype=None,
        trace=None,
        on_op=None,
        packed=False,
    ):
        self.chunks, self.data, self.M = chunks, data_iterator, num_microbatches
        self.packed = packed
        self.batches = []  # the micro-batches read so far, in order: batches[mb]
        self.forward_only = forward_only
        # What each micro-batch's loss is multiplied by. fp16's loss scale is a 0-dim fp32
        # tensor on the device (updated there by the step: no host read); the factor is then
        # made as from a float scale (in double, rounded to the loss's fp32).
        if isinstance(loss_scale, torch.Tensor):
            self.loss_factor = (loss_scale.double() / num_microbatches).float()
        else:
            self.loss_factor = loss_scale / num_microbatches
        param = next(chunks[0].parameters())
        self.shape = None if tensor_shape is None else tuple(tensor_shape)
        self.dtype = dtype or param.dtype
        self.device = param.device
        self.no_sync = no_sync
        self.trace, self.on_op = trace, on_op
        self.inputs = {}  # (chunk, mb) -> received activation [s, b, h], needed for its grad
        self.outputs = {}  # (chunk, mb) -> output (data freed once sent) or scaled loss
        self.grads = {}  # (chunk, mb) -> received grad of the output [s, b, h]
        self.to_send = {}  # (kind, chunk, mb) -> tensor waiting for its Comm
        self.losses = []

    def run(self, ops):
        # DP gradient sync happens in each chunk's last backward only: that is when all of
        # its grads are in, and its buckets may start reducing while other chunks compute.
        last = {op.chunk: op for op in ops if isinstance(op, Backward)}
        self.sync_at = set(last.values())
        fill_end, drain_start = _steady_state(ops)
        for i, op in enumerate(ops):
            t0 = time.perf_counter()
            if isinstance(op, Forward):
                with timers.timed("forward"):
                    self.forward(op.chunk, op.mb)
            elif isinstance(op, Backward):
                with timers.timed("backward"):
                    self.backward(op)
            else:  # the step timers' bubble: the transfers of the pipeline's fill and drain
                steady = fill_end < i < drain_start
                with timers.timed("pp_comm" if steady else "bubble"):
                    self.communicate(op)
            if self.trace is not None:
                self.trace.append((op, t0, time.perf_counter()))
            if self.on_op is not None:
                self.on_op(self)
        assert not (self.inputs or self.outputs or self.grads or self.to_send), "schedule leak"
        return self.losses

    def batch(self, mb) -> dict:
        """Micro-batch `mb`. The data is read in order, once, whichever chunk asks first."""
        with timers.timed("data"):
            while len(self.batches) <= mb:
                self.batches.append(next(self.data))
        return self.batches[mb]

    def forward(self, c, mb):
        model = self.chunks[c]
        x = None if model.pre_process else self.inputs[(c, mb)]  # [s, b, h]
        # The chunks at either end of the whole pipeline read data (tokens, labels); with
        # packed sequences every chunk does (each layer's attention needs the segments).
        batch = {}
        if model.pre_process or model.post_process or self.packed:
            batch = self.batch(mb)
        grad_mode = torch.no_grad() if self.forward_only else contextlib.nullcontext()
        with grad_mode:
            out = model(
                tokens=batch.get("tokens") if model.pre_process else None,
                labels=batch.get("labels") if model.post_process else None,
                hidden_states=x,
                position_ids=batch.get("position_ids"),
                segment_ids=batch.get("segment_ids"),
            )
            if model.post_process:
                loss = micro_batch_loss(out, batch)  # out: [b, s] losses
                self.losses.append(loss.detach())
                out = loss * self.loss_factor
            else:
                self.to_send[("fwd", c, mb)] = out  # [s, b, h]
        if self.forward_only:
            self.inputs.pop((c, mb), None)
        else:
            self.outputs[(c, mb)] = out

    def backward(self, op):
        c, mb = op.chunk, op.mb
        model = self.chunks[c]
        out = self.outputs.pop((c, mb))
        x = self.inputs.pop((c, mb), None)
        hold = self.no_sync is not None and op not in self.sync_at
        with self.no_sync(c) if hold else contextlib.nullcontext():
            if model.post_process:
                out.backward()
            else:
                backward_from(out, self.grads.pop((c, mb)).to(out.dtype))
        if x is not None:
            self.to_send[("bwd", c, mb)] = x.grad  # [s, b, h]

    def communicate(self, comm):
        transfers, received, sent = [], [], []
        for op in comm.ops:
            if op.send:
                t = self.to_send.pop((op.kind, op.chunk, op.mb)).detach()
                if tuple(t.shape) != self.shape:
                    raise MegaliteError(
                        f"pipeline stage {state.get().pp_rank} sends a tensor of shape "
                        f"{tuple(t.shape)}, but the schedule's fixed shape is {self.shape} "
                        f"([seq (/tp with sequence parallelism), micro-batch, hidden])"
                    )
                t = t.to(self.dtype).contiguous()
                peer = p2p.next_rank() if op.kind == "fwd" else p2p.prev_rank()
                transfers.append((True, t, peer))
                if op.kind == "fwd":
                    sent.append((op.chunk, op.mb))
            else:
                t = torch.empty(self.shape, dtype=self.dtype, device=self.device)
                peer = p2p.prev_rank() if op.kind == "fwd" else p2p.next_rank()
                transfers.append((False, t, peer))
                received.append((op, t))
        p2p.exchange(transfers)
        for op, t in received:
            if op.kind == "fwd":
                self.inputs[(op.chunk, op.mb)] = t.requires_grad_(not self.forward_only)
            else:
                self.grads[(op.chunk, op.mb)] = t
        for key in sent:
            if key in self.outputs:
                deallocate_output(self.outputs[key])

    def held_tensors(self):
        """Every tensor the schedule itself holds now (the memory test counts them)."""
        return [
            t
            for d in (self.inputs, self.outputs, self.grads, self.to_send)
            for t in d.values()
            if t is not None
        ]


def micro_batch_loss(token_losses: torch.Tensor, batch: dict) -> torch.Tensor:
    """A micro-batch's share of the global batch's loss, as the mean of its micro-batches'.

    Pretraining: the mean over its tokens. With a loss mask (--sft): its masked-in tokens'
    sum times `loss_weight` = DP x M / (masked-in tokens of the whole global batch), set by
    `batches.weigh_by_targets`: the mean over micro-batches and the DP mean of the grads then
    give the mean over every target token of the global batch, however unevenly the targets
    fall into micro-batches and ranks (not a mean of per-micro-batch means)."""
    if "loss_mask" not in batch:
        return token_losses.float().mean()
    return (token_losses.float() * batch["loss_mask"]).sum() * batch["loss_weight"]


def _steady_state(ops):
    """(index of the first Backward, index of the last Forward) of a rank's list: its
    transfers strictly between the two are the schedule's steady state; those before are the
    pipeline filling (up to the first gradient coming back), those after it draining."""
    first_backward = next((i for i, op in enumerate(ops) if isinstance(op, Backward)), len(ops))
    last_forward = max((i for i, op in enumerate(ops) if isinstance(op, Forward)), default=-1)
    return first_backward, last_forward


def _wait_for_the_pipeline(device) -> None:
    """With the step timers on (PP > 1): wait once for every stage to finish its schedule,
    as bubble. A later stage ends its last backward before stage 0 does; without this its
    idle tail would land in the first part that waits for stage 0 (the grad norm's
    all-reduce in the optimizer). One 1-element all-reduce on the stream: no host sync."""
    with timers.timed("bubble"):
        dist.all_reduce(torch.zeros(1, device=device), group=state.get().pp_group)


# -- the entry point ---------------------------------------------------------------------------


def forward_backward(
    model_chunks, data_iterator, num_microbatches, *, forward_only=False, tensor_shape=None, **kw
):
    """Run one global batch's micro-batches through this rank's model chunks, under the
    schedule of the layout (`schedules.schedule_ops`), accumulating grads unless forward_only.

    tensor_shape: of every activation passed between stages (`p2p_tensor_shape`; needed only
    with PP > 1). packed: the batches carry position_ids and segment_ids (packed sequences),
    which every chunk reads. kw, as for `run_schedule`: loss_scale (a float, or a 0-dim fp32 device
    tensor: fp16's); no_sync (`ddp.no_sync`, called with a
    chunk index: it holds that chunk's grad sync back around every backward but its last);
    dtype of the transfers (default: the parameters'); trace / on_op (instrumentation).
    Returns each micro-batch's mean loss on the last stage, [] elsewhere."""
    st = state.get()
    chunks = list(model_chunks) if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    if st.pp == 1 and len(chunks) > 1:
        raise MegaliteError("virtual pipeline stages need --pipeline-model-parallel-size >= 2")
    if st.pp > 1 and tensor_shape is None:
        raise MegaliteError("a pipeline (PP > 1) needs the tensor_shape of its transfers")
    ops = schedule_ops(st.pp, st.pp_rank, num_microbatches, len(chunks), forward_only)
    losses = run_schedule(
        ops,
        chunks,
        data_iterator,
        num_microbatches,
        forward_only=forward_only,
        tensor_shape=tensor_shape,
        **kw,
    )
    if st.pp > 1 and timers.active is not None:
        _wait_for_the_pipeline(st.device)
    return losses


def run_schedule(ops, chunks, data_iterator, num_microbatches, **kw):
    """Play a given list of operations (the layout's own, or another such as GPipe's order in
    the memory test). kw: forward_only, loss_scale, no_sync, tensor_shape, dtype, trace,
    on_op, packed (see forward_backward)."""
    return _Executor(list(chunks), data_iterator, num_microbatches, **kw).run(ops)


def p2p_tensor_shape(cfg, tp: int) -> tuple:
    """The shape of every activation and grad passed between stages."""
    seq = cfg.model.seq_length
    if cfg.parallel.sequence_parallel and tp > 1:
        seq //= tp
    return (seq, cfg.training.micro_batch_size, cfg.model.hidden_size)


def global_mean_loss(losses) -> torch.Tensor:
    """The mean micro-batch loss of the global batch, on every rank: the last stage computed
    it for its DP rank's micro-batches; it is summed over the pipeline (the other stages add a
    zero), then averaged over DP. Training and evaluation report through this one function."""
    st = state.get()
    loss = torch.stack(losses).mean() if losses else torch.zeros((), device=st.device)
    if st.pp > 1:
        with timers.timed("pp_comm"):
            dist.all_reduce(loss, group=st.pp_group)
    if st.dp > 1:
        with timers.timed("dp_comm"):
            dist.all_reduce(loss, group=st.dp_group)
        loss /= st.dp
    return loss
