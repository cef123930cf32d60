"""Forward-mode (tangent) rules for the DiT's layers, for MeanFlow's du/dt (paper Eq. 5).

MeanFlow's target needs du_θ/dt = ∂_z u · ṽ + ∂_t u, the JVP of u_θ(z, r, t) along (ż, ṙ, ṫ) = (ṽ, 0, 1).
`torch.func.jvp` traces every op with dual numbers (about seven forwards' worth of work on CPU, and the
math attention path). Here each layer states its rule once: given the layer's primal input/output
(detached) and the input tangent ẋ, return the output tangent ẏ = J(x) ẋ. The DiT runs these under
no_grad right after each layer's primal, on the r ≠ t rows only (`DiT.forward(..., tangent=...)`), so a
MeanFlow step is one forward + one tangent pass + one backward.

Notation: `d<name>` is the tangent of `<name>`. Every rule is exact (tests check it against
torch.func.jvp in float64); under autocast the tangent runs in the same dtypes as the primal.
"""

import torch
import torch.nn.functional as F


def linear(layer, dx):
    """y = x Wᵀ + b  →  ẏ = ẋ Wᵀ (the bias has no tangent)."""
    return F.linear(dx, layer.weight)


def patch_embed(layer, dz):
    """timm PatchEmbed: y = flatten(conv(z) + b)  →  ẏ = flatten(conv(ż)), (N, T, D)."""
    proj = layer.proj
    return F.conv2d(dz, proj.weight, None, proj.stride, proj.padding).flatten(2).transpose(1, 2)


# The Jacobians of elementwise functions, of LayerNorm without affine and of softmax are symmetric, so
# their VJP kernels (what autograd runs in the backward) compute the JVP too: one fused kernel per rule.


def silu(x, dx):
    """y = x σ(x)  →  ẏ = σ(x) (1 + x (1 − σ(x))) ẋ."""
    return torch.ops.aten.silu_backward(dx.to(x.dtype), x)


def gelu_tanh(x, dx):
    """y = ½ x (1 + tanh(c (x + 0.044715 x³))), c = √(2/π)  →  ẏ = y'(x) ẋ."""
    return torch.ops.aten.gelu_backward(dx.to(x.dtype), x, approximate="tanh")


def layer_norm(x, dx, eps=1e-6):
    """y = (x − μ) / √(σ² + ε) over the last dim, no affine (in fp32 at least, as the primal)
    →  ẏ = (ẋ − mean ẋ − y · mean(y ẋ)) / √(σ² + ε)."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf, shape = x.to(dtype), x.shape[-1:]
    _, mean, rstd = torch.native_layer_norm(xf, shape, None, None, eps)
    dy, _, _ = torch.ops.aten.native_layer_norm_backward(
        dx.to(dtype), xf, shape, mean, rstd, None, None, [True, False, False]
    )
    return dy.to(x.dtype)


def modulate(xn, dxn, scale, dshift, dscale):
    """y = xn (1 + scale) + shift (adaLN, per sample)  →  ẏ = ẋn (1 + scale) + xn ṡcale + ṡhift."""
    return torch.addcmul(dshift.unsqueeze(1) + dxn * (1 + scale.unsqueeze(1)), xn, dscale.unsqueeze(1))


def gated(gate, dgate, a, da):
    """y = gate · a (adaLN-Zero residual branch)  →  ẏ = ġate · a + gate · ȧ."""
    return torch.addcmul(dgate.unsqueeze(1) * a, gate.unsqueeze(1), da)


def attention(q, k, v, dq, dk, dv):
    """O = P V, P = softmax(S), S = q kᵀ / √d, per head (B, H, T, d)
    →  Ȯ = P V̇ + Ṗ V,  Ṗ = P ⊙ (Ṡ − rowsum(P ⊙ Ṡ)),  Ṡ = (q̇ kᵀ + q k̇ᵀ) / √d.

    P is formed explicitly (T × T per head); the primal O came from the fused kernel.
    """
    q, k, v, dq, dk, dv = (a.contiguous() for a in (q, k, v, dq, dk, dv))  # one copy each, not one per matmul
    scale = q.shape[-1] ** -0.5
    p = torch.softmax((q @ k.transpose(-2, -1)) * scale, dim=-1)
    ds = (dq @ k.transpose(-2, -1) + q @ dk.transpose(-2, -1)) * scale
    dp = torch.ops.aten._softmax_backward_data(ds, p, -1, p.dtype)
    return p @ dv + dp @ v


def sinusoid(args, dargs):
    """[cos a, sin a] (the timestep features)  →  [−sin a · ȧ, cos a · ȧ]."""
    return torch.cat([-torch.sin(args) * dargs, torch.cos(args) * dargs], dim=-1)
