"""Sampler contract: grids, guidance window and NFE, seeds, shape, dtype, and data-space samples on every path."""

import math

import pytest
import torch

from tim_core import TRANSPORTS, get_transport, sample, time_grid
from tim_core.sampler import default_grid

from .toy import ToyNet


class Linear(torch.nn.Module):
    """F = a * x + b * onehot(label): its guided output has a closed form."""

    num_classes = 3

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(0.3))
        self.calls = []

    def forward(self, x, t, r, labels):
        self.calls.append(x.shape[0])
        return self.a * x + labels[:, None].to(x.dtype)


@pytest.mark.parametrize("name", list(TRANSPORTS))
def test_grid_starts_at_T_max_ends_at_T_min_without_zero_steps(name):
    T = get_transport(name)
    for steps in range(1, 129):
        g = time_grid(T, steps)
        assert g.dtype == torch.float64 and len(g) == steps + 1
        assert g[0].item() == T.T_max and g[-1].item() == T.T_min
        assert (g[:-1] - g[1:] > 0).all()


def test_one_guided_step_counts_two_and_applies_guidance():
    net = Linear()
    noise, labels = torch.randn(4, 2), torch.tensor([0, 1, 2, 1])
    out = sample(net, noise, labels, steps=1, cfg_scale=3.0)
    assert out.nfe == 2 and net.calls == [8]
    # F = F_u + w (F_c - F_u) with F_u using the null label 3; OT-FM: x_0 = x_1 - F
    F_u = 0.3 * noise + 3.0
    F = F_u + 3.0 * ((0.3 * noise + labels[:, None]) - F_u)
    assert torch.allclose(out.samples, noise - F)


def test_guidance_window_endpoints_included_and_nfe_honest():
    noise, labels = torch.randn(2, 2), torch.tensor([0, 1])
    assert sample(Linear(), noise, labels, steps=8).nfe == 8
    assert sample(Linear(), noise, labels, steps=8, cfg_scale=2.0).nfe == 16
    # t in {1, .875, ..., .125}: guided where t <= 0.5 -> 0.5, 0.375, 0.25, 0.125
    assert sample(Linear(), noise, labels, steps=8, cfg_scale=2.0, cfg_interval=(0.0, 0.5)).nfe == 12
    assert sample(Linear(), noise, labels, steps=1, cfg_scale=2.0, cfg_interval=(1.0, 1.0)).nfe == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shape_dtype_seed_and_trajectory(dtype):
    torch.manual_seed(0)
    net = ToyNet(dim=3)
    noise = torch.randn(5, 3, dtype=dtype)
    labels = torch.zeros(5, dtype=torch.long)
    a = sample(net, noise, labels, steps=6, stochasticity=0.2, generator=torch.Generator().manual_seed(1),
               return_trajectory=True)
    b = sample(net, noise, labels, steps=6, stochasticity=0.2, generator=torch.Generator().manual_seed(1))
    assert a.samples.shape == noise.shape and a.samples.dtype == dtype
    assert torch.equal(a.samples, b.samples)
    assert a.trajectory.shape == (7, 5, 3) and torch.equal(a.trajectory[0], noise)
    assert torch.equal(a.trajectory[-1], a.samples)


def test_diffusion_mode_passes_r_equal_t():
    seen = []

    def net(x, t, r, labels):
        seen.append((float(t), float(r)))
        return torch.zeros_like(x)

    net_module = torch.nn.Module()
    net_module.forward = net
    sample(net_module, torch.randn(1, 2), torch.zeros(1, dtype=torch.long), steps=2, mode="diffusion")
    assert seen == [(1.0, 1.0), (0.5, 0.5)]


def test_bad_input_names_the_argument():
    net, noise, labels = Linear(), torch.randn(2, 2), torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="steps .* must be an int >= 1; got 0"):
        sample(net, noise, labels, steps=0)
    with pytest.raises(ValueError, match="mode must be one of transition, diffusion"):
        sample(net, noise, labels, steps=1, mode="ode")
    with pytest.raises(ValueError, match="labels must have shape"):
        sample(net, noise, labels[:1], steps=1)
    with pytest.raises(ValueError, match="stochasticity"):
        sample(net, noise, labels, steps=2, stochasticity=0.1, transport=get_transport("vp"))
    with pytest.raises(ValueError, match="cfg_interval"):
        sample(net, noise, labels, steps=2, cfg_interval=(0.6, 0.2))


class PointMassOracle(torch.nn.Module):
    """The exact F for data that is the single point x0: F = ah x0 + sh eps with eps = (x_t - alpha x0) / sigma.

    The sampler hands the network c_noise(t) in float32; the oracle knows the grid and takes the grid time
    with that network time, so it evaluates at exactly the sampler's float64 t.
    """

    num_classes = 1

    def __init__(self, transport, x0, times):
        super().__init__()
        self.T, self.x0, self.times = transport, x0, times

    def forward(self, x, c_t, c_r, labels):
        t = self.times[(self.T.c_noise(self.times).float() - c_t).abs().argmin()]
        a, s, _, _ = self.T.interpolant(t)
        ah, sh = self.T.target_coefficients(t)
        return ah * self.x0 + sh * (x - a * self.x0) / s


@pytest.mark.parametrize("name", list(TRANSPORTS))
@pytest.mark.parametrize("grid", [None, "uniform"])
def test_every_path_returns_the_data_point_with_the_exact_network(name, grid):
    """Point-mass data: with the exact F every step count lands on the point, in data space (not at T_min's
    state, which is 2x the data for EDM at sigma_d = 0.5 and carries sigma(T_min) eps for VP and VE)."""
    T = get_transport(name)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, 3, generator=g, dtype=torch.float64)
    noise = torch.randn(64, 3, generator=g, dtype=torch.float64)
    labels = torch.zeros(64, dtype=torch.long)
    for steps in (1, 2, 5, 17):
        oracle = PointMassOracle(T, x0, time_grid(T, steps, grid))
        out = sample(oracle, noise, labels, steps, transport=T, grid=grid).samples
        err = (out - x0).abs().max().item()
        assert err < 1e-6, f"{name} {steps} steps: max error {err:.2e}"


