"""Distributed setup and the few collectives the loop needs. Called once, from an entry point.

Under torchrun (or srun + torchrun) the launcher sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT; run directly (a laptop), the process is rank 0 of 1 and gets a free local port. The
backend is NCCL on GPUs and gloo on CPUs (DeepSpeed picks it from its accelerator).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as torch_dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LaunchError(ValueError):
    """The process was started in a way that cannot form the intended process group."""


def check_launch(env: dict[str, str]) -> None:
    """Refuse plain ``srun`` (no torchrun): every task would believe it is rank 0 of 1 and all of
    them would write the same run directory."""
    tasks = int(env.get("SLURM_NTASKS", "1") or 1)
    if tasks > 1 and "RANK" not in env:
        raise LaunchError(f"SLURM_NTASKS={tasks} but RANK is not set: this task was started by srun without "
                          "torchrun; launch with slurm/train_*.sh (srun + torchrun), or torchrun directly")


def setup(timeout_minutes: float = 60.0) -> DistInfo:
    """Join (or, single-process, create) the default process group through DeepSpeed.

    ``timeout_minutes``: how long a collective waits (a universal-checkpoint conversion or a slow
    shared filesystem keeps the other ranks in a barrier meanwhile).
    """
    import deepspeed

    if "RANK" not in os.environ:  # not launched by torchrun: a world of one
        os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
                           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())})
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not torch_dist.is_initialized():
        deepspeed.init_distributed(dist_init_required=True, timeout=timedelta(minutes=timeout_minutes))
    return DistInfo(torch_dist.get_rank(), torch_dist.get_world_size(), local_rank, device)


def teardown() -> None:
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def all_reduce_max(value: float | bool, device: torch.device) -> float:
    """The maximum of a scalar over all ranks (e.g. "any rank saw a NaN / a signal")."""
    tensor = torch.tensor([float(value)], device=device)
    if torch_dist.is_initialized():
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.MAX)
    return float(tensor.item())


def all_reduce_max_tensor(values: torch.Tensor) -> torch.Tensor:
    """The element-wise maximum of ``values`` over all ranks, in place, on their device (no host read)."""
    if torch_dist.is_initialized():
        torch_dist.all_reduce(values, op=torch_dist.ReduceOp.MAX)
    return values


def all_reduce_mean(metrics: dict[str, torch.Tensor], device: torch.device) -> dict[str, float]:
    """Average scalar metrics over ranks in one collective; returns Python floats."""
    names = sorted(metrics)
    stacked = torch.stack([metrics[n].detach().float().reshape(()).to(device) for n in names])
    if torch_dist.is_initialized():
        torch_dist.all_reduce(stacked, op=torch_dist.ReduceOp.SUM)
        stacked /= torch_dist.get_world_size()
    return dict(zip(names, stacked.tolist()))


def all_reduce_sum(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The element-wise sum of ``values`` over all ranks (every rank must call it), on the CPU."""
    tensor = values.to(device)
    if torch_dist.is_initialized():
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)
    return tensor.cpu()


def barrier() -> None:
    if torch_dist.is_initialized():
        torch_dist.barrier()


def broadcast_object(value: object, src: int = 0) -> object:
    """Rank ``src``'s value on every rank (decisions such as which checkpoint to resume)."""
    if not torch_dist.is_initialized():
        return value
    holder = [value]
    torch_dist.broadcast_object_list(holder, src=src)
    return holder[0]


def all_gather_object(value: object) -> list:
    """Every rank's value, in rank order, on every rank (small records such as file lists)."""
    if not torch_dist.is_initialized():
        return [value]
    gathered: list = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(gathered, value)
    return gathered


def first_error(error: BaseException | None, dist: DistInfo) -> str | None:
    """The lowest failing rank's error, on every rank, or None where no rank failed (collective, and a
    barrier). Every rank's error line then gives the cause: the launcher stops the other ranks once one
    exits, so the failing rank's own line may never be printed."""
    text = None if error is None else str(error) or type(error).__name__
    failed = [(rank, text) for rank, text in enumerate(all_gather_object(text)) if text is not None]
    if not failed:
        return None
    rank, text = failed[0]
    return text if dist.world_size == 1 else f"rank {rank}: {text}"


def on_rank_0(action: Callable[[], object], dist: DistInfo,
              catch: tuple[type[BaseException], ...] = (OSError,)) -> str | None:
    """Run ``action`` on rank 0 alone (a write to the run directory); the cause of its failure, or
    None, on every rank (collective, see first_error): no rank is left waiting when rank 0 fails."""
    error = None
    if dist.is_main:
        try:
            action()
        except catch as err:
            error = err
    return first_error(error, dist)


def is_main_process() -> bool:
    return not torch_dist.is_initialized() or torch_dist.get_rank() == 0


def print0(*args: object) -> None:
    if not torch_dist.is_initialized() or torch_dist.get_rank() == 0:
        print(*args, flush=True)
