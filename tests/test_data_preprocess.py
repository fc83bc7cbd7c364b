"""tools/train_tokenizer.py, tools/preprocess.py and tools/merge_shards.py through their CLIs."""

import gzip
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from megalite.data import IndexedDataset, build_tokenizer
from megalite.errors import MegaliteError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAKESPEARE = os.path.join(os.path.dirname(REPO), "shared", "data", "tinyshakespeare.txt")
BLANK_SEP = re.compile(r"\n(?:[^\S\n]*\n)+")


def cli(*args, ok=True):
    p = subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    if ok:
        assert p.returncode == 0, p.stderr
    return p


def preprocess(*args, ok=True):
    return cli("tools/preprocess.py", *args, ok=ok)


def one_line_error(p, *words):
    assert p.returncode == 1
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def docs_of(prefix, tok):
    ds = IndexedDataset(prefix)
    return ds, [ds[i] for i in range(len(ds))]


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    subset = d / "subset.txt"
    subset.write_bytes(open(SHAKESPEARE, "rb").read()[:200_000])  # a subset: training takes < 1 s
    p = cli(
        "tools/train_tokenizer.py",
        "--input",
        str(subset),
        "--vocab-size",
        "1000",
        "--model-type",
        "bpe",
        "--output-prefix",
        str(d / "tok"),
    )
    assert "vocab 1000" in p.stdout and "eod id 2" in p.stdout
    return str(d / "tok.model")


def test_shakespeare_end_to_end(tmp_path, spm_model):
    """Train a tokenizer, preprocess with 2 workers, decode the shard: the text comes back."""
    out = str(tmp_path / "shakespeare")
    p = preprocess(
        "--input",
        SHAKESPEARE,
        "--input-format",
        "text",
        "--blank-line-docs",
        "--tokenizer-model",
        spm_model,
        "--append-eod",
        "--workers",
        "2",
        "--chunk-size-mb",
        "0.1",
        "--output-prefix",
        out,
    )
    m = re.match(r"done: ([\d,]+) documents, ([\d,]+) tokens, [\d.]+ s, [\d,]+ tokens/s", p.stdout)
    assert m, p.stdout
    text = open(SHAKESPEARE, encoding="utf-8").read()
    expected = [d.strip("\n") for d in BLANK_SEP.split(text) if d.strip()]
    tok = build_tokenizer(None, spm_model)
    ds, seqs = docs_of(out + "_text_document", tok)
    assert ds.dtype == np.uint16 and len(ds) == ds.num_documents == len(expected)
    assert int(m.group(1).replace(",", "")) == len(expected)
    assert int(m.group(2).replace(",", "")) == ds.num_tokens
    for ids, want in zip(seqs, expected):
        assert ids[-1] == tok.eod and tok.eod not in ids[:-1]
        # sentencepiece's nmt_nfkc folds whitespace runs and line breaks into one space
        assert tok.detokenize(ids[:-1]) == " ".join(want.split())
    # One worker and two workers write byte-identical shards.
    preprocess(
        "--input",
        SHAKESPEARE,
        "--input-format",
        "text",
        "--blank-line-docs",
        "--tokenizer-model",
        spm_model,
        "--append-eod",
        "--workers",
        "1",
        "--output-prefix",
        str(tmp_path / "one"),
    )
    for ext in (".bin", ".idx"):
        assert (
            open(out + "_text_document" + ext, "rb").read()
            == open(str(tmp_path / "one_text_document") + ext, "rb").read()
        )
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]


