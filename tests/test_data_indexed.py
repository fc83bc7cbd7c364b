"""The .bin/.idx format (docs/ARCHITECTURE.md, "Token shards"): exact bytes, round trips,
corrupt inputs."""

import os
import struct
import subprocess
import sys

import numpy as np
import pytest

from megalite.data import IndexedDataset, IndexedDatasetWriter
from megalite.errors import MegaliteError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def spec_idx(dtype_code, itemsize, lengths, doc_index):
    """The .idx bytes straight from the table in docs/ARCHITECTURE.md, "Token shards" (no
    megalite code involved)."""
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]) * itemsize
    n, d = len(lengths), len(doc_index)
    return (
        b"MMIDIDX\x00\x00"
        + struct.pack("<Q", 1)
        + struct.pack("<B", dtype_code)
        + struct.pack("<Q", n)
        + struct.pack("<Q", d)
        + struct.pack(f"<{n}i", *lengths)
        + struct.pack(f"<{n}q", *[int(o) for o in offsets])
        + struct.pack(f"<{d}q", *doc_index)
    )


def write_worked_example(prefix, dtype):
    # documents [[1,2,3],[4,5]] and [[6,7,8,9]]
    w = IndexedDatasetWriter(prefix, dtype)
    w.add_item([1, 2, 3])
    w.add_item([4, 5])
    w.end_document()
    w.add_document([6, 7, 8, 9], [4])
    w.finalize()


@pytest.mark.parametrize(
    "dtype,code,fmt,offsets", [(np.int32, 4, "<9i", [0, 12, 20]), (np.uint16, 8, "<9H", [0, 6, 10])]
)
def test_worked_example_bytes(tmp_path, dtype, code, fmt, offsets):
    prefix = str(tmp_path / "ex")
    write_worked_example(prefix, dtype)
    idx = open(prefix + ".idx", "rb").read()
    expected = spec_idx(code, np.dtype(dtype).itemsize, [3, 2, 4], [0, 2, 3])
    assert len(expected) == 94 and len(idx) == 94
    assert idx == expected
    assert idx[17] == code
    assert list(struct.unpack("<3q", idx[34 + 12 : 34 + 36])) == offsets
    assert open(prefix + ".bin", "rb").read() == struct.pack(fmt, *range(1, 10))
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]


