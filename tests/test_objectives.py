import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from alphaflow.objectives import (
    alpha_flow_loss,
    alpha_schedule,
    drop_labels,
    gradient_conflict,
    guided_velocity,
    per_sample_loss,
    sample_times,
    total_derivative,
)
from helpers import randomized

f64 = torch.float64


def batch(n=6, fm_ratio=0.0, seed=0, c=2, size=8):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, size, size, generator=g, dtype=f64)
    noise = torch.randn(n, c, size, size, generator=g, dtype=f64)
    t, r = sample_times(n, fm_ratio, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return x, y, t.to(f64), r.to(f64), noise


def grads(net, loss):
    net.zero_grad()
    loss.backward()
    return torch.cat([p.grad.reshape(-1).clone() for p in net.parameters() if p.grad is not None])


def b4(a):
    """[B] -> [B, 1, 1, 1]."""
    return a[:, None, None, None]


def flat_autograd(loss, params):
    """∇_θ loss as one vector (zeros for parameters the loss does not reach), by torch.autograd.grad."""
    gs = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(gs, params)])


def dudt_forward_ad(net, z, r, t, y, v):
    """du/dt along (dz, dr, dt) = (v, 0, 1) with dual tensors (torch.autograd.forward_ad), no gradient."""
    import torch.autograd.forward_ad as fwad

    with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]), fwad.dual_level():
        out = net(fwad.make_dual(z, v), r, fwad.make_dual(t, torch.ones_like(t)), y)
        return fwad.unpack_dual(out).tangent.clone()


# ----------------------------------------------------------------------------
# Time sampling and the α curriculum


def test_sample_times_counts_and_order():
    t, r = sample_times(64, 0.25, generator=torch.Generator().manual_seed(1))
    assert t.shape == r.shape == (64,)
    # fmt: off
    assert torch.equal(t[:16], r[:16])           # the first int(B·ratio) have r = t
    assert bool((t[16:] > r[16:]).all())         # the rest: t = max, r = min
    # fmt: on
    assert bool(((t > 0) & (t < 1)).all())
    t, r = sample_times(10, 0.75)
    assert int((t == r).sum()) == 7


def test_sample_times_distribution():
    t, r = sample_times(200_000, 0.5, loc=-0.4, scale=1.0, generator=torch.Generator().manual_seed(0))
    logit = lambda a: torch.log(a / (1 - a))
    fm = logit(t[:100_000])
    assert abs(float(fm.mean()) + 0.4) < 0.01 and abs(float(fm.std()) - 1.0) < 0.01
    # max / min of two N(μ, 1): means μ ± 1/√π.
    assert abs(float(logit(t[100_000:]).mean()) - (-0.4 + 1 / math.sqrt(math.pi))) < 0.01
    assert abs(float(logit(r[100_000:]).mean()) - (-0.4 - 1 / math.sqrt(math.pi))) < 0.01


def test_alpha_schedule_values_and_clamps():
    s, e = 600_000, 1_000_000
    assert alpha_schedule(800_000, s, e) == pytest.approx(0.5)
    assert alpha_schedule(880_000, s, e) == pytest.approx(0.00669, abs=5e-5)
    assert alpha_schedule(760_000, s, e) == pytest.approx(0.924, abs=1e-3)
    assert alpha_schedule(0, s, e) == 1.0 and alpha_schedule(s, s, e) == 1.0  # > 1 − η → 1
    assert alpha_schedule(900_000, s, e) == 0.0  # < η → 0
    assert alpha_schedule(1_200_000, s, e) == 0.0
    assert alpha_schedule(900_000, s, e, discrete_only=True) == 5e-3  # never a JVP
    # Window of 0 < α < 1: about k_mid ± 0.21 (k_e − k_s) (paper Alg. 2).
    inside = [k for k in range(s, e, 1000) if 0 < alpha_schedule(k, s, e) < 1]
    assert abs(inside[0] - 716_000) <= 2000 and abs(inside[-1] - 884_000) <= 2000
    # Step schedule 200K→200K.
    assert alpha_schedule(199_999, 200_000, 200_000) == 1.0
    assert alpha_schedule(200_000, 200_000, 200_000) == 0.0


