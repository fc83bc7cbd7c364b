"""What a run reports: console lines, a JSON-lines metrics file, TensorBoard scalars, and the
throughput numbers (tokens/s, TFLOP/s, MFU) behind them."""

from __future__ import annotations

import json
import os
import resource

import torch

from megalite.errors import MegaliteError

# Dense peak TFLOP/s per device for 16-bit tensor-core maths (bf16/fp16) and fp32 (no TF32).
# Matched against torch.cuda.get_device_name(); the first key contained in the name wins.
PEAK_TFLOPS = [
    ("H200", 989.0, 67.0),
    ("H100 PCIe", 756.0, 51.0),
    ("H100", 989.0, 67.0),
    ("H800", 989.0, 67.0),
    ("GH200", 989.0, 67.0),
    ("B200", 2250.0, 80.0),
    ("A100", 312.0, 19.5),
    ("A800", 312.0, 19.5),
    ("L40S", 362.0, 91.6),
    ("A10G", 70.0, 31.2),
    ("A10", 125.0, 31.2),
    ("L4", 121.0, 30.3),
    ("V100", 125.0, 15.7),
    ("RTX 4090", 165.0, 82.6),
    ("RTX 3090", 71.0, 35.6),
]


def peak_tflops(device: torch.device, low_precision: bool, override=None):
    """(peak TFLOP/s, where it came from) of one device, or (None, why not)."""
    if override:
        return override, "--peak-tflops"
    if device.type != "cuda":
        return None, "no peak known for a CPU; pass --peak-tflops for MFU"
    name = torch.cuda.get_device_name(device)
    for key, bf16, fp32 in PEAK_TFLOPS:
        if key in name:
            return (bf16 if low_precision else fp32), f"table entry {key}"
    return None, f"no peak known for {name}; pass --peak-tflops for MFU"


def memory_stats(device: torch.device) -> dict:
    if device.type == "cuda":
        return {
            "mem_allocated_gb": torch.cuda.memory_allocated(device) / 2**30,
            "mem_peak_gb": torch.cuda.max_memory_allocated(device) / 2**30,
        }
    # ru_maxrss is KiB on Linux: the process's peak resident memory.
    return {"mem_peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


class MetricsWriter:
    """Console + JSON lines + TensorBoard, active on one rank only (the one that has the loss)."""

    def __init__(self, active: bool, metrics_file=None, tensorboard_dir=None):
        self.active = active
        self.file = None
        self.tb = None
        if not active:
            return
        if metrics_file:
            os.makedirs(os.path.dirname(os.path.abspath(metrics_file)), exist_ok=True)
            self.file = open(metrics_file, "a", buffering=1)
        if tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise MegaliteError(
                    "--tensorboard-dir needs the tensorboard package: pip install tensorboard"
                )
            self.tb = SummaryWriter(tensorboard_dir)

    def print(self, *args):
        if self.active:
            print(*args, flush=True)

    def log(self, record: dict, line: str):
        if not self.active:
            return
        print(line, flush=True)
        if self.file:
            self.file.write(json.dumps(record) + "\n")
        if self.tb:
            it = record["iteration"]
            for k, v in record.items():
                if k != "iteration" and isinstance(v, (int, float)) and v is not None:
                    self.tb.add_scalar(k, v, it)

    def close(self):
        if self.file:
            self.file.close()
        if self.tb:
            self.tb.close()
