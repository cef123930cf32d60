"""Fréchet distances and Inception Score with bootstrap intervals, on torch-fidelity (paper Table 1).

Evaluation runs in stages: features (`extract_features`) → statistics (`stats`, cached
for the real reference by `reference_stats`) → metric from statistics (`fd_from_stats`). The metric
formulas are torch-fidelity's own (`fid_features_to_statistics`, `fid_statistics_to_metric`,
`isc_features_to_metric`), fed float64.

Bootstrap intervals resample the *generated* features with replacement and keep the reference
statistics fixed. FD is biased upwards at finite N, and a resample (≈63 % distinct images) is more
biased still: with 100 samples of 128-d features the whole percentile interval lies 50–75 % above
the point value (measured, tests/test_metrics.py). So by default (`method="shifted"`) the percentile
interval is moved by the bootstrap bias, median(FD*) − FD: it then gives the sampling spread of
FD-at-this-N around the reported value (and always contains it). `method="percentile"` returns the
plain percentile interval; `bias` is in every result.
"""

import functools
import json
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, isc_features_to_metric
from torch_fidelity.utils import create_feature_extractor
from tqdm import tqdm

from alphaflow import features as F
from alphaflow.data.shards import read_shard, write_shard
from alphaflow.io import atomic_write_json, sha256_file

# ----------------------------------------------------------------------------
# Features.


@functools.lru_cache(maxsize=2)
def _extractor(name, weights_path, stamp, device):
    """A ready torch-fidelity extractor; cached per (file, mtime/size) so a rewritten file reloads."""
    cls = F.extractor_class(name)
    layers = [cls.get_default_feature_layer_for_metric("fid")]
    if _logits_layer(cls) is not None:
        layers.append(_logits_layer(cls))
    ex = create_feature_extractor(name, layers, cuda=False, verbose=False, feature_extractor_weights_path=weights_path)
    return ex.to(device)


def _logits_layer(cls):
    provided = cls.get_provided_features_list()
    return next((k for k in ("logits_unbiased", "logits") if k in provided), None)


def _stamp(path):
    st = Path(path).stat()
    return st.st_mtime_ns, st.st_size


@torch.no_grad()
def extract_features(
    extractor,                  # name in alphaflow.features.EXTRACTORS
    images_uint8,               # uint8 [N, C, H, W], C = 1 or 3, any size, any device
    *,
    weights_path = None,        # None = the extractor's env variable / packaged file
    device       = "cpu",
    batch_size   = 64,
    progress     = True,        # tqdm bar over images
):  # fmt: skip
    """{"features": float64 [N, D]} plus "logits" float64 [N, K] where the extractor has them."""
    path = str(F.resolve_weights(extractor, weights_path))
    ex = _extractor(extractor, path, _stamp(path), str(torch.device(device)))
    names = ex.get_requested_features_list()
    out = {k: [] for k in names}
    n = images_uint8.shape[0]
    if n == 0:
        raise ValueError(f"extract_features({extractor!r}) got no images")
    with tqdm(total=n, disable=not progress, unit="img", desc=f"features {extractor}", leave=False) as bar:
        for i in range(0, n, batch_size):
            batch = images_uint8[i : i + batch_size].to(device)
            for k, v in ex.convert_features_tuple_to_dict(ex(batch)).items():
                out[k].append(v.to("cpu", torch.float64))
            bar.update(batch.shape[0])
    result = {"features": torch.cat(out[names[0]])}  # (N, D)
    if len(names) > 1:
        result["logits"] = torch.cat(out[names[1]])  # (N, K)
    return result


# ----------------------------------------------------------------------------
# Fréchet distance.


def stats(features):
    """(mu [D], sigma [D, D]) as float64 numpy arrays, via torch-fidelity."""
    s = fid_features_to_statistics(torch.as_tensor(features).detach().cpu().double())
    return s["mu"], s["sigma"]


def fd_from_stats(mu1, sigma1, mu2, sigma2):
    """Fréchet distance ‖mu1 − mu2‖² + tr(S1 + S2 − 2 (S1 S2)^½) with torch-fidelity's formula, float64."""
    f = lambda a: np.asarray(a.cpu() if torch.is_tensor(a) else a, dtype=np.float64)
    return fid_statistics_to_metric(
        {"mu": f(mu1), "sigma": f(sigma1)}, {"mu": f(mu2), "sigma": f(sigma2)}, verbose=False
    )[KEY_METRIC_FID]


def _sqrt_psd(sigma):
    """Symmetric square root of a PSD matrix (negative round-off eigenvalues clipped)."""
    w, v = torch.linalg.eigh(sigma)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def _fd_with(x, tr_covmean, mu_ref, tr_ref):
    """‖mean x − mu_ref‖² + tr S_x + tr S_ref − 2 tr (S_x S_ref)^½, given the last trace."""
    n = x.shape[0]
    xc = x - x.mean(dim=0)
    diff = x.mean(dim=0) - mu_ref
    return float(diff @ diff + (xc * xc).sum() / (n - 1) + tr_ref - 2 * tr_covmean)


def _fd_against(x, z, mu_ref, tr_ref):
    """FD of features x [N, D] against a fixed reference, equal to fd_from_stats(*stats(x), ...).

    z = x S_ref^½. tr (S_x S_ref)^½ = Σ sqrt eig(R S_x R) with R = S_ref^½, and R S_x R = YᵀY with
    Y = (z − mean z) / sqrt(N − 1); its nonzero eigenvalues are those of the smaller of YᵀY, YYᵀ,
    so a bootstrap resample costs one Gram matrix and one symmetric eigendecomposition.
    """
    # fmt: off
    y = (z - z.mean(dim=0)) / (x.shape[0] - 1) ** 0.5                        # (N, D)
    gram = y @ y.T if y.shape[0] <= y.shape[1] else y.T @ y                  # (min(N, D),)²
    # fmt: on
    return _fd_with(x, torch.linalg.eigvalsh(gram).clamp(min=0).sqrt().sum(), mu_ref, tr_ref)


def _fd_from_gram(x, gram, mu_ref, tr_ref):
    """The same FD for N < D from gram = x S_ref xᵀ [N, N], without S_ref^½ (a D×D decomposition).

    S_x S_ref = Xcᵀ Xc S_ref / (N − 1) has the nonzero eigenvalues of Xc S_ref Xcᵀ / (N − 1) = C gram C / (N − 1),
    C the centring matrix; that N×N matrix is symmetric PSD, so tr (S_x S_ref)^½ = Σ sqrt of its eigenvalues.
    """
    centred = gram - gram.mean(dim=0, keepdim=True) - gram.mean(dim=1, keepdim=True) + gram.mean()
    tr_covmean = torch.linalg.eigvalsh(centred / (x.shape[0] - 1)).clamp(min=0).sqrt().sum()
    return _fd_with(x, tr_covmean, mu_ref, tr_ref)


def _interval(values, point, ci, method):
    """Percentile interval of the bootstrap values, shifted by their bias for method="shifted"."""
    if method not in ("shifted", "percentile"):
        raise ValueError(f"method must be 'shifted' or 'percentile', got {method!r}")
    lo, med, hi = np.quantile(values, [(1 - ci) / 2, 0.5, (1 + ci) / 2])
    shift = med - point if method == "shifted" else 0.0
    return {
        "value": float(point),
        "low": float(lo - shift),
        "high": float(hi - shift),
        "n_boot": int(len(values)),
        "bias": float(med - point),
    }


def bootstrap_fd(
    features,                   # float [N, D] features of generated images
    mu_ref,                     # [D] reference mean
    sigma_ref,                  # [D, D] reference covariance
    *,
    n_boot = 100,               # resamples; 0 = no interval (low = high = value)
    seed   = 0,
    ci     = 0.95,              # central coverage of the interval
    method = "shifted",         # "shifted" = percentile interval minus bootstrap bias; "percentile" = plain
    device = None,              # where the resamples are computed; None = the features' device
):  # fmt: skip
    """{"value", "low", "high", "n_boot", "bias"}: FD of all features and its bootstrap interval."""
    x = torch.as_tensor(features).detach().to(device=device, dtype=torch.float64)
    if x.dim() != 2 or x.shape[0] < 2:
        raise ValueError(f"need features [N, D] with N >= 2, got {tuple(x.shape)}")
    mu_ref = torch.as_tensor(np.asarray(mu_ref, dtype=np.float64), device=x.device)
    sigma_ref = torch.as_tensor(np.asarray(sigma_ref, dtype=np.float64), device=x.device)
    tr_ref = torch.trace(sigma_ref)
    # Same number as fd_from_stats (torch-fidelity's formula; tests hold them equal to 1e-6) without its
    # D×D non-symmetric eigvals. Fewer samples than dimensions (a 2048-d FID on a few samples): one N×N
    # Gram matrix x S_ref xᵀ, no D×D decomposition at all; else S_ref^½ once, then D×D Gram matrices.
    n = x.shape[0]
    if n < x.shape[1]:
        gram = x @ sigma_ref @ x.T  # (N, N), once
        fd = lambda idx: _fd_from_gram(x[idx], gram[idx][:, idx], mu_ref, tr_ref)
    else:
        z = x @ _sqrt_psd(sigma_ref)  # (N, D), once
        fd = lambda idx: _fd_against(x[idx], z[idx], mu_ref, tr_ref)
    value = fd(torch.arange(n, device=x.device))
    if n_boot <= 0:
        return _interval([value], value, ci, method)
    gen = torch.Generator().manual_seed(seed)
    boots = [fd(torch.randint(n, (n,), generator=gen).to(x.device)) for _ in range(n_boot)]
    return _interval(boots, value, ci, method)


