"""Params profiles: load, validate against the package's schemas/params.schema.yaml, resolve runs.

A profile (params/*.yaml) holds `defaults` (training settings every run inherits) and `runs` (each
overriding any default). Every experiment of the paper is an entry here, not code. Errors name the key,
the bad value and what is allowed.
"""

import copy
import dataclasses
import importlib.resources
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import jsonschema
import yaml

from alphaflow.curriculum import alpha_schedule
from alphaflow.errors import UserError

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SCHEMA = importlib.resources.files("alphaflow") / "schemas" / "params.schema.yaml"  # package data, works installed
# fmt: off
RELEASED_ENV = "ALPHAFLOW_RELEASED"     # folder of the released checkpoints; default <project>/released
RELEASED_SUFFIXES = (".pt", ".pth")     # a released (official-layout) snapshot file
# fmt: on


class ParamsError(UserError, ValueError):
    """A params file that does not load or validate; the message names the file or key, value and what is allowed."""


# ----------------------------------------------------------------------------
# Training settings of one run (paper Table 3 defaults)


@dataclass(frozen=True)
class RunConfig:
    name: str
    # fmt: off
    method: str = "alphaflow"            # alphaflow | meanflow (α ≡ 0) | fm (α ≡ 1) | shortcut (α = ½, ṽ = u)
    model: str = "B/2"                   # DiT preset
    # fmt: on
    model_overrides: dict = field(default_factory=dict)
    # fmt: off
    seed: int = 1                        # training seed (the official runs use 1)
    steps: int = 400_000                 # optimiser steps
    batch_size: int = 256                # global batch
    micro_batch_size: int | None = None  # per-device micro-batch; None = batch_size / world size
    lr: float = 1e-4                     # Adam learning rate
    warmup_steps: int = 10_000           # linear warm-up from lr/1e4 (official code only)
    # fmt: on
    betas: tuple = (0.9, 0.95)
    adam_eps: float = 1e-8
    # fmt: off
    grad_clip: float | None = 16.0       # global-norm clip; None = off
    max_bad_steps: int = 100             # consecutive NaN/Inf-gradient steps before aborting
    divergence: str = "off"              # off | stop | rollback: what events do (alphaflow.divergence)
    divergence_window: int = 200         # steps within which divergence_events events trigger the policy
    divergence_events: int = 3           # non-finite (or spiking) gradient-norm steps that trigger it
    spike_factor: float | None = None    # a norm above this × its running mean is an event too; None = off
    max_rollbacks: int = 5               # rollbacks before a rollback run stops
    skip_batches: tuple = ()             # global batches not trained on (what a rollback skipped)
    ema_halflife: float = 6931.0         # steps; β = 0.5^(1/h)
    ema_rampup: float | None = 0.05      # h = min(h, rampup·step); None = no ramp
    fm_ratio: float = 0.5                # r = t fraction per micro-batch
    time_loc: float = -0.4               # logit-normal location
    time_scale: float = 1.0              # logit-normal scale
    alpha_start: int = 0                 # k_s
    alpha_end: int = 400_000             # k_e
    alpha_gamma: float = 25.0            # γ
    alpha_clamp: float = 5e-3            # η
    discrete_only: bool = False          # α clamped at η, never a JVP
    cfg_omega: float = 1.0               # ω
    cfg_kappa: float = 0.0               # κ
    cfg_interval: tuple = (0.0, 1.0)     # strict (t_min, t_max)
    label_dropout: float = 0.0           # only inside the CFG interval
    clamp_target: float | None = 4.0     # α > 0 target clip
    weight_eps: float = 1e-3             # c of the adaptive weight
    jvp_mode: str = "tangent"            # tangent | split | fused (objectives.alpha_flow_loss)
    compile: bool = False                # torch.compile the network for the training step
    stats_samples: int = 2048            # latents for the per-element statistics
    init_from: str | None = None         # fine-tune from this run's final checkpoint, or a released .pt file
    checkpoint: str | None = None        # released weights (.pt): imported instead of trained (alphaflow.released)
    log_every: int = 100                 # metrics.jsonl / MLflow cadence
    checkpoint_every: int = 1000         # `latest` checkpoint cadence
    snapshot_every: int = 100_000        # kept snapshots (+ sample grid)
    conflict_every: int | None = None    # gradient-conflict cosines cadence; None = off
    conflict_batch: int = 128            # held-out batch for the cosines (paper App. E)
    eval_every: int | None = None        # in-training FD_clf (EMA and raw, every sampler); None = off
    phema_every: int | None = None       # post-hoc EMA snapshots every N steps (alphaflow.phema); None = off
    # fmt: on
    phema_sigma_rels: tuple = (0.05, 0.10)  # the power-function EMA profiles tracked for them
    # fmt: off
    phema_dtype: str = "float32"         # snapshot precision: float32 | bfloat16
    group: str | None = None             # runs differing only by seed share a group (report: mean over seeds)
    paper_row: str | None = None         # row of the paper's tables this run reproduces
    # fmt: on
    resources: dict = field(default_factory=dict)

    def alpha(self, step):
        """α at optimiser step `step` for this run's method."""
        if self.method == "fm":
            return 1.0
        if self.method == "meanflow":
            return self.alpha_clamp if self.discrete_only else 0.0
        if self.method == "shortcut":
            return 0.5
        return alpha_schedule(
            step, self.alpha_start, self.alpha_end, self.alpha_gamma, self.alpha_clamp, discrete_only=self.discrete_only
        )

    @property
    def shift(self):
        return "shortcut" if self.method == "shortcut" else "velocity"

    def to_dict(self):
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------
# Loading and validation


