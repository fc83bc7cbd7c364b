"""A checkpoint of any layout, re-cut for a rank of another: TP x PP x VP x DP, either optimizer.

What a checkpoint holds makes this possible without knowing how it was laid out:
  - parameter names are global (`layers.5.mlp.linear_fc1.weight`) in every layout, so the
    stage that holds a name is found by looking (any PP size, any virtual-pipeline split);
  - each model shard records every tensor's partition over TP (dim, stride, group layout;
    parallel/tags.py), so the TP ranks' slices `unshard` into the full tensor;
  - the optimizer's state is keyed by parameter name and element range of the flattened
    TP-local parameter: whole params in the mp_rank file, or 1/DP pieces spread over the DP
    ranks' optim files (the distributed optimizer), so the local tensors are joined from
    whichever files hold them (any DP size).

A rank of the new layout takes the full weight, fp32 main param and both Adam moments of
each of its params, cuts them with `shard_of`, and hands the optimizer whole-param pieces,
which it cuts to the ranges it owns (any new DP size, either optimizer). The vocabulary's
padded rows (a multiple of 128 x TP) are cut or zero-filled: no token reads them, and their
logits are masked out of the loss, so they never get a grad.

Files are read through the caller's readers (checkpoint.py's: verified, memory-mapped), each
once, so a rank pages in only the bytes of the tensors it needs.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from megalite.errors import MegaliteError
from megalite.parallel.layers import shard_of, unshard
from megalite.parallel.tags import tag_of

# The optimizer's tensors per piece, in the order of its saved tuples
# (start, end, numel, main, exp_avg, exp_avg_sq).
OPTIMIZER_TENSORS = ("main", "exp_avg", "exp_avg_sq")
# Params with one row per (padded) vocabulary entry: the padding depends on TP.
VOCAB_ROWS = ("embedding.word_embeddings.weight", "output_layer.weight")


class SavedCheckpoint:
    """One iteration of a checkpoint, read tensor by tensor, as full (unsharded) tensors."""

    def __init__(
        self,
        directory: str,
        meta: dict,
        read_shard: Callable[[int, int], dict],
        read_optim: Callable[[int, int, int], dict],
    ):
        """read_shard(tp_rank, pp_rank): that rank's model shard file; read_optim(tp_rank,
        pp_rank, dp_rank): that rank's distributed-optimizer file."""
        self.directory, self._read_shard, self._read_optim = directory, read_shard, read_optim
        self.tp = meta["tensor_model_parallel_size"]
        self.pp = meta["pipeline_model_parallel_size"]
        self._files = {}
        self.stage_of = {}  # name -> the PP rank whose shard holds it
        for pp_rank in range(self.pp):
            for name in self.shard(0, pp_rank)["model"]:
                self.stage_of.setdefault(name, pp_rank)
        # What every rank saved alike: step count, LR groups, loss scaler, spike filter
        # (None for a weights-only checkpoint, such as an imported model).
        self.optimizer: Optional[dict] = self.shard(0, 0).get("optimizer")

    def _file(self, read, *ranks):
        if (read, ranks) not in self._files:
            self._files[read, ranks] = read(*ranks)
        return self._files[read, ranks]

    def shard(self, tp_rank, pp_rank) -> dict:
        return self._file(self._read_shard, tp_rank, pp_rank)

    def _local(self, name: str, kind: str, tp_rank: int) -> torch.Tensor:
        """TP rank tp_rank's slice of `name`: the weight, or an optimizer tensor joined from
        the pieces every DP rank saved."""
        pp_rank = self.stage_of[name]
        shard = self.shard(tp_rank, pp_rank)
        weight = shard["model"][name]
        if kind == "weight":
            return weight
        opt = shard["optimizer"]
        if opt["sharded"]:
            dp = int(opt["data_parallel_size"])
            sources = [self._file(self._read_optim, tp_rank, pp_rank, r) for r in range(dp)]
        else:
            sources = [opt["pieces"]]
        at = 3 + OPTIMIZER_TENSORS.index(kind)
        flat, covered = torch.empty(weight.numel(), dtype=torch.float32), 0
        for source in sources:
            for piece in source.get(name, ()):
                start, end = piece[0], piece[1]
                flat[start:end] = piece[at]
                covered += end - start
        if covered != weight.numel():
            raise MegaliteError(
                f"checkpoint {self.directory}: the optimizer state of {name} on TP rank "
                f"{tp_rank} covers {covered} of {weight.numel()} elements (an optimizer shard "
                f"file is missing); resume with --no-load-optim"
            )
        return flat.view(weight.shape)

    def full(self, name: str, kind: str = "weight") -> torch.Tensor:
        """The full tensor of `name`: kind "weight", or one of OPTIMIZER_TENSORS."""
        parts = [self._local(name, kind, t) for t in range(self.tp)]
        partition = self.shard(0, self.stage_of[name])["partition"].get(name, (None, 1, None))
        return unshard(parts, *partition)

    def rank_state(self, params: dict, tp: int, tp_rank: int, with_optimizer: bool = True):
        """For rank tp_rank of a TP-`tp` layout holding `params` ({name: param}, live or on
        the meta device): (model, pieces): model {name: its weight slice}, and pieces
        {name: [(0, n, n, main, exp_avg, exp_avg_sq)]} of whole slices for
        MixedPrecisionOptimizer.load_state_dict (None without optimizer state)."""
        with_optimizer = with_optimizer and self.optimizer is not None
        model, pieces = {}, {} if with_optimizer else None
        for name, p in params.items():
            # the last stage's copy of a tied embedding (PP > 1) is the embedding itself
            source = name if name in self.stage_of else tag_of(p).init_name
            if source not in self.stage_of:
                raise MegaliteError(
                    f"checkpoint {self.directory} lacks {name}: it was saved by another model "
                    f"shape; load it with the settings it was trained with"
                )
            want = _full_shape(p, tp)

            def cut(kind):
                full = _fit(self.full(source, kind), want, source, self.directory)
                return shard_of(full, p, tp, tp_rank).contiguous()

            model[name] = cut("weight").to(p.dtype)
            if with_optimizer:
                main, m, v = (cut(k).view(-1) for k in OPTIMIZER_TENSORS)
                pieces[name] = [(0, main.numel(), main.numel(), main, m, v)]
        return model, pieces

    def check_model(self, num_layers: int) -> None:
        """The saved model has `num_layers` layers (a name missing from it is caught per
        param by rank_state; a layer it has beyond this model's would be dropped silently)."""
        saved = {n.split(".")[1] for n in self.stage_of if n.startswith("layers.")}
        if len(saved) != num_layers:
            raise MegaliteError(
                f"checkpoint {self.directory} has {len(saved)} layers, this model "
                f"{num_layers}; load it with the settings it was trained with"
            )


def _full_shape(param, tp: int) -> torch.Size:
    """The full shape of a param whose TP-local slice is param (under a TP-`tp` layout)."""
    local = torch.empty(param.shape, device="meta")
    return unshard([local] * tp, *tag_of(param).partition).shape


def _fit(full: torch.Tensor, want: torch.Size, name: str, where: str) -> torch.Tensor:
    """full, with the vocabulary's padding rows cut or zero-filled to `want` (TP changed)."""
    if full.shape == want:
        return full
    if name in VOCAB_ROWS and full.shape[1:] == want[1:]:
        if want[0] < full.shape[0]:
            return full[: want[0]]
        return torch.cat([full, full.new_zeros(want[0] - full.shape[0], *want[1:])])
    raise MegaliteError(
        f"checkpoint {where} holds {name} as {list(full.shape)}, this model as {list(want)}: "
        f"it was saved by another model shape; load it with the settings it was trained with"
    )
