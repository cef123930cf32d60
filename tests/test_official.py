"""Released α-Flow snapshots (alphaflow.official): key mapping, label tables, statistics, safety, the VAE.

Snapshots are built here in the official layout (the wrapper's `model.*` names and shapes), and the loaded DiT
is compared with an independent forward of the official architecture written below from its definition
(src/training/dit.py of the release): one-hot labels with an all-zero row meaning the null class, t and t − r
embedded by two sinusoid MLPs, pre-LayerNorm adaLN blocks, unpatchify.
"""

import math
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from alphaflow.models import build_model
from alphaflow.official import (
    OfficialCheckpointError,
    build_official_model,
    load_official_snapshot,
    load_official_vae,
    official_preset,
    sd_vae_config,
)
from helpers import write_snapshot

# ----------------------------------------------------------------------------
# The official forward, restated from its definition.


def official_forward(s, x, t, t_minus_r, label_onehot, heads, patch=2):
    def lin(h, name):
        return F.linear(h, s[name + ".weight"], s[name + ".bias"])

    def time_embed(v, name):
        half = 128
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
        args = v[:, None].float() * freqs[None]
        f = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return lin(F.silu(lin(f, f"model.{name}.mlp.0")), f"model.{name}.mlp.2")

    def norm(h):
        return F.layer_norm(h.float(), h.shape[-1:], eps=1e-6)

    n = x.shape[0]
    h = F.conv2d(x, s["model.x_embedder.proj.weight"], s["model.x_embedder.proj.bias"], stride=patch)
    h = h.flatten(2).transpose(1, 2) + s["model.pos_embed"]
    table = s["model.y_embedder.embedding_table.weight"]
    label = label_onehot.argmax(dim=1)
    label[label_onehot.sum(dim=1) == 0] = table.shape[0] - 1
    c = time_embed(t, "noise_labels_embedder") + time_embed(t_minus_r, "noise_labels_next_embedder") + table[label]
    depth = len({k.split(".")[2] for k in s if k.startswith("model.blocks.")})
    d = h.shape[-1]
    for i in range(depth):
        b = f"model.blocks.{i}."
        sh1, sc1, g1, sh2, sc2, g2 = lin(F.silu(c), b + "adaLN_modulation.1").chunk(6, dim=-1)
        a = norm(h) * (1 + sc1[:, None]) + sh1[:, None]
        q, k, v = lin(a, b + "attn.qkv").reshape(n, -1, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d // heads), dim=-1) @ v
        h = h + g1[:, None] * lin(att.transpose(1, 2).reshape(n, -1, d), b + "attn.proj")
        m = norm(h) * (1 + sc2[:, None]) + sh2[:, None]
        h = h + g2[:, None] * lin(F.gelu(lin(m, b + "mlp.fc1"), approximate="tanh"), b + "mlp.fc2")
    shift, scale = lin(F.silu(c), "model.final_layer.adaLN_modulation.1").chunk(2, dim=-1)
    out = lin(norm(h) * (1 + scale[:, None]) + shift[:, None], "model.final_layer.linear")
    grid, ch = int(out.shape[1] ** 0.5), x.shape[1]
    out = out.reshape(n, grid, grid, patch, patch, ch)
    return torch.einsum("nhwpqc->nchpwq", out).reshape(n, ch, grid * patch, grid * patch)


def compare_with_official(snap, state, preset, heads, label_rows):
    net = build_model(preset, num_classes=1000, input_size=32, in_channels=4)
    net.load_state_dict(state, strict=True)
    net.eval()
    g = torch.Generator().manual_seed(5)
    z = torch.randn(3, 4, 32, 32, generator=g)
    t = torch.tensor([0.9, 0.5, 0.3])
    r = torch.tensor([0.2, 0.5, 0.0])
    y = torch.tensor([7, 999, 1000 if label_rows > 1000 else 3])  # 1000 = null class where the table has one
    onehot = torch.zeros(3, 1000)
    for i, label in enumerate(y.tolist()):
        if label < 1000:
            onehot[i, label] = 1
    with torch.no_grad():
        ours = net(z, r, t, y)
        theirs = official_forward(snap, z, t, t - r, onehot, heads)
    assert ours.abs().mean() > 0.05  # a real output, not the zero-initialised one
    # Equal up to float32 rounding (the explicit softmax here vs the fused attention kernel): relative L2 error
    # 3e-5 measured for the 12-block B/2, whose outputs reach |u| ≈ 30 with these weights.
    assert ((ours - theirs).norm() / theirs.norm()).item() < 1e-4
    assert (ours - theirs).abs().max() < 1e-4 * theirs.abs().max() * 10
    return net


# ----------------------------------------------------------------------------


@pytest.mark.parametrize("rows", [1000, 1001])
def test_small_snapshot_matches_the_official_forward(tmp_path, rows):
    path = tmp_path / "alphaflow-T-2.pt"
    snap = write_snapshot(path, depth=4, hidden=128, rows=rows)
    for weights, key in (("ema", "ema"), ("raw", "net")):
        state = load_official_snapshot(path, weights)
        assert official_preset(state) == "T/2"
        assert state["y_embedder.table.weight"].shape == (1001, 128)
        if rows == 1000:  # the unused null row is added, zero
            assert torch.equal(state["y_embedder.table.weight"][1000], torch.zeros(128))
        compare_with_official(snap[key], state, "T/2", heads=4, label_rows=rows)
    ema, raw = load_official_snapshot(path, "ema"), load_official_snapshot(path, "raw")
    assert not torch.equal(ema["blocks.0.attn.qkv.weight"], raw["blocks.0.attn.qkv.weight"])


def test_full_b2_snapshot_loads_strictly_and_matches(tmp_path):
    path = tmp_path / "alphaflow-B-2.pt"
    snap = write_snapshot(path, depth=12, hidden=768, rows=1000, extra={"vis": {}, "ddp_consistency_checks": {}})
    net, preset = build_official_model(path, "ema")
    assert preset == "B/2" and sum(p.numel() for p in net.parameters()) > 130e6
    compare_with_official(snap["ema"], net.state_dict(), "B/2", heads=12, label_rows=1000)


def test_latent_statistics(tmp_path):
    path = tmp_path / "s.pt"
    snap = write_snapshot(path, depth=4, hidden=128)
    state = load_official_snapshot(path)
    mean, var = snap["ema"]["autoencoder_mean"], snap["ema"]["autoencoder_var"]
    assert state["latent_mean"].dtype == torch.float32 and state["latent_mean"].shape == (1, 4, 32, 32)
    torch.testing.assert_close(state["latent_mean"], mean.float())
    torch.testing.assert_close(state["latent_std"], (var + 1e-16).sqrt().float())


def test_numpy_statistics_are_data_and_load(tmp_path):
    path = tmp_path / "s.pt"
    write_snapshot(path, depth=4, hidden=128, extra={"stats": {"loss": np.float64(0.25), "hist": np.arange(3)}})
    assert official_preset(load_official_snapshot(path)) == "T/2"


class RunsCode:
    """Unpickling this would create `marker` (an `open(marker, "w")`), i.e. run code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_a_file_that_would_run_code_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    write_snapshot(path, depth=4, hidden=128, extra={"cfg": RunsCode(marker)})
    with pytest.raises(OfficialCheckpointError, match=r"refused, nothing in it was run.*(io|builtins)\.open"):
        load_official_snapshot(path)
    assert not marker.exists()
    with open(tmp_path / "plain.pkl", "wb") as f:  # a bare pickle, not even a torch file
        pickle.dump({"ema": RunsCode(marker)}, f)
    with pytest.raises(OfficialCheckpointError):
        load_official_snapshot(tmp_path / "plain.pkl")
    assert not marker.exists()


def test_unknown_shapes_and_wrong_files_are_clear_errors(tmp_path):
    path = tmp_path / "odd.pt"
    write_snapshot(path, depth=5, hidden=128)
    with pytest.raises(OfficialCheckpointError, match=r"odd\.pt: a DiT with hidden size 128, 5 blocks and patch 2"):
        load_official_snapshot(path)
    torch.save({"ema": {"weight": torch.zeros(3)}}, tmp_path / "other.pt")
    with pytest.raises(OfficialCheckpointError, match="not an α-Flow DiT snapshot"):
        load_official_snapshot(tmp_path / "other.pt")
    torch.save({"net": {}}, tmp_path / "noema.pt")
    with pytest.raises(OfficialCheckpointError, match="no 'ema' state dict"):
        load_official_snapshot(tmp_path / "noema.pt")
    with pytest.raises(Exception, match="no such file"):
        load_official_snapshot(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="weights must be one of"):
        load_official_snapshot(path, "best")


# ----------------------------------------------------------------------------
# The VAE.

SMALL_VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=[32, 32],
    layers_per_block=1,
    norm_num_groups=8,
    down_block_types=["DownEncoderBlock2D"] * 2,
    up_block_types=["UpDecoderBlock2D"] * 2,
    sample_size=16,
)


@pytest.mark.parametrize("layout", ["model-snapshot", "sd_vae_ft_ema.pt"])
def test_vae_from_official_prefix_decodes_like_the_module(tmp_path, layout):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(**SMALL_VAE).eval()
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(torch.randn_like(p) * 0.02)  # not the init: every weight is checked
    prefix = "autoencoder.model.model." if layout == "model-snapshot" else "model.model."
    state = {prefix + k: v for k, v in vae.state_dict().items()}
    torch.save({"ema": state, "cfg": {}}, tmp_path / "vae.pt")
    loaded = load_official_vae(tmp_path / "vae.pt", config=SMALL_VAE)
    z = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded.decode(z).sample, vae.decode(z).sample, rtol=0, atol=0)


def test_the_packaged_sd_vae_config_builds_the_sd_vae_shape():
    from diffusers import AutoencoderKL

    config = sd_vae_config()
    vae = AutoencoderKL.from_config(config)
    assert config["latent_channels"] == 4 and 2 ** (len(config["block_out_channels"]) - 1) == 8
    assert abs(sum(p.numel() for p in vae.parameters()) / 1e6 - 83.65) < 0.1  # SD-VAE: 83.65M parameters


def test_the_sd_vae_official_encoder_decodes_with_the_released_file(tmp_path, monkeypatch):
    """encoder.kind sd-vae-official: the full SD-VAE shape from the packaged config, weights from the file."""
    from diffusers import AutoencoderKL

    from alphaflow.data import build_encoder
    from alphaflow.data.encoders import to_uint8

    torch.manual_seed(0)
    vae = AutoencoderKL.from_config(sd_vae_config()).eval()
    torch.save({"ema": {"model.model." + k: v for k, v in vae.state_dict().items()}}, tmp_path / "sd_vae_ft_ema.pt")
    monkeypatch.setenv("ALPHAFLOW_RELEASED", str(tmp_path))
    encoder = build_encoder("sd-vae-official")  # path null: sd_vae_ft_ema.pt in $ALPHAFLOW_RELEASED
    assert encoder.fingerprint.startswith("sd-vae-ft-ema:official:")
    assert encoder.latent_shape((3, 256, 256)) == (4, 32, 32)
    z = torch.randn(1, 4, 4, 4)
    with torch.no_grad():
        expected = to_uint8(vae.decode(z).sample)
    assert torch.equal(encoder.decode(z), expected)
    monkeypatch.setenv("ALPHAFLOW_RELEASED", str(tmp_path / "elsewhere"))
    with pytest.raises(Exception, match="sd_vae_ft_ema.pt"):
        build_encoder("sd-vae-official")
