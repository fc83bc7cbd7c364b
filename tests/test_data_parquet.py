"""Parquet and Arrow IPC input of tools/preprocess.py: the same shards as JSONL, streamed by row
group, with one-line errors (pyarrow is optional)."""

import json
import os

import numpy as np
import pytest
from test_data_preprocess import REPO, SHAKESPEARE, one_line_error, preprocess

pa = pytest.importorskip(
    "pyarrow", reason="Parquet/Arrow input needs pyarrow (pip install pyarrow)"
)
import pyarrow.parquet as pq  # noqa: E402

from megalite.data.preprocessing import make_tasks  # noqa: E402


def rows(n=600):
    rng = np.random.default_rng(0)
    words = open(SHAKESPEARE, encoding="utf-8").read().split()
    out = []
    for i in range(n):
        body = " ".join(words[j] for j in rng.integers(0, len(words), rng.integers(0, 80)))
        out.append({"text": f"{body}  é\r\n\n\n<b>ünï</b> {i % 50}", "title": f"T{i % 7} ✓"})
    out[5] = {"text": "", "title": " "}  # empty
    out[12] = {"text": out[11]["text"] + " and one word more", "title": "near"}  # near copy
    out[9] = dict(out[3])  # exact duplicate
    return out


def write_all(tmp_path, data):
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in data))
    table = pa.table(
        {
            "id": list(range(len(data))),
            "text": [r["text"] for r in data],
            "title": pa.array([r["title"] for r in data], pa.large_string()),
        }
    )
    pq.write_table(table, tmp_path / "docs.parquet", row_group_size=97)
    with pa.OSFile(str(tmp_path / "docs.arrow"), "wb") as f:  # the IPC file format
        with pa.ipc.new_file(f, table.schema) as w:
            for b in table.to_batches(max_chunksize=61):
                w.write_batch(b)
    with pa.OSFile(str(tmp_path / "stream.arrow"), "wb") as f:  # the streaming format
        with pa.ipc.new_stream(f, table.schema) as w:
            for b in table.to_batches(max_chunksize=200):
                w.write_batch(b)
    return ["docs.jsonl", "docs.parquet", "docs.arrow", "stream.arrow"]


def read_bytes(prefix, key):
    return tuple(open(f"{prefix}_{key}_document{ext}", "rb").read() for ext in (".bin", ".idx"))


def test_same_shards_as_jsonl(tmp_path):
    """JSONL, Parquet (row groups of 97), Arrow file and stream, by extension, two keys, 2
    workers, small blocks, cleaning and near dedup: byte-identical shards."""
    names = write_all(tmp_path, rows())
    outs = []
    for name in names:
        out = str(tmp_path / ("out_" + name.replace(".", "_")))
        p = preprocess(
            "--input",
            str(tmp_path / name),
            "--json-keys",
            "text",
            "title",
            "--tokenizer-type",
            "byte",
            "--append-eod",
            "--workers",
            "2",
            "--chunk-size-mb",
            "0.01",
            "--normalize-whitespace",
            "--strip-markup",
            "--dedup",
            "near",
            "--output-prefix",
            out,
        )
        assert "1 empty" in p.stdout and "1 duplicate" in p.stdout, p.stdout
        assert "1 near_duplicate" in p.stdout, p.stdout
        outs.append(out)
    for key in ("text", "title"):
        want = read_bytes(outs[0], key)
        for out in outs[1:]:
            assert read_bytes(out, key) == want, (out, key)


def test_streamed_by_row_group(tmp_path):
    """Units cover about a block each and come as the file is read, not after."""
    write_all(tmp_path, rows(2000))
    path = str(tmp_path / "docs.parquet")
    tasks = make_tasks([path], None, False, 1 << 12, ("text",))
    first, done = next(tasks)
    assert first[0].fmt == "arrow" and first[0].line == 1 and done < os.path.getsize(path)
    units = [u for batch, _ in [(first, done), *tasks] for u in batch]
    assert [u.line for u in units] == sorted(u.line for u in units)
    assert sum(len(u.data[0][1]) - 1 for u in units) == 2000
    assert max(u.nbytes() for u in units) < 3 * (1 << 12)


def test_errors_are_one_line(tmp_path):
    write_all(tmp_path, rows(50))
    base = ("--tokenizer-type", "byte", "--output-prefix", str(tmp_path / "o"))
    p = preprocess(
        "--input", str(tmp_path / "docs.parquet"), "--json-keys", "body", *base, ok=False
    )
    one_line_error(p, "docs.parquet: no column 'body' (it has: id, text, title)", "--json-keys")
    p = preprocess("--input", str(tmp_path / "docs.arrow"), "--json-keys", "id", *base, ok=False)
    one_line_error(p, "column 'id' holds int64, not strings (string columns: text, title)")
    pq.write_table(pa.table({"text": ["a", None, "c"]}), tmp_path / "nulls.parquet")
    p = preprocess("--input", str(tmp_path / "nulls.parquet"), *base, ok=False)
    one_line_error(p, "nulls.parquet: row 2: column 'text' is null")
    (tmp_path / "fake.parquet").write_text("not parquet at all\n")
    p = preprocess("--input", str(tmp_path / "fake.parquet"), *base, ok=False)
    one_line_error(p, "fake.parquet: cannot read it as Parquet", "--input-format")
    p = preprocess(
        "--input", str(tmp_path / "docs.jsonl"), "--input-format", "arrow", *base, ok=False
    )
    one_line_error(p, "docs.jsonl: cannot read it as Arrow IPC")
    assert not [f for f in os.listdir(tmp_path) if f.startswith("o_")]


def test_without_pyarrow(tmp_path, monkeypatch):
    """pyarrow missing: Parquet input is one line naming the package; JSONL still works."""
    write_all(tmp_path, rows(20))
    stub = tmp_path / "stub" / "pyarrow"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("raise ImportError('No module named pyarrow')\n")
    path = os.environ.get("PYTHONPATH")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(stub.parent), path or REPO]))
    base = ("--tokenizer-type", "byte", "--output-prefix", str(tmp_path / "o"))
    p = preprocess("--input", str(tmp_path / "docs.parquet"), *base, ok=False)
    one_line_error(p, "Parquet input needs the `pyarrow` package: pip install pyarrow")
    p = preprocess("--input", str(tmp_path / "docs.jsonl"), *base)
    assert "done: 19 documents" in p.stdout, p.stdout
