"""The command line that runs one of this environment's console scripts on one or more local ranks."""

from __future__ import annotations

import sys
from pathlib import Path


def console_command(script: str, nproc: int = 1) -> list[str]:
    """``script`` (e.g. ``radiodiff-train-vae``) as one process, or under torchrun with ``nproc`` ranks."""
    path = str(Path(sys.executable).parent / script)
    if nproc == 1:
        return [sys.executable, path]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", path]
