import pytest
import torch

from alphaflow.sampling import SeededNoise, sample, uniform_t_steps

f64 = torch.float64
MU, SIGMA = 1.5, 0.3  # data ~ N(μ, σ²) elementwise


def a(t):
    return (1 - t) * MU


def b(t):
    return ((1 - t) ** 2 * SIGMA**2 + t**2) ** 0.5


class GaussianFlow(torch.nn.Module):
    """Exact average velocity of the linear flow from N(μ, σ²) data to N(0, 1) noise.

    The probability-flow ODE maps ε to z_t = a(t) + b(t) ε, so u(z_t, r, t) = (z_t − z_r)/(t − r) with
    z_r = a(r) + b(r)(z_t − a(t))/b(t); at r = t it is the instantaneous velocity (a′ + b′ ε).
    """

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros((), dtype=f64))

    def forward(self, z, r, t, y):
        r, t = r[:, None, None, None], t[:, None, None, None]
        eps = (z - a(t)) / b(t)
        same = (t - r).abs() < 1e-12
        db = ((t - 1) * SIGMA**2 + t) / b(t)
        inst = -MU + db * eps
        avg = (z - a(r) - b(r) * eps) / torch.where(same, torch.ones_like(t), t - r)
        return torch.where(same, inst, avg)


@pytest.mark.parametrize("t_steps", [[1.0, 0.0], [1.0, 0.5, 0.0], uniform_t_steps(4), [1.0, 0.55, 0.2, 0.0]])
def test_ode_sampler_is_exact_for_known_average_velocity(t_steps):
    eps = torch.randn(5, 1, 2, 2, dtype=f64)
    x = sample(GaussianFlow(), eps, torch.zeros(5, dtype=torch.long), t_steps, mode="ode")
    torch.testing.assert_close(x, MU + SIGMA * eps, rtol=0, atol=1e-12)


def test_consistency_sampler_renoises_with_fresh_noise():
    eps = torch.randn(3, 1, 2, 2, dtype=f64)
    y = torch.zeros(3, dtype=torch.long)
    gen = SeededNoise([7, 8, 9])
    x = sample(GaussianFlow(), eps, y, [1.0, 0.4, 0.0], mode="consistency", generator=gen)
    # By hand: x̂₀ = μ + σε; z_0.4 = 0.6 x̂₀ + 0.4 ε′; then the exact map from t = 0.4 to 0.
    eps_prime = SeededNoise([7, 8, 9]).randn((1, 2, 2), dtype=f64)
    z = 0.6 * (MU + SIGMA * eps) + 0.4 * eps_prime
    expected = MU + SIGMA * (z - a(0.4)) / b(0.4)
    torch.testing.assert_close(x, expected, rtol=0, atol=1e-12)
    # 1-NFE: both modes coincide.
    one_ode = sample(GaussianFlow(), eps, y, [1.0, 0.0], mode="ode")
    one_cons = sample(GaussianFlow(), eps, y, [1.0, 0.0], mode="consistency")
    torch.testing.assert_close(one_ode, one_cons)


def test_per_sample_seeds_make_samples_batch_independent():
    a_noise = SeededNoise([3, 5]).randn((1, 4, 4))
    b_noise = SeededNoise([5, 11, 3]).randn((1, 4, 4))
    torch.testing.assert_close(a_noise[1], b_noise[0])
    torch.testing.assert_close(a_noise[0], b_noise[2])


def test_bad_time_grids_are_rejected():
    eps = torch.randn(1, 1, 2, 2, dtype=f64)
    y = torch.zeros(1, dtype=torch.long)
    for bad in ([1.0], [0.9, 0.0], [1.0, 0.5, 0.6, 0.0], [1.0, 0.2]):
        with pytest.raises(ValueError):
            sample(GaussianFlow(), eps, y, bad)
    with pytest.raises(ValueError, match="mode"):
        sample(GaussianFlow(), eps, y, [1.0, 0.0], mode="sde")


def test_sampling_a_real_dit_runs_in_float64_updates():
    from alphaflow.models import build_model

    net = build_model("T/4", num_classes=10, input_size=28, in_channels=1)
    eps = torch.randn(2, 1, 28, 28)
    x = sample(net, eps, torch.tensor([1, 2]), [1.0, 0.5, 0.0])
    assert x.dtype == f64
    torch.testing.assert_close(x, eps.double())  # zero-initialised output: u ≡ 0
