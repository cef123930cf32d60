"""Cost of the run lock (alphaflow.runlock): acquire, one heartbeat write, release; the median of --repeats.

    python benchmarks/runlock_cost.py                       # a temporary folder (local disk)
    python benchmarks/runlock_cost.py --dir results/runs    # the filesystem the runs live on (e.g. NFS)

Acquire and release happen once per `alphaflow train` / `alphaflow sample` part; the heartbeat is written by
a daemon thread every heartbeat_s (30 s), never by the training loop, so the per-step cost is ~0.
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from alphaflow import runlock


def measure(folder, repeats):
    """Median seconds of acquire, beat and release over `repeats` rounds."""
    path = Path(folder) / ".lock-benchmark"
    times = {"acquire": [], "heartbeat": [], "release": []}
    for _ in range(repeats):
        t0 = time.perf_counter()
        lock = runlock.acquire(path, "benchmark", heartbeat_s=3600)  # the thread stays idle while timed
        t1 = time.perf_counter()
        lock.beat()
        t2 = time.perf_counter()
        lock.release()
        t3 = time.perf_counter()
        for key, dt in zip(times, (t1 - t0, t2 - t1, t3 - t2)):
            times[key].append(dt)
    return {key: statistics.median(v) for key, v in times.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default=None, help="folder to time the lock in (default: a temporary folder)")
    ap.add_argument("--repeats", type=int, default=200)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        medians = measure(folder, args.repeats)
    print(f"run lock in {args.dir or tempfile.gettempdir()}, median of {args.repeats}:")
    for key, seconds in medians.items():
        print(f"  {key:<10} {seconds * 1e3:8.3f} ms")
    beat = medians["heartbeat"]
    print(
        f"  per training step: 0 (the heartbeat thread writes every {runlock.HEARTBEAT_S:g} s: "
        f"{beat / runlock.HEARTBEAT_S * 100:.4f} % of one thread's time)"
    )


if __name__ == "__main__":
    main()
