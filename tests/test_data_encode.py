"""Encoders and latent extraction (alphaflow/data/encoders.py, encode.py; latents as the official code stores them)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from alphaflow.data import (
    ShardError,
    build_encoder,
    encode_dataset,
    finalize_latents,
    load_latent_stats,
    load_prepared,
    prepare_folder,
)
from alphaflow.data.encoders import VAE_ENV

RES = 16


@pytest.fixture(scope="module")
def tiny_vae_dir(tmp_path_factory):
    """A real (random-weight) AutoencoderKL, 2 down/up blocks, saved the way the hub stores it."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        layers_per_block=1,
        block_out_channels=[32, 64],
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        norm_num_groups=32,
        sample_size=RES,
    )
    path = tmp_path_factory.mktemp("vae") / "sd-vae-ft-ema"
    vae.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A prepared dataset of 22 RGB images at 16² in 6 shards of 4 (last one 2), 3 classes."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for i in range(22):
        (root / "src" / f"c{i % 3}").mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (RES, RES, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "src" / f"c{i % 3}" / f"{i:02d}.png")
    prepare_folder(root / "src", root / "prepared", resolution=RES, workers=0, shard_size=4)
    return root / "prepared"


class CountingEncoder:
    """Wraps an encoder and counts encode calls (resume checks)."""

    def __init__(self, inner):
        self.inner, self.name, self.calls = inner, inner.name, 0

    def encode(self, images):
        self.calls += 1
        return self.inner.encode(images)

    def latent_shape(self, shape):
        return self.inner.latent_shape(shape)


# ----------------------------------------------------------------------------
# Encoders.


def test_identity_round_trip_exact():
    enc = build_encoder("identity")
    images = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8)
    images[0, 0, 0, :2] = torch.tensor([0, 255], dtype=torch.uint8)
    mean, logvar = enc.encode(images)
    assert logvar is None and mean.dtype == torch.float32
    assert mean.min() >= -1 and mean.max() <= 1 and mean[0, 0, 0, 0] == -1 and mean[0, 0, 0, 1] == 1
    assert torch.equal(enc.decode(mean), images)
    assert torch.equal(enc.decode(mean.half().float()), images)  # survives float16 storage too
    assert enc.latent_shape((3, 8, 8)) == (3, 8, 8) and enc.name == "identity"


