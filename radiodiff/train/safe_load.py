"""Loading DeepSpeed checkpoints without unpickling code from the run directory.

DeepSpeed reads its checkpoint files with ``torch.load(weights_only=False)``, in
``engine.load_checkpoint`` and in the universal conversion: a pickle planted in a shared run
directory would run its code on resume. PyTorch's ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` makes every
``torch.load`` use the restricted unpickler whatever its caller asked for; the few non-tensor types
DeepSpeed stores in its optimizer files are allow-listed by name. Anything else in a file is refused.

``python -m radiodiff.train.safe_load <ds_to_universal arguments>`` runs DeepSpeed's universal
conversion under the same rule (it runs in its own process).
"""

from __future__ import annotations

import contextlib
import os
import runpy
import sys
from typing import Iterator

import torch

FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"


def deepspeed_safe_globals() -> list[type]:
    """The non-tensor types DeepSpeed's ZeRO 0-2 checkpoint files hold (plain data classes and enums)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, fragment_address]


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Inside: every torch.load in this process is weights-only, with DeepSpeed's types allowed."""
    previous = os.environ.get(FORCE_WEIGHTS_ONLY)
    os.environ[FORCE_WEIGHTS_ONLY] = "1"
    try:
        with torch.serialization.safe_globals(deepspeed_safe_globals()):
            yield
    finally:
        if previous is None:
            os.environ.pop(FORCE_WEIGHTS_ONLY, None)
        else:
            os.environ[FORCE_WEIGHTS_ONLY] = previous


def main(argv: list[str] | None = None) -> None:
    """DeepSpeed's ds_to_universal with weights-only loads (its worker processes inherit both)."""
    os.environ[FORCE_WEIGHTS_ONLY] = "1"
    torch.serialization.add_safe_globals(deepspeed_safe_globals())
    sys.argv = ["ds_to_universal", *(sys.argv[1:] if argv is None else argv)]
    runpy.run_module("deepspeed.checkpoint.ds_to_universal", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
