"""tools/bench.py cache: the side-by-side of the LDM step with and without the latent cache."""

from __future__ import annotations

import importlib
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TOOLS = Path(__file__).resolve().parents[2] / "tools"


@pytest.fixture(scope="module")
def tools():
    """tools/bench_cache.py and its sibling bench_models, imported as the script imports them."""
    sys.path.insert(0, str(TOOLS))
    try:
        yield importlib.import_module("bench_cache"), importlib.import_module("bench_models")
    finally:
        sys.path.remove(str(TOOLS))


def test_the_cached_step_saves_exactly_the_encoder_forward_and_the_ratio_is_reported(tools, world_of_one) -> None:
    bench_cache, bench_models = tools
    opts = bench_cache.CacheBenchOptions(presets=("tiny",), image_size=64, batch=1, iters=1, warmup=1, repeats=1,
                                         precision="fp32", threads=1)
    threads = torch.get_num_threads()
    try:
        device, rows = bench_cache.run_cache_bench(opts)
    finally:
        torch.set_num_threads(threads)
    (row,) = rows
    for value in (row.ms_encoding, row.ms_cached, row.gflops_cached):
        assert math.isfinite(value) and value > 0
    assert row.speedup == pytest.approx(row.ms_encoding / row.ms_cached)
    # The reference: the frozen tiny VAE's encode of one 64x64 map, counted on its own.
    from radiodiff.config import autoencoder_preset
    from radiodiff.models.autoencoder import AutoencoderKL

    vae = AutoencoderKL(autoencoder_preset("tiny")).eval()
    encode = bench_models.count_flops(lambda: vae.encode(torch.zeros(1, 1, 64, 64))).total
    assert (row.gflops_encoding - row.gflops_cached) * 1e9 == pytest.approx(encode, rel=1e-9)
    report = bench_cache.format_report(opts, device, rows)
    assert f"| tiny | {row.ms_encoding:.2f} | {row.ms_cached:.2f} |" in report and f"{row.speedup:.2f}x" in report


def test_cli_validates_the_options() -> None:
    done = subprocess.run([sys.executable, str(TOOLS / "bench.py"), "cache", "--presets", "tiny", "--image-size", "48",
                           "--device", "cpu"], check=False, capture_output=True, text=True)
    assert done.returncode != 0 and "--image-size=48" in done.stderr
