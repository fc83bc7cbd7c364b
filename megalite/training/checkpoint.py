"""Checkpoints that survive a crash and resume exactly.

    {dir}/iter_0000200/metadata.json                  iteration, layout, config (rank 0)
    {dir}/iter_0000200/mp_rank_{tp:02d}_{pp:03d}.pt   model shard, optimizer, RNG (DP rank 0)
    {dir}/iter_0000200/optim_tp{tp:02d}_pp{pp:03d}_dp{dp:03d}.pt
                                                      distributed optimizer: each DP rank's
                                                      own shard of main params and moments
    {dir}/latest_checkpointed_iteration.txt           written last

Every rank writes into `iter_0000200.tmp`; after a barrier rank 0 renames it to
`iter_0000200` and then replaces the `latest` file (temporary name, fsync, rename). A crash at
any point leaves the previous latest checkpoint untouched and pointed to.

Each shard stores, per tensor, the dim and stride along which it is split over TP ranks, so a
tool can rebuild the full tensor (`load_full_model_state`) and re-split it for another layout.
"""

from __future__ import annotations

import json
import os
import shutil

import torch
import torch.distributed as dist

from megalite.errors import MegaliteError
from megalite.parallel import state
from megalite.parallel import layers
from megalite.parallel.layers import unshard

LATEST = "latest_checkpointed_iteration.txt"


def iter_dir(root, iteration):
    return os.path.join(root, f"iter_{iteration:07d}")


def shard_name(tp_rank, pp_rank):
    return f"mp_rank_{tp_rank:02d}_{pp_rank:03d}.pt"


def optim_shard_name(tp_rank, pp_rank, dp_rank):
    return f"optim_tp{tp_rank:02d}_pp{pp_rank:03d}_dp{dp_rank:03d}.pt"


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def _fsync_write(path, data: bytes):
    tmp = path + ".tmp"
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def partition_info(model):
    """name -> (dim, stride, group_layout): what `unshard` needs to rebuild the full tensor."""
    return {n: layers.partition_info(p) for n, p in model.named_parameters()}


def save_checkpoint(root, iteration, model, optimizer, schedule, loss_scaler, consumed_samples,
                    cfg, rng_state, keep_last=None):
    st = state.get()
    final = iter_dir(root, iteration)
    tmp = final + ".tmp"
    if st.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # a crashed earlier attempt
        os.makedirs(tmp)
    _barrier()
    if st.dp_rank == 0:
        shard = {
            "iteration": iteration,
            "consumed_samples": consumed_samples,
            "model": model.state_dict(),
            "partition": partition_info(model),
            "param_names": [n for n, _ in model.named_parameters()],
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "schedule": schedule.state_dict() if schedule is not None else None,
            "loss_scaler": loss_scaler.state_dict() if loss_scaler is not None else None,
            "rng": rng_state,
        }
        path = os.path.join(tmp, shard_name(st.tp_rank, st.pp_rank))
        with open(path, "wb") as fh:
            torch.save(shard, fh)
            fh.flush()
            os.fsync(fh.fileno())
    if getattr(optimizer, "sharded", False):
        # ZeRO-1: no rank holds the whole optimizer state; each saves the pieces it owns
        # (keyed by parameter name and element range, so they can be re-cut on load).
        path = os.path.join(tmp, optim_shard_name(st.tp_rank, st.pp_rank, st.dp_rank))
        with open(path, "wb") as fh:
            torch.save(optimizer.sharded_state_dict(), fh)
            fh.flush()
            os.fsync(fh.fileno())
    if st.rank == 0:
        meta = {"iteration": iteration, "consumed_samples": consumed_samples,
                "tensor_model_parallel_size": st.tp, "pipeline_model_parallel_size": st.pp,
                "data_parallel_size": st.dp, "config": cfg.to_dict()}
        _fsync_write(os.path.join(tmp, "metadata.json"), json.dumps(meta, indent=1).encode())
    _barrier()
    if st.rank == 0:
        if os.path.exists(final):  # the same iteration saved again (after a resume)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        _fsync_write(os.path.join(root, LATEST), f"{iteration}\n".encode())
        _fsync_dir(root)
        if keep_last:
            for old in list_iterations(root)[:-keep_last]:
                shutil.rmtree(iter_dir(root, old), ignore_errors=True)
    _barrier()


