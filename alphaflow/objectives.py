"""The α-Flow objective family (arXiv 2510.20771 Eq. 5, Def. 1, Eq. 8, Alg. 1–2, Thm. 1).

Conventions: t = 0 is data, t = 1 is noise; z_t = (1 − t)·x + t·ε, v = ε − x. The network
u_θ(z, r, t, y) predicts the average velocity over [r, t] (r ≤ t).

  α = 1       trajectory flow matching (L_TFM):           target ṽ
  0 < α < 1   α-Flow with s = α r + (1 − α) t:             target α ṽ + (1 − α) sg(u_θ(z_s, r, s))
  α = 0       MeanFlow (paper Eq. 5), a JVP along (ṽ, 0, 1): target ṽ − (t − r) sg(du_θ/dt)
  shortcut    Theorem 1's Shortcut model: ṽ = sg(u_θ(z_t, s, t)) at α = ½

Samples with r = t are always plain flow matching (target ṽ). Every sample uses the adaptive weight
sg(a / (Δ² + c)), Δ² the per-element MEAN squared error, a = α on the α > 0 branch and 1 elsewhere.
"""

from dataclasses import dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from alphaflow.curriculum import alpha_schedule  # noqa: F401  (the α curriculum, paper Alg. 2; torch-free)

# ----------------------------------------------------------------------------
# Time sampling (paper Table 3: logit-normal(−0.4, 1.0); official code: sample_traj_params)


def logit_normal(n, loc, scale, generator=None, device=None):
    """t = sigmoid(N(loc, scale²)), shape [n]."""
    device = generator.device if generator is not None else device
    return torch.sigmoid(loc + scale * torch.randn(n, generator=generator, device=device))


def sample_times(n, fm_ratio, loc=-0.4, scale=1.0, generator=None):
    """Returns (t, r), float tensors [n].

    The first int(n·fm_ratio) samples have r = t (flow matching); the split is a fixed count per
    micro-batch, not Bernoulli. The rest use the min-max sampler: t = max, r = min of two draws.
    """
    if not 0.0 <= fm_ratio <= 1.0:
        raise ValueError(f"fm_ratio must be in [0, 1], got {fm_ratio}")
    n_fm = int(n * fm_ratio)
    t1 = logit_normal(n, loc, scale, generator)
    t2 = logit_normal(n, loc, scale, generator)
    t = torch.maximum(t1, t2)
    r = torch.minimum(t1, t2)
    t[:n_fm] = t1[:n_fm]
    r[:n_fm] = t1[:n_fm]
    return t, r


# ----------------------------------------------------------------------------
# Training-time classifier-free guidance (paper §4.2; official code: _compute_velocity_cfg)


def in_cfg_interval(t, cfg_interval):
    """Strict interval t_min < t < t_max where the guided target and label dropout apply."""
    t_min, t_max = cfg_interval
    return (t > t_min) & (t < t_max)


def drop_labels(y, t, p, null_label, cfg_interval=(0.0, 1.0), generator=None):
    """Label dropout with probability p, only for samples inside the CFG interval (as the official code)."""
    if p <= 0:
        return y
    u = torch.rand(y.shape[0], generator=generator, device=generator.device if generator else y.device)
    drop = (u.to(y.device) < p) & in_cfg_interval(t, cfg_interval)
    return torch.where(drop, torch.full_like(y, null_label), y)


