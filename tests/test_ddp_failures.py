"""A failure in rank 0's own work (checkpoint, evaluation, logging) ends every DDP rank promptly, with the error."""

import datetime
import os
import random
import subprocess
import sys
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
    from helpers import free_port  # here, so that the spawned workers need not import the models

    t0 = time.monotonic()
    mp.start_processes(worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    assert time.monotonic() - t0 < 60
    assert (tmp_path / "rank0.txt").read_text().splitlines() == [
        "idle False",
        "works True",
        "OSError: disk full (from worker)",
    ]
    assert (tmp_path / "rank1.txt").read_text().splitlines() == [
        "idle False",
        "works False",
        "RankFailed: rank 0 failed in the checkpoint at step 7: OSError: disk full (from main_work)",
    ]


def test_main_work_without_process_group_is_plain():
    with distributed.main_work("x", when=False) as mine:
        assert mine is False
    with pytest.raises(ValueError, match="boom"):
        with distributed.main_work("x") as mine:
            assert mine is True
            raise ValueError("boom")


def break_eval(results, run):
    """eval_every set but the classifier stage never ran: rank 0's in-training evaluation cannot start."""
    assert not (results / "classifier").exists()
    return "the in-training evaluation at step 2", "classifier weights not found"


def break_checkpoint(results, run):
    """A regular file where the checkpoints folder must be created: rank 0's first checkpoint write fails."""
    run_dir = results / "runs" / run
    run_dir.mkdir(parents=True)
    (run_dir / "checkpoints").write_text("not a folder")
    return "writing checkpoint", "FileExistsError"


@pytest.mark.slow
@pytest.mark.parametrize("breaker", [break_eval, break_checkpoint], ids=["evaluation", "checkpoint"])
def test_rank0_failure_ends_both_ranks_promptly(tiny_project, tmp_path, breaker):
    """Two `alphaflow train` processes (as torchrun/submitit start them); rank 0's own work fails for real.

    Under gloo a rank whose peer process died also stops ("Connection closed by peer"), but under NCCL it
    waits out the timeout; here the other rank must stop at the failure, saying which work of rank 0 failed.
    """
    from helpers import ROOT

    write, results = tiny_project
    params_path = write(steps=40, batch_size=8, checkpoint_every=2, eval_every=2 if breaker is break_eval else None)
    what, detail = breaker(results, "meanflow-tiny")
    port = str(29500 + random.Random().randint(0, 500))
    cmd = [
        sys.executable,
        "-m",
        "alphaflow",
        "train",
        "--params",
        str(params_path),
        "--run",
        "meanflow-tiny",
        "--quiet",
        "--no-tracking",
    ]
    logs = [open(tmp_path / f"rank{r}.err", "w") for r in range(2)]
    t0 = time.monotonic()
    procs = [
        subprocess.Popen(
            cmd,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=logs[r],
            env={
                **os.environ,
                "OMP_NUM_THREADS": "1",
                "RANK": str(r),
                "LOCAL_RANK": str(r),
                "WORLD_SIZE": "2",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": port,
            },
        )
        for r in range(2)
    ]
    ended = {}  # rank → when its process exited
    while len(ended) < 2 and time.monotonic() - t0 < 300:  # far below gloo's default timeout (30 min) anyway
        ended.update({r: time.monotonic() for r, p in enumerate(procs) if r not in ended and p.poll() is not None})
        time.sleep(0.1)
    for p in procs:
        p.kill()
    for log in logs:
        log.close()
    errs = [(tmp_path / f"rank{r}.err").read_text() for r in range(2)]
    assert len(ended) == 2 and all(p.wait() != 0 for p in procs), errs
    assert abs(ended[1] - ended[0]) < 20, (ended, errs)  # the other rank does not outlive rank 0 by long
    assert max(ended.values()) - t0 < 120, (ended, errs)  # start-up included, on a loaded 2-core machine
    assert detail in errs[0] and "RankFailed" not in errs[0], errs[0]
    last = errs[1].strip().splitlines()[-1]
    assert f"alphaflow.distributed.RankFailed: rank 0 failed in {what}" in last, errs[1]
    assert detail in last, errs[1]
