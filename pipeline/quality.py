"""Quality references of a trained LDM, shared by radiodiff-demo and tools/bench.py quality.

- a RadioUNet-style direct regressor (a plain conv U-Net, condition -> map, L1 + L2, AdamW) trained
  on the same shards, for the same updates and batch as the LDM;
- the latent regressor: the same conv U-Net, its decoder stopped at the latent's size, regressing the
  LDM's latent target (scale * the VAE posterior mode) and decoded by the frozen VAE: what a direct
  model in the LDM's latent space reaches with the same updates (the LDM against it: what the
  diffusion costs; it against the regressor: what the latent space costs);
- the resolution ceiling (the target at model size, brought back to 256);
- transmitter ablations: any predictor with the transmitter channel set to its background value;
- ``score_split``: mean metrics of a predictor on the test split, as radiodiff-eval scores them
  (native 256x256, [0, 1] gray, per image then averaged), with optional grid images, and the two
  sharpness measures of ``radiodiff.metrics`` (edge energy, edge error) that radiodiff-eval does not give,
  at the models' size: the prediction and the target both resized as training resizes targets. At 256
  the targets' finest structure, which no model at 64 draws, would swamp them (the resolution ceiling
  keeps ~13% of the 256x256 targets' edge energy; ~60% at 64, where the upsampling to 256 and the
  antialiased resize back smooth the rest). The ceiling's value is what a perfect model scores. It
  also says where the error lies: the share of the squared error on building pixels (0 in every
  RadioMapSeer target; the condition marks them at 256) and the PSNR with them set to 0 (not the
  published scoring: a measurement of how much of a model's error the buildings' edges are);
- ``derived_overrides`` / ``derived_names``: the LDM's opt-in derived input channels, so that a
  comparison gives the LDM and its regressors the same inputs and says which.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from radiodiff.models.fusion import derived_channels, with_derived_channels

METRICS = ("psnr", "ssim", "nmse", "rmse")
EDGE_METRICS = ("edge_energy", "edge_error")  # score_split's only: radiodiff.metrics' sharpness measures
BUILDING_METRICS = ("building_share", "psnr_buildings_zeroed")  # score_split's only: where the error lies
BUILDINGS_CHANNEL, TX_CHANNEL = 0, 1  # cond = [buildings, transmitter, cars or buildings]
NUM_GRID = 4
# The opt-in derived input channels (radiodiff/models/fusion.py), by their model.unet key, in words.
DERIVED_INPUTS = {"tx_distance": "the distance channel", "tx_los": "the line-of-sight channels",
                  "tx_detour": "the detour channel"}


def derived_flags(settings: object) -> dict[str, bool]:
    """The derived inputs asked for by ``settings`` (a demo config, the benchmark's arguments): its
    attributes named by their model.unet keys, ``tx_distance``, ``tx_los`` and ``tx_detour``."""
    return {key: bool(getattr(settings, key)) for key in DERIVED_INPUTS}


def derived_overrides(settings: object) -> list[str]:
    """radiodiff-train-ldm overrides giving the LDM the derived inputs a regressor gets from the same settings."""
    return [f"model.unet.{key}={str(on).lower()}" for key, on in derived_flags(settings).items()]


def derived_names(settings: object) -> str:
    """The derived inputs that ``settings`` turns on, in words with their keys ("" when none is)."""
    flags = derived_flags(settings)
    return " and ".join(f"{name} (model.unet.{key})" for key, name in DERIVED_INPUTS.items() if flags[key])


def conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(),
                         nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU())


class RegressorUNet(nn.Module):
    """A plain conv U-Net in the RadioUNet style: condition (B, 3, s, s) -> map (B, 1, s, s), s % 16 == 0.

    Five levels (widths 16..256, 1.94M parameters) so that the big layers sit at low resolution:
    its cost per image stays a few times the tiny LDM's while its capacity is RadioUNet-like.
    ``out_stride`` 2^k stops the decoder k levels early: (B, out_channels, s / 2^k, s / 2^k).
    ``tx_distance`` and ``tx_los`` append the LDM's opt-in derived channels (``model.unet.tx_distance``,
    ``model.unet.tx_los``) to its input, as the LDM does.
    """

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64, 128, 256), out_channels: int = 1,
                 out_stride: int = 1, tx_distance: bool = False, tx_los: bool = False,
                 tx_detour: bool = False) -> None:
        super().__init__()
        self.tx_distance, self.tx_los, self.tx_detour = tx_distance, tx_los, tx_detour
        levels = out_stride.bit_length() - 1
        if out_stride < 1 or out_stride != 1 << levels or levels >= len(widths):
            raise ValueError(f"out_stride={out_stride}: a power of 2 below {1 << len(widths)}")
        ups = widths[:levels:-1]  # the decoder's input widths, deepest first
        inputs = 3 + derived_channels(tx_distance, tx_los, tx_detour)
        self.down = nn.ModuleList(conv_block(cin, cout) for cin, cout in zip((inputs, *widths[:-1]), widths))
        self.up = nn.ModuleList(nn.ConvTranspose2d(w, w // 2, 2, stride=2) for w in ups)
        self.merge = nn.ModuleList(conv_block(w, w // 2) for w in ups)
        self.head = nn.Conv2d(widths[levels], out_channels, 1)

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        x = with_derived_channels(cond, tx_distance=self.tx_distance, tx_los=self.tx_los, tx_detour=self.tx_detour)
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        for up, merge, skip in zip(self.up, self.merge, skips[-2::-1]):
            x = merge(torch.cat([up(x), skip], dim=1))
        return self.head(x)  # in the target's range (not clamped: the loss sees it all)


def regression_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.l1_loss(pred, target) + F.mse_loss(pred, target)


def train_regressor(data, *, steps: int, batch: int, lr: float, seed: int, out_channels: int = 1,
                    out_stride: int = 1, target_of: Callable[[torch.Tensor], torch.Tensor] | None = None,
                    tx_distance: bool = False, tx_los: bool = False, tx_detour: bool = False) -> RegressorUNet:
    """AdamW with cosine decay to lr/10 (as the LDM decays to min_lr), on the training stream, against
    ``target_of(sample["target"])`` (default: the map itself)."""
    from radiodiff.data.shards import ShardLoader

    torch.manual_seed(seed)
    model = RegressorUNet(out_channels=out_channels, out_stride=out_stride, tx_distance=tx_distance, tx_los=tx_los,
                          tx_detour=tx_detour)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps, eta_min=lr / 10)
    loader = ShardLoader(data, "train", batch_size=batch, seed=seed, augment=True)
    for _, sample in zip(range(steps), loader):
        target = sample["target"] if target_of is None else target_of(sample["target"])
        loss = regression_loss(model(sample["cond"]), target)  # (B, 1, s, s) or (B, Z, h, w) each
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return model.eval()


def regressor_predictor(model: nn.Module, data):
    """radiodiff's Predict for the regressor: model-size inputs -> (B, 1, 256, 256) in [0, 1]."""
    from radiodiff.runs.predict import to_native_unit

    def predict(cond: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return to_native_unit(model(cond), data)

    return predict


class LatentCodec:
    """An LDM run's latent space, with the VAE and scale its training and sampler use: z = scale * the
    frozen VAE's posterior mode (the mean of the z0 its training samples; a regressor's target has no
    sampling noise); map = VAE.decode(z / scale), as the sampler decodes."""

    def __init__(self, ldm_dir: Path, device: torch.device) -> None:
        from radiodiff.runs import load_models, open_run

        models = load_models(open_run(ldm_dir), device)
        self.vae, self.scale = models.vae, models.scale_factor
        self.channels, self.factor = self.vae.cfg.embed_dim, self.vae.cfg.downsample_factor

    def encode(self, target: torch.Tensor) -> torch.Tensor:  # (B, 1, s, s) -> (B, Z, s / f, s / f)
        with torch.no_grad():
            return self.scale * self.vae.encode(target.float()).mode()

    def decode(self, z: torch.Tensor) -> torch.Tensor:  # (B, Z, h, w) -> (B, 1, h * f, w * f)
        with torch.no_grad():
            return self.vae.decode(z / self.scale).float()

    def to(self, device: torch.device) -> "LatentCodec":
        self.vae.to(device)
        return self


def latent_regressor(ldm_dir: Path, data, device: torch.device, *, steps: int, batch: int, lr: float, seed: int,
                     tx_distance: bool = False, tx_los: bool = False, tx_detour: bool = False):
    """The conv U-Net trained (on the CPU, as the regressor) on ``LatentCodec.encode`` of the maps, and its
    predictor: the predicted latent decoded by the run's VAE, -> (B, 1, 256, 256) in [0, 1]."""
    from radiodiff.runs.predict import to_native_unit

    codec = LatentCodec(ldm_dir, torch.device("cpu"))
    model = train_regressor(data, steps=steps, batch=batch, lr=lr, seed=seed, out_channels=codec.channels,
                            out_stride=codec.factor, target_of=codec.encode, tx_distance=tx_distance,
                            tx_los=tx_los, tx_detour=tx_detour).to(device)
    codec.to(device)

    def predict(cond: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return to_native_unit(codec.decode(model(cond)), data)

    return model, predict


def ceiling_predictor(data):
    """The target itself at model size, brought back to 256: the best any model at this size can score."""
    from radiodiff.runs.predict import to_native_unit

    return lambda cond, target: to_native_unit(target, data)


def background_value(value_range: str) -> float:
    """The transmitter channel's value at a pixel without a transmitter."""
    return {"symmetric": -1.0, "unit": 0.0}[value_range]


def without_transmitter(predict, value_range: str):
    """``predict`` with the transmitter channel of the condition blanked (a copy; the input is kept)."""
    blank = background_value(value_range)

    def ablated(cond: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        cond = cond.clone()
        cond[:, TX_CHANNEL] = blank
        return predict(cond, target)

    return ablated


def building_pixels(cond: torch.Tensor, data) -> torch.Tensor:
    """(B, 1, 256, 256) bool: the building pixels of a native-size condition in the run's value range."""
    from radiodiff.runs.predict import to_unit_scale

    return to_unit_scale(cond[:, BUILDINGS_CHANNEL:BUILDINGS_CHANNEL + 1], data) > 0.5


def building_errors(pred: torch.Tensor, gt: torch.Tensor, buildings: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per image: the squared error summed over building pixels and over all, and the PSNR of ``pred``
    with its building pixels set to 0 (every target's value there)."""
    from radiodiff.metrics import psnr

    squared = (pred.double() - gt.double()).square()
    return {"building_error": (squared * buildings).sum(dim=(1, 2, 3)), "total_error": squared.sum(dim=(1, 2, 3)),
            "psnr_buildings_zeroed": psnr(pred.masked_fill(buildings, 0.0), gt)}


def score_split(predict, data, device: torch.device, batch: int, grid_path: Path | None = None) -> dict:
    """Mean metrics and model seconds per map of ``predict`` on the test split, as radiodiff-eval scores;
    the edge and building measures of the module's header (ratios: the set's totals, not per image)."""
    from radiodiff.data.schema import resize_target
    from radiodiff.data.shards import ShardLoader
    from radiodiff.eval.evaluate import grid_row, write_grid
    from radiodiff.metrics import all_metrics, edge_energy, edge_error
    from radiodiff.runs.predict import predict_native

    loader = ShardLoader(replace(data, image_size=256), "test", batch_size=batch, epochs=1, shuffle=False,
                         num_workers=0)
    names = (*METRICS, "edge_error", "pred_edges", "target_edges", "psnr_buildings_zeroed", "building_error",
             "total_error")
    sums, count, seconds, grid = dict.fromkeys(names, 0.0), 0, 0.0, []
    model_size = replace(data, value_range="unit")  # resize_target on [0, 1] maps, to data.image_size
    for sample in loader:
        cond, target = sample["cond"], sample["target"]  # (B, 3, 256, 256), (B, 1, 256, 256)
        started = time.perf_counter()
        pred, gt = predict_native(predict, cond, target, data, device)
        seconds += time.perf_counter() - started
        small_pred, small_gt = resize_target(pred, model_size), resize_target(gt, model_size)
        values = {**all_metrics(pred, gt), "edge_error": edge_error(small_pred, small_gt),
                  "pred_edges": edge_energy(small_pred), "target_edges": edge_energy(small_gt),
                  **building_errors(pred, gt, building_pixels(cond, data))}
        for name in sums:
            sums[name] += math.fsum(values[name].tolist())
        count += len(sample["key"])
        keys = sample["key"][:NUM_GRID - len(grid)]
        grid += [(key, grid_row(cond[i], gt[i], pred[i], data)) for i, key in enumerate(keys)]
    if grid_path is not None:
        write_grid(grid, grid_path)
    total_error, building_error = sums.pop("total_error"), sums.pop("building_error")
    ratios = {"edge_energy": sums.pop("pred_edges") / sums.pop("target_edges"),
              "building_share": building_error / total_error if total_error else 0.0}
    return {**{name: total / count for name, total in sums.items()}, **ratios, "seconds_per_map": seconds / count,
            "num_samples": count}


def run_predictor(run_dir: Path, device: torch.device, steps: int, seed: int = 0):
    """A trained run's predictor as radiodiff-eval builds it (rank 0), and the run's data config: an LDM
    run's EMA model at ``steps`` sampler steps, a VAE run's reconstruction (posterior mode; it ignores
    ``steps``, the EMA and the seed)."""
    from radiodiff.config import SamplerConfig
    from radiodiff.runs import load_models, open_run
    from radiodiff.runs.predict import make_predictor, sampler_generator

    run = open_run(run_dir)
    models = load_models(run, device, use_ema=True)
    predict = make_predictor(models, run.config.data, sampler=SamplerConfig(steps=steps),
                             generator=sampler_generator(seed, 0, device))
    return predict, run.config.data
