"""The authors' released α-Flow checkpoints → this project's DiT and SD-VAE.

The official trainer writes one `torch.save`d dict per snapshot: `net` (raw weights) and `ema` (the EMA), each
the state dict of its latent-diffusion wrapper, beside optimizer, scheduler, config and statistics. In `net`/`ema`:

    model.*                      the DiT (names below), model.pos_embed the fixed 2-D sin-cos table
    autoencoder_mean, _var       per-element latent statistics, float64 [1, C, H, W] (μ and σ²)
    are_ldm_stats_inited         whether they were estimated
    autoencoder.model.model.*    the SD-VAE (diffusers AutoencoderKL names)

The DiT is the same function as `alphaflow.models.DiT` once the names are mapped: the official t embedder is
`noise_labels_embedder`, the (t − r) embedder `noise_labels_next_embedder`, the label table
`y_embedder.embedding_table` (1000 rows for the no-CFG models, which never drop labels; 1001 with the null
class last otherwise). Normalisation: x = (z − μ) / √(σ² + 1e-16).

Files are read with `torch.load(weights_only=True)`: tensors and plain containers only. A file that needs any
other Python object is refused before anything in it runs, except numpy scalars/arrays/dtypes (data, listed in
`DATA_ONLY_GLOBALS`), which statistics dictionaries sometimes hold.
"""

import json
import pickle
from importlib import resources
from pathlib import Path

import torch

from alphaflow.errors import MissingInputError, UserError
from alphaflow.presets import PRESETS, preset_of, state_shapes

# fmt: off
WEIGHTS = {"ema": "ema", "raw": "net"}      # this project's weight-set names → the snapshot's keys
STD_EPS = 1e-16                             # x = (z − μ) / √(σ² + eps), as the official wrapper
# fmt: on
VAE_PREFIXES = ("autoencoder.model.model.", "model.model.")  # in a model snapshot / in sd_vae_ft_ema.pt
SD_VAE_CONFIG = "sd_vae_ft_ema.json"  # alphaflow/data/: the diffusers config of stabilityai/sd-vae-ft-ema

# Globals a statistics dict may pickle that only rebuild data (numpy scalars, arrays, dtypes); see is_data_only.
DATA_ONLY_GLOBALS = {
    "numpy.core.multiarray.scalar",
    "numpy._core.multiarray.scalar",
    "numpy.core.multiarray._reconstruct",
    "numpy._core.multiarray._reconstruct",
    "numpy.ndarray",
    "numpy.dtype",
}


def is_data_only(name):
    """A global that only rebuilds numpy data: the list above, or a numpy dtype class (numpy.dtypes.Float64DType)."""
    return name in DATA_ONLY_GLOBALS or (name.startswith("numpy.dtypes.") and name.endswith("DType"))


# Official DiT names → this project's (the rest — blocks.*, final_layer.*, x_embedder.* — are equal).
RENAMES = {
    "noise_labels_embedder.": "t_embedder.",
    "noise_labels_next_embedder.": "dt_embedder.",
    "y_embedder.embedding_table.": "y_embedder.table.",
}


class OfficialCheckpointError(UserError):
    """A file that is not an official α-Flow snapshot this project can read."""


# ----------------------------------------------------------------------------
# Reading a snapshot without running its code.