def parse_t_steps(t_steps):
    t_steps = [float(t) for t in t_steps]
    if len(t_steps) < 2 or t_steps[0] != 1.0 or t_steps[-1] != 0.0:
        raise ValueError(f"t_steps must run from 1.0 to 0.0, got {t_steps}")
    if any(a <= b for a, b in zip(t_steps[:-1], t_steps[1:])):
        raise ValueError(f"t_steps must be strictly descending, got {t_steps}")
    return t_steps


def load_schema(resource=SCHEMA):
    return yaml.safe_load(resource.read_text(encoding="utf-8"))


def format_error(err):
    key = ".".join(str(p) for p in err.absolute_path) or "<top level>"
    value = json.dumps(err.instance, default=str)
    if len(value) > 120:
        value = value[:117] + "..."
    allowed = err.schema.get("description") or err.schema.get("enum") or err.validator_value
    if err.validator == "additionalProperties":
        allowed = f"known keys: {sorted(err.schema.get('properties', {}))}"
    return f"params key '{key}' = {value}: {err.message} (allowed: {allowed})"


def validate(raw, schema=None):
    """Raises ParamsError listing every violation."""
    validator = jsonschema.Draft202012Validator(schema or load_schema())
    errors = sorted(validator.iter_errors(raw), key=lambda e: list(e.absolute_path))
    if errors:
        raise ParamsError("invalid params:\n  " + "\n  ".join(format_error(e) for e in errors))
    for name, run in raw["runs"].items():
        merged = {**raw["defaults"], **run}
        if merged.get("alpha_end", 0) < merged.get("alpha_start", 0):
            raise ParamsError(
                f"params key 'runs.{name}.alpha_end' = {merged['alpha_end']}: must be ≥ alpha_start "
                f"({merged['alpha_start']})"
            )
        source = merged.get("init_from")
        if source is not None and source not in raw["runs"] and not is_released_file(source):
            raise ParamsError(
                f"params key 'runs.{name}.init_from' = {source!r}: not a run of this profile "
                f"(allowed: {sorted(raw['runs'])}, or a released checkpoint file ending in "
                f"{' or '.join(RELEASED_SUFFIXES)})"
            )
        if merged.get("checkpoint") is not None:
            if not is_released_file(merged["checkpoint"]):
                raise ParamsError(
                    f"params key 'runs.{name}.checkpoint' = {merged['checkpoint']!r}: expected a "
                    f"released α-Flow snapshot file ending in {' or '.join(RELEASED_SUFFIXES)}"
                )
            if source is not None:
                raise ParamsError(
                    f"params key 'runs.{name}.init_from' = {source!r}: a run with 'checkpoint' is "
                    "imported, not trained, so it cannot also fine-tune from another source"
                )
    validate_weight_sets(raw)
    validate_protocol(raw)
    validate_eval_jobs(raw)
    for i, sampler in enumerate(raw["eval"]["samplers"]):
        try:
            parse_t_steps(sampler["t_steps"])
        except ValueError as e:
            raise ParamsError(
                f"params key 'eval.samplers.{i}.t_steps' ({sampler['name']}): {e} (e.g. [1.0, 0.5, 0.0])"
            ) from None


