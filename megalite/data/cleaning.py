"""Document cleaning for tools/preprocess.py: transforms (markup, invalid characters) and
filters (length, symbols, Gopher-style repetition, script-based language, a user's callable).
Each is opt-in and has a name; the preprocess summary and --report count what each changed or
dropped under that name.

Filters run in this order (FILTERS) and a document is counted under the first that drops it:
min_words, symbol_ratio, language, repeated_lines, repeated_ngrams, filter (the user's). With
several --json-keys they judge the document's texts together, joined by line breaks.

A document longer than a read block (one-document-per-file text) arrives in pieces: the
additive measures (words, symbols, letters per script) are summed over its pieces and judged
once, while the repetition filters and the user's filter judge each piece, and one failing
piece drops the document.
"""

import html
import importlib
import importlib.util
import os
import re
import sys

import numpy as np

from megalite.errors import MegaliteError

TRANSFORMS = ("strip_markup", "invalid_chars")
FILTERS = ("min_words", "symbol_ratio", "language", "repeated_lines", "repeated_ngrams", "filter")

# ---- transforms ---------------------------------------------------------------------------
_HIDDEN = re.compile(
    r"<(script|style|noscript|template|head)\b[^>]*>.*?</\1\s*>|<!--.*?(?:-->|$)", re.S | re.I
)
_BLOCK_TAGS = (
    "address|article|aside|blockquote|br|dd|div|dl|dt|figcaption|figure|footer|form|h[1-6]|"
    "header|hr|li|main|nav|ol|p|pre|section|table|td|th|tr|ul"
)
_BLOCK = re.compile(rf"</?\s*(?:{_BLOCK_TAGS})\b[^<>]*>", re.I)
_TAG = re.compile(r"</?[A-Za-z][^<>]*>|<![^<>]*>|<\?[^<>]*>")
# C0/C1 controls but tab and line ends, lone surrogates, BOM, U+FFFD and the noncharacters
_INVALID = re.compile(
    "[\x00-\x08\x0b-\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff\ufeff\ufdd0-\ufdef\ufffd\ufffe\uffff]"
)


def strip_markup(text):
    """HTML/XML tags removed (script, style and comments with their content; block-level tags
    become line breaks) and character entities decoded."""
    if "<" in text:
        text = _HIDDEN.sub("", text)
        text = _BLOCK.sub("\n", text)
        text = _TAG.sub("", text)
    if "&" in text:
        text = html.unescape(text)
    return text


def remove_invalid_chars(text):
    """Control characters (but tab, \\n, \\r), lone surrogates, U+FEFF, U+FFFD (the replacement
    character left by a bad decode) and Unicode noncharacters removed."""
    return _INVALID.sub("", text)


# ---- measures -----------------------------------------------------------------------------
_NOT_SYMBOL = re.compile(r"[\w\s.,;:!?'\"()\-\u2018\u2019\u201c\u201d\u2013\u2014\u2026]+")


def symbol_counts(text):
    """(symbols, non-whitespace characters): a symbol is a character that is no letter, digit,
    whitespace or sentence punctuation (. , ; : ! ? ' " ( ) - and the curly quotes, dashes and
    ellipsis): markup debris, tables, code, encoding junk."""
    symbols = len(_NOT_SYMBOL.sub("", text)) + text.count("_")
    return symbols, len("".join(text.split()))


def repeated_line_fraction(text):
    """max(fraction of non-blank lines that repeat an earlier line, fraction of the characters
    of non-blank lines in such repeats) (Gopher's duplicate-line measures)."""
    seen, dup, dup_chars, n, chars = set(), 0, 0, 0, 0
    for line in text.split("\n"):
        line = line.strip()
        if not line:
            continue
        n += 1
        chars += len(line)
        if line in seen:
            dup += 1
            dup_chars += len(line)
        else:
            seen.add(line)
    if not n:
        return 0.0
    return max(dup / n, dup_chars / chars)


def ngram_thresholds(ratio):
    """Gopher's repetition thresholds from one number: the most frequent n-gram's character
    share for n = 2, 3, 4 at ratio + 0.05, + 0.03, + 0.01; the share of characters in repeated
    n-grams for n = 5..10 at ratio, ratio - 0.01, ... ratio - 0.05. ratio 0.15 gives Gopher's
    values (0.20, 0.18, 0.16; 0.15 ... 0.10)."""
    top = {2: round(ratio + 0.05, 6), 3: round(ratio + 0.03, 6), 4: round(ratio + 0.01, 6)}
    dup = {n: round(ratio - 0.01 * (n - 5), 6) for n in range(5, 11)}
    return top, dup


