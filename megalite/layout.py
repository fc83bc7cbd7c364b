"""The arithmetic of a layout, pure Python: what divides what, and which layers each pipeline
stage owns. The config checks a layout with it before any process exists; the parallel code
builds the model with the same functions, so the two can never disagree.
"""

from __future__ import annotations

from megalite.errors import MegaliteError


def virtual_pipeline_size(num_layers, pp, layers_per_virtual_stage=None) -> int:
    """Model chunks per stage: num_layers / (PP x layers per virtual stage), 1 without
    interleaving."""
    if not layers_per_virtual_stage:
        return 1
    n = layers_per_virtual_stage
    if n < 1:
        raise MegaliteError(f"--num-layers-per-virtual-pipeline-stage must be >= 1, got {n}")
    if pp < 2:
        raise MegaliteError(
            f"--num-layers-per-virtual-pipeline-stage {n} needs --pipeline-model-parallel-size "
            f">= 2 (interleaving splits the stages of a pipeline), got {pp}"
        )
    if num_layers % (pp * n):
        raise MegaliteError(
            f"--num-layers {num_layers} is not divisible by --pipeline-model-parallel-size {pp} "
            f"x --num-layers-per-virtual-pipeline-stage {n}"
        )
    return num_layers // (pp * n)


def _stage_sizes(num_layers, pp, first, last) -> list:
    """Layers per pipeline stage: even, or `first` / `last` on the end stages and the rest
    shared evenly by the others."""
    if first is None and last is None:
        if num_layers % pp:
            raise MegaliteError(
                f"--num-layers {num_layers} is not divisible by --pipeline-model-parallel-size {pp}"
            )
        return [num_layers // pp] * pp
    if pp < 2:
        raise MegaliteError(
            "--decoder-first/last-pipeline-num-layers need --pipeline-model-parallel-size >= 2"
        )
    for flag, n in (("first", first), ("last", last)):
        if n is not None and not 1 <= n < num_layers:
            raise MegaliteError(
                f"--decoder-{flag}-pipeline-num-layers {n} must be between 1 "
                f"and --num-layers {num_layers} - 1"
            )
    others = pp - (first is not None) - (last is not None)
    rest = num_layers - (first or 0) - (last or 0)
    if others == 0 and rest != 0 or others > 0 and (rest < others or rest % others):
        given = " + ".join(f"{f} {n}" for f, n in (("first", first), ("last", last)) if n)
        raise MegaliteError(
            f"uneven pipeline: --num-layers {num_layers} minus {given} leaves {rest} layers "
            f"for the other {others} of --pipeline-model-parallel-size {pp} stages; they "
            f"must split evenly, at least one layer each"
        )
    sizes = [rest // others if others else 0] * pp
    if first is not None:
        sizes[0] = first
    if last is not None:
        sizes[-1] = last
    return sizes


def pipeline_layout(num_layers, pp, vp=1, first=None, last=None) -> list:
    """layers[rank][chunk] = the global layer numbers of that model chunk.

    The model is cut into PP x V virtual stages of consecutive layers; virtual stage
    chunk * PP + rank lives on `rank`, so a micro-batch visits every rank V times. A stage's
    layers are split evenly over its V chunks.
    """
    sizes = _stage_sizes(num_layers, pp, first, last)
    for rank, size in enumerate(sizes):
        if size % vp:
            raise MegaliteError(
                f"pipeline stage {rank} has {size} layers, not divisible into {vp} virtual "
                f"stages (--num-layers-per-virtual-pipeline-stage); change the split"
            )
    layers, start = [[] for _ in range(pp)], 0
    for _chunk in range(vp):
        for rank in range(pp):
            n = sizes[rank] // vp
            layers[rank].append(list(range(start, start + n)))
            start += n
    return layers


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """The vocabulary rounded up so that every TP rank holds an equal, aligned slice."""
    multiple = divisible_by * tp
    return ((vocab_size + multiple - 1) // multiple) * multiple
