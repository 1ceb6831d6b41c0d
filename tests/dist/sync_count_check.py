"""Run under torchrun by test_sync_free: a short training run of one stage with every collective and
every host read of a tensor counted, per update. Each rank writes its counts as JSON to
``<counts_dir>/rank<RANK>.json`` (two ranks printing long lines to one pipe can interleave them).

Counted: calls of torch.distributed's collectives (DeepSpeed's go through them too) and host reads
(``aten._local_scalar_dense``: ``.item()``, ``bool()``, ``float()`` of a tensor; and ``.tolist()`` of a
floating tensor, which on the CPU does not pass through the dispatcher). Each event is attributed to
the innermost radiodiff or deepspeed frame that caused it, and to the update in progress (an update
runs from the start of one ``loop._run_update`` to the start of the next, so the loop's own work
between updates belongs to the update before).
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as torch_dist
from torch.utils._python_dispatch import TorchDispatchMode

from radiodiff.cli import compose
from radiodiff.train import loop
from radiodiff.train.main import run_training
from radiodiff.train.stages import build_ldm_stage, build_vae_stage

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "broadcast",
               "broadcast_object_list", "reduce", "reduce_scatter", "reduce_scatter_tensor", "barrier",
               "all_to_all_single", "_all_gather_base", "_reduce_scatter_base")
update = -1  # the update in progress (0-based); -1: set-up
events: Counter = Counter()  # (update, kind, origin) -> count


def origin() -> str:
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename.replace("\\", "/")
        if "/site-packages/deepspeed/" in name:
            return "deepspeed"
        if "/radiodiff/" in name and "/tests/" not in name:
            return "radiodiff"
        frame = frame.f_back
    return "other"


def record(kind: str) -> None:
    events[(update, kind, origin())] += 1


class HostReads(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            record("host_read")
        return func(*args, **(kwargs or {}))


def instrument() -> None:
    for name in COLLECTIVES:
        original = getattr(torch_dist, name)

        def counted(*args, _original=original, **kwargs):
            record("collective")
            return _original(*args, **kwargs)

        setattr(torch_dist, name, counted)

    tolist = torch.Tensor.tolist

    def counted_tolist(self):
        if self.is_floating_point():  # integer tensors read here are the loader's sample positions
            record("host_read")
        return tolist(self)

    torch.Tensor.tolist = counted_tolist
    run_update = loop._run_update

    def counted_update(*args, **kwargs):
        global update
        update += 1
        return run_update(*args, **kwargs)

    loop._run_update = counted_update


def main(stage: str, counts_dir: Path, overrides: list[str]) -> None:
    cfg = compose(f"train_{stage}", overrides)
    instrument()
    with HostReads():
        code = run_training(cfg, build_vae_stage if stage == "vae" else build_ldm_stage, stage)
    per_update = {}
    for (index, kind, where), count in events.items():
        per_update.setdefault(str(index), {}).setdefault(kind, {})[where] = count
    counts_dir.mkdir(parents=True, exist_ok=True)
    (counts_dir / f"rank{os.environ['RANK']}.json").write_text(json.dumps({"code": code, "updates": per_update}))


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), sys.argv[3:])
