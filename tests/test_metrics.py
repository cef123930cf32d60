"""Fréchet distance, Inception Score, bootstrap intervals and cached reference statistics (alphaflow.metrics)."""

import json
import warnings

import numpy as np
import pytest
import torch
from torch_fidelity.metric_isc import isc_features_to_metric

from alphaflow import metrics as M


def gaussian(n, d, seed, scale=1.0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64) * scale + shift


def first_resample(n, seed):
    """The first bootstrap index draw of bootstrap_fd / bootstrap_is with this seed."""
    return torch.randint(n, (n,), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------
# Fréchet distance


def test_fd_of_identical_stats_is_zero():
    mu, sigma = M.stats(gaussian(300, 32, 0))
    assert mu.dtype == sigma.dtype == np.float64 and sigma.shape == (32, 32)
    assert abs(M.fd_from_stats(mu, sigma, mu, sigma)) < 1e-9
    assert abs(M.fd_from_stats(torch.from_numpy(mu), sigma, mu, torch.from_numpy(sigma))) < 1e-9  # torch inputs too


def test_fd_of_known_gaussians():
    """Large samples of N(0, I) and N(1, 4I) in 8-d: FD → 8·1 + 8 + 8·4 − 2·8·2 = 16."""
    a, b = gaussian(200_000, 8, 1), gaussian(200_000, 8, 2, scale=2.0, shift=1.0)
    assert M.fd_from_stats(*M.stats(a), *M.stats(b)) == pytest.approx(16.0, rel=0.02)


@pytest.mark.parametrize("n", [20, 400])  # fewer and more samples than dimensions
def test_bootstrap_fd_engine_matches_torch_fidelity(n):
    x, ref = gaussian(n, 64, 3, scale=1.5, shift=0.2), gaussian(500, 64, 4)
    mu_r, sigma_r = M.stats(ref)
    idx = first_resample(n, seed=7)
    one = M.bootstrap_fd(x, mu_r, sigma_r, n_boot=1, seed=7, method="percentile")
    # the fast exact formula vs torch-fidelity's eigvals
    assert one["value"] == pytest.approx(M.fd_from_stats(*M.stats(x), mu_r, sigma_r), rel=1e-6)
    assert one["low"] == one["high"] == pytest.approx(M.fd_from_stats(*M.stats(x[idx]), mu_r, sigma_r), rel=1e-6)


def test_bootstrap_fd_interval():
    ref = gaussian(5000, 128, 5)
    mu_r, sigma_r = M.stats(ref)
    small = M.bootstrap_fd(gaussian(100, 128, 6, scale=1.1), mu_r, sigma_r, n_boot=50, seed=0)
    large = M.bootstrap_fd(gaussian(1000, 128, 6, scale=1.1), mu_r, sigma_r, n_boot=50, seed=0)
    for r in (small, large):
        assert r["low"] <= r["value"] <= r["high"] and r["n_boot"] == 50
        assert all(type(v) in (float, int) for v in r.values())
        json.dumps(r)
    assert large["high"] - large["low"] < 0.5 * (small["high"] - small["low"])
    assert M.bootstrap_fd(gaussian(100, 128, 6, scale=1.1), mu_r, sigma_r, n_boot=50, seed=0) == small
    # FD is biased upwards at finite N and a resample more so: the plain percentile interval of 100
    # samples in 128-d lies entirely above the point value (why "shifted" is the default).
    plain = M.bootstrap_fd(gaussian(100, 128, 6, scale=1.1), mu_r, sigma_r, n_boot=50, seed=0, method="percentile")
    assert plain["low"] > plain["value"] and plain["bias"] == small["bias"] > 0
    print("bootstrap FD n=100:", small, "n=1000:", large, "percentile n=100:", plain)


def test_bootstrap_without_resamples_and_bad_method():
    x = gaussian(50, 4, 8)
    r = M.bootstrap_fd(x, *M.stats(x), n_boot=0)
    assert r["low"] == r["value"] == r["high"] and r["n_boot"] == 1
    with pytest.raises(ValueError, match="method"):
        M.bootstrap_fd(x, *M.stats(x), n_boot=2, method="bca")


# ----------------------------------------------------------------------------
# Inception Score


@pytest.mark.parametrize("k", [2, 10, 1000])
def test_inception_score_of_one_hot_logits_is_num_classes(k):
    logits = 100.0 * torch.nn.functional.one_hot(torch.arange(5 * k) % k, k)
    assert M.inception_score(logits) == pytest.approx(k, rel=1e-6)
    r = M.bootstrap_is(logits, n_boot=20)
    assert r["value"] == pytest.approx(k, rel=1e-6) and r["low"] <= r["value"] <= r["high"]


def test_inception_score_of_constant_logits_is_one():
    assert M.inception_score(torch.randn(1, 10).expand(64, 10)) == pytest.approx(1.0)


def test_inception_score_splits_and_bootstrap_engine():
    logits = gaussian(300, 10, 9, scale=3.0)
    ref = isc_features_to_metric(logits, splits=3, shuffle=False)["inception_score_mean"]
    assert M.inception_score(logits, splits=3) == pytest.approx(ref)
    one = M.bootstrap_is(logits, n_boot=1, seed=4, method="percentile")
    assert one["low"] == pytest.approx(M.inception_score(logits[first_resample(300, 4)]), rel=1e-10)
    small, large = M.bootstrap_is(logits[:100], n_boot=50), M.bootstrap_is(gaussian(3000, 10, 9, scale=3.0), n_boot=50)
    assert small["low"] <= small["value"] <= small["high"]
    assert large["high"] - large["low"] < 0.5 * (small["high"] - small["low"])


# ----------------------------------------------------------------------------
# Cached reference statistics


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory):
    """A SmallCNN trained briefly on 1000 real Fashion-MNIST images (~0.5 s): weights for classifier-local."""
    from alphaflow.classifier import train_classifier
    from alphaflow.data.embedded import load_embedded

    d = load_embedded("fashion-mnist", "train")
    x, y = torch.from_numpy(d["images"][:1000].copy()).unsqueeze(1), torch.from_numpy(d["labels"][:1000].copy())
    path = tmp_path_factory.mktemp("clf") / "c.safetensors"
    train_classifier(x, y, out_path=path, epochs=1)
    return path, x