def read_snapshot(path):
    """The snapshot dict, loaded with weights_only=True (numpy data globals allowed, nothing else)."""
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(
            f"{path}: no such file. The released checkpoints are on Hugging Face "
            "(snap-research/alphaflow); download them on a machine with internet and copy "
            "them here (see the README, 'Check the pipeline against the paper')."
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        pass  # it needs more than tensors and containers: find out what, without unpickling it
    except Exception as e:  # not a torch.save file at all
        raise OfficialCheckpointError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: {e})") from None
    try:
        needed = set(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception as e:
        raise OfficialCheckpointError(
            f"{path}: refused, nothing in it was run: it is not a torch.save checkpoint and would need unpickling ({e})"
        ) from None
    unsafe = sorted(n for n in needed if not is_data_only(n))
    if unsafe:
        raise OfficialCheckpointError(
            f"{path}: refused, nothing in it was run. Reading it would unpickle Python objects other than "
            f"tensors and plain containers: {', '.join(unsafe)}. An official α-Flow snapshot needs none; if you "
            "trust this file, re-save its 'net'/'ema' state dicts with torch.save on plain dicts."
        )
    allowed = [_resolve_global(name) for name in sorted(needed)] + numpy_dtype_classes()
    with torch.serialization.safe_globals(allowed):
        return torch.load(path, map_location="cpu", weights_only=True)


def numpy_dtype_classes():
    # The DType classes of numpy arrays are not among the globals torch lists beforehand; all are data.
    import numpy.dtypes

    return [getattr(numpy.dtypes, n) for n in dir(numpy.dtypes) if n.endswith("DType")]


def _resolve_global(name):
    import importlib

    module, _, attr = name.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def wrapper_state(snapshot, weights, path):
    """snapshot['ema'] or snapshot['net'] (the wrapper's state dict)."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {sorted(WEIGHTS)}, got {weights!r}")
    key = WEIGHTS[weights]
    state = snapshot.get(key) if isinstance(snapshot, dict) else None
    if not isinstance(state, dict) or not state:
        found = sorted(snapshot) if isinstance(snapshot, dict) else type(snapshot).__name__
        raise OfficialCheckpointError(
            f"{path}: no '{key}' state dict (the {weights} weights) in this snapshot; it holds {found}"
        )
    return state


# ----------------------------------------------------------------------------
# The DiT.


def official_to_dit(state, path="<state>", num_classes=1000):
    """The official wrapper's state dict → this project's DiT state dict (float32), statistics included."""
    from alphaflow.models.dit import sincos_2d_pos_embed

    dit, unknown = {}, []
    for key, value in state.items():
        if not key.startswith("model.") or key == "model.pos_embed":
            continue
        name = key[len("model.") :]
        for old, new in RENAMES.items():
            if name.startswith(old):
                name = new + name[len(old) :]
        if not (
            name.startswith(
                (
                    "x_embedder.proj.",
                    "t_embedder.mlp.",
                    "dt_embedder.mlp.",
                    "y_embedder.table.",
                    "blocks.",
                    "final_layer.",
                )
            )
            and name.endswith((".weight", ".bias"))
        ):
            unknown.append(key)
        dit[name] = value.detach().to(torch.float32)
    if unknown:
        raise OfficialCheckpointError(
            f"{path}: DiT keys this project's DiT does not have: {unknown[:8]}{' …' if len(unknown) > 8 else ''}"
        )
    if "x_embedder.proj.weight" not in dit:
        raise OfficialCheckpointError(
            f"{path}: no 'model.x_embedder.proj.weight': not an α-Flow DiT snapshot (keys: {sorted(state)[:8]} …)"
        )
    hidden, channels, patch, _ = dit["x_embedder.proj.weight"].shape
    pos = state.get("model.pos_embed")
    if pos is not None:
        grid = int(round(pos.shape[1] ** 0.5))
        ours = sincos_2d_pos_embed(hidden, grid)[None]
        if pos.shape != ours.shape or not torch.allclose(pos.float(), ours, atol=1e-5):
            raise OfficialCheckpointError(
                f"{path}: model.pos_embed {tuple(pos.shape)} is not the fixed 2-D sin-cos "
                "table this project's DiT computes; the architectures differ"
            )
    table = dit["y_embedder.table.weight"]
    if table.shape[0] == num_classes:  # trained without label dropout, so no null row: add an unused one (zero)
        dit["y_embedder.table.weight"] = torch.cat([table, table.new_zeros(1, table.shape[1])])
    elif table.shape[0] != num_classes + 1:
        raise OfficialCheckpointError(
            f"{path}: a label table of {table.shape[0]} rows; expected {num_classes} "
            f"(no null class) or {num_classes + 1} (null class last)"
        )
    dit.update(latent_statistics(state, path))
    return dit


def latent_statistics(state, path):
    """latent_mean, latent_std float32 [1, C, H, W] from autoencoder_mean / autoencoder_var."""
    if "autoencoder_mean" not in state or "autoencoder_var" not in state:
        raise OfficialCheckpointError(f"{path}: no autoencoder_mean / autoencoder_var (the latent statistics)")
    if "are_ldm_stats_inited" in state and not bool(state["are_ldm_stats_inited"]):
        raise OfficialCheckpointError(
            f"{path}: are_ldm_stats_inited is False: the latent statistics were never "
            "estimated, so this snapshot cannot be sampled"
        )
    mean = state["autoencoder_mean"].double()
    var = state["autoencoder_var"].double()
    shape = (1, *mean.shape[-3:])
    return {"latent_mean": mean.reshape(shape).float(), "latent_std": (var.reshape(shape) + STD_EPS).sqrt().float()}


def official_preset(state, path="<state>"):
    """The preset name ("B/2", …, "XL/2") whose shapes this DiT state dict has; one clear error otherwise."""
    name = preset_of(state)
    if name is not None:
        return name
    hidden, depth, patch = state_shapes(state)
    known = ", ".join(
        f"{n} (D={p['hidden_size']}, depth {p['depth']}, patch {p['patch_size']})"
        for n, p in PRESETS.items()
        if n in ("B/2", "M/2", "L/2", "XL/2")
    )
    raise OfficialCheckpointError(
        f"{path}: a DiT with hidden size {hidden}, {depth} blocks and patch {patch}: no "
        f"preset has these shapes (known: {known})"
    )


def load_official_snapshot(path, weights="ema", num_classes=1000):
    """A released α-Flow snapshot → the state dict of this project's DiT (latent_mean / latent_std included),
    for `build_model(preset, num_classes=1000, input_size=32, in_channels=4).load_state_dict(..., strict=True)`;
    weights "ema" or "raw"; num_classes: the label table's classes (ImageNet: 1000). Never unpickles code."""
    snapshot = read_snapshot(path)
    state = official_to_dit(wrapper_state(snapshot, weights, path), path, num_classes)
    official_preset(state, path)  # an unknown shape is an error here, not at load_state_dict
    return state


def load_official_weight_sets(path, num_classes=1000):
    """{"ema": state dict, "raw": state dict} of one snapshot, the file read once; both the same preset."""
    snapshot = read_snapshot(path)
    sets = {w: official_to_dit(wrapper_state(snapshot, w, path), path, num_classes) for w in WEIGHTS}
    official_preset(sets["ema"], path)
    return sets


def build_official_model(path, weights="ema", num_classes=1000):
    """(DiT with the snapshot's weights, preset name) — the preset recognised from the shapes."""
    from alphaflow.models import build_model

    state = load_official_snapshot(path, weights, num_classes)
    preset = official_preset(state, path)
    c, h, _ = state["latent_mean"].shape[1:]
    net = build_model(preset, num_classes=num_classes, input_size=h, in_channels=c)
    net.load_state_dict(state, strict=True)
    return net.eval(), preset


# ----------------------------------------------------------------------------
# The SD-VAE.


def sd_vae_config():
    """The diffusers config of stabilityai/sd-vae-ft-ema, kept in the package (it cannot be downloaded here)."""
    text = resources.files("alphaflow.data").joinpath(SD_VAE_CONFIG).read_text()
    return {k: v for k, v in json.loads(text).items() if not k.startswith("_")}


def vae_state(snapshot, path):
    """The AutoencoderKL state dict inside a model snapshot or sd_vae_ft_ema.pt (EMA weights first)."""
    for key in ("ema", "net"):
        state = snapshot.get(key) if isinstance(snapshot, dict) else None
        if not isinstance(state, dict):
            continue
        for prefix in VAE_PREFIXES:
            vae = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            if vae:
                return {_diffusers_attention_name(k): v.float() for k, v in vae.items()}
    raise OfficialCheckpointError(
        f"{path}: no VAE weights (keys starting with {' or '.join(VAE_PREFIXES)} in 'ema' or 'net')"
    )


def _diffusers_attention_name(key):
    # Older diffusers attention names (query/key/value/proj_attn) → the current to_q/to_k/to_v/to_out.0.
    for old, new in ((".query.", ".to_q."), (".key.", ".to_k."), (".value.", ".to_v."), (".proj_attn.", ".to_out.0.")):
        key = key.replace(old, new)
    return key


def load_official_vae(path, config=None):
    """The AutoencoderKL of a released file (a model snapshot's VAE or sd_vae_ft_ema.pt), in eval mode.

    config: a diffusers AutoencoderKL config dict; default the packaged SD-VAE-ft-EMA config.
    """
    from diffusers import AutoencoderKL  # only where a VAE is built

    state = vae_state(read_snapshot(path), path)
    vae = AutoencoderKL.from_config(config or sd_vae_config())
    # Attention projections may be stored as 1×1 convolutions by older diffusers versions.
    own = vae.state_dict()
    state = {k: v.reshape(own[k].shape) if k in own and v.numel() == own[k].numel() else v for k, v in state.items()}
    missing, unexpected = vae.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise OfficialCheckpointError(
            f"{path}: the VAE weights do not fit the SD-VAE config: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return vae.eval()
