"""The one place bf16 autocast is built (training steps, validation, evaluation, benchmarks)."""

from __future__ import annotations

import torch

from radiodiff.config import PRECISIONS


def autocast(device: torch.device, precision: str) -> torch.autocast:
    """bf16 autocast on ``device`` unless ``precision`` is fp32 (bf16 parameters also compute under it)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}; expected one of {', '.join(PRECISIONS)}")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision != "fp32")


def configure_math(device: torch.device, deterministic: bool) -> None:
    """On CUDA: TF32 matmuls and convolutions and cuDNN autotuning, unless ``deterministic``
    (bitwise-reproducible work), which turns them off and asks cuDNN for deterministic kernels."""
    if device.type != "cuda":
        return
    torch.backends.cuda.matmul.allow_tf32 = not deterministic
    torch.backends.cudnn.allow_tf32 = not deterministic
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic
