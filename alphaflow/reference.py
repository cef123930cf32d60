"""Reference statistics: which network measures each metric, and the real images it is compared with.

    alphaflow reference --params P

`metric_plan` maps params eval.metrics to feature networks (FD_classifier: this project's small CNN; FID: an
Inception; FDD: DINOv2; FCD: CLIP; IS: Inception logits). The reference stage caches the feature mean and
covariance of the held-out images (`Params.reference_split`) for every Fréchet metric under
`results/reference/`, keyed by the images' content hash, and writes the summary `Params.reference_marker` the DAG
waits on. The evaluate stage reads the same cache.
"""

import hashlib
import json
import os

from alphaflow.config import eval_protocol, metric_extractor
from alphaflow.data import load_prepared
from alphaflow.data.encoders import official_real_round_trip
from alphaflow.distributed import resolve_device
from alphaflow.features import EXTRACTORS
from alphaflow.io import atomic_write_json
from alphaflow.metrics import reference_stats
from alphaflow.provenance import file_hash, fingerprint, stage_reads

# ----------------------------------------------------------------------------
# Which network measures each metric


INCEPTION_ENV = {
    "inception-fid-ts": "ALPHAFLOW_INCEPTION_TS",
    "inception-nvidia-ts": "ALPHAFLOW_INCEPTION_NVIDIA",
    "inception-v3-compat": "ALPHAFLOW_INCEPTION_WEIGHTS",
}  # eval.inception → its weights' variable
WEIGHTS_ENV = {
    **INCEPTION_ENV,
    "dinov2-timm-local": "ALPHAFLOW_DINOV2_WEIGHTS",
    "clip-vit-b32-local": "ALPHAFLOW_CLIP_WEIGHTS",
}


def is_score(metric):
    """Whether a metric is an Inception Score (needs no reference statistics)."""
    return metric.startswith("is")


def metric_plan(params):
    """[(metric, extractor, weights_path)] for params eval.metrics; FID/FDD/FCD weights come from env/params."""
    ev = params.raw["eval"]
    plan = []
    for metric in ev["metrics"]:
        extractor = metric_extractor(metric, ev)
        if extractor == "classifier-local":
            path = str(params.classifier_path())
        else:
            path = os.environ.get(WEIGHTS_ENV[extractor])
        plan.append((metric, extractor, path))
    return plan


# ----------------------------------------------------------------------------
# Reference images and their statistics


def real_round_trip(params):
    """Whether real images pass the official evaluation's float32 round trip (eval.protocol alphaflow only:
    the paper's protocol; FID under `adm` uses ADM's own reference batch)."""
    return eval_protocol(params.raw["eval"]) == "alphaflow"


def reference_images(params):
    """Real images for reference statistics (Params.reference_split), capped at eval.ref_samples, as the
    protocol hands them to the feature networks."""

    images, labels, manifest = load_prepared(params.data_dir(params.reference_split()))
    n = params.raw["eval"].get("ref_samples") or len(images)
    images, labels = images[:n], labels[:n]
    if real_round_trip(params):
        images = official_real_round_trip(images)
        manifest = {**manifest, "round_trip": "official"}  # a cache key apart from the untouched images'
    return images, labels, manifest


def content_hash(manifest, n):
    shards = json.dumps([s["sha256"] for s in manifest["shards"]]).encode()
    transform = f"|{manifest['round_trip']}" if "round_trip" in manifest else ""  # untouched images: as before
    return hashlib.sha256(shards + f"|{n}{transform}".encode()).hexdigest()[:16]


INCEPTION_LIKE = (
    "inception-fid-ts",
    "inception-nvidia-ts",
    "inception-v3-compat",
    "dinov2-timm-local",
    "clip-vit-b32-local",
)


def capped(params, extractor, images, kind):
    """The slow ImageNet networks see at most eval.fid_samples generated / eval.fid_ref_samples reference images."""
    key = {"generated": "fid_samples", "reference": "fid_ref_samples"}[kind]
    cap = params.raw["eval"].get(key)
    return images[:cap] if extractor in INCEPTION_LIKE and cap else images


def reference_stats_for(params, extractor, images, manifest, device="cpu", weights_path=None):
    if weights_path is None:
        weights_path = dict((e, w) for _, e, w in metric_plan(params)).get(extractor)
    images = capped(params, extractor, images, "reference")
    return reference_stats(
        images,
        extractor,
        cache_dir=params.results / "reference",
        content_hash=content_hash(manifest, len(images)),
        weights_path=weights_path,
        device=device,
    )


def reference_cache_stem(params, extractor, images, manifest):
    """File stem of the cached statistics reference_stats_for reads for these (uncapped) images."""
    return f"{extractor}-{content_hash(manifest, len(capped(params, extractor, images, 'reference')))}"


# ----------------------------------------------------------------------------
# The reference stage


def reference(params, device=None):
    """Caches reference statistics for every metric of the profile; writes a summary for the DAG."""

    images, _, manifest = reference_images(params)
    upstream = [file_hash(params.data_dir(params.reference_split()) / "manifest.json")]
    if params.classifier_path().exists():
        upstream.append(file_hash(params.classifier_path()))
    fp = fingerprint("reference", stage_reads(params, "reference"), upstream)
    summary = {"count": len(images), "fingerprint": fp, "metrics": {}}
    for metric, extractor, weights_path in metric_plan(params):
        if is_score(metric):
            continue
        mu, sigma = reference_stats_for(params, extractor, images, manifest, resolve_device(device), weights_path)
        summary["metrics"][metric] = {"extractor": extractor, "dim": int(mu.shape[-1])}
        print(f"[alphaflow] reference {metric}: {extractor} statistics of {len(images)} held-out images cached")
    # Statistics cached for other settings (another ref_samples, older data) go: the folder then holds what
    # a from-scratch run with these params writes, and DVC sees the same output.
    used = {reference_cache_stem(params, e, images, manifest) for m, e, _ in metric_plan(params) if not is_score(m)}
    for f in params.reference_marker().parent.iterdir():
        stem = f.name.split(".")[0]
        if stem.rsplit("-", 1)[0] in EXTRACTORS and stem not in used and f.suffix in (".safetensors", ".json"):
            f.unlink()
    atomic_write_json(params.reference_marker(), summary)
    return summary