def list_iterations(root):
    its = []
    for name in os.listdir(root) if os.path.isdir(root) else []:
        if name.startswith("iter_") and name[5:].isdigit():
            its.append(int(name[5:]))
    return sorted(its)


def latest_iteration(root):
    """The iteration `latest` points to, or None when `root` holds no checkpoint."""
    path = os.path.join(root, LATEST)
    if not os.path.exists(path):
        return None
    text = open(path).read().strip()
    if not text.isdigit():
        raise MegaliteError(f"{path} is corrupt (holds {text[:40]!r}, not an iteration number); "
                            f"write the iteration of a complete iter_* directory into it")
    it = int(text)
    if not os.path.isdir(iter_dir(root, it)):
        raise MegaliteError(f"{path} points to iteration {it} but {iter_dir(root, it)} is "
                            f"missing; point it at one of {list_iterations(root) or 'none'}")
    return it


def read_metadata(root, iteration):
    path = os.path.join(iter_dir(root, iteration), "metadata.json")
    try:
        with open(path) as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise MegaliteError(f"checkpoint {iter_dir(root, iteration)} has no metadata.json: it "
                            f"is incomplete; point {LATEST} at an earlier iteration")
    except json.JSONDecodeError as e:
        raise MegaliteError(f"checkpoint file {path} is corrupt ({e.msg}); point {LATEST} at an "
                            f"earlier iteration")


def read_shard(root, iteration, tp_rank, pp_rank):
    return _load(os.path.join(iter_dir(root, iteration), shard_name(tp_rank, pp_rank)),
                 "checkpoint shard")


def optimizer_shard_reader(root, iteration):
    """read(dp_rank) -> the optimizer shard that DP rank of my (TP, PP) position saved."""
    st = state.get()

    def read(dp_rank):
        path = os.path.join(iter_dir(root, iteration),
                            optim_shard_name(st.tp_rank, st.pp_rank, dp_rank))
        return _load(path, "the distributed optimizer's shard", " (or resume with --no-load-optim)")
    return read


def _load(path, what, hint=""):
    if not os.path.exists(path):
        raise MegaliteError(f"{what} {path} is missing; the checkpoint is incomplete: point "
                            f"{LATEST} at an earlier iteration{hint}")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a truncated or overwritten file surfaces as many error types
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise MegaliteError(f"checkpoint file {path} is corrupt or truncated ({first[:120]}); "
                            f"point {LATEST} at an earlier iteration")


def load_checkpoint(root):
    """This rank's shard and the metadata of the latest checkpoint in `root`, or None."""
    st = state.get()
    if not os.path.isdir(root):
        return None
    it = latest_iteration(root)
    if it is None:
        return None
    meta = read_metadata(root, it)
    saved = (meta["tensor_model_parallel_size"], meta["pipeline_model_parallel_size"])
    if saved != (st.tp, st.pp):
        raise MegaliteError(
            f"checkpoint {iter_dir(root, it)} was saved with tensor-parallel {saved[0]} x "
            f"pipeline-parallel {saved[1]}, this run uses {st.tp} x {st.pp}; run with the "
            f"saved sizes")
    return meta, read_shard(root, it, st.tp_rank, st.pp_rank)


def load_full_model_state(root, iteration=None):
    """The full (unsharded) model state dict of a checkpoint of any layout, and its metadata."""
    it = latest_iteration(root) if iteration is None else iteration
    if it is None:
        raise MegaliteError(f"{root} holds no checkpoint ({LATEST} is missing)")
    meta = read_metadata(root, it)
    tp, pp = meta["tensor_model_parallel_size"], meta["pipeline_model_parallel_size"]
    full = {}
    for pp_rank in range(pp):
        shards = [read_shard(root, it, t, pp_rank) for t in range(tp)]
        for name in shards[0]["model"]:
            info = shards[0]["partition"].get(name, (None, 1))
            if name in full:  # the last stage's copy of a tied embedding
                continue
            full[name] = unshard([s["model"][name] for s in shards], *info)
    return full, meta
