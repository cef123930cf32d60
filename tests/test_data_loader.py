"""LatentLoader: determinism, exact resume, one global stream dealt to DDP ranks, fresh posterior noise per epoch."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from alphaflow.data import LatentLoader, ShardError, encode_dataset, finalize_latents, load_latent_stats, prepare_folder

N, RES, SIGMA = 48, 8, 0.1


class GaussEncoder:
    """Posterior N(x, SIGMA²) around the pixel-space image: real noise for the loader to sample."""

    name = "gauss-test"

    def encode(self, images):
        mean = images.float() / 127.5 - 1
        return mean, torch.full_like(mean, 2 * np.log(SIGMA))

    def latent_shape(self, shape):
        return tuple(shape)


@pytest.fixture(scope="module")
def latent_dir(tmp_path_factory):
    """48 latents [3,8,8] in 4 shards of 12, 4 classes, with logvar; plus an identity copy."""
    root = tmp_path_factory.mktemp("loader")
    rng = np.random.default_rng(0)
    for i in range(N):
        (root / "src" / f"c{i % 4}").mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (RES, RES, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "src" / f"c{i % 4}" / f"{i:02d}.png")
    prepare_folder(root / "src", root / "data", resolution=RES, workers=0, shard_size=12)
    encode_dataset(root / "data", root / "lat", GaussEncoder(), batch_size=16)
    finalize_latents(root / "lat", stats_samples=N)
    return root / "lat"


def take(loader, n):
    out = []
    for _ in range(n):
        x, y = next(loader)
        out.append((x, y, loader.last_index.copy()))
    return out


def test_shapes_stats_and_metadata(latent_dir):
    loader = LatentLoader(latent_dir, 8, seed=0)
    x, y = next(loader)
    assert x.shape == (8, 3, RES, RES) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert loader.latent_shape == (3, RES, RES) and loader.num_classes == 4
    mean, std = load_latent_stats(latent_dir)  # finalize_latents' per-element statistics
    assert mean.shape == std.shape == (1, 3, RES, RES)
    assert loader.batches_per_epoch == N // 8


def test_deterministic_given_seed(latent_dir):
    a = take(LatentLoader(latent_dir, 8, seed=3), 8)
    b = take(LatentLoader(latent_dir, 8, seed=3), 8)
    c = take(LatentLoader(latent_dir, 8, seed=4), 8)
    for (xa, ya, _), (xb, yb, _) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not all(torch.equal(xa, xc) for (xa, _, _), (xc, _, _) in zip(a, c))


def test_epochs_shuffle_and_fresh_posterior_noise(latent_dir):
    loader = LatentLoader(latent_dir, 12, seed=0)
    epochs = [take(loader, 4), take(loader, 4)]  # 48 / 12 = 4 batches per epoch
    samples = []
    for batches in epochs:
        index = np.concatenate([i for _, _, i in batches])
        assert sorted(index.tolist()) == list(range(N))  # each sample once per epoch
        samples.append({int(g): x for (xb, _, ib) in batches for g, x in zip(ib, xb)})
    order0 = np.concatenate([i for _, _, i in epochs[0]])
    order1 = np.concatenate([i for _, _, i in epochs[1]])
    assert not np.array_equal(order0, order1)  # reshuffled
    noise = torch.stack([samples[1][g] - samples[0][g] for g in range(N)])
    assert noise.abs().min() > 0  # a fresh posterior sample each epoch
    # the difference of two independent N(mean, σ²) samples has std σ√2 (float16 storage adds ≪ σ)
    assert abs(noise.std().item() / (SIGMA * np.sqrt(2)) - 1) < 0.05


def test_labels_follow_samples(latent_dir):
    loader = LatentLoader(latent_dir, 16, seed=1)
    for _, y, index in take(loader, 6):
        assert torch.equal(y, torch.from_numpy(index // 12))  # prepared order: class c0's 12 files first, ...


def test_exact_resume_mid_epoch(latent_dir):
    first = LatentLoader(latent_dir, 8, seed=5)
    take(first, 4)
    state = json.loads(json.dumps(first.state_dict()))  # JSON round trip, as a checkpoint would
    expected = take(first, 7)  # crosses the epoch boundary (6 batches per epoch)
    resumed = LatentLoader(latent_dir, 8, seed=5)
    resumed.load_state_dict(state)
    for (xe, ye, ie), (xr, yr, ir) in zip(expected, take(resumed, 7)):
        assert torch.equal(xe, xr) and torch.equal(ye, yr) and np.array_equal(ie, ir)
    assert resumed.state_dict() == first.state_dict()


def test_resume_rejects_a_different_setup(latent_dir):
    state = LatentLoader(latent_dir, 8, seed=5).state_dict()
    with pytest.raises(ValueError, match="batch_size"):
        LatentLoader(latent_dir, 4, seed=5).load_state_dict(state)


def test_ranks_deal_one_global_stream(latent_dir):
    """Rank r of W takes micro-batches r, W + r, … of the single-process stream (same indices, same x),
    so W ranks together see every sample once per epoch and any W gives the same global batches."""
    single = take(LatentLoader(latent_dir, 4, seed=7), 24)  # two epochs of 12 micro-batches
    for world_size in (2, 3):
        ranks = [
            take(LatentLoader(latent_dir, 4, seed=7, rank=r, world_size=world_size), 24 // world_size)
            for r in range(world_size)
        ]
        for k in range(24 // world_size):
            for r in range(world_size):
                xs, ys, js = single[k * world_size + r]
                xr, yr, jr = ranks[r][k]
                assert np.array_equal(js, jr) and torch.equal(xs, xr) and torch.equal(ys, yr)
        first_epoch = np.concatenate([i for rank in ranks for _, _, i in rank[: 12 // world_size]])
        assert sorted(first_epoch.tolist()) == list(range(N))


def test_rank_resume_and_legacy_single_process_state(latent_dir):
    first = LatentLoader(latent_dir, 8, seed=5, rank=1, world_size=2)
    take(first, 2)
    state = json.loads(json.dumps(first.state_dict()))
    expected = take(first, 4)  # crosses the epoch boundary (6 micro-batches per epoch, 3 per rank)
    resumed = LatentLoader(latent_dir, 8, seed=5, rank=1, world_size=2)
    resumed.load_state_dict(state)
    assert all(np.array_equal(ie, ir) for (_, _, ie), (_, _, ir) in zip(expected, take(resumed, 4)))
    # A single-process checkpoint of the per-rank loader ({epoch, position}) resumes the same stream.
    legacy = LatentLoader(latent_dir, 8, seed=5)
    legacy.load_state_dict({"epoch": 1, "position": 2, "seed": 5, "batch_size": 8, "world_size": 1})
    assert legacy.taken == 8
    with pytest.raises(ValueError, match="per-rank loader"):
        LatentLoader(latent_dir, 8, seed=5, rank=0, world_size=2).load_state_dict(
            {"epoch": 0, "position": 1, "seed": 5, "batch_size": 8, "world_size": 2}
        )


def test_noise_does_not_depend_on_world_size(latent_dir):
    """ε is seeded per (seed, epoch, sample), so a sample's x is the same on any rank layout."""
    single = {int(g): x for xb, _, ib in take(LatentLoader(latent_dir, 8, seed=2), 6) for g, x in zip(ib, xb)}
    rank1 = take(LatentLoader(latent_dir, 8, seed=2, rank=1, world_size=2), 3)
    for xb, _, ib in rank1:
        for g, x in zip(ib, xb):
            assert torch.equal(x, single[int(g)])


