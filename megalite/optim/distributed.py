"""The distributed optimizer (ZeRO-1): fp32 main params and AdamW moments sharded over DP.

Every DP rank keeps the whole model (bf16/fp16/fp32) and the whole fp32 grad buffer, but owns
only the r-th 1/DP of each grad bucket (DistributedDataParallel pads buckets to a multiple of
DP and, with this optimizer, reduce-scatters them so each rank receives exactly its shard,
summed). A step:

  1. the global grad norm over the shards (each shard counts once; summed over all ranks),
     which is also the inf/nan and spike check of MixedPrecisionOptimizer.step: global,
     so every rank skips a step alike,
  2. one fused AdamW pass over my shard: fp32 main params and moments updated, the new values
     written straight into my shard of the flat param buffer (in the model's dtype),
  3. one all-gather per bucket rebuilds every param in place from the DP ranks' shards; with
     --overlap-param-gather the gathers run in the background and the next forward waits for
     each bucket just before the first module that uses it.

Memory per param with bf16 params: 2 (param) + 4 (grad) + 12 / DP (main, m, v).

Checkpoints: each DP rank saves its own pieces (`sharded_state_dict`), keyed by parameter name
and element range. On load, a rank whose layout is unchanged reads only its own file; under
another DP size (or bucket size) each rank opens every shard file of its stage, memory-mapped,
and copies out only its new ranges (MixedPrecisionOptimizer.load_state_dict).
"""

from __future__ import annotations

import torch

from megalite.optim.grad_norm import sharded_grad_norm
from megalite.optim.mixed_precision import MixedPrecisionOptimizer


class DistributedOptimizer(MixedPrecisionOptimizer):
    sharded = True

    def _owned(self):
        """My 1/DP of every bucket, cut at param boundaries: (param, start, end)."""
        ddp = self.ddp
        for b in ddp.buckets:
            lo, hi = ddp.dp_rank * b.shard_size, (ddp.dp_rank + 1) * b.shard_size
            for p in b.params:
                s, e = b.offsets[p]
                a, z = max(s, lo), min(e, hi)
                if a < z:
                    yield p, a - s, z - s

    def grad_norm(self) -> torch.Tensor:
        if not hasattr(self, "_norm_pieces"):
            self._norm_pieces = [(pc.param, pc.grad, pc.start, pc.end) for pc in self.pieces]
        return sharded_grad_norm(self._norm_pieces)

    def _after_step(self):
        self.ddp.start_param_sync()  # in the background with --overlap-param-gather

    def _after_load(self):
        super()._after_load()
        self.ddp.start_param_sync(overlap=False)

    def sharded_state_dict(self):
        """This DP rank's pieces (what it alone owns), for its own checkpoint file: views of
        the live state, which save_checkpoint moves to the host as it writes."""
        return self._pieces_state()
