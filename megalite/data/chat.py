"""Instruction (SFT) data: chat rows -> tokens and a loss mask (tools/preprocess.py --sft).

Rows, one JSON object per line:

    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
    {"prompt": "...", "response": "...", "system": "..."}   one user and one assistant turn;
                                                            "system" optional ("" = none)

Outputs, one document per conversation:

    {prefix}_sft_document.bin/.idx             tokens (dtype from best_dtype)
    {prefix}_sft_document_loss_mask.bin/.idx   uint8, same documents and lengths;
                                               loss_mask_prefix(prefix) names it

mask[j] == 1 means token j is a training target (the loss predicting token j from tokens < j
counts): every token of assistant content and of that turn's end-of-turn; 0 elsewhere (system
and user text, role headers, template scaffolding).

The default template is plain text, the same for every tokenizer (EOT is the tokenizer's
end-of-document id `eod` as one token, never text):

    <|system|>\\n{content}\\n
    <|user|>\\n{content}\\n
    <|assistant|>\\n{content}EOT

masked in: {content}EOT of each assistant turn. A tokenizer without an eod id would get the
literal text "<|end|>\\n" as EOT (DEFAULT_EOT_TEXT; every tokenizer build_tokenizer makes has
an eod). Each piece is tokenized on its own, so mask boundaries fall between tokens exactly.

Jinja templates (Hugging Face chat templates): `--chat-template FILE`, or the `chat_template`
of the Hugging Face tokenizer directory given as --tokenizer-model (its tokenizer_config.json:
a string, or a list of {name, template} of which "default" is taken; else a
chat_template.jinja file there). They render with jinja2 (optional: `pip install jinja2`) as
transformers does (sandboxed, trim_blocks, lstrip_blocks, loop controls, tojson,
raise_exception, strftime_now), with messages, add_generation_prompt, bos_token and eos_token
(from tokenizer_config.json; without one eos_token is a Hugging Face tokenizer's eod token
text, else ""). The assistant spans come from rendering growing prefixes: message i's span runs
from the end of render(messages[:i], add_generation_prompt=True) to the end of
render(messages[:i+1]), both prefixes of render(messages). So the end-of-turn that is masked in
is whatever the template renders after the assistant content up to the next message (for
ChatML "<|im_end|>\\n"). A template whose prefixes are not prefixes of the whole rendering
(e.g. one that drops earlier turns' reasoning) makes the row bad: template_not_incremental.

Bad rows are counted by reason (BAD_ROW_REASONS), never dropped silently.
"""

import json
import os
import time

import numpy as np

from megalite.errors import MegaliteError

ROLES = ("system", "user", "assistant")
SFT_KEY = "sft"
DEFAULT_EOT_TEXT = "<|end|>\n"
HEADERS = {r: f"<|{r}|>\n" for r in ROLES}

BAD_ROW_REASONS = {
    "invalid_utf8": "the line is not valid UTF-8",
    "invalid_json": "the line is not valid JSON",
    "not_object": "the row is not a JSON object",
    "no_conversation": "the row has neither messages nor prompt/response",
    "both_shapes": "the row has both messages and prompt/response",
    "messages_not_list": "messages is not a list",
    "message_not_object": "a message is not an object",
    "missing_role": "a message has no role",
    "unknown_role": "a role other than system, user, assistant",
    "missing_content": "a message (or prompt/response) has no content",
    "non_string_content": "a content (or prompt/response/system) is not a string",
    "empty_content": "a content is empty or only whitespace",
    "invalid_unicode": "a content holds a lone surrogate (\\udXXX escape), not encodable",
    "no_assistant_turn": "the conversation has no assistant message",
    "template_error": "the chat template raised an error (raise_exception, or a bug)",
    "template_not_incremental": "a prefix's rendering is not a prefix of the whole rendering",
    "assistant_not_rendered": "the template does not render an assistant message's content",
    "no_loss_tokens": "the assistant turns tokenize to no token",
}


def loss_mask_prefix(prefix):
    """The loss-mask shard that goes with the token shard `prefix`."""
    return prefix + "_loss_mask"


def sft_prefix(output_prefix):
    """The token shard tools/preprocess.py --sft writes for --output-prefix."""
    return f"{output_prefix}_{SFT_KEY}_document"


class BadRow(Exception):
    """A row that cannot be a training conversation: reason (a BAD_ROW_REASONS key), detail."""

    def __init__(self, reason, detail=None):
        super().__init__(reason)
        self.reason, self.detail = reason, detail


