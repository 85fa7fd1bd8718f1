"""Precision: which float format a run computes in on this hardware.

``auto`` means bf16 autocast where the hardware runs bf16 matmuls natively (a CUDA GPU that
supports it; a CPU with AVX512-BF16, AMX-BF16 or Arm BF16) and fp32 elsewhere, where torch
emulates bf16 and it is slower than fp32. Master weights, gradients and optimizer state stay
fp32 in every mode; autocast casts per operation.
"""

from __future__ import annotations

from pathlib import Path

import torch

from medassist.errors import ConfigError


def cpu_supports_bf16(cpuinfo: str | None = None) -> bool:
    """True where the CPU has native bf16 matmul (x86 AVX512-BF16 or AMX-BF16, Arm BF16), so
    autocast is fast; elsewhere torch emulates bf16 and it is slower than fp32.

    ``cpuinfo``: the text of ``/proc/cpuinfo`` (read when None; no such file means False).
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86 / Arm
            flags.update(value.split())
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def resolve_precision(precision: str, model_name: str = "") -> str:
    """Turn ``auto`` into bf16 or fp32 for this hardware; refuse fp16 for T5-family models."""
    if precision == "fp16":
        if "t5" in model_name.lower():
            raise ConfigError("precision: fp16 is refused for T5-family models (they overflow in fp16); use bf16 or fp32")
        if not torch.cuda.is_available():
            raise ConfigError("precision: fp16 needs a CUDA GPU; use bf16 or fp32 on CPU")
        return "fp16"
    if precision == "bf16":
        if torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
            raise ConfigError("precision: bf16 is not supported by this GPU; use fp16 or fp32")
        return "bf16"
    if precision == "auto":
        if torch.cuda.is_available():
            return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        return "bf16" if cpu_supports_bf16() else "fp32"
    return "fp32"