# ----------------------------------------------------------------------------
# Targets


def test_alpha_one_target_is_v_tilde(tiny_net64):
    x, y, t, r, noise = batch(fm_ratio=0.5)
    terms = alpha_flow_loss(tiny_net64, x, y, t, r, noise, 1.0, clamp_target=None)
    z_t = (1 - t)[:, None, None, None] * x + t[:, None, None, None] * noise
    u = tiny_net64(z_t, r, t, y)
    expected = ((u - (noise - x)) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(terms.delta_sq, expected)
    # Adaptive weight 1/(Δ² + c) for every sample at α = 1.
    torch.testing.assert_close(terms.loss, expected / (expected + 1e-3))
    torch.testing.assert_close(terms.tc, torch.zeros_like(terms.tc))


def test_alpha_branch_weight_and_clip(tiny_net64):
    x, y, t, r, noise = batch(fm_ratio=0.5)
    terms = alpha_flow_loss(tiny_net64, 10 * x, y, t, r, noise, 0.3, clamp_target=0.5)
    d = terms.delta_sq.detach()
    fm = terms.is_fm
    torch.testing.assert_close(terms.loss[fm], d[fm] / (d[fm] + 1e-3))
    torch.testing.assert_close(terms.loss[~fm], 0.3 * d[~fm] / (d[~fm] + 1e-3))
    # With |x| large the unclipped target would exceed the clip; Δ² is then bounded below by the clip gap.
    unclipped = alpha_flow_loss(tiny_net64, 10 * x, y, t, r, noise, 0.3, clamp_target=None)
    assert not torch.allclose(unclipped.delta_sq[~fm], d[~fm])
    torch.testing.assert_close(unclipped.delta_sq[fm], d[fm])  # r == t samples are never clipped


def test_jvp_matches_central_finite_difference(tiny_net64):
    x, y, t, r, noise = batch()
    z = (1 - t)[:, None, None, None] * x + t[:, None, None, None] * noise
    v = noise - x
    dudt = total_derivative(tiny_net64, z, r, t, y, v)
    h = 1e-5
    fd = (tiny_net64(z + h * v, r, t + h, y) - tiny_net64(z - h * v, r, t - h, y)) / (2 * h)
    torch.testing.assert_close(dudt, fd, rtol=1e-6, atol=1e-8)

    # The wrong tangents of MeanFlow's ablation (dz, dr, dt) = (v,0,0), (v,1,0) give other derivatives.
    def jvp_zrt(tangent_r, tangent_t):
        f = lambda zz, rr, tt: tiny_net64(zz, rr, tt, y)
        with sdpa_kernel([SDPBackend.MATH]):
            return torch.func.jvp(f, (z, r, t), (v, tangent_r * torch.ones_like(r), tangent_t * torch.ones_like(t)))[1]

    torch.testing.assert_close(jvp_zrt(0.0, 1.0), dudt)
    fd_error = (dudt - fd).abs().max()
    for wrong in (jvp_zrt(0.0, 0.0), jvp_zrt(1.0, 0.0)):
        assert (wrong - dudt).abs().max() > 1e3 * fd_error
        assert (wrong - fd).abs().max() > 1e-3


def test_theorem1_alpha_flow_gradient_tends_to_meanflow(tiny_net64):
    """∇L_α / α → ∇L_MF with an error ∝ α (paper Thm. 1), unweighted, float64."""
    x, y, t, r, noise = batch(n=8)
    g_mf = grads(tiny_net64, alpha_flow_loss(tiny_net64, x, y, t, r, noise, 0.0).delta_sq.mean())
    errors = []
    for alpha in (1e-2, 1e-3, 1e-4):
        terms = alpha_flow_loss(tiny_net64, x, y, t, r, noise, alpha, clamp_target=None)
        g = grads(tiny_net64, terms.delta_sq.mean()) / alpha
        errors.append(float((g - g_mf).norm() / g_mf.norm()))
    assert errors[-1] < 1e-3
    for big, small in zip(errors[:-1], errors[1:]):
        assert 5 < big / small < 20, errors  # one decade of α → about one decade of error


def test_split_and_fused_jvp_agree(tiny_net64):
    x, y, t, r, noise = batch(n=8, fm_ratio=0.25)
    a = alpha_flow_loss(tiny_net64, x, y, t, r, noise, 0.0, jvp_mode="split")
    ga = grads(tiny_net64, a.loss.mean())
    b = alpha_flow_loss(tiny_net64, x, y, t, r, noise, 0.0, jvp_mode="fused")
    gb = grads(tiny_net64, b.loss.mean())
    torch.testing.assert_close(a.loss, b.loss)
    torch.testing.assert_close(ga, gb)


def test_per_sample_loss_is_the_stable_api(tiny_net64):
    x, y, t, r, noise = batch(fm_ratio=0.5)
    loss = per_sample_loss(tiny_net64, x, y, t, r, noise, 0.0)
    assert loss.shape == (6,) and loss.dtype == f64 and loss.requires_grad
    loss.mean().backward()
    assert all(p.grad is not None for p in tiny_net64.parameters())


def test_decomposition_sums_to_meanflow_up_to_constant(tiny_net64):
    """Per sample, Δ²_MF = L_TFM + L_TC + C with C = mean(−2(t−r) v·du/dt + (t−r)²‖du/dt‖²) free of θ (du/dt
    is stop-gradient; paper Eq. 6). The weighted loss sg(w)·Δ² is not L_TFM + L_TC: the identity is for the
    unweighted Δ², and r = t samples have L_TC = 0 and C = 0."""
    x, y, t, r, noise = batch(fm_ratio=0.5)
    terms = alpha_flow_loss(tiny_net64, x, y, t, r, noise, 0.0)
    z = b4(1 - t) * x + b4(t) * noise
    v = noise - x
    dudt = dudt_forward_ad(tiny_net64, z, r, t, y, v)
    with torch.no_grad():
        u = tiny_net64(z, r, t, y)
    dt = b4(t - r)
    per = lambda a: a.flatten(1).mean(1)
    torch.testing.assert_close(terms.tfm, per((u - v) ** 2))
    torch.testing.assert_close(terms.tc, per(2 * dt * u * dudt))
    const = per(-2 * dt * v * dudt + dt**2 * dudt**2)
    torch.testing.assert_close(terms.delta_sq.detach(), per((u - (v - dt * dudt)) ** 2))
    torch.testing.assert_close(terms.tfm + terms.tc + const, terms.delta_sq.detach())
    fm = terms.is_fm
    assert bool(fm.any()) and bool((~fm).any())
    assert torch.equal(terms.tc[fm], torch.zeros_like(terms.tc[fm]))
    assert float(terms.tc[~fm].abs().min()) > 1e-6 and float(const[~fm].abs().min()) > 1e-6  # neither is vacuous


def test_meanflow_gradient_is_the_tfm_plus_tc_gradient(tiny_net64):
    """∇ mean Δ²_MF = ∇L_TFM + ∇L_TC, the identity gradient_conflict's "MF" = TFM + TC relies on; the
    weighted loss's gradient is instead Σ sg(w_i) ∇Δ²_i / B."""
    x, y, t, r, noise = batch(n=8)
    params = [p for p in tiny_net64.parameters() if p.requires_grad]
    terms = alpha_flow_loss(tiny_net64, x, y, t, r, noise, 0.0)
    g_mf = flat_autograd(terms.delta_sq.mean(), params)
    z = b4(1 - t) * x + b4(t) * noise
    v = noise - x
    dudt = dudt_forward_ad(tiny_net64, z, r, t, y, v)
    u = tiny_net64(z, r, t, y)
    g_tfm = flat_autograd(((u - v) ** 2).mean(), params)
    g_tc = flat_autograd((2 * b4(t - r) * u * dudt).mean(), params)
    torch.testing.assert_close(g_mf, g_tfm + g_tc, rtol=1e-9, atol=1e-12)
    assert float((g_mf - g_tfm).norm()) > 1e-3 * float(g_mf.norm())  # L_TC's gradient is not negligible here
    w = 1.0 / (terms.delta_sq.detach() + 1e-3)
    g_weighted = flat_autograd(terms.loss.mean(), params)
    torch.testing.assert_close(g_weighted, flat_autograd((w * terms.delta_sq).mean(), params))


# ----------------------------------------------------------------------------
# Training-time CFG


class LinearNet(torch.nn.Module):
    """u = a·z + b·y + (t − r): a net whose teacher outputs are easy to write down."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(0.5, dtype=f64))

    def forward(self, z, r, t, y):
        return self.a * z + y.to(z.dtype)[:, None, None, None] + (t - r)[:, None, None, None]


def test_cfg_target_formula_and_strict_interval():
    net = LinearNet()
    z = torch.randn(4, 1, 2, 2, dtype=f64)
    v = torch.randn(4, 1, 2, 2, dtype=f64)
    t = torch.tensor([0.0, 0.3, 0.75, 0.9], dtype=f64)
    y = torch.tensor([1, 2, 3, 4])
    omega, kappa, null = 0.2, 0.92, 7
    out = guided_velocity(net, z, t, y, v, omega=omega, kappa=kappa, cfg_interval=(0.0, 0.75), null_label=null)
    cond = 0.5 * z + y.to(f64)[:, None, None, None]
    uncond = 0.5 * z + null
    guided = omega * v + kappa * cond + (1 - omega - kappa) * uncond
    inside = torch.tensor([False, True, False, False])  # t = 0 and t = 0.75 are outside (strict)
    torch.testing.assert_close(out[inside], guided[inside])
    torch.testing.assert_close(out[~inside], v[~inside])
    with pytest.raises(ValueError, match="null_label"):
        guided_velocity(net, z, t, y, v, omega=0.5, kappa=0.0, cfg_interval=(0.0, 1.0))


def test_label_dropout_only_inside_interval():
    y = torch.arange(1000) % 10
    t = torch.linspace(0, 1, 1000)
    out = drop_labels(y, t, 1.0, null_label=10, cfg_interval=(0.2, 0.75))
    inside = (t > 0.2) & (t < 0.75)
    assert bool((out[inside] == 10).all()) and torch.equal(out[~inside], y[~inside])
    out = drop_labels(y, t, 0.1, null_label=10, cfg_interval=(0.0, 1.0), generator=torch.Generator().manual_seed(0))
    assert 60 < int((out == 10).sum()) < 140
    assert drop_labels(y, t, 0.0, null_label=10) is y


def test_cfg_in_loss_uses_teacher_under_no_grad(tiny_net64):
    x, y, t, r, noise = batch(fm_ratio=0.5)
    loss = per_sample_loss(tiny_net64, x, y, t, r, noise, 0.5, omega=1.0, kappa=0.5, null_label=3)
    loss.mean().backward()  # the guided target is detached: backward works and grads are finite
    assert all(torch.isfinite(p.grad).all() for p in tiny_net64.parameters())


def test_shortcut_target_is_the_two_half_step_target(tiny_net64):
    """shift="shortcut", α = ½ (paper Thm. 1's Shortcut model): on r ≠ t the target is
    sg(½ u(z_t, s, t) + ½ u(z_s, r, s)), s = (r + t)/2, z_s = z_t − (t − s) u(z_t, s, t), with weight ½/(Δ² + c);
    on r = t it is v with weight 1/(Δ² + c)."""
    x, y, t, r, noise = batch(n=8, fm_ratio=0.25)
    net = tiny_net64
    terms = alpha_flow_loss(net, x, y, t, r, noise, 0.5, shift="shortcut", clamp_target=None)
    z_t = b4(1 - t) * x + b4(t) * noise
    v = noise - x
    s = (r + t) / 2
    with torch.no_grad():
        u_first = net(z_t, s, t, y)  # the half step [s, t]
        z_s = z_t - b4(t - s) * u_first
        u_second = net(z_s, r, s, y)  # the half step [r, s] from where the first one lands
        shortcut = 0.5 * u_first + 0.5 * u_second
    fm = t == r
    assert bool(fm.any()) and bool((~fm).any())
    target = torch.where(b4(fm), v, shortcut)
    u = net(z_t, r, t, y)
    delta_sq = ((u - target) ** 2).flatten(1).mean(1)
    a = torch.where(fm, 1.0, 0.5).to(f64)
    expected = (a / (delta_sq.detach() + 1e-3)) * delta_sq
    torch.testing.assert_close(terms.delta_sq, delta_sq, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(terms.loss, expected, rtol=1e-9, atol=1e-12)
    params = [p for p in net.parameters() if p.requires_grad]  # the target carries no gradient
    torch.testing.assert_close(flat_autograd(terms.loss.mean(), params), flat_autograd(expected.mean(), params))
    # Not vacuous: the velocity-shift α-Flow target at α = ½ is a different one on every r ≠ t sample.
    velocity = alpha_flow_loss(net, x, y, t, r, noise, 0.5, clamp_target=None)
    assert float((velocity.delta_sq - terms.delta_sq).detach()[~fm].abs().min()) > 1e-6
    # clamp_target clips the shortcut target as any α > 0 target; the r = t target v is never clipped.
    clipped = alpha_flow_loss(net, 10 * x, y, t, r, 10 * noise, 0.5, shift="shortcut", clamp_target=0.5)
    with torch.no_grad():
        z10 = b4(1 - t) * 10 * x + b4(t) * 10 * noise
        first = net(z10, s, t, y)
        sc10 = 0.5 * first + 0.5 * net(z10 - b4(t - s) * first, r, s, y)
        want = ((net(z10, r, t, y) - torch.where(b4(fm), 10 * v, sc10.clamp(-0.5, 0.5))) ** 2).flatten(1).mean(1)
    assert float(sc10[~fm].abs().max()) > 0.5  # the clip binds
    torch.testing.assert_close(clipped.delta_sq.detach(), want, rtol=1e-9, atol=1e-12)


def test_gradient_conflict_cosines_match_a_hand_computation(tiny_net64):
    """Each cosine is cos(∇_θ L_a, ∇_θ L_b) of the losses written out here, with ∇L_MF = ∇L_TFM + ∇L_TC, and
    the losses are their values: L_TFM = mean (u − v)², L_FM′ = mean (u(z_t, t, t) − v)²,
    L_TC = mean 2 (t − r) u · sg(du/dt)."""
    x, y, t, r, noise = batch(n=8)
    net = randomized(tiny_net64, std=0.2, seed=2)  # larger weights: u depends on r, the cosines spread out
    out = gradient_conflict(net, x, y, t, r, noise)
    params = [p for p in net.parameters() if p.requires_grad]
    z = b4(1 - t) * x + b4(t) * noise
    v = noise - x
    dudt = dudt_forward_ad(net, z, r, t, y, v)
    u = net(z, r, t, y)
    losses = {
        "TFM": ((u - v) ** 2).mean(),
        "FM'": ((net(z, t, t, y) - v) ** 2).mean(),
        "TC": (2 * b4(t - r) * u * dudt).mean(),
    }
    g = {k: flat_autograd(loss, params) for k, loss in losses.items()}
    g["MF"] = flat_autograd(losses["TFM"] + losses["TC"], params)
    cos = lambda a, b: float(torch.dot(a, b) / (a.norm() * b.norm()))
    pairs = [("TFM", "TC"), ("FM'", "TC"), ("TFM", "FM'"), ("TFM", "MF"), ("FM'", "MF"), ("TC", "MF")]
    expected = {f"cos({a},{b})": cos(g[a], g[b]) for a, b in pairs}
    expected.update({f"loss_{k}": float(loss) for k, loss in losses.items()})
    assert set(out) == set(expected)
    for key, value in expected.items():
        assert out[key] == pytest.approx(value, rel=1e-5, abs=1e-5), key
    # Not vacuous: L_TFM and L_FM′ (r versus r := t) and L_TC and L_MF differ visibly on this batch.
    assert abs(expected["cos(TFM,TC)"] - expected["cos(FM',TC)"]) > 0.02, expected
    assert abs(expected["cos(TFM,TC)"] - expected["cos(TC,MF)"]) > 0.03, expected
    assert abs(expected["loss_TFM"] - expected["loss_FM'"]) > 0.1, expected
