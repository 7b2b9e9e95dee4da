"""Processes of a training run: one, or many under ``torchrun`` / SLURM (``torch.distributed``)."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from par.utils import pick_device


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # this run set the process group up (and tears it down at its end)

    def close(self) -> None:
        """Tears down the process group this run set up; one set up by the caller (a program running
        several trainings in the same processes) is left to it."""
        if self.owns_group:
            torch.distributed.destroy_process_group()

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of ``value`` over processes (detached)."""
        value = value.detach().clone()
        if self.world_size > 1:
            torch.distributed.all_reduce(value)
            value /= self.world_size
        return value

    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        """Every process's ``rows`` (detached, the same shape on each), concatenated in rank order, on every one."""
        rows = rows.detach().contiguous()
        if self.world_size == 1:
            return rows
        parts = [torch.empty_like(rows) for _ in range(self.world_size)]
        torch.distributed.all_gather(parts, rows)
        return torch.cat(parts)

    def gather_to_main(self, obj) -> list:
        """``[obj of rank 0, obj of rank 1, ...]`` on rank 0 (``None`` elsewhere); ``[obj]`` in one process."""
        if self.world_size == 1:
            return [obj]
        gathered = [None] * self.world_size if self.main else None
        torch.distributed.gather_object(obj, gathered, dst=0)
        return gathered


def setup_distributed(device_name: str):
    """(Dist, device): torchrun/SLURM environments are read by open_clip_train's helper."""
    from open_clip_train.distributed import init_distributed_device_so, is_using_distributed

    device = pick_device(device_name)  # an unavailable device is an error here, never a fallback
    if not is_using_distributed():
        if device.type == "cuda" and device.index is not None:
            torch.cuda.set_device(device)  # cuda:1 alone: its random stream is the one saved and restored
        return Dist(), device
    if torch.distributed.is_initialized():  # the caller's group: join it, leave it up
        local = int(os.environ.get("LOCAL_RANK", 0))
        return Dist(torch.distributed.get_rank(), torch.distributed.get_world_size(), local), _local_device(device, local)
    info = init_distributed_device_so(device=device.type, no_set_device_rank=True)
    return (Dist(info["global_rank"], info["world_size"], info["local_rank"], owns_group=True),
            _local_device(torch.device(info["device"]), info["local_rank"]))


def _local_device(device: torch.device, local_rank: int) -> torch.device:
    """This process's GPU, made current (NCCL's collectives run on the current device): the local rank's,
    counted among the GPUs it can see (a scheduler giving each task one GPU shows every rank as GPU 0)."""
    if device.type != "cuda":
        return device
    device = torch.device("cuda", local_rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    return device


def replica_drift(model: torch.nn.Module) -> float:
    """Largest difference between ranks of per-tensor parameter checksums: 0 when DDP kept them in sync."""
    sums = torch.stack([p.detach().double().sum() for p in model.parameters()] +
                       [p.detach().double().abs().sum() for p in model.parameters()])  # on the model's device: NCCL
    gathered = [torch.zeros_like(sums) for _ in range(torch.distributed.get_world_size())]  # gathers no CPU tensor
    torch.distributed.all_gather(gathered, sums)
    return max((g - gathered[0]).abs().max().item() for g in gathered)
