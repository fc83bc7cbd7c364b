"""GPT sample index, splits, cache, blending, data-path parsing."""

import os
import pickle
import shutil
import struct
import subprocess
import time

import numpy as np
import pytest

from megalite.data import (
    BlendedDataset,
    GPTDataset,
    IndexedDataset,
    IndexedDatasetWriter,
    build_train_valid_test_datasets,
    parse_data_path,
    parse_split,
)
from megalite.data import blended as blended_mod
from megalite.data.blended import build_blending_indices, load_blending_kernel
from megalite.data.gpt_dataset import split_document_ranges
from megalite.errors import MegaliteError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_shard(prefix, num_docs=200, seed=0, start=0, max_len=40):
    """Documents of random length (zeros included) whose tokens are their global stream
    positions start, start+1, ...: any sample shows exactly where it came from."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, max_len, num_docs)
    lengths[rng.integers(0, num_docs, 5)] = 0
    tokens = np.arange(start, start + lengths.sum(), dtype=np.int32)
    with IndexedDatasetWriter(prefix, np.int32) as w:
        w.add_documents(tokens, lengths)
    return IndexedDataset(prefix)


def stream_of(ds):
    """The document stream the dataset samples from, rebuilt from its document index."""
    return np.concatenate([ds.indexed[int(d)] for d in ds.document_index]).astype(np.int64)


@pytest.fixture
def shard(tmp_path):
    return make_shard(str(tmp_path / "pos_text_document"))


def test_one_epoch_covers_every_token_once(shard, tmp_path):
    seq = 16
    total = int(shard.sequence_lengths.sum())
    ds = GPTDataset(
        shard, "train", None, seq, total // seq - 1, seed=3, cache_dir=str(tmp_path / "c")
    )
    assert ds.num_epochs == 1 and len(ds) == (total - 1) // seq
    stream = stream_of(ds)
    assert sorted(stream.tolist()) == list(range(total))  # one permutation of the documents
    seen = []
    for i in range(len(ds)):
        s = ds[i]
        assert s.dtype == np.int64 and s.shape == (seq + 1,)
        j = int(ds.shuffle_index[i])
        assert np.array_equal(s, stream[j * seq : j * seq + seq + 1])  # consecutive stream tokens
        seen.append(s[:-1])
    seen = np.concatenate(seen)
    assert len(np.unique(seen)) == len(seen)  # no token is an input twice
    missing = np.setdiff1d(np.arange(total), seen)
    # ... and only the final partial sample (shorter than a sample) is never an input.
    assert len(missing) < seq + 1 and np.array_equal(np.sort(stream[len(ds) * seq :]), missing)
    assert sorted(ds.shuffle_index.tolist()) == list(range(len(ds)))
    assert ds.shuffle_index.tolist() != list(range(len(ds)))


def test_epochs_are_served_in_order(shard, tmp_path):
    seq = 8
    total = int(shard.sequence_lengths.sum())
    ds = GPTDataset(
        shard, "train", None, seq, 3 * total // seq + 1, seed=1, cache_dir=str(tmp_path / "c")
    )
    assert ds.num_epochs == 4
    n = len(shard)
    for e in range(ds.num_epochs):  # each epoch is a permutation of all documents
        assert sorted(ds.document_index[e * n : (e + 1) * n].tolist()) == list(range(n))
    epoch_of = (ds.shuffle_index.astype(np.int64) * seq) // total
    assert np.all(np.diff(epoch_of) >= 0)  # all of epoch e before any of epoch e+1
    stream = stream_of(ds)
    for i in range(0, len(ds), 97):
        j = int(ds.shuffle_index[i])
        assert np.array_equal(ds[i], stream[j * seq : j * seq + seq + 1])


def test_same_seed_same_index_other_seed_different(shard, tmp_path):
    def arrays(seed, cache):
        ds = GPTDataset(shard, "train", None, 16, 100, seed=seed, cache_dir=str(tmp_path / cache))
        return [np.array(getattr(ds, k)) for k in GPTDataset.KINDS]

    a, b, c = arrays(5, "c1"), arrays(5, "c2"), arrays(6, "c3")
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], c[0]) and not np.array_equal(a[2], c[2])


def test_cache_is_reused_and_keyed(shard, tmp_path, monkeypatch):
    cache = str(tmp_path / "c")
    GPTDataset(shard, "train", None, 16, 100, seed=1, cache_dir=cache)
    files = sorted(os.listdir(cache))
    assert len(files) == 4 and not [f for f in files if ".tmp" in f]

    def no_build(self):
        raise AssertionError("rebuilt although the cache was valid")

    monkeypatch.setattr(GPTDataset, "_build", no_build)
    ds = GPTDataset(shard, "train", None, 16, 110, seed=1, cache_dir=cache)  # same epochs: reused
    assert isinstance(ds.sample_index, np.memmap)
    with pytest.raises(AssertionError):
        GPTDataset(shard, "train", None, 32, 100, seed=1, cache_dir=cache)  # other key: rebuild
    # The default cache directory sits beside the shard.
    monkeypatch.undo()
    GPTDataset(shard, "train", None, 16, 100, seed=1)
    assert os.path.isdir(os.path.join(os.path.dirname(shard.path_prefix), "index-cache"))


def test_pickle_is_small_and_remaps(shard, tmp_path):
    ds = GPTDataset(shard, "train", None, 16, 100, seed=1, cache_dir=str(tmp_path / "c"))
    blob = pickle.dumps(ds)
    assert len(blob) < 4096
    again = pickle.loads(blob)
    assert np.array_equal(again[7], ds[7])


def test_parse_split():
    assert parse_split("969,30,1") == pytest.approx([0.969, 0.030, 0.001])
    assert parse_split("98,2") == pytest.approx([0.98, 0.02, 0.0])
    assert parse_split("1") == [1.0, 0.0, 0.0]
    assert parse_split(" 8/1/1 ") == pytest.approx([0.8, 0.1, 0.1])
    for bad in ["", "a,b", "1,2,3,4", "-1,2", "0,0,0", "1,,2", "nan"]:
        with pytest.raises(MegaliteError, match="--split"):
            parse_split(bad)


def test_split_ranges_are_contiguous():
    for n in [1, 7, 100, 12345]:
        ranges = split_document_ranges(n, parse_split("969,30,1"))
        assert ranges[0][0] == 0 and ranges[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))


def test_parse_data_path():
    assert parse_data_path(["A"]) == (["A"], [1.0])
    assert parse_data_path(["A", "B"]) == (["A", "B"], [0.5, 0.5])
    p, w = parse_data_path(["0.3", "A", "0.7", "B.bin"])
    assert p == ["A", "B"] and w == pytest.approx([0.3, 0.7])
    assert parse_data_path("3 A 1 B")[1] == pytest.approx([0.75, 0.25])
    for bad in [[], ["0.3", "A", "B"], ["0.3", "A", "0.7"], ["-1", "A", "2", "B"], ["0", "A"]]:
        with pytest.raises(MegaliteError, match="data-path"):
            parse_data_path(bad)


def test_build_splits(tmp_path):
    shard = make_shard(str(tmp_path / "s_text_document"), num_docs=400)
    train, valid, test = build_train_valid_test_datasets(
        [shard.path_prefix], "80,20,0", 16, (50, 10, 5), seed=2, cache_dir=str(tmp_path / "c")
    )
    assert test is None  # weight 0
    assert len(train) >= 50 and len(valid) >= 10
    docs = shard.document_indices
    tr_hi = (
        int(shard.sequence_pointers[docs[train.document_range[1]]] // 4)
        if train.document_range[1] < len(shard)
        else None
    )
    assert train.document_range == (0, 320) and valid.document_range == (320, 400)
    assert (
        max(int(train[i].max()) for i in range(len(train))) < tr_hi
    )  # train never reads valid's tokens
    assert min(int(valid[i].min()) for i in range(len(valid))) >= tr_hi
    _, v, _ = build_train_valid_test_datasets(
        [shard.path_prefix], "80,20,0", 16, (50, 0, 0), 2, str(tmp_path / "c")
    )
    assert v is None  # 0 samples
    with pytest.raises(MegaliteError, match="valid split .* is empty"):
        build_train_valid_test_datasets(
            [shard.path_prefix], "99999,1,0", 16, (5, 5, 0), 2, str(tmp_path / "c")
        )
    with pytest.raises(MegaliteError, match="num_samples"):
        build_train_valid_test_datasets([shard.path_prefix], "1", 16, (5, -1, 0), 2)


def write_sparse_shard(prefix, lengths):
    """A valid uint16 shard of sum(lengths) tokens without writing them: the .bin is sparse."""
    lengths = np.asarray(lengths, np.int64)
    n = len(lengths)
    with open(prefix + ".idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, 8, n, n + 1))
        f.write(lengths.astype("<i4").tobytes())
        f.write((np.concatenate([[0], np.cumsum(lengths)[:-1]]) * 2).astype("<i8").tobytes())
        f.write(np.arange(n + 1, dtype="<i8").tobytes())
    with open(prefix + ".bin", "wb") as f:
        f.truncate(int(lengths.sum()) * 2)


def test_index_build_is_fast(tmp_path):
    """10^9 tokens in 500k documents, seq 2048: the whole index in seconds (generous bound)."""
    lengths = np.random.default_rng(0).integers(1, 4000, 500_000)
    prefix = str(tmp_path / "big")
    write_sparse_shard(prefix, lengths)
    total = int(lengths.sum())
    t0 = time.perf_counter()
    ds = GPTDataset(
        prefix, "train", None, 2048, total // 2048 - 1, seed=0, cache_dir=str(tmp_path / "c")
    )
    seconds = time.perf_counter() - t0
    assert len(ds) == (total - 1) // 2048 and total > 9 * 10**8
    assert seconds < 20, seconds
    ends = np.cumsum(ds.indexed.sequence_lengths[ds.document_index], dtype=np.int64)
    for k in [0, 1, 12345, len(ds)]:  # sample k starts at stream token k * 2048
        d, o = ds.sample_index[k]
        assert (ends[d - 1] if d else 0) + o == k * 2048


# ---- blending ---------------------------------------------------------------------------
WEIGHT_SETS = [
    [0.3, 0.7],
    [0.5, 0.25, 0.125, 0.125],
    [0.98, 0.01, 0.01],
    [0.5] + [0.005] * 100,
    list(np.random.default_rng(1).dirichlet(np.ones(10) * 0.3)),
    [7.241e-01, 2.291e-01, 2.000e-04, 4.400e-03, 4.120e-02, 9.000e-04],  # breaks Megatron's greedy
]


def max_deviation(weights, dataset_index):
    counts = np.zeros((len(dataset_index), len(weights)))
    counts[np.arange(len(dataset_index)), dataset_index] = 1
    counts = np.cumsum(counts, axis=0)
    n = np.arange(1, len(dataset_index) + 1)[:, None]
    return np.abs(counts - np.asarray(weights)[None] * n).max()


@pytest.mark.parametrize("weights", WEIGHT_SETS, ids=lambda w: f"{len(w)}ds")
def test_blending_within_one_sample_at_every_prefix(weights, monkeypatch):
    monkeypatch.setenv("MEGALITE_KERNELS", "reference")
    w = np.asarray(weights) / np.sum(weights)
    size = 3000 if len(w) < 50 else 1200
    di, dsi = build_blending_indices(w, size)
    assert max_deviation(w, di) < 1.0
    for d in range(len(w)):  # each dataset's samples are taken in order 0, 1, 2, ...
        assert dsi[di == d].tolist() == list(range(int((di == d).sum())))


@pytest.fixture(scope="module")
def standalone_kernel(tmp_path_factory):
    """csrc/data_index.cpp compiled on its own (a second), to check it against Python."""
    if shutil.which("g++") is None:
        pytest.skip("no g++")
    out = str(tmp_path_factory.mktemp("kernel") / "libdata_index.so")
    subprocess.run(
        ["g++", "-O3", "-shared", "-fPIC", "-o", out, os.path.join(REPO, "csrc", "data_index.cpp")],
        check=True,
    )
    return load_blending_kernel(out)


@pytest.mark.parametrize("weights", WEIGHT_SETS, ids=lambda w: f"{len(w)}ds")
def test_blending_cpp_matches_python(weights, standalone_kernel, monkeypatch):
    monkeypatch.setenv("MEGALITE_KERNELS", "reference")
    w = np.asarray(weights) / np.sum(weights)
    py = build_blending_indices(w, 5000)
    cpp = build_blending_indices(w, 5000, kernel=standalone_kernel)
    assert np.array_equal(py[0], cpp[0]) and np.array_equal(py[1], cpp[1])
    t0 = time.perf_counter()
    build_blending_indices(np.array([0.2, 0.3, 0.5]), 10**7, kernel=standalone_kernel)
    assert time.perf_counter() - t0 < 5  # 10^7 samples: C++ speed, not Python's


def test_blended_dataset_end_to_end(tmp_path):
    a = make_shard(str(tmp_path / "a_text_document"), num_docs=300, seed=1, start=0)
    b = make_shard(str(tmp_path / "b_text_document"), num_docs=300, seed=2, start=10**6)
    cache = str(tmp_path / "c")
    train, valid, test = build_train_valid_test_datasets(
        ["0.3", a.path_prefix, "0.7", b.path_prefix],
        "90,10,0",
        8,
        (400, 40, 0),
        seed=4,
        cache_dir=cache,
    )
    assert (
        isinstance(train, BlendedDataset)
        and len(train) == 400
        and len(valid) == 40
        and test is None
    )
    from_b = np.array([train[i][0] >= 10**6 for i in range(len(train))])
    assert abs(from_b.sum() - 0.7 * 400) < 1
    for i in range(0, 400, 37):  # item i is the right constituent's sample
        d, s = int(train.dataset_index[i]), int(train.dataset_sample_index[i])
        assert np.array_equal(train[i], train.datasets[d][s])
    again = build_train_valid_test_datasets(
        ["0.3", a.path_prefix, "0.7", b.path_prefix],
        "90,10,0",
        8,
        (400, 40, 0),
        seed=4,
        cache_dir=cache,
    )[0]
    assert all(np.array_equal(train[i], again[i]) for i in range(0, 400, 13))
    assert len(pickle.dumps(train)) < 16384 and np.array_equal(
        pickle.loads(pickle.dumps(train))[5], train[5]
    )


def test_native_blending_used_when_built(monkeypatch):
    """With megalite._C built from the current csrc/, the C++ kernel is picked up through ctypes."""
    monkeypatch.setattr(blended_mod, "_native_fn", None)
    fn = blended_mod._native()
    if fn is None:
        pytest.skip("megalite._C not built with csrc/data_index.cpp (reinstall to include it)")
    di, _ = build_blending_indices(np.array([0.3, 0.7]), 1000)
    monkeypatch.setenv("MEGALITE_KERNELS", "reference")
    assert np.array_equal(di, build_blending_indices(np.array([0.3, 0.7]), 1000)[0])
