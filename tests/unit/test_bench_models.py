"""tools/bench.py models: the table it prints, and FLOP counts checked against hand counts."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

TOOLS = Path(__file__).resolve().parents[2] / "tools"
IMAGE, BATCH = 64, 1


def load_tool(name: str):
    """A tools/ script as a module, loaded from its file (tools/ is not a package)."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(f"tools_{name}", TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench_models():
    return load_tool("bench_models")


@pytest.fixture(scope="module")
def tiny_run(bench_models):
    bm = bench_models
    opts = bm.ModelBenchOptions(presets=("tiny",), image_size=IMAGE, batch=BATCH, iters=1, warmup=1, device="cpu")
    torch_threads = torch.get_num_threads()
    try:
        device, rows = bm.run_model_bench(opts)
    finally:
        torch.set_num_threads(torch_threads)
    return opts, device, rows


def test_table_has_one_row_per_configuration_with_positive_finite_timings(bench_models, tiny_run) -> None:
    bm = bench_models
    opts, device, rows = tiny_run
    expected = [(s, "tiny", p, cl) for s in ("vae-gan", "ldm") for p in ("fp32", "bf16") for cl in (False, True)]
    assert device.type == "cpu"
    assert [(r.stage, r.preset, r.precision, r.channels_last) for r in rows] == expected
    for row in rows:
        for value in (row.ms_per_image, row.images_per_s, row.gflops_per_image, row.tflops_per_s):
            assert math.isfinite(value) and value > 0, row
        assert row.images_per_s == pytest.approx(1e3 / row.ms_per_image)
        assert row.gflops_per_image == pytest.approx(row.flops.total / BATCH / 1e9)
        assert row.mfu is None and row.peak_mem_gib is None  # CUDA-only columns
    report = bm.format_report(opts, device, rows)
    table_lines = [line.split() for line in report.splitlines() if line.startswith(("vae-gan ", "ldm "))]
    assert [line[:4] for line in table_lines] == [
        [r.stage, r.preset, r.precision, "on" if r.channels_last else "off"] for r in rows
    ]
    # 2 stages x (bf16 over fp32 per layout + channels_last per precision)
    assert report.count("bf16 over fp32") == 4 and report.count("channels_last on over off") == 4


def _conv_forward_flops(module: nn.Conv2d, output: torch.Tensor) -> int:
    """2 * Cin/groups * Cout * kh * kw * Hout * Wout * B: one multiply-add per weight per output pixel."""
    kh, kw = module.kernel_size
    return 2 * module.in_channels // module.groups * kh * kw * output.numel()


def test_stage1_flops_match_hand_counts(bench_models) -> None:
    bm = bench_models
    torch.manual_seed(0)
    step = bm.build_vae_gan_step(bm.MODEL_PRESETS["tiny"], IMAGE, BATCH, torch.device("cpu"), "fp32", False)
    counted = bm.count_flops(step.run)
    generator = step.modules[0]
    encoder_in, decoder_out = generator.autoencoder.encoder.conv_in, generator.autoencoder.last_layer

    # The image (1 channel) is not differentiated: conv_in costs its forward plus its weight grad.
    conv_in = 2 * 1 * 32 * 3 * 3 * IMAGE * IMAGE * BATCH
    assert (encoder_in.in_channels, encoder_in.out_channels) == (1, 32)
    assert counted.by_module["VaeGanGenerator.autoencoder.encoder.conv_in"] == 2 * conv_in
    # The last layer: forward, input and weight grads in backward, and the two weight grads of the
    # adaptive discriminator weight: 5 x its forward.
    conv_out = 2 * 32 * 1 * 3 * 3 * IMAGE * IMAGE * BATCH
    assert (decoder_out.in_channels, decoder_out.out_channels) == (32, 1)
    assert counted.by_module["VaeGanGenerator.autoencoder.decoder.conv_out"] == 5 * conv_out

    # Whole step against forward conv/linear FLOPs summed by hooks: the backward adds at least the
    # autoencoder's weight grads and at most twice the forward, plus the adaptive weight's partial
    # backward (< 1 forward), so the total lies within (1, 4) forwards; 1.5 needs the backward counted.
    forward = 0

    def hook(module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        nonlocal forward
        if isinstance(module, nn.Conv2d):
            forward += _conv_forward_flops(module, output)
        elif isinstance(module, nn.Linear):
            forward += 2 * module.in_features * output.numel()

    for module in step.modules:
        for sub in module.modules():
            sub.register_forward_hook(hook)
    step.run()
    assert 1.5 * forward < counted.total < 4.0 * forward
    # LPIPS's VGG16 features alone are 30.7 GFLOPs forward per 224x224 image, so 2 x 2.5 at 64x64.
    assert counted.total > 5.0e9 * BATCH


def test_cli_validates_image_size() -> None:
    """Run as a user runs it: the script imports its sibling modules from its own folder."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, str(TOOLS / "bench.py"), "models", "--presets", "tiny",
                           "--image-size", "48", "--device", "cpu"], capture_output=True, text=True)
    assert done.returncode != 0 and "--image-size=48" in done.stderr
