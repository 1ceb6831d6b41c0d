"""radiodiff-demo (README command 1) end to end, with small step counts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.dist.conftest import environment


def test_demo_runs_every_stage_and_writes_the_report(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    done = subprocess.run(
        [sys.executable, "-c", "from pipeline.demo import main; raise SystemExit(main())", f"out_dir={out}",
         "synth.num_maps=10", "synth.num_tx=4", "shard.min_shards_per_split=2", "vae_steps=4", "disc_start=2",
         "ldm_steps=4", "sampler_steps=2", "batch_size=4"],
        capture_output=True, text=True, timeout=900, env=environment(),
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for number in range(1, 10):
        assert f"== {number}/9" in done.stdout
    report = (out / "report.md").read_text()
    for name in ("vae", "ldm"):
        metrics = json.loads((out / "eval" / name / "metrics.json").read_text())
        assert metrics["num_samples"] > 0 and "baseline" in metrics
        assert f"{metrics['psnr']:.2f}" in report and f"{metrics['baseline']['psnr']:.2f}" in report
        assert (out / "eval" / name / "grid.png").is_file()
        figures = {p.name for p in (out / "runs" / name / "figures").glob("*.png")}
        assert len(figures) == 6 and "throughput.png" in figures, figures  # 5 of the losses, 1 of the telemetry
        assert f"eval/{name}/grid.png" in report
    # Stage 2 against a direct regressor and both without the transmitter, in the report.
    assert "Stage 2 against references" in report and "transmitter removed" in report
    assert "The LDM and the regressor both also see the distance channel" in report  # the demo's default
    assert (out / "eval" / "ldm_no_tx_grid.png").is_file() and (out / "eval" / "regressor_grid.png").is_file()
