"""Pipeline schedules without processes (issue 6): every rank's operations, played against
each other by `schedule_sim` from the very lists the executor runs; the stage layout; the
config's errors; and the executor on one process against plain gradient accumulation."""

import pytest
import torch

from megalite.errors import MegaliteError
from megalite.parallel import pipeline
from megalite.parallel.schedule_sim import (
    ScheduleError,
    bubble_fraction,
    simulate,
    theoretical_bubble,
)
from megalite.layout import pipeline_layout, virtual_pipeline_size
from megalite.parallel.schedules import P2P, Backward, Comm, Forward, schedule_ops

GRID = [(pp, vp, M) for pp in (2, 4) for vp in (1, 2) for M in range(1, 9)]


def in_flight_bound(pp, rank, M, vp):
    """1F1B: a stage holds at most PP - rank micro-batches, whatever M. Interleaved: at most
    PP + (PP - 2 rank - 1) / vp stages' worth, i.e. vp * PP + PP - 2 rank - 1 chunk
    micro-batches (Narayanan et al. 2021): on the first stage at most 1.5 x 1F1B's."""
    if vp == 1:
        return min(pp - rank, M)
    return min(M * vp, vp * pp + pp - 2 * rank - 1)


@pytest.mark.parametrize("pp, vp, M", GRID)
def test_every_send_meets_its_receive_and_memory_is_bounded(pp, vp, M):
    if vp > 1 and M % pp:
        with pytest.raises(
            MegaliteError,
            match=f"micro-batches \\({M}\\).*multiple of --pipeline-model-parallel-size {pp}",
        ):
            schedule_ops(pp, 0, M, vp)
        return
    # Each raises ScheduleError on a deadlock, a mismatched transfer, a missing or repeated
    # forward/backward or a broken dependency (e.g. a backward before its grad arrived).
    simulate(pp, M, vp, forward_only=True)  # evaluation
    results = simulate(pp, M, vp)
    for rank, r in enumerate(results):
        assert r.peak_in_flight <= in_flight_bound(pp, rank, M, vp), (rank, r.peak_in_flight)
        assert r.peak_in_flight / vp <= pp + (pp - 1) / vp
    if vp == 1:  # 1F1B's bound is tight: warmup fills exactly PP - rank
        assert [r.peak_in_flight for r in results] == [min(pp - k, M) for k in range(pp)]


@pytest.mark.parametrize("pp, vp", [(2, 1), (4, 1), (2, 2), (4, 2)])
def test_in_flight_does_not_grow_with_microbatches(pp, vp):
    peaks = {M: [r.peak_in_flight for r in simulate(pp, M, vp)] for M in (8, 16, 64)}
    assert peaks[8] == peaks[16] == peaks[64], peaks


@pytest.mark.parametrize(
    "pp, vp, M",
    [(2, 1, 1), (2, 1, 8), (4, 1, 3), (4, 1, 8), (4, 1, 32), (2, 2, 4), (4, 2, 8), (4, 2, 32)],
)
def test_ideal_bubble(pp, vp, M):
    """With forward 1, backward 2 and free transfers: 1F1B idles (PP-1)/(M+PP-1) of the time;
    interleaved (PP-1)/(vp M + PP-1), which the issue's (PP-1)/(M+PP-1)/vp approximates."""
    b = bubble_fraction(simulate(pp, M, vp))
    if vp == 1:
        assert b == pytest.approx(theoretical_bubble(pp, M))
    else:
        assert b == pytest.approx((pp - 1) / (vp * M + pp - 1))
        assert theoretical_bubble(pp, M, vp) < b < theoretical_bubble(pp, M)


def test_the_simulator_catches_broken_schedules():
    good = [schedule_ops(2, r, 4, 2) for r in range(2)]
    # With PP = 2 both neighbours are one rank: posting the grad before the activation in a
    # batch makes the activation land in the grad's buffer.
    swapped = [[Comm(op.ops[::-1]) if isinstance(op, Comm) else op for op in good[0]], good[1]]
    with pytest.raises(ScheduleError, match="sends .* into the receive of"):
        simulate(2, 4, 2, programs=swapped)
    # Both ranks receive before they send: a deadlock.
    both_wait = [
        [Comm((P2P(False, "bwd", 0, 0),)), Forward(0, 0)],
        [Comm((P2P(False, "fwd", 0, 0),)), Forward(0, 0)],
    ]
    with pytest.raises(ScheduleError, match="deadlock"):
        simulate(2, 1, programs=both_wait)
    # A backward before the grad it needs has arrived.
    ops = schedule_ops(2, 0, 2)
    early = [op for op in ops if not isinstance(op, Backward)]
    early.insert(early.index(Forward(0, 0)) + 1, Backward(0, 0))
    with pytest.raises(ScheduleError):
        simulate(2, 2, programs=[early, schedule_ops(2, 1, 2)])