def repeated_ngram_fails(text, top, dup):
    """True when one of Gopher's n-gram repetition measures is over its threshold. Words are
    whitespace-separated; shares are of the characters in words. The top n-gram measure counts
    a most frequent n-gram seen at least twice; the repeated measure counts the characters of
    words covered by an occurrence of an n-gram seen earlier in the document."""
    words = text.split()
    if len(words) < 2:
        return False
    vocab = {}
    ids = np.fromiter((vocab.setdefault(w, len(vocab)) for w in words), np.int64, len(words))
    wlen = np.fromiter(map(len, words), np.int64, len(words))
    total = int(wlen.sum())
    cum = np.concatenate([[0], np.cumsum(wlen)])
    gram = ids  # ids of the n-grams starting at each position, n = 1 so far
    for n in range(2, 11):
        if len(words) < n:
            break
        _, first, gram = np.unique(
            gram[:-1] * len(vocab) + ids[n - 1 :], return_index=True, return_inverse=True
        )
        if len(first) == len(gram):  # no n-gram twice: none longer either
            break
        if n in top:
            counts = np.bincount(gram)
            best = int(counts.argmax())
            if (cum[first[best] + n] - cum[first[best]]) * counts[best] > top[n] * total:
                return True
        else:
            later = np.ones(len(gram), dtype=bool)
            later[first] = False
            starts = np.flatnonzero(later)
            cover = np.cumsum(
                np.bincount(starts, minlength=len(words) + 1)
                - np.bincount(starts + n, minlength=len(words) + 1)
            )[: len(words)]
            if int(wlen[cover > 0].sum()) > dup[n] * total:
                return True
    return False


# ---- language by script -------------------------------------------------------------------
# (first code point, script) for the letters of each script; gaps and everything else
# (digits, punctuation, symbols, marks, whitespace) count for no script.
_SCRIPT_RANGES = [
    (0x41, "latin"), (0x5B, None), (0x61, "latin"), (0x7B, None), (0xAA, "latin"),
    (0xAB, None), (0xBA, "latin"), (0xBB, None), (0xC0, "latin"), (0xD7, None),
    (0xD8, "latin"), (0xF7, None), (0xF8, "latin"), (0x250, None), (0x370, "greek"),
    (0x400, "cyrillic"), (0x530, "armenian"), (0x590, "hebrew"), (0x600, "arabic"),
    (0x700, None), (0x750, "arabic"), (0x780, None), (0x900, "devanagari"),
    (0x980, "bengali"), (0xA00, "gurmukhi"), (0xA80, "gujarati"), (0xB00, "oriya"),
    (0xB80, "tamil"), (0xC00, "telugu"), (0xC80, "kannada"), (0xD00, "malayalam"),
    (0xD80, "sinhala"), (0xE00, "thai"), (0xE80, "lao"), (0xF00, "tibetan"), (0x1000, "myanmar"),
    (0x10A0, "georgian"), (0x1100, "hangul"), (0x1200, "ethiopic"), (0x1400, None),
    (0x1780, "khmer"), (0x1800, None), (0x1E00, "latin"), (0x1F00, "greek"), (0x2000, None),
    (0x2D00, "georgian"), (0x2D30, None), (0x2E80, "han"), (0x2FE0, None), (0x3040, "kana"),
    (0x3100, None), (0x3130, "hangul"), (0x3190, None), (0x31F0, "kana"), (0x3200, None),
    (0x3400, "han"), (0x4DC0, None), (0x4E00, "han"), (0xA000, None), (0xA640, "cyrillic"),
    (0xA6A0, None), (0xA720, "latin"), (0xA800, None), (0xAC00, "hangul"), (0xD7B0, None),
    (0xF900, "han"), (0xFB00, None), (0xFB1D, "hebrew"), (0xFB50, "arabic"), (0xFE00, None),
    (0xFE70, "arabic"), (0xFF00, None), (0xFF21, "latin"), (0xFF3B, None), (0xFF41, "latin"),
    (0xFF5B, None), (0xFF66, "kana"), (0xFFA0, None), (0x20000, "han"), (0x2FA20, None),
]  # fmt: skip
SCRIPTS = sorted({s for _, s in _SCRIPT_RANGES if s})
_RANGE_STARTS = np.array([0] + [a for a, _ in _SCRIPT_RANGES], dtype=np.uint32)
_RANGE_SCRIPT = np.array([-1] + [SCRIPTS.index(s) if s else -1 for _, s in _SCRIPT_RANGES])