def test_sd_vae_from_local_dir(tiny_vae_dir):
    from diffusers import AutoencoderKL

    enc = build_encoder("sd-vae-ft-ema", path=str(tiny_vae_dir))
    assert enc.name == "sd-vae-ft-ema" and enc.latent_shape((3, RES, RES)) == (4, RES // 2, RES // 2)
    images = torch.randint(0, 256, (2, 3, RES, RES), dtype=torch.uint8)
    mean, logvar = enc.encode(images)
    assert mean.shape == logvar.shape == (2, 4, RES // 2, RES // 2) and mean.dtype == torch.float32
    # No 0.18215 scaling: the raw posterior mean (the official code normalises per element instead).
    vae = AutoencoderKL.from_pretrained(tiny_vae_dir)
    with torch.no_grad():
        direct = vae.encode(images.float() / 127.5 - 1).latent_dist
    torch.testing.assert_close(mean, direct.mean)
    torch.testing.assert_close(logvar, direct.logvar)
    decoded = enc.decode(mean)
    assert decoded.dtype == torch.uint8 and decoded.shape == (2, 3, RES, RES)


def test_sd_vae_grey_images_are_repeated_to_rgb(tiny_vae_dir):
    enc = build_encoder("sd-vae-ft-ema", path=str(tiny_vae_dir))
    grey = torch.randint(0, 256, (2, 1, RES, RES), dtype=torch.uint8)
    mean, _ = enc.encode(grey)
    torch.testing.assert_close(mean, enc.encode(grey.repeat(1, 3, 1, 1))[0])


def test_sd_vae_path_from_env_and_hub_cache_layout(tiny_vae_dir, tmp_path, monkeypatch):
    # hub cache: <root>/models--stabilityai--sd-vae-ft-ema/{refs/main, snapshots/<hash>/...}
    hub = tmp_path / "hub" / "models--stabilityai--sd-vae-ft-ema"
    (hub / "refs").mkdir(parents=True)
    (hub / "refs" / "main").write_text("abc123")
    (hub / "snapshots").mkdir()
    (hub / "snapshots" / "abc123").symlink_to(tiny_vae_dir, target_is_directory=True)
    monkeypatch.setenv(VAE_ENV, str(tmp_path / "hub"))
    assert build_encoder("sd-vae-ft-ema").latent_shape((3, RES, RES)) == (4, 8, 8)


def test_sd_vae_missing_weights_error(tmp_path, monkeypatch):
    monkeypatch.delenv(VAE_ENV, raising=False)
    with pytest.raises(FileNotFoundError) as err:
        build_encoder("sd-vae-ft-ema", path=str(tmp_path / "nowhere"))
    message = str(err.value)
    assert str(tmp_path / "nowhere") in message
    assert "huggingface-cli download stabilityai/sd-vae-ft-ema" in message and VAE_ENV in message
    with pytest.raises(FileNotFoundError, match=VAE_ENV):
        build_encoder("sd-vae-ft-ema")
    with pytest.raises(ValueError, match="identity"):
        build_encoder("vqgan")


# ----------------------------------------------------------------------------
# encode_dataset / finalize_latents.


def test_encode_two_parts_then_finalize(prepared, tmp_path):
    out = tmp_path / "lat"
    enc = build_encoder("identity")
    p0 = encode_dataset(prepared, out, enc, batch_size=3, part=0, num_parts=2)
    with pytest.raises(ShardError, match="part=1, num_parts=2"):
        finalize_latents(out, num_parts=2)
    p1 = encode_dataset(prepared, out, enc, batch_size=3, part=1, num_parts=2)
    assert sorted(p0["shards"]) == ["0", "1", "2"] and sorted(p1["shards"]) == ["3", "4", "5"]
    manifest = finalize_latents(out, num_parts=2, stats_samples=4096)
    assert manifest["count"] == 22 and manifest["latent_shape"] == [3, RES, RES]
    assert manifest["encoder"] == "identity" and manifest["has_logvar"] is False
    assert manifest["num_classes"] == 3 and len(manifest["shards"]) == 6
    assert json.loads((out / "manifest.json").read_text()) == manifest
    mean, std = load_latent_stats(out)
    assert mean.shape == std.shape == (1, 3, RES, RES)  # per element, as the official code
    images, _, _ = load_prepared(prepared)
    x = images.double() / 127.5 - 1
    torch.testing.assert_close(mean.double(), x.mean(0, keepdim=True), atol=2e-3, rtol=0)  # float16 storage
    torch.testing.assert_close(std.double(), x.std(0, keepdim=True, correction=0), atol=2e-3, rtol=1e-3)


def test_encode_resume_skips_finished_and_redoes_corrupt(prepared, tmp_path):
    out = tmp_path / "lat"
    encode_dataset(prepared, out, build_encoder("identity"), batch_size=8)
    finalize_latents(out)
    counting = CountingEncoder(build_encoder("identity"))
    encode_dataset(prepared, out, counting, batch_size=8)
    assert counting.calls == 0 and (out / "manifest.json").exists()
    victim = out / "latents-00002.safetensors"
    data = bytearray(victim.read_bytes())
    data[-3] ^= 0x10
    victim.write_bytes(bytes(data))
    with pytest.raises(ShardError) as err:
        finalize_latents(out)
    assert str(victim) in str(err.value) and "alphaflow encode" in str(err.value)
    encode_dataset(prepared, out, counting, batch_size=8)
    assert counting.calls == 1  # only shard 2 (4 images, one batch) re-encoded
    assert not (out / "manifest.json").exists()  # stale manifest removed until finalize
    finalize_latents(out)


def test_latents_of_other_weights_are_not_reused(prepared, tmp_path):
    out = tmp_path / "lat"
    encode_dataset(prepared, out, build_encoder("identity"))
    other = CountingEncoder(build_encoder("identity"))
    other.fingerprint = "sd-vae-ft-ema:0123"  # same name and shapes, different weights
    encode_dataset(prepared, out, other, batch_size=4)
    assert other.calls == 6  # every shard re-encoded


def test_encode_with_vae_stores_logvar_and_stats(prepared, tiny_vae_dir, tmp_path):
    out = tmp_path / "lat"
    enc = build_encoder("sd-vae-ft-ema", path=tiny_vae_dir)
    for part in range(3):
        encode_dataset(prepared, out, enc, batch_size=4, part=part, num_parts=3)
    manifest = finalize_latents(out, num_parts=3, stats_samples=10, seed=1)
    assert manifest["has_logvar"] and manifest["latent_shape"] == [4, RES // 2, RES // 2]
    assert manifest["stats"]["samples"] == 10 and manifest["dtype"] == "float16"
    assert manifest["encoder_fingerprint"].startswith("sd-vae-ft-ema:")
    mean, std = load_latent_stats(out)
    assert mean.shape == std.shape == (1, 4, RES // 2, RES // 2) and (std > 0).all()
    again = finalize_latents(out, num_parts=3, stats_samples=10, seed=1)
    assert again["stats"]["sha256"] == manifest["stats"]["sha256"]  # deterministic given seed
    other = finalize_latents(out, num_parts=3, stats_samples=10, seed=2)
    assert other["stats"]["sha256"] != manifest["stats"]["sha256"]


def test_encode_argument_errors(prepared, tmp_path):
    enc = build_encoder("identity")
    with pytest.raises(ValueError, match="part"):
        encode_dataset(prepared, tmp_path / "x", enc, part=2, num_parts=2)
    with pytest.raises(ShardError, match="alphaflow prepare"):
        encode_dataset(tmp_path / "no-data", tmp_path / "x", enc)


def test_stats_floor_for_constant_elements(tmp_path):
    """An element constant in the stats sample gets std = 0.1·median, not 1e-8 (see alphaflow/data/encode.py)."""
    rng = np.random.default_rng(1)
    for i in range(8):
        pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        pixels[0, 0] = 0  # a constant corner, like Fashion-MNIST's
        (tmp_path / "src" / "c").mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(tmp_path / "src" / "c" / f"{i}.png")
    prepare_folder(tmp_path / "src", tmp_path / "data", resolution=8, workers=0)
    encode_dataset(tmp_path / "data", tmp_path / "lat", build_encoder("identity"))
    manifest = finalize_latents(tmp_path / "lat")
    _, std = load_latent_stats(tmp_path / "lat")
    assert manifest["stats"]["floored_elements"] == 3  # the corner in 3 channels
    torch.testing.assert_close(std[0, :, 0, 0], torch.full((3,), 0.1) * std.median())


# ----------------------------------------------------------------------------
# The paper profile's own data stages, on an ImageNet-shaped folder of real JPEGs.


def test_paper_profile_prepare_and_encode_on_a_jpeg_folder(tiny_vae_dir, tmp_path):
    from helpers import run_cli

    rng = np.random.default_rng(1)
    for c in ("n01440764", "n01443537", "n01484850"):
        (tmp_path / "imagenet" / c).mkdir(parents=True)
        for i in range(4):
            size = tuple(int(s) for s in rng.integers(40, 90, 2))
            Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8)).save(
                tmp_path / "imagenet" / c / f"{c}_{i}.JPEG", quality=90
            )
    sets = [
        "--params",
        "params/paper.yaml",
        "--set",
        f"results={tmp_path / 'results'}",
        "--set",
        f"data.path={tmp_path / 'imagenet'}",
        "--set",
        f"data.resolution={RES}",
        "--set",
        "data.workers=1",
        "--set",
        f"encoder.path={tiny_vae_dir}",
        "--set",
        "encoder.batch_size=4",
    ]
    run_cli("prepare", *sets)
    for part in range(2):  # the paper profile encodes as an array job; two parts here, then finalize
        run_cli("encode", *sets, "--part", part, "--num-parts", 2, "--device", "cpu")
    run_cli("encode", *sets, "--finalize", "--num-parts", 2)
    manifest = json.loads((tmp_path / "results/latents/imagenet256-sd-vae-ft-ema/manifest.json").read_text())
    assert manifest["count"] == 12 and manifest["latent_shape"] == [4, RES // 2, RES // 2]
    prepared = json.loads((tmp_path / "results/data/imagenet256/train/manifest.json").read_text())
    assert prepared["class_names"] == ["n01440764", "n01443537", "n01484850"]
