"""Pipeline parallelism: the schedules that run a global batch's micro-batches through the
stages, and the executor that plays them on this rank's model chunks.

    schedules.py  the layout (layers[rank][chunk]) and each schedule's list of operations
    p2p.py        the transfers between neighbouring stages
    here          the executor; forward_backward_* (no pipelining, 1F1B, interleaved 1F1B);
                  get_forward_backward_func; helpers for the training loop

A schedule is data: `schedules.one_f_one_b(pp, rank, M)` is the exact list of Forward,
Backward and Comm operations rank `rank` performs. The executor plays that list on the model;
`schedule_sim` plays every rank's list against the others with no processes at all, to prove
that each send meets its receive, in order, and that no stage holds more micro-batches than
the 1F1B bound. Both read the same lists, so the test checks the schedule that runs.

Every schedule takes (model_chunks, data_iterator, num_microbatches) and returns each
micro-batch's mean loss on the last stage (an empty list elsewhere). A loss is divided by
num_microbatches before backward, so the accumulated grads are those of the global batch mean.

Memory: a stage keeps, per micro-batch in flight, what its backward needs: the autograd graph
and the received input (whose grad is sent back). The output it sent forward is freed at once
(`deallocate_output`): only its autograd node is kept as the root of the backward pass.
"""

from __future__ import annotations

import contextlib
import time

import torch
import torch.distributed as dist
import torch.nn as nn

from megalite.errors import MegaliteError
from megalite.parallel import p2p, state
from megalite.parallel.schedules import (  # noqa: F401  (the layout is part of this API)
    Backward, Comm, Forward, interleaved_1f1b, one_f_one_b, pipeline_layout, schedule_ops,
    virtual_pipeline_size)


# -- executor ---------------------------------------------------------------------------------

def deallocate_output(out: torch.Tensor) -> None:
    """Free a sent output's data but keep the tensor: its grad_fn is the root of this
    micro-batch's backward. Safe when no autograd node saved the output itself: a stage
    ends with a residual add, whose backward needs no operand. (Megatron's trick.)"""
    if out._base is not None or hasattr(out.grad_fn, "_saved_result"):
        return   # a view of something bigger, or an op (tanh, exp...) that saves its result
    out.data = torch.empty((1,), device=out.device, dtype=out.dtype)


def backward_from(out: torch.Tensor, grad: torch.Tensor) -> None:
    """out.backward(grad) for an `out` whose data was freed: torch.autograd.backward would
    check grad's shape against out's (now [1]), so call the engine directly, as Megatron's
    custom_backward does."""
    torch.autograd.Variable._execution_engine.run_backward(
        tensors=(out,), grad_tensors=(grad,), keep_graph=False, create_graph=False,
        inputs=(), allow_unreachable=True, accumulate_grad=True)


