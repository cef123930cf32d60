"""Concurrent fetches of the embedded Fashion-MNIST into one cache (alphaflow/data/embedded.py).

On a fresh machine the demo's two `prepare` jobs (train and test) both find an empty cache and fetch
at the same time. These tests race real processes that start together (a file barrier):
- fast: the lock + re-check (`fetch_once`) and the atomic copy (`copy_fashion`), from a local folder
  of small IDX files written here;
- slow: the real path, `load_embedded` with `apt-get download dataset-fashion-mnist` (needs apt lists and
  the Debian mirror; skipped without apt-get or when the package is installed system-wide).
"""

import gzip
import json
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from alphaflow.data.embedded import FASHION_ENV, FASHION_FILES, FASHION_SYSTEM_DIR, fetch_once
from alphaflow.io import sha256_file

ROOT = Path(__file__).resolve().parents[1]
STEMS = [stem for pair in FASHION_FILES.values() for stem in pair]

# Each racer: imports, says it is ready, waits for `go`, then runs BODY; prints what it got.
RACER = """
import json, os, sys, time
from pathlib import Path
import functools
from alphaflow.data import embedded as E
tmp, i = Path(sys.argv[1]), sys.argv[2]
(tmp / f"ready-{{i}}").touch()
while not (tmp / "go").exists():
    time.sleep(0.005)
{body}
"""


def write_idx_gz(path, array):
    """A uint8 IDX file (gzip), the format of the Debian package."""
    header = b"\0\0\x08" + bytes([array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def local_source(tmp_path):
    """A folder holding the four IDX files (tiny: 20 train / 5 test images)."""
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 20), ("test", 5)):
        images, labels = FASHION_FILES[split]
        write_idx_gz(src / f"{images}.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx_gz(src / f"{labels}.gz", rng.integers(0, 10, (n,)))
    return src


def race(tmp_path, body, n, timeout=60):
    """Starts `n` processes running `body` together; returns their CompletedProcess-like results."""
    env = {k: v for k, v in os.environ.items() if k != FASHION_ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    script = RACER.format(body=body)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(tmp_path), str(i)],
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for i in range(n)
    ]
    deadline = time.time() + timeout
    while not all((tmp_path / f"ready-{i}").exists() for i in range(n)):
        assert time.time() < deadline and all(p.poll() is None for p in procs), "a racer died before the start"
        time.sleep(0.01)
    (tmp_path / "go").touch()
    results = []
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        results.append((p.returncode, out, err))
    return results


def assert_same_files(cache, src):
    for stem in STEMS:
        assert sha256_file(cache / f"{stem}.gz") == sha256_file(src / f"{stem}.gz")
    leftovers = sorted(p.name for p in cache.iterdir() if p.name.endswith(".tmp"))
    assert leftovers == [], f"temporary files left behind: {leftovers}"


# ----------------------------------------------------------------------------
# Fast: the lock and the atomic copy, racing real processes on a local folder.


def test_racing_copies_all_succeed(local_source, tmp_path):
    """Without the lock, concurrent copies into one cache still all succeed (unique temp names)."""
    cache = tmp_path / "cache"
    cache.mkdir()
    body = f"for _ in range(20): E.copy_fashion(Path({str(local_source)!r}), Path({str(cache)!r}))"
    results = race(tmp_path, body, n=3)
    assert [rc for rc, _, _ in results] == [0, 0, 0], [err for _, _, err in results]
    assert_same_files(cache, local_source)


def test_fetch_once_fetches_once_under_concurrency(local_source, tmp_path):
    """Three processes on an empty cache: one fetches, the others wait, re-check and skip."""
    cache = tmp_path / "cache"  # does not exist yet: fetch_once creates it
    log = tmp_path / "fetches.log"
    body = f"""
def slow_copy(src, cache):
    with open({str(log)!r}, "a") as f:
        f.write(f"{{os.getpid()}}\\n")
    time.sleep(0.5)  # hold the lock long enough that the others certainly queue behind it
    E.copy_fashion(src, cache)
E.fetch_once(Path({str(cache)!r}), functools.partial(slow_copy, Path({str(local_source)!r})))
"""
    results = race(tmp_path, body, n=3)
    assert [rc for rc, _, _ in results] == [0, 0, 0], [err for _, _, err in results]
    assert len(log.read_text().split()) == 1, "the files were fetched more than once"
    assert_same_files(cache, local_source)
    assert (cache / ".lock").is_file()


def test_fetch_once_skips_a_filled_cache(local_source, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(local_source, cache)

    def fail(_):
        raise AssertionError("fetch called although the cache is complete")

    fetch_once(cache, fail)


# ----------------------------------------------------------------------------
# Slow: the real fetch (apt-get download + dpkg-deb -x), three loaders on one empty cache.


@pytest.mark.slow
def test_concurrent_load_embedded_fetches_debian_package(tmp_path):
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        pytest.skip("apt-get / dpkg-deb not available")
    if Path(FASHION_SYSTEM_DIR).is_dir():
        pytest.skip(f"{FASHION_SYSTEM_DIR} exists (package installed): the fetch path is not taken")
    cache = tmp_path / "cache"
    body = f"""
split = "train" if i == "0" else "test"
d = E.load_embedded("fashion-mnist", split, cache_dir=Path({str(cache)!r}))
print(json.dumps({{"dir": d["source"]["dir"], "n": len(d["labels"]), "files": d["source"]["files"]}}))
"""
    results = race(tmp_path, body, n=3, timeout=600)
    assert [rc for rc, _, _ in results] == [0, 0, 0], [err[-2000:] for _, _, err in results]
    got = [json.loads(out.strip().splitlines()[-1]) for _, out, _ in results]
    assert {g["dir"] for g in got} == {str(cache)}
    assert [g["n"] for g in got] == [60000, 10000, 10000]
    assert got[1]["files"] == got[2]["files"]
    names = sorted(p.name for p in cache.iterdir())
    assert names == sorted([".lock"] + [f"{stem}.gz" for stem in STEMS])
