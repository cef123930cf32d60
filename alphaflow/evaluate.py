"""The evaluate stage: metrics of one cell's generated images, with bootstrap intervals (paper Table 1).

    alphaflow evaluate --params P --run R --weights ema --sampler 1nfe
    alphaflow sample-evaluate --params P --run R     # eval.jobs run: every cell of R, sampled and evaluated

Reads the finished sample set (alphaflow.samples) and the reference statistics (alphaflow.reference), computes
every metric of params eval.metrics with a bootstrap interval over samples and writes
eval/<weights>/<sampler>.json; the report stage logs them onto the run's MLflow run (`fid_1nfe_ema`, …: one MLflow
connection per run, not one per evaluation job). `in_training_metrics` gives the FD_clf curve during training.
"""

import json
import time

import torch

from alphaflow import metrics as M
from alphaflow.adm import load_adm_reference
from alphaflow.config import eval_protocol
from alphaflow.data import build_encoder
from alphaflow.distributed import resolve_device
from alphaflow.images import save_grid
from alphaflow.io import atomic_write_json
from alphaflow.provenance import file_hash, fingerprint, stage_reads
from alphaflow.reference import INCEPTION_LIKE, capped, is_score, metric_plan, reference_images, reference_stats_for
from alphaflow.samples import (
    finished_fingerprint,
    generate,
    labels_for_seeds,
    load_samples,
    no_autocast,
    sample_fingerprint,
    sample_run,
    samples_parts,
)
from alphaflow.tracking import mlflow_metric_name


def evaluate_images(params, images, device, weights=None):
    """{metric: {value, low, high, n}} for uint8 images against the reference statistics.

    The ImageNet-network metrics (FID, FDD, FCD, IS) are skipped for weights outside eval.slow_metric_weights.
    """

    ev = params.raw["eval"]
    ref_images, _, manifest = reference_images(params)
    n_boot, seed = ev.get("n_boot", 100), params.raw["seed"]
    features = {}  # one extraction per network, shared by its FD and IS
    results = {}
    slow_weights = ev.get("slow_metric_weights") or ev["weights"]
    for metric, extractor, weights_path in metric_plan(params):
        if extractor in INCEPTION_LIKE and weights is not None and weights not in slow_weights:
            continue
        gen = capped(params, extractor, images, "generated")
        if extractor not in features:
            features[extractor] = M.extract_features(
                extractor, gen, weights_path=weights_path, device=device, progress=False
            )
        feats = features[extractor]
        if is_score(metric):
            results[metric] = M.bootstrap_is(feats["logits"], n_boot=n_boot, seed=seed)
        else:
            if metric == "fid" and eval_protocol(ev) == "adm":  # the ADM evaluator's reference batch
                mu, sigma = load_adm_reference(ev["adm_reference"])
            else:
                mu, sigma = reference_stats_for(params, extractor, ref_images, manifest, device, weights_path)
            results[metric] = M.bootstrap_fd(feats["features"], mu, sigma, n_boot=n_boot, seed=seed, device=device)
        results[metric]["n"] = len(gen)
        results[metric]["extractor"] = extractor
    return results


def in_training_metrics(params, nets, device):
    """FD_clf of the first `eval_samples` seeds for each weights × sampler, for metric-vs-step curves.

    nets: {"ema": module, "raw": module}. Uses per-seed noise generators, so the training RNG stream is
    untouched and resume stays exact. Keys are the MLflow names: `fd_classifier_<sampler>_<weights>`.
    """

    ev = params.raw["eval"]
    n = ev.get("train_eval_samples", 500)
    ref_images, _, manifest = reference_images(params)
    weights_path = str(params.classifier_path())
    mu, sigma = reference_stats_for(params, "classifier-local", ref_images, manifest, device, weights_path)
    encoder = build_encoder(**params.encoder_args(), device=device)
    seeds = list(range(n))
    out = {}
    for weights, net in nets.items():
        was_training = net.training
        net.eval()
        labels = labels_for_seeds(seeds, net.num_classes, ev.get("labels", "random"))
        for name, sampler in params.samplers.items():
            with torch.no_grad():
                images = generate(net, encoder, seeds, labels, sampler, torch.device(device), no_autocast)
            feats = M.extract_features(
                "classifier-local", images.cpu(), weights_path=weights_path, device=device, progress=False
            )["features"]
            out[mlflow_metric_name("fd_classifier", name, weights)] = M.fd_from_stats(*M.stats(feats), mu, sigma)
        net.train(was_training)
    return out


