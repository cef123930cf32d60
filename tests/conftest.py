import os

import pytest
import torch

# Deterministic, CPU-friendly defaults for every test.
torch.set_num_threads(min(2, os.cpu_count() or 1))


def randomized(net, std=0.05, seed=0):
    """Gives a zero-initialised DiT non-trivial outputs (adaLN and output layers are zero at init)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(std * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return net


@pytest.fixture
def tiny_net64():
    from alphaflow.models import build_model

    net = build_model("T/2", num_classes=3, input_size=8, in_channels=2, depth=2, hidden_size=32, num_heads=2)
    return randomized(net.double())