def test_1f1b_order_is_megatrons():
    """Rank 0 of 4 with 6 micro-batches: 3 warmup forwards, 3 x (1F, 1B), 3 backwards."""
    compute = [
        (type(op).__name__[0], op.mb) for op in schedule_ops(4, 0, 6) if not isinstance(op, Comm)
    ]
    assert compute == [
        ("F", 0),
        ("F", 1),
        ("F", 2),
        ("F", 3),
        ("B", 0),
        ("F", 4),
        ("B", 1),
        ("F", 5),
        ("B", 2),
        ("B", 3),
        ("B", 4),
        ("B", 5),
    ]
    # every batch lists forward transfers before backward ones
    for rank in range(4):
        for op in schedule_ops(4, rank, 8, 2):
            if isinstance(op, Comm):
                kinds = [t.kind for t in op.ops]
                assert kinds == sorted(kinds, key=lambda k: k != "fwd")


# -- layout -----------------------------------------------------------------------------------


def test_layout_even_uneven_virtual():
    assert pipeline_layout(8, 2) == [[[0, 1, 2, 3]], [[4, 5, 6, 7]]]
    # virtual stage = chunk * PP + rank: rank 0 holds layers 0-1 and 4-5
    assert pipeline_layout(8, 2, 2) == [[[0, 1], [4, 5]], [[2, 3], [6, 7]]]
    assert pipeline_layout(8, 4, 2) == [[[0], [4]], [[1], [5]], [[2], [6]], [[3], [7]]]
    assert pipeline_layout(7, 4, first=1) == [[[0]], [[1, 2]], [[3, 4]], [[5, 6]]]
    assert pipeline_layout(6, 3, first=1, last=3) == [[[0]], [[1, 2]], [[3, 4, 5]]]
    assert pipeline_layout(8, 2, 2, first=2, last=6) == [[[0], [4]], [[1, 2, 3], [5, 6, 7]]]
    for pp, vp, first, last in [(4, 1, None, 1), (4, 2, None, None), (2, 1, 1, None)]:
        flat = sorted(
            sum(
                (c for r in pipeline_layout(8 if vp > 1 else 7, pp, vp, first, last) for c in r), []
            )
        )
        assert flat == list(range(8 if vp > 1 else 7))
    assert virtual_pipeline_size(8, 2, 2) == 2 and virtual_pipeline_size(8, 2) == 1


@pytest.mark.parametrize(
    "over, world, needle",
    [
        (
            dict(num_layers=6, pipeline_model_parallel_size=4),
            4,
            "--num-layers 6 is not divisible by --pipeline-model-parallel-size 4",
        ),
        (
            dict(
                num_layers=8,
                pipeline_model_parallel_size=2,
                num_layers_per_virtual_pipeline_stage=3,
            ),
            2,
            "--num-layers 8 is not divisible by --pipeline-model-parallel-size 2 x "
            "--num-layers-per-virtual-pipeline-stage 3",
        ),
        (
            dict(num_layers=8, num_layers_per_virtual_pipeline_stage=2),
            1,
            "needs --pipeline-model-parallel-size >= 2",
        ),
        (
            dict(
                num_layers=8,
                pipeline_model_parallel_size=4,
                num_layers_per_virtual_pipeline_stage=1,
                micro_batch_size=1,
                global_batch_size=6,
            ),
            4,
            "multiple of --pipeline-model-parallel-size 4; --global-batch-size 6 / "
            "\\(--micro-batch-size 1 x data-parallel size 1\\) = 6",
        ),
        (
            dict(num_layers=8, pipeline_model_parallel_size=4, decoder_first_pipeline_num_layers=3),
            4,
            "leaves 5 layers for the other 3 of --pipeline-model-parallel-size 4 stages",
        ),
        (
            dict(
                num_layers=8,
                pipeline_model_parallel_size=2,
                decoder_first_pipeline_num_layers=3,
                decoder_last_pipeline_num_layers=4,
            ),
            2,
            "leaves 1 layers for the other 0",
        ),
        (
            dict(num_layers=8, decoder_first_pipeline_num_layers=3),
            1,
            "--decoder-first/last-pipeline-num-layers need --pipeline-model-parallel-size >= 2",
        ),
        (
            dict(num_layers=8, pipeline_model_parallel_size=2, decoder_last_pipeline_num_layers=8),
            2,
            "--decoder-last-pipeline-num-layers 8 must be between 1 and --num-layers 8 - 1",
        ),
        (
            dict(
                num_layers=8,
                pipeline_model_parallel_size=2,
                num_layers_per_virtual_pipeline_stage=2,
                decoder_first_pipeline_num_layers=3,
            ),
            2,
            "pipeline stage 0 has 3 layers, not divisible into 2 virtual stages",
        ),
    ],
)
def test_bad_pipeline_configs_name_the_numbers(over, world, needle):
    from megalite.config import make_config

    with pytest.raises(MegaliteError, match=needle):
        make_config({"mock_data": True, "vocab_size": 256, **over}, world_size=world)


