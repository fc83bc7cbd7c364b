#!/usr/bin/env python
"""Generate text from a megalite checkpoint of any layout (TP/PP shards are merged).

    python tools/generate.py --load runs/demo --prompt "To be or not" --max-new-tokens 60
    python tools/generate.py --load runs/demo --temperature 0.8 --top-k 40 --seed 1

Greedy decoding with --temperature 0 (the default is 0.8 with top-k 40).
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from megalite.config import Config  # noqa: E402
from megalite.errors import MegaliteError, run_main  # noqa: E402
from megalite.model.gpt import GPTModel  # noqa: E402
from megalite.training.checkpoint import load_full_model_state  # noqa: E402


def load_model(root, iteration=None, device="cpu"):
    """A single-process GPTModel holding the full weights of a checkpoint, and its config."""
    state_dict, meta = load_full_model_state(root, iteration)
    cfg = Config.from_dict(meta["config"])
    vocab = state_dict["embedding.word_embeddings.weight"].shape[0]
    model = GPTModel(cfg.model, vocab)
    # The last stage's copy of a tied embedding is not a parameter of a one-stage model.
    state_dict = {
        k: v
        for k, v in state_dict.items()
        if not (k == "output_layer.weight" and not hasattr(model, "output_layer"))
    }
    model.load_state_dict(state_dict)
    return model.to(device).eval(), cfg


@torch.no_grad()
def generate(
    model, ids, max_new_tokens, vocab_size, temperature=0.8, top_k=40, eod=None, generator=None
):
    """Append up to max_new_tokens ids to `ids` (list of int); stop at `eod`."""
    cfg = model.cfg
    context = cfg.max_position_embeddings
    out = list(ids)
    for _ in range(max_new_tokens):
        x = torch.tensor([out[-context:]], dtype=torch.long)
        logits = model.full_logits(x)[0, -1, :vocab_size].float()  # [v], padding dropped
        if temperature <= 0:
            nxt = int(logits.argmax())
        else:
            logits = logits / temperature
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = torch.softmax(logits, dim=-1)
            nxt = int(torch.multinomial(probs, 1, generator=generator))
        if eod is not None and nxt == eod:
            break
        out.append(nxt)
    return out


def main(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("--load", required=True, help="checkpoint directory (its latest iteration)")
    p.add_argument("--iteration", type=int, help="a specific iteration instead of the latest")
    p.add_argument("--tokenizer-model", help="tokenizer (default: the one the run used)")
    p.add_argument("--tokenizer-type", choices=["sentencepiece", "huggingface"])
    p.add_argument("--prompt", default="", help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=40, help="sample among the k likeliest (0 = all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--debug", action="store_true", help="full tracebacks")
    args = p.parse_args(argv)

    model, cfg = load_model(args.load, args.iteration)
    tok_path = args.tokenizer_model or cfg.data.tokenizer_model
    if not tok_path:
        raise MegaliteError("the checkpoint's run had no tokenizer; pass --tokenizer-model")
    if not os.path.exists(tok_path):
        raise MegaliteError(f"tokenizer {tok_path} not found; pass --tokenizer-model")
    from megalite.data import build_tokenizer

    tok = build_tokenizer(args.tokenizer_type or cfg.data.tokenizer_type, tok_path)
    ids = tok.tokenize(args.prompt) if args.prompt else [tok.eod]
    gen = torch.Generator().manual_seed(args.seed)
    out = generate(
        model, ids, args.max_new_tokens, tok.vocab_size, args.temperature, args.top_k, tok.eod, gen
    )
    start = 0 if args.prompt else 1
    print(tok.detokenize(out[start:]))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
