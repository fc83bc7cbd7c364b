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

from megalite import load_pretrained  # noqa: E402
from megalite.errors import MegaliteError, run_main  # noqa: E402


@torch.no_grad()
def generate(
    model, ids, max_new_tokens, vocab_size, temperature=0.8, top_k=40, eod=None, generator=None
):
    """Append up to max_new_tokens ids to `ids` (list of int); stop at `eod`."""
    context = model.config.model.max_position_embeddings
    out = list(ids)
    for _ in range(max_new_tokens):
        x = torch.tensor([out[-context:]], dtype=torch.long)
        logits = model(x)[0, -1, :vocab_size].float()  # [v]
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

    model = load_pretrained(args.load, args.iteration)
    cfg = model.config
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
