"""DiT backbone with (t, t − r) conditioning, as used by MeanFlow and α-Flow (the paper uses MeanFlow's DiT unchanged).

References:
  DiT   — Peebles & Xie, "Scalable Diffusion Models with Transformers" (adaLN-Zero blocks).
  α-Flow — Zhang et al., arXiv 2510.20771 (two timestep embedders on raw t and t − r in [0, 1]).

The network is u_θ(z_t, r, t | y): the average velocity over [r, t]. It receives t and t − r; the
conversion happens inside `forward`, so a JVP taken with respect to (z, t) with r held fixed is the
total derivative d/dt of paper Eq. 5 (docs/architecture.md, "The JVP tangent pass").
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Attention, Mlp, PatchEmbed

from alphaflow.models import jvp
from alphaflow.presets import PRESETS

# ----------------------------------------------------------------------------
# Embedding layers


class TimestepEmbedder(nn.Module):
    """Embeds a scalar time in [0, 1] (raw, no ×1000) into a D-dim vector."""

    def __init__(self, hidden_size, frequency_size=256, max_period=10000):
        super().__init__()
        self.frequency_size = frequency_size
        self.max_period = max_period
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def frequency_args(self, t):
        # Arguments t·f_k of the sinusoidal features, in fp32 at least (fp64 kept): (N, frequency_size / 2).
        half = self.frequency_size // 2
        dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
        freqs = torch.exp(-math.log(self.max_period) * torch.arange(half, device=t.device, dtype=dtype) / half)
        return t[:, None].to(dtype) * freqs[None], freqs

    def frequency_embedding(self, t):
        # Sinusoidal features, cos first then sin (official code: src/training/dit.py).
        args, _ = self.frequency_args(t)
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (N, frequency_size)

    def forward(self, t):
        emb = self.frequency_embedding(t)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))

    @torch.no_grad()
    def tangent(self, t, dt):
        """The tangent of forward(t) along ṫ = dt (rules in jvp.py)."""
        args, freqs = self.frequency_args(t)
        demb = jvp.sinusoid(args, dt[:, None].to(args.dtype) * freqs[None])
        dtype = self.mlp[0].weight.dtype
        h = self.mlp[0](self.frequency_embedding(t).to(dtype))
        return jvp.linear(self.mlp[2], jvp.silu(h, jvp.linear(self.mlp[0], demb.to(dtype))))


class LabelEmbedder(nn.Module):
    """Class-label table with num_classes + 1 rows; the last row is the null (unconditional) class."""

    def __init__(self, num_classes, hidden_size):
        super().__init__()
        self.num_classes = num_classes
        self.table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, y):
        return self.table(y)


def sincos_2d_pos_embed(dim, grid_size):
    """Fixed 2D sin-cos position embedding (MAE/DiT style): (grid_size², dim)."""
    assert dim % 4 == 0, f"hidden size {dim} must be divisible by 4 for 2D sin-cos positions"
    coords = torch.arange(grid_size, dtype=torch.float64)
    grid_w, grid_h = torch.meshgrid(coords, coords, indexing="xy")  # w varies fastest, as in DiT

    def embed_1d(pos):
        omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
        out = pos.reshape(-1)[:, None] * omega[None]  # (M, dim/4)
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)  # (M, dim/2)

    return torch.cat([embed_1d(grid_w), embed_1d(grid_h)], dim=1).float()  # (M, dim)


# ----------------------------------------------------------------------------
# Core DiT model


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def layer_norm_fp32(x):
    # Pre-LayerNorm without affine, eps 1e-6, computed in fp32 even under autocast (official code).
    xf = x if x.dtype == torch.float64 else x.float()
    return F.layer_norm(xf, x.shape[-1:], eps=1e-6).to(x.dtype)


def rows_of(a, rows):
    """The tangent's rows of a primal activation, detached (a view when rows is a slice)."""
    return a.detach()[rows]


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning.

    forward(x, c, tan) also carries a tangent tan = (rows, ẋ, ċ) through the block when one is given: each
    primal line below has its forward-mode twin in the no_grad section (rules in jvp.py).
    """

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True)  # qk_norm off, as the official SiT
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), act_layer=lambda: nn.GELU(approximate="tanh"))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def heads(self, qkv):
        # (N, T, 3·D) → q, k, v each (N, heads, T, D / heads), timm's layout.
        n, tokens, _ = qkv.shape
        return qkv.reshape(n, tokens, 3, self.attn.num_heads, self.attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)

    def forward(self, x, c, tan=None):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        xn = layer_norm_fp32(x)
        q, k, v = self.heads(self.attn.qkv(modulate(xn, shift_msa, scale_msa)))
        o = F.scaled_dot_product_attention(q, k, v)  # the fused kernels (timm's Attention, step by step)
        a = self.attn.proj(o.transpose(1, 2).flatten(2))
        x1 = x + gate_msa.unsqueeze(1) * a
        xn1 = layer_norm_fp32(x1)
        f = self.mlp.fc1(modulate(xn1, shift_mlp, scale_mlp))
        m = self.mlp.fc2(self.mlp.act(f))
        x2 = x1 + gate_mlp.unsqueeze(1) * m
        if tan is None:
            return x2, None
        with torch.no_grad():
            rows, dx, dc = tan
            at = lambda a: rows_of(a, rows)
            dshift_msa, dscale_msa, dgate_msa, dshift_mlp, dscale_mlp, dgate_mlp = jvp.linear(
                self.adaLN_modulation[1], jvp.silu(at(c), dc)
            ).chunk(6, dim=1)
            dh = jvp.modulate(at(xn), jvp.layer_norm(at(x), dx), at(scale_msa), dshift_msa, dscale_msa)
            dq, dk, dv = self.heads(jvp.linear(self.attn.qkv, dh))
            do = jvp.attention(at(q), at(k), at(v), dq, dk, dv)
            da = jvp.linear(self.attn.proj, do.transpose(1, 2).flatten(2))
            dx1 = dx + jvp.gated(at(gate_msa), dgate_msa, at(a), da)
            dh1 = jvp.modulate(at(xn1), jvp.layer_norm(at(x1), dx1), at(scale_mlp), dshift_mlp, dscale_mlp)
            dm = jvp.linear(self.mlp.fc2, jvp.gelu_tanh(at(f), jvp.linear(self.mlp.fc1, dh1)))
            dx2 = dx1 + jvp.gated(at(gate_mlp), dgate_mlp, at(m), dm)
        return x2, (rows, dx2, dc)


class FinalLayer(nn.Module):
    """LayerNorm + adaLN (shift, scale) + Linear to patch pixels (carries a tangent like DiTBlock)."""

    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x, c, tan=None):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        xn = layer_norm_fp32(x)
        out = self.linear(modulate(xn, shift, scale))
        if tan is None:
            return out, None
        with torch.no_grad():
            rows, dx, dc = tan
            dshift, dscale = jvp.linear(self.adaLN_modulation[1], jvp.silu(rows_of(c, rows), dc)).chunk(2, dim=1)
            dh = jvp.modulate(
                rows_of(xn, rows), jvp.layer_norm(rows_of(x, rows), dx), rows_of(scale, rows), dshift, dscale
            )
            dout = jvp.linear(self.linear, dh)
        return out, (rows, dout, dc)


class DiT(nn.Module):
    """u_θ(z, r, t | y): DiT over latent patches, conditioned on t, t − r and the class label."""

    supports_tangent = True  # forward(..., tangent=...) exists: alpha_flow_loss's jvp_mode="tangent"

    def __init__(
        self,
        input_size=32,      # latent spatial size (32 for 256² SD-VAE latents)
        patch_size=2,       # p: tokens = (input_size / p)²
        in_channels=4,      # latent channels (4 for SD-VAE, 1 or 3 in pixel space)
        hidden_size=1152,   # D
        depth=28,           # number of DiT blocks
        num_heads=16,       # attention heads
        mlp_ratio=4.0,      # MLP hidden = mlp_ratio · D
        num_classes=1000,   # label table has num_classes + 1 rows (last = null class)
    ):  # fmt: skip
        super().__init__()
        if input_size % patch_size != 0:
            raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        self.in_channels = in_channels
        self.out_channels = in_channels
        self.patch_size = patch_size
        self.num_classes = num_classes
        self.null_label = num_classes

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True)
        # fmt: off
        self.t_embedder = TimestepEmbedder(hidden_size)       # embeds t
        self.dt_embedder = TimestepEmbedder(hidden_size)      # embeds t − r
        # fmt: on
        self.y_embedder = LabelEmbedder(num_classes, hidden_size)
        grid = input_size // patch_size
        self.register_buffer("pos_embed", sincos_2d_pos_embed(hidden_size, grid)[None], persistent=False)
        # Per-element latent statistics (as the official code), estimated by the trainer and saved with the weights.
        self.register_buffer("latent_mean", torch.zeros(1, in_channels, input_size, input_size))
        self.register_buffer("latent_std", torch.ones(1, in_channels, input_size, input_size))
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self):
        # Xavier-uniform on every Linear, bias 0.
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(_basic_init)
        # Patch embedding: Xavier on the flattened conv weight, bias 0.
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        # Label table and time MLPs: N(0, 0.02).
        nn.init.normal_(self.y_embedder.table.weight, std=0.02)
        for emb in (self.t_embedder, self.dt_embedder):
            nn.init.normal_(emb.mlp[0].weight, std=0.02)
            nn.init.normal_(emb.mlp[2].weight, std=0.02)
        # Zero-out adaLN modulation: every block starts as the identity.
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        # Zero-out the output layer: u_θ ≡ 0 at init.
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def normalize(self, z):
        """Encoder latents → the network's data space: (z − μ) / σ per element."""
        return (z - self.latent_mean) / self.latent_std

    def denormalize(self, x):
        return x * self.latent_std.to(x.dtype) + self.latent_mean.to(x.dtype)

    def unpatchify(self, x):
        c, p = self.out_channels, self.patch_size
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)  # (N, C, H, W)

    def forward(self, z, r, t, y, tangent=None):
        """z: (N, C, H, W); r, t: (N,) with r ≤ t; y: (N,) int labels (null_label = unconditional).

        tangent: None, or (rows, ż, ṫ) — a JVP direction (ż, ṙ = 0, ṫ) for the samples `rows` (index tensor
        or slice), ż (n, C, H, W), ṫ (n,). Then returns (u, u̇): u with its gradient as usual, and
        u̇ = ∂_z u · ż + ∂_t u · ṫ on those rows, computed under no_grad from the primal's activations in the
        same pass. MeanFlow's du/dt is ż = ṽ, ṫ = 1 (paper Eq. 5). Without tangent, returns u.
        """
        x = self.x_embedder(z) + self.pos_embed.to(z.dtype)  # (N, T, D)
        c = self.t_embedder(t) + self.dt_embedder(t - r) + self.y_embedder(y)  # (N, D)
        c = c.to(x.dtype)
        tan = None
        if tangent is not None:
            rows, dz, dt = tangent
            with torch.no_grad():  # ṙ = 0: d(t − r) = ṫ; the labels and positions have no tangent
                t_rows = rows_of(t, rows)
                dc = self.t_embedder.tangent(t_rows, dt) + self.dt_embedder.tangent(t_rows - rows_of(r, rows), dt)
                tan = (rows, jvp.patch_embed(self.x_embedder, dz).to(x.dtype), dc.to(x.dtype))
        for block in self.blocks:
            x, tan = block(x, c, tan)  # (N, T, D)
        x, tan = self.final_layer(x, c, tan)  # (N, T, p²·C)
        u = self.unpatchify(x)  # (N, C, H, W)
        return u if tangent is None else (u, self.unpatchify(tan[1]))


def build_model(name, *, num_classes=1000, input_size=32, in_channels=4, **overrides):
    """Builds a DiT preset; overrides (depth, hidden_size, num_heads, patch_size, mlp_ratio) win."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; allowed: {sorted(PRESETS)}")
    kwargs = {**PRESETS[name], **overrides}
    return DiT(input_size=input_size, in_channels=in_channels, num_classes=num_classes, **kwargs)
