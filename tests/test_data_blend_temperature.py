"""Temperature blending (--data-blend-temperature, --data-blend-by-tokens): the proportions, the
log line, and a deterministic, resumable sample order."""

import json

import numpy as np
import pytest
from conftest import SHAKESPEARE, run_cli
from test_data_gpt_dataset import make_shard

from megalite.config import parse_config
from megalite.data import BlendedDataset, IndexedDatasetWriter, PretrainingSampler
from megalite.data import build_train_valid_test_datasets as build
from megalite.data.blended import blend_weights
from megalite.errors import MegaliteError


def test_blend_weights():
    w = blend_weights([0.9, 0.1], 2.0)
    assert w == pytest.approx(np.sqrt([0.9, 0.1]) / np.sqrt([0.9, 0.1]).sum())
    assert blend_weights([0.9, 0.1], 1.0) == pytest.approx([0.9, 0.1])
    assert blend_weights([3, 1, 0], 1e9) == pytest.approx([0.5, 0.5, 0])  # -> uniform, 0 stays
    assert blend_weights([3e12, 1e12], 0.5) == pytest.approx([0.9, 0.1])  # big counts, T < 1
    with pytest.raises(MegaliteError, match="positive"):
        blend_weights([1, 1], 0)
    with pytest.raises(MegaliteError, match="not all zero"):
        blend_weights([0, 0], 2)


@pytest.fixture
def two_shards(tmp_path):
    big = make_shard(str(tmp_path / "big_text_document"), num_docs=900, seed=1, start=0)
    small = make_shard(str(tmp_path / "small_text_document"), num_docs=100, seed=2, start=10**6)
    return big, small


def origin_of(sample):
    return int(sample[0] >= 10**6)  # 1: from the small shard


@pytest.mark.parametrize("by_tokens", [False, True])
def test_temperature_upsamples_the_small_dataset(two_shards, tmp_path, by_tokens):
    big, small = two_shards
    path = [big.path_prefix, small.path_prefix]
    if not by_tokens:
        path = ["0.9", path[0], "0.1", path[1]]
    base = (
        np.array([big.num_tokens, small.num_tokens], float) if by_tokens else np.array([0.9, 0.1])
    )
    base /= base.sum()
    shares = {}
    for T in (1.0, 3.0):
        train = build(
            path, "100,0,0", 8, (2000, 0, 0), seed=5, cache_dir=str(tmp_path / "c"),
            blend_temperature=T, blend_by_tokens=by_tokens,
        )[0]  # fmt: skip
        assert isinstance(train, BlendedDataset)
        want = base ** (1 / T) / (base ** (1 / T)).sum()
        assert train.weights == pytest.approx(want)
        got = np.bincount([origin_of(train[i]) for i in range(len(train))], minlength=2)
        assert np.abs(got - want * 2000).max() < 1  # within one sample
        shares[T] = got[1] / 2000
        line = train.describe()
        assert line.startswith("data blend (train, 2,000 samples") and "small_text_document" in line
        if T != 1.0:
            assert f"temperature {T:g}" in line
        if by_tokens:
            assert "by token counts" in line and f"{small.num_tokens:,} tokens" in line
    assert shares[3.0] > 1.5 * shares[1.0]  # the small dataset is upsampled