def guided_velocity(net, z_t, t, y, v, *, omega=1.0, kappa=0.0, cfg_interval=(0.0, 1.0), null_label=None):
    """ṽ = ω v + κ sg(u(z_t, t, t | y)) + (1 − ω − κ) sg(u(z_t, t, t | ∅)) inside the interval, else v.

    Teachers use the online network with r = t under no_grad; each runs only if its weight ≠ 0.
    """
    w_uncond = 1.0 - omega - kappa
    if omega == 1.0 and kappa == 0.0:
        return v
    inside = in_cfg_interval(t, cfg_interval)
    if not bool(inside.any()):
        return v
    idx = inside.nonzero(as_tuple=True)[0]
    z_in, t_in, y_in = z_t[idx], t[idx], y[idx]
    v_tilde_in = omega * v[idx]
    with torch.no_grad():
        if kappa != 0.0:
            v_tilde_in = v_tilde_in + kappa * net(z_in, t_in, t_in, y_in).to(v.dtype)
        if w_uncond != 0.0:
            if null_label is None:
                raise ValueError("training-time CFG with 1 − ω − κ ≠ 0 needs null_label")
            y_null = torch.full_like(y_in, null_label)
            v_tilde_in = v_tilde_in + w_uncond * net(z_in, t_in, t_in, y_null).to(v.dtype)
    return v.index_put((idx,), v_tilde_in)


# ----------------------------------------------------------------------------
# Targets


def bcast(a, like):
    """[B] -> [B, 1, 1, ...] matching `like`."""
    return a.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def total_derivative(net, z_t, r, t, y, v_tilde):
    """sg(du/dt) with du/dt = ∂_z u · ṽ + ∂_t u: a JVP with tangent (ṽ, 0, 1) (paper Eq. 5).

    The function differentiated takes (z, t) with r fixed; net converts (r, t) → (t, t − r) inside,
    so the derivative is the total one, with r held fixed. Forward-mode AD is not implemented for the fused
    SDPA kernels, so the JVP runs on the math attention path; the gradient forward keeps fast kernels.
    """
    with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]):
        _, dudt = torch.func.jvp(lambda z, tt: net(z, r, tt, y), (z_t, t), (v_tilde, torch.ones_like(t)))
    return dudt.to(v_tilde.dtype)


def meanflow_target(net, z_t, r, t, y, v_tilde):
    """ṽ − (t − r) sg(du/dt) (paper Eq. 5)."""
    return v_tilde - bcast(t - r, v_tilde) * total_derivative(net, z_t, r, t, y, v_tilde)


def alpha_flow_target(net, z_t, r, t, y, v_tilde, alpha, clamp_target=4.0):
    """α ṽ + (1 − α) sg(u(z_s, r, s)), z_s = z_t − (t − s) ṽ, s = t − α (t − r) (paper Def. 1, Alg. 1).

    At α = 1 the second forward is skipped (target = ṽ). Clipped to ±clamp_target (official code: clamp_target).
    """
    target = v_tilde
    if alpha < 1.0:
        dt = alpha * (t - r)  # t − s
        s = t - dt
        z_s = z_t - bcast(dt, z_t) * v_tilde
        with torch.no_grad():
            u_next = net(z_s, r, s, y).to(v_tilde.dtype)
        target = alpha * v_tilde + (1.0 - alpha) * u_next
    if clamp_target is not None:
        target = target.clamp(-clamp_target, clamp_target)
    return target


def shortcut_shift_velocity(net, z_t, r, t, y):
    """Theorem 1's Shortcut shift velocity ṽ = sg(u(z_t, s, t)) with s = (t + r)/2 (α = ½)."""
    with torch.no_grad():
        return net(z_t, 0.5 * (t + r), t, y)


# ----------------------------------------------------------------------------
# The loss

JVP_MODES = ("tangent", "split", "fused")


def contiguous(index):
    """A sorted index tensor → the equal slice when it is one run (views instead of copies), else itself.
    sample_times puts the r ≠ t samples last, so the MeanFlow rows are a slice."""
    n = index.numel()
    if n and int(index[-1]) - int(index[0]) == n - 1:
        return slice(int(index[0]), int(index[0]) + n)
    return index


