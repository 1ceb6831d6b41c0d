"""Export a trained run's newest committed checkpoint as standalone weights for inference or sharing.

    python tools/export_checkpoint.py <run_dir> <out.pt> [--no-ema]

A VAE run gives the bare AutoencoderKL in the CompVis latent-diffusion layout (loads with
strict=True into radiodiff's AutoencoderKL, and into diffusers through its LDM converter); an LDM
run gives the U-Net with its condition encoder (EMA weights unless --no-ema) and the frozen
autoencoder it was trained on. The file holds plain tensors and the model configs:

    {"stage", "step", "autoencoder": state dict, "autoencoder_config": {...},
     "unet": state dict, "unet_config": {...}, "condition_config": {...}, "scale_factor", "ema"}

and loads with torch.load(path, weights_only=True).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch


def export(run_dir: str, out: Path, use_ema: bool) -> dict:
    from radiodiff.runs import load_models, open_run

    run = open_run(run_dir)
    models = load_models(run, torch.device("cpu"), use_ema=use_ema if run.stage == "ldm" else None)
    cpu = lambda module: {k: v.detach().float().cpu() for k, v in module.state_dict().items()}  # noqa: E731
    payload = {"stage": run.stage, "step": run.step, "autoencoder": cpu(models.vae)}
    if run.stage == "vae":
        payload["autoencoder_config"] = dataclasses.asdict(run.config.model.autoencoder)
    else:
        payload.update(unet=cpu(models.unet), unet_config=dataclasses.asdict(run.config.model.unet),
                       condition_config=dataclasses.asdict(run.config.model.condition),
                       scale_factor=models.scale_factor, ema=models.ema)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, out)
    return payload


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("out", type=Path)
    parser.add_argument("--no-ema", action="store_true", help="LDM: the raw weights instead of the EMA")
    args = parser.parse_args(argv)
    try:
        payload = export(args.run_dir, args.out, use_ema=not args.no_ema)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"exported the {payload['stage']} run at step {payload['step']} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
