"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models",
§3 and App. C): choose the EMA length after training.

A power-function EMA averages the weights seen up to time t with density ∝ τ^γ on [0, t]; its relative
width σ_rel (standard deviation / t) depends on γ only:

    σ_rel = √((γ + 1) / ((γ + 2)² (γ + 3)))

It is tracked with β_t = (1 − Δ/t)^(γ + 1), t the images seen so far and Δ the images of this step, so
unlike a fixed half-life it keeps its shape however long the run is. Training tracks two such profiles
and saves them as snapshots every N steps; `posthoc_coefficients` then expresses any other (σ_rel, t) profile
as the least-squares combination of the snapshots' profiles (their inner products are closed-form) and
`reconstruct` applies the same combination to the snapshots' weights.

On disk (params `phema_every`, `phema_sigma_rels`, `phema_dtype`): checkpoints/phema/phema-<step>.safetensors,
one file per snapshot holding every tracked profile (keys `<σ_rel>/<parameter>`, metadata: step, images,
σ_rels), written atomically. `alphaflow phema --run R --sigma-rel S` writes the reconstructed weights
(`reconstruct_snapshots`, streaming: one snapshot in memory at a time).
"""

import json
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save as st_save

from alphaflow.io import atomic_write_bytes
from alphaflow.errors import MissingInputError


def gamma_of(sigma_rel):
    """γ of the power-function profile with relative width σ_rel (the largest real root of
    γ³ + 7γ² + (16 − σ⁻²)γ + (12 − σ⁻²) = 0, from the σ_rel formula above)."""
    s = float(sigma_rel) ** -2
    return float(np.roots([1.0, 7.0, 16.0 - s, 12.0 - s]).real.max())


def sigma_rel_of(gamma):
    return float(np.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3))))


def power_beta(gamma, t, dt):
    """The EMA decay of one update that ends at time t (images seen) after dt new images."""
    return (1.0 - dt / t) ** (gamma + 1.0)


class PowerEMA:
    """Power-function EMAs of a module's parameters (and buffers copied as is), one per σ_rel."""

    def __init__(self, net, sigma_rels=(0.05, 0.10)):
        self.sigma_rels = tuple(float(s) for s in sigma_rels)
        self.gammas = tuple(gamma_of(s) for s in self.sigma_rels)
        self.averages = [{k: v.detach().clone().float() for k, v in net.state_dict().items()} for _ in self.sigma_rels]

    @torch.no_grad()
    def update(self, net, t, dt):
        """After a step that brought the images seen to t (dt of them in this step)."""
        state = net.state_dict()
        for gamma, avg in zip(self.gammas, self.averages):
            beta = power_beta(gamma, t, dt)
            for k, v in state.items():
                if v.is_floating_point():
                    avg[k].lerp_(v.float(), 1.0 - beta)
                else:
                    avg[k].copy_(v)

    def state_dict(self):
        return {f"{s:g}/{k}": v for s, avg in zip(self.sigma_rels, self.averages) for k, v in avg.items()}

    def load_state_dict(self, flat):
        for s, avg in zip(self.sigma_rels, self.averages):
            for k in avg:
                avg[k].copy_(flat[f"{s:g}/{k}"])


def profile_inner(t_a, gamma_a, t_b, gamma_b):
    """∫ p_a p_b for the power-function densities p(τ) = (γ + 1) τ^γ / t^(γ + 1) on [0, t] (numpy broadcast)."""
    t_a, gamma_a, t_b, gamma_b = (np.asarray(x, dtype=np.float64) for x in (t_a, gamma_a, t_b, gamma_b))
    ratio_exp = np.where(t_a < t_b, gamma_b, -gamma_a)  # (min/max)^... written with t_a / t_b
    return (gamma_a + 1) * (gamma_b + 1) * (t_a / t_b) ** ratio_exp / ((gamma_a + gamma_b + 1) * np.maximum(t_a, t_b))