@dataclass
class LossTerms:
    """Per-sample values [B]. Only `loss` carries gradient; the rest are logged (paper App. E)."""

    # fmt: off
    loss: torch.Tensor        # sg(w) · Δ², what the optimiser minimises (batch mean)
    delta_sq: torch.Tensor    # Δ² = mean over elements of (u − sg(target))², unweighted, with gradient
    tfm: torch.Tensor         # L_TFM: mean (u − ṽ)²
    tc: torch.Tensor          # L_TC:  mean 2 (ṽ − target) · u
    is_fm: torch.Tensor       # bool, r == t
    # fmt: on


def mean_per_sample(a):
    return a.flatten(1).mean(dim=1)


def alpha_flow_loss(
    net, x, y, t, r, noise, alpha, *,
    omega=1.0,               # CFG weight on the conditional velocity v
    kappa=0.0,               # CFG weight on the online conditional prediction
    cfg_interval=(0.0, 1.0), # guided target only for t_min < t < t_max
    null_label=None,         # index of the null class (needed when 1 − ω − κ ≠ 0)
    clamp_target=4.0,        # elementwise clip of α > 0 targets; None = no clip
    weight_eps=1e-3,         # c in the adaptive weight a / (Δ² + c)
    shift="velocity",        # ṽ: "velocity" (v_t, CFG-guided) or "shortcut" (sg u(z_t, s, t))
    jvp_mode="tangent",      # MeanFlow's du/dt: "tangent" = the DiT's own forward-mode pass on r ≠ t, in the
                             #   same call as the grad forward (nets without `supports_tangent` use "split");
                             # "split" = torch.func.jvp under no_grad on r ≠ t, then one grad forward;
                             # "fused" = one torch.func.jvp on the whole batch whose primal carries grad
    teacher=None,            # module for the no-grad passes (teachers, JVP, u(z_s)); None = net.
                             # Under DDP pass the DDP wrapper as net and its .module here.
):  # fmt: skip
    """The whole α-Flow objective (paper Def. 1, Alg. 1, §4.2) for one micro-batch; returns LossTerms."""
    if shift not in ("velocity", "shortcut"):
        raise ValueError(f"shift must be 'velocity' or 'shortcut', got {shift!r}")
    if jvp_mode not in JVP_MODES:
        raise ValueError(f"jvp_mode must be one of {JVP_MODES}, got {jvp_mode!r}")
    teacher = net if teacher is None else teacher
    if jvp_mode == "tangent" and not getattr(teacher, "supports_tangent", False):
        jvp_mode = "split"
    if jvp_mode == "fused" and teacher is not net:
        raise ValueError("jvp_mode='fused' differentiates the gradient forward itself; it cannot run through DDP")
    z_t = bcast(1 - t, x) * x + bcast(t, x) * noise  # (B, C, H, W)
    v = noise - x
    v_tilde = guided_velocity(
        teacher, z_t, t, y, v, omega=omega, kappa=kappa, cfg_interval=cfg_interval, null_label=null_label
    )
    is_fm = t == r
    mf_index = (~is_fm).nonzero(as_tuple=True)[0]  # the r ≠ t subset
    # fmt: off
    target = v_tilde.clone()  # r == t: flow matching
    a = torch.ones_like(t)    # weight numerator
    # fmt: on
    u = None

    if mf_index.numel() > 0:
        mf = contiguous(mf_index)
        z_m, r_m, t_m, y_m = z_t[mf], r[mf], t[mf], y[mf]
        if shift == "shortcut":
            v_m = shortcut_shift_velocity(teacher, z_m, r_m, t_m, y_m).to(v.dtype)
        else:
            v_m = v_tilde[mf]
        if alpha == 0.0 and jvp_mode == "fused":
            # One JVP over the whole batch; (t − r) = 0 zeroes du/dt on the r == t samples.
            with sdpa_kernel([SDPBackend.MATH]):
                u, dudt = torch.func.jvp(lambda z, tt: net(z, r, tt, y), (z_t, t), (v_tilde, torch.ones_like(t)))
            target = v_tilde - bcast(t - r, v_tilde) * dudt.detach().to(v_tilde.dtype)
        elif alpha == 0.0 and jvp_mode == "tangent":
            # One pass: u with its gradient on the whole batch, du/dt along (ṽ, 0, 1) on r ≠ t (no grad).
            u, dudt = net(z_t, r, t, y, tangent=(mf, v_m, torch.ones_like(t_m)))
            target[mf] = v_m - bcast(t_m - r_m, v_m) * dudt.to(v_m.dtype)
        elif alpha == 0.0:
            target[mf] = meanflow_target(teacher, z_m, r_m, t_m, y_m, v_m)
        else:
            target[mf] = alpha_flow_target(teacher, z_m, r_m, t_m, y_m, v_m, alpha, clamp_target)
            a[mf] = alpha

    if u is None:
        u = net(z_t, r, t, y)  # the prediction, with gradient
    u = u.to(target.dtype)
    target = target.detach()
    delta_sq = mean_per_sample((u - target) ** 2)
    weight = (a / (delta_sq.detach() + weight_eps)).detach()
    with torch.no_grad():
        tfm = mean_per_sample((u - v_tilde) ** 2)
        tc = mean_per_sample(2 * (v_tilde - target) * u)
    return LossTerms(loss=weight * delta_sq, delta_sq=delta_sq, tfm=tfm, tc=tc, is_fm=is_fm)