@pytest.mark.parametrize("name", list(TRANSPORTS))
@pytest.mark.parametrize("kind", ["uniform", "karras", "log"])
def test_every_grid_has_exact_endpoints_and_decreases_for_every_step_count(name, kind):
    T = get_transport(name)
    if kind == "log" and T.T_min <= 0:
        with pytest.raises(ValueError, match="grid 'log' needs T_min > 0"):
            time_grid(T, 4, kind)
        return
    for steps in range(1, 129):
        g = time_grid(T, steps, kind)
        assert g.dtype == torch.float64 and len(g) == steps + 1
        assert g[0].item() == T.T_max and g[-1].item() == T.T_min
        assert (g[:-1] - g[1:] > 0).all()


def test_noise_level_grids_follow_their_closed_forms_and_are_the_edm_ve_default():
    T = get_transport("edm")
    i = torch.arange(9, dtype=torch.float64) / 8
    karras = (80 ** (1 / 7) + i * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert torch.allclose(time_grid(T, 8, "karras"), karras, rtol=1e-12)
    assert torch.allclose(time_grid(T, 8, "log"), torch.exp(math.log(80) + i * math.log(0.002 / 80)), rtol=1e-12)
    assert [default_grid(get_transport(n)) for n in TRANSPORTS] == ["uniform", "uniform", "karras", "uniform",
                                                                    "karras"]
    assert torch.equal(time_grid(T, 8), time_grid(T, 8, "karras")) and torch.equal(time_grid(get_transport("ve"), 3),
                                                                time_grid(get_transport("ve"), 3, "karras"))
    with pytest.raises(ValueError, match="grid must be one of uniform, karras, log"):
        time_grid(T, 2, "cosine")


def test_stochastic_steps_follow_their_closed_form_on_point_mass_data():
    """OT-FM, stochasticity rho, the exact network for data at the single point x0 (its noise estimate is the
    exact eps_hat = (x_t - (1 - t) x0) / t). Step i from t to r (dt = t - r) is the deterministic transition,
    x_r = (1 - r) x0 + r eps_hat, on the first and the last step; on every step in between it is
    x_r = (1 - r) x0 + (r - rho dt) eps_hat + sqrt(2 rho t dt) z, z the generator's next N(0, I) draw.
    The last step lands exactly on x0."""
    T, rho, steps = get_transport("ot_fm"), 0.3, 5
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, 3, generator=g, dtype=torch.float64)
    noise = torch.randn(16, 3, generator=g, dtype=torch.float64)
    labels = torch.zeros(16, dtype=torch.long)
    times = time_grid(T, steps)
    out = sample(PointMassOracle(T, x0, times), noise, labels, steps, transport=T, stochasticity=rho,
                 generator=torch.Generator().manual_seed(7), return_trajectory=True)
    z = torch.Generator().manual_seed(7)
    x = noise
    for i in range(steps):
        t, r = times[i].item(), times[i + 1].item()
        eps_hat = (x - (1 - t) * x0) / t
        if 0 < i < steps - 1:
            dt = t - r
            x = (1 - r) * x0 + (r - rho * dt) * eps_hat \
                + math.sqrt(2 * rho * t * dt) * torch.randn(x.shape, generator=z, dtype=x.dtype)
        else:
            x = (1 - r) * x0 + r * eps_hat
        assert torch.allclose(out.trajectory[i + 1], x, rtol=1e-12, atol=1e-12), f"step {i}"
    assert torch.allclose(out.samples, x0.expand_as(noise), rtol=0, atol=1e-12)
    deterministic = sample(PointMassOracle(T, x0, times), noise, labels, steps, transport=T, return_trajectory=True)
    assert torch.equal(out.trajectory[1], deterministic.trajectory[1])       # the first step adds no noise
    assert not torch.allclose(out.trajectory[2], deterministic.trajectory[2])  # the second does


def test_stochastic_steps_keep_the_point_mass_marginal_near_the_paths():
    """The noise part s_t = x_t - (1 - t) x0 starts N(0, I); a stochastic step maps its variance v_t to
    (r - rho dt)^2 v_t / t^2 + 2 rho t dt, which is r^2 + (2 rho + rho^2) dt^2 when v_t = t^2: the path's own
    marginal to first order. 20k rows at 32 steps: within 3% of that recursion, and within 0.025 of the path's
    t^2 at every step (measured: at most 0.013)."""
    T, rho, steps = get_transport("ot_fm"), 0.5, 32
    x0 = torch.tensor([[0.5, -1.0]], dtype=torch.float64)
    noise = torch.randn(20_000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    times = time_grid(T, steps)
    out = sample(PointMassOracle(T, x0, times), noise, torch.zeros(len(noise), dtype=torch.long), steps,
                 transport=T, stochasticity=rho, generator=torch.Generator().manual_seed(1), return_trajectory=True)
    v = noise.var(dim=0).mean().item()
    for i in range(steps - 1):
        t, r = times[i].item(), times[i + 1].item()
        dt = t - r
        v = v * (r / t) ** 2 if i == 0 else (r - rho * dt) ** 2 * v / t ** 2 + 2 * rho * t * dt
        var = (out.trajectory[i + 1] - (1 - r) * x0).var(dim=0).mean().item()
        assert var == pytest.approx(v, rel=0.03), f"step {i}"
        assert abs(var - r ** 2) < 0.025, f"step {i}"