def test_jsonl_keys_gz_and_cleaning(tmp_path, spm_model):
    rng = np.random.default_rng(0)
    words = open(SHAKESPEARE, encoding="utf-8").read().split()
    rows = []
    for i in range(400):
        body = " ".join(words[j] for j in rng.integers(0, len(words), rng.integers(5, 60)))
        rows.append({"text": f"doc {i}:  {body}\r\n\n\n\tend", "title": f"Title {i}", "id": i})
    rows[10] = dict(rows[3])  # exact duplicates of row 3 ...
    rows[20] = dict(
        rows[3], text=rows[3]["text"].replace("  ", " ")
    )  # ... and one after normalisation
    rows[30]["text"], rows[30]["title"] = "tiny", "t"  # shorter than --min-chars
    rows[31]["text"], rows[31]["title"] = " \n ", ""  # empty
    half = len(rows) // 2
    with open(tmp_path / "a.jsonl", "w") as f:
        f.write("\n".join(json.dumps(r) for r in rows[:half]) + "\n\n")
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write("\n".join(json.dumps(r) for r in rows[half:]))
    out = str(tmp_path / "web")
    p = preprocess(
        "--input",
        str(tmp_path / "a.jsonl"),
        str(tmp_path / "*.gz"),
        "--json-keys",
        "text",
        "title",
        "--tokenizer-model",
        spm_model,
        "--append-eod",
        "--workers",
        "2",
        "--chunk-size-mb",
        "0.004",
        "--dedup",
        "--min-chars",
        "10",
        "--normalize-whitespace",
        "--output-prefix",
        out,
    )
    assert "dropped 2 duplicate, 1 shorter than 10 chars, 1 empty" in p.stdout, p.stdout
    sys.path.insert(0, os.path.join(REPO, "tools"))
    from megalite.data.preprocessing import normalize_whitespace

    keep = [r for i, r in enumerate(rows) if i not in (10, 20, 30, 31)]
    tok = build_tokenizer("sentencepiece", spm_model)
    for key in ("text", "title"):
        ds = IndexedDataset(f"{out}_{key}_document")
        assert len(ds) == ds.num_documents == len(keep)  # both keys stay aligned
        for got, row in zip(ds, keep):
            norm = normalize_whitespace(row[key])
            assert "\n\n\n" not in norm and "  " not in norm and "\r" not in norm
            assert got.tolist() == tok.tokenize(norm) + [tok.eod]


def test_one_document_per_file_in_pieces(tmp_path, spm_model):
    """A file bigger than a chunk is tokenized in pieces cut at line ends and stays one document;
    small files are batched; --dedup works on whole files."""
    big = tmp_path / "big.txt"
    big.write_bytes(open(SHAKESPEARE, "rb").read()[:300_000])
    small = [tmp_path / f"s{i}.txt" for i in range(3)]
    for i, s in enumerate(small):
        s.write_text(f"Small file {i % 2}.\n")  # s2 duplicates s0
    (tmp_path / "copy.txt").write_bytes(big.read_bytes())
    out = str(tmp_path / "files")
    p = preprocess(
        "--input-format",
        "text",
        "--input",
        str(big),
        *map(str, small),
        str(tmp_path / "copy.txt"),
        "--tokenizer-model",
        spm_model,
        "--append-eod",
        "--workers",
        "2",
        "--chunk-size-mb",
        "0.03",
        "--dedup",
        "--output-prefix",
        out,
    )
    assert "dropped 2 duplicate" in p.stdout, p.stdout
    tok = build_tokenizer(None, spm_model)
    ds = IndexedDataset(out + "_text_document")
    assert len(ds) == 3
    assert tok.detokenize(ds[0][:-1]) == " ".join(big.read_text().split())
    assert [tok.detokenize(x[:-1]) for x in ds[1:]] == ["Small file 0.", "Small file 1."]
    # Without cleaning flags the pieces are streamed, never buffered: same result.
    preprocess(
        "--input-format",
        "text",
        "--input",
        str(big),
        "--tokenizer-model",
        spm_model,
        "--append-eod",
        "--chunk-size-mb",
        "0.03",
        "--output-prefix",
        str(tmp_path / "stream"),
    )
    assert np.array_equal(IndexedDataset(str(tmp_path / "stream_text_document"))[0], ds[0])


