"""Checkpoints that survive a crash and resume exactly.

    {dir}/iter_0000200/metadata.json                  iteration, layout, config (rank 0)
    {dir}/iter_0000200/mp_rank_{tp:02d}_{pp:03d}.pt   model shard, optimizer, RNG (DP rank 0)
    {dir}/iter_0000200/optim_tp{tp:02d}_pp{pp:03d}_dp{dp:03d}.pt
                                                      distributed optimizer: each DP rank's
                                                      own shard of main params and moments
    {dir}/latest_checkpointed_iteration.txt           written last

Every rank writes into `iter_0000200.tmp`; once every rank has written its files (all-reduced:
a rank that failed, say on a full disk, fails the save on every rank, and the partial directory
is deleted), rank 0 renames it to `iter_0000200` and then replaces the `latest` file
(temporary name, fsync, rename). A crash at any point, kill -9 included, leaves `latest`
pointing to a complete checkpoint: it is replaced only after the directory it names is
complete, and every directory that is not yet (or no longer) complete has a `.tmp` name.
Re-saving an iteration moves the old directory aside (`iter_0000200.old.tmp`) before the new
one takes its name; `recover` (rank 0, at every save and load) puts it back if a crash fell
between the two renames, and deletes the leftovers of crashed saves.

Each shard stores, per tensor, the dim and stride along which it is split over TP ranks, so a
tool can rebuild the full tensor (`load_full_model_state`) and re-split it for another layout.

`save_checkpoint` and `load_checkpoint` are mirror images: what one writes (weights of this
rank's model chunks, the optimizer's state with its loss scaler, RNG states, the iteration and
consumed samples) the other puts back. The formats are in docs/ARCHITECTURE.md.

A save is two steps: `snapshot` (the objects this rank's files hold; no collective, no file)
and `write` (the files, the agreement that all were written, metadata.json, `latest`). A
synchronous save runs both on the main thread, straight from the live state. --async-save
(`BackgroundSaves`) copies the state into host memory in the snapshot (`HostCopies`), which is
all the training loop waits for, and runs the write in a thread, over a process group of its
own.

Safety: every file loads with torch.load(weights_only=True), so it holds only tensors and
plain values (the RNG states too, see parallel/random.py); a file whose pickle names anything
else (code to run on loading) is refused in one line. metadata.json records each file's size
and sha256, taken as the file is written; a load checks both before it opens the file, so a
flipped or truncated byte names the file instead of loading garbage.

Memory: a save takes no memory on the state's device (`to_host`: GPU tensors go to the host in
chunks through one pinned buffer; CPU tensors are written in place). A load memory-maps each
file on the CPU (`_load`), so a rank reads from disk only the bytes it copies into its own
state.
"""

from __future__ import annotations

import datetime
import ctypes
import hashlib
import json
import os
import pickle
import shutil
import threading
import time
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist

from megalite.config import Config
from megalite.errors import MegaliteError
from megalite.parallel import random as prandom
from megalite.parallel import state
from megalite.parallel.layers import shard_of, unshard
from megalite.parallel.tags import tag_of
from megalite.training.reshard import SavedCheckpoint

LATEST = "latest_checkpointed_iteration.txt"


def iter_dir(root, iteration):
    return os.path.join(root, f"iter_{iteration:07d}")


def shard_name(tp_rank, pp_rank):
    return f"mp_rank_{tp_rank:02d}_{pp_rank:03d}.pt"


def optim_shard_name(tp_rank, pp_rank, dp_rank):
    return f"optim_tp{tp_rank:02d}_pp{pp_rank:03d}_dp{dp_rank:03d}.pt"


# The save's collectives run over `group`: None, the default group (a save on the main thread),
# or a background save's own gloo group (`BackgroundSaves`), whose tensors live on the CPU.


def _barrier(group=None):
    if dist.is_initialized():
        dist.barrier(group=group)


def _on_every_rank(value: float, op, group=None) -> float:
    """`value` reduced over all ranks with `op` (a dist.ReduceOp); itself in one process."""
    if not dist.is_initialized():
        return value
    device = state.get().device if group is None else torch.device("cpu")
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op, group=group)
    return float(t.item())


class SaveFailed(MegaliteError):
    """A checkpoint could not be written (a full disk, a quota, a vanished directory); the
    previous checkpoint is intact and `latest` still names it."""


