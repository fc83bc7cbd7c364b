"""--dedup near: MinHash signatures, the LSH index, and tools/preprocess.py on a generated corpus
with planted near-duplicates."""

import json
import os
import sys

import numpy as np
import pytest
from test_data_preprocess import REPO, SHAKESPEARE, one_line_error, preprocess

from megalite.data import IndexedDataset
from megalite.data import near_dedup as nd

sys.path.insert(0, os.path.join(REPO, "tools", "bench"))
from corpus import near_duplicate_corpus  # noqa: E402


def jaccard(a, b, ngram=3, unit="word"):
    x, _ = nd.shingle_hashes([a], ngram, unit)
    y, _ = nd.shingle_hashes([b], ngram, unit)
    x, y = set(x.tolist()), set(y.tolist())
    return len(x & y) / len(x | y)


def test_signatures_estimate_jaccard():
    """Over planted pairs the estimate is unbiased (mean error within 0.01) with the binomial
    spread sqrt(J(1-J)/num_perm)."""
    texts, source = near_duplicate_corpus(600, seed=1)
    pairs = [(int(s), i) for i, s in enumerate(source) if s >= 0]
    rng = np.random.default_rng(0)
    pairs += [tuple(int(v) for v in rng.integers(0, len(texts), 2)) for _ in range(60)]
    sig = nd.signatures(texts, 128, 3)
    err, z = [], []
    for i, j in pairs:
        if i == j:
            continue
        true = jaccard(texts[i], texts[j])
        est = float((sig[i] == sig[j]).mean())
        err.append(est - true)
        z.append((est - true) / max(np.sqrt(true * (1 - true) / 128), 1 / 128))
    assert abs(np.mean(err)) < 0.01 and np.std(z) < 1.3, (np.mean(err), np.std(z))
    # the same text gives the same signature in any batch; order within the batch is free
    again = nd.signatures(texts[5:9][::-1], 128, 3)[::-1]
    assert np.array_equal(again, sig[5:9])


def test_signature_details():
    # a union's signature is the elementwise minimum (unigrams: no shingle straddles the cut)
    a, b = "alpha beta gamma delta", "gamma epsilon zeta"
    sa, sb, sab = nd.signatures([a, b, a + "\n" + b], 64, 1)
    assert np.array_equal(sab, np.minimum(sa, sb))
    # words: lowercased, punctuation separates; shorter than n words: one shingle
    s1, s2, s3 = nd.signatures(["Hello, World!", "hello world", "hello there"], 64, 5)
    assert np.array_equal(s1, s2) and not np.array_equal(s1, s3)
    empty = nd.signatures(["...", "", "x"], 64, 3)
    assert nd.signature_is_empty(empty).tolist() == [True, True, False]
    # characters: whitespace runs are one space
    c1, c2 = nd.signatures(["Ab  c\nd", "ab c d"], 64, 3, "char")
    assert np.array_equal(c1, c2)
    keys = nd.band_keys(np.stack([s1, s3]), 16)
    assert keys.shape == (2, 16) and len(np.unique(keys)) > 16  # bands are salted apart
    assert nd.candidate_probability(0.6, 128, 32) > 0.98
    assert nd.bytes_per_document(128, 32) == 704


def test_index_keeps_the_first_whatever_the_batching():
    texts, source = near_duplicate_corpus(1500, seed=2)
    sig = nd.signatures(texts, 128, 3)

    def run(batch):
        index = nd.NearDuplicateIndex(128, 32, 0.6)
        keep = np.concatenate([index.check(sig[i : i + batch]) for i in range(0, len(sig), batch)])
        return keep, index

    keep, index = run(len(texts))
    for batch in (1, 7, 250):
        assert np.array_equal(run(batch)[0], keep), batch
    planted = source >= 0
    assert (~keep[planted]).mean() >= 0.9 and (~keep[~planted]).mean() <= 0.01
    assert index.size == keep.sum()
    assert index.nbytes() < index.size * (nd.bytes_per_document(128, 32) + 64) + (1 << 17)
    # a document repeated within a batch: the first stays
    index = nd.NearDuplicateIndex(128, 32, 0.6)
    assert index.check(np.stack([sig[0], sig[1], sig[0], sig[0]])).tolist() == [
        True,
        True,
        False,
        False,
    ]
    assert index.check(sig[:3]).tolist() == [False, False, True]  # sig[2] is new to the index
    # only candidates enter: a document not offered is not a reference for later ones
    index = nd.NearDuplicateIndex(128, 32, 0.6)
    assert index.check(sig[:1], candidates=np.array([False])).tolist() == [True]
    assert index.size == 0 and index.check(sig[:1]).tolist() == [True]


def _write_jsonl(path, texts):
    with open(path, "w") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")


def kept_texts(prefix):
    return [bytes(x.astype(np.uint8)).decode() for x in IndexedDataset(prefix)]


