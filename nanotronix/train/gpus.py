"""The GPUs the project knows, from the vendors' data sheets: one table for the trainer's MFU (dense peak FLOP/s)
and tools/plan.py's traffic estimate (the link between the GPUs of a node), so a GPU is added in one place.

Peaks are dense (no sparsity): bf16 tensor cores, and plain FP32 for fp32 training, whose matmuls run in full fp32
here (torch's default: TF32 is off and nothing here turns it on; dividing by the TF32 tensor-core peak would show
~1/7 of the real utilisation). Node links are GB/s per GPU and direction: SXM boards switch NVLink between all 8
GPUs (NVLink 4: 900 GB/s per GPU both directions together; the A100's NVLink 3: 600; the table's A100 is the SXM
board); the PCIe cards' NVLink bridges join two GPUs (H100 NVL) or four (H200 NVL), not eight, so a ring over the
node crosses PCIe Gen5 x16 (~64).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class GpuSheet:
    peak_tflops: dict[str, float]  # by training dtype name ("bfloat16", "float32")
    node_link: str
    node_link_gbytes_per_s: float


GPUS = {
    "H100 SXM": GpuSheet({"bfloat16": 989.4, "float32": 66.9}, "NVLink", 450.0),
    "H100 PCIe": GpuSheet({"bfloat16": 756.0, "float32": 51.2}, "PCIe", 64.0),
    "H100 NVL": GpuSheet({"bfloat16": 835.0, "float32": 60.0}, "PCIe", 64.0),
    "H200": GpuSheet({"bfloat16": 989.4, "float32": 66.9}, "NVLink", 450.0),
    "H200 NVL": GpuSheet({"bfloat16": 835.0, "float32": 60.0}, "PCIe", 64.0),
    "A100": GpuSheet({"bfloat16": 312.0, "float32": 19.5}, "NVLink", 300.0),
}


def gpu_of_device_name(name: str) -> Optional[str]:
    """The table's key for a CUDA device name (torch.cuda.get_device_name), None for a GPU it does not list."""
    if "H100" in name:
        return "H100 PCIe" if "PCIe" in name else "H100 NVL" if "NVL" in name else "H100 SXM"
    if "H200" in name:  # the NVL card runs at a lower clock (1,671 sparse bf16 TFLOP/s against the SXM's 1,979)
        return "H200 NVL" if "NVL" in name else "H200"
    if "A100" in name:
        return "A100"
    return None