def posthoc_coefficients(snap_t, snap_gamma, target_t, target_gamma):
    """x minimising ‖Σ_i x_i p_i − p_target‖² over the snapshot profiles p_i: solves A x = b with
    A_ij = <p_i, p_j>, b_i = <p_i, p_target> (least squares; A is ill-conditioned for many snapshots)."""
    col = lambda x: np.asarray(x, dtype=np.float64).reshape(-1, 1)
    row = lambda x: np.asarray(x, dtype=np.float64).reshape(1, -1)
    a = profile_inner(col(snap_t), col(snap_gamma), row(snap_t), row(snap_gamma))
    b = profile_inner(col(snap_t), col(snap_gamma), np.float64(target_t), np.float64(target_gamma))
    return np.linalg.lstsq(a, b.reshape(-1), rcond=None)[0]


def fit_snapshots(snapshots, sigma_rel, t=None):
    """(t, the snapshots up to t, their coefficients) for the σ_rel profile at time t (default: the last
    snapshot's); snapshots are tuples starting (t_i, sigma_rel_i, ...)."""
    t = max(s[0] for s in snapshots) if t is None else t
    snapshots = [s for s in snapshots if s[0] <= t]  # the target at time t averages nothing after t
    x = posthoc_coefficients([s[0] for s in snapshots], [gamma_of(s[1]) for s in snapshots], t, gamma_of(sigma_rel))
    return t, snapshots, x


def reconstruct(snapshots, sigma_rel, t=None):
    """Weights of the power-function EMA with `sigma_rel` at time t (default: the last snapshot's) from
    snapshots [(t_i, sigma_rel_i, state_dict_i)]; non-float entries come from the last snapshot."""
    t, snapshots, x = fit_snapshots(snapshots, sigma_rel, t)
    last = snapshots[int(np.argmax([s[0] for s in snapshots]))][2]
    out = {}
    for k, v in last.items():
        if v.is_floating_point():
            out[k] = sum(float(c) * s[2][k].double() for c, s in zip(x, snapshots)).to(v.dtype)
        else:
            out[k] = v.clone()
    return out


# ----------------------------------------------------------------------------
# Snapshots on disk


def snapshot_path(folder, step):
    return Path(folder) / f"phema-{step:07d}.safetensors"


def save_snapshot(folder, phema, step, images, dtype=torch.float32):
    """Every tracked profile at `step` (`images` seen) as one safetensors file, written atomically."""
    path = snapshot_path(folder, step)
    tensors = {
        k: (v.to(dtype) if v.is_floating_point() else v).contiguous().cpu() for k, v in phema.state_dict().items()
    }
    # One metadata key: safetensors writes a metadata map in no fixed order, so several keys would make the
    # bytes of equal snapshots differ from run to run.
    record = {"step": step, "images": images, "sigma_rels": list(phema.sigma_rels)}
    atomic_write_bytes(
        path,
        st_save(tensors, metadata={"snapshot": json.dumps(record)}),
        what=f"the post-hoc EMA snapshot of step {step}",
    )
    return path


def discard_after(folder, step):
    """Deletes the snapshots of steps after `step` (a rolled-back trajectory's); returns how many."""
    gone = [path for path in Path(folder).glob("phema-*.safetensors") if int(path.stem[len("phema-") :]) > step]
    for path in gone:
        path.unlink()
    return len(gone)


def snapshot_record(meta):
    """{step, images, sigma_rels} of a snapshot's metadata (also of the earlier three-key layout)."""
    if "snapshot" in meta:
        return json.loads(meta["snapshot"])
    return {"step": int(meta["step"]), "images": int(meta["images"]), "sigma_rels": json.loads(meta["sigma_rels"])}


