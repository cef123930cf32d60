"""The α curriculum (paper Alg. 2, §4.2): α as a function of the optimiser step.

Plain Python (no torch), so the params loader and the launcher on a login node stay light;
`alphaflow.objectives` re-exports it.
"""

import math


def alpha_schedule(step, start, end, gamma=25.0, clamp=5e-3, *, discrete_only=False):
    """α(k) = 1 − sigmoid(γ (k − k_mid) / (k_e − k_s)); 1 before k_s, 0 after k_e.

    Clamp: α < η → 0, α > 1 − η → 1. With discrete_only, α is clamped at η instead of 0, so the
    JVP (MeanFlow) branch is never used (the config's `discrete_training` flag).
    """
    if step < start:
        alpha = 1.0
    elif step > end:
        alpha = 0.0
    elif end == start:  # a step schedule (Table 2a "200K→200K")
        alpha = 0.0
    else:
        mid = 0.5 * (start + end)
        alpha = 1.0 - 1.0 / (1.0 + math.exp(-gamma * (step - mid) / (end - start)))
    if alpha < clamp:
        alpha = clamp if discrete_only else 0.0
    elif alpha > 1.0 - clamp:
        alpha = 1.0
    return alpha
