"""A failure in rank 0's own work (checkpoint, evaluation, logging) ends every DDP rank promptly, with the error."""

import datetime
import os
import time
import traceback

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from alphaflow import distributed

LONG_TIMEOUT = datetime.timedelta(seconds=600)  # promptness must not come from the process-group timeout


def worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=LONG_TIMEOUT)
    log = []
    with distributed.main_work("nothing", when=False) as mine:  # not due: no collective, nobody works
        log.append(f"idle {mine}")
    with distributed.main_work("the first write") as mine:
        log.append(f"works {mine}")
    try:
        with distributed.main_work("the checkpoint at step 7") as mine:
            if mine:
                raise OSError("disk full")
    except Exception as err:
        where = traceback.extract_tb(err.__traceback__)[-1].name  # rank 0: its own traceback, down to the raise
        log.append(f"{type(err).__name__}: {err} (from {where})")
    with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
        f.write("\n".join(log))
    dist.destroy_process_group()


def test_main_work_failure_reaches_every_rank(tmp_path):
    from test_ddp_engine import free_port  # here, so that the spawned workers need not import the models

    t0 = time.monotonic()
    mp.start_processes(worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    assert time.monotonic() - t0 < 60
    assert (tmp_path / "rank0.txt").read_text().splitlines() == ["idle False", "works True",
                                                                 "OSError: disk full (from worker)"]
    assert (tmp_path / "rank1.txt").read_text().splitlines() == [
        "idle False", "works False", "RankFailed: rank 0 failed in the checkpoint at step 7: OSError: disk full (from main_work)"]


def test_main_work_without_process_group_is_plain():
    with distributed.main_work("x", when=False) as mine:
        assert mine is False
    with pytest.raises(ValueError, match="boom"):
        with distributed.main_work("x") as mine:
            assert mine is True
            raise ValueError("boom")
