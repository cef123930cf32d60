"""The DiT's forward-with-tangent pass (models/jvp.py) against torch.func.jvp."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from alphaflow.models import PRESETS, build_model
from alphaflow.models import jvp
from alphaflow.objectives import alpha_flow_loss, contiguous, drop_labels, sample_times
from helpers import randomized  # non-zero adaLN-Zero and output layers: every tangent rule contributes

f64 = torch.float64


def reference_dudt(net, z, r, t, y, dz, dt):
    """torch.func.jvp along (ż, 0, ṫ), on the math attention path (no forward AD for fused SDPA)."""
    with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]):
        return torch.func.jvp(lambda zz, tt: net(zz, r, tt, y), (z, t), (dz, dt))


def rel(a, b):
    return float((a - b).detach().norm() / b.norm())


def preset_net(name, depth=2):
    """The preset's width, heads and patch (the per-layer shapes) on its real input, two blocks deep."""
    latent = name.endswith("/2") and name not in ("T/2", "XS/2")
    size, channels, classes = (32, 4, 1000) if latent else (28, 1, 10)
    net = build_model(name, num_classes=classes, input_size=size, in_channels=channels, depth=depth)
    return randomized(net.double()), size, channels, classes


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_tangent_pass_equals_torch_func_jvp_for_every_preset(name):
    net, size, channels, classes = preset_net(name)
    g = torch.Generator().manual_seed(1)
    n = 3
    z = torch.randn(n, channels, size, size, generator=g, dtype=f64)
    dz = torch.randn(z.shape, generator=g, dtype=f64)
    t = torch.rand(n, generator=g, dtype=f64)
    r = t * torch.rand(n, generator=g, dtype=f64)
    y = torch.tensor([0, classes - 1, classes])  # the last is the null label
    u, du = net(z, r, t, y, tangent=(slice(0, n), dz, torch.ones(n, dtype=f64)))
    u_ref, du_ref = reference_dudt(net, z, r, t, y, dz, torch.ones(n, dtype=f64))
    assert u.requires_grad and not du.requires_grad
    assert rel(u, u_ref) <= 1e-10 and rel(du, du_ref) <= 1e-10, (rel(u, u_ref), rel(du, du_ref))


def test_tangent_rows_and_general_direction(tiny_net64):
    """An index subset and a per-row ṫ ≠ 1: the rows' u̇ equals the JVP of those samples alone."""
    g = torch.Generator().manual_seed(2)
    z = torch.randn(5, 2, 8, 8, generator=g, dtype=f64)
    t = torch.rand(5, generator=g, dtype=f64)
    r = t * torch.rand(5, generator=g, dtype=f64)
    y = torch.randint(0, 4, (5,), generator=g)
    rows = torch.tensor([0, 2, 3])
    dz = torch.randn(3, 2, 8, 8, generator=g, dtype=f64)
    dt = torch.tensor([1.0, -0.5, 2.0], dtype=f64)
    u, du = tiny_net64(z, r, t, y, tangent=(rows, dz, dt))
    torch.testing.assert_close(u, tiny_net64(z, r, t, y), rtol=0, atol=0)
    _, du_ref = reference_dudt(tiny_net64, z[rows], r[rows], t[rows], y[rows], dz, dt)
    assert rel(du, du_ref) <= 1e-10


def test_layer_rules_against_torch_func_jvp():
    """Each rule of jvp.py on its own, float64."""
    g = torch.Generator().manual_seed(3)
    x, dx = (torch.randn(2, 5, 16, generator=g, dtype=f64) for _ in range(2))
    ref = lambda f: torch.func.jvp(f, (x,), (dx,))[1]
    torch.testing.assert_close(jvp.silu(x, dx), ref(torch.nn.functional.silu))
    torch.testing.assert_close(jvp.gelu_tanh(x, dx), ref(lambda a: torch.nn.functional.gelu(a, approximate="tanh")))
    torch.testing.assert_close(jvp.layer_norm(x, dx), ref(lambda a: torch.nn.functional.layer_norm(a, (16,), eps=1e-6)))
    q, k, v, dq, dk, dv = (torch.randn(2, 3, 7, 4, generator=g, dtype=f64) for _ in range(6))
    with sdpa_kernel([SDPBackend.MATH]):
        _, do_ref = torch.func.jvp(torch.nn.functional.scaled_dot_product_attention, (q, k, v), (dq, dk, dv))
    torch.testing.assert_close(jvp.attention(q, k, v, dq, dk, dv), do_ref)


