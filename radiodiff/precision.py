"""The one place bf16 autocast is built (training steps, validation, evaluation, benchmarks), and where
``precision=auto`` is resolved for the device at hand."""

from __future__ import annotations

import contextlib

import torch

from radiodiff.config import PRECISIONS

RESOLVED_PRECISIONS = tuple(p for p in PRECISIONS if p != "auto")


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 in hardware. A CPU without AVX512-BF16 or AMX runs bf16 convolutions
    through fallback kernels, several times slower than fp32 (6-8x for the tiny LDM's training step and
    20x for the VAE-GAN's on an AVX2-only CPU: README, Performance)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        cpu = torch.cpu  # the CPU feature checks are private in torch; absent ones count as unsupported
        return any(getattr(cpu, name, lambda: False)() for name in ("_is_avx512_bf16_supported",
                                                                    "_is_amx_tile_supported"))
    return False


def resolve_precision(setting: str, device: torch.device) -> str:
    """``auto`` -> ``autocast`` where bf16 is native on ``device``, else ``fp32``; other settings unchanged."""
    if setting not in PRECISIONS:
        raise ValueError(f"precision={setting!r}; expected one of {', '.join(PRECISIONS)}")
    if setting != "auto":
        return setting
    return "autocast" if native_bf16(device) else "fp32"


def require_resolved(precision: str) -> None:
    """Refuse ``auto`` (and unknown values) where one concrete precision must be used: the engines and the
    training step must agree on the one that ``resolve_precision`` chose."""
    if precision not in RESOLVED_PRECISIONS:
        raise ValueError(f"precision={precision!r}; expected one of {', '.join(RESOLVED_PRECISIONS)} "
                         "(resolve auto first: resolve_precision)")


def autocast(device: torch.device, precision: str) -> torch.autocast:
    """bf16 autocast on ``device`` unless ``precision`` is fp32 (bf16 parameters also compute under it)."""
    require_resolved(precision)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision != "fp32")


def without_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """A region computed in the tensors' own dtypes under any enclosing autocast; a no-op on devices
    that have no autocast (the meta device, which shape-only passes use)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def configure_math(device: torch.device, deterministic: bool) -> None:
    """On CUDA: TF32 matmuls and convolutions and cuDNN autotuning, unless ``deterministic``
    (bitwise-reproducible work), which turns them off and asks cuDNN for deterministic kernels."""
    if device.type != "cuda":
        return
    torch.backends.cuda.matmul.allow_tf32 = not deterministic
    torch.backends.cudnn.allow_tf32 = not deterministic
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic
