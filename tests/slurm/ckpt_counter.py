"""A tiny checkpointing stage for the launch tests: counts to N, one step at a time, resumable.

    python ckpt_counter.py STATE N [--step-s S] [--resume-step-s S] [--stop-at K] [--started FILE]

STATE may contain "{rank}" (one state file per DDP rank). State (JSON, written atomically): the counter, a
running checksum of the steps done and the list of starts. On SIGUSR2 or SIGTERM it saves and exits with
REQUEUE_EXIT_CODE (the launch contract); with --stop-at K it does the same by itself once the counter reaches
K (a stage asking for a requeue).
Run to completion with or without interruptions, the final counter and checksum are the same.
--resume-step-s makes every start after the first faster (a test waiting for a real time limit needs a
first run longer than the signal delay, but no second interruption).
"""

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

REQUEUE_EXIT_CODE = 75  # alphaflow.errors.REQUEUE_EXIT_CODE (not imported: a stage needs no alphaflow)


def save(path, state):
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state))
    os.replace(tmp, path)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("state", type=Path)
    p.add_argument("n", type=int)
    p.add_argument("--step-s", type=float, default=0.2)
    p.add_argument("--resume-step-s", type=float, default=None, help="step time after a restart (default: --step-s)")
    p.add_argument("--stop-at", type=int, default=None)
    p.add_argument(
        "--started", type=Path, default=None, help="written once the loop runs: job id and pid (tests wait on it)"
    )
    args = p.parse_args()
    rank = os.environ.get("RANK", "0")
    args.state = Path(str(args.state).format(rank=rank))

    stop = []
    for signum in (signal.SIGUSR2, signal.SIGTERM):
        signal.signal(signum, lambda num, frame: stop.append(signal.Signals(num).name))  # idempotent

    state = json.loads(args.state.read_text()) if args.state.exists() else {"count": 0, "checksum": 0, "starts": []}
    state["starts"].append(
        {
            "at": state["count"],
            "time": time.time(),
            "job": os.environ.get("SLURM_JOB_ID", "local"),
            "restart": os.environ.get("SLURM_RESTART_COUNT", "0"),
        }
    )
    save(args.state, state)
    step_s = args.step_s if len(state["starts"]) == 1 or args.resume_step_s is None else args.resume_step_s
    print(f"start at {state['count']} (start #{len(state['starts'])})", flush=True)
    if args.started and rank == "0":
        args.started.write_text(json.dumps({"job": os.environ.get("SLURM_JOB_ID"), "pid": os.getpid()}))
    while state["count"] < args.n:
        if stop or (args.stop_at is not None and state["count"] == args.stop_at and len(state["starts"]) == 1):
            state["stopped_by"] = stop[0] if stop else "stop-at"
            save(args.state, state)
            print(f"checkpoint at {state['count']} ({state['stopped_by']}); exit {REQUEUE_EXIT_CODE}", flush=True)
            sys.exit(REQUEUE_EXIT_CODE)
        time.sleep(step_s)
        state["count"] += 1
        state["checksum"] = (state["checksum"] * 31 + state["count"]) % 1_000_003
        save(args.state, state)
    print(f"done at {state['count']}", flush=True)


if __name__ == "__main__":
    main()
