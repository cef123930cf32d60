"""uint8 image tensors ↔ PNG grids (sample grids for MLflow, the report and the README)."""

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from alphaflow.io import atomic_write_bytes


def make_grid(images, nrow, pad=2):
    """uint8 [N, C, H, W] → uint8 [H', W', 3] grid with `nrow` images per row."""
    images = torch.as_tensor(images)
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    n, c, h, w = images.shape
    rows = (n + nrow - 1) // nrow
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i, img in enumerate(images.permute(0, 2, 3, 1).cpu().numpy()):
        r, col = divmod(i, nrow)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + col * (w + pad) : pad + col * (w + pad) + w] = img
    return grid


def save_grid(images, path, nrow, scale=1):
    """Writes a PNG grid atomically; `scale` upsamples small images (nearest) for legibility."""
    img = Image.fromarray(make_grid(images, nrow))
    if scale != 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    atomic_write_bytes(Path(path), buf.getvalue())
    return Path(path)
