"""A tiny DDP stage for the launch tests: gloo all_reduce on CPU, one JSON file per rank.

python ddp_check.py OUT_DIR
"""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def main():
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    dist.init_process_group("gloo")  # env:// from RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
    rank, world = dist.get_rank(), dist.get_world_size()
    x = torch.tensor([float(rank + 1)])
    dist.all_reduce(x)  # sum over ranks: world * (world + 1) / 2
    keys = (
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "LOCAL_WORLD_SIZE",
        "MASTER_ADDR",
        "MASTER_PORT",
        "CUDA_VISIBLE_DEVICES",
        "SLURM_GPUS_ON_NODE",
        "SLURM_JOB_ID",
    )
    info = {k: os.environ.get(k) for k in keys}
    info.update(rank=rank, world=world, allreduce=x.item())
    (out / f"rank{rank}.json").write_text(json.dumps(info))
    print(f"rank {rank}/{world}: all_reduce = {x.item()}", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
