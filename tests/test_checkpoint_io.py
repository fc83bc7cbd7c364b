"""Checkpoint memory (issue 12): saving copies no state on its device, loading maps files.

One spawned world of 2 CPU ranks (gloo, DP=2, distributed optimizer, fp32, dropout) trains 3
steps, saves, trains 3 more; a fresh setup resumes from the save and trains the same 3 steps.
It records every torch.save and torch.load of the checkpoint code, and then resumes a
checkpoint that one process wrote (DP=1) under DP=2. The tests below read what it recorded:

- the saved tensors are CPU tensors over the live state's own memory (no copy at all on the
  CPU) and Tensor.clone is never called; each file holds only its own bytes;
- the resume is bitwise: the same losses and weights as the uninterrupted run;
- each file is opened with mmap=True and map_location="cpu", and a rank opens only its own
  optimizer shard when the DP size is unchanged;
- the DP=1 -> DP=2 re-shard gives each rank exactly its slice of the saved state.

On a GPU (skipped here): the peak device memory during a save stays within 2 MB of before,
with the host copies chunked through a small pinned buffer, and resume restores the state.
"""

import os

import pytest
import torch

from conftest import rank_guard, run_cli, spawn

ARGS = (
    "--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 32 "
    "--micro-batch-size 2 --global-batch-size 8 --log-interval 1 --eval-interval 1000 "
    "--lr 3e-3 --lr-warmup-iters 2 --vocab-size 256 --mock-data --train-iters 6 "
    "--hidden-dropout 0.1 --device cpu --use-distributed-optimizer --ddp-bucket-size 20000"
).split()
STEPS = 3


class Recorder:
    """Wraps torch.save, torch.load and Tensor.clone in this process while active, keeping
    what each call got."""

    def __init__(self):
        self.saves, self.loads, self.clones = [], [], 0

    def __enter__(self):
        self._orig = torch.save, torch.load, torch.Tensor.clone
        save, load, clone = self._orig

        def recording_save(obj, f, *args, **kwargs):
            self.saves.append((os.path.basename(getattr(f, "name", str(f))), obj))
            return save(obj, f, *args, **kwargs)

        def recording_load(f, *args, **kwargs):
            self.loads.append((os.path.basename(str(f)), kwargs))
            return load(f, *args, **kwargs)

        def counting_clone(t, *args, **kwargs):
            self.clones += 1
            return clone(t, *args, **kwargs)

        torch.save, torch.load, torch.Tensor.clone = recording_save, recording_load, counting_clone
        return self

    def __exit__(self, *exc):
        torch.save, torch.load, torch.Tensor.clone = self._orig


def tensors(obj):
    """Every tensor in nested dicts, lists and tuples."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from tensors(v)


def live_state_memory(run):
    """(start, end) addresses of the training state: weights and optimizer state."""
    opt = run.optimizer
    held = [p for c in run.chunks for p in c.parameters()]
    held += [opt.main_flat, opt.exp_avg_flat, opt.exp_avg_sq_flat]
    spans = {(s.data_ptr(), s.data_ptr() + s.nbytes()) for s in (t.untyped_storage() for t in held)}
    return sorted(spans)


def describe_saves(saves, run):
    """Per saved file: whether every state tensor in it is a CPU tensor lying inside the live
    state's memory (so nothing was copied), and the bytes of those tensors' own elements."""
    spans = live_state_memory(run)

    def inside(t):
        a, z = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
        return any(lo <= a and z <= hi for lo, hi in spans)

    out = {}
    for name, obj in saves:
        state = obj if name.startswith("optim_") else [obj["model"], obj["optimizer"]]
        ts = list(tensors(state))
        out[name] = {
            "tensors": len(ts),
            "all_cpu": all(t.device.type == "cpu" for t in ts),
            "all_live": all(inside(t) for t in ts),
            "own_bytes": sum(t.numel() * t.element_size() for t in tensors(obj)),
        }
    return out


def config(*args):
    from megalite.config import parse_config

    return parse_config([*ARGS, *map(str, args)], world_size=2)


def params(run):
    return {n: p.detach().clone() for c in run.chunks for n, p in c.named_parameters()}


def pieces(run):
    opt = run.optimizer
    return [(pc.name, pc.start, pc.end, pc.main.clone(), pc.exp_avg.clone(),
             pc.exp_avg_sq.clone()) for pc in opt.pieces]  # fmt: skip


def save(run):
    """save_checkpoint itself: the loop's save() also reads the step statistics back."""
    from megalite.training.checkpoint import save_checkpoint

    save_checkpoint(run.cfg, run.iteration, run.consumed_samples, run.chunks, run.optimizer)


