"""AdamW over fp32 main params for a model of any dtype: Megatron's mixed-precision optimizer.

    model params   bf16 / fp16 (or fp32)      what forward and backward run in
    main grads     fp32, in the DDP buffers   param.main_grad (megalite.parallel.ddp)
    main params    fp32                       the master copy AdamW updates
    exp_avg(_sq)   fp32

One step: the global grad norm (which also detects inf/nan: with fp16 the step is skipped and
the loss scale backs off; with --skip-spike-factor a norm far above its running median skips
the step too, `grad_norm.SpikeFilter`), the clipping coefficient, then one fused AdamW pass
that unscales and clips the grads on the fly, updates main params and moments and writes the
new values into the model params in their own dtype. For an fp32 model the main params *are*
the model params (no copy). Memory per param with bf16 params: 2 (param) + 4 (grad) + 12
(main, m, v) = 18 bytes; `DistributedOptimizer` (optim/distributed.py) shards the 12 over DP.

The optimizer works on "pieces": contiguous ranges [start, end) of flattened params that this
rank owns. Here every rank owns every param whole; the distributed optimizer owns 1/DP of each
grad bucket. Its state dict is keyed by parameter name and element range, not by position,
so a checkpoint loads under another DP size, bucket size or optimizer kind.
"""

from __future__ import annotations

import torch

from megalite.errors import MegaliteError
from megalite.ops.adamw import multi_tensor_adamw_
from megalite.optim.grad_norm import clip_coefficient, global_grad_norm
from megalite.parallel import state


class Piece:
    """Elements [start, end) of one flattened param, and the optimizer's views of them."""

    __slots__ = (
        "param",
        "name",
        "start",
        "end",
        "group",
        "model",
        "grad",
        "main",
        "exp_avg",
        "exp_avg_sq",
    )

    def __init__(self, param, name, start, end, group, ddp):
        self.param, self.name, self.start, self.end, self.group = param, name, start, end, group
        self.model = ddp.param_piece(param, start, end)  # the model's own storage
        self.grad = ddp.grad_piece(param, start, end)  # fp32, in the DDP buffer

    @property
    def numel(self):
        return self.end - self.start


