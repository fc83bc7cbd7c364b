"""Cleaning filters of tools/preprocess.py: each function, then each flag through the CLI with its
count by name in the summary and in --report."""

import json

import numpy as np
import pytest
from test_data_preprocess import SHAKESPEARE, one_line_error, preprocess

from megalite.data import IndexedDataset
from megalite.data import cleaning as c
from megalite.errors import MegaliteError

PROSE = " ".join(open(SHAKESPEARE, encoding="utf-8").read()[:40_000].split())


def prose(i, words=80):
    w = PROSE.split(" ")
    start = (i * 131) % (len(w) - words)
    return " ".join(w[start : start + words])


def test_strip_markup():
    html = (
        "<html><head><title>T</title><style>p {x: 1}</style></head><body><h1>Title</h1>"
        "<p>Fish &amp; chips &lt;3 &#233;t&eacute;</p><script>if (a < b) x();</script>"
        "<!-- hidden --><div>a < b and c > d</div><br/>end</body></html>"
    )
    assert c.strip_markup(html) == "\nTitle\n\nFish & chips <3 été\n\na < b and c > d\n\nend"
    assert c.strip_markup("no markup, 3 < 4") == "no markup, 3 < 4"


def test_remove_invalid_chars():
    s = "a\x00b\x07\x1b[0m\tc\r\nd\ufffde\ud800f\x85g\ufeffh\uffffi"
    assert c.remove_invalid_chars(s) == "ab[0m\tc\r\ndefghi"
    assert c.remove_invalid_chars("Grüße, 你好 🙂") == "Grüße, 你好 🙂"


def test_measures():
    assert c.symbol_counts("Hello, world! (It's fine) -- “quoted”…") == (0, 33)
    assert c.symbol_counts("{{#if}} <a> | $x") == (9, 13)
    assert c.repeated_line_fraction("a\nb\n\na\na\nccc") == pytest.approx(max(2 / 5, 2 / 7))
    top, dup = c.ngram_thresholds(0.15)
    assert top == {2: 0.2, 3: 0.18, 4: 0.16} and dup == {
        5: 0.15,
        6: 0.14,
        7: 0.13,
        8: 0.12,
        9: 0.11,
        10: 0.1,
    }
    assert not c.repeated_ngram_fails(PROSE[:8000], top, dup)
    assert c.repeated_ngram_fails("buy cheap pills now " * 20, top, dup)  # repeated 5..10-grams
    # one 2-gram over 20% of the characters, nothing longer repeated
    filler = " ".join(f"word{i}" for i in range(15))
    assert c.repeated_ngram_fails("the cat " * 3 + filler, top, dup)
    assert not c.repeated_ngram_fails("the cat " * 2 + filler, top, dup)  # 12/103 < 20%


def test_language_by_script():
    def share(text, *codes):
        return c.language_share(c.script_counts(text), c.parse_languages(list(codes)))

    assert share("Hello world, 123!", "en") == 1.0
    assert share("Привет, мир! hello", "ru") == pytest.approx(9 / 14)
    assert share("Привет, мир! hello", "en", "ru") == pytest.approx(9 / 14)
    assert share("日本語のテキストです", "ja") == 1.0 and share("日本語のテキストです", "zh") == 0.0
    assert share("中文文本内容", "zh") == 1.0 and share("中文文本内容", "ja") == 0.0
    assert share("한국어 텍스트", "ko") == 1.0 and share("مرحبا بالعالم", "ar") == 1.0
    assert share("12345 !!!", "en") == 0.0  # no letters
    assert share("Ελληνικά", "greek") == 1.0  # a script name works too
    with pytest.raises(MegaliteError, match="--language 'xx' is not known"):
        c.parse_languages(["en,xx"])


def test_load_filter(tmp_path, monkeypatch):
    (tmp_path / "myfilters.py").write_text("def f(t):\n    return 'spam' not in t\n")
    monkeypatch.chdir(tmp_path)
    assert c.load_filter("myfilters:f")("eggs") is True
    assert c.load_filter(str(tmp_path / "myfilters.py") + ":f")("spam") is False
    with pytest.raises(MegaliteError, match="has no callable 'g'"):
        c.load_filter("myfilters:g")
    with pytest.raises(MegaliteError, match="importing nosuchmodule failed"):
        c.load_filter("nosuchmodule:f")
    with pytest.raises(MegaliteError, match="give MODULE:FUNCTION"):
        c.load_filter("myfilters")


def decoded(prefix):
    return [bytes(x.astype(np.uint8)).decode() for x in IndexedDataset(prefix)]


