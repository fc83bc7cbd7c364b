"""Packed SFT samples (megalite/data/sft.py): whole conversations, shifted labels and mask,
segment/position ids, truncation, padding, determinism, splits, stats, errors."""

import pickle

import numpy as np
import pytest

from megalite.data import IndexedDataset, IndexedDatasetWriter
from megalite.data.sft import (
    SFTBlendedDataset,
    SFTDataset,
    SFTSource,
    build_sft_datasets,
    collate_samples,
    pack_best_fit_decreasing,
)
from megalite.errors import MegaliteError

S = 32  # seq_length


def make_sft(prefix, num_docs=120, seed=0, max_len=40, start=1, lengths=None):
    """Conversations whose tokens are their global stream positions start, start+1, ... (so any
    token tells where it came from), a random 0/1 loss mask, a few empty documents."""
    rng = np.random.default_rng(seed)
    if lengths is None:
        lengths = rng.integers(1, max_len, num_docs)
        lengths[rng.integers(0, num_docs, 3)] = 0
    lengths = np.asarray(lengths, dtype=np.int64)
    tokens = np.arange(start, start + lengths.sum(), dtype=np.int32)
    mask = rng.integers(0, 2, lengths.sum()).astype(np.uint8)
    with IndexedDatasetWriter(prefix, np.int32) as w:
        w.add_documents(tokens, lengths)
    with IndexedDatasetWriter(prefix + "_loss_mask", np.uint8) as w:
        w.add_documents(mask, lengths)
    return lengths


@pytest.fixture
def data(tmp_path):
    prefix = str(tmp_path / "chat_sft_document")
    lengths = make_sft(prefix)
    return prefix, lengths, str(tmp_path / "cache")


def reference(prefix):
    """The source documents read straight from the shards, independent of sft.py."""
    tok, mask = IndexedDataset(prefix), IndexedDataset(prefix + "_loss_mask")
    return [np.asarray(tok[i]) for i in range(len(tok))], [
        np.asarray(mask[i]) for i in range(len(mask))
    ]


def segments(sample):
    seg = sample["segment_ids"]
    return [np.flatnonzero(seg == s) for s in np.unique(seg)]


def check_sample(sample, docs, masks, expected_docs):
    """Every segment is one whole (or truncated) source conversation, with shifted labels/mask;
    the last segment of a non-full pack is padding. Returns the document ids found."""
    for k in ("tokens", "labels", "loss_mask", "position_ids", "segment_ids"):
        assert sample[k].shape == (S,)
    assert sample["loss_mask"].dtype == np.float32 and sample["tokens"].dtype == np.int64
    first_token_doc = {int(d[0]): i for i, d in enumerate(docs) if len(d)}
    found = []
    seg_ids = sample["segment_ids"]
    assert (np.diff(seg_ids) >= 0).all()  # segments are contiguous
    for s, pos in enumerate(segments(sample)):
        assert (np.diff(pos) == 1).all() and seg_ids[pos[0]] == s
        t = sample["tokens"][pos]
        if s == len(expected_docs):  # padding: its own id, nothing to learn
            assert pos[-1] == S - 1
            assert (t == 0).all() and (sample["labels"][pos] == 0).all()
            assert (sample["loss_mask"][pos] == 0).all()
            assert (sample["position_ids"][pos] < S).all()
            continue
        d = first_token_doc[int(t[0])]
        n = min(len(docs[d]), S)
        assert len(pos) == n and (t == docs[d][:n]).all()  # whole conversation, never split
        np.testing.assert_array_equal(sample["position_ids"][pos], np.arange(n))
        np.testing.assert_array_equal(sample["labels"][pos][:-1], docs[d][1:n])
        np.testing.assert_array_equal(sample["loss_mask"][pos][:-1], masks[d][1:n])
        assert sample["loss_mask"][pos][-1] == 0  # no target across the boundary
        found.append(d)
    assert found == expected_docs
    return found


