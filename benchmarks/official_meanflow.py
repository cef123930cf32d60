"""The official MeanFlow formulation, as a baseline for benchmarks/step_cost.py (GPU-performance issue).

This is how the MeanFlow reference implementations compute the loss in PyTorch: the r = t samples get
their own plain forward, and the r ≠ t subset goes through `torch.autograd.functional.jvp(...,
create_graph=True)`, whose primal output u carries the gradient. autograd.functional.jvp is the
double-backward trick (a vjp of a vjp), so the tangent pass is built as a differentiable graph even
though only u is trained. alphaflow.objectives instead runs the JVP forward-mode under no_grad
(`torch.func.jvp`) and one ordinary forward with gradient over the whole batch.

Same loss as `alpha_flow_loss(..., alpha=0)` without CFG (tests/test_benchmarks.py checks values and
gradients in float64), so the two can be timed side by side on the same model and batch.
"""

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from alphaflow.objectives import bcast, mean_per_sample


def official_meanflow_loss(net, x, y, t, r, noise, weight_eps=1e-3):
    """Per-sample sg(1 / (Δ² + c)) · Δ², the MeanFlow loss, via autograd.functional.jvp on r ≠ t."""
    z_t = bcast(1 - t, x) * x + bcast(t, x) * noise
    v = noise - x
    mf = (t != r).nonzero(as_tuple=True)[0]
    fm = (t == r).nonzero(as_tuple=True)[0]
    delta_sq = torch.empty_like(t)
    if fm.numel():
        u_fm = net(z_t[fm], r[fm], t[fm], y[fm])  # separate forward for the flow-matching samples
        delta_sq[fm] = mean_per_sample((u_fm - v[fm]) ** 2)
    if mf.numel():
        z_m, r_m, t_m, y_m, v_m = z_t[mf], r[mf], t[mf], y[mf], v[mf]
        with sdpa_kernel([SDPBackend.MATH]):  # the fused attention kernels have no double backward
            u, dudt = torch.autograd.functional.jvp(
                lambda z, rr, tt: net(z, rr, tt, y_m),
                (z_m, r_m, t_m),
                (v_m, torch.zeros_like(r_m), torch.ones_like(t_m)),
                create_graph=True,
            )
        target = (v_m - bcast(t_m - r_m, v_m) * dudt).detach()
        delta_sq[mf] = mean_per_sample((u - target) ** 2)
    return delta_sq / (delta_sq.detach() + weight_eps)