# ---- rows -> messages ----------------------------------------------------------------------
def _content(value, what):
    if value is None:
        raise BadRow("missing_content", what)
    if type(value) is not str:
        raise BadRow("non_string_content", f"{what}: {type(value).__name__}")
    if not value.strip():
        raise BadRow("empty_content", what)
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise BadRow("invalid_unicode", what) from None
    return value


def parse_row(obj):
    """A decoded JSON row -> list of {"role", "content"} dicts, or raises BadRow."""
    if not isinstance(obj, dict):
        raise BadRow("not_object", type(obj).__name__)
    has_messages = "messages" in obj
    has_pair = "prompt" in obj or "response" in obj
    if has_messages and has_pair:
        raise BadRow("both_shapes")
    if has_pair:
        messages = []
        system = obj.get("system")
        if system is not None and system != "":
            messages.append({"role": "system", "content": _content(system, "system")})
        messages.append({"role": "user", "content": _content(obj.get("prompt"), "prompt")})
        messages.append({"role": "assistant", "content": _content(obj.get("response"), "response")})
        return messages
    if not has_messages:
        raise BadRow("no_conversation", "keys: " + ", ".join(map(str, obj)) if obj else "{}")
    raw = obj["messages"]
    if not isinstance(raw, list):
        raise BadRow("messages_not_list", type(raw).__name__)
    messages = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise BadRow("message_not_object", f"message {i}: {type(m).__name__}")
        if "role" not in m:
            raise BadRow("missing_role", f"message {i}")
        role = m["role"]
        if role not in ROLES:
            raise BadRow("unknown_role", repr(role))
        messages.append({"role": role, "content": _content(m.get("content"), f"message {i}")})
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRow("no_assistant_turn")
    return messages


# ---- templates: messages -> segments (text or one token id, mask) --------------------------
def _merge(segments):
    """Join neighbouring text segments of the same mask; drop empty ones."""
    out = []
    for piece, m in segments:
        if isinstance(piece, str):
            if not piece:
                continue
            if out and isinstance(out[-1][0], str) and out[-1][1] == m:
                out[-1] = (out[-1][0] + piece, m)
                continue
        out.append((piece, m))
    return out


class DefaultTemplate:
    """The built-in template (module docstring); eot: the eod id, or None for DEFAULT_EOT_TEXT."""

    name = "default"

    def __init__(self, eot=None):
        self.eot = DEFAULT_EOT_TEXT if eot is None else int(eot)

    def render(self, messages):
        segments = []
        for m in messages:
            if m["role"] == "assistant":
                segments += [(HEADERS["assistant"], 0), (m["content"], 1), (self.eot, 1)]
            else:
                segments.append((HEADERS[m["role"]] + m["content"] + "\n", 0))
        return _merge(segments)


def import_jinja2(origin):
    try:
        import jinja2
        import jinja2.ext
        import jinja2.sandbox
    except ImportError:
        raise MegaliteError(
            f"the chat template of {origin} needs the `jinja2` package: pip install jinja2 (or "
            "use --chat-template default)"
        ) from None
    return jinja2


class JinjaTemplate:
    """A Hugging Face style jinja chat template; spans found by rendering growing prefixes."""

    name = "jinja"

    def __init__(self, source, origin, bos_token="", eos_token=""):
        jinja2 = import_jinja2(origin)

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(
                x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                sort_keys=sort_keys,
            )  # fmt: skip

        env = jinja2.sandbox.ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
        )
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: time.strftime(fmt)
        try:
            self.template = env.from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise MegaliteError(
                f"{origin}: not a valid jinja chat template (line {e.lineno}: {e.message}); fix "
                "it or pass another with --chat-template FILE"
            ) from None
        self.origin, self.bos_token, self.eos_token = origin, bos_token, eos_token

    def _render(self, messages, add_generation_prompt):
        try:
            return self.template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except Exception as e:  # raise_exception, or the template failing on this row
            msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise BadRow("template_error", msg[:120]) from None

    def render(self, messages):
        full = self._render(messages, False)
        segments, pos = [], 0
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            start = self._render(messages[:i], True)
            end = self._render(messages[: i + 1], False)
            if not (full.startswith(start) and full.startswith(end) and len(start) >= pos):
                raise BadRow("template_not_incremental", f"message {i}")
            span = full[len(start) : len(end)]
            if not span or m["content"].strip() not in span:
                raise BadRow("assistant_not_rendered", f"message {i}")
            segments += [(full[pos : len(start)], 0), (span, 1)]
            pos = len(end)
        segments.append((full[pos:], 0))
        return _merge(segments)


