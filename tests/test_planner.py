"""The planner against reality (issue 16, item 3), for 6 layouts of up to 8 processes:

- params + grads + optimizer bytes it predicts per rank are what each rank of the trainer
  reports at start (`mem_*_bytes`, measured from its storages), within 2%;
- the activation bytes it predicts per micro-batch (traced on the meta device) are within
  10% of what autograd saves in a real forward on this machine (real tensors, real TP
  collectives over gloo, real SDPA; MEGALITE_KERNELS=reference so that the norms and
  activations run the autograd Functions of the CUDA kernels, which the planner predicts);
- the TP collectives the cost model counts per micro-batch are the ones a real forward and
  backward call (with SP, full recompute, a pipeline's last stage);
- predicted and measured step times are printed side by side with their rankings (no
  accuracy goal on gloo; tools/bench/planner_ranking.py ranks them over alternating rounds).
"""

import json
import os

import pytest
import torch

from conftest import join_gloo, rank_guard, run_cli, spawn, trainer

MODEL = dict(num_layers=4, hidden_size=64, num_attention_heads=4, seq_length=32,
             vocab_size=256, micro_batch_size=2, global_batch_size=16, bf16=True)  # fmt: skip
FLAGS = (
    "--num-layers 4 --hidden-size 64 --num-attention-heads 4 --seq-length 32 --vocab-size 256 "
    "--micro-batch-size 2 --global-batch-size 16 --bf16 --mock-data --log-interval 1 "
    "--eval-interval 1000 --train-iters 8"
).split()
LAYOUTS = {
    "dp2": (2, {}),
    "dp2-zero3": (2, {"data_parallel_sharding_strategy": "optim_grads_params"}),
    "tp2-dp2-sp-zero1": (4, {"tensor_model_parallel_size": 2, "sequence_parallel": True,
                             "use_distributed_optimizer": True}),
    "pp2-dp2-zero1": (4, {"pipeline_model_parallel_size": 2, "use_distributed_optimizer": True}),
    "tp2-pp2-vp2-dp2-selective": (8, {"tensor_model_parallel_size": 2,
                                      "pipeline_model_parallel_size": 2,
                                      "num_layers_per_virtual_pipeline_stage": 1,
                                      "recompute_granularity": "selective",
                                      "use_distributed_optimizer": True}),
    "dp4-zero2-full": (4, {"data_parallel_sharding_strategy": "optim_grads",
                           "recompute_granularity": "full"}),
}  # fmt: skip


def flags_of(settings: dict) -> list:
    out = []
    for k, v in settings.items():
        flag = "--" + k.replace("_", "-")
        out += [flag] if v is True else [flag, str(v)]
    return out


def config(nproc, settings):
    from megalite.config import make_config

    return make_config(MODEL, settings, world_size=nproc)