def test_order_is_deterministic_and_resumes(two_shards, tmp_path):
    """Rebuilt (from the cache or from scratch), the blend serves the same samples; a sampler
    resumed at consumed_samples continues the uninterrupted order."""
    big, small = two_shards
    args = (["0.8", big.path_prefix, "0.2", small.path_prefix], "100,0,0", 8, (640, 0, 0))

    def order(cache, consumed=0, steps=None):
        train = build(*args, seed=3, cache_dir=str(tmp_path / cache), blend_temperature=2.0)[0]
        sampler = PretrainingSampler(len(train), consumed, 4, 0, 1)
        batches = [[train[i] for i in b] for b in sampler]
        return [np.concatenate(b) for b in batches[:steps]]

    straight = order("c1")
    assert len(straight) == 160
    rebuilt = order("c2")  # a fresh cache
    cached = order("c1", consumed=4 * 70)  # the first cache, resumed after 70 batches
    assert all(np.array_equal(a, b) for a, b in zip(straight, rebuilt))
    assert len(cached) == 90 and all(np.array_equal(a, b) for a, b in zip(straight[70:], cached))
    plain, tempered = (
        build(*args, seed=3, cache_dir=str(tmp_path / "c1"), blend_temperature=T)[0]
        for T in (1.0, 2.0)
    )
    assert not np.array_equal(plain.dataset_index, tempered.dataset_index)  # its own cache


def test_errors(two_shards, tmp_path):
    big, small = two_shards
    with pytest.raises(MegaliteError, match="give --data-path the prefixes alone"):
        build(["0.5", big.path_prefix, "0.5", small.path_prefix], "1", 8, (10, 0, 0), 0,
              blend_by_tokens=True)  # fmt: skip
    with pytest.raises(MegaliteError, match="--data-blend-temperature must be a positive"):
        parse_config(["--mock-data", "--vocab-size", "256", "--data-blend-temperature", "0"])
    cfg = parse_config(["--data-path", "A", "B", "--data-blend-temperature", "2",
                        "--data-blend-by-tokens"])  # fmt: skip
    assert cfg.data.data_blend_temperature == 2.0 and cfg.data.data_blend_by_tokens


def byte_shard(prefix, speeches):
    w = IndexedDatasetWriter(prefix, dtype=np.uint16)
    for s in speeches:
        tokens = np.frombuffer(s + b"\n\n", dtype=np.uint8)
        w.add_document(tokens, [tokens.size])
    w.finalize()
    return prefix


def test_trainer_logs_the_blend_and_resumes_exactly(tmp_path):
    """Through the trainer: the effective proportions in the log, and 4 iterations + resume
    + 4 give the losses of 8 straight (the same samples in the same order)."""
    speeches = [s for s in open(SHAKESPEARE, "rb").read().split(b"\n\n") if s.strip()]
    a = byte_shard(str(tmp_path / "plays_text_document"), speeches[:6000])
    b = byte_shard(str(tmp_path / "sonnets_text_document"), speeches[6000:6400])
    common = [
        "-m", "megalite.train", "--num-layers", "1", "--hidden-size", "32",
        "--num-attention-heads", "2", "--seq-length", "32", "--micro-batch-size", "2",
        "--global-batch-size", "4", "--vocab-size", "256", "--train-iters", "8",
        "--eval-interval", "1000", "--eval-iters", "1", "--log-interval", "1", "--split", "98,2,0",
        "--data-path", a, b, "--data-blend-by-tokens", "--data-blend-temperature", "2",
        "--data-cache-path", str(tmp_path / "cache"),
    ]  # fmt: skip
    m1, m2, ck = tmp_path / "m1.jsonl", tmp_path / "m2.jsonl", str(tmp_path / "ck")
    p = run_cli([*common, "--metrics-file", str(m1)])
    assert p.returncode == 0, p.stderr
    line = [x for x in p.stdout.splitlines() if x.startswith("data blend (train")]
    assert line and "by token counts, temperature 2" in line[0], p.stdout
    assert "plays_text_document 0." in line[0] and "sonnets_text_document 0." in line[0]
    p = run_cli([*common, "--metrics-file", str(m2), "--save", ck, "--exit-interval", "4"])
    assert p.returncode == 0, p.stderr
    p = run_cli([*common, "--metrics-file", str(m2), "--save", ck, "--load", ck])
    assert p.returncode == 0 and "resumed from" in p.stdout, p.stderr

    def losses(path):
        return [r["loss"] for r in map(json.loads, open(path)) if "loss" in r]

    assert len(losses(m1)) == 8 and losses(m1) == losses(m2)
