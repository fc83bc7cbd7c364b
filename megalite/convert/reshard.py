"""`tools/convert.py reshard`: a checkpoint re-cut offline for another TP x PP x VP layout.

What a run does on resume under another layout (training/reshard.py), done once, in one
process, and written as a checkpoint of the new layout: weights, fp32 main params, both Adam
moments, step count, loss scaler, iteration and consumed samples. The optimizer state goes
into the model shards whole (as a run without --use-distributed-optimizer saves it), which a
run of any DP size, with either optimizer, cuts to its own ranges. RNG states are kept when
the layout is unchanged; otherwise a resumed run re-seeds and says so.
"""

from __future__ import annotations

from typing import Optional

from megalite.config import Config
from megalite.convert.pretrained import real_vocab_size
from megalite.errors import MegaliteError
from megalite.layout import padded_vocab_size
from megalite.model.gpt import rank_parameters
from megalite.training import checkpoint as ckpt


def reshard_checkpoint(
    load_dir: str, save_dir: str, settings: dict, iteration: Optional[int] = None
) -> tuple:
    """Write iteration `iteration` (default: the latest) of load_dir under save_dir at the
    layout `settings` asks for (parallel-section keys such as tensor_model_parallel_size).
    Returns (directory written, its Config)."""
    it = ckpt.latest_iteration(load_dir) if iteration is None else iteration
    if it is None:
        raise MegaliteError(f"{load_dir} holds no checkpoint ({ckpt.LATEST} is missing)")
    meta = ckpt.read_metadata(load_dir, it)
    d = dict(meta["config"])
    d["parallel"] = {**d.get("parallel", {}), **settings}
    p = d["parallel"]
    tp, pp = p.get("tensor_model_parallel_size", 1), p.get("pipeline_model_parallel_size", 1)
    cfg = Config.from_dict(dict(d, world_size=tp * pp))
    saved = ckpt.saved_checkpoint(load_dir, it)
    saved.check_model(cfg.model.num_layers)
    padded_before = saved.full("embedding.word_embeddings.weight").shape[0]
    m = cfg.model
    padded = padded_vocab_size(
        real_vocab_size(cfg, padded_before), m.make_vocab_size_divisible_by, tp
    )
    same_layout = ckpt._layout_of(meta) == (tp, cfg.pipeline_layout())

    def rank_params(tp_rank, pp_rank):
        return rank_parameters(cfg, padded, tp_rank, pp_rank)

    def rank_shard(tp_rank, pp_rank):
        model, pieces = saved.rank_state(rank_params(tp_rank, pp_rank), tp, tp_rank)
        out = {"model": model}
        if saved.optimizer is not None:
            out["optimizer"] = dict(saved.optimizer, sharded=False, pieces=pieces)
        rng = saved.shard(tp_rank, pp_rank).get("rng") if same_layout else None
        if rng is not None:
            out["rng"] = rng
        return out

    where = ckpt.write_checkpoint(
        cfg, rank_params, rank_shard, save_dir, meta["iteration"], meta["consumed_samples"]
    )
    return where, cfg