def cpu_cluster(nproc):
    """This machine as the cost model sees it, per process at a core's full speed: ~25 GFLOP/s
    at the tiny model's sizes plus ~2 ms of Python and small ops per layer and micro-batch
    (x 1.75 with full recompute; both from one-process runs' forward + backward timers:
    1.5-2.3 ms, and 1.74x); 2 cores shared by the processes (the planner's contention);
    gloo over loopback, ~1.25 ms per message with a core per process and ~2 ms once processes
    outnumber cores (a peer must be scheduled first), ~2 GB/s; the DP grad sum through shared
    memory at the memory's ~10 GB/s. The latencies are tools/bench/gloo_latency.py's (pairs
    of processes all-reducing a TP activation between 1 ms of compute)."""
    from megalite.planner import Cluster

    return Cluster(nodes=1, gpus_per_node=nproc, memory_bytes=24 * 2**30, peak_tflops=0.025,
                   hbm_bandwidth=10e9, intra_node_bandwidth=2e9, inter_node_bandwidth=2e9,
                   efficiency=1.0, latency=1.25e-3 if nproc <= 2 else 2e-3, overlap=0.0,
                   layer_overhead=2e-3, recompute_overhead=1.75, cpu=True,
                   cores_per_node=2)  # fmt: skip


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """Each layout through the command line: the start records and the tokens/s."""
    out = {}
    for name, (nproc, settings) in LAYOUTS.items():
        m = tmp_path_factory.mktemp(name) / "m.jsonl"
        p = run_cli([*trainer(nproc), *FLAGS, *flags_of(settings), "--metrics-file", str(m)])
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
        records = [json.loads(line) for line in open(m)]
        speed = sorted(r["tokens_per_sec"] for r in records if "tokens_per_sec" in r)[2:]
        out[name] = ({r["rank"]: r for r in records if "mem_params_bytes" in r},
                     speed[len(speed) // 2])  # fmt: skip
    return out


@pytest.mark.slow
def test_state_bytes_match_the_trainer(measured):
    from megalite.planner import plan_layout

    rows, worst = [], 0.0
    for name, (nproc, settings) in LAYOUTS.items():
        cfg = config(nproc, settings)
        plan = plan_layout(cfg, cpu_cluster(nproc))
        tp, dp = cfg.parallel.tensor_model_parallel_size, cfg.data_parallel_size
        records, speed = measured[name]
        assert sorted(records) == list(range(nproc))
        for rank, r in records.items():
            stage = plan.ranks[rank // (tp * dp)]
            want = r["mem_params_bytes"] + r["mem_grads_bytes"] + r["mem_optimizer_bytes"]
            got = stage["params"] + stage["grads"] + stage["optimizer"]
            assert abs(got / want - 1) <= 0.02, (name, rank, got, want)
            worst = max(worst, abs(got / want - 1))
        rows.append((name, plan.step_s, 16 * 32 / speed))
    by_plan = [n for n, _, _ in sorted(rows, key=lambda r: r[1])]
    by_run = [n for n, _, _ in sorted(rows, key=lambda r: r[2])]
    print(f"\nparams + grads + optimizer per rank: worst |planned / measured - 1| = {worst:.2e}")
    print("layout                      predicted ms  measured ms")
    for name, predicted, real in rows:
        print(f"{name:<27} {predicted * 1e3:11.1f}  {real * 1e3:11.1f}")
    print(f"ranked by the plan: {by_plan}\nranked by the runs: {by_run}")


def _real_saved_bytes(rank, world, port, out_dir):
    """Spawned (TP ranks of one layout): a real forward of each chunk of each stage."""
    os.environ["MEGALITE_KERNELS"] = "reference"
    from megalite.layout import padded_vocab_size
    from megalite.model.gpt import GPTModel, cast_params
    from megalite.parallel import state
    from megalite.parallel.layers import init_parameters

    name = open(os.path.join(out_dir, "layout")).read()
    nproc, settings = LAYOUTS[name]
    cfg = config(nproc, settings)
    tp = cfg.parallel.tensor_model_parallel_size
    with rank_guard(out_dir, rank):
        join_gloo(rank, world, port, tp=tp)
        st = state.get()
        padded = padded_vocab_size(256, 128, tp)
        result = []
        stages = cfg.pipeline_layout()
        for pp_rank, chunks in enumerate(stages):
            per_chunk = []
            for c, layers in enumerate(chunks):
                pre = pp_rank == 0 and c == 0
                post = pp_rank == len(stages) - 1 and c == len(chunks) - 1
                par = cfg.parallel
                chunk = GPTModel(cfg.model, padded, pre_process=pre, post_process=post,
                                 layer_numbers=layers, unpadded_vocab_size=256,
                                 sequence_parallel=par.sequence_parallel,
                                 recompute_granularity=par.recompute_granularity)  # fmt: skip
                init_parameters(chunk, 1234)
                cast_params(chunk, torch.bfloat16)
                params = {p.untyped_storage()._cdata for p in chunk.parameters()}
                saved = {}

                def pack(t):
                    if t.untyped_storage()._cdata not in params:
                        saved[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
                    return t

                tokens = torch.randint(0, 256, (2, 32))
                kw = {"labels": tokens} if post else {}
                if pre:
                    kw["tokens"] = tokens
                else:
                    seq = 32 // tp if cfg.parallel.sequence_parallel else 32
                    x = torch.randn(seq, 2, 64, dtype=torch.bfloat16, requires_grad=True)
                    kw["hidden_states"] = x
                with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                    chunk(**kw)
                per_chunk.append(sum(saved.values()))
            result.append(per_chunk)
        if st.rank == 0:
            with open(os.path.join(out_dir, "saved.json"), "w") as fh:
                json.dump(result, fh)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_activation_bytes_match_a_real_forward(tmp_path, name):
    from megalite.layout import padded_vocab_size
    from megalite.planner import activation_bytes, fake_world

    nproc, settings = LAYOUTS[name]
    cfg = config(nproc, settings)
    tp = cfg.parallel.tensor_model_parallel_size
    (tmp_path / "layout").write_text(name)
    spawn(_real_saved_bytes, tp, tmp_path)
    real = json.load(open(tmp_path / "saved.json"))
    padded = padded_vocab_size(256, 128, tp)
    with fake_world(nproc):
        predicted = [activation_bytes(cfg, padded, 256, s) for s in range(len(real))]
    print(f"\n{name}: predicted {predicted}, measured {real}")
    for want, got in zip(real, predicted):
        for w, g in zip(want, got):
            assert abs(g / w - 1) <= 0.10, (name, predicted, real)


def test_plan_cli_one_layout_and_search():
    p = run_cli(["tools/plan.py", "--nodes", "2", "--gpus-per-node", "8", "--gpu", "H100",
                 "--model-style", "llama", "--num-layers", "8", "--hidden-size", "1024",
                 "--num-attention-heads", "16", "--num-query-groups", "4", "--seq-length", "2048",
                 "--vocab-size", "32000", "--global-batch-size", "64", "--bf16", "--train-iters",
                 "10", "--search", "--top", "3", "--json"])  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    plans = json.loads(p.stdout)
    assert len(plans) == 3 and all(x["fits"] for x in plans)
    assert [x["step_s"] for x in plans] == sorted(x["step_s"] for x in plans)
    for x in plans:
        lo = x["layout"]
        assert lo["tp"] * lo["pp"] * lo["dp"] == 16
        assert x["tokens_per_s"] > 0 and 0 < x["mfu"] < 1
    p = run_cli(["tools/plan.py", "--gpu", "Z80", "--num-layers", "2"])
    assert p.returncode != 0 and "no figures known for GPU 'Z80'" in p.stderr


def _count_tp_collectives(rank, world, port, out_dir):
    """Spawned (2 TP ranks): the collectives of one micro-batch's forward and backward through
    a whole model (or, with PP, its last stage), counted at torch.distributed's entry points."""
    import torch.distributed as dist

    import megalite.parallel.tensor as tensor
    from megalite.model.gpt import GPTModel
    from megalite.parallel.layers import init_parameters

    settings = json.load(open(os.path.join(out_dir, "settings.json")))
    pp = settings.get("pipeline_model_parallel_size", 1)
    cfg = config(2 * pp, settings)
    with rank_guard(out_dir, rank):
        join_gloo(rank, world, port, tp=2)
        par = cfg.parallel
        model = GPTModel(cfg.model, 256, unpadded_vocab_size=256, pre_process=pp == 1,
                         layer_numbers=cfg.pipeline_layout()[-1][-1],
                         sequence_parallel=par.sequence_parallel,
                         recompute_granularity=par.recompute_granularity,
                         recompute_num_layers=par.recompute_num_layers)  # fmt: skip
        init_parameters(model, 1234)
        calls = {"all_reduce": [], "halves": 0}

        def counted(name, fn):
            def call(t, *args, **kwargs):
                if name == "all_reduce":
                    calls["all_reduce"].append(t.dim())
                else:
                    calls["halves"] += 1
                return fn(t, *args, **kwargs)

            return call

        dist.all_reduce = counted("all_reduce", dist.all_reduce)
        tensor._all_gather_into = counted("gather", tensor._all_gather_into)
        tensor._reduce_scatter = counted("scatter", tensor._reduce_scatter)
        tokens = torch.randint(0, 256, (2, 32))
        if pp == 1:
            inputs = {"tokens": tokens}
        else:  # the last stage: the previous stage's activation
            seq = 16 if par.sequence_parallel else 32
            inputs = {"hidden_states": torch.randn(seq, 2, 64, requires_grad=True)}
        model(labels=tokens, **inputs).sum().backward()
        if rank == 0:
            ar = calls["all_reduce"]
            got = [sum(d == 3 for d in ar), calls["halves"], sum(d == 2 for d in ar)]
            with open(os.path.join(out_dir, "counts.json"), "w") as fh:
                json.dump(got, fh)


@pytest.mark.parametrize(
    "settings",
    [{}, {"sequence_parallel": True}, {"recompute_granularity": "full"},
     {"sequence_parallel": True, "recompute_granularity": "full", "model_style": "llama"},
     {"recompute_granularity": "full", "recompute_num_layers": 1, "hidden_dropout": 0.1},
     {"sequence_parallel": True, "recompute_granularity": "full", "hidden_dropout": 0.1},
     {"model_style": "llama", "num_query_groups": 1, "sequence_parallel": True},
     {"num_query_groups": 1},
     {"pipeline_model_parallel_size": 2, "sequence_parallel": True}],
    ids=["tp", "sp", "tp-full-recompute", "sp-full-recompute-llama",
         "tp-recompute-1-layer-dropout", "sp-full-recompute-dropout", "sp-llama-1-kv-group",
         "tp-gpt2-1-kv-group", "pp2-last-stage-sp"],
)  # fmt: skip
def test_tp_collectives_are_what_the_model_issues(tmp_path, settings):
    """The cost model's count of TP collectives per micro-batch (planner.tp_collectives) is
    what a real forward + backward at TP 2 calls: all-reduces of activations, all-gathers +
    reduce-scatters (with the replicated key/value rows' grad gathers), and all-reduces of
    the loss's [s, b] numbers."""
    from megalite.planner import tp_collectives

    settings = dict(settings, tensor_model_parallel_size=2)
    (tmp_path / "settings.json").write_text(json.dumps(settings))
    spawn(_count_tp_collectives, 2, tmp_path)
    measured = json.load(open(tmp_path / "counts.json"))
    nproc = 2 * settings.get("pipeline_model_parallel_size", 1)
    c = tp_collectives(config(nproc, settings))
    planned = [c["all_reduce"], c["gather_scatter"] + c["replica_gather"], c["loss_all_reduce"]]
    assert planned == measured, settings