def test_contiguous_rows():
    assert contiguous(torch.tensor([3, 4, 5])) == slice(3, 6)
    idx = torch.tensor([1, 3])
    assert contiguous(idx) is idx


def guided_batch(n=8, fm_ratio=0.25, seed=0, classes=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, 8, 8, generator=g, dtype=f64)
    noise = torch.randn(n, 2, 8, 8, generator=g, dtype=f64)
    t, r = sample_times(n, fm_ratio, generator=g)
    t, r = t.to(f64), r.to(f64)
    y = drop_labels(torch.randint(0, classes, (n,), generator=g), t, 0.3, classes, (0.1, 0.9), generator=g)
    return x, y, t, r, noise


def step_grads(net, loss):
    net.zero_grad()
    loss.mean().backward()
    return torch.cat([p.grad.reshape(-1).clone() for p in net.parameters() if p.grad is not None])


@pytest.mark.parametrize("alpha", [1.0, 0.5, 0.01, 0.0])
@pytest.mark.parametrize("shift", ["velocity", "shortcut"])
def test_whole_step_equals_the_torch_func_jvp_path(tiny_net64, alpha, shift):
    """Loss and gradients of one step, with CFG teachers and label dropout, across the α curriculum."""
    x, y, t, r, noise = guided_batch()
    cfg = dict(omega=0.4, kappa=0.3, cfg_interval=(0.1, 0.9), null_label=3, shift=shift)
    ref = alpha_flow_loss(tiny_net64, x, y, t, r, noise, alpha, jvp_mode="split", **cfg)
    g_ref = step_grads(tiny_net64, ref.loss)
    new = alpha_flow_loss(tiny_net64, x, y, t, r, noise, alpha, jvp_mode="tangent", **cfg)
    g_new = step_grads(tiny_net64, new.loss)
    torch.testing.assert_close(new.loss, ref.loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(new.tc, ref.tc, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_new, g_ref, rtol=1e-10, atol=1e-12)


def test_shuffled_rows_take_the_index_path(tiny_net64):
    """r ≠ t rows that are not one slice (a shuffled batch) give the same loss as the slice."""
    x, y, t, r, noise = guided_batch(fm_ratio=0.5)
    perm = torch.tensor([4, 0, 5, 1, 6, 2, 7, 3])
    a = alpha_flow_loss(tiny_net64, x, y, t, r, noise, 0.0)
    b = alpha_flow_loss(tiny_net64, x[perm], y[perm], t[perm], r[perm], noise[perm], 0.0)
    torch.testing.assert_close(b.loss, a.loss[perm], rtol=1e-12, atol=1e-14)


def test_nets_without_a_tangent_pass_fall_back_to_torch_func_jvp():
    class Plain(torch.nn.Module):  # u = w·z + (t − r), no `supports_tangent`
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor(0.7, dtype=f64))

        def forward(self, z, r, t, y):
            return self.w * z + (t - r)[:, None, None, None]

    x, y, t, r, noise = guided_batch(fm_ratio=0.5)
    net = Plain()
    a = alpha_flow_loss(net, x, y, t, r, noise, 0.0)
    b = alpha_flow_loss(net, x, y, t, r, noise, 0.0, jvp_mode="split")
    torch.testing.assert_close(a.loss, b.loss)


def test_bf16_autocast_tangent_is_close_to_fp32():
    """Under bf16 autocast the tangent pass runs (torch.func.jvp's fused path did not) and stays within
    bf16 accuracy of the fp32 JVP."""
    net = randomized(build_model("T/4", num_classes=10, input_size=28, in_channels=1), std=0.02)
    g = torch.Generator().manual_seed(4)
    z, dz = (torch.randn(4, 1, 28, 28, generator=g) for _ in range(2))
    t = torch.rand(4, generator=g)
    r = t * torch.rand(4, generator=g)
    y = torch.randint(0, 10, (4,), generator=g)
    _, du_ref = reference_dudt(net, z, r, t, y, dz, torch.ones(4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        u, du = net(z, r, t, y, tangent=(slice(0, 4), dz, torch.ones(4)))
    assert rel(du.float(), du_ref) < 3e-2
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a whole MeanFlow step (x = z, noise = ż)
        loss = alpha_flow_loss(net, z, y, t, r, dz, 0.0).loss
    loss.mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