_LANGUAGE_SCRIPTS = {
    "latin": "af ca cs cy da de en eo es et eu fi fr ga gl hr hu id is it la lt lv ms mt nb nl "
    "nn no pl pt ro sk sl sq sv sw tl tr uz vi yo zu",
    "cyrillic": "be bg kk ky mk mn ru sr tg tt uk",
    "greek": "el",
    "armenian": "hy",
    "georgian": "ka",
    "hebrew": "he yi",
    "arabic": "ar fa ps sd ug ur",
    "devanagari": "hi mr ne sa",
    "bengali": "as bn",
    "gurmukhi": "pa",
    "gujarati": "gu",
    "oriya": "or",
    "tamil": "ta",
    "telugu": "te",
    "kannada": "kn",
    "malayalam": "ml",
    "sinhala": "si",
    "thai": "th",
    "lao": "lo",
    "tibetan": "bo",
    "myanmar": "my",
    "ethiopic": "am ti",
    "khmer": "km",
    "han": "zh",
    "hangul": "ko",
}
LANGUAGES = {
    code: (script,) for script, codes in _LANGUAGE_SCRIPTS.items() for code in codes.split()
}
LANGUAGES["ja"] = ("kana", "han")  # Japanese: kana and kanji (and some kana required)
LANGUAGES["ko"] = ("hangul",)
_KANA_MIN = 0.05  # share of kana among the letters that tells Japanese from Chinese


def parse_languages(values):
    """['en', 'de,fr'] -> list of (code, script indices); script names are accepted too."""
    out = []
    for c in (c.strip().lower() for v in values for c in v.split(",")):
        if not c:
            continue
        if c in LANGUAGES:
            out.append((c, [SCRIPTS.index(s) for s in LANGUAGES[c]]))
        elif c in SCRIPTS:
            out.append((c, [SCRIPTS.index(c)]))
        else:
            raise MegaliteError(
                f"--language {c!r} is not known; give ISO 639-1 codes "
                f"({', '.join(sorted(LANGUAGES))}) or script names ({', '.join(SCRIPTS)})"
            )
    if not out:
        raise MegaliteError("--language needs at least one language code")
    return out


def script_counts(text):
    """Letters per script: int64 [len(SCRIPTS)]."""
    cp = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), np.uint32)
    script = _RANGE_SCRIPT[np.searchsorted(_RANGE_STARTS, cp, "right") - 1]
    return np.bincount(script[script >= 0], minlength=len(SCRIPTS))


_KANA = SCRIPTS.index("kana")


def language_share(counts, languages):
    """The largest share, over the wanted languages, of the letters in a language's scripts
    (0 without letters). Han is Chinese's and Japanese's: kana tells them apart (Japanese needs
    5% of its letters in kana, Chinese less)."""
    letters = int(counts.sum())
    if not letters:
        return 0.0
    japanese = counts[_KANA] >= _KANA_MIN * letters
    best = 0
    for code, scripts in languages:
        if (code == "ja" and not japanese) or (code == "zh" and japanese):
            continue
        best = max(best, int(counts[scripts].sum()))
    return best / letters


# ---- the user's filter --------------------------------------------------------------------
def load_filter(spec):
    """'module:function' or 'path/to/file.py:function' -> the callable (one-line errors)."""
    mod_name, sep, fn_name = spec.rpartition(":")
    if not sep or not mod_name or not fn_name:
        raise MegaliteError(f"--filter {spec!r}: give MODULE:FUNCTION or FILE.py:FUNCTION")
    try:
        if mod_name.endswith(".py"):
            if not os.path.isfile(mod_name):
                raise MegaliteError(f"--filter {spec!r}: {mod_name} not found")
            name = "megalite_user_filter_" + re.sub(r"\W", "_", os.path.abspath(mod_name))
            module = sys.modules.get(name)
            if module is None:
                loader_spec = importlib.util.spec_from_file_location(name, mod_name)
                module = importlib.util.module_from_spec(loader_spec)
                sys.modules[name] = module
                loader_spec.loader.exec_module(module)
        else:
            if "" not in sys.path and os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(mod_name)
    except MegaliteError:
        raise
    except Exception as e:  # noqa: BLE001 -- any failure of the user's module is one line
        raise MegaliteError(
            f"--filter {spec!r}: importing {mod_name} failed ({type(e).__name__}: {e})"
        ) from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise MegaliteError(f"--filter {spec!r}: {mod_name} has no callable {fn_name!r}")
    return fn


