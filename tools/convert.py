#!/usr/bin/env python
"""Convert between megalite checkpoints and Hugging Face model directories (local only).

    python tools/convert.py export-hf --load runs/demo --output hf/demo
    python tools/convert.py import-hf --input hf/demo --save runs/imported \\
        --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2
    python tools/convert.py reshard --load runs/demo --save runs/demo_tp1 \\
        --tensor-model-parallel-size 1 --pipeline-model-parallel-size 1
    python tools/convert.py merge-lora --load runs/lora --save runs/merged
    python tools/convert.py export-hf --load runs/lora --output hf/merged --merge-lora
    python tools/convert.py export-peft --load runs/lora --save hf/adapter \\
        --base-model hf/base

export-hf writes config.json, model.safetensors (sharded with an index above
--max-shard-size), the tokenizer and generation_config.json: a GPT-2 style model as
GPT2LMHeadModel, a Llama style one as LlamaForCausalLM. import-hf writes iteration 0 of a
megalite checkpoint (weights only) at the layout the flags ask for; train from it with
`--load DIR --finetune` and the model flags import-hf prints. reshard re-cuts a checkpoint
(weights, optimizer state, iteration, consumed samples) for another TP x PP x VP layout, as
a run resumed under that layout does by itself; resume from it with `--load DIR`.

A LoRA checkpoint holds the adapters alone and names its base. merge-lora folds them into
the base (W + alpha/r B A) and writes a plain weights-only checkpoint at the base's layout
(`--load DIR --finetune`, export-hf, load_pretrained); export-hf --merge-lora writes that
merged model for Hugging Face; export-peft writes the adapters as a peft adapter directory
for the export-hf of the base (`PeftModel.from_pretrained(base, DIR)`).
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megalite.errors import run_main  # noqa: E402

# The layout flags reshard takes (the trainer's names): the parallel layout only.
PARALLEL_FLAGS = ("--tensor-model-parallel-size", "--pipeline-model-parallel-size",
                  "--num-layers-per-virtual-pipeline-stage",
                  "--decoder-first-pipeline-num-layers",
                  "--decoder-last-pipeline-num-layers")  # fmt: skip
# import-hf's: the layout, and the model settings the HF config does not hold.
LAYOUT_FLAGS = (*PARALLEL_FLAGS, "--make-vocab-size-divisible-by", "--seq-length")
MODEL_FLAGS = ("model_style", "num_layers", "hidden_size", "ffn_hidden_size",
               "num_attention_heads", "num_query_groups", "seq_length",
               "max_position_embeddings", "rotary_base", "norm_epsilon",
               "untie_embeddings_and_output_weights", "vocab_size",
               "make_vocab_size_divisible_by")  # fmt: skip


def train_flags(cfg) -> str:
    """The trainer flags that rebuild this model (the trainer takes its model from flags)."""
    out = []
    for name in MODEL_FLAGS:
        value = getattr(cfg.model, name)
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            out += [flag] if value else []
        else:
            out += [flag, str(value)]
    if cfg.data.tokenizer_model:
        out += ["--tokenizer-model", cfg.data.tokenizer_model]
    return " ".join(out)


def flag_settings(args, flags) -> dict:
    """{setting: value} of the given flags that were passed."""
    names = [flag[2:].replace("-", "_") for flag in flags]
    return {n: getattr(args, n) for n in names if getattr(args, n) is not None}


def main(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--debug", action="store_true", help="full tracebacks")
    sub = p.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export-hf", help="megalite checkpoint -> Hugging Face directory")
    ex.add_argument("--load", required=True, help="checkpoint directory (its latest iteration)")
    ex.add_argument("--iteration", type=int, help="a specific iteration instead of the latest")
    ex.add_argument("--output", required=True, help="Hugging Face directory to write")
    ex.add_argument("--max-shard-size", default="5GB", help="split model.safetensors above this")
    ex.add_argument(
        "--merge-lora", action="store_true", help="a LoRA checkpoint: its base, adapters merged"
    )
    im = sub.add_parser("import-hf", help="Hugging Face directory -> megalite checkpoint")
    im.add_argument("--input", required=True, help="Hugging Face model directory (local)")
    im.add_argument("--save", required=True, help="checkpoint directory to write")
    for flag in LAYOUT_FLAGS:
        im.add_argument(flag, type=int, help="as for the trainer")
    rs = sub.add_parser("reshard", help="megalite checkpoint -> another TP x PP x VP layout")
    rs.add_argument("--load", required=True, help="checkpoint directory (its latest iteration)")
    rs.add_argument("--iteration", type=int, help="a specific iteration instead of the latest")
    rs.add_argument("--save", required=True, help="checkpoint directory to write")
    for flag in PARALLEL_FLAGS:
        rs.add_argument(flag, type=int, help="as for the trainer")
    ml = sub.add_parser("merge-lora", help="LoRA checkpoint -> plain checkpoint, adapters merged")
    ml.add_argument(
        "--load", required=True, help="LoRA checkpoint directory (its latest iteration)"
    )
    ml.add_argument("--iteration", type=int, help="a specific iteration instead of the latest")
    ml.add_argument("--save", required=True, help="checkpoint directory to write")
    ml.add_argument("--base", help="the base checkpoint directory, if it moved since training "
                    "(default: the one the LoRA checkpoint names)")  # fmt: skip
    ep = sub.add_parser("export-peft", help="LoRA checkpoint -> peft adapter directory")
    ep.add_argument(
        "--load", required=True, help="LoRA checkpoint directory (its latest iteration)"
    )
    ep.add_argument("--iteration", type=int, help="a specific iteration instead of the latest")
    ep.add_argument("--save", "--output", dest="save", required=True, help="directory to write")
    ep.add_argument("--base-model", help="base_model_name_or_path to record: the HF export of "
                    "the base (export-hf of the checkpoint the LoRA one names)")  # fmt: skip
    args = p.parse_args(argv)

    from megalite.convert.hf import export_hf, import_hf
    from megalite.convert.lora import export_peft, lora_meta, merge_lora
    from megalite.convert.reshard import reshard_checkpoint

    if args.command == "merge-lora":
        where, cfg = merge_lora(args.load, args.save, args.iteration, args.base)
        par = cfg.parallel
        print(
            f"wrote {where} (TP={par.tensor_model_parallel_size} "
            f"PP={par.pipeline_model_parallel_size}, the base's layout, weights only, adapters "
            f"merged); train from it with --load {args.save} --finetune (no --lora-rank)"
        )
        return 0

    if args.command == "export-peft":
        files = export_peft(args.load, args.save, args.iteration, args.base_model)
        base = lora_meta(args.load, args.iteration)["lora_base"]
        print(
            f"wrote {args.save}: {', '.join(files)}; the base model is export-hf --load "
            f"{base['path']} --iteration {base['iteration']}"
        )
        return 0

    if args.command == "reshard":
        where, cfg = reshard_checkpoint(
            args.load, args.save, flag_settings(args, PARALLEL_FLAGS), args.iteration
        )
        par = cfg.parallel
        print(
            f"wrote {where} (TP={par.tensor_model_parallel_size} "
            f"PP={par.pipeline_model_parallel_size} VP={cfg.virtual_pipeline_size}); resume "
            f"from it with --load {args.save} and that layout (any DP size)"
        )
        return 0

    if args.command == "export-hf":
        files = export_hf(
            args.load, args.output, args.max_shard_size, args.iteration, args.merge_lora
        )
        print(f"wrote {args.output}: {', '.join(files)}")
        return 0
    where, cfg = import_hf(args.input, args.save, flag_settings(args, LAYOUT_FLAGS))
    par = cfg.parallel
    print(
        f"wrote {where} (TP={par.tensor_model_parallel_size} "
        f"PP={par.pipeline_model_parallel_size}, weights only); train from it with: "
        f"--load {args.save} --finetune {train_flags(cfg)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