def test_cli_planted_near_duplicates(tmp_path):
    """2000 documents, 10% of them copies of an earlier one with 5% of the words changed, in two
    files (copies of the first file's documents in the second): >= 90% of the copies are
    removed, <= 1% of the distinct documents; 1 and 2 workers write the same shards."""
    texts, source = near_duplicate_corpus(2000, seed=3)
    half = len(texts) // 2
    _write_jsonl(tmp_path / "a.jsonl", texts[:half])
    _write_jsonl(tmp_path / "b.jsonl", texts[half:])
    outs = {}
    for workers in (2, 1):
        out = str(tmp_path / f"w{workers}")
        p = preprocess(
            "--input",
            str(tmp_path / "a.jsonl"),
            str(tmp_path / "b.jsonl"),
            "--tokenizer-type",
            "byte",
            "--workers",
            str(workers),
            "--chunk-size-mb",
            "0.2",
            "--dedup",
            "near",
            "--report",
            out + ".json",
            "--output-prefix",
            out,
        )
        outs[workers] = out
    assert all(
        open(outs[1] + "_text_document" + ext, "rb").read()
        == open(outs[2] + "_text_document" + ext, "rb").read()
        for ext in (".bin", ".idx")
    )
    kept = kept_texts(outs[2] + "_text_document")
    planted = source >= 0
    kept_set = set(kept)
    removed = np.array([t not in kept_set for t in texts])
    recall, false_removal = removed[planted].mean(), removed[~planted].mean()
    assert recall >= 0.9 and false_removal <= 0.01, (recall, false_removal)
    assert kept == [t for t, r in zip(texts, removed) if not r]  # input order, first kept
    cross = [i for i in np.flatnonzero(planted) if i >= half and source[i] < half]
    assert cross and all(removed[i] for i in cross)  # across input files
    report = json.load(open(outs[2] + ".json"))
    n_removed = int(removed.sum())
    assert f"{n_removed:,} near_duplicate" in p.stdout
    assert report["dropped"]["near_duplicate"] == n_removed
    assert report["documents_in"] == len(texts) and report["documents"] == len(kept)
    d = report["dedup"]
    assert (d["mode"], d["num_perm"], d["bands"], d["rows"], d["threshold"]) == (
        "near",
        128,
        32,
        4,
        0.6,
    )
    assert d["signatures"] == len(kept) and d["bytes_per_document"] == 704
    assert report["peak_rss_mb"]["main"] > 0 and report["documents_per_second"] > 0


def test_cli_long_documents_in_pieces(tmp_path):
    """One-document text files larger than a block: the signature is the union of the pieces',
    so a near copy of a long file is found, and exact duplicates still count as such."""
    words = open(SHAKESPEARE, encoding="utf-8").read()[:120_000].split(" ")
    big = " ".join(words)
    rng = np.random.default_rng(0)
    for i in rng.choice(len(words), len(words) // 20, replace=False):
        words[i] = "zzz"
    (tmp_path / "a.txt").write_text(big)
    (tmp_path / "b.txt").write_text(" ".join(words))  # 5% of the words changed
    (tmp_path / "c.txt").write_text(big)  # exact copy
    (tmp_path / "d.txt").write_text("Something else entirely, and short.")
    out = str(tmp_path / "o")
    p = preprocess(
        "--input-format",
        "text",
        "--input",
        *(str(tmp_path / f"{c}.txt") for c in "abcd"),
        "--tokenizer-type",
        "byte",
        "--workers",
        "2",
        "--chunk-size-mb",
        "0.02",
        "--dedup",
        "near",
        "--output-prefix",
        out,
    )
    assert "dropped 1 duplicate" in p.stdout and "1 near_duplicate" in p.stdout, p.stdout
    assert kept_texts(out + "_text_document") == [big, "Something else entirely, and short."]


def test_cli_flag_errors(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n')
    base = ("--input", str(tmp_path / "a.jsonl"), "--tokenizer-type", "byte")
    base += ("--output-prefix", str(tmp_path / "o"))
    p = preprocess(*base, "--dedup", "near", "--minhash-bands", "30", ok=False)
    one_line_error(p, "--minhash-bands 30 must divide --minhash-num-perm 128")
    p = preprocess(*base, "--dedup", "--dedup-threshold", "0.8", ok=False)
    one_line_error(p, "--dedup-threshold applies to --dedup near")
    p = preprocess(*base, "--dedup", "near", "--dedup-threshold", "1.5", ok=False)
    one_line_error(p, "--dedup-threshold must be between 0 and 1")
    p = preprocess(*base, "--dedup", "fuzzy", ok=False)
    assert p.returncode != 0 and "invalid choice" in p.stderr
    assert os.listdir(tmp_path) == ["a.jsonl"]


@pytest.mark.parametrize("unit,ngram", [("char", 5), ("word", 5)])
def test_other_shingles_find_the_planted_copies(unit, ngram):
    texts, source = near_duplicate_corpus(800, seed=4)
    threshold = 0.7 if unit == "char" else 0.5
    index = nd.NearDuplicateIndex(128, 32, threshold)
    keep = index.check(nd.signatures(texts, 128, ngram, unit))
    planted = source >= 0
    assert (~keep[planted]).mean() >= 0.9 and (~keep[~planted]).mean() <= 0.01