def recover(root) -> None:
    """Undo what a crash in the middle of a save left behind (rank 0 alone, before a barrier):
    an old directory moved aside for a re-save goes back if its replacement never arrived;
    partial saves (`iter_*.tmp`), directories being deleted and a half-written `latest` go."""
    if not os.path.isdir(root):
        return
    try:
        for name in sorted(os.listdir(root)):
            path = os.path.join(root, name)
            if name.endswith(".old.tmp"):
                final = path[: -len(".old.tmp")]
                if os.path.isdir(final):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    os.replace(path, final)
            elif name.endswith(".tmp"):
                if os.path.isdir(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    os.remove(path)
        _fsync_dir(root)
    except OSError:  # a read-only --load (someone else's checkpoint): nothing to tidy there
        pass


def _nbytes(obj) -> int:
    """Bytes of the tensors in obj (what writing it will take, give or take the pickle)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


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


# -- tensors to the host, with no copy on their device ------------------------------------------

STAGING_BYTES = 64 << 20  # the most of a GPU tensor copied at once
_staging = None  # the pinned buffer those copies go through: made on the first GPU save, reused


def to_host(t: torch.Tensor) -> torch.Tensor:
    """`t` as a CPU tensor of its own bytes for torch.save, taking no memory on t's device.

    CUDA: copied in STAGING_BYTES chunks into one pinned buffer and from it into a pageable
    host tensor. A clone on the GPU would add the whole state at once (12 bytes per param for
    the main params and moments); pinning the destination would lock the state's size of host
    memory; copying straight into pageable memory runs well below the PCIe bandwidth.
    CPU: no copy. Saving the live tensor is safe because save_checkpoint writes the file before
    the training loop takes its next step (an async save's snapshot has copied it already).
    Only the storage is narrowed to the tensor's own bytes (sharing them): torch.save writes
    a view's whole storage, so a piece of a flat buffer (a ZeRO-1 shard's fp32 main params are
    views into the whole param buffer) would otherwise put the whole buffer into every file
    that holds a piece of it.
    """
    global _staging
    t = t.detach().contiguous()  # the saved state is contiguous: this copies nothing
    nbytes = t.numel() * t.element_size()
    if t.device.type == "cpu":
        start = t.storage_offset() * t.element_size()
        if start == 0 and t.untyped_storage().nbytes() == nbytes:
            return t
        own = t.untyped_storage()[start : start + nbytes]  # a storage over the same memory
        return torch.empty(0, dtype=t.dtype).set_(own, 0, t.shape)
    if _staging is None or _staging.numel() < STAGING_BYTES:
        _staging = torch.empty(STAGING_BYTES, dtype=torch.uint8, pin_memory=True)
    host = torch.empty(t.shape, dtype=t.dtype)
    src, dst = t.view(-1).view(torch.uint8), host.view(-1).view(torch.uint8)
    for at in range(0, nbytes, STAGING_BYTES):
        n = min(STAGING_BYTES, nbytes - at)
        _staging[:n].copy_(src[at : at + n])  # blocking: the bytes are on the host on return
        dst[at : at + n].copy_(_staging[:n])
    return host


def _on_host(obj):
    """obj (dicts, lists and tuples of tensors and plain values) with every tensor to_host."""
    if isinstance(obj, torch.Tensor):
        return to_host(obj)
    if isinstance(obj, dict):
        return {k: _on_host(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_on_host(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_on_host(v) for v in obj)
    return obj


class HostCopies:
    """Host memory that an async save's snapshot copies the state into, kept from one save to
    the next. The state's shapes never change, so every save after the first copies into the
    same buffers: no fresh memory to page-fault in (which would take longer than the copy),
    nothing asked of the allocator. The price: the rank's state held once more on the host
    for the whole run. On CUDA the buffers are pinned, so the copies run at the link's speed,
    queued at once, with one wait for them all.

    One buffer per storage, in the order the snapshot meets them (the buffer is reused when
    its size matches), to give the files what the synchronous save writes: a tensor over its
    whole storage keeps sharing it with the other tensors over it (an fp32 param and its main
    param are one storage, which torch.save writes once), a view into a larger buffer (a
    ZeRO-1 shard's main params in the flat param buffer) gets a buffer of its own bytes, as
    `to_host` narrows it."""

    def __init__(self):
        self.buffers = []  # uint8 tensors

    def copy(self, obj):
        """obj (dicts, lists and tuples of tensors and plain values) with every tensor copied
        into these buffers; the copies are complete on return."""
        self._used, self._shared, self._cuda = 0, {}, False
        out = self._copy(obj)
        if self._cuda:
            torch.cuda.current_stream().synchronize()
        del self.buffers[self._used :]  # the state shrank (it never does): let the rest go
        return out

    def _copy(self, obj):
        if isinstance(obj, torch.Tensor):
            return self._tensor(obj)
        if isinstance(obj, dict):
            return {k: self._copy(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [self._copy(v) for v in obj]
        if isinstance(obj, tuple):
            return tuple(self._copy(v) for v in obj)
        return obj

    def _tensor(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach().contiguous()  # the saved state is contiguous: this copies nothing
        nbytes = t.numel() * t.element_size()
        whole = t.storage_offset() == 0 and t.untyped_storage().nbytes() == nbytes
        key = (t.device, t.data_ptr(), nbytes) if whole else None
        buf = self._shared.get(key) if whole else None
        if buf is None:
            buf = self._buffer(nbytes, pinned=t.is_cuda)
            src = t.view(-1).view(torch.uint8)
            if t.is_cuda:
                buf.copy_(src, non_blocking=True)
                self._cuda = True
            else:
                # One thread's memcpy: Tensor.copy_ splits a copy over the OpenMP threads and
                # waits for the slowest, and on a machine with more busy threads than cores
                # (a run whose background write is going on) that wait is most of the copy.
                # (ctypes, not numpy: a numpy view of the source would make its storage
                # non-resizable for good, and ZeRO-3 frees its params by resizing.)
                ctypes.memmove(buf.data_ptr(), src.data_ptr(), nbytes)
            if whole:
                self._shared[key] = buf
        return buf.view(t.dtype).view(t.shape)

    def _buffer(self, nbytes: int, pinned: bool) -> torch.Tensor:
        i, self._used = self._used, self._used + 1
        if i < len(self.buffers) and self.buffers[i].numel() == nbytes:
            return self.buffers[i]
        buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
        self.buffers[i : i + 1] = [buf]
        return buf


class _HashingWriter:
    """A file opened for writing that hashes the bytes passing through it: a file's checksum
    costs no second read. (torch.save writes its zip archive sequentially.)"""

    def __init__(self, fh):
        self.fh, self.sha256 = fh, hashlib.sha256()
        self.name = fh.name  # like the file it wraps (what a reader of f.name expects)

    def write(self, data):
        self.sha256.update(data)
        return self.fh.write(data)

    def flush(self):
        self.fh.flush()


def _torch_save_fsync(obj, path) -> dict:
    """Every checkpoint file is written here, its tensors first moved to the host (so no
    tensor in a file can come from anywhere else). Returns the file's record for
    metadata.json: {"bytes": its size, "sha256": its checksum}."""
    obj = _on_host(obj)
    with open(path, "wb") as fh:
        writer = _HashingWriter(fh)
        torch.save(obj, writer)
        fh.flush()
        os.fsync(fh.fileno())
        return {"bytes": os.fstat(fh.fileno()).st_size, "sha256": writer.sha256.hexdigest()}


def _metadata(cfg, iteration, consumed_samples, tp, pp, dp) -> dict:
    return {
        "iteration": iteration,
        "consumed_samples": consumed_samples,
        "tensor_model_parallel_size": tp,
        "pipeline_model_parallel_size": pp,
        "data_parallel_size": dp,
        "config": cfg.to_dict(),
    }


def _write_metadata(directory, meta: dict, files: dict) -> None:
    """metadata.json, written last into a checkpoint directory: meta plus `files`, the record
    of every other file in it ({name: {"bytes", "sha256"}}) that a load verifies."""
    meta = dict(meta, files=dict(sorted(files.items())))
    _fsync_write(os.path.join(directory, "metadata.json"), json.dumps(meta, indent=1).encode())


def _records_on_rank0(records: dict, group=None) -> dict:
    """The union of every rank's file records, on rank 0 (the others get {})."""
    if not dist.is_initialized():
        return records
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(records, gathered, dst=0, group=group)
    return {k: v for r in gathered or [] for k, v in r.items()}


def model_state_dict(chunks) -> dict:
    """This rank's weights: the union of its model chunks' state dicts (their names are
    global, `layers.5.mlp...`, so they never collide and any layout has the same names)."""
    return {k: v for chunk in chunks for k, v in chunk.state_dict().items()}


def saved_weights(chunks) -> dict:
    """What a checkpoint stores of the model: every weight, or with LoRA (a frozen base)
    the trainable adapters alone, the base being named in metadata.json (`lora_base`)."""
    weights = model_state_dict(chunks)
    trainable = {n for c in chunks for n, p in c.named_parameters() if p.requires_grad}
    if getattr(chunks[0], "lora_base", None) is None or len(trainable) == len(weights):
        return weights
    return {k: v for k, v in weights.items() if k in trainable}


def _load_model_state(chunks, saved: dict, where: str, names=None) -> None:
    """Copy `saved` into the chunks' weights: all of them, or those in `names` (LoRA: the
    frozen base, or the adapters), each of which it must hold, and nothing else."""
    mine = model_state_dict(chunks)
    if names is not None:
        mine = {k: v for k, v in mine.items() if k in names}
    missing = [k for k in mine if k not in saved]
    extra = [k for k in saved if k not in mine]
    if missing or extra:
        what = f"lacks {missing[0]}" if missing else f"has {extra[0]}, which this model lacks"
        raise MegaliteError(
            f"checkpoint {where} {what}: it was saved by another model "
            f"shape; load it with the settings it was trained with"
        )
    for chunk in chunks:
        mine = {k for k in chunk.state_dict() if names is None or k in names}
        chunk.load_state_dict({k: saved[k] for k in mine}, strict=names is None)


# -- saving: a snapshot, then the write ----------------------------------------------------------


@dataclass
class Snapshot:
    """A checkpoint between the two steps of its save: what this rank's files hold."""

    root: str  # --save
    iteration: int
    files: list  # (file name, object) this rank writes
    meta: dict  # rank 0: metadata.json's fields but `files` (the others: {})
    keep_last: Optional[int]


def snapshot(cfg, iteration, consumed_samples, chunks, optimizer, copies=None) -> Snapshot:
    """Step 1 of a save, on the main thread: the objects this rank's files hold, with no
    collective and no file touched. copies=None: views of the live state, for a write that
    ends before the next step (a synchronous save). A HostCopies: every tensor copied into
    its host memory, so that training can go on while the files are written (--async-save)."""
    st = state.get()
    files = []
    if st.dp_rank == 0:
        shard = {
            "iteration": iteration,
            "consumed_samples": consumed_samples,
            "model": (weights := saved_weights(chunks)),
            "partition": {
                n: tag_of(p).partition
                for c in chunks
                for n, p in c.named_parameters()
                if n in weights
            },
            "optimizer": optimizer.state_dict(),
            "rng": prandom.get_rng_state(),
        }
        files.append((shard_name(st.tp_rank, st.pp_rank), shard))
    if optimizer.sharded:
        # ZeRO-1: no rank holds the whole optimizer state; each saves the pieces it owns
        # (keyed by parameter name and element range, so they can be re-cut on load).
        name = optim_shard_name(st.tp_rank, st.pp_rank, st.dp_rank)
        files.append((name, optimizer.sharded_state_dict()))
    if copies is not None:
        files = copies.copy(files)
    meta = {}
    if st.rank == 0:
        meta = _metadata(cfg, iteration, consumed_samples, st.tp, st.pp, st.dp)
        if getattr(chunks[0], "lora_base", None) is not None:
            meta["lora_base"] = chunks[0].lora_base  # the frozen weights these adapters need
    ck = cfg.checkpoint
    return Snapshot(ck.save, iteration, files, meta, ck.keep_last)


def write(snap: Snapshot, group=None) -> str:
    """Step 2 of a save (every rank; collective over `group`, None for the default group):
    the files, the agreement that every rank wrote its own, metadata.json, then `latest`.
    Returns the checkpoint's directory. Raises SaveFailed (on every rank alike) when any rank
    could not write its files."""
    st, root, iteration = state.get(), snap.root, snap.iteration
    final = iter_dir(root, iteration)
    tmp = final + ".tmp"
    if st.rank == 0:
        os.makedirs(root, exist_ok=True)
        recover(root)  # also removes a crashed earlier attempt at this very iteration
        os.makedirs(tmp)
    _barrier(group)
    failure, records = None, {}
    try:
        for name, obj in snap.files:
            records[name] = _torch_save_fsync(obj, os.path.join(tmp, name))
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as RuntimeError
        failure = e
    my_bytes = sum(_nbytes(o) for _, o in snap.files)
    _check_written(failure, root, tmp, iteration, my_bytes, group)
    records = _records_on_rank0(records, group)  # every rank wrote its files: rank 0 records them
    if st.rank == 0:
        try:
            _write_metadata(tmp, snap.meta, records)
            _publish(root, tmp, final, iteration, snap.keep_last)
        except OSError as e:
            failure = e
    _check_written(failure, root, tmp, iteration, my_bytes, group)
    return final


def save_checkpoint(cfg, iteration, consumed_samples, chunks, optimizer) -> str:
    """Write iteration `iteration` under --save (every rank calls it); returns its directory.
    Raises SaveFailed (on every rank alike) when any rank could not write its files. The
    synchronous save: both steps on this thread, the files straight from the live state."""
    return write(snapshot(cfg, iteration, consumed_samples, chunks, optimizer))


def _check_written(failure, root, tmp, iteration, my_bytes, group=None) -> None:
    """Collective: if any rank's writes failed, delete the partial directory (freeing what it
    took) and raise SaveFailed on every rank, with the size the whole checkpoint needs."""
    if _on_every_rank(failure is not None, dist.ReduceOp.MAX, group) == 0:
        return
    needed = _on_every_rank(my_bytes, dist.ReduceOp.SUM, group)
    if state.get().rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        recover(root)  # a re-saved iteration moved aside goes back
    _barrier(group)
    prev = latest_iteration(root) if os.path.exists(os.path.join(root, LATEST)) else None
    kept = f"{iter_dir(root, prev)} is intact" if prev is not None else "no earlier checkpoint"
    if failure is None:
        what = "another rank could not write its part"
    else:
        where = getattr(failure, "filename", None) or tmp
        reason = getattr(failure, "strerror", None) or str(failure).splitlines()[0][:160]
        what = f"writing {where} failed: {reason}"
    free = shutil.disk_usage(root).free if os.path.isdir(root) else 0
    raise SaveFailed(
        f"checkpoint of iteration {iteration} not saved: {what} (the checkpoint needs about "
        f"{needed / 2**20:.1f} MiB, {free / 2**20:.1f} MiB are free under {root}); {kept}; "
        f"free space or point --save elsewhere (--save-failure continue keeps training)"
    )


def _publish(root, tmp, final, iteration, keep_last) -> None:
    """Rank 0: the complete `tmp` becomes `final`, then `latest` names it. An iteration saved
    again (a run resumed from elsewhere into this directory) moves the old one aside first,
    so a crash between the renames leaves it for `recover` to put back."""
    if os.path.exists(final):
        os.replace(final, final + ".old.tmp")
    os.replace(tmp, final)
    _fsync_dir(root)
    _fsync_write(os.path.join(root, LATEST), f"{iteration}\n".encode())
    _fsync_dir(root)
    shutil.rmtree(final + ".old.tmp", ignore_errors=True)
    if keep_last:
        for old in list_iterations(root)[:-keep_last]:
            # renamed before deleting: a crash mid-delete leaves a .tmp for recover, never a
            # half-deleted iter_* directory
            doomed = iter_dir(root, old) + ".del.tmp"
            os.replace(iter_dir(root, old), doomed)
            shutil.rmtree(doomed, ignore_errors=True)


@dataclass(frozen=True)
class Saved:
    """A checkpoint complete on disk (`latest` names it), and what it cost."""

    iteration: int
    directory: str
    blocking_s: float  # the loop stopped for it: waiting for the previous save, the snapshot
    total_s: float  # from the snapshot's start to the publication of `latest`


class BackgroundSaves:
    """--async-save: the write step of each checkpoint in a thread, one checkpoint at a time.

    `start` is all the loop waits for: the snapshot, every tensor copied into HostCopies (so
    the steps that follow cannot change what is written), then a thread runs `write`. `wait`
    joins it; the loop calls it before the next save, before a rollback's load, and on every
    way out. What the thread raised (SaveFailed) comes out of `wait`.

    The thread's collectives (the write step's barriers, the all-reduced failure check, the
    gather of the file records) run on a group of their own over every rank, made at the
    first save (every rank saves at the same iteration, so every rank makes it there): on the
    training's groups they would interleave with the main thread's collectives in a different
    order on different ranks. Gloo, so they take CPU tensors and never queue on a GPU stream
    behind the training's kernels.

    A crash during the write (kill -9 included) leaves what a crashed synchronous save
    leaves: an `iter_N.tmp` directory, with `latest` still naming the previous checkpoint."""

    def __init__(self):
        self.copies = HostCopies()
        self.group = None
        self.thread = None
        self.iteration = None  # of the checkpoint being written
        self.blocking_s = 0.0
        self._outcome = None  # (directory, total seconds), or what the thread raised

    def start(self, cfg, iteration, consumed_samples, chunks, optimizer, since: float) -> None:
        """Snapshot and start writing. `since`: the perf_counter() at which the loop stopped
        for this save (its blocking time counts from there). The previous save must have been
        waited for."""
        if self.thread is not None:
            raise RuntimeError("a checkpoint is still being written: wait() for it first")
        if self.group is None and dist.is_initialized():
            minutes = cfg.parallel.distributed_timeout_minutes
            self.group = dist.new_group(backend="gloo", timeout=datetime.timedelta(minutes=minutes))
        started = time.perf_counter()
        snap = snapshot(cfg, iteration, consumed_samples, chunks, optimizer, self.copies)
        self.iteration, self._outcome = iteration, None
        self.thread = threading.Thread(
            target=self._write, args=(snap, started), name="megalite-save", daemon=True
        )
        self.thread.start()
        self.blocking_s = time.perf_counter() - since

    def _write(self, snap: Snapshot, started: float) -> None:
        try:
            self._outcome = (write(snap, self.group), time.perf_counter() - started)
        except BaseException as e:  # handed to the main thread by wait()
            self._outcome = e

    def done(self) -> bool:
        """A save was started and its thread has ended: wait() returns at once."""
        return self.thread is not None and not self.thread.is_alive()

    def failure(self) -> Optional[BaseException]:
        """What the ended thread raised, or None."""
        return self._outcome if self.done() and isinstance(self._outcome, BaseException) else None

    def wait(self) -> Optional[Saved]:
        """Join the save being written: the checkpoint, or None when none was started; raises
        what its thread raised."""
        if self.thread is None:
            return None
        self.thread.join()
        outcome, self.thread, self._outcome = self._outcome, None, None
        if isinstance(outcome, BaseException):
            raise outcome
        where, total = outcome
        return Saved(self.iteration, where, self.blocking_s, total)


class Resumed(NamedTuple):
    iteration: int
    consumed_samples: int
    directory: str
    note: Optional[str]  # for the log: how a checkpoint of another layout was re-cut


def load_checkpoint(cfg, chunks, optimizer) -> Optional[Resumed]:
    """Resume from --load, the mirror of save_checkpoint: weights always; the optimizer (with
    its loss scaler), iteration and consumed samples unless --no-load-optim; RNG states unless
    --no-load-rng. Returns None when --load holds no checkpoint yet and is also --save (a
    fresh start that will save there).

    A checkpoint of another layout (TP, PP, virtual-pipeline split; a DP size or optimizer
    kind change alone needs nothing of this) is re-cut for this rank (training/reshard.py):
    weights, fp32 main params and moments exactly; the RNG streams, which belong to the
    saved ranks, are re-seeded from --seed and the iteration, as `note` says.

    LoRA (--lora-rank): a checkpoint without adapters is the base model (with --finetune:
    its weights, the adapters as initialised); a LoRA checkpoint holds the adapters and
    names its base, whose weights are loaded first (any layout too)."""
    st, ck = state.get(), cfg.checkpoint
    if st.rank == 0:
        recover(ck.load)
    _barrier()
    it = latest_iteration(ck.load) if os.path.isdir(ck.load) else None
    if it is None:
        if ck.load != ck.save:
            raise MegaliteError(
                f"--load {ck.load} holds no checkpoint (no {LATEST}); check the "
                f"path, or drop --load to start from scratch"
            )
        return None
    meta, where = read_metadata(ck.load, it), iter_dir(ck.load, it)
    every = {n: p for chunk in chunks for n, p in chunk.named_parameters()}
    params = _load_lora_base(cfg, chunks, every, meta, where, it)
    if params is None:
        return Resumed(0, 0, where, f"LoRA: base weights from {where}, adapters initialised")
    model, optimizer_state, rng, note = _rank_state(cfg, ck.load, it, meta, params)
    if optimizer_state is None and not (ck.no_load_optim and ck.no_load_rng):
        raise MegaliteError(
            f"checkpoint {where} holds weights only (an imported model); "
            f"train from it with --finetune"
        )
    with optimizer.ddp.full_params():  # ZeRO-3: whole params, written back to the shards
        _load_model_state(chunks, model, where, set(params))
    optimizer.reload_model_params()  # fp32 main params <- the loaded weights
    iteration, consumed = 0, 0
    if not ck.no_load_optim:
        iteration, consumed = meta["iteration"], meta["consumed_samples"]
        optimizer.load_state_dict(optimizer_state, optimizer_shard_reader(ck.load, it))
    if not ck.no_load_rng:
        note = _restore_rng(cfg, rng, iteration, where, note)
    return Resumed(iteration, consumed, where, note)


def _load_lora_base(cfg, chunks, params, meta, where, it) -> Optional[dict]:
    """LoRA's part of a resume (params: every parameter by name). Returns the parameters
    still to load from the checkpoint itself, or None when the resume is complete: a
    checkpoint without adapters is the base (with --finetune: its weights into the frozen
    params, the adapters as initialised); a LoRA checkpoint names its base, whose weights
    load first, then its adapters."""
    ck, base = cfg.checkpoint, meta.get("lora_base")
    if base is not None and not cfg.lora.lora_rank:
        raise MegaliteError(
            f"checkpoint {where} holds LoRA adapters only: train on with --lora-rank "
            f"{meta['config']['lora']['lora_rank']}, or fold them into the base first "
            f"(tools/convert.py merge-lora)"
        )
    if base is not None:
        _check_same_adapters(meta["config"].get("lora", {}), cfg.lora, where)
    frozen = {n: p for n, p in params.items() if not p.requires_grad}
    if not frozen:
        return params
    if base is None:  # this checkpoint is the base model
        if not (ck.no_load_optim and ck.no_load_rng):
            raise MegaliteError(
                f"checkpoint {where} has no LoRA adapters: start LoRA from it with --finetune"
            )
        base = {"path": os.path.abspath(ck.load), "iteration": it}
        _load_weights(cfg, base["path"], it, chunks, frozen)
        _mark_base(chunks, base)
        return None
    _load_weights(cfg, base["path"], base["iteration"], chunks, frozen)
    _mark_base(chunks, base)
    return {n: p for n, p in params.items() if p.requires_grad}


def _restore_rng(cfg, rng, iteration, where, note):
    """The saved RNG streams, or (another layout's, or none saved) a deterministic re-seed
    from --seed + iteration, said in the returned note."""
    if rng is not None:
        prandom.set_rng_state(rng)
        return note
    prandom.seed_everything(cfg.training.seed + iteration, state.get().device)  # ranks alike
    return (note or f"checkpoint {where} holds no RNG state") + (
        f"; RNG re-seeded from --seed {cfg.training.seed} + iteration {iteration} "
        f"(the saved streams belong to the saved layout's ranks)"
    )


def _check_same_adapters(saved: dict, lora, where: str) -> None:
    """A LoRA checkpoint resumes only with the adapters it holds: rank, targets and alpha
    (which scales their update) as saved; one line otherwise."""
    keys = ("lora_rank", "lora_alpha", "lora_target_modules")
    mine = {k: getattr(lora, k) for k in keys}
    if any(saved.get(k) != mine[k] for k in keys):
        flags = " ".join(f"--{k.replace('_', '-')} {saved.get(k)}" for k in keys
                         if saved.get(k) is not None)  # fmt: skip
        raise MegaliteError(
            f"checkpoint {where} holds LoRA adapters made with {flags}; resume with those flags "
            f"(or merge them first: tools/convert.py merge-lora)"
        )


def _rank_state(cfg, root, it, meta, params: dict) -> tuple:
    """This rank's (model {name: tensor} of `params`, optimizer state, RNG state, note) from
    iteration `it` of `root`: its own shard when the layout is the saved one, else re-cut."""
    st, ck = state.get(), cfg.checkpoint
    saved_layout = _layout_of(meta)
    if saved_layout == (st.tp, cfg.pipeline_layout()):
        shard = read_shard(root, it, st.tp_rank, st.pp_rank)
        model = {n: t for n, t in shard["model"].items() if n in params}
        return model, shard.get("optimizer"), shard.get("rng"), None
    saved = saved_checkpoint(root, it)
    saved.check_model(cfg.model.num_layers)
    model, pieces = saved.rank_state(params, st.tp, st.tp_rank, not ck.no_load_optim)
    optimizer_state = saved.optimizer
    if optimizer_state is not None and pieces is not None:
        optimizer_state = dict(optimizer_state, sharded=False, pieces=pieces)
    vp = len(saved_layout[1][0])
    note = (
        f"re-cut checkpoint {iter_dir(root, it)} from TP={saved_layout[0]} "
        f"PP={len(saved_layout[1])} VP={vp} DP={meta['data_parallel_size']} to TP={st.tp} "
        f"PP={st.pp} VP={cfg.virtual_pipeline_size} DP={st.dp}"
    )
    return model, optimizer_state, None, note


def _load_weights(cfg, root, it, chunks, params: dict) -> None:
    """Load the weights of `params` alone (LoRA's frozen base) from iteration `it` of `root`,
    a checkpoint of any layout."""
    where = iter_dir(root, it)
    if not os.path.isdir(where):
        raise MegaliteError(
            f"the LoRA base model {where} is missing: these adapters were trained on it; "
            f"restore it, or merge the adapters where it is (tools/convert.py merge-lora)"
        )
    meta = read_metadata(root, it)
    if meta.get("lora_base") is not None:
        raise MegaliteError(f"LoRA base {where} is itself a LoRA checkpoint: merge it first")
    model, _, _, _ = _rank_state(cfg, root, it, meta, params)
    _load_model_state(chunks, model, where, set(params))


def _mark_base(chunks, base: dict) -> None:
    """Record on the model the checkpoint its frozen base weights came from (LoRA): a save
    writes the adapters alone and this pointer."""
    for chunk in chunks:
        chunk.lora_base = dict(base)


def saved_checkpoint(root, iteration) -> SavedCheckpoint:
    """Iteration `iteration` of checkpoint directory `root`, read as full tensors (any layout)."""
    return SavedCheckpoint(
        iter_dir(root, iteration),
        read_metadata(root, iteration),
        lambda tp_rank, pp_rank: read_shard(root, iteration, tp_rank, pp_rank),
        lambda tp_rank, pp_rank, dp_rank: read_optimizer_shard(
            root, iteration, tp_rank, pp_rank, dp_rank
        ),
    )


def _layout_of(meta: dict) -> tuple:
    """(TP, layers[pp_rank][chunk]) of a checkpoint: what its files are cut by (the DP size
    is not: its optimizer state is keyed by element ranges that any DP size re-cuts)."""
    saved = Config.from_dict(meta["config"])
    return meta["tensor_model_parallel_size"], saved.pipeline_layout()


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
        raise MegaliteError(
            f"{path} is corrupt (holds {text[:40]!r}, not an iteration number); "
            f"write the iteration of a complete iter_* directory into it"
        )
    it = int(text)
    if not os.path.isdir(iter_dir(root, it)):
        raise MegaliteError(
            f"{path} points to iteration {it} but {iter_dir(root, it)} is "
            f"missing; point it at one of {list_iterations(root) or 'none'}"
        )
    return it


def read_metadata(root, iteration):
    return _metadata_in(iter_dir(root, iteration))


def _metadata_in(directory):
    path = os.path.join(directory, "metadata.json")
    try:
        with open(path) as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise MegaliteError(
            f"checkpoint {directory} has no metadata.json: it "
            f"is incomplete; point {LATEST} at an earlier iteration"
        )
    except json.JSONDecodeError as e:
        raise MegaliteError(
            f"checkpoint file {path} is corrupt ({e.msg}); point {LATEST} at an earlier iteration"
        )


def read_shard(root, iteration, tp_rank, pp_rank):
    return _load(
        os.path.join(iter_dir(root, iteration), shard_name(tp_rank, pp_rank)), "checkpoint shard"
    )


def read_optimizer_shard(root, iteration, tp_rank, pp_rank, dp_rank):
    path = os.path.join(iter_dir(root, iteration), optim_shard_name(tp_rank, pp_rank, dp_rank))
    return _load(path, "the distributed optimizer's shard", " (or resume with --no-load-optim)")


def optimizer_shard_reader(root, iteration):
    """read(dp_rank) -> the optimizer shard that DP rank of my (TP, PP) position saved."""
    st = state.get()
    return lambda dp_rank: read_optimizer_shard(root, iteration, st.tp_rank, st.pp_rank, dp_rank)


def _load(path, what, hint=""):
    if not os.path.exists(path):
        raise MegaliteError(
            f"{what} {path} is missing; the checkpoint is incomplete: point "
            f"{LATEST} at an earlier iteration{hint}"
        )
    _verify(path, hint)
    try:
        return _load_weights_only(path)
    except MegaliteError:
        raise
    except Exception as e:  # a truncated or overwritten file surfaces as many error types
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise MegaliteError(
            f"checkpoint file {path} is corrupt or truncated ({first[:120]}); "
            f"point {LATEST} at an earlier iteration{hint}"
        )


def _verify(path, hint) -> None:
    """Check path's size and sha256 against metadata.json's record of it. A checkpoint written
    before records were kept has none, and loads unverified.

    The checksum reads the whole file once more (sha256 runs at about 1.5 GB/s on one core:
    seconds for a multi-GB shard, and with a changed DP size a rank reads every DP rank's
    optimizer file of its stage). That is acceptable: a load happens once per run, and the
    pages read stay in the page cache for torch.load's memory map."""
    record = _metadata_in(os.path.dirname(path)).get("files", {}).get(os.path.basename(path))
    if record is None:
        return
    size = os.path.getsize(path)
    if size != record["bytes"]:
        raise MegaliteError(
            f"checkpoint file {path} is corrupt or truncated ({size} bytes, metadata.json "
            f"records {record['bytes']}); point {LATEST} at an earlier iteration{hint}"
        )
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(16 << 20):
            digest.update(chunk)
    if digest.hexdigest() != record["sha256"]:
        raise MegaliteError(
            f"checkpoint file {path} is corrupt (checksum mismatch: a flipped or truncated "
            f"byte); point {LATEST} at an earlier iteration{hint}"
        )


def _old_numpy_globals() -> list:
    """What checkpoints written before the weights_only format need beyond it: numpy's RNG
    state as a tuple holding a uint32 ndarray. Only these are allowed, so such a checkpoint
    still loads while any other global (code to run) is refused."""
    import numpy as np

    reconstruct = np._core.multiarray._reconstruct
    # numpy 1.x pickled it under numpy.core, which numpy 2 keeps as an alias
    return [
        reconstruct,
        (reconstruct, "numpy.core.multiarray._reconstruct"),
        np.ndarray,
        np.dtype,
        np.dtypes.UInt32DType,
    ]


def _load_weights_only(path):
    # Memory-mapped (torch.save's zip format allows it): nothing is read until a tensor is
    # used, so a rank pages in only what it copies into its own state, such as its slices of
    # other DP ranks' optimizer shards when the DP size changed. On the CPU, so no tensor
    # lands on a GPU before it is copied into place. weights_only: unpickling builds only
    # tensors and plain values, never calls what a crafted pickle names.
    def load():
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)

    try:
        return load()
    except pickle.UnpicklingError:
        pass  # the pickle names a global weights_only does not allow (or is mangled): which?
    allowed = _old_numpy_globals()
    names = {g[1] if isinstance(g, tuple) else f"{g.__module__}.{g.__name__}" for g in allowed}
    found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    unsafe = [g for g in found if g not in names]
    if unsafe:
        raise MegaliteError(
            f"checkpoint file {path} holds code to run on loading (a pickle of {unsafe[0]}); "
            f"refusing to load it: it was not written by megalite, or was tampered with"
        )
    with torch.serialization.safe_globals(allowed):
        return load()


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
            # (The last stage's copy of a tied embedding is `output_layer.weight`: kept, so a
            # reader of a tied model decides what to do with it, as tools/generate.py does.)
            info = shards[0]["partition"].get(name, (None, 1))
            full[name] = unshard([s["model"][name] for s in shards], *info)
    return full, meta


def save_weights_checkpoint(cfg, rank_params, full: dict, root: str) -> str:
    """Write the full state dict `full` as iteration 0 of a checkpoint at cfg's TP x PP layout
    (weights only: no optimizer or RNG state, so it loads with --finetune), one process.
    rank_params(tp_rank, pp_rank) -> {name: param} of that rank's model chunks (meta tensors
    will do: only the names and tags are read). A name missing from `full` takes its tag's
    `init_name` (a tied embedding's last-stage copy)."""
    tp = cfg.parallel.tensor_model_parallel_size

    def rank_shard(tp_rank, pp_rank):
        model = {}
        for name, p in rank_params(tp_rank, pp_rank).items():
            value = full[name] if name in full else full[tag_of(p).init_name]
            model[name] = shard_of(value, p, tp, tp_rank).contiguous()
        return {"model": model}

    return write_checkpoint(cfg, rank_params, rank_shard, root, 0, 0)


def write_checkpoint(cfg, rank_params, rank_shard, root, iteration, consumed_samples) -> str:
    """Write a checkpoint at cfg's TP x PP layout from one process (the converters): the files
    save_checkpoint writes, with the whole optimizer state (if any) in the model shards, as a
    run without the distributed optimizer saves it. rank_shard(tp_rank, pp_rank) -> that
    rank's {"model": {name: slice}} and, if there are, "optimizer" and "rng";
    rank_params(tp_rank, pp_rank) -> {name: param} (meta tensors will do) for the tags."""
    tp, pp = cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size
    final = iter_dir(root, iteration)
    tmp = final + ".tmp"
    os.makedirs(root, exist_ok=True)
    recover(root)
    os.makedirs(tmp)
    records = {}
    for pp_rank in range(pp):
        for tp_rank in range(tp):
            params = rank_params(tp_rank, pp_rank)
            shard = {
                "iteration": iteration,
                "consumed_samples": consumed_samples,
                **rank_shard(tp_rank, pp_rank),
                "partition": {n: tag_of(p).partition for n, p in params.items()},
            }
            name = shard_name(tp_rank, pp_rank)
            records[name] = _torch_save_fsync(shard, os.path.join(tmp, name))
    _write_metadata(tmp, _metadata(cfg, iteration, consumed_samples, tp, pp, 1), records)
    _publish(root, tmp, final, iteration, None)
    return final
