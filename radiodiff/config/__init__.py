"""Typed configuration: the schema of every command.

The dataclasses here are the single source of truth. Hydra yaml files in ``conf/`` mirror them and
are validated against them on composition (unknown keys and wrong types fail there); enumerated
choices are checked in ``__post_init__``, which runs when an entry point converts the composed
config to these objects. Code below an entry point receives these dataclasses, never a DictConfig.

Split by concern: ``base`` (errors and checks), ``data``, ``models``, ``train`` and ``commands``
(evaluation, prediction, sweeps, the demo, and ``register_configs``); all re-exported here.
"""

from radiodiff.config.base import (
    ConfigError,
    check_choice,
    check_positive,
)
from radiodiff.config.commands import (
    TUNE_SCHEDULERS,
    TUNE_SEARCHES,
    DemoConfig,
    EncodeConfig,
    EncodeDataConfig,
    EvalConfig,
    SampleConfig,
    TuneConfig,
    TuneSweepConfig,
    register_configs,
)
from radiodiff.config.data import (
    BUILDINGS,
    PROTOCOLS,
    SIMULATION_TX_LIMIT,
    SIMULATIONS,
    SPLITS,
    VALUE_RANGES,
    DataConfig,
    RayConfig,
    ShardConfig,
    SynthConfig,
)
from radiodiff.config.models import (
    AUTOENCODER_PRESETS,
    CONDITION_PRESETS,
    DISC_LOSSES,
    DISCRIMINATOR_PRESETS,
    SAMPLER_ESTIMATES,
    UNET_PRESETS,
    AutoencoderConfig,
    ConditionEncoderConfig,
    DiffusionConfig,
    DiscriminatorConfig,
    EMAConfig,
    PerceptualConfig,
    SamplerConfig,
    UNetConfig,
    VaeGanLossConfig,
    autoencoder_preset,
    discriminator_preset,
)
from radiodiff.config.train import (
    LR_DECAYS,
    PRECISIONS,
    DeepSpeedConfig,
    DistConfig,
    ModelConfig,
    TrainConfig,
    TrainLdmConfig,
    TrainVaeConfig,
    VaeRefConfig,
    WandbConfig,
)

__all__ = [
    "ConfigError",
    "check_choice",
    "check_positive",
    "SIMULATIONS",
    "SIMULATION_TX_LIMIT",
    "BUILDINGS",
    "PROTOCOLS",
    "VALUE_RANGES",
    "SPLITS",
    "DataConfig",
    "RayConfig",
    "SynthConfig",
    "ShardConfig",
    "EncodeConfig",
    "EncodeDataConfig",
    "DISC_LOSSES",
    "AutoencoderConfig",
    "DiscriminatorConfig",
    "PerceptualConfig",
    "VaeGanLossConfig",
    "AUTOENCODER_PRESETS",
    "DISCRIMINATOR_PRESETS",
    "autoencoder_preset",
    "discriminator_preset",
    "ConditionEncoderConfig",
    "UNetConfig",
    "DiffusionConfig",
    "SAMPLER_ESTIMATES",
    "SamplerConfig",
    "EMAConfig",
    "CONDITION_PRESETS",
    "UNET_PRESETS",
    "LR_DECAYS",
    "PRECISIONS",
    "TrainConfig",
    "DeepSpeedConfig",
    "DistConfig",
    "WandbConfig",
    "ModelConfig",
    "TrainVaeConfig",
    "VaeRefConfig",
    "TrainLdmConfig",
    "EvalConfig",
    "SampleConfig",
    "TUNE_SCHEDULERS",
    "TUNE_SEARCHES",
    "TuneSweepConfig",
    "TuneConfig",
    "DemoConfig",
    "register_configs",
]
