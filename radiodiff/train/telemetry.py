"""Throughput telemetry for metrics.jsonl and wandb: maps/s, step time, the fraction of time spent
waiting for data, achieved TFLOP/s and model FLOP utilisation, peak memory.

FLOPs per update are counted once, on the first update, with torch's FLOP counter (matmuls and
convolutions of the forward and backward passes, this rank's share); that update is left out of
the rates. The peak comes from the device name (dense bf16 figures) or ``train.peak_tflops``.
"""

from __future__ import annotations

import time
from typing import Optional

import torch

# Dense bf16 tensor-core peaks, TFLOP/s, by a substring of torch.cuda.get_device_name().
PEAK_BF16_TFLOPS = (("H200", 989.0), ("H100", 989.0), ("A100", 312.0), ("L40S", 362.0), ("A10", 125.0))


def peak_tflops(device: torch.device, configured: Optional[float]) -> Optional[float]:
    if configured:
        return configured
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


class Telemetry:
    """Accumulates over the updates between two logged steps; ``window()`` reports and restarts."""

    def __init__(self, *, global_batch: int, rank_maps_per_update: int, device: torch.device,
                 peak: Optional[float]) -> None:
        self.global_batch, self.rank_maps = global_batch, rank_maps_per_update
        self.device, self.peak = device, peak
        self.flops_per_update: Optional[float] = None
        self._restart()

    def _restart(self) -> None:
        self.updates, self.seconds, self.data_seconds = 0, 0.0, 0.0
        self._started = time.perf_counter()

    def waited_for_data(self, seconds: float) -> None:
        self.data_seconds += seconds

    def update_done(self) -> None:
        self.updates += 1

    def skip_window(self) -> None:
        """Forget the window so far (the first, counted update)."""
        self._restart()

    def window(self) -> dict[str, float]:
        seconds = max(time.perf_counter() - self._started, 1e-9)
        out: dict[str, float] = {}
        if self.updates:
            step = seconds / self.updates
            out.update({"perf/step_time_s": step, "perf/maps_per_s": self.global_batch / step,
                        "perf/maps_per_s_rank": self.rank_maps / step,
                        "perf/data_wait_frac": self.data_seconds / seconds})
            if self.flops_per_update:
                achieved = self.flops_per_update / step / 1e12
                out["perf/tflops_rank"] = achieved
                if self.peak:
                    out["perf/mfu"] = achieved / self.peak
        if self.device.type == "cuda":
            out["perf/peak_memory_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self._restart()
        return out


def count_flops():
    """A context whose ``get_total_flops()`` counts the FLOPs run inside it."""
    from torch.utils.flop_counter import FlopCounterMode

    return FlopCounterMode(display=False)
