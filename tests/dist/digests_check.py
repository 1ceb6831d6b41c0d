"""Run under torchrun (gloo) by test_spread_digests: a checkpoint folder written the way a ZeRO-2
save writes it (each rank its rank file and its optimizer shard; rank 0 the model, the EMA, meta.json
and DeepSpeed's ``latest``), committed and then resumed from with every file read counted per rank.

Then ranks 3 and 5 fail a write (as a full disk does) and every rank asks radiodiff.dist.first_error for
the cause, once with those failures and once without.

Argument: a run directory. Each rank writes ``<run_dir>/rank<RANK>.json``: the record it got, the
files it read in each phase, the checkpoint its resume chose and the causes first_error gave it.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as torch_dist

from radiodiff.dist import DistInfo, first_error
from radiodiff.runs import layout
from radiodiff.train import checkpoint, digests

def files(world_size: int) -> dict[str, tuple[int, int]]:
    """file -> (writer, size); the content is the bytes of numpy's generator seeded by the file's index."""
    out = {"unet/mp_rank_00_model_states.pt": (0, 400_000), "ema.pt": (0, 300_000), "latest": (0, 4)}
    for rank in range(world_size):
        out[f"rank_{rank:05d}.pt"] = (rank, 1_000)
        out[f"unet/zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"] = (rank, 50_000)
    return out


def content(name: str, world_size: int) -> bytes:
    index = sorted(files(world_size)).index(name)
    return np.random.default_rng(index).bytes(files(world_size)[name][1])


def main() -> None:
    run_dir = Path(sys.argv[1])
    torch_dist.init_process_group("gloo")
    rank, world = torch_dist.get_rank(), torch_dist.get_world_size()
    dist = DistInfo(rank, world, 0, torch.device("cpu"))
    read: list[str] = []
    hash_file = layout.file_digest

    def counted(path: Path) -> list:
        read.append(str(Path(path).relative_to(run_dir)))
        return hash_file(path)

    layout.file_digest = digests.file_digest = counted  # the reader of verification and of the commit
    older = layout.step_dir(run_dir, 1)  # a committed checkpoint to fall back to
    if rank == 0:
        older.mkdir(parents=True)
        (older / "rank_00000.pt").write_bytes(b"older")
        (older / layout.META_FILE).write_text(json.dumps({"step": 1}))
        (older / layout.COMMITTED).write_bytes(layout.commit_record(1, layout.file_digests(older)))
    folder = layout.step_dir(run_dir, 2)
    (folder / "unet").mkdir(parents=True, exist_ok=True)
    for name, (writer, _) in files(world).items():
        if writer == rank:
            (folder / name).write_bytes(content(name, world))
    if rank == 0:
        (folder / layout.META_FILE).write_text(json.dumps({"step": 2}))
    torch_dist.barrier()
    read.clear()
    record = digests.spread_digests(folder, rank)
    phases = {"commit": sorted(read)}
    if rank == 0:
        (folder / layout.COMMITTED).write_bytes(layout.commit_record(2, record))
    torch_dist.barrier()
    read.clear()
    intact = digests.spread_verify(folder, rank, world)
    phases["verify"] = sorted(read)
    victim = folder / "unet/zero_pp_rank_5_mp_rank_00_optim_states.pt"
    if rank == 0:  # same size, one byte changed
        data = bytearray(victim.read_bytes())
        data[100] ^= 0xFF
        victim.write_bytes(bytes(data))
    torch_dist.barrier()
    read.clear()
    resumed = checkpoint.find_resume(run_dir, dist)
    phases["resume"] = sorted(read)
    failure = OSError(28, f"No space left on device (rank {rank} writing)") if rank in (3, 5) else None
    causes = [first_error(failure, dist), first_error(None, dist)]
    (run_dir / f"rank{rank}.json").write_text(json.dumps({
        "record": record, "intact": intact, "phases": phases, "resumed": str(resumed), "causes": causes}))
    torch_dist.barrier()
    torch_dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