def list_snapshots(folder, max_step=None):
    """[(images, σ_rel, path)] of the snapshot files in `folder` (at most `max_step`), oldest first."""
    out = []
    for path in sorted(Path(folder).glob("phema-*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            record = snapshot_record(f.metadata())
        if max_step is not None and record["step"] > max_step:
            continue
        out += [(int(record["images"]), float(s), path) for s in record["sigma_rels"]]
    return out


def reconstruct_snapshots(folder, sigma_rel, images=None, max_step=None):
    """(weights, record): the power-function EMA with `sigma_rel` at `images` seen (default: the last
    snapshot's), from the snapshot files in `folder`, read one at a time. Floats come back as float32."""
    snaps = list_snapshots(folder, max_step)
    if not snaps:
        raise MissingInputError(f"no post-hoc EMA snapshots in {folder}: train the run with params phema_every set")
    images, snaps, x = fit_snapshots(snaps, sigma_rel, images)
    out = {}
    for (_, s, path), c in zip(snaps, x):
        prefix = f"{s:g}/"
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                if not key.startswith(prefix):
                    continue
                name, v = key[len(prefix) :], f.get_tensor(key)
                if v.is_floating_point():
                    out[name] = out.get(name, 0.0) + float(c) * v.double()
                else:
                    out[name] = v
    weights = {k: v.float() if v.is_floating_point() else v for k, v in out.items()}
    record = {
        "sigma_rel": float(sigma_rel),
        "images": int(images),
        "snapshots": [
            {"images": t, "sigma_rel": s, "file": p.name, "coefficient": float(c)} for (t, s, p), c in zip(snaps, x)
        ],
    }
    return weights, record


# ----------------------------------------------------------------------------
# The stage: `alphaflow phema --params P --run R --sigma-rel S [--step K]`


def posthoc_path(params, run_name, sigma_rel, step=None):
    """Where the reconstructed weights of `run_name` for σ_rel (at `step`, default the last) go."""
    suffix = "" if step is None else f"-step{step:07d}"
    return params.run_dir(run_name) / "phema" / f"phema-{float(sigma_rel):g}{suffix}.safetensors"


def trained_identity(params, run_name):
    """sha256 of the run's final raw weights (state.json): a reconstruction made from other training is stale."""
    from alphaflow import checkpoint as ckpt

    final = params.run_dir(run_name) / "checkpoints" / "final"
    if not (final / "state.json").exists():
        raise MissingInputError(f"{final} is missing: train the run first (`alphaflow train --run {run_name}`)")
    return ckpt.read_state(final).get("sha256", {}).get("raw")


def write_posthoc(params, run_name, sigma_rel, step=None):
    """Reconstructs the run's power-function EMA with σ_rel at `step` from its snapshots and writes it
    (safetensors, the coefficients and the training it came from in its metadata) atomically; returns
    (path, record)."""
    from alphaflow.config import ParamsError

    run = params.run(run_name)
    if not run.phema_every:
        raise ParamsError(
            f"params key 'runs.{run_name}.phema_every' is null: the run keeps no post-hoc EMA "
            "snapshots; set it (e.g. to 1/40 of the steps) and re-run training"
        )
    if not 0 < float(sigma_rel) <= 0.28:
        raise ParamsError(
            f"--sigma-rel {sigma_rel}: σ_rel must lie in (0, 0.28] (0.28 is the widest power profile, γ = 0)"
        )
    folder = params.run_dir(run_name) / "checkpoints" / "phema"
    images = None if step is None else step * run.batch_size
    weights, record = reconstruct_snapshots(folder, sigma_rel, images=images, max_step=run.steps)
    record["step"] = record["images"] // run.batch_size
    record["trained"] = trained_identity(params, run_name)
    out = posthoc_path(params, run_name, sigma_rel, step)
    atomic_write_bytes(
        out,
        st_save({k: v.contiguous() for k, v in weights.items()}, metadata={"phema": json.dumps(record)}),
        what=f"the post-hoc EMA weights σ_rel={sigma_rel:g} of run {run_name}",
    )
    return out, record


def read_record(path):
    with safe_open(str(path), framework="pt") as f:
        return json.loads((f.metadata() or {}).get("phema", "{}"))


def ensure_posthoc(params, run_name, sigma_rel):
    """The weights file of the `phema-<σ_rel>` weight set at the end of training: reused when it was
    reconstructed from this run's final training, reconstructed otherwise (the sample stage calls this)."""
    path = posthoc_path(params, run_name, sigma_rel)
    if path.exists() and read_record(path).get("trained") == trained_identity(params, run_name):
        return path
    return write_posthoc(params, run_name, sigma_rel)[0]