def _worker(rank, world, port, out_dir):
    from megalite.training import loop

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    ck2, ck1 = os.path.join(out_dir, "ck_dp2"), os.path.join(out_dir, "ck_dp1")
    res = {}
    with rank_guard(out_dir, rank):
        run = loop.setup(config("--save", ck2))
        for _ in range(STEPS):
            loop.train_step(run)
        with Recorder() as rec:
            save(run)
        res["saves"] = describe_saves(rec.saves, run)
        res["save_clones"] = rec.clones
        res["straight"] = [loop.train_step(run).loss for _ in range(STEPS)]
        res["straight_params"] = params(run)
        run.log.close()

        with Recorder() as rec:
            resumed = loop.setup(config("--load", ck2))
        res["resume_loads"] = rec.loads
        res["resumed_at"] = resumed.iteration
        res["resumed"] = [loop.train_step(resumed).loss for _ in range(STEPS)]
        res["resumed_params"] = params(resumed)
        resumed.log.close()

        with Recorder() as rec:
            reshard = loop.setup(config("--load", ck1))
        res["reshard_loads"] = rec.loads
        res["reshard_pieces"] = pieces(reshard)
        res["reshard_params"] = params(reshard)
        reshard.log.close()
    torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckio")
    # The DP=1 checkpoint: one process through the command line, same model and optimizer.
    p = run_cli(["-m", "megalite.train", *ARGS, "--save", str(out / "ck_dp1"),
                 "--exit-interval", str(STEPS)])  # fmt: skip
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    spawn(_worker, 2, str(out), timeout=300)
    return out, [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def optim_file(rank):
    return f"optim_tp00_pp000_dp{rank:03d}.pt"


def test_saving_copies_no_state(world):
    out, ranks = world
    for rank, res in enumerate(ranks):
        assert res["save_clones"] == 0, rank
        expected = {optim_file(rank)} | ({"mp_rank_00_000.pt"} if rank == 0 else set())
        assert set(res["saves"]) == expected, (rank, res["saves"])
        for name, d in res["saves"].items():
            assert d["tensors"] > 0 and d["all_cpu"] and d["all_live"], (rank, name, d)


def test_each_file_holds_only_its_own_bytes(world):
    """A ZeRO-1 shard's fp32 main params are views into the whole param buffer: written as
    views they would put the whole model into every DP rank's file."""
    out, ranks = world
    it = out / "ck_dp2" / f"iter_{STEPS:07d}"
    for rank, res in enumerate(ranks):
        for name, d in res["saves"].items():
            size = os.path.getsize(it / name)
            assert d["own_bytes"] < size < 1.05 * d["own_bytes"] + 64 * 1024, (name, size, d)


def test_resume_is_bitwise(world):
    _, ranks = world
    for res in ranks:
        assert res["resumed_at"] == STEPS
        assert res["resumed"] == res["straight"]
        for name, p in res["straight_params"].items():
            assert torch.equal(res["resumed_params"][name], p), name


def test_resume_maps_only_its_own_files(world):
    _, ranks = world
    for rank, res in enumerate(ranks):
        names = sorted(name for name, _ in res["resume_loads"])
        assert names == ["mp_rank_00_000.pt", optim_file(rank)], (rank, names)
        for name, kwargs in res["resume_loads"]:
            assert kwargs.get("mmap") is True and kwargs.get("map_location") == "cpu", (
                name,
                kwargs,
            )


def test_resume_under_another_dp_size_cuts_each_rank_its_slice(world):
    """DP=1's single shard onto 2 ranks: each rank's pieces are bitwise the saved values at
    their element ranges (assembled here from the file, independently of the loader)."""
    out, ranks = world
    it = out / "ck_dp1" / f"iter_{STEPS:07d}"
    saved = torch.load(it / optim_file(0), weights_only=True)
    weights = torch.load(it / "mp_rank_00_000.pt", weights_only=False)["model"]
    full = {}
    for name, parts in saved.items():
        for start, end, numel, *state in parts:
            f = full.setdefault(name, [torch.full((numel,), float("nan")) for _ in range(3)])
            for dst, src in zip(f, state):
                dst[start:end] = src
    owned = 0
    for res in ranks:
        for name, kwargs in res["reshard_loads"]:
            assert name in ("mp_rank_00_000.pt", optim_file(0)), name
            assert kwargs.get("mmap") is True and kwargs.get("map_location") == "cpu"
        for name, start, end, *state in res["reshard_pieces"]:
            for got, want in zip(state, full[name]):
                assert torch.equal(got, want[start:end]), (name, start, end)
            owned += end - start
        for name, p in res["reshard_params"].items():
            assert torch.equal(p, weights[name]), name
    assert owned == sum(f[0].numel() for f in full.values())  # the ranks split it exactly


def test_to_host_on_the_cpu_shares_memory_and_narrows_the_storage():
    from megalite.training.checkpoint import to_host

    flat = torch.arange(1000, dtype=torch.float32)
    for view in (flat[100:300], flat[:10].view(2, 5), flat):
        host = to_host(view)
        assert host.data_ptr() == view.data_ptr() and torch.equal(host, view)
        assert host.untyped_storage().nbytes() == view.numel() * 4
    bf16 = torch.randn(64).to(torch.bfloat16)[8:40]
    assert torch.equal(to_host(bf16), bf16) and to_host(bf16).dtype == torch.bfloat16


# -- on a GPU -----------------------------------------------------------------------------------

CUDA_ARGS = (
    "--num-layers 4 --hidden-size 512 --num-attention-heads 8 --seq-length 64 "
    "--micro-batch-size 2 --global-batch-size 2 --log-interval 1 --eval-interval 1000 "
    "--lr 1e-3 --lr-warmup-iters 1 --vocab-size 4096 --mock-data --train-iters 10 "
    "--device cuda --bf16 --model-style llama --use-distributed-optimizer"
).split()


def _cuda_worker(rank, world, port, out_dir):
    from megalite.config import parse_config
    from megalite.training import checkpoint as ckpt
    from megalite.training import loop

    ckpt.STAGING_BYTES = 1 << 20  # many chunks per tensor (the embedding's is 8 MB)
    ck = os.path.join(out_dir, "ck")
    res = {}
    with rank_guard(out_dir, rank):
        run = loop.setup(parse_config([*CUDA_ARGS, "--save", ck], world_size=1))
        for _ in range(2):
            loop.train_step(run)
        before_save = [(n, s, e, *(t.cpu() for t in st)) for n, s, e, *st in pieces(run)]
        weights = {n: p.cpu() for n, p in params(run).items()}
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        allocated = torch.cuda.memory_allocated()
        with Recorder() as rec:
            save(run)
        res["peak_extra"] = torch.cuda.max_memory_allocated() - allocated
        res["state_bytes"] = 12 * sum(e - s for _, s, e, *_ in before_save)
        loop.train_step(run)  # the live state moves on; what was saved must not
        saved = {name: obj for name, obj in rec.saves}
        res["all_cpu"] = all(t.device.type == "cpu" for _, obj in rec.saves for t in tensors(obj))
        shard = {(n, s, e): st for n, parts in saved["optim_tp00_pp000_dp000.pt"].items()
                 for s, e, _, *st in parts}  # fmt: skip
        model = saved["mp_rank_00_000.pt"]["model"]
        res["saved_equal"] = all(
            torch.equal(a, b) for n, s, e, *st in before_save for a, b in zip(shard[n, s, e], st)
        ) and all(torch.equal(model[n], w) for n, w in weights.items())
        run.log.close()
        resumed = loop.setup(parse_config([*CUDA_ARGS, "--load", ck], world_size=1))
        res["resumed_equal"] = all(
            torch.equal(a.cpu(), b)
            for (_, _, _, *got), (_, _, _, *want) in zip(pieces(resumed), before_save)
            for a, b in zip(got, want)
        )
        resumed.log.close()
    torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_saving_from_the_gpu_takes_no_device_memory(tmp_path):
    spawn(_cuda_worker, 1, str(tmp_path), timeout=300)
    res = torch.load(tmp_path / "rank0.pt", weights_only=False)
    assert res["state_bytes"] > 100 << 20  # a clone would show
    assert res["peak_extra"] < 2 << 20, res["peak_extra"]
    assert res["all_cpu"] and res["saved_equal"] and res["resumed_equal"], res
