"""Config: flags, YAML, presets and validation, each error naming the flag."""

import pytest

import dataclasses

from megalite.config import Config, make_config, parse_config
from megalite.errors import MegaliteError


def test_flags_set_fields_of_every_section():
    cfg = parse_config(
        [
            "--num-layers",
            "3",
            "--hidden-size",
            "96",
            "--lr",
            "1e-3",
            "--micro-batch-size",
            "2",
            "--data-path",
            "0.3",
            "A",
            "0.7",
            "B",
            "--save",
            "ck",
            "--log-interval",
            "5",
            "--bf16",
            "--tensor-model-parallel-size",
            "2",
            "--lr-decay-style",
            "wsd",
        ],
        world_size=2,
    )
    assert cfg.model.num_layers == 3 and cfg.model.hidden_size == 96
    assert cfg.optimizer.lr == 1e-3 and cfg.optimizer.lr_decay_style == "wsd"
    assert cfg.training.micro_batch_size == 2 and cfg.training.bf16
    assert cfg.data.data_path == ["0.3", "A", "0.7", "B"]
    assert cfg.checkpoint.save == "ck" and cfg.logging.log_interval == 5
    assert cfg.parallel.tensor_model_parallel_size == 2


def test_yaml_flat_and_sectioned_and_flags_override(tmp_path):
    flat = tmp_path / "flat.yaml"
    flat.write_text("num_layers: 6\nlr: 0.002\nmodel_style: llama\n")
    cfg = parse_config(["--config", str(flat), "--lr", "0.005"])
    assert cfg.model.num_layers == 6
    assert cfg.optimizer.lr == 0.005  # the flag wins over the file
    assert cfg.model.normalization == "RMSNorm" and cfg.model.swiglu  # preset applied

    nested = tmp_path / "nested.yaml"
    nested.write_text(
        "model:\n  num_layers: 5\n  model_style: llama\n  swiglu: false\n"
        "optimizer:\n  min_lr: 0.0001\n"
    )
    cfg = parse_config(["--config", str(nested)])
    assert cfg.model.num_layers == 5 and cfg.optimizer.min_lr == 1e-4
    assert cfg.model.swiglu is False  # explicit setting beats the preset
    assert cfg.model.position_embedding_type == "rope"


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--num-layer", "3"], "--num-layer"),
        (["--lr", "fast"], "--lr"),
        (["--lr-decay-style", "step"], "--lr-decay-style"),
        (["--micro-batch-size", "1.5"], "--micro-batch-size"),
    ],
)
def test_unknown_flag_or_bad_value_names_the_flag(argv, needle):
    with pytest.raises(MegaliteError, match=needle):
        parse_config(argv)


def test_yaml_errors_name_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("num_layerz: 3\n")
    with pytest.raises(MegaliteError, match="num_layerz.*did you mean 'num_layers'"):
        parse_config(["--config", str(bad)])
    bad.write_text("lr: fast\n")
    with pytest.raises(MegaliteError, match="'lr'.*float"):
        parse_config(["--config", str(bad)])
    with pytest.raises(MegaliteError, match="not found"):
        parse_config(["--config", str(tmp_path / "missing.yaml")])


def _config(world=1, **over):
    return make_config({"mock_data": True, "vocab_size": 256, **over}, world_size=world)


@pytest.mark.parametrize(
    "over, world, needle",
    [
        (dict(global_batch_size=10, micro_batch_size=4), 1, "--global-batch-size 10.*4"),
        (dict(global_batch_size=12, micro_batch_size=4), 2, "data-parallel size 2"),
        (dict(hidden_size=65), 1, "--hidden-size 65"),
        (dict(tensor_model_parallel_size=3), 6, "--num-attention-heads 4 is not divisible"),
        (dict(tensor_model_parallel_size=2), 3, "world size 3"),
        (dict(min_lr=1.0), 1, "--min-lr"),
        (dict(bf16=True, fp16=True), 1, "--bf16 and --fp16"),
        (dict(num_layers=0), 1, "--num-layers"),
    ],
)
def test_validation_names_the_numbers(over, world, needle):
    with pytest.raises(MegaliteError, match=needle):
        _config(world, **over)


def test_parsing_checks_the_layout_for_the_world_size():
    with pytest.raises(MegaliteError, match="world size 3"):
        parse_config(["--mock-data", "--tensor-model-parallel-size", "2"], world_size=3)


def test_missing_data_is_an_error_when_the_data_is_built():
    from megalite.training.batches import build_datasets

    with pytest.raises(MegaliteError, match="--data-path"):
        build_datasets(parse_config([]), 256)


def test_defaults_are_resolved_once_and_the_config_is_a_value():
    cfg = _config(4, micro_batch_size=3)
    assert cfg.training.global_batch_size == 12
    assert cfg.num_microbatches == 1 and cfg.data_parallel_size == 4
    assert cfg.parallel.ddp_bucket_size == 40_000_000
    assert cfg.optimizer.lr_decay_iters == cfg.training.train_iters
    assert cfg.model.ffn_hidden_size == 4 * cfg.model.hidden_size
    llama = _config(model_style="llama", hidden_size=96)
    assert llama.model.ffn_hidden_size == 256  # 8h/3 rounded up to 64
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.training.micro_batch_size = 5


def test_config_module_imports_neither_model_nor_parallel_code():
    import subprocess
    import sys

    code = (
        "import sys, megalite.config; "
        "bad = [m for m in sys.modules if m.startswith(('megalite.model', "
        "'megalite.parallel', 'megalite.training'))]; print(bad); sys.exit(bool(bad))"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_round_trip_through_dict():
    cfg = parse_config(["--model-style", "llama", "--num-layers", "7", "--data-path", "X"])
    again = Config.from_dict(cfg.to_dict())
    assert again == cfg