# ----------------------------------------------------------------------------
# Inception Score.


def inception_score(logits, splits=1):
    """exp E_x KL(p(y|x) ‖ p(y)) from logits [N, K], torch-fidelity's formula (mean over splits)."""
    logits = torch.as_tensor(logits).detach().cpu().double()
    return isc_features_to_metric(logits, splits=splits, shuffle=False)[KEY_METRIC_ISC_MEAN]


def bootstrap_is(logits, *, n_boot=100, seed=0, ci=0.95, method="shifted"):
    """{"value", "low", "high", "n_boot", "bias"}: IS of all logits and its bootstrap interval (as bootstrap_fd)."""
    logits = torch.as_tensor(logits).detach().cpu().double()
    value = inception_score(logits)
    if n_boot <= 0:
        return _interval([value], value, ci, method)
    # With resample counts w: p(y) = wᵀp / N and IS = exp((wᵀ Σ_y p log p − (wᵀp)·log p(y)) / N).
    p, log_p = logits.softmax(dim=1), logits.log_softmax(dim=1)  # (N, K)
    neg_entropy = (p * log_p).sum(dim=1)  # (N,)
    gen = torch.Generator().manual_seed(seed)
    n = logits.shape[0]
    boots = []
    for _ in range(n_boot):
        w = torch.bincount(torch.randint(n, (n,), generator=gen), minlength=n).double()
        wp = w @ p  # (K,)
        boots.append(float(torch.exp((w @ neg_entropy - wp @ (wp / n).log()) / n)))
    return _interval(boots, value, ci, method)


# ----------------------------------------------------------------------------
# Cached reference statistics.


def reference_stats(
    images_uint8,               # held-out real images, uint8 [N, C, H, W]
    extractor,                  # name in alphaflow.features.EXTRACTORS
    *,
    cache_dir,                  # folder of <extractor>-<content_hash>.safetensors (+ .json sidecar)
    content_hash,               # identifies the images (e.g. shard checksums + count)
    weights_path = None,        # None = the extractor's env variable / packaged file
    device       = "cpu",
):  # fmt: skip
    """(mu, sigma) float64 numpy of the reference features; computed once, then read from the cache.

    The sidecar records the weights file's sha256: a cache made with other weights (a retrained
    classifier) is recomputed, and so is an unreadable one (with a warning).
    """
    path = Path(cache_dir) / f"{extractor}-{content_hash}.safetensors"
    sidecar = path.with_suffix(".json")
    weights = F.resolve_weights(extractor, weights_path)
    weights_id = _sha256_cached(str(weights), _stamp(weights))
    cached = _read_cache(path, sidecar, weights_id)
    if cached is not None:
        return cached
    t0 = time.perf_counter()
    feats = extract_features(extractor, images_uint8, weights_path=str(weights), device=device, progress=False)
    mu, sigma = stats(feats["features"])
    sha = write_shard(path, {"mu": mu, "sigma": sigma})  # atomic (temp, fsync, rename)
    atomic_write_json(
        sidecar,
        {
            "extractor": extractor,
            "sha256": sha,
            "n": int(images_uint8.shape[0]),
            "dim": int(mu.shape[0]),
            "content_hash": content_hash,
            "weights_file": weights.name,
            "weights_sha256": weights_id,
            "seconds": time.perf_counter() - t0,
        },
    )
    return mu, sigma


@functools.lru_cache(maxsize=8)
def _sha256_cached(path, stamp):
    return sha256_file(path)


def _read_cache(path, sidecar, weights_id):
    """(mu, sigma) from a valid cache file, else None (with a warning when one is there but unusable)."""
    if not path.exists():
        return None
    try:
        meta = json.loads(sidecar.read_text())
        arrays = read_shard(path, sha256=meta["sha256"])
        mu, sigma = arrays["mu"], arrays["sigma"]
        if mu.shape != (meta["dim"],) or sigma.shape != (meta["dim"], meta["dim"]):
            raise ValueError(f"shapes {mu.shape}, {sigma.shape} do not match dim {meta['dim']}")
    except Exception as e:  # any unreadable file: recompute rather than fail the evaluation
        warnings.warn(
            f"reference statistics cache {path} is unreadable ({type(e).__name__}: {e}); recomputing", stacklevel=2
        )
        return None
    if meta.get("weights_sha256") != weights_id:
        warnings.warn(
            f"reference statistics cache {path} was made with other weights ({meta.get('weights_file')}); recomputing",
            stacklevel=2,
        )
        return None
    return mu.astype(np.float64), sigma.astype(np.float64)