def current_evaluation(params, run_name, weights, sampler_name, samples_fp=None):
    """The cell's evaluation record when it is current (its fingerprint: these params, the samples of `samples_fp`
    (default: what these params make of the finished sample set), this reference), else None."""
    if samples_fp is None:
        parts = samples_parts(params.samples_dir(run_name, weights, sampler_name))
        if parts is None:
            return None
        samples_fp = sample_fingerprint(params, run_name, weights, sampler_name, parts)
    try:
        record = json.loads(params.eval_file(run_name, weights, sampler_name).read_text())
    except (OSError, ValueError):
        return None
    return record if record.get("fingerprint") == evaluation_fingerprint(params, weights, samples_fp) else None


def evaluation_fingerprint(params, weights, samples_fp):
    reference = params.reference_marker()
    upstream = [samples_fp, file_hash(reference) if reference.exists() else None]
    return fingerprint("evaluate", stage_reads(params, "evaluate", weights=weights), upstream)


def evaluate_run(params, run_name, weights, sampler_name, *, device=None, quiet=False):
    device = resolve_device(device)
    out = params.samples_dir(run_name, weights, sampler_name)
    samples_fp = sample_fingerprint(params, run_name, weights, sampler_name, samples_parts(out))
    images, labels = load_samples(out, fingerprint=samples_fp)
    t0 = time.perf_counter()
    metrics = evaluate_images(params, images, device, weights=weights)
    record = {
        "run": run_name,
        "weights": weights,
        "sampler": sampler_name,
        "fingerprint": evaluation_fingerprint(params, weights, samples_fp),
        "samples_fingerprint": samples_fp,
        "num_samples": len(images),
        "labels": params.samplers[sampler_name].get("labels") or params.raw["eval"].get("labels", "random"),
        "t_steps": params.samplers[sampler_name]["t_steps"],
        "mode": params.samplers[sampler_name]["mode"],
        "seconds": time.perf_counter() - t0,
        "metrics": metrics,
    }
    atomic_write_json(
        params.eval_file(run_name, weights, sampler_name),
        record,
        what=f"the evaluation of {run_name}/{weights}/{sampler_name}",
    )
    # A class-sorted grid (8 per class) for the report.
    order = torch.argsort(labels, stable=True)
    per_class = [order[labels[order] == c][:8] for c in range(min(10, int(labels.max()) + 1))]
    save_grid(
        images[torch.cat(per_class)],
        out.parent / f"{sampler_name}.png",
        nrow=8,
        scale=2 if images.shape[-1] < 64 else 1,
    )
    if not quiet:
        shown = ", ".join(f"{m} {v['value']:.2f} [{v['low']:.2f}, {v['high']:.2f}]" for m, v in metrics.items())
        print(f"[alphaflow] evaluate {run_name}/{weights}/{sampler_name}: {shown}")
    return record


def sample_evaluate(params, run_name, *, device=None, quiet=False):
    """Every cell of a run (params.evaluation_cells) sampled and evaluated in this one process (eval.jobs run):
    the sample stage resumes or keeps a current sample set, and a current evaluation is kept, so a re-run
    redoes exactly the cells whose inputs changed, as the per-cell jobs would."""
    device = resolve_device(device)
    num_parts = params.raw["eval"].get("parts") or 1
    for run, weights, sampler_name in params.evaluation_cells():
        if run != run_name:
            continue
        # The expected sample fingerprint once per cell (a post-hoc EMA's hashes its weights file), and only where
        # a finished set is there to compare: before the first sampling those weights may not exist yet.
        out = params.samples_dir(run, weights, sampler_name)
        samples_fp = finished_fingerprint(out)
        if samples_fp is None or samples_fp != sample_fingerprint(params, run, weights, sampler_name, num_parts):
            for part in range(num_parts):
                sample_run(
                    params, run, weights, sampler_name, part=part, num_parts=num_parts, device=device, quiet=quiet
                )
            samples_fp = finished_fingerprint(out)
        if current_evaluation(params, run, weights, sampler_name, samples_fp) is None:
            evaluate_run(params, run, weights, sampler_name, device=device, quiet=quiet)
        elif not quiet:
            print(f"[alphaflow] evaluate {run}/{weights}/{sampler_name}: current, kept")