class MixedPrecisionOptimizer:
    """AdamW (torch.optim.AdamW's arithmetic) over fp32 main params, with global-norm clipping
    and, for fp16, a dynamic loss scaler. Takes the DistributedDataParallel that owns the grad
    buffers; `param_groups` hold lr / weight_decay (the loop sets lr every step)."""

    sharded = False

    def __init__(
        self,
        param_groups,
        ddp,
        *,
        lr=1e-3,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=0.0,
        clip_grad=0.0,
        loss_scaler=None,
    ):
        self.ddp = ddp
        self.clip_grad = clip_grad
        self.scaler = loss_scaler
        # --skip-spike-factor: a grad_norm.SpikeFilter, set by the trainer (None: off)
        self.spike_filter = None
        self.param_groups = []
        for g in param_groups:
            group = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
            group.update(g)
            group["params"] = list(group["params"])
            self.param_groups.append(group)
        group_of = {p: i for i, g in enumerate(self.param_groups) for p in g["params"]}
        missing = [ddp.names[p] for p in ddp.params if p not in group_of]
        if missing:
            raise MegaliteError(
                f"optimizer: parameters {missing[:3]} have grad buffers but no param group"
            )
        self.pieces = [Piece(p, ddp.names[p], s, e, group_of[p], ddp) for p, s, e in self._owned()]
        self._allocate_state()
        device = self.exp_avg_flat.device
        # AdamW steps taken (its bias correction): advanced on the device by the steps that
        # were not skipped, so that no skip decided there needs a host read to be left out
        self._steps = torch.zeros((), dtype=torch.int64, device=device)
        if self.scaler is not None:
            self.scaler.to(device)
        # The kernel's tensor lists never change: build them once (one list per kind of
        # piece: an fp32 param is its own main param, a bf16/fp16 one gets a model copy).
        self._kinds = []
        for with_copy in (False, True):
            pcs = [pc for pc in self.pieces if (pc.main is not pc.model) == with_copy]
            if pcs:
                self._kinds.append(
                    (
                        pcs,
                        dict(
                            params=[pc.main for pc in pcs],
                            grads=[pc.grad for pc in pcs],
                            exp_avgs=[pc.exp_avg for pc in pcs],
                            exp_avg_sqs=[pc.exp_avg_sq for pc in pcs],
                            model_copies=[pc.model for pc in pcs] if with_copy else None,
                        ),
                    )
                )

    # -- which elements this rank owns -------------------------------------------------------
    def _owned(self):
        """(param, start, end) ranges of flattened params this rank steps: all of them."""
        for p in self.ddp.params:
            yield p, 0, p.numel()

    def _allocate_state(self):
        """fp32 main params (only for low-precision pieces: an fp32 model param is its own
        main param) and moments, each one flat tensor with a view per piece."""
        low = [pc for pc in self.pieces if pc.param.dtype != torch.float32]
        device = self.pieces[0].model.device if self.pieces else state.get().device
        self.main_flat = torch.empty(
            sum(pc.numel for pc in low), dtype=torch.float32, device=device
        )
        n = sum(pc.numel for pc in self.pieces)
        self.exp_avg_flat = torch.zeros(n, dtype=torch.float32, device=device)
        self.exp_avg_sq_flat = torch.zeros(n, dtype=torch.float32, device=device)
        at, at_low = 0, 0
        for pc in self.pieces:
            pc.exp_avg = self.exp_avg_flat[at : at + pc.numel]
            pc.exp_avg_sq = self.exp_avg_sq_flat[at : at + pc.numel]
            at += pc.numel
            if pc.param.dtype == torch.float32:
                pc.main = pc.model
            else:
                pc.main = self.main_flat[at_low : at_low + pc.numel]
                at_low += pc.numel
        self.reload_model_params()

    @torch.no_grad()
    def reload_model_params(self):
        """main params <- model params (after the model's weights were loaded without the
        optimizer state, --no-load-optim)."""
        for pc in self.pieces:
            if pc.main is not pc.model:
                pc.main.copy_(pc.model)

    # -- the step ----------------------------------------------------------------------------
    @property
    def step_count(self) -> int:
        """AdamW steps taken, on the host: a read of the device count (saves and logs)."""
        return int(self._steps)

    @step_count.setter
    def step_count(self, value):
        self._steps.fill_(int(value))

    @property
    def loss_scale(self):
        """What the loss is multiplied by before backward: fp16's loss scale, a 0-dim fp32
        tensor on the device that the step updates in place, or 1.0 without a scaler."""
        return self.scaler.loss_scale if self.scaler is not None else 1.0

    def grad_norm(self) -> torch.Tensor:
        """The global norm of the (still loss-scaled) grads."""
        if not hasattr(self, "_norm_args"):  # whole params here: views shaped like them
            self._norm_args = (
                [pc.param for pc in self.pieces],
                [pc.grad.view(pc.param.shape) for pc in self.pieces],
            )
        return global_grad_norm(*self._norm_args)

    @torch.no_grad()
    def step(self, closure=None):
        """Check, clip and apply one AdamW step. Returns (stepped, grad_norm) as 0-dim tensors
        on the device (bool; fp32, the norm of the unscaled grads): stepped is False when a
        grad held inf/nan, or when the norm is a spike (--skip-spike-factor: over F x the
        running median); every rank decides alike, because the norm is global. Then nothing
        changed and, for inf/nan with fp16, the loss scale was updated.

        Nothing is read back to the host, in any precision: the norm, the skip flag, the grad
        scale (loss scale / clip coefficient) and the step number are computed on the device
        and handed to the fused kernel there, which skips the whole update when the flag is
        set. The count of steps taken (AdamW's bias correction) advances there too, by the
        steps not skipped, so a skipped step never happened for the next one's bias
        correction. fp16's loss scaler updates its device state from the inf/nan flag (a
        spike is no overflow). Without a scaler a non-finite norm is divergence: the params
        stay as they were (the loop raises "training diverged", or rolls back, when it next
        reads the step's stats, before any save)."""
        scale = self.loss_scale
        norm = self.grad_norm() / scale
        found_inf = ~torch.isfinite(norm)
        skip = found_inf
        if self.spike_filter is not None:
            skip = found_inf | self.spike_filter(norm)
        stepped = ~skip
        self._adamw(
            grad_scale=scale / clip_coefficient(norm, self.clip_grad),
            found_inf=skip,
            step=(self._steps + 1).float(),
        )
        self._steps.add_(stepped)
        if self.scaler is not None:  # after the grad scale above took the step's own scale
            self.scaler.update(found_inf)
        self._after_step()
        return stepped, norm

    def _adamw(self, grad_scale, found_inf=None, step=None) -> None:
        """One fused kernel call per kind of piece (with or without a low-precision copy).
        grad_scale: a float or a 1-element device tensor; found_inf: the device flag "the
        global grad norm is not finite", which is set if any grad is (a grad a rank leaves out
        of the norm, such as a TP-replicated one, is an all-reduced copy of one that counts),
        so the kernel skips its own read-only check of the grads. step: AdamW's step number,
        a 1-element fp32 device tensor (default: the one after the steps taken)."""
        if isinstance(grad_scale, torch.Tensor):
            grad_scale = grad_scale.reshape(1)
        if found_inf is not None:
            found_inf = found_inf.reshape(1)
        step = (self._steps + 1).float() if step is None else step
        step = step.reshape(1)
        for pcs, tensors in self._kinds:
            groups = [self.param_groups[pc.group] for pc in pcs]  # lr changes every step
            multi_tensor_adamw_(
                **tensors,
                lr=[float(g["lr"]) for g in groups],
                beta1=[float(g["betas"][0]) for g in groups],
                beta2=[float(g["betas"][1]) for g in groups],
                eps=[float(g["eps"]) for g in groups],
                weight_decay=[float(g["weight_decay"]) for g in groups],
                step=step,
                grad_scale=grad_scale,
                check_finite=False,
                found_inf=found_inf,
            )

    def _after_step(self):
        pass

    def zero_grad(self, set_to_none=True):
        self.ddp.zero_grad_buffer()

    # -- checkpoints -------------------------------------------------------------------------
    def _pieces_state(self):
        """{name: [(start, end, numel, main, exp_avg, exp_avg_sq)]} of this rank's pieces.

        The tensors are views of the live state, as in torch.optim's state_dict: a copy here
        would double the state on its device (12 bytes per param at once). save_checkpoint
        moves them to the host chunk by chunk as it writes (checkpoint.to_host)."""
        out = {}
        for pc in self.pieces:
            out.setdefault(pc.name, []).append(
                (pc.start, pc.end, pc.param.numel(), pc.main, pc.exp_avg, pc.exp_avg_sq)
            )
        return out

    def state_dict(self):
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups]
        sd = {
            "step": self.step_count,
            "param_groups": groups,
            "sharded": self.sharded,
            "data_parallel_size": state.get().dp,
            "loss_scaler": self.scaler.state_dict() if self.scaler is not None else None,
        }
        if self.spike_filter is not None:
            sd["spike_filter"] = self.spike_filter.state_dict()
        if not self.sharded:
            sd["pieces"] = self._pieces_state()
        return sd

    @torch.no_grad()
    def load_state_dict(self, sd, read_shard=None):
        """sd: what state_dict() saved. read_shard(dp_rank) returns the sharded_state_dict()
        that DP rank saved (needed when sd came from a distributed optimizer)."""
        if "param_groups" not in sd or "step" not in sd:
            raise MegaliteError(
                "the checkpoint's optimizer state is not a megalite "
                "mixed-precision optimizer state; resume with --no-load-optim"
            )
        self.step_count = int(sd["step"])
        if self.scaler is not None and sd.get("loss_scaler"):
            self.scaler.load_state_dict(sd["loss_scaler"])
        if self.spike_filter is not None and sd.get("spike_filter"):
            self.spike_filter.load_state_dict(sd["spike_filter"])
        for g, saved in zip(self.param_groups, sd["param_groups"]):
            g.update(
                {k: v for k, v in saved.items() if k in ("lr", "betas", "eps", "weight_decay")}
            )
        if not sd["sharded"]:
            self._load_pieces([sd["pieces"]])
        else:
            if read_shard is None:
                raise MegaliteError(
                    "the checkpoint's optimizer state is sharded over DP ranks "
                    "but no shard files were given"
                )
            saved_dp = int(sd["data_parallel_size"])
            # Same DP size (and bucket layout): my own file covers my pieces. Otherwise
            # re-shard: open every DP rank's file of this stage and cut out my ranges (the
            # files are memory-mapped, so only the pages of those ranges are read).
            mine = state.get().dp_rank if saved_dp == state.get().dp else None
            if mine is None or not self._load_pieces([read_shard(mine)], partial_ok=True):
                self._load_pieces([read_shard(r) for r in range(saved_dp)])
        self._after_load()

    def _load_pieces(self, saved_list, partial_ok=False) -> bool:
        saved = {}
        for s in saved_list:
            for name, pieces in s.items():
                saved.setdefault(name, []).extend(pieces)
        fills = []
        for pc in self.pieces:
            parts = saved.get(pc.name)
            if parts is None or parts[0][2] != pc.param.numel():
                if partial_ok:
                    return False
                have = "missing" if parts is None else f"has {parts[0][2]} elements"
                raise MegaliteError(
                    f"the checkpoint's optimizer state for {pc.name} is {have} (this model: "
                    f"{pc.param.numel()}); the model changed: resume with --no-load-optim"
                )
            covered = 0
            for start, end, _, main, m, v in parts:
                a, z = max(start, pc.start), min(end, pc.end)
                if a < z:
                    fills.append((pc, a, z, start, main, m, v))
                    covered += z - a
            if covered != pc.numel:
                if partial_ok:
                    return False
                raise MegaliteError(
                    f"the checkpoint's optimizer state for {pc.name}[{pc.start}:{pc.end}] is "
                    f"incomplete ({covered} of {pc.numel} elements): an optimizer shard file "
                    f"is missing"
                )
        for pc, a, z, start, main, m, v in fills:
            dst = slice(a - pc.start, z - pc.start)
            src = slice(a - start, z - start)
            pc.main[dst].copy_(main[src])
            pc.exp_avg[dst].copy_(m[src])
            pc.exp_avg_sq[dst].copy_(v[src])
        return True

    def _after_load(self):
        for pc in self.pieces:  # model params <- main params (bf16 rounding)
            if pc.main is not pc.model:
                pc.model.copy_(pc.main)


def memory_footprint(ddp, optimizer) -> dict:
    """Bytes of real tensor storage per rank: params, grads, optimizer state (each storage
    counted once, in the first category that holds it)."""
    seen = set()

    def total(tensors):
        n = 0
        for t in tensors:
            s = t.untyped_storage()
            if s._cdata not in seen:  # the storage itself (a data_ptr is 0 on meta, or freed)
                seen.add(s._cdata)
                n += s.nbytes()
        return n

    params = total(ddp.param_tensors())
    grads = total(ddp.grad_tensors())
    opt = total([optimizer.main_flat, optimizer.exp_avg_flat, optimizer.exp_avg_sq_flat])
    return {"params": params, "grads": grads, "optimizer": opt, "total": params + grads + opt}