def is_released_file(value):
    return isinstance(value, str) and value.endswith(RELEASED_SUFFIXES)


def released_path(value):
    """A released checkpoint's path: absolute as given, relative to $ALPHAFLOW_RELEASED (default
    <project>/released) otherwise."""
    path = Path(os.path.expanduser(value))
    return path if path.is_absolute() else Path(os.environ.get(RELEASED_ENV) or PROJECT_ROOT / "released") / path


PROTOCOLS = ("default", "alphaflow", "adm")


def eval_protocol(raw_eval):
    """params eval.protocol (the schema default: "default")."""
    return raw_eval.get("protocol") or "default"


def metric_extractor(metric, raw_eval):
    """The feature network (alphaflow.features.EXTRACTORS name) that measures one of eval.metrics."""
    if metric in ("fd_classifier", "is_classifier"):
        return "classifier-local"
    return {
        "fid": raw_eval.get("inception", "inception-fid-ts"),
        "is": "inception-v3-compat",
        "fdd": "dinov2-timm-local",
        "fcd": "clip-vit-b32-local",
    }[metric]


def protocol_rounding(protocol):
    """How a protocol turns decoded images into uint8: the official α-Flow/ADM code truncates."""
    return "round" if protocol == "default" else "truncate"


def eval_jobs(raw_eval):
    """params eval.jobs: "cell" (a sample and an evaluate job per cell, the schema default) or "run"."""
    return raw_eval.get("jobs") or "cell"


def validate_eval_jobs(raw, executor=None):
    """eval.jobs run samples and evaluates a run's cells in one in-process job: no launcher executor."""
    executor = executor or raw.get("executor") or "none"
    if eval_jobs(raw["eval"]) == "run" and executor != "none":
        raise ParamsError(
            f"params key 'eval.jobs' = 'run' with executor {executor!r}: one job per run is for the in-process "
            "executor (the demo); on a cluster every cell is its own job: set eval.jobs: cell"
        )


def validate_protocol(raw):
    ev = raw["eval"]
    protocol = eval_protocol(ev)
    if protocol == "adm":
        if not ev.get("adm_reference"):
            raise ParamsError(
                "params key 'eval.adm_reference' is missing: eval.protocol adm computes FID against an "
                "ADM reference batch .npz (mu, sigma; e.g. VIRTUAL_imagenet256_labeled.npz): "
                "give its path"
            )
        if "fid" not in ev["metrics"]:
            raise ParamsError(
                f"params key 'eval.metrics' = {ev['metrics']}: eval.protocol adm is FID against the "
                "ADM reference batch: add fid"
            )
    elif ev.get("adm_reference"):
        raise ParamsError(
            f"params key 'eval.adm_reference' = {ev['adm_reference']!r}: only read with eval.protocol "
            f"adm (eval.protocol is {protocol}): set eval.protocol: adm or remove the key"
        )


PHEMA_PREFIX = "phema-"


def phema_sigma_rel(weights):
    """σ_rel of a post-hoc EMA weight set name (`phema-0.05` → 0.05); None for `ema` and `raw`."""
    return float(weights[len(PHEMA_PREFIX) :]) if weights.startswith(PHEMA_PREFIX) else None


