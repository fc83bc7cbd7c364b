"""The MFU table: exact device names (what torch.cuda.get_device_name returns) to the dense peaks
of the vendors' datasheets; an unknown name gets no MFU."""

import pytest
import torch

from megalite.training import metrics
from megalite.training.metrics import PEAK_TFLOPS, peak_tflops, peak_tflops_of

# The datasheets' 16-bit tensor-core and plain fp32 figures, typed here from the datasheets,
# independently of the table: dense where a datasheet gives it, else half its "with sparsity".
DATASHEET = {
    "NVIDIA H100 80GB HBM3": (1979 / 2, 67),  # SXM
    "NVIDIA H100 PCIe": (1513 / 2, 51),
    "NVIDIA H100 NVL": (1671 / 2, 60),
    "NVIDIA H200": (1979 / 2, 67),  # SXM
    "NVIDIA H200 NVL": (1671 / 2, 60),
    "NVIDIA GH200 480GB": (1979 / 2, 67),
    "NVIDIA B200": (4500 / 2, 75),
    "NVIDIA A100-SXM4-40GB": (312, 19.5),
    "NVIDIA A100-SXM4-80GB": (312, 19.5),
    "NVIDIA A100-PCIE-40GB": (312, 19.5),
    "NVIDIA A100 80GB PCIe": (312, 19.5),
    "NVIDIA L40S": (362.05, 91.6),
    "NVIDIA L40": (181.05, 90.5),
    "NVIDIA L4": (121, 30.3),
    "NVIDIA A10": (125, 31.2),
    "NVIDIA A10G": (70, 31.2),  # AWS's figures: the A10G has no NVIDIA datasheet
}


@pytest.mark.parametrize("name", sorted(DATASHEET))
def test_known_devices_get_their_own_dense_peak(name):
    bf16, fp32 = DATASHEET[name]
    peak, source = peak_tflops_of(name, low_precision=True)
    assert peak == pytest.approx(bf16, rel=1e-3), source
    assert name in source
    assert peak_tflops_of(name, low_precision=False)[0] == pytest.approx(fp32, rel=1e-3)
    # what the driver reports may carry trailing blanks
    assert peak_tflops_of(name + " ", low_precision=True)[0] == peak


def test_similar_names_are_different_devices():
    """The old substring match gave an L40 the L4's peak and any H100 the SXM's."""
    l4, l40, l40s = (peak_tflops_of(n, True)[0] for n in ("NVIDIA L4", "NVIDIA L40", "NVIDIA L40S"))
    assert len({l4, l40, l40s}) == 3
    h100 = {n: peak_tflops_of(n, True)[0] for n in DATASHEET if n.startswith("NVIDIA H100")}
    assert len(set(h100.values())) == 3


@pytest.mark.parametrize(
    "name",
    [
        "NVIDIA H100",  # no such name from the driver: no guess between SXM, PCIe and NVL
        "NVIDIA A100-SXM4-80GB MIG 1g.10gb",  # a MIG slice has a fraction of the peak
        "NVIDIA L40G",
        "NVIDIA GeForce RTX 4080",
        "Tesla V100-SXM2-16GB",  # Volta: no bf16 tensor cores
        "H200",
        "nvidia h200",
        "",
    ],
)
def test_unknown_names_get_no_mfu(name):
    peak, why = peak_tflops_of(name, low_precision=True)
    assert peak is None
    assert "--peak-tflops" in why


def test_table_is_well_formed():
    names = [n for n, _, _ in PEAK_TFLOPS]
    assert len(names) == len(set(names)), "a name listed twice"
    for name, bf16, fp32 in PEAK_TFLOPS:
        assert name == name.strip() and bf16 > fp32 > 0, name


def test_peak_tflops_reads_the_device_name(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA L40")
    cuda = torch.device("cuda", 0)
    assert peak_tflops(cuda, low_precision=True) == (181.05, "table entry 'NVIDIA L40'")
    assert peak_tflops(cuda, low_precision=False)[0] == 90.5
    assert peak_tflops(cuda, True, override=500.0) == (500.0, "--peak-tflops")
    monkeypatch.setattr(metrics.torch.cuda, "get_device_name", lambda device=None: "NVIDIA X1")
    assert peak_tflops(cuda, low_precision=True)[0] is None
    peak, why = peak_tflops(torch.device("cpu"), low_precision=True)
    assert peak is None and "CPU" in why
