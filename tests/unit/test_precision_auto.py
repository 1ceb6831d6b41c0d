"""deepspeed.precision=auto: bf16 autocast only where the device computes bf16 natively, fp32 elsewhere."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from radiodiff.config import ConfigError, DeepSpeedConfig, TrainConfig
from radiodiff.precision import autocast, native_bf16, resolve_precision
from radiodiff.train.engines import deepspeed_config

CPUINFO = Path("/proc/cpuinfo")


def cpuinfo_has_native_bf16() -> bool:
    """The independent reference: the kernel's CPU flags (AVX512-BF16, or AMX's bf16 tiles)."""
    flags = {flag for line in CPUINFO.read_text().splitlines() if line.startswith("flags")
             for flag in line.split(":", 1)[1].split()}
    return bool(flags & {"avx512_bf16", "amx_bf16"})


@pytest.mark.skipif(not CPUINFO.is_file(), reason="no /proc/cpuinfo (not Linux)")
def test_auto_on_this_cpu_follows_its_flags() -> None:
    cpu = torch.device("cpu")
    assert native_bf16(cpu) == cpuinfo_has_native_bf16()
    assert resolve_precision("auto", cpu) == ("autocast" if cpuinfo_has_native_bf16() else "fp32")


def test_explicit_settings_are_kept_and_bad_ones_named() -> None:
    for setting in ("autocast", "bf16", "fp32"):
        assert resolve_precision(setting, torch.device("cpu")) == setting
    with pytest.raises(ValueError, match="precision='fp16'"):
        resolve_precision("fp16", torch.device("cpu"))
    with pytest.raises(ConfigError, match="deepspeed.precision"):
        DeepSpeedConfig(precision="fp16")


def test_unresolved_auto_reaches_neither_autocast_nor_an_engine() -> None:
    assert DeepSpeedConfig().precision == "auto"  # the default
    with pytest.raises(ValueError, match="resolve auto first"):
        autocast(torch.device("cpu"), "auto")
    with pytest.raises(ValueError, match="resolve auto first"):
        deepspeed_config(TrainConfig(), DeepSpeedConfig(), world_size=1)
