"""Mixed precision (issue 7 §3): bf16 / fp16 params with fp32 grads and fp32 main params.

In-process: the cast leaves buffers (RoPE frequencies) in fp32; the optimizer's main params are
the fp32 truth and the model gets their rounding; an fp16 overflow skips the step without
touching anything and backs the scale off. Through the command line: a bf16 run (DP=2, the
distributed optimizer) learns, and fp16 from a huge initial loss scale skips the overflowing
steps, logs them, and then trains.
"""

import json

import pytest
import torch

from conftest import run_cli, trainer


def tiny(style="llama"):
    from megalite.config import MODEL_STYLES, ModelConfig
    from megalite.model.gpt import GPTModel
    from megalite.parallel.layers import init_parameters

    model = GPTModel(
        ModelConfig(
            **MODEL_STYLES[style],
            num_layers=2,
            hidden_size=64,
            num_attention_heads=4,
            seq_length=32,
        ),
        128,
    )
    init_parameters(model, 1)
    return model


def setup(dtype, scaler=None, distributed=False, clip_grad=1.0):
    from megalite.model.gpt import cast_params
    from megalite.optim import DistributedOptimizer, MixedPrecisionOptimizer
    from megalite.parallel.ddp import DistributedDataParallel

    model = tiny()
    fp32 = {n: p.detach().clone() for n, p in model.named_parameters()}
    cast_params(model, dtype)
    ddp = DistributedDataParallel(model, use_distributed_optimizer=distributed)
    cls = DistributedOptimizer if distributed else MixedPrecisionOptimizer
    opt = cls(
        [{"params": list(model.parameters())}],
        ddp,
        lr=1e-2,
        clip_grad=clip_grad,
        loss_scaler=scaler,
    )
    return model, ddp, opt, fp32


def backward(model, opt, seed=0):
    from megalite.parallel.ddp import finalize_model_grads

    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, 128, (2, 33), generator=g)
    loss = model(t[:, :-1], labels=t[:, 1:]).mean()
    (loss * opt.loss_scale).backward()
    finalize_model_grads(model, opt.ddp)
    return loss.item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_params_low_precision_grads_and_main_params_fp32(dtype):
    from megalite.optim.mixed_precision import memory_footprint

    model, ddp, opt, fp32 = setup(dtype)
    assert all(p.dtype == dtype for p in model.parameters())
    assert all(b.dtype == torch.float32 for b in model.buffers())  # RoPE stays fp32
    assert all(p.main_grad.dtype == torch.float32 for p in model.parameters())
    assert all(pc.main.dtype == torch.float32 for pc in opt.pieces)
    # main params start from the cast weights (Megatron: the fp16 module is the source)
    names = dict((p, n) for n, p in model.named_parameters())
    for pc in opt.pieces:
        assert torch.equal(pc.main.view(pc.param.shape), pc.param.float())
    backward(model, opt)
    assert all(p.grad is None for p in model.parameters())  # moved to main_grad
    stepped, norm = opt.step()
    assert stepped and norm > 0
    for pc in opt.pieces:  # model = round(main)
        assert torch.equal(pc.param.view(-1), pc.main.to(dtype)), names[pc.param]
    m = memory_footprint(ddp, opt)
    n = sum(p.numel() for p in model.parameters())
    assert m["total"] == 18 * n  # 2 + 4 + 12


def test_fp16_overflow_skips_the_step_untouched_and_backs_off():
    from megalite.optim import DynamicLossScaler

    scaler = DynamicLossScaler(initial_scale=2.0**40, window=1000, hysteresis=1)
    model, ddp, opt, _ = setup(torch.float16, scaler)
    before = [t.clone() for pc in opt.pieces for t in (pc.main, pc.exp_avg, pc.model)]
    backward(model, opt)
    stepped, norm = opt.step()
    opt.zero_grad()
    assert not stepped and not norm < float("inf")
    after = [t for pc in opt.pieces for t in (pc.main, pc.exp_avg, pc.model)]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert scaler.scale == 2.0**39 and opt.step_count == 0
    scaler.scale = 2.0**10  # a sane scale
    backward(model, opt, seed=1)
    stepped, norm = opt.step()
    assert stepped and 0 < norm < float("inf") and opt.step_count == 1


def test_the_loss_scaler_travels_in_the_optimizer_state_dict():
    from megalite.optim import DynamicLossScaler

    scaler = DynamicLossScaler(initial_scale=2.0**40, window=1000, hysteresis=2)
    model, ddp, opt, _ = setup(torch.float16, scaler)
    backward(model, opt)
    assert not opt.step()[0]  # an overflow: hysteresis counts one down
    opt.zero_grad()
    saved = opt.state_dict()
    fresh = DynamicLossScaler(initial_scale=2.0**16, window=1000, hysteresis=2)
    _, _, opt2, _ = setup(torch.float16, fresh)
    opt2.load_state_dict(saved)
    assert fresh.state_dict() == scaler.state_dict()
    assert (
        fresh.scale == 2.0**40
        and fresh.state_dict()
        != DynamicLossScaler(initial_scale=2.0**40, window=1000, hysteresis=2).state_dict()
    )


class SkipAt:
    """A stand-in spike filter that flags the n-th step (a device bool, as SpikeFilter's)."""

    def __init__(self, n):
        self.n, self.calls = n, 0

    def __call__(self, norm):
        self.calls += 1
        return torch.tensor(self.calls == self.n, device=norm.device)

    def state_dict(self):
        return {}


@pytest.mark.parametrize("skip", ["spike", "nan-grad"])
def test_a_skipped_step_does_not_advance_the_step_count(skip):
    """Step 2 of 4 is skipped on the device (a spike, or a divergence that the loop would
    notice only later): the bias corrections of steps 3 and 4 are those of torch.optim.AdamW
    steps 2 and 3, as if the skipped step never happened (counted, they would be 3 and 4:
    about 1.3x and 1.2x larger updates)."""
    model, ddp, opt, _ = setup(torch.float32, clip_grad=0.0)
    if skip == "spike":
        opt.spike_filter = SkipAt(2)
    twins = [p.detach().clone().requires_grad_() for p in model.parameters()]
    torch_opt = torch.optim.AdamW(twins, lr=1e-2, weight_decay=0.0)
    for i in range(1, 5):
        backward(model, opt, seed=i)
        if i == 2 and skip == "nan-grad":
            next(iter(ddp.params)).main_grad.view(-1)[0] = float("nan")
        stepped, _ = opt.step()
        assert bool(stepped) == (i != 2)
        if i != 2:
            for p, t in zip(model.parameters(), twins):
                t.grad = p.main_grad.detach().clone()
            torch_opt.step()
        opt.zero_grad()
    assert opt.step_count == 3 and opt.state_dict()["step"] == 3
    for p, t in zip(model.parameters(), twins):
        torch.testing.assert_close(p.detach(), t.detach(), rtol=1e-5, atol=1e-6)


# -- through the command line -------------------------------------------------------------------

ARGS = (
    "--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 32 "
    "--micro-batch-size 4 --global-batch-size 8 --log-interval 1 --eval-interval 1000 "
    "--lr 3e-3 --lr-warmup-iters 5 --vocab-size 256 --split 95,5,0 --device cpu"
).split()


def run(corpus, metrics, *args, nproc=1):
    launch = trainer(nproc)
    p = run_cli(
        [*launch, *ARGS, "--data-path", corpus, "--metrics-file", str(metrics), *args], timeout=240
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    with open(metrics) as fh:
        return p, [r for r in map(json.loads, fh) if "loss" in r]


def test_bf16_distributed_run_trains(byte_corpus, tmp_path):
    p, recs = run(
        byte_corpus,
        tmp_path / "bf16.jsonl",
        "--train-iters",
        "40",
        "--bf16",
        "--use-distributed-optimizer",
        "--overlap-grad-reduce",
        nproc=2,
    )
    assert "bf16 on cpu" in p.stdout
    losses = [r["loss"] for r in recs]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert first > 4.5 and last < first - 1.0, (first, last)


def test_fp16_from_a_huge_scale_skips_then_recovers(byte_corpus, tmp_path):
    p, recs = run(
        byte_corpus,
        tmp_path / "fp16.jsonl",
        "--train-iters",
        "40",
        "--fp16",
        "--initial-loss-scale",
        str(2.0**40),
        "--hysteresis",
        "1",
    )
    skipped = [r["skipped_iters"] for r in recs]
    scales = [r["loss_scale"] for r in recs]
    n_skipped = sum(skipped)
    assert 10 <= n_skipped <= 30, skipped  # 2^40 halves until grads fit fp16
    assert skipped[:n_skipped] == [1] * n_skipped  # the first steps, then none
    assert sum(skipped[n_skipped:]) == 0, skipped
    assert scales[0] == 2.0**39 and scales[-1] == 2.0 ** (40 - n_skipped)
    assert "skipped 1" in p.stdout  # logged on the iteration line
    trained = [r["loss"] for r in recs[n_skipped:]]
    assert trained[-1] < trained[0] - 0.5, trained