def weight_set_problem(name):
    """Why `name` is not a weight set (None when it is one): ema, raw or phema-<σ_rel> with σ_rel in (0, 0.28],
    written canonically (one name per σ_rel: it names the samples and eval folders)."""
    if name in ("ema", "raw"):
        return None
    try:
        sigma = phema_sigma_rel(name)
    except ValueError:
        sigma = None
    if sigma is None:
        return "expected ema, raw or phema-<σ_rel> (e.g. phema-0.05)"
    if not 0 < sigma <= 0.28:
        return "σ_rel must lie in (0, 0.28] (0.28 is the widest power-function profile, γ = 0)"
    if name != f"{PHEMA_PREFIX}{sigma:g}":
        return f"write it as {PHEMA_PREFIX}{sigma:g} (one name per σ_rel: it names the samples and eval folders)"
    return None


def validate_weight_sets(raw):
    """Every weight set well formed; post-hoc EMA sets need every run to keep snapshots."""
    ev = raw["eval"]
    for key in ("weights", "slow_metric_weights"):
        for i, name in enumerate(ev.get(key) or []):
            problem = weight_set_problem(name)
            if problem:
                raise ParamsError(f"params key 'eval.{key}.{i}' = {name!r}: {problem}")
    names = [s["name"] for s in ev["samplers"]]
    for i, name in enumerate(ev.get("phema_samplers") or []):
        if name not in names:
            raise ParamsError(
                f"params key 'eval.phema_samplers.{i}' = {name!r}: not a sampler of eval.samplers (allowed: {names})"
            )
    if any(phema_sigma_rel(w) is not None for w in ev["weights"]):
        for name, run in raw["runs"].items():
            if not {**raw["defaults"], **run}.get("phema_every"):
                raise ParamsError(
                    f"params key 'runs.{name}.phema_every' is null, but eval.weights asks for post-hoc "
                    "EMA weights (phema-<σ_rel>): set phema_every (e.g. 1/20 of the steps) in defaults "
                    "or the run, so training keeps the snapshots they are reconstructed from"
                )