def test_cli_every_filter_counted_by_name(tmp_path):
    """One document for each filter to drop, transforms to apply, the rest kept."""
    keep = [prose(i) for i in range(6)]
    docs = [
        keep[0],
        "<p>" + keep[1] + " &amp; more</p>",  # markup stripped, kept
        keep[2] + "\x00\ufffd",  # invalid characters removed, kept
        "too short to keep",  # min_words
        prose(7, 30) + " " + "{}[]<>|#@$%^*~=+/\\" * 20,  # symbol_ratio
        "\n".join([prose(8, 12)] * 6 + [prose(9, 40)]),  # repeated_lines
        prose(10, 30) + " " + "one two three four five six " * 8,  # repeated_ngrams
        "Это русский текст, который состоит из достаточного количества слов для фильтра "
        * 8,  # language
        keep[3] + " FORBIDDEN",  # the user's filter
        keep[4],
        keep[5] + " REPLACE-ME",  # the user's filter rewrites it
    ]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    (tmp_path / "userfilter.py").write_text(
        "def keep(text):\n"
        "    if 'FORBIDDEN' in text:\n"
        "        return False\n"
        "    return text.replace(' REPLACE-ME', '') if 'REPLACE-ME' in text else True\n"
    )
    out = str(tmp_path / "o")
    flags = [
        "--strip-markup",
        "--remove-invalid-chars",
        "--normalize-whitespace",
        "--min-words",
        "20",
        "--max-symbol-ratio",
        "0.1",
        "--max-repeated-line-ratio",
        "0.3",
        "--max-repeated-ngram-ratio",
        "0.15",
        "--language",
        "en",
        "--filter",
        str(tmp_path / "userfilter.py") + ":keep",
    ]
    p = preprocess(
        "--input",
        str(tmp_path / "in.jsonl"),
        "--tokenizer-type",
        "byte",
        "--workers",
        "2",
        *flags,
        "--report",
        str(tmp_path / "r.json"),
        "--output-prefix",
        out,
    )
    assert (
        "dropped 0 duplicate, 0 shorter than 0 chars, 0 empty, 1 min_words, 1 symbol_ratio, "
        "1 language, 1 repeated_lines, 1 repeated_ngrams, 1 filter; changed 1 strip_markup, "
        "1 invalid_chars, 1 filter" in p.stdout
    ), p.stdout
    got = decoded(out + "_text_document")
    assert got == [keep[0], keep[1] + " & more", keep[2], keep[4], keep[5]]
    r = json.load(open(tmp_path / "r.json"))
    assert r["dropped"] == {
        "empty": 0,
        "min_words": 1,
        "symbol_ratio": 1,
        "language": 1,
        "repeated_lines": 1,
        "repeated_ngrams": 1,
        "filter": 1,
    }
    assert r["changed"] == {"strip_markup": 1, "invalid_chars": 1, "filter": 1}
    assert r["documents_in"] == len(docs) and r["documents"] == 5
    # one worker, the same shards
    preprocess(
        "--input",
        str(tmp_path / "in.jsonl"),
        "--tokenizer-type",
        "byte",
        *flags,
        "--output-prefix",
        str(tmp_path / "one"),
    )
    assert decoded(str(tmp_path / "one_text_document")) == got


def test_cli_filters_on_long_documents_in_pieces(tmp_path):
    """A one-document file larger than a block: word counts and letters per script are summed
    over the pieces; a repetitive piece drops the whole document."""
    book = open(SHAKESPEARE, encoding="utf-8").read()[:100_000]
    (tmp_path / "book.txt").write_text(book)
    (tmp_path / "spam.txt").write_text(book[:50_000] + "\n" + "BUY NOW\n" * 20_000)
    (tmp_path / "short.txt").write_text("only a few words here")
    out = str(tmp_path / "o")
    p = preprocess(
        "--input-format",
        "text",
        "--input",
        *(str(tmp_path / f) for f in ("book.txt", "spam.txt", "short.txt")),
        "--tokenizer-type",
        "byte",
        "--workers",
        "2",
        "--chunk-size-mb",
        "0.02",
        "--min-words",
        "10",
        "--max-repeated-line-ratio",
        "0.5",
        "--language",
        "en",
        "--output-prefix",
        out,
    )
    assert "1 min_words, 0 language, 1 repeated_lines" in p.stdout, p.stdout
    assert decoded(out + "_text_document") == [book]


def test_cli_filter_errors(tmp_path):
    (tmp_path / "in.jsonl").write_text(json.dumps({"text": "some text here"}) + "\n")
    (tmp_path / "bad.py").write_text(
        "def boom(t):\n    raise ValueError('no way')\n\ndef odd(t):\n    return 3.5\n"
    )
    base = ["--input", str(tmp_path / "in.jsonl"), "--tokenizer-type", "byte"]
    base += ["--output-prefix", str(tmp_path / "o")]
    p = preprocess(
        *base, "--filter", str(tmp_path / "bad.py") + ":boom", "--workers", "2", ok=False
    )
    one_line_error(p, "bad.py:boom raised ValueError: no way")
    p = preprocess(*base, "--filter", str(tmp_path / "bad.py") + ":odd", ok=False)
    one_line_error(p, "returned float", "True to keep")
    p = preprocess(*base, "--filter", "no_such_module_x:f", ok=False)
    one_line_error(p, "importing no_such_module_x failed")
    p = preprocess(*base, "--language", "klingon", ok=False)
    one_line_error(p, "--language 'klingon' is not known")
    p = preprocess(*base, "--language-threshold", "0.7", ok=False)
    one_line_error(p, "--language-threshold applies to --language")
    p = preprocess(*base, "--max-symbol-ratio", "2", ok=False)
    one_line_error(p, "--max-symbol-ratio must be between 0 and 1")
    assert sorted(f.name for f in tmp_path.iterdir()) == ["bad.py", "in.jsonl"]


def test_multiple_keys_are_judged_together(tmp_path):
    rows = [
        {"text": prose(1, 15), "title": "A title"},  # 17 words together: kept
        {"text": "short", "title": "tiny"},  # min_words
    ]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "f.py").write_text("def f(d):\n    return {'title': d['title'].upper()}\n")
    out = str(tmp_path / "o")
    p = preprocess(
        "--input",
        str(tmp_path / "in.jsonl"),
        "--json-keys",
        "text",
        "title",
        "--tokenizer-type",
        "byte",
        "--min-words",
        "16",
        "--filter",
        str(tmp_path / "f.py") + ":f",
        "--output-prefix",
        out,
    )
    assert "1 min_words" in p.stdout and "changed 1 filter" in p.stdout, p.stdout
    assert decoded(out + "_text_document") == [rows[0]["text"]]
    assert decoded(out + "_title_document") == ["A TITLE"]
