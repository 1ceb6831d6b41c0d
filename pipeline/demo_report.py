"""The demo's report.md: what ran, the metrics of both stages next to the baseline, the images."""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.quality import derived_names
from radiodiff.config import DemoConfig

METRICS = (("psnr", "PSNR (dB)", "{:.2f}"), ("ssim", "SSIM", "{:.4f}"), ("nmse", "NMSE", "{:.4f}"),
           ("rmse", "RMSE", "{:.4f}"), ("rmse_db", "RMSE (dB)", "{:.2f}"))
TITLES = {"vae": "Stage 1, VAE-GAN reconstruction", "ldm": "Stage 2, RadioDiff prediction"}


def metrics_table(results: dict[str, dict]) -> list[str]:
    lines = ["| | " + " | ".join(label for _, label, _ in METRICS) + " | maps | s/map |",
             "| --- |" + " --- |" * (len(METRICS) + 2)]
    for name, result in results.items():
        for who, values in ((TITLES[name], result), ("mean-map baseline", result["baseline"])):
            cells = [fmt.format(values[key]) for key, _, fmt in METRICS]
            own = who == TITLES[name]
            extra = [str(result["num_samples"]), f"{result['seconds_per_map']:.3f}"] if own else ["", ""]
            lines.append(f"| {who} | " + " | ".join(cells + extra) + " |")
    return lines


def inputs_line(cfg: DemoConfig) -> str:
    """What the LDM and the regressor see beyond the published inputs (both see the same)."""
    derived = derived_names(cfg)
    if not derived:
        return "The LDM and the regressor see the published inputs only."
    return f"The LDM and the regressor both also see {derived}: not published inputs."


def references_table(ldm: dict, references: dict[str, dict]) -> list[str]:
    """The LDM next to the mean map, a direct regressor, and both without the transmitter."""
    rows = [("RadioDiff LDM (EMA)", ldm), ("LDM, transmitter removed", references["ldm_no_tx"]),
            ("direct conv U-Net regressor, same updates and batch", references["regressor"]),
            ("regressor, transmitter removed", references["regressor_no_tx"]),
            ("mean training map", ldm["baseline"])]
    lines = ["| model | PSNR (dB) | SSIM | NMSE |", "| --- | --- | --- | --- |"]
    lines += [f"| {name} | {v['psnr']:.2f} | {v['ssim']:.4f} | {v['nmse']:.4f} |" for name, v in rows]
    drop = ldm["psnr"] - references["ldm_no_tx"]["psnr"]
    return lines + ["", f"Removing the transmitter costs the LDM {drop:.2f} dB: the prediction follows it."
                    if drop >= 1.0 else f"Removing the transmitter costs the LDM only {drop:.2f} dB."]


def write_report(out: Path, cfg: DemoConfig, manifest: dict, results: dict[str, dict],
                 figures: dict[str, list[Path]], references: dict[str, dict]) -> Path:
    splits = ", ".join(f"{split} {entry['num_samples']}" for split, entry in manifest["splits"].items())
    lines = [
        "# radiodiff demo report", "",
        f"Synthetic RadioMapSeer: {cfg.synth.num_maps} maps x {cfg.synth.num_tx} transmitters (seed "
        f"{cfg.synth.seed}), sharded with Ray ({manifest['protocol']} protocol; samples {splits}). "
        f"Model preset `{cfg.model}`: VAE-GAN {cfg.vae_steps} steps (discriminator from step {cfg.disc_start}), "
        f"latent diffusion {cfg.ldm_steps} steps, sampler {cfg.sampler_steps} steps, learning rate {cfg.lr:g}, "
        f"{cfg.nproc} rank(s).", "",
        "## Test-split metrics (per image on the [0, 1] gray scale, then averaged)", "",
        *metrics_table(results), "",
        "The baseline predicts the mean training map for every sample: a model that learned something "
        "beats it. A tiny model trained for minutes on a CPU is far from the published numbers.", "",
        "## Stage 2 against references", "",
        inputs_line(cfg), "",
        *references_table(results["ldm"], references), "",
        f"![LDM without the transmitter]({os.path.relpath(out / 'eval' / 'ldm_no_tx_grid.png', out)})", "",
    ]
    for name in results:
        grid = out / "eval" / name / "grid.png"
        lines += [f"## {TITLES[name]}", "", "Columns: buildings, transmitter, ground truth, prediction, "
                  "absolute error.", "", f"![{name} samples]({os.path.relpath(grid, out)})", ""]
        lines += [f"![{p.stem}]({os.path.relpath(p, out)})" for p in figures.get(name, [])] + [""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
