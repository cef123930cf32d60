"""DiT presets (torch-free, so the Snakefile can read model shapes without importing torch)."""

# DiT configs: name -> (depth, hidden_size, num_heads, patch_size)

# fmt: off
PRESETS = {
    # Paper scales (paper Table 3; M/2 and L/2 use MeanFlow's sizes).
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
    "N/7": dict(depth=3, hidden_size=96, num_heads=3, patch_size=7),   # 16 tokens: the CPU decisive test
}
# fmt: on


def state_shapes(state):
    """(hidden size, depth, patch size) of a DiT state dict (this project's key names)."""
    hidden, _, patch, _ = state["x_embedder.proj.weight"].shape
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    return hidden, depth, patch


def preset_of(state):
    """The first preset whose (hidden size, depth, patch size) a DiT state dict has, or None."""
    shapes = state_shapes(state)
    return next((n for n, p in PRESETS.items() if (p["hidden_size"], p["depth"], p["patch_size"]) == shapes), None)