# ---- the whole chain ----------------------------------------------------------------------
class Cleaner:
    """The cleaning chain the workers run; options as tools/preprocess.py's flags."""

    def __init__(self, options):
        o = options
        self.keys = o["keys"]
        self.transforms = []
        if o.get("strip_markup"):
            self.transforms.append(("strip_markup", strip_markup))
        if o.get("remove_invalid_chars"):
            self.transforms.append(("invalid_chars", remove_invalid_chars))
        self.min_words = o.get("min_words") or 0
        self.max_symbol_ratio = o.get("max_symbol_ratio")
        self.max_line_ratio = o.get("max_repeated_line_ratio")
        self.ngram = o.get("max_repeated_ngram_ratio")
        self.top, self.dup = ngram_thresholds(self.ngram) if self.ngram is not None else ({}, {})
        self.languages = parse_languages(o["language"]) if o.get("language") else None
        self.language_threshold = o.get("language_threshold", 0.5)
        self.filter_spec = o.get("filter")
        self.user = load_filter(self.filter_spec) if self.filter_spec else None
        self.filters = bool(
            self.min_words
            or self.max_symbol_ratio is not None
            or self.max_line_ratio is not None
            or self.ngram is not None
            or self.languages
            or self.user
        )

    @property
    def active(self):
        return bool(self.transforms or self.filters)

    def transform(self, docs, changed):
        """Apply the transforms to every text of every document; count changed documents."""
        for name, fn in self.transforms:
            out = []
            n = 0
            for d in docs:
                new = tuple(fn(t) for t in d)
                n += new != d
                out.append(new)
            docs = out
            changed[name] += n
        return docs

    def _call_user(self, d):
        arg = d[0] if len(self.keys) == 1 else dict(zip(self.keys, d))
        try:
            res = self.user(arg)
        except Exception as e:  # noqa: BLE001 -- the user's code: one line naming it
            raise MegaliteError(
                f"--filter {self.filter_spec} raised {type(e).__name__}: {e}"
            ) from None
        if res is True or res is False or res is None:
            return bool(res), d
        if isinstance(res, str) and len(self.keys) == 1:
            return True, (res,)
        if isinstance(res, dict) and len(self.keys) > 1:
            return True, tuple(str(res.get(k, t)) for k, t in zip(self.keys, d))
        if isinstance(res, (bool, np.bool_, int)):
            return bool(res), d
        want = "a str" if len(self.keys) == 1 else "a dict of the keys' texts"
        raise MegaliteError(
            f"--filter {self.filter_spec} returned {type(res).__name__}; return True to keep, "
            f"False to drop, or {want} to replace the text"
        )

    def _whole(self, text):
        """Reason a complete document is dropped by a non-additive filter, or None."""
        if self.max_line_ratio is not None and repeated_line_fraction(text) > self.max_line_ratio:
            return "repeated_lines"
        if self.ngram is not None and repeated_ngram_fails(text, self.top, self.dup):
            return "repeated_ngrams"
        return None

    def _additive(self, text):
        """(words, symbols, non-space characters, letters per script or None)."""
        words = len(text.split()) if self.min_words else 0
        sym, nonspace = symbol_counts(text) if self.max_symbol_ratio is not None else (0, 0)
        scripts = script_counts(text) if self.languages else None
        return words, sym, nonspace, scripts

    def judge(self, words, sym, nonspace, scripts):
        """Reason the additive measures drop a document, or None."""
        if self.min_words and words < self.min_words:
            return "min_words"
        if self.max_symbol_ratio is not None and sym > self.max_symbol_ratio * max(nonspace, 1):
            return "symbol_ratio"
        if self.languages and (language_share(scripts, self.languages) < self.language_threshold):
            return "language"
        return None

    def filter(self, docs, dropped, changed):
        """Complete documents -> the kept ones (possibly replaced by the user's filter)."""
        if not self.filters:
            return docs
        out = []
        for d in docs:
            text = d[0] if len(d) == 1 else "\n".join(d)
            reason = self.judge(*self._additive(text)) or self._whole(text)
            if reason is None and self.user is not None:
                keep, new = self._call_user(d)
                if not keep:
                    reason = "filter"
                elif new != d:
                    changed["filter"] += 1
                    d = new
            if reason is not None:
                dropped[reason] += 1
                continue
            out.append(d)
        return out

    def piece(self, text):
        """A piece of a long document -> (the piece's text, its additive measures as a tuple,
        the reason a non-additive filter fails it or None)."""
        words, sym, nonspace, scripts = self._additive(text)
        reason = self._whole(text)
        if reason is None and self.user is not None:
            keep, new = self._call_user((text,))
            if not keep:
                reason = "filter"
            else:
                text = new[0]
        return text, (words, sym, nonspace, scripts), reason