def test_bad_input_leaves_no_shard(tmp_path, spm_model):
    good = "\n".join(json.dumps({"text": f"line {i} " * 50}) for i in range(2000))
    (tmp_path / "in.jsonl").write_text(good + "\n{not json}\n")
    out = str(tmp_path / "o")
    p = preprocess(
        "--input",
        str(tmp_path / "in.jsonl"),
        "--tokenizer-model",
        spm_model,
        "--workers",
        "2",
        "--chunk-size-mb",
        "0.05",
        "--output-prefix",
        out,
        ok=False,
    )
    one_line_error(p, f"{tmp_path / 'in.jsonl'}:2001: not valid JSON")
    assert os.listdir(tmp_path) == ["in.jsonl"]  # nothing under final or temporary names

    (tmp_path / "k.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    p = preprocess(
        "--input",
        str(tmp_path / "k.jsonl"),
        "--tokenizer-model",
        spm_model,
        "--output-prefix",
        out,
        ok=False,
    )
    one_line_error(p, "k.jsonl:1", "no string field 'text'", "--json-keys")
    p = preprocess(
        "--input",
        str(tmp_path / "nope*.jsonl"),
        "--tokenizer-model",
        spm_model,
        "--output-prefix",
        out,
        ok=False,
    )
    one_line_error(p, "matches no file")
    p = preprocess(
        "--input",
        str(tmp_path / "k.jsonl"),
        "--tokenizer-model",
        str(tmp_path / "missing.model"),
        "--output-prefix",
        out,
        ok=False,
    )
    one_line_error(p, "missing.model not found")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    p = preprocess(
        "--input-format",
        "text",
        "--input",
        str(tmp_path / "latin1.txt"),
        "--tokenizer-model",
        spm_model,
        "--output-prefix",
        out,
        ok=False,
    )
    one_line_error(p, "latin1.txt", "not valid UTF-8")


def test_help_documents_every_flag():
    sys.path.insert(0, os.path.join(REPO, "tools"))
    import preprocess as tool

    text = cli("tools/preprocess.py", "--help").stdout
    flags = [s for a in tool.get_parser()._actions for s in a.option_strings if s.startswith("--")]
    for a in tool.get_parser()._actions:
        assert a.help, a.option_strings
    for flag in flags:
        assert flag in text, flag
    for megatron_flag in (
        "--input",
        "--output-prefix",
        "--json-keys",
        "--tokenizer-type",
        "--tokenizer-model",
        "--append-eod",
        "--workers",
        "--log-interval",
    ):
        assert megatron_flag in flags
    for ours in (
        "--input-format",
        "--blank-line-docs",
        "--dedup",
        "--min-chars",
        "--normalize-whitespace",
        "--dedup-threshold",
        "--minhash-num-perm",
        "--minhash-bands",
        "--minhash-ngram",
        "--minhash-unit",
        "--strip-markup",
        "--remove-invalid-chars",
        "--min-words",
        "--max-symbol-ratio",
        "--max-repeated-line-ratio",
        "--max-repeated-ngram-ratio",
        "--language",
        "--language-threshold",
        "--filter",
        "--report",
    ):
        assert ours in flags
    for choice in ("parquet", "arrow", "near", "exact"):
        assert choice in text
    for default in ("default 0.6", "default 128", "default 32", "default 3", "default 0.5"):
        assert default in " ".join(text.split()), default


def test_merge_shards(tmp_path, spm_model):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    (tmp_path / "a.txt").write_text("one\n\ntwo\n")
    (tmp_path / "b.txt").write_text("three\n")
    for src, out in (("a.txt", a), ("b.txt", b)):
        preprocess(
            "--input-format",
            "text",
            "--blank-line-docs",
            "--input",
            str(tmp_path / src),
            "--tokenizer-model",
            spm_model,
            "--append-eod",
            "--output-prefix",
            out,
        )
    p = cli(
        "tools/merge_shards.py",
        "--input",
        str(tmp_path / "?_text_document"),
        "--output-prefix",
        str(tmp_path / "all"),
    )
    assert "2 shards, 3 documents" in p.stdout
    tok = build_tokenizer(None, spm_model)
    merged = IndexedDataset(str(tmp_path / "all"))
    assert [tok.detokenize(x[:-1]) for x in merged] == ["one", "two", "three"]
    assert merged.document_indices.tolist() == [0, 1, 2, 3]


def test_train_tokenizer_errors(tmp_path):
    (tmp_path / "t.txt").write_text("hello world\n" * 50)
    p = cli(
        "tools/train_tokenizer.py",
        "--input",
        str(tmp_path / "t.txt"),
        "--vocab-size",
        "100",
        "--output-prefix",
        str(tmp_path / "x"),
        ok=False,
    )
    one_line_error(p, "--vocab-size 100", "byte")
    p = cli(
        "tools/train_tokenizer.py",
        "--input",
        str(tmp_path / "t.txt"),
        "--vocab-size",
        "5000",
        "--output-prefix",
        str(tmp_path / "x"),
        ok=False,
    )
    one_line_error(p, "sentencepiece training failed", "--vocab-size")
    # A truncated JSONL line: the line's own error, not sentencepiece's report of the iterator.
    (tmp_path / "t.jsonl").write_text('{"text": "hello world"}\n' * 50 + '{"text": "hel')
    p = cli(
        "tools/train_tokenizer.py",
        "--input",
        str(tmp_path / "t.jsonl"),
        "--vocab-size",
        "300",
        "--output-prefix",
        str(tmp_path / "y"),
        ok=False,
    )
    one_line_error(p, "t.jsonl:51", "fix the line")