def test_corrupt_or_missing_shard_names_file(latent_dir, tmp_path):
    import shutil

    broken = tmp_path / "lat"
    shutil.copytree(latent_dir, broken)
    victim = broken / "latents-00001.safetensors"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x04
    victim.write_bytes(bytes(data))
    with pytest.raises(ShardError) as err:
        LatentLoader(broken, 8, seed=0)
    assert str(victim) in str(err.value) and "alphaflow encode" in str(err.value)
    victim.unlink()
    with pytest.raises(ShardError, match="latents-00001.safetensors"):
        LatentLoader(broken, 8, seed=0)
    (broken / "manifest.json").unlink()
    with pytest.raises(ShardError, match="alphaflow encode"):
        LatentLoader(broken, 8, seed=0)


def test_identity_latents_have_no_noise(tmp_path, latent_dir):
    from alphaflow.data import build_encoder

    data = latent_dir.parent / "data"
    encode_dataset(data, tmp_path / "id", build_encoder("identity"))
    finalize_latents(tmp_path / "id")
    loader = LatentLoader(tmp_path / "id", 12, seed=0)
    a = {int(g): x for xb, _, ib in take(loader, 4) for g, x in zip(ib, xb)}
    b = {int(g): x for xb, _, ib in take(loader, 4) for g, x in zip(ib, xb)}
    assert all(torch.equal(a[g], b[g]) for g in range(N))


def test_too_small_for_a_batch(latent_dir):
    with pytest.raises(ValueError, match="fewer than one micro-batch"):
        LatentLoader(latent_dir, N + 1, seed=0, rank=0, world_size=2)
