"""What a run reports: console lines, a JSON-lines metrics file, TensorBoard scalars, and the
throughput numbers (tokens/s, TFLOP/s, MFU) behind them."""

from __future__ import annotations

import json
import os
import resource

import torch

from megalite.errors import MegaliteError

# Dense peak TFLOP/s (no structured sparsity) of one device, as (name, 16-bit, fp32): the 16-bit
# figure is bf16/fp16 on the tensor cores with fp32 accumulation, the fp32 one plain fp32 (no
# TF32). Sources are the vendors' datasheets, named per family below; where a datasheet gives
# only figures "with sparsity" (its asterisk), the dense peak is half of it.
# A name matches only exactly (what torch.cuda.get_device_name() returns, stripped): "NVIDIA
# L40" is not "NVIDIA L4", and the H100's SXM ("80GB HBM3"), PCIe and NVL parts differ. A name
# not listed (another variant, a MIG slice, a new GPU) gets no MFU rather than a neighbour's
# peak; --peak-tflops supplies one. Volta is left out: it has no bf16 tensor cores, so one 16-bit
# figure would be wrong for --bf16. First match wins (names are unique, so order is only for
# reading).
PEAK_TFLOPS = (
    # NVIDIA H100 datasheet: SXM bf16 1,979* fp32 67; PCIe 1,513* / 51; NVL 1,671* / 60.
    ("NVIDIA H100 80GB HBM3", 989.5, 67.0),
    ("NVIDIA H100 PCIe", 756.5, 51.0),
    ("NVIDIA H100 NVL", 835.5, 60.0),
    # NVIDIA H200 datasheet: SXM ("NVIDIA H200") bf16 1,979* fp32 67; NVL 1,671* / 60.
    ("NVIDIA H200", 989.5, 67.0),
    ("NVIDIA H200 NVL", 835.5, 60.0),
    # NVIDIA GH200 Grace Hopper datasheet (the GPU): bf16 1,979* fp32 67.
    ("NVIDIA GH200 480GB", 989.5, 67.0),
    # NVIDIA Blackwell (HGX B200) datasheet, per GPU: bf16 4.5 PFLOP/s* fp32 75.
    ("NVIDIA B200", 2250.0, 75.0),
    # NVIDIA A100 datasheet: bf16 312 (624*) fp32 19.5, every form factor.
    ("NVIDIA A100-SXM4-40GB", 312.0, 19.5),
    ("NVIDIA A100-SXM4-80GB", 312.0, 19.5),
    ("NVIDIA A100-PCIE-40GB", 312.0, 19.5),
    ("NVIDIA A100 80GB PCIe", 312.0, 19.5),
    # NVIDIA L40S datasheet: bf16 362.05 (733*) fp32 91.6; L40: 181.05 (362.1*) / 90.5;
    # L4: 121 (242*) / 30.3.
    ("NVIDIA L40S", 362.05, 91.6),
    ("NVIDIA L40", 181.05, 90.5),
    ("NVIDIA L4", 121.0, 30.3),
    # NVIDIA A10 datasheet: bf16 125 (250*) fp32 31.2. The A10G (AWS) has no NVIDIA datasheet:
    # AWS's published figures for it, bf16 70 (dense) fp32 31.2.
    ("NVIDIA A10", 125.0, 31.2),
    ("NVIDIA A10G", 70.0, 31.2),
    # NVIDIA Ada (AD102) and Ampere (GA102) architecture whitepapers, GeForce: bf16 with fp32
    # accumulate 165.2 / 71, fp32 82.6 / 35.6.
    ("NVIDIA GeForce RTX 4090", 165.2, 82.6),
    ("NVIDIA GeForce RTX 3090", 71.0, 35.6),
)


def peak_tflops_of(name: str, low_precision: bool):
    """(dense peak TFLOP/s, its table entry) of the device called `name`, or (None, why not)."""
    name = name.strip()
    for key, bf16, fp32 in PEAK_TFLOPS:
        if name == key:
            return (bf16 if low_precision else fp32), f"table entry {key!r}"
    return None, f"no peak known for {name!r}; pass --peak-tflops for MFU"


def peak_tflops(device: torch.device, low_precision: bool, override=None):
    """(peak TFLOP/s, where it came from) of one device, or (None, why not)."""
    if override:
        return override, "--peak-tflops"
    if device.type != "cuda":
        return None, "no peak known for a CPU; pass --peak-tflops for MFU"
    return peak_tflops_of(torch.cuda.get_device_name(device), low_precision)


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

    def record(self, record: dict):
        """A record for the metrics file alone (no console line, no TensorBoard scalar)."""
        if self.active and self.file:
            self.file.write(json.dumps(record) + "\n")

    def close(self):
        if self.file:
            self.file.close()
        if self.tb:
            self.tb.close()
