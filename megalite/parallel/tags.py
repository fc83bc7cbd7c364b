"""What every parameter says about itself: one small frozen dataclass, `param.tag`.

The layers set it when they create a parameter; everything else reads it and nothing looks a
parameter up by name or by the model's config:

    init (layers.init_parameters)    `init`, `init_name`, and the partition to slice the full
                                     value drawn from (seed, name)
    grad norm (optim.grad_norm)      count a TP-replicated param on TP rank 0 only, the output
                                     copy of a tied embedding not at all, replicated key/value
                                     rows once (`group_layout`)
    grad sync (parallel.ddp)         sequence-parallel partial sums over TP, the tied
                                     embedding's two copies over the embedding group
    checkpoints                      the partition, to rebuild full tensors in any layout

Fields:
  partition_dim     the dim split over TP ranks, or None when every TP rank holds it whole
  partition_stride  k > 1 when the full tensor is k blocks along that dim (SwiGLU's
                    [gate; up]) and each rank holds its slice of every block, concatenated
  group_layout      (groups, split_rows, shared_rows) or None: the full tensor is `groups`
                    blocks of split_rows + shared_rows along the partition dim (the fused QKV
                    of grouped-query attention: per group, its query heads, then its key and
                    value heads). With TP <= groups each rank holds whole groups; with
                    TP > groups, TP/groups consecutive ranks share one group: each holds a
                    slice of its split rows and all of its shared rows (key/value heads
                    replicated), whose grads are summed over those ranks
  sequence_parallel each TP rank sees only part of the sequence, so the grad is a partial sum
                    to be all-reduced over TP before the optimizer step
  tied_embedding    "input": the word embedding of a model whose output layer reuses it;
                    "output": the last pipeline stage's copy of it (PP > 1). Their grads are
                    summed over the embedding group; only the input counts in the grad norm
  init              ("normal", std) | ("uniform", bound) | ("zeros",) | ("ones",)
  init_name         initialise as this parameter name instead of its own (the output copy of
                    a tied embedding starts equal to the input embedding)
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal, Optional

import torch


@dataclass(frozen=True)
class ParamTag:
    partition_dim: Optional[int] = None
    partition_stride: int = 1
    group_layout: Optional[tuple] = None
    sequence_parallel: bool = False
    tied_embedding: Optional[Literal["input", "output"]] = None
    init: tuple = ("normal", 0.02)
    init_name: Optional[str] = None

    @property
    def partition(self) -> tuple:
        """(dim, stride, group_layout): everything `layers.unshard` needs besides the shards."""
        return self.partition_dim, self.partition_stride, self.group_layout


DEFAULT = ParamTag()


def tag(param: torch.nn.Parameter, **fields) -> torch.nn.Parameter:
    """Set (or update) the tag of `param`; returns the param."""
    param.tag = replace(tag_of(param), **fields)
    return param


def tag_of(param) -> ParamTag:
    """The param's tag (an untagged param, such as a plain nn.Linear's, is replicated)."""
    return getattr(param, "tag", DEFAULT)
