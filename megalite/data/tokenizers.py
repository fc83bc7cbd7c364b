"""Tokenizers with Megatron's face: vocab_size, eod, tokenize(text), detokenize(ids).

build_tokenizer(type, model):
  sentencepiece  a `.model` file (tools/train_tokenizer.py makes one); eod = the model's eos id
  huggingface    a `tokenizer.json` (or a directory holding one), through the `tokenizers`
                 package (optional: `pip install tokenizers`); eod = its end-of-text token
  byte           UTF-8 bytes 0..255, eod = 256; needs no model file (smoke tests, demos)
type None infers it from the model path: *.model -> sentencepiece, *.json or a directory ->
huggingface. Megatron's type names (SentencePieceTokenizer, GPTSentencePieceTokenizer,
HuggingFaceTokenizer, ...) are accepted too.

tokenize_batch(texts) encodes many texts in one call on the calling thread only: preprocess runs
one tokenizer per worker process, and a tokenizer that spawns its own threads would fight them.
"""

import os

import numpy as np

from megalite.errors import MegaliteError

# Token strings that mean "end of document" in common tokenizer.json files, in preference order.
HF_EOD_CANDIDATES = (
    "<|endoftext|>",
    "<|end_of_text|>",
    "</s>",
    "<eos>",
    "<eod>",
    "[EOS]",
    "<|eos|>",
)

_ALIASES = {
    "sentencepiece": "sentencepiece",
    "sentencepiecetokenizer": "sentencepiece",
    "gptsentencepiecetokenizer": "sentencepiece",
    "llama2tokenizer": "sentencepiece",
    "huggingface": "huggingface",
    "huggingfacetokenizer": "huggingface",
    "hf": "huggingface",
    "byte": "byte",
    "bytetokenizer": "byte",
}


class SentencePieceTokenizer:
    name = "sentencepiece"

    def __init__(self, model_path):
        import sentencepiece as spm

        self.model_path = model_path
        try:
            self.sp = spm.SentencePieceProcessor(model_file=model_path)
        except (OSError, RuntimeError) as e:
            raise MegaliteError(
                f"{model_path} is not a sentencepiece model ({str(e).strip().splitlines()[0]}); "
                f"pass a .model file made by tools/train_tokenizer.py or sentencepiece"
            ) from e
        self.vocab_size = self.sp.get_piece_size()
        eod = self.sp.eos_id()
        if eod < 0:  # models trained with eos_id=-1: look for a piece that plays the part
            for piece in ("<eod>", "<|endoftext|>", "</s>"):
                pid = self.sp.piece_to_id(piece)
                if pid != self.sp.unk_id():
                    eod = pid
                    break
        if eod < 0:
            raise MegaliteError(
                f"{model_path} has no end-of-document token (eos_id is -1); retrain it with "
                f"tools/train_tokenizer.py, which reserves one"
            )
        self.eod = eod
        # sentencepiece >= 0.2.1 can return numpy arrays from a batch encode, skipping the
        # million small Python ints that lists would cost.
        try:
            self.sp.encode(["a"], num_threads=1, return_type="numpy")
            self._numpy = True
        except (TypeError, ValueError):
            self._numpy = False

    def tokenize(self, text):
        return self.sp.encode(text)

    def tokenize_batch(self, texts):
        if self._numpy:
            return self.sp.encode(list(texts), num_threads=1, return_type="numpy")
        return self.sp.encode(list(texts), num_threads=1)

    def detokenize(self, ids):
        return self.sp.decode([int(i) for i in ids])


class HuggingFaceTokenizer:
    name = "huggingface"

    def __init__(self, model_path):
        try:
            import tokenizers
        except ImportError as e:
            raise MegaliteError(
                "the huggingface tokenizer needs the `tokenizers` package, which is not "
                "installed; run `pip install tokenizers` or use --tokenizer-type sentencepiece"
            ) from e
        path = (
            os.path.join(model_path, "tokenizer.json") if os.path.isdir(model_path) else model_path
        )
        if not os.path.isfile(path):
            raise MegaliteError(
                f"{path} not found; pass a tokenizer.json file or a directory holding one"
            )
        try:
            self.tok = tokenizers.Tokenizer.from_file(path)
        except Exception as e:  # the Rust side raises plain Exception subclasses
            raise MegaliteError(
                f"{path} is not a huggingface tokenizer.json ({e}); check the file"
            ) from e
        self.model_path = path
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        vocab = self.tok.get_vocab(with_added_tokens=True)
        eod = next((vocab[t] for t in HF_EOD_CANDIDATES if t in vocab), None)
        if eod is None:
            raise MegaliteError(
                f"{path} has none of the end-of-document tokens {', '.join(HF_EOD_CANDIDATES)}; "
                f"add one as a special token to the tokenizer"
            )
        self.eod = eod

    def tokenize(self, text):
        return self.tok.encode(text, add_special_tokens=False).ids

    def tokenize_batch(self, texts):
        # encode_batch fans out over a Rayon pool; preprocess sets RAYON_NUM_THREADS=1 per worker.
        return [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

    def detokenize(self, ids):
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255 and 256 as eod: no model file, no training."""

    name = "byte"
    vocab_size = 257
    eod = 256

    def __init__(self, model_path=None):
        self.model_path = model_path

    def tokenize(self, text):
        return list(text.encode("utf-8"))

    def tokenize_batch(self, texts):
        return [np.frombuffer(t.encode("utf-8"), np.uint8) for t in texts]

    def detokenize(self, ids):
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")


def infer_tokenizer_type(tokenizer_model):
    if tokenizer_model is None:
        raise MegaliteError(
            "no tokenizer model given; pass --tokenizer-model (a sentencepiece .model or a "
            "tokenizer.json)"
        )
    if tokenizer_model.endswith(".model"):
        return "sentencepiece"
    if tokenizer_model.endswith(".json") or os.path.isdir(tokenizer_model):
        return "huggingface"
    raise MegaliteError(
        f"cannot tell the tokenizer type of {tokenizer_model!r} from its name; pass "
        f"--tokenizer-type sentencepiece or huggingface"
    )


def build_tokenizer(tokenizer_type, tokenizer_model):
    """The tokenizer of type `tokenizer_type` (None: inferred from the model path)."""
    if tokenizer_type is None:
        kind = infer_tokenizer_type(tokenizer_model)
    else:
        kind = _ALIASES.get(str(tokenizer_type).lower().replace("-", "").replace("_", ""))
        if kind is None:
            raise MegaliteError(
                f"unknown tokenizer type {tokenizer_type!r}; use sentencepiece, huggingface or byte"
            )
    if kind == "byte":
        return ByteTokenizer(tokenizer_model)
    if tokenizer_model is None:
        raise MegaliteError(f"the {kind} tokenizer needs --tokenizer-model")
    if kind == "sentencepiece" and not os.path.isfile(tokenizer_model):
        raise MegaliteError(
            f"{tokenizer_model} not found; pass a sentencepiece .model (train one with "
            "tools/train_tokenizer.py)"
        )
    if kind == "sentencepiece":
        return SentencePieceTokenizer(tokenizer_model)
    return HuggingFaceTokenizer(tokenizer_model)
