"""Helpers shared by test modules (imported as `from helpers import ...`; tests never import each other)."""

import math

import torch

from alphaflow.models.dit import sincos_2d_pos_embed

#----------------------------------------------------------------------------
# A snapshot in the official α-Flow layout (the wrapper's `model.*` names and shapes), random weights (none of
# them zero, so every layer matters).


def official_wrapper_state(depth, hidden, patch=2, channels=4, size=32, rows=1001, seed=0):
    """The wrapper state dict (`net` or `ema`) of a DiT with these shapes."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape, std=0.05: torch.randn(*shape, generator=g) * std
    s = {"model.pos_embed": sincos_2d_pos_embed(hidden, size // patch)[None],
         "model.x_embedder.proj.weight": rnd(hidden, channels, patch, patch, std=0.2),
         "model.x_embedder.proj.bias": rnd(hidden),
         "model.y_embedder.embedding_table.weight": rnd(rows, hidden, std=0.5)}
    for emb in ("noise_labels_embedder", "noise_labels_next_embedder"):
        s[f"model.{emb}.mlp.0.weight"], s[f"model.{emb}.mlp.0.bias"] = rnd(hidden, 256, std=0.2), rnd(hidden)
        s[f"model.{emb}.mlp.2.weight"], s[f"model.{emb}.mlp.2.bias"] = rnd(hidden, hidden, std=0.2), rnd(hidden)
    for i in range(depth):
        b = f"model.blocks.{i}."
        for name, (o, k) in {"attn.qkv": (3 * hidden, hidden), "attn.proj": (hidden, hidden),
                             "mlp.fc1": (4 * hidden, hidden), "mlp.fc2": (hidden, 4 * hidden),
                             "adaLN_modulation.1": (6 * hidden, hidden)}.items():
            s[b + name + ".weight"], s[b + name + ".bias"] = rnd(o, k, std=1 / math.sqrt(k)), rnd(o)
    s["model.final_layer.linear.weight"] = rnd(patch * patch * channels, hidden, std=1 / math.sqrt(hidden))
    s["model.final_layer.linear.bias"] = rnd(patch * patch * channels)
    s["model.final_layer.adaLN_modulation.1.weight"] = rnd(2 * hidden, hidden, std=1 / math.sqrt(hidden))
    s["model.final_layer.adaLN_modulation.1.bias"] = rnd(2 * hidden)
    s["autoencoder_mean"] = torch.randn(1, channels, size, size, generator=g, dtype=torch.float64)
    s["autoencoder_var"] = torch.rand(1, channels, size, size, generator=g, dtype=torch.float64) * 30 + 1
    s["are_ldm_stats_inited"] = torch.tensor(True)
    return s


def write_snapshot(path, depth, hidden, rows=1001, extra=None, seed=0, **kw):
    """A torch.save(d) snapshot dict as the official trainer writes it; returns the dict."""
    snap = {"net": official_wrapper_state(depth, hidden, rows=rows, seed=2 * seed + 1, **kw),
            "ema": official_wrapper_state(depth, hidden, rows=rows, seed=2 * seed + 2, **kw),
            "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0]}]},
            "cfg": {"model": {"label_dropout": 0.1 if rows > 1000 else 0.0}}, "stats": {"step": 400000},
            "lr_scheduler": None, "grad_scaler": None, "dataloader": None, **(extra or {})}
    torch.save(snap, path)
    return snap



#----------------------------------------------------------------------------
# A tiny project with one trained run.


def trained_tiny_project(base, tiny_latents, **eval_keys):
    """Params of a copy of the tiny data under `base` with one α-Flow run ("alphaflow-tiny"), trained; eval_keys
    update the profile's eval section (e.g. protocol="alphaflow")."""
    import shutil

    import yaml

    from alphaflow.config import load_params
    from alphaflow.train import train
    from conftest import tiny_params_dict

    shutil.copytree(tiny_latents / "results", base / "results")
    d = tiny_params_dict(base / "results", tiny_latents / "images")
    d["runs"] = {"alphaflow-tiny": {"method": "alphaflow"}}
    d["eval"].update(eval_keys)
    path = base / "params.yaml"
    path.write_text(yaml.safe_dump(d))
    params = load_params(path)
    train(params, "alphaflow-tiny", device="cpu", quiet=True, tracking=False)
    return params
