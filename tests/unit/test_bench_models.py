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


@pytest.fixture
def one_thread():
    """One torch thread: on a small shared CPU two threads contend, several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_run(bench_models, world_of_one):
    bm = bench_models
    # threads=1 (--threads): see one_thread.
    opts = bm.ModelBenchOptions(presets=("tiny",), image_size=IMAGE, batch=BATCH, iters=1, warmup=1, device="auto",
                                threads=1)
    torch_threads = torch.get_num_threads()
    try:
        device, rows = bm.run_model_bench(opts)
    finally:
        torch.set_num_threads(torch_threads)
    return opts, device, rows


def test_table_has_one_row_per_configuration_with_positive_finite_timings(bench_models, tiny_run, world_of_one) -> None:
    bm = bench_models
    opts, device, rows = tiny_run
    expected = [(s, "tiny", p, cl) for s in ("vae-gan", "ldm") for p in ("fp32", "bf16") for cl in (False, True)]
    assert device == world_of_one.device
    assert [(r.stage, r.preset, r.precision, r.channels_last) for r in rows] == expected
    for row in rows:
        for value in (row.ms_per_image, row.images_per_s, row.gflops_per_image, row.tflops_per_s):
            assert math.isfinite(value) and value > 0, row
        assert row.images_per_s == pytest.approx(1e3 / row.ms_per_image)
        assert row.gflops_per_image == pytest.approx(row.flops.total / BATCH / 1e9)
        assert (row.peak_mem_gib is None) == (device.type == "cpu")  # a CUDA-only column
        if device.type == "cpu":
            assert row.mfu is None
        # The ldm step is the real one: it encodes the target with the frozen VAE (and never decodes).
        assert ("Encoder" in row.flops.by_module) == (row.stage == "ldm") and "Decoder" not in row.flops.by_module
    report = bm.format_report(opts, device, rows)
    table_lines = [line.split() for line in report.splitlines() if line.startswith(("vae-gan ", "ldm "))]
    assert [line[:4] for line in table_lines] == [
        [r.stage, r.preset, r.precision, "on" if r.channels_last else "off"] for r in rows
    ]
    # 2 stages x (bf16 over fp32 per layout + channels_last per precision)
    assert report.count("bf16 over fp32") == 4 and report.count("channels_last on over off") == 4


def test_the_derived_channels_stage_times_the_ldm_step_with_them_beside_the_plain_one(bench_models, world_of_one,
                                                                                     one_thread) -> None:
    bm = bench_models
    opts = bm.ModelBenchOptions(presets=("tiny",), image_size=IMAGE, batch=BATCH, iters=1, warmup=1,
                                stages=("ldm", "ldm-derived"), precisions=("fp32",), channels_last=(False,))
    device, rows = bm.run_model_bench(opts)
    plain, derived = rows
    assert (plain.stage, derived.stage) == ("ldm", "ldm-derived")
    # Three more condition channels reach the condition encoder and the stem: more FLOPs, the same network.
    assert derived.flops.total > plain.flops.total
    step = bm.build_ldm_step(bm.MODEL_PRESETS["tiny"], IMAGE, BATCH, device, "fp32", False, derived=True)
    unet = step.models.engine.module
    assert (unet.cfg.tx_los, unet.cfg.tx_detour) == (True, True)
    step.engines[0].destroy()
    ratios = dict(bm.speedups(rows))
    label = "ldm tiny: derived channels on over off, fp32, channels_last off"
    assert ratios[label] == pytest.approx(plain.ms_per_image / derived.ms_per_image)


def _conv_forward_flops(module: nn.Conv2d, output: torch.Tensor) -> int:
    """2 * Cin/groups * Cout * kh * kw * Hout * Wout * B: one multiply-add per weight per output pixel."""
    kh, kw = module.kernel_size
    return 2 * module.in_channels // module.groups * kh * kw * output.numel()


def test_stage1_times_the_real_step_whose_flops_match_hand_counts(bench_models, world_of_one, one_thread) -> None:
    bm = bench_models
    torch.manual_seed(0)
    step = bm.build_vae_gan_step(bm.MODEL_PRESETS["tiny"], IMAGE, BATCH, world_of_one.device, "fp32", False)
    generator, disc = step.models.generator.module, step.models.discriminator.module
    encoder_in, decoder_out = generator.autoencoder.encoder.conv_in, generator.autoencoder.last_layer
    before = [p.detach().clone() for p in (encoder_in.weight, disc.main[0].weight)]
    counted = bm.count_flops(step.run)
    # Both engines' optimizer steps ran: the autoencoder's and the discriminator's weights moved.
    assert not any(torch.equal(b, p) for b, p in zip(before, (encoder_in.weight, disc.main[0].weight)))

    # The image (1 channel) is not differentiated: conv_in costs its forward plus its weight grad.
    conv_in = 2 * 1 * 32 * 3 * 3 * IMAGE * IMAGE * BATCH
    assert (encoder_in.in_channels, encoder_in.out_channels) == (1, 32)
    assert counted.by_module["DeepSpeedEngine.module.autoencoder.encoder.conv_in"] == 2 * conv_in
    # The last layer: forward, input and weight grads in the backward, then the adaptive weight's
    # small graph: its forward again (on detached features) and two weight grads: 6 x its forward.
    conv_out = 2 * 32 * 1 * 3 * 3 * IMAGE * IMAGE * BATCH
    assert (decoder_out.in_channels, decoder_out.out_channels) == (32, 1)
    assert counted.by_module["DeepSpeedEngine.module.autoencoder.decoder.conv_out"] == 6 * conv_out

    # Whole step against forward conv/linear FLOPs summed by hooks (every forward: the adaptive
    # weight's and the frozen discriminator's too). LPIPS runs on two maps and backpropagates
    # through one (1.5 x its forward); every other network adds at least its weight grads (2 x), so
    # the total exceeds 1.5 forwards only with the backward counted; a backward is at most 2 forwards.
    forward = 0

    def hook(module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        nonlocal forward
        if isinstance(module, nn.Conv2d):
            forward += _conv_forward_flops(module, output)
        elif isinstance(module, nn.Linear):
            forward += 2 * module.in_features * output.numel()

    for module in (generator, disc, step.models.perceptual):
        for sub in module.modules():
            sub.register_forward_hook(hook)
    step.run()
    assert 1.5 * forward < counted.total < 3.0 * forward
    # LPIPS's VGG16 features are 30.7 GFLOPs forward per 224x224 image, so 2.5 at 64x64; the step
    # runs LPIPS twice on two maps (the loss, the adaptive weight) and backpropagates each through one
    # map: 6 x 2.5 GFLOPs in all, of which 5 x are asserted.
    assert counted.total > 5 * 2.5e9 * BATCH
    for engine in step.engines:
        engine.destroy()


def test_cli_validates_image_size() -> None:
    """Run as a user runs it: the script imports its sibling modules from its own folder."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, str(TOOLS / "bench.py"), "models", "--presets", "tiny",
                           "--image-size", "48", "--device", "cpu"], capture_output=True, text=True)
    assert done.returncode != 0 and "--image-size=48" in done.stderr


