#!/usr/bin/env python
"""Plan a layout before launching: memory per rank (from megalite's own code on the meta
device) and a predicted step (a documented cost model: megalite/planner.py).

    python tools/plan.py --nodes 4 --gpu H100 --model-style llama --num-layers 32 \\
        --hidden-size 4096 --num-attention-heads 32 --num-query-groups 8 --seq-length 4096 \\
        --vocab-size 128256 --global-batch-size 512 --bf16 --search
    python tools/plan.py --nodes 4 --gpu H100 ... --tensor-model-parallel-size 4 \\
        --pipeline-model-parallel-size 2 --use-distributed-optimizer   # one layout

Every flag the trainer takes is taken as the trainer takes it (or --config FILE); the cluster
flags are the planner's own. With --search the parallel flags are what is searched over
(TP, PP, VP, ZeRO strategy, recompute, micro-batch size; sequence parallelism with TP > 1,
--overlap-grad-reduce); the others stay.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megalite.errors import run_main  # noqa: E402

GIB = 2**30


def cluster_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], add_help=False)
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--gpu", default="H100", help="H100, H200, A100, B200 (figures per GPU)")
    p.add_argument("--gpu-memory-gb", type=float, help="instead of the GPU's")
    p.add_argument("--peak-tflops", type=float, help="dense bf16 (or fp32) peak per GPU")
    p.add_argument("--hbm-bandwidth", type=float, help="TB/s per GPU")
    p.add_argument("--intra-node-bandwidth", type=float, help="GB/s per GPU (NVLink busbw)")
    p.add_argument("--inter-node-bandwidth", type=float, help="GB/s per GPU (network)")
    p.add_argument("--efficiency", type=float, help="achievable fraction of peak (0.5)")
    p.add_argument("--headroom", type=float, help="fraction of memory a plan may fill (0.9)")
    p.add_argument("--search", action="store_true", help="rank every valid layout")
    p.add_argument("--top", type=int, default=10, help="layouts shown with --search")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--plan-help", action="help", help="this help (--help: the trainer's flags)")
    return p


def make_cluster(a):
    from megalite.planner import Cluster

    def scaled(v, k):
        return None if v is None else v * k

    return Cluster.of(
        a.gpu,
        nodes=a.nodes,
        gpus_per_node=a.gpus_per_node,
        memory_bytes=scaled(a.gpu_memory_gb, GIB),
        peak_tflops=a.peak_tflops,
        hbm_bandwidth=scaled(a.hbm_bandwidth, 1e12),
        intra_node_bandwidth=scaled(a.intra_node_bandwidth, 1e9),
        inter_node_bandwidth=scaled(a.inter_node_bandwidth, 1e9),
        efficiency=a.efficiency,
        headroom=a.headroom,
    )


def table(plans, cluster) -> str:
    head = ("TP PP VP   DP strategy           recomp    mbs | params  grads  optim   acts  "
            "bufs  total GiB (of {:.0f}) | step ms: fwd   bwd    tp    dp    pp bubble  opt | "
            "tokens/s   MFU").format(cluster.memory_bytes / GIB)  # fmt: skip
    lines = [head, "-" * len(head)]
    for p in plans:
        lo, r = p.layout, max(p.ranks, key=lambda r: r["total"])
        t = {k: v * 1e3 for k, v in p.time.items()}
        lines.append(
            f"{lo['tp']:>2} {lo['pp']:>2} {lo['vp']:>2} {lo['dp']:>4} {lo['strategy']:<18} "
            f"{lo['recompute'] or '-':<9} {lo['micro_batch_size']:>3} | "
            f"{r['params'] / GIB:6.1f} {r['grads'] / GIB:6.1f} {r['optimizer'] / GIB:6.1f} "
            f"{r['activations'] / GIB:6.1f} {r['buffers'] / GIB:5.1f} {p.peak_bytes / GIB:6.1f}"
            f"{'' if p.fits else ' (too big)':<11}          | {p.step_s * 1e3:8.1f} "
            f"{t['forward']:5.0f} {t['backward']:5.0f} {t['tp_comm']:5.0f} {t['dp_comm']:5.0f} "
            f"{t['pp_comm']:5.0f} {t['bubble']:5.0f} {t['optimizer']:5.0f} | "
            f"{p.tokens_per_s:9,.0f} {p.mfu:5.1%}"
        )
    return "\n".join(lines)


def main(argv):
    a, rest = cluster_parser().parse_known_args(argv)
    from megalite.config import parse_config
    from megalite.planner import plan_layout, search

    cluster = make_cluster(a)
    cfg = parse_config(rest, world_size=cluster.world_size)
    plans = search(cfg, cluster, top=a.top) if a.search else [plan_layout(cfg, cluster)]
    if a.json:
        print(json.dumps([p.as_dict() for p in plans], indent=1, default=str))
    else:
        print(table(plans, cluster))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
