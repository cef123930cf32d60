import pytest
import torch

from alphaflow.models import PRESETS, build_model

PAPER_SIZES = {"B/2": 131e6, "M/2": 308e6, "L/2": 459e6, "XL/2": 676e6}  # paper Table 3 / MeanFlow Table 4


@pytest.mark.parametrize("name", sorted(PAPER_SIZES))
def test_parameter_counts_match_paper(name):
    with torch.device("meta"):
        net = build_model(name)
    n = sum(p.numel() for p in net.parameters())
    assert abs(n - PAPER_SIZES[name]) / PAPER_SIZES[name] < 0.005, n


def test_output_is_zero_at_init_and_shapes():
    net = build_model("T/4", num_classes=10, input_size=28, in_channels=1)
    z = torch.randn(3, 1, 28, 28)
    t = torch.rand(3)
    u = net(z, t * 0.5, t, torch.tensor([0, 5, 10]))
    assert u.shape == z.shape
    assert torch.count_nonzero(u) == 0


def test_label_table_has_null_row_last():
    net = build_model("T/2", num_classes=7, input_size=8, in_channels=2)
    assert net.y_embedder.table.num_embeddings == 8
    assert net.null_label == 7
    with pytest.raises(IndexError):
        net.y_embedder(torch.tensor([8]))


def test_conditioning_on_t_and_t_minus_r(tiny_net64):
    """The net sees (t, t − r): shifting r changes u, and u depends on the null label."""
    z = torch.randn(2, 2, 8, 8, dtype=torch.float64)
    t = torch.tensor([0.7, 0.4], dtype=torch.float64)
    y = torch.tensor([0, 1])
    a = tiny_net64(z, t * 0.5, t, y)
    b = tiny_net64(z, t * 0.2, t, y)
    c = tiny_net64(z, t * 0.5, t, torch.full_like(y, 3))
    assert not torch.allclose(a, b) and not torch.allclose(a, c)


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(ValueError, match="allowed"):
        build_model("Z/9")
    assert "XL/2" in PRESETS


def test_timm_blocks_and_init_rules():
    net = build_model("T/2", num_classes=4, input_size=8, in_channels=2)
    for block in net.blocks:
        assert torch.count_nonzero(block.adaLN_modulation[-1].weight) == 0
    assert abs(float(net.y_embedder.table.weight.std()) - 0.02) < 0.01
    # Fixed sin-cos positions, not a parameter.
    assert "pos_embed" not in dict(net.named_parameters())
