"""torch.distributed set-up from the environment: torchrun, submitit, or plain SLURM variables.

NCCL on CUDA, gloo on CPU. Single-process runs need no environment at all.
"""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self):
        return self.rank == 0


def env_info(environ=os.environ):
    """Rank/world/local rank from torchrun (RANK, ...) or SLURM (SLURM_PROCID, ...) variables."""
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return DistInfo(int(environ["RANK"]), int(environ["WORLD_SIZE"]), int(environ.get("LOCAL_RANK", 0)))
    if "SLURM_PROCID" in environ and int(environ.get("SLURM_NTASKS", "1")) > 1 and "MASTER_ADDR" in environ:
        return DistInfo(int(environ["SLURM_PROCID"]), int(environ["SLURM_NTASKS"]), int(environ.get("SLURM_LOCALID", 0)))
    return DistInfo()


def init(device_kind=None):
    """Initialises the process group when world_size > 1; returns (DistInfo, torch.device)."""
    info = env_info()
    cuda = torch.cuda.is_available() if device_kind is None else device_kind == "cuda"
    device = torch.device("cuda", info.local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if info.world_size > 1 and not dist.is_initialized():
        os.environ.setdefault("RANK", str(info.rank))
        os.environ.setdefault("WORLD_SIZE", str(info.world_size))
        dist.init_process_group("nccl" if cuda else "gloo")
    return info, device


def barrier():
    if dist.is_initialized():
        dist.barrier()


def cleanup():
    if dist.is_initialized():
        dist.destroy_process_group()