def test_reader_on_hand_built_files(tmp_path):
    prefix = str(tmp_path / "hand")
    open(prefix + ".idx", "wb").write(spec_idx(4, 4, [3, 2, 4], [0, 2, 3]))
    open(prefix + ".bin", "wb").write(struct.pack("<9i", *range(1, 10)))
    ds = IndexedDataset(prefix)
    assert len(ds) == 3 and ds.num_documents == 2 and ds.dtype == np.int32
    assert [x.tolist() for x in ds] == [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    assert ds.sequence_lengths.tolist() == [3, 2, 4]
    assert ds.sequence_pointers.tolist() == [0, 12, 20]
    assert ds.document_indices.tolist() == [0, 2, 3]
    assert ds.get(2, 1, 2).tolist() == [7, 8]
    assert ds.get(2, 3).tolist() == [9]
    assert ds[-1].tolist() == [6, 7, 8, 9]
    assert [x.tolist() for x in ds[0:2]] == [[1, 2, 3], [4, 5]]
    with pytest.raises(IndexError):
        ds[3]
    with pytest.raises(IndexError):
        ds.get(0, 2, 5)


@pytest.mark.parametrize("dtype,high", [(np.uint16, 65535), (np.int32, 2**31 - 1)])
def test_round_trip(tmp_path, dtype, high):
    rng = np.random.default_rng(0)
    docs = [
        [
            rng.integers(0, high, rng.integers(0, 40), endpoint=True)
            for _ in range(rng.integers(1, 4))
        ]
        for _ in range(300)
    ]
    prefix = str(tmp_path / "rt")
    with IndexedDatasetWriter(prefix, dtype) as w:
        for i, doc in enumerate(docs):
            if i % 3 == 0:
                w.add_document(np.concatenate(doc), [len(s) for s in doc])
            else:
                for s in doc:
                    if i % 3 == 1:
                        w.add_item(s)
                    else:  # the same sequence written in two pieces
                        w.extend_item(s[: len(s) // 2])
                        w.extend_item(s[len(s) // 2 :])
                        w.close_item()
                w.end_document()
    ds = IndexedDataset(prefix)
    flat = [s for doc in docs for s in doc]
    assert ds.dtype == dtype and len(ds) == len(flat) and ds.num_documents == len(docs)
    for got, want in zip(ds, flat):
        assert got.dtype == dtype and np.array_equal(got, want)
    assert ds.document_indices.tolist() == np.cumsum([0] + [len(d) for d in docs]).tolist()
    item = np.dtype(dtype).itemsize
    assert (
        ds.sequence_pointers.tolist()
        == (np.cumsum([0] + [len(s) for s in flat[:-1]]) * item).tolist()
    )


def test_bulk_documents_and_merge(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    with IndexedDatasetWriter(a, np.uint16) as w:
        w.add_documents(np.arange(10, dtype=np.uint16), [3, 0, 7])
    with IndexedDatasetWriter(b, np.int32) as w:
        w.add_document([70000, 1], [1, 1])
    with IndexedDatasetWriter(str(tmp_path / "m"), np.int32) as w:
        w.add_index(a)
        w.add_index(b)
    m = IndexedDataset(str(tmp_path / "m"))
    assert [x.tolist() for x in m] == [[0, 1, 2], [], [3, 4, 5, 6, 7, 8, 9], [70000], [1]]
    assert m.document_indices.tolist() == [0, 1, 2, 3, 5]


def test_empty_shard_and_spool_flush(tmp_path, monkeypatch):
    with IndexedDatasetWriter(str(tmp_path / "e"), np.uint16):
        pass
    e = IndexedDataset(str(tmp_path / "e"))
    assert len(e) == 0 and e.num_documents == 0 and e.num_tokens == 0
    monkeypatch.setattr(IndexedDatasetWriter, "_SPOOL_FLUSH", 7)  # exercise the on-disk spool
    with IndexedDatasetWriter(str(tmp_path / "s"), np.uint16) as w:
        for i in range(50):
            w.add_documents(np.full(i % 4, i, np.uint16), [i % 4])
    s = IndexedDataset(str(tmp_path / "s"))
    assert len(s) == 50 and [x.tolist() for x in s][5] == [5]


def test_interrupted_write_leaves_nothing(tmp_path):
    prefix = str(tmp_path / "x")
    with pytest.raises(RuntimeError):
        with IndexedDatasetWriter(prefix, np.uint16) as w:
            w.add_document([1, 2], [2])
            raise RuntimeError("killed")
    assert os.listdir(tmp_path) == []
    with pytest.raises(MegaliteError, match="does not fit uint16"):
        with IndexedDatasetWriter(prefix, np.uint16) as w:
            w.add_document([70000], [1])
    assert os.listdir(tmp_path) == []


# ---- corrupt inputs: one error naming the file, the problem and the fix ---------------------
@pytest.fixture
def good(tmp_path):
    prefix = str(tmp_path / "good")
    write_worked_example(prefix, np.int32)
    return prefix


def _patch(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def expect_error(prefix, path, *words):
    with pytest.raises(MegaliteError) as e:
        IndexedDataset(prefix)
    msg = str(e.value)
    assert "\n" not in msg and path in msg, msg
    for w in words:
        assert w in msg, msg
    assert "preprocess" in msg, msg  # names the fix
    return msg


def test_bad_magic(good):
    _patch(good + ".idx", 0, b"NOTANIDX\x00")
    expect_error(good, good + ".idx", "bad magic")


def test_unknown_version(good):
    _patch(good + ".idx", 9, struct.pack("<Q", 7))
    expect_error(good, good + ".idx", "unknown index version 7")


def test_wrong_dtype_code(good):
    _patch(good + ".idx", 17, bytes([6]))
    expect_error(good, good + ".idx", "dtype code 6")


def test_truncated_bin(good):
    os.truncate(good + ".bin", 30)
    expect_error(good, good + ".bin", "truncated", "30 bytes", "36")


def test_bin_too_long(good):
    with open(good + ".bin", "ab") as f:
        f.write(b"\0" * 4)
    expect_error(good, good + ".bin", "too long")


def test_truncated_idx(good):
    os.truncate(good + ".idx", 80)
    expect_error(good, good + ".idx", "truncated", "80 bytes")
    os.truncate(good + ".idx", 10)
    expect_error(good, good + ".idx", "truncated")


def test_corrupt_document_index(good):
    _patch(good + ".idx", 94 - 8, struct.pack("<q", 5))
    expect_error(good, good + ".idx", "document boundaries")


@pytest.mark.parametrize("missing", [".idx", ".bin"])
def test_missing_file(good, missing):
    os.remove(good + missing)
    with pytest.raises(MegaliteError, match="not found") as e:
        IndexedDataset(good)
    assert good + missing in str(e.value) and "prefix" in str(e.value)


def test_suffix_is_accepted(good):
    assert len(IndexedDataset(good + ".bin")) == 3


def test_cli_reports_one_line(tmp_path, good):
    os.truncate(good + ".bin", 30)
    cmd = [
        sys.executable,
        "tools/merge_shards.py",
        "--input",
        good,
        "--output-prefix",
        str(tmp_path / "out"),
    ]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "truncated" in lines[0], p.stderr
    p = subprocess.run(cmd + ["--debug"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "Traceback" in p.stderr