@dataclass
class Params:
    """A validated profile. `raw` is the YAML as loaded (after overrides)."""

    raw: dict
    path: str | None = None

    @property
    def profile(self):
        return self.raw["profile"]

    @property
    def results(self):
        return Path(self.raw.get("results", "results"))

    def data_dir(self, split="train"):
        return self.results / "data" / self.raw["data"]["name"] / split

    def latent_dir(self):
        return self.results / "latents" / f"{self.raw['data']['name']}-{self.raw['encoder']['kind']}"

    def encoder_args(self):
        """The keyword arguments of `alphaflow.data.build_encoder` for this profile's encoder."""
        enc = self.raw["encoder"]
        return {"kind": enc["kind"], "path": enc.get("path")}

    def classifier_path(self):
        """The small CNN of the FD_classifier metric (the classifier stage writes it)."""
        return self.results / "classifier" / f"{self.raw['data']['name']}.safetensors"

    def reference_split(self):
        """The split whose images give the reference statistics: the held-out split, except for a folder
        source without `ref_path`, where it is the full train set (the official code's choice)."""
        data = self.raw["data"]
        return "train" if data["source"] == "folder" and not data.get("ref_path") else "test"

    def reference_marker(self):
        """The reference stage's summary (metrics, dimensions, fingerprint); the statistics lie beside it."""
        return self.results / "reference" / f"{self.raw['data']['name']}.json"

    def run_dir(self, run):
        if run in ("", ".", "..") or "/" in run or "\\" in run:  # the schema's pattern says so too
            raise ParamsError(
                f"run name {run!r} is not a plain folder name: results/runs/<run> must stay inside "
                f"{self.results / 'runs'}"
            )
        return self.results / "runs" / run

    @property
    def run_names(self):
        return list(self.raw["runs"])

    def run(self, name):
        if name not in self.raw["runs"]:
            raise ParamsError(f"unknown run {name!r}; this profile has: {self.run_names}")
        merged = {**self.raw["defaults"], **self.raw["runs"][name]}
        for key in ("betas", "cfg_interval", "phema_sigma_rels", "skip_batches"):
            if key in merged:
                merged[key] = tuple(merged[key])
        if merged.get("divergence") is False:  # YAML 1.1 reads a bare `off` as false
            merged["divergence"] = "off"
        return RunConfig(name=name, **merged)

    def checkpoint_file(self, run):
        """The released file a run imports its weights from (runs.<run>.checkpoint), or None for a trained run."""
        value = self.run(run).checkpoint
        return None if value is None else released_path(value)

    def init_file(self, run):
        """The released file a run fine-tunes from (runs.<run>.init_from naming a file), or None."""
        value = self.run(run).init_from
        return released_path(value) if value is not None and value not in self.raw["runs"] else None

    def needs_latents(self):
        """Whether any run trains (runs that import a checkpoint read no latents)."""
        return any(self.run(name).checkpoint is None for name in self.run_names)

    @property
    def samplers(self):
        return {s["name"]: s for s in self.raw["eval"]["samplers"]}

    def samples_dir(self, run, weights, sampler):
        """The generated images of one cell (the sample stage writes them, in checksummed chunks)."""
        return self.run_dir(run) / "samples" / weights / sampler

    def eval_file(self, run, weights, sampler):
        """The evaluation JSON of one cell (the evaluate stage writes it; report, Snakemake and DVC read it)."""
        return self.run_dir(run) / "eval" / weights / f"{sampler}.json"

    def evaluation_cells(self):
        """Every (run, weights, sampler) the profile evaluates: runs × eval.weights × samplers, except that
        post-hoc EMA weight sets use only eval.phema_samplers when it is set (a σ_rel sweep multiplies the
        sampling and evaluation jobs)."""
        ev = self.raw["eval"]
        phema_samplers = ev.get("phema_samplers") or list(self.samplers)
        return [
            (run, weights, sampler)
            for run in self.run_names
            for weights in ev["weights"]
            for sampler in self.samplers
            if phema_sigma_rel(weights) is None or sampler in phema_samplers
        ]

    def resources(self, stage, run=None):
        """Launcher resources: resources.default < resources.<stage> < runs.<run>.resources (train)."""
        res = dict(self.raw.get("resources", {}).get("default", {}))
        res.update(self.raw.get("resources", {}).get(stage, {}))
        if run is not None and stage == "train":
            res.update(self.run(run).resources)
        return res

    def tracking_uri(self):
        uri = os.environ.get("MLFLOW_TRACKING_URI") or self.raw.get("tracking_uri")
        return uri or f"sqlite:///{(PROJECT_ROOT / 'mlflow.db').as_posix()}"


def set_by_path(raw, dotted, value):
    node = raw
    parts = dotted.split(".")
    for i, p in enumerate(parts[:-1]):
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ParamsError(f"override key {dotted!r}: {'.'.join(parts[: i + 1])!r} is not a mapping")
    node[parts[-1]] = value


def load_params(path, overrides=()):
    """Loads a params YAML, applies `key.sub=value` overrides (YAML-typed), validates."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"params file {path} does not exist or is not a file (profiles live in params/*.yaml)")
    raw = read_yaml(path, f"params file {path}")
    if not isinstance(raw, dict):
        raise ParamsError(f"params file {path} must hold a mapping, got {type(raw).__name__}")
    raw = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise ParamsError(f"override {item!r} must look like key.sub=value")
        key, value = item.split("=", 1)
        set_by_path(raw, key, read_yaml(value, f"override {item!r}"))
    try:
        validate(raw)
    except ParamsError as e:
        raise ParamsError(f"{path}{' (with --set overrides)' if overrides else ''}: {e}") from None
    return Params(raw=raw, path=str(path))


def read_yaml(source, what):
    """YAML from a file (Path) or a string; a syntax error is a ParamsError naming `what`, line and column."""
    try:
        if isinstance(source, Path):
            with open(source) as f:
                return yaml.safe_load(f)
        return yaml.safe_load(source)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = ", ".join(x for x in (e.context, e.problem) if x)
        raise ParamsError(f"{what} is malformed YAML{where}: {problem}. Fix the YAML there.") from e
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ParamsError(f"{what} is not readable YAML ({e})") from e