class _Executor:
    """Plays one rank's list of operations on its model chunks."""

    def __init__(self, chunks, data_iterator, num_microbatches, *, forward_only, loss_scale,
                 no_sync, tensor_shape, dtype, trace=None, on_op=None):
        self.chunks, self.data, self.M = chunks, data_iterator, num_microbatches
        self.forward_only, self.loss_scale = forward_only, loss_scale
        param = next(chunks[0].parameters())
        self.shape = tuple(tensor_shape)
        self.dtype = dtype or param.dtype
        self.device = param.device
        self.no_sync = no_sync
        self.trace, self.on_op = trace, on_op
        self.inputs = {}    # (chunk, mb) -> received activation [s, b, h], needed for its grad
        self.outputs = {}   # (chunk, mb) -> output (data freed once sent) or scaled loss
        self.grads = {}     # (chunk, mb) -> received grad of the output [s, b, h]
        self.to_send = {}   # (kind, chunk, mb) -> tensor waiting for its Comm
        self.losses = []

    def run(self, ops):
        V = len(self.chunks)
        # DP gradient sync happens in the last backward only: of each chunk when given one
        # no_sync per chunk, else of the whole schedule on this rank.
        if self.no_sync is None:
            self.sync_factories, self.sync_at = [contextlib.nullcontext] * V, None
        elif callable(self.no_sync):
            self.sync_factories = [self.no_sync] * V
            last = [op for op in ops if isinstance(op, Backward)][-1:]
            self.sync_at = {(op.chunk, op.mb) for op in last}
        else:
            self.sync_factories = list(self.no_sync)
            self.sync_at = {(c, self.M - 1) for c in range(V)}
        for op in ops:
            t0 = time.perf_counter()
            if isinstance(op, Forward):
                self.forward(op.chunk, op.mb)
            elif isinstance(op, Backward):
                self.backward(op.chunk, op.mb)
            else:
                self.communicate(op)
            if self.trace is not None:
                self.trace.append((op, t0, time.perf_counter()))
            if self.on_op is not None:
                self.on_op(self)
        assert not (self.inputs or self.outputs or self.grads or self.to_send), "schedule leak"
        return self.losses

    def forward(self, c, mb):
        model = self.chunks[c]
        x = None if model.pre_process else self.inputs[(c, mb)]           # [s, b, h]
        # Only the chunks at either end of the whole pipeline read data; each reads the
        # micro-batches in order, so taking the next batch is taking batch `mb`.
        batch = next(self.data) if model.pre_process or model.post_process else {}
        grad_mode = torch.no_grad() if self.forward_only else contextlib.nullcontext()
        with grad_mode:
            out = model(tokens=batch.get("tokens") if model.pre_process else None,
                        labels=batch.get("labels"), hidden_states=x)
            if model.post_process:
                loss = out.float().mean()                                # out: [b, s] losses
                self.losses.append(loss.detach())
                out = loss * (self.loss_scale / self.M)
            else:
                self.to_send[("fwd", c, mb)] = out                       # [s, b, h]
        if self.forward_only:
            self.inputs.pop((c, mb), None)
        else:
            self.outputs[(c, mb)] = out

    def backward(self, c, mb):
        model = self.chunks[c]
        out = self.outputs.pop((c, mb))
        x = self.inputs.pop((c, mb), None)
        sync = self.sync_at is None or (c, mb) in self.sync_at
        with contextlib.nullcontext() if sync else self.sync_factories[c]():
            if model.post_process:
                out.backward()
            else:
                backward_from(out, self.grads.pop((c, mb)).to(out.dtype))
        if x is not None:
            self.to_send[("bwd", c, mb)] = x.grad                         # [s, b, h]

    def communicate(self, comm):
        transfers, received, sent = [], [], []
        for op in comm.ops:
            if op.send:
                t = self.to_send.pop((op.kind, op.chunk, op.mb)).detach()
                if tuple(t.shape) != self.shape:
                    raise MegaliteError(
                        f"pipeline stage {state.get().pp_rank} sends a tensor of shape "
                        f"{tuple(t.shape)}, but the schedule's fixed shape is {self.shape} "
                        f"([seq (/tp with sequence parallelism), micro-batch, hidden])")
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
        return [t for d in (self.inputs, self.outputs, self.grads, self.to_send)
                for t in d.values() if t is not None]


# -- schedules --------------------------------------------------------------------------------

def _chunks(model):
    return list(model) if isinstance(model, (list, tuple)) else [model]


def forward_backward_no_pipelining(model, data_iterator, num_microbatches, *,
                                   forward_only=False, loss_scale=1.0, no_sync=None, **unused):
    """Gradient accumulation over micro-batches on a single pipeline stage.

    no_sync: a context manager factory that suppresses data-parallel gradient sync; it wraps
    every micro-batch but the last, so the sync happens once, during the last backward.
    """
    (model,) = _chunks(model)
    no_sync = no_sync or contextlib.nullcontext
    losses = []
    for i in range(num_microbatches):
        last = i == num_microbatches - 1
        with (contextlib.nullcontext() if last or forward_only else no_sync()):
            batch = next(data_iterator)
            per_token = model(batch["tokens"], labels=batch["labels"])   # [b, s] fp32
            loss = per_token.float().mean()
            if not forward_only:
                (loss * (loss_scale / num_microbatches)).backward()
        losses.append(loss.detach())
    return losses