def per_sample_loss(
    net,
    x,
    y,
    t,
    r,
    noise,
    alpha,
    *,
    omega=1.0,
    kappa=0.0,
    cfg_interval=(0.0, 1.0),
    null_label=None,
    clamp_target=4.0,
    weight_eps=1e-3,
    **options,
):
    """Stable API (docs/architecture.md): the per-sample α-Flow loss sg(w_i)·Δ²_i, a Tensor [B]."""
    return alpha_flow_loss(
        net,
        x,
        y,
        t,
        r,
        noise,
        alpha,
        omega=omega,
        kappa=kappa,
        cfg_interval=cfg_interval,
        null_label=null_label,
        clamp_target=clamp_target,
        weight_eps=weight_eps,
        **options,
    ).loss


# ----------------------------------------------------------------------------
# Gradient conflict analysis (paper Eq. 6, App. D.1, App. E)


def flat_grad(loss, params):
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])


def gradient_conflict(net, x, y, t, r, noise):
    """Cosines between full-parameter gradients of L_TFM, L_FM′, L_TCc and L_MF on one batch.

    L_TFM = mean ‖u(z_t, r, t) − v‖²; L_FM′ = the same with r := t; L_TCc = mean 2 (t − r) u·sg(du/dt)
    (du/dt from the JVP with tangent (v, 0, 1)); L_MF = L_TFM + L_TCc (up to a θ-free constant).
    No adaptive weight, no CFG (App. E analyses the unguided B/2). Returns a dict of floats.
    """
    params = [p for p in net.parameters() if p.requires_grad]
    z_t = bcast(1 - t, x) * x + bcast(t, x) * noise
    v = noise - x
    dudt = total_derivative(net, z_t, r, t, y, v)
    u = net(z_t, r, t, y)
    u_fm = net(z_t, t, t, y)
    losses = {
        "TFM": ((u - v) ** 2).mean(),
        "FM'": ((u_fm - v) ** 2).mean(),
        "TC": (2 * bcast(t - r, u) * u * dudt.detach()).mean(),
    }
    grads = {k: flat_grad(l, params) for k, l in losses.items()}
    grads["MF"] = grads["TFM"] + grads["TC"]
    pairs = [("TFM", "TC"), ("FM'", "TC"), ("TFM", "FM'"), ("TFM", "MF"), ("FM'", "MF"), ("TC", "MF")]
    cos = torch.nn.functional.cosine_similarity
    out = {f"cos({a},{b})": float(cos(grads[a], grads[b], dim=0)) for a, b in pairs}
    out.update({f"loss_{k}": float(l.detach()) for k, l in losses.items()})
    return out