def test_pipeline_flags_parse():
    from megalite.config import parse_config

    cfg = parse_config(
        [
            "--mock-data",
            "--num-layers-per-virtual-pipeline-stage",
            "2",
            "--num-layers",
            "8",
            "--pipeline-model-parallel-size",
            "2",
            "--global-batch-size",
            "8",
            "--decoder-first-pipeline-num-layers",
            "2",
            "--decoder-last-pipeline-num-layers",
            "6",
        ],
        world_size=2,
    )
    p = cfg.parallel
    assert (
        p.num_layers_per_virtual_pipeline_stage,
        p.decoder_first_pipeline_num_layers,
        p.decoder_last_pipeline_num_layers,
    ) == (2, 2, 6)


# -- executor on one process ------------------------------------------------------------------


def _tiny(num_layers=2, **kw):
    from megalite.config import ModelConfig
    from megalite.model.gpt import GPTModel
    from megalite.parallel.layers import init_parameters

    cfg = ModelConfig(num_layers=num_layers, hidden_size=32, num_attention_heads=4, seq_length=16)
    model = GPTModel(cfg, 128, **kw)
    init_parameters(model, 5)
    return model


def _batches(n):
    g = torch.Generator().manual_seed(0)
    return [
        {
            "tokens": torch.randint(0, 128, (2, 16), generator=g),
            "labels": torch.randint(0, 128, (2, 16), generator=g),
        }
        for _ in range(n)
    ]


@pytest.mark.parametrize("scale_kind", ["float", "tensor"])
def test_executor_on_one_stage_equals_gradient_accumulation(scale_kind):
    """The one executor with PP = 1 (the 1F1B program with no transfers) against a plain
    gradient-accumulation loop, bitwise; the loss scale and 1/M reach the grads, the returned
    losses are unscaled. fp16's loss scale is a 0-dim fp32 tensor: the same grads."""
    a, b = _tiny(), _tiny()
    scale = 8.0 if scale_kind == "float" else torch.tensor(8.0)
    la = []
    for batch in _batches(3):  # the reference: what a user would write
        loss = a(batch["tokens"], labels=batch["labels"]).float().mean()
        (loss * (8.0 / 3)).backward()
        la.append(loss.detach())
    lb = pipeline.forward_backward([b], iter(_batches(3)), 3, loss_scale=scale)
    assert all(torch.equal(x, y) for x, y in zip(la, lb))
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p.grad, q.grad), n
    assert [type(op).__name__ for op in schedule_ops(1, 0, 3)] == ["Forward", "Backward"] * 3


def test_freed_output_still_drives_backward():
    """deallocate_output frees the sent activation; backward_from still reaches the input."""
    x = torch.randn(4, 3, requires_grad=True)
    y = torch.randn(4, 3, requires_grad=True)
    out = torch.tanh(x) * 2 + y  # a residual-style sum: AddBackward
    ref = torch.autograd.grad(out, (x, y), torch.ones_like(out), retain_graph=True)
    pipeline.deallocate_output(out)
    assert out.numel() == 1
    pipeline.backward_from(out, torch.ones(4, 3))
    assert torch.equal(x.grad, ref[0]) and torch.equal(y.grad, ref[1])
    kept = torch.tanh(x)  # tanh saves its result: must not be freed
    pipeline.deallocate_output(kept)
    assert kept.shape == (4, 3)


def test_chunks_state_dict_has_global_names_and_loads_back():
    from megalite.training.checkpoint import _load_model_state, model_state_dict

    first = _tiny(4, post_process=False, layer_numbers=[0])
    second = _tiny(4, pre_process=False, layer_numbers=[2])
    sd = model_state_dict([first, second])
    assert set(sd) == set(first.state_dict()) | set(second.state_dict())
    assert any(n.startswith("layers.2.") for n in sd) and not any(
        n.startswith(("0.", "1.", "chunks")) for n in sd
    )
    new = {k: v + 1 for k, v in sd.items()}
    _load_model_state([first, second], new, "test")
    assert torch.equal(
        second.layers["2"].mlp.linear_fc1.weight, new["layers.2.mlp.linear_fc1.weight"]
    )
    with pytest.raises(MegaliteError, match="lacks layers.2"):
        _load_model_state(
            [first, second], {k: v for k, v in new.items() if not k.startswith("layers.2.")}, "test"
        )