def test_packs_are_whole_conversations_with_shifted_targets(data):
    prefix, lengths, cache = data
    docs, masks = reference(prefix)
    ds = SFTDataset(prefix, "train", None, S, 10, seed=5, cache_dir=cache)
    assert ds.num_epochs == 1 and len(ds) >= 10
    seen = []
    for i in range(len(ds)):
        seen += check_sample(ds[i], docs, masks, ds.conversations_of(i))
    # one epoch holds every non-empty conversation exactly once
    assert sorted(seen) == [d for d in range(len(lengths)) if lengths[d] > 0]
    assert ds.num_conversations == int((lengths > 0).sum()) and ds.num_empty == 3
    # truncation counted, and truncated conversations fill a whole pack
    assert ds.num_truncated == int((lengths > S).sum()) > 0
    for i in range(len(ds)):
        if any(lengths[d] > S for d in ds.conversations_of(i)):
            assert ds.conversations_of(i).__len__() == 1 and ds[i]["segment_ids"].max() == 0


def test_multi_sequence_documents_and_epochs(tmp_path):
    prefix = str(tmp_path / "multi")
    rng = np.random.default_rng(1)
    with (
        IndexedDatasetWriter(prefix, np.int32) as w,
        IndexedDatasetWriter(prefix + "_loss_mask", np.uint8) as m,
    ):
        start = 1
        for _ in range(20):
            lens = rng.integers(1, 6, 3)
            w.add_document(np.arange(start, start + lens.sum()), lens)
            m.add_document(rng.integers(0, 2, lens.sum()), lens)
            start += lens.sum()
    tok, mask = IndexedDataset(prefix), IndexedDataset(prefix + "_loss_mask")
    docs = [np.concatenate([tok[s] for s in range(3 * d, 3 * d + 3)]) for d in range(20)]
    masks = [np.concatenate([mask[s] for s in range(3 * d, 3 * d + 3)]) for d in range(20)]
    ds = SFTDataset(prefix, "train", None, S, 30, seed=0, cache_dir=str(tmp_path / "c"))
    assert ds.num_epochs > 1 and len(ds) >= 30
    per_epoch = []
    for e in range(ds.num_epochs):
        found = []
        for i in range(int(ds.epoch_index[e]), int(ds.epoch_index[e + 1])):
            found += check_sample(ds[i], docs, masks, ds.conversations_of(i))
        assert sorted(found) == list(range(20))  # each epoch: every conversation once
        per_epoch.append(found)
    assert per_epoch[0] != per_epoch[1]  # reshuffled per epoch


def test_target_count_and_fill_and_describe(data):
    prefix, lengths, cache = data
    docs, masks = reference(prefix)
    ds = SFTDataset(prefix, "train", None, S, 5, seed=0, cache_dir=cache)
    brute = sum(int(m[1 : min(len(m), S)].sum()) for m in masks if len(m))
    assert ds.num_target_tokens == brute
    assert sum(int(ds[i]["loss_mask"].sum()) for i in range(len(ds))) == brute * ds.num_epochs
    used = sum(int((ds[i]["tokens"] != 0).sum()) for i in range(len(ds)))
    assert ds.fill_efficiency == pytest.approx(used / (len(ds) * S))
    assert ds.fill_efficiency > 0.85
    line = ds.describe()
    assert "\n" not in line and "fill" in line and f"{ds.num_truncated:,} truncated" in line
    st = ds.stats()
    assert st["packs"] == len(ds) and st["target_tokens_per_epoch"] == brute


def test_best_fit_decreasing_packs_well():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 513, 5000)
    items, bounds = pack_best_fit_decreasing(lengths, 512, window=1000)
    assert sorted(items.tolist()) == list(range(5000))
    loads = np.add.reduceat(lengths[items], bounds[:-1])
    assert (loads <= 512).all() and (np.diff(bounds) > 0).all()
    assert lengths.sum() / (len(loads) * 512) > 0.95  # next-fit gets ~0.75 here
    again = pack_best_fit_decreasing(lengths, 512, window=1000)
    assert (again[0] == items).all() and (again[1] == bounds).all()
    # packs never span windows
    win = items // 1000
    for a, b in zip(bounds[:-1], bounds[1:]):
        assert len(set(win[a:b].tolist())) == 1


