"""radiodiff-synth: write a synthetic RadioMapSeer folder (``conf/synth.yaml``, SynthConfig)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterable, Iterator

from radiodiff.cli import run_app
from radiodiff.config import SynthConfig
from radiodiff.data.synthetic import prepare_output, read_positions_csv, write_map


def _progress(items: list[int], desc: str) -> Iterable[int]:
    """tqdm when installed; otherwise a plain line every ~10% so long runs still show progress."""
    try:
        from tqdm import tqdm
    except ImportError:
        return _plain_progress(items, desc)
    return tqdm(items, desc=desc, unit="map")


def _plain_progress(items: list[int], desc: str) -> Iterator[int]:
    step = max(1, len(items) // 10)
    for i, item in enumerate(items):
        if i % step == 0:
            print(f"{desc}: {i}/{len(items)} maps", flush=True)
        yield item


def run_synth(cfg: SynthConfig) -> int:
    """Write the dataset described by ``cfg`` and print a summary."""
    out = Path(cfg.out)
    source = Path(cfg.city_from) if cfg.city_from else None
    if source is not None and not (source / "png" / "buildings_complete").is_dir():
        raise FileNotFoundError(f"city_from={source}: png/buildings_complete not found there")
    map_ids = list(cfg.map_ids) if cfg.map_ids is not None else list(range(cfg.num_maps))
    prepare_output(out, cfg.overwrite)
    csv_positions = read_positions_csv(source) if source is not None else None
    files = gains = 0
    seconds = 0.0
    start = time.perf_counter()
    for map_id in _progress(map_ids, "radiodiff-synth"):
        f, g, s = write_map(out, map_id, cfg.num_tx, cfg.seed, list(cfg.simulations), cfg.missing_versions,
                            source, csv_positions)
        files, gains, seconds = files + f, gains + g, seconds + s
    per_gain_ms = 1000.0 * seconds / max(gains, 1)
    origin = f"real cities from {source}" if source is not None else f"synthetic cities (seed {cfg.seed})"
    print(f"radiodiff-synth wrote {len(map_ids)} maps x {cfg.num_tx} tx of {origin} to {out}: "
          f"{files} files, {gains} gain maps ({', '.join(cfg.simulations)}), "
          f"{per_gain_ms:.1f} ms per gain map (simulation only, all models of a tx sharing its ray "
          f"geometry), {time.perf_counter() - start:.1f} s in all.")
    return 0


def main() -> int:
    return run_app("synth", run_synth)