def test_reference_stats_cached_and_reused(tiny_classifier, tmp_path, monkeypatch):
    weights, images = tiny_classifier
    calls = []
    real_extract = M.extract_features
    monkeypatch.setattr(M, "extract_features", lambda *a, **k: calls.append(1) or real_extract(*a, **k))
    kw = dict(cache_dir=tmp_path / "ref", content_hash="abc123", weights_path=weights)
    mu, sigma = M.reference_stats(images[:300], "classifier-local", **kw)
    path = tmp_path / "ref" / "classifier-local-abc123.safetensors"
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["extractor"] == "classifier-local" and meta["n"] == 300 and meta["dim"] == 128
    assert len(meta["weights_sha256"]) == 64 and meta["weights_file"] == "c.safetensors"
    direct = M.stats(real_extract("classifier-local", images[:300], weights_path=weights, progress=False)["features"])
    np.testing.assert_allclose(mu, direct[0])
    np.testing.assert_allclose(sigma, direct[1])
    assert not list(path.parent.glob("*.tmp"))  # atomic writes leave no temp files

    mtime = path.stat().st_mtime_ns
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a valid cache is read silently
        mu2, sigma2 = M.reference_stats(images[:300], "classifier-local", **kw)
    assert len(calls) == 1 and path.stat().st_mtime_ns == mtime
    assert np.array_equal(mu, mu2) and np.array_equal(sigma, sigma2) and mu2.dtype == np.float64


def test_reference_stats_corrupt_or_stale_cache_is_recomputed(tiny_classifier, tmp_path):
    weights, images = tiny_classifier
    kw = dict(cache_dir=tmp_path, content_hash="h", weights_path=weights)
    mu, sigma = M.reference_stats(images[:200], "classifier-local", **kw)
    path = tmp_path / "classifier-local-h.safetensors"
    path.write_bytes(path.read_bytes()[:100])  # truncated, as after a crash of a non-atomic writer
    with pytest.warns(UserWarning, match="unreadable"):
        mu2, _ = M.reference_stats(images[:200], "classifier-local", **kw)
    np.testing.assert_allclose(mu2, mu)
    M.reference_stats(images[:200], "classifier-local", **kw)  # repaired: no warning needed

    other = tmp_path / "other.safetensors"  # same architecture, different weights (a retrained classifier)
    from alphaflow.classifier import load_classifier, save_classifier

    net = load_classifier(weights)
    with torch.no_grad():
        net.fc.weight.mul_(2)
    save_classifier(net, other)
    with pytest.warns(UserWarning, match="other weights"):
        mu3, _ = M.reference_stats(
            images[:200], "classifier-local", cache_dir=tmp_path, content_hash="h", weights_path=other
        )
    assert not np.allclose(mu3, mu)