def test_reference_update_is_timed_side_by_side_and_trains_both_networks(bench_models, world_of_one,
                                                                        one_thread) -> None:
    bm = bench_models
    import sys

    sys.path.insert(0, str(TOOLS))  # as when run as a script: bench_reference is a sibling
    try:
        torch.manual_seed(0)
        step = bm.build_reference_vae_gan_step(bm.MODEL_PRESETS["tiny"], IMAGE, BATCH, world_of_one.device, "fp32",
                                               False)
        generator, discriminator = step.models
        before = [p.detach().clone() for p in (generator.autoencoder.encoder.conv_in.weight,
                                               discriminator.main[0].weight, generator.autoencoder.last_layer.weight)]
        step.run()
        after = (generator.autoencoder.encoder.conv_in.weight, discriminator.main[0].weight,
                 generator.autoencoder.last_layer.weight)
        assert not any(torch.equal(b, a) for b, a in zip(before, after))
        opts = bm.ModelBenchOptions(presets=("tiny",), image_size=IMAGE, batch=BATCH, iters=1, warmup=1,
                                    stages=("vae-gan", "vae-gan-ref"), precisions=("fp32",), channels_last=(False,),
                                    threads=1)
        device, rows = bm.run_model_bench(opts)
    finally:
        sys.path.remove(str(TOOLS))
    assert [(r.stage, r.precision, r.compiled) for r in rows] == [("vae-gan", "fp32", False),
                                                                  ("vae-gan-ref", "fp32", False)]
    ratios = dict(bm.speedups(rows))
    label = "vae-gan tiny: fp32, channels_last off, compile off over the reference's update (fp32 eager)"
    assert ratios[label] == pytest.approx(rows[1].ms_per_image / rows[0].ms_per_image)
    # The reference runs the autoencoder's forward twice (once per optimizer pass): its first conv
    # costs two forwards plus its weight gradient, where our step's costs one forward plus it.
    conv_in = 2 * 1 * 32 * 3 * 3 * IMAGE * IMAGE * BATCH
    assert rows[1].flops.by_module["Encoder.conv_in"] == 3 * conv_in
    assert rows[0].flops.by_module["DeepSpeedEngine.module.autoencoder.encoder.conv_in"] == 2 * conv_in