def _pipelined(order, model_chunks, data_iterator, num_microbatches, *, forward_only=False,
               loss_scale=1.0, no_sync=None, tensor_shape,
               dtype=None, trace=None, on_op=None):
    st = state.get()
    chunks = _chunks(model_chunks)
    ops = order(st.pp, st.pp_rank, num_microbatches, len(chunks), forward_only)
    return _Executor(chunks, data_iterator, num_microbatches, forward_only=forward_only,
                     loss_scale=loss_scale, no_sync=no_sync,
                     tensor_shape=tensor_shape, dtype=dtype, trace=trace,
                     on_op=on_op).run(ops)


def forward_backward_pipelining_without_interleaving(model_chunks, data_iterator,
                                                     num_microbatches, **kw):
    """1F1B. kw: forward_only, loss_scale, no_sync, tensor_shape (required),
    dtype (default: the parameters'), trace / on_op (instrumentation)."""
    if len(_chunks(model_chunks)) != 1:
        raise MegaliteError("1F1B runs one model chunk per stage; use the interleaved schedule")
    order = lambda pp, rank, M, vp, fo: one_f_one_b(pp, rank, M, fo)   # noqa: E731
    return _pipelined(order, model_chunks, data_iterator, num_microbatches, **kw)


def forward_backward_pipelining_with_interleaving(model_chunks, data_iterator,
                                                  num_microbatches, **kw):
    """Interleaved 1F1B over this rank's model chunks (same keywords as 1F1B)."""
    return _pipelined(interleaved_1f1b, model_chunks, data_iterator, num_microbatches, **kw)


def get_forward_backward_func(pipeline_parallel_size=None, num_model_chunks=1):
    """The schedule for a layout: no pipelining at PP = 1, else 1F1B, interleaved when each rank
    holds several model chunks (virtual stages). All take (model_chunks, data_iterator, num_microbatches, **kw)."""
    pp = state.get().pp if pipeline_parallel_size is None else pipeline_parallel_size
    if pp == 1:
        if num_model_chunks > 1:
            raise MegaliteError("virtual pipeline stages need --pipeline-model-parallel-size >= 2")
        return forward_backward_no_pipelining
    if num_model_chunks > 1:
        return forward_backward_pipelining_with_interleaving
    return forward_backward_pipelining_without_interleaving


# -- helpers for the training loop ------------------------------------------------------------

def p2p_tensor_shape(cfg, tp: int) -> tuple:
    """The shape of every activation and grad passed between stages."""
    seq = cfg.model.seq_length
    if cfg.parallel.sequence_parallel and tp > 1:
        seq //= tp
    return (seq, cfg.training.micro_batch_size, cfg.model.hidden_size)


def pipeline_mean_loss(losses) -> torch.Tensor:
    """The mean micro-batch loss, on every stage (only the last stage computed it)."""
    st = state.get()
    loss = torch.stack(losses).mean() if losses else torch.zeros((), device=st.device)
    if st.pp > 1:
        dist.all_reduce(loss, group=st.pp_group)   # every other stage adds a zero
    return loss


class StageModule(nn.Module):
    """This rank's model chunks seen as one module, for everything but the forward pass:
    optimizer, checkpoints, gradient sync and norm. It holds the chunks' own submodules (no
    copies), and since each chunk keys its layers by global number its parameter names are
    the chunks' own (`layers.5.mlp.linear_fc1.weight`): its state dict is the union of theirs,
    with the names of any other layout."""

    def __init__(self, chunks):
        super().__init__()
        self.chunks = list(chunks)   # a plain list: not registered, so no "0." name prefixes
        self.cfg = chunks[0].cfg
        self.layers = nn.ModuleDict()
        for chunk in chunks:
            for name, child in chunk.named_children():
                if name == "layers":
                    self.layers.update(child)
                elif name not in self._modules:
                    self.add_module(name, child)
                elif any(True for _ in child.parameters()):
                    raise ValueError(f"two model chunks own parameters under {name!r}")

    def train(self, mode: bool = True):
        for chunk in self.chunks:   # GPTModel.forward reads its own `training` flag
            chunk.train(mode)
        return super().train(mode)

    def forward(self, *args, **kwargs):
        raise RuntimeError("run model chunks through a pipeline schedule, not StageModule")


def stage_module(chunks) -> nn.Module:
    """The chunk itself when there is one, else a StageModule over all of them."""
    return chunks[0] if len(chunks) == 1 else StageModule(chunks)
