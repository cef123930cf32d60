"""DiT backbone with (t, t − r) conditioning, as used by MeanFlow and α-Flow (paper.md §5.1).

References:
  DiT   — Peebles & Xie, "Scalable Diffusion Models with Transformers" (adaLN-Zero blocks).
  α-Flow — Zhang et al., arXiv 2510.20771 (two timestep embedders on raw t and t − r in [0, 1]).

The network is u_θ(z_t, r, t | y): the average velocity over [r, t]. It receives t and t − r; the
conversion happens inside `forward`, so a JVP taken with respect to (z, t) with r held fixed is the
total derivative d/dt of paper Eq. 5 (paper.md §10.2, gotcha 1).
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Attention, Mlp, PatchEmbed

#----------------------------------------------------------------------------
# Embedding layers


class TimestepEmbedder(nn.Module):
    """Embeds a scalar time in [0, 1] (raw, no ×1000) into a D-dim vector."""

    def __init__(self, hidden_size, frequency_size=256, max_period=10000):
        super().__init__()
        self.frequency_size = frequency_size
        self.max_period = max_period
        self.mlp = nn.Sequential(
            nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    def frequency_embedding(self, t):
        # Sinusoidal features, cos first then sin (paper.md §5.1).
        half = self.frequency_size // 2
        dtype = torch.float64 if t.dtype == torch.float64 else torch.float32  # fp32 at least, fp64 kept
        freqs = torch.exp(-math.log(self.max_period) * torch.arange(half, device=t.device, dtype=dtype) / half)
        args = t[:, None].to(dtype) * freqs[None]  # (N, half)
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (N, frequency_size)

    def forward(self, t):
        emb = self.frequency_embedding(t)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


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


#----------------------------------------------------------------------------
# Core DiT model


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def layer_norm_fp32(x):
    # Pre-LayerNorm without affine, eps 1e-6, computed in fp32 even under autocast (paper.md §5.1).
    xf = x if x.dtype == torch.float64 else x.float()
    return F.layer_norm(xf, x.shape[-1:], eps=1e-6).to(x.dtype)


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True)  # qk_norm off, as the official SiT
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), act_layer=lambda: nn.GELU(approximate="tanh"))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(layer_norm_fp32(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(layer_norm_fp32(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """LayerNorm + adaLN (shift, scale) + Linear to patch pixels."""

    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(layer_norm_fp32(x), shift, scale))


class DiT(nn.Module):
    """u_θ(z, r, t | y): DiT over latent patches, conditioned on t, t − r and the class label."""

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
    ):
        super().__init__()
        if input_size % patch_size != 0:
            raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        self.in_channels = in_channels
        self.out_channels = in_channels
        self.patch_size = patch_size
        self.num_classes = num_classes
        self.null_label = num_classes

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True)
        self.t_embedder = TimestepEmbedder(hidden_size)       # embeds t
        self.dt_embedder = TimestepEmbedder(hidden_size)      # embeds t − r
        self.y_embedder = LabelEmbedder(num_classes, hidden_size)
        grid = input_size // patch_size
        self.register_buffer("pos_embed", sincos_2d_pos_embed(hidden_size, grid)[None], persistent=False)
        # Per-element latent statistics (paper.md §5.3), estimated by the trainer and saved with the weights.
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

    def forward(self, z, r, t, y):
        """z: (N, C, H, W); r, t: (N,) with r ≤ t; y: (N,) int labels (null_label = unconditional)."""
        x = self.x_embedder(z) + self.pos_embed.to(z.dtype)  # (N, T, D)
        c = self.t_embedder(t) + self.dt_embedder(t - r) + self.y_embedder(y)  # (N, D)
        c = c.to(x.dtype)
        for block in self.blocks:
            x = block(x, c)  # (N, T, D)
        x = self.final_layer(x, c)  # (N, T, p²·C)
        return self.unpatchify(x)  # (N, C, H, W)


#----------------------------------------------------------------------------
# DiT configs: name -> (depth, hidden_size, num_heads, patch_size)

PRESETS = {
    # Paper scales (paper.md §5.2; M/2 and L/2 use MeanFlow's sizes).
    "XL/2": dict(depth=28, hidden_size=1152, num_heads=16, patch_size=2),  # ≈ 676M
    "L/2": dict(depth=24, hidden_size=1024, num_heads=16, patch_size=2),   # ≈ 459M
    "M/2": dict(depth=16, hidden_size=1024, num_heads=16, patch_size=2),   # ≈ 308M
    "B/2": dict(depth=12, hidden_size=768, num_heads=12, patch_size=2),    # ≈ 131M
    "B/4": dict(depth=12, hidden_size=768, num_heads=12, patch_size=4),
    "S/2": dict(depth=12, hidden_size=384, num_heads=6, patch_size=2),
    # CPU demo scales (pixel-space 28×28 Fashion-MNIST with patch 4 → 49 tokens).
    "XS/4": dict(depth=6, hidden_size=192, num_heads=6, patch_size=4),
    "XS/2": dict(depth=6, hidden_size=192, num_heads=6, patch_size=2),
    "T/4": dict(depth=4, hidden_size=128, num_heads=4, patch_size=4),
    "T/2": dict(depth=4, hidden_size=128, num_heads=4, patch_size=2),
    "N/4": dict(depth=3, hidden_size=96, num_heads=3, patch_size=4),
}


def build_model(name, *, num_classes=1000, input_size=32, in_channels=4, **overrides):
    """Builds a DiT preset; overrides (depth, hidden_size, num_heads, patch_size, mlp_ratio) win."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; allowed: {sorted(PRESETS)}")
    kwargs = {**PRESETS[name], **overrides}
    return DiT(input_size=input_size, in_channels=in_channels, num_classes=num_classes, **kwargs)