def test_deterministic_and_seeded(data, tmp_path):
    prefix, _, cache = data
    a = SFTDataset(prefix, "train", None, S, 20, seed=3, cache_dir=cache)
    b = SFTDataset(prefix, "train", None, S, 20, seed=3, cache_dir=str(tmp_path / "other"))
    more = SFTDataset(prefix, "train", None, S, 200, seed=3, cache_dir=cache)
    c = SFTDataset(prefix, "train", None, S, 20, seed=4, cache_dir=cache)
    for i in range(len(a)):
        for k, v in a[i].items():
            assert (v == b[i][k]).all() and (v == more[i][k]).all()  # not on num_samples
    assert any(a.conversations_of(i) != c.conversations_of(i) for i in range(len(a)))
    # a pickled copy (a DataLoader worker) re-maps the cache and serves the same samples
    p = pickle.loads(pickle.dumps(a))
    assert all((p[i]["tokens"] == a[i]["tokens"]).all() for i in range(len(a)))


def test_splits_are_disjoint_conversation_ranges(data):
    prefix, lengths, cache = data
    train, valid, test = build_sft_datasets(prefix, "8,1,1", S, (5, 2, 2), 0, cache)
    ranges = [ds.document_range for ds in (train, valid, test)]
    assert ranges[0][0] == 0 and ranges[0][1] == ranges[1][0] and ranges[1][1] == ranges[2][0]
    assert ranges[2][1] == len(lengths)
    sets = [
        {d for i in range(len(ds)) for d in ds.conversations_of(i)} for ds in (train, valid, test)
    ]
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    for ds, found in zip((train, valid, test), sets):
        lo, hi = ds.document_range
        assert found == {d for d in range(lo, hi) if lengths[d] > 0}
    tr, va, te = build_sft_datasets(prefix, "9,1,0", S, (5, 2, 2), 0, cache)
    assert te is None and tr is not None and va is not None
    assert build_sft_datasets(prefix, "9,1,0", S, (5, 0, 0), 0, cache)[1] is None


def test_blend_of_two_sft_prefixes(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    make_sft(a, seed=1, start=1)
    make_sft(b, seed=2, start=100_000)
    train, _, _ = build_sft_datasets(
        ["0.7", a, "0.3", b], "1", S, (40, 0, 0), 0, str(tmp_path / "c")
    )
    assert isinstance(train, SFTBlendedDataset) and len(train) == 40
    from_b = sum(int(train[i]["tokens"][0] >= 100_000) for i in range(40))
    assert 10 <= from_b <= 14
    line = train.describe()
    assert "\n" not in line and "fill" in line
    batch = collate_samples([train[i] for i in range(4)])
    assert batch["tokens"].shape == (4, S) and str(batch["loss_mask"].dtype) == "torch.float32"
    assert all(str(batch[k].dtype) == "torch.int64" for k in ("tokens", "labels", "segment_ids"))


def one_line_error(fn, *words):
    with pytest.raises(MegaliteError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg, msg
    for w in words:
        assert w in msg, msg


def test_errors_are_one_line(tmp_path):
    p = str(tmp_path / "nomask")
    with IndexedDatasetWriter(p, np.int32) as w:
        w.add_documents(np.arange(10), [4, 6])
    one_line_error(lambda: SFTSource(p), p + "_loss_mask", "tools/preprocess.py --sft")

    with IndexedDatasetWriter(p + "_loss_mask", np.uint8) as w:
        w.add_documents(np.ones(10), [4, 3, 3])
    one_line_error(lambda: SFTSource(p), "2 documents", "3")

    with IndexedDatasetWriter(p + "_loss_mask", np.uint8) as w:
        w.add_documents(np.ones(10), [5, 5])
    one_line_error(lambda: SFTSource(p), "document 0 has 4 tokens", "5")

    with IndexedDatasetWriter(p + "_loss_mask", np.int32) as w:
        w.add_documents(np.ones(10), [4, 6])
    one_line_error(lambda: SFTSource(p), "uint8")

    q = str(tmp_path / "few")
    make_sft(q, lengths=[5, 6, 7])
    one_line_error(
        lambda: build_sft_datasets(q, "98,1,1", S, (5, 1, 0), 0, str(tmp_path / "c")),
        "valid split",
        "empty",
    )
    make_sft(q, lengths=[5, 6, 0])  # the test split holds only an empty conversation
    one_line_error(
        lambda: build_sft_datasets(q, "2,0,1", S, (5, 0, 1), 0, str(tmp_path / "c")),
        "test split",
        "no conversations",
    )
