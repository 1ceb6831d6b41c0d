"""A run directory as an artifact: where its files are (``layout``), what it holds (``artifact``),
and the one predictor built from its models (``predict``). Reads only: training writes runs."""

from radiodiff.runs.artifact import (
    FrozenVae,
    LoadedModels,
    TrainedRun,
    latent_scale,
    load_frozen_vae,
    load_models,
    load_unet,
    merge_data,
    open_checkpoint,
    open_run,
)

__all__ = ["FrozenVae", "LoadedModels", "TrainedRun", "latent_scale", "load_frozen_vae", "load_models",
           "load_unet", "merge_data", "open_checkpoint", "open_run"]
