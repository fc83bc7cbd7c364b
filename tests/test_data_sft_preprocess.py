"""tools/preprocess.py --sft: chat rows -> tokens + an aligned uint8 loss mask.

Expected tokens and masks are built by hand from the template pieces (the byte tokenizer's ids
are the UTF-8 bytes; the Hugging Face ones come from the `tokenizers` library directly), never
through megalite/data/chat.py's renderer.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from megalite.data import IndexedDataset
from megalite.data.chat import BadRow, loss_mask_prefix, parse_row

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EOD = 256  # the byte tokenizer's


def preprocess(*args, ok=True):
    p = subprocess.run(
        [sys.executable, "tools/preprocess.py", "--sft", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO),
    )
    if ok:
        assert p.returncode == 0, p.stderr
    return p


def one_line_error(p, *words):
    assert p.returncode == 1, (p.stdout, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    for w in words:
        assert w in lines[0], lines[0]


def write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return str(path)


def shards(prefix):
    """(tokens, mask) lists of one --sft output; checks the two shards line up."""
    toks = IndexedDataset(prefix + "_sft_document")
    mask = IndexedDataset(loss_mask_prefix(prefix + "_sft_document"))
    assert mask.path_prefix == prefix + "_sft_document_loss_mask"
    assert mask.dtype == np.uint8 and toks.dtype == np.uint16
    assert len(toks) == len(mask) == toks.num_documents == mask.num_documents
    assert np.array_equal(toks.sequence_lengths, mask.sequence_lengths)
    assert np.array_equal(toks.document_indices, mask.document_indices)
    return [t.tolist() for t in toks], [m.tolist() for m in mask]


def by_hand(*pieces):
    """(text, mask) or (token id, mask) pieces -> byte-tokenizer ids and mask."""
    ids, mask = [], []
    for piece, m in pieces:
        x = list(piece.encode()) if isinstance(piece, str) else [piece]
        ids += x
        mask += [m] * len(x)
    return ids, mask


def test_default_template_masks_only_assistant_turns(tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hé"}]},
        {"prompt": "2+2?", "response": "4", "system": "Be brief."},
        {
            "messages": [
                {"role": "system", "content": "S"},
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b"},
                {"role": "user", "content": "c"},
                {"role": "assistant", "content": "dd"},
            ]
        },  # fmt: skip
        {"prompt": "p", "response": "r", "system": ""},  # "" system: none
    ]
    out = str(tmp_path / "o")
    p = preprocess("--input", write_jsonl(tmp_path / "in.jsonl", rows), "--tokenizer-type",
                   "byte", "--output-prefix", out)  # fmt: skip
    assert "done: 4 conversations" in p.stdout and "skipped 0 bad rows" in p.stdout, p.stdout
    assert "chat template default" in p.stdout
    want = [
        by_hand(("<|user|>\nHi\n<|assistant|>\n", 0), ("Hé", 1), (EOD, 1)),
        by_hand(("<|system|>\nBe brief.\n<|user|>\n2+2?\n<|assistant|>\n", 0), ("4", 1), (EOD, 1)),
        by_hand(
            ("<|system|>\nS\n<|user|>\na\n<|assistant|>\n", 0),
            ("b", 1),
            (EOD, 1),
            ("<|user|>\nc\n<|assistant|>\n", 0),
            ("dd", 1),
            (EOD, 1),
        ),  # fmt: skip
        by_hand(("<|user|>\np\n<|assistant|>\n", 0), ("r", 1), (EOD, 1)),
    ]
    toks, mask = shards(out)
    assert toks == [w[0] for w in want]
    assert mask == [w[1] for w in want]
    # the messages form and the prompt/response form of one conversation are the same document
    same = {"messages": [{"role": "user", "content": "p"}, {"role": "assistant", "content": "r"}]}
    preprocess("--input", write_jsonl(tmp_path / "same.jsonl", [same]), "--tokenizer-type",
               "byte", "--output-prefix", str(tmp_path / "s"))  # fmt: skip
    assert shards(str(tmp_path / "s")) == ([toks[3]], [mask[3]])


BAD = [
    "not json",  # invalid_json
    "[1, 2]",  # not_object
    {"text": "x"},  # no_conversation
    {"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}]},
    {"messages": [{"role": "user", "content": " "}, {"role": "assistant", "content": "y"}]},
    {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]},
    {"messages": [{"role": "user", "content": "q"}]},  # no_assistant_turn
    {"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "y"}]},
    {"messages": [{"content": "x"}, {"role": "assistant", "content": "y"}]},  # missing_role
    {"prompt": "only a prompt"},  # missing_content
    {"messages": "hi"},  # messages_not_list
    {"messages": ["hi"]},  # message_not_object
]


def test_bad_rows_counted_by_name_and_workers_agree(tmp_path):
    good = [
        {"prompt": f"question {i} " * (i % 7 + 1), "response": f"answer {i}"} for i in range(300)
    ]
    rows = list(good)
    for k, b in enumerate(BAD):  # scattered over the tasks, the empty content twice
        rows.insert(20 * k + 5, b)
    rows.insert(290, BAD[4])
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    first_empty = rows.index(BAD[4]) + 1
    runs = {}
    for workers in ("1", "2"):
        out = str(tmp_path / f"w{workers}")
        p = preprocess("--input", path, "--tokenizer-type", "byte", "--workers", workers,
                       "--chunk-size-mb", "0.004", "--output-prefix", out, "--report",
                       out + ".json")  # fmt: skip
        runs[workers] = p.stdout.split("; ", 2)[2].split("; wrote")[0]  # past the timings
        report = json.load(open(out + ".json"))
        assert report["documents"] == 300 and report["documents_in"] == 313
        assert report["bad_rows"] == {
            "invalid_json": 1, "not_object": 1, "no_conversation": 1, "unknown_role": 1,
            "empty_content": 3, "no_assistant_turn": 1, "non_string_content": 1,
            "missing_role": 1, "missing_content": 1, "messages_not_list": 1,
            "message_not_object": 1,
        }  # fmt: skip
        assert report["bad_rows_first"]["empty_content"]["line"] == first_empty
        assert report["bad_rows_first"]["unknown_role"]["detail"] == "'bot'"
        assert f"skipped 13 bad rows: 3 empty_content (first: {path} line {first_empty}" in p.stdout
        assert "1 unknown_role (first: " in p.stdout and ": 'bot')" in p.stdout
        toks, mask = shards(out)
        assert len(toks) == 300
        assert report["loss_tokens"] == sum(map(sum, mask))
    assert runs["1"] == runs["2"]
    for ext in (".bin", ".idx"):
        for name in ("_sft_document", "_sft_document_loss_mask"):
            a, b = (open(str(tmp_path / f"w{w}") + name + ext, "rb").read() for w in "12")
            assert a == b, name + ext
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]


def test_no_row_written_is_an_error_and_conflicting_flags(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", BAD[:3])
    p = preprocess("--input", path, "--tokenizer-type", "byte", "--output-prefix",
                   str(tmp_path / "o"), ok=False)  # fmt: skip
    one_line_error(p, "no conversation written", "skipped 3 bad rows", "invalid_json")
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl"]
    base = ("--input", path, "--tokenizer-type", "byte", "--output-prefix", str(tmp_path / "o"))
    for extra, words in (
        (("--append-eod",), ("--append-eod", "--sft")),
        (("--json-keys", "text"), ("--json-keys",)),
        (("--normalize-whitespace", "--min-words", "3"), ("--normalize-whitespace, --min-words",)),
        (("--input-format", "parquet"), ("JSONL", "parquet")),
        (("--chat-template", str(tmp_path / "nope.jinja")), ("nope.jinja not found",)),
    ):
        one_line_error(preprocess(*base, *extra, ok=False), *words)


def test_dedup_drops_repeated_conversations(tmp_path):
    rows = [
        {"prompt": "a", "response": "b"},
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
        {"prompt": "a", "response": "c"},
    ]
    p = preprocess("--input", write_jsonl(tmp_path / "in.jsonl", rows), "--tokenizer-type",
                   "byte", "--dedup", "--output-prefix", str(tmp_path / "o"))  # fmt: skip
    assert "done: 2 conversations" in p.stdout and "dropped 1 duplicate" in p.stdout, p.stdout
    assert len(shards(str(tmp_path / "o"))[0]) == 2


def test_parse_row_reasons():
    cases = {
        "both_shapes": {"messages": [], "prompt": "x", "response": "y"},
        "non_string_content": {"prompt": "x", "response": "y", "system": 1},
        "invalid_unicode": {"prompt": "\ud800", "response": "y"},
        "no_assistant_turn": {"messages": []},
        "unknown_role": {"messages": [{"role": None, "content": "x"}]},
    }
    for reason, row in cases.items():
        with pytest.raises(BadRow) as e:
            parse_row(row)
        assert e.value.reason == reason
    assert parse_row({"prompt": "p", "response": "r", "system": "s"}) == [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "p"},
        {"role": "assistant", "content": "r"},
    ]


# ---- jinja (Hugging Face) chat templates ---------------------------------------------------
CHATML = (
    "{% if messages[0]['role'] == 'assistant' %}{{ raise_exception('user first') }}{% endif %}"
    "{{ bos_token }}{% for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + eos_token + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    pytest.importorskip("jinja2", reason="the jinja chat templates need jinja2")
    tokenizers = pytest.importorskip("tokenizers", reason="the HF tokenizer needs tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    d = tmp_path_factory.mktemp("hf")
    hf = tokenizers.Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<|begin|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    hf.train_from_iterator(["Hello there, how are you? I am fine, thanks."] * 20, trainer)
    hf.save(str(d / "tokenizer.json"))
    config = {"bos_token": "<|begin|>", "eos_token": {"content": "<|im_end|>"},
              "chat_template": [{"name": "default", "template": CHATML},
                                {"name": "tool_use", "template": "unused"}]}  # fmt: skip
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    return d, hf


def test_hf_chat_template(tmp_path, hf_dir):
    d, hf = hf_dir
    rows = [
        {
            "messages": [
                {"role": "system", "content": "Be kind."},
                {"role": "user", "content": "Hello there"},
                {"role": "assistant", "content": "how are you?"},
                {"role": "user", "content": "fine"},
                {"role": "assistant", "content": "thanks."},
            ]
        },  # fmt: skip
        {"messages": [{"role": "assistant", "content": "I am"}]},  # raise_exception
    ]
    out = str(tmp_path / "h")
    p = preprocess("--input", write_jsonl(tmp_path / "in.jsonl", rows), "--tokenizer-model",
                   str(d), "--workers", "2", "--output-prefix", out)  # fmt: skip
    assert "chat template " + str(d / "tokenizer_config.json") in p.stdout
    assert "skipped 1 bad row: 1 template_error (first: " in p.stdout
    assert "line 2: user first)" in p.stdout, p.stdout
    ids, mask = [], []
    for text, m in (
        ("<|begin|><|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\nHello there"
         "<|im_end|>\n<|im_start|>assistant\n", 0),
        ("how are you?<|im_end|>\n", 1),
        ("<|im_start|>user\nfine<|im_end|>\n<|im_start|>assistant\n", 0),
        ("thanks.<|im_end|>\n", 1),
    ):  # fmt: skip
        x = hf.encode(text, add_special_tokens=False).ids
        ids += x
        mask += [m] * len(x)
    assert hf.token_to_id("<|im_end|>") in ids
    assert shards(out) == ([ids], [mask])
    # --chat-template FILE with the byte tokenizer: no tokenizer_config, bos/eos ""
    tpl = tmp_path / "t.jinja"
    tpl.write_text(CHATML.replace("eos_token", "'<E>'"))
    preprocess("--input", str(tmp_path / "in.jsonl"), "--tokenizer-type", "byte",
               "--chat-template", str(tpl), "--output-prefix", str(tmp_path / "b"))  # fmt: skip
    want = by_hand(
        ("<|im_start|>system\nBe kind.<E>\n<|im_start|>user\nHello there<E>\n"
         "<|im_start|>assistant\n", 0), ("how are you?<E>\n", 1),
        ("<|im_start|>user\nfine<E>\n<|im_start|>assistant\n", 0), ("thanks.<E>\n", 1),
    )  # fmt: skip
    assert shards(str(tmp_path / "b")) == ([want[0]], [want[1]])
    # --chat-template default overrides the directory's template
    preprocess("--input", str(tmp_path / "in.jsonl"), "--tokenizer-model", str(d),
               "--chat-template", "default", "--output-prefix", str(tmp_path / "d"))  # fmt: skip
    toks, _ = shards(str(tmp_path / "d"))
    assert toks[0][-1] == 0  # the eod id <|endoftext|> ends the assistant turn


def test_jinja_template_spans_and_errors(monkeypatch):
    pytest.importorskip("jinja2", reason="the jinja chat templates need jinja2")
    from megalite.data.chat import JinjaTemplate, template_options
    from megalite.data.tokenizers import ByteTokenizer
    from megalite.errors import MegaliteError

    msgs = [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"},
            {"role": "user", "content": "v"}, {"role": "assistant", "content": "b"}]  # fmt: skip
    body = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
    t = JinjaTemplate(body + "{% if add_generation_prompt %}[assistant]{% endif %}", "t")
    assert t.render(msgs) == [("[user]u[assistant]", 0), ("a", 1), ("[user]v[assistant]", 0),
                              ("b", 1)]  # fmt: skip
    # a footer only after the whole conversation: earlier prefixes are not prefixes of it
    t = JinjaTemplate(body + "{% if not add_generation_prompt %}END{% endif %}", "t")
    with pytest.raises(BadRow) as e:
        t.render(msgs)
    assert e.value.reason == "template_not_incremental"
    t = JinjaTemplate("{% for m in messages %}{{ m['role'] }}{% endfor %}", "t")  # no content
    with pytest.raises(BadRow) as e:
        t.render(msgs)
    assert e.value.reason == "assistant_not_rendered"
    with pytest.raises(MegaliteError, match="not a valid jinja chat template"):
        JinjaTemplate("{% for %}", "t.jinja")
    monkeypatch.setitem(sys.modules, "jinja2", None)  # as if not installed
    with pytest.raises(MegaliteError, match="pip install jinja2"):
        JinjaTemplate(body, "t.jinja")
    assert template_options(None, None, ByteTokenizer())["kind"] == "default"