# ---- tokenizers ----------------------------------------------------------------------------
def test_tokenizer_front_end(spm_model, tmp_path):
    tok = build_tokenizer(None, spm_model)
    assert tok.vocab_size == 1000 and tok.eod == 2
    assert tok.detokenize(tok.tokenize("To be, or not to be")) == "To be, or not to be"
    assert [list(x) for x in tok.tokenize_batch(["a b", "c"])] == [
        tok.tokenize("a b"),
        tok.tokenize("c"),
    ]
    byte = build_tokenizer("byte", None)
    assert byte.tokenize("hé") == [104, 195, 169] and byte.detokenize([104, 195, 169, 256]) == "hé"
    with pytest.raises(MegaliteError, match="unknown tokenizer type 'gpt5'"):
        build_tokenizer("gpt5", spm_model)
    with pytest.raises(MegaliteError, match="cannot tell the tokenizer type"):
        build_tokenizer(None, str(tmp_path / "vocab.txt"))
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(MegaliteError, match="not a sentencepiece model"):
        build_tokenizer("SentencePieceTokenizer", str(tmp_path / "junk.model"))


def test_huggingface_needs_the_package(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # as if not installed
    with pytest.raises(
        MegaliteError, match=r"needs the `tokenizers` package.*pip install tokenizers"
    ):
        build_tokenizer(None, str(tmp_path / "tokenizer.json"))


def test_huggingface_end_to_end(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    hf = tokenizers.Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    text = open(SHAKESPEARE, encoding="utf-8").read()
    hf.train_from_iterator(text[:100_000].split("\n\n"), trainer)
    hf.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "in.jsonl").write_text(
        "\n".join(json.dumps({"text": d}) for d in text[:50_000].split("\n\n"))
    )
    preprocess(
        "--input",
        str(tmp_path / "in.jsonl"),
        "--tokenizer-type",
        "huggingface",
        "--tokenizer-model",
        str(tmp_path / "tokenizer.json"),
        "--append-eod",
        "--workers",
        "2",
        "--output-prefix",
        str(tmp_path / "hf"),
    )
    tok = build_tokenizer(None, str(tmp_path / "tokenizer.json"))
    assert tok.eod == 0
    ds = IndexedDataset(str(tmp_path / "hf_text_document"))
    docs = text[:50_000].split("\n\n")
    assert len(ds) == len(docs)
    assert all(tok.detokenize(x[:-1]) == d for x, d in zip(ds, docs))  # byte-level BPE is lossless


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 64])
def test_blocks_cut_only_at_document_boundaries(tmp_path, chunk):
    """read_units with tiny reads: blocks rejoin to the input and split into the same documents."""
    from megalite.data.preprocessing import _BLANK_SEP, _cut_blank_line, _cut_line, read_units

    text = b"A1\nA2\n\nB1\r\n \r\nC1\n\n\n\nD1 x\n  \t\nE1\nE2"
    path = tmp_path / "t.txt"
    path.write_bytes(text)
    for cut in (_cut_blank_line, _cut_line):
        units = [u for u, _ in read_units(str(path), chunk, cut)]
        assert b"".join(u.data for u in units) == text
        assert units[-1].last and not any(u.last for u in units[:-1])
        for u in units[:-1]:
            assert u.data.endswith(b"\n")
        if cut is _cut_blank_line:
            docs = [
                d.strip("\r\n")
                for u in units
                for d in _BLANK_SEP.split(u.data.decode())
                if d.strip()
            ]
            assert docs == ["A1\nA2", "B1", "C1", "D1 x", "E1\nE2"]
            lines = [u.line for u in units]
            assert lines == [
                1 + b"".join(x.data for x in units[:i]).count(b"\n") for i in range(len(units))
            ]
