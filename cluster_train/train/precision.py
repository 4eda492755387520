"""`precision: auto | fp32 | bf16`: bf16 autocast where the hardware multiplies bf16 natively.

On a CPU with AMX the paper's encoder trains 1.75x faster in bf16 (REFERENCE.md: 138 -> 254 chunks/s
on 2 threads); on a CPU without bf16 units it ran 7x slower, so auto decides per machine. Losses are
computed in fp32 from the autocast outputs (`Precision.outputs`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch

CPU_BF16_FLAGS = ("amx_bf16",)  # bf16 matrix units; avx512_bf16 alone converts, it does not multiply fast


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    line = next((line for line in text.splitlines() if line.startswith("model name")), "")
    return line.partition(":")[2].strip() or "unknown"


def resolve(setting: str, device: torch.device) -> str:
    """"fp32" or "bf16" for `setting` ("auto", "fp32", "bf16") on `device`."""
    if setting != "auto":
        return setting
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if any(flag in cpu_flags() for flag in CPU_BF16_FLAGS) else "fp32"


@dataclass(frozen=True)
class Precision:
    name: str  # "fp32" | "bf16", resolved
    device: torch.device

    @classmethod
    def for_device(cls, setting: str, device: torch.device) -> "Precision":
        return cls(resolve(setting, device), device)

    def autocast(self):
        """The context forward passes run in."""
        if self.name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    @staticmethod
    def outputs(outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A model's outputs in fp32, for the losses."""
        return {name: value.float() for name, value in outputs.items()}
