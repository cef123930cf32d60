"""torch.distributed set-up from the environment: torchrun, submitit, or plain SLURM variables.

NCCL on CUDA, gloo on CPU. Single-process runs need no environment at all.
"""

import contextlib
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
        return DistInfo(
            int(environ["SLURM_PROCID"]), int(environ["SLURM_NTASKS"]), int(environ.get("SLURM_LOCALID", 0))
        )
    return DistInfo()


def resolve_device(device):
    """The device a stage runs on: the one asked for, or for None / "auto" CUDA when there is a GPU, else the CPU."""
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


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


class RankFailed(RuntimeError):
    """Raised on the ranks that waited while another rank's work (rank 0's checkpoint, evaluation, ...) failed."""


@contextlib.contextmanager
def main_work(what, when=True):
    """Work that only rank 0 does, such that a failure in it ends every rank promptly with the real error.

        with distributed.main_work(f"the evaluation at step {step}", when=due) as mine:
            if mine:  # `when` on rank 0, False elsewhere
                ...

    Without this the other ranks would wait for a rank 0 that died in their next collective until the process
    group's timeout (10-30 min). On leaving the block every rank takes part in one all_reduce of a failure flag
    (it can stand in for a barrier; none when `when` is false or there is no process group). On a failure the
    ranks exchange error summaries: the rank that failed re-raises its own exception (full traceback), the
    others raise RankFailed("rank 0 failed in <what>: <error>").
    """
    grouped = dist.is_initialized()
    mine = bool(when) and (not grouped or dist.get_rank() == 0)
    if not when or not grouped:
        yield mine
        return
    error = None
    try:
        yield mine
    except BaseException as err:  # Ctrl-C on rank 0 must reach the waiting ranks too
        error = err
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    flag = torch.tensor([0.0 if error is None else 1.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item() == 0:
        return
    summaries = [None] * dist.get_world_size()
    dist.all_gather_object(summaries, None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    rank, summary = next((r, s) for r, s in enumerate(summaries) if s is not None)
    raise RankFailed(f"rank {rank} failed in {what}: {summary}")


def any_rank(flag, device):
    if not dist.is_initialized():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t)
    return bool(t.item() > 0)


def rank_spread(net):
    """max − min over ranks of a float64 checksum of the weights: 0 when DDP keeps ranks in sync."""
    with torch.no_grad():
        total = sum(p.detach().double().sum() for p in net.parameters())
        both = torch.stack([total, -total]).reshape(2)
        dist.all_reduce(both, op=dist.ReduceOp.MAX)
    return float(both[0] + both[1])


def gather_states(tensor):
    """Every rank's generator state, so rank 0 can checkpoint them all."""
    if not dist.is_initialized():
        return [tensor]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, tensor.cpu())
    return out


def cleanup():
    if dist.is_initialized():
        dist.destroy_process_group()
