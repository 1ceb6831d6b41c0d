"""radiodiff-demo compares its LDM with a direct regressor that sees the same inputs."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.demo import demo_regressor, ldm_args
from pipeline.demo_report import inputs_line
from radiodiff.cli import compose
from radiodiff.config import DataConfig
from radiodiff.models.fusion import derived_channels


@pytest.mark.parametrize("tx_distance, tx_los, tx_detour", [(False, False, False), (True, False, False),
                                                           (False, True, False), (True, True, False),
                                                           (False, True, True)])
def test_the_ldm_and_the_regressor_get_the_same_derived_inputs(train_shards: Path, tmp_path: Path, tx_distance: bool,
                                                                tx_los: bool, tx_detour: bool) -> None:
    flags = [f"tx_distance={str(tx_distance).lower()}", f"tx_los={str(tx_los).lower()}",
             f"tx_detour={str(tx_detour).lower()}"]
    cfg = compose("demo", [f"out_dir={tmp_path}", *flags, "ldm_steps=1", "batch_size=2"])
    ldm = compose("train_ldm", ldm_args(cfg, tmp_path / "ldm", tmp_path / "vae")).model.unet
    assert (ldm.tx_distance, ldm.tx_los, ldm.tx_detour) == (tx_distance, tx_los, tx_detour)
    regressor = demo_regressor(cfg, DataConfig(shards=str(train_shards), image_size=64, num_workers=0))
    assert regressor.down[0][0].in_channels == 3 + derived_channels(ldm.tx_distance, ldm.tx_los, ldm.tx_detour)
    line = inputs_line(cfg)
    assert ("distance channel" in line) == tx_distance and ("line-of-sight" in line) == tx_los
    assert ("detour channel" in line) == tx_detour
    assert ("published inputs only" in line) == (not tx_distance and not tx_los and not tx_detour)
