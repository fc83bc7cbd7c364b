"""Training throughput, one process: the megalite command line against a plain PyTorch GPT.

What is timed is what users run: `torchrun --nproc_per_node 1 -m megalite.train <flags>`, a
fresh process with megalite's own data, model, optimizer and logging, not an in-process path
that could skip any of them. The baseline, tools/bench/plain_gpt.py, is what a user would write
themselves (nanoGPT style: the same GPT-2 shape, nn.LayerNorm, scaled_dot_product_attention,
tied head, gradient accumulation, clip_grad_norm_, torch.optim.AdamW(fused=True)), launched the
same way with the same shape flags, threads, allocator setting and precision. Each writes
tokens/s per iteration (global batch x seq / the iteration's wall time) to a metrics file; a
run's score is the median after warm-up. The runs alternate, swapping which side goes first in
every other pair; the headline is the median of the per-pair megalite / plain ratios. Goal:
>= 1.05x.

    python tools/bench/train_step.py [--pairs 5] [--bf16] [--system-malloc] [--json out.json]
    python tools/bench/train_step.py --quick          # a smoke test, well under a minute
"""

import os
import sys

import cli_bench as cb


def main():
    p = cb.parser(
        __doc__,
        "--pairs",
        5,
        min(2, os.cpu_count()),
        "OMP_NUM_THREADS of both sides: the whole 2-core machine",
    )
    a = cb.finish_args(p.parse_args(), min_rounds=3)
    env = cb.bench_env(a.threads, a.system_malloc)
    sides = {"megalite": cb.side_argv("megalite", a), "plain": cb.side_argv("plain", a)}
    runs = cb.run_rounds(a, sides, 1, env)
    cb.report("train step, one process", a, cb.summarise(runs), "megalite", env, 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