# ---- finding a template --------------------------------------------------------------------
def _token_text(value):
    """A tokenizer_config.json special token: a string, or an AddedToken dict with content."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else ""


def _hf_dir(tokenizer_model):
    if tokenizer_model is None:
        return None
    if os.path.isdir(tokenizer_model):
        return tokenizer_model
    if tokenizer_model.endswith(".json"):
        return os.path.dirname(os.path.abspath(tokenizer_model))
    return None


def _read_config(directory):
    path = os.path.join(directory, "tokenizer_config.json")
    if not os.path.isfile(path):
        return None, path
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise MegaliteError(f"{path}: cannot read it as JSON ({e}); fix the file") from None
    if not isinstance(config, dict):
        raise MegaliteError(f"{path}: not a JSON object; fix the file")
    return config, path


def _config_template(config, path):
    t = config.get("chat_template")
    if t is None or isinstance(t, str):
        return t
    if isinstance(t, list):
        named = {d.get("name"): d.get("template") for d in t if isinstance(d, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
        raise MegaliteError(
            f"{path}: chat_template lists no 'default' template (it has: "
            f"{', '.join(map(str, named)) or 'none'}); pass one with --chat-template FILE"
        )
    raise MegaliteError(
        f"{path}: chat_template is a {type(t).__name__}, not a string or a list of "
        "{name, template}; pass one with --chat-template FILE"
    )


def template_options(chat_template, tokenizer_model, tok):
    """What the workers need to build the template (picklable): from --chat-template (None:
    the tokenizer directory's chat template if it has one, else the default; "default"; or a
    jinja FILE) and the tokenizer."""
    eod = getattr(tok, "eod", None)
    if chat_template == "default":
        return {"kind": "default", "eot": eod, "origin": "default"}
    directory = _hf_dir(tokenizer_model)
    config, config_path = _read_config(directory) if directory else (None, None)
    source = origin = None
    if chat_template is not None:
        if not os.path.isfile(chat_template):
            raise MegaliteError(
                f"--chat-template {chat_template} not found; pass a jinja file or 'default'"
            )
        with open(chat_template, encoding="utf-8") as f:
            source, origin = f.read(), chat_template
    elif config is not None and config.get("chat_template") is not None:
        source, origin = _config_template(config, config_path), config_path
    elif directory and os.path.isfile(os.path.join(directory, "chat_template.jinja")):
        origin = os.path.join(directory, "chat_template.jinja")
        with open(origin, encoding="utf-8") as f:
            source = f.read()
    if source is None:
        return {"kind": "default", "eot": eod, "origin": "default"}
    bos = _token_text(config.get("bos_token")) if config else ""
    if config and "eos_token" in config:
        eos = _token_text(config.get("eos_token"))
    elif eod is not None and hasattr(tok, "tok"):  # a Hugging Face tokenizer: its eod's text
        eos = tok.tok.id_to_token(eod) or ""
    else:
        eos = ""
    return {"kind": "jinja", "source": source, "origin": origin, "bos_token": bos,
            "eos_token": eos}  # fmt: skip


def build_template(options):
    if options["kind"] == "default":
        return DefaultTemplate(options["eot"])
    return JinjaTemplate(
        options["source"], options["origin"], options["bos_token"], options["eos_token"]
    )


def render_prompt(tok, messages) -> list:
    """Token ids of `messages` in the default template followed by the assistant's header:
    the prompt a model tuned on that template answers (tools/finetune_demo.py)."""
    segments = DefaultTemplate(tok.eod).render(messages) + [(HEADERS["assistant"], 0)]
    return encode(tok, [_merge(segments)])[0][0].tolist()


# ---- segments -> tokens and mask -----------------------------------------------------------
def encode(tok, rendered):
    """Segment lists -> list of (token ids int64[n], mask uint8[n]); the text of every segment
    of every conversation is tokenized in one tokenize_batch call, each segment on its own."""
    texts = [p for segments in rendered for p, _ in segments if isinstance(p, str)]
    ids = iter(tok.tokenize_batch(texts) if texts else ())
    out = []
    for segments in rendered:
        parts, masks = [], []
        for piece, m in segments:
            x = np.asarray(next(ids) if isinstance(piece, str) else [piece], dtype=np.int64)
            parts.append(x)
            masks.append(np.full(len(x), m, np.uint8))
        if not parts:
            out.append((np.zeros(0, np.int64), np.zeros(0, np.uint8)))
        else:
            out.append((np.concatenate(parts), np.concatenate(masks)))
    return out
