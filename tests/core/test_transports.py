"""Each path's closed forms against the general transition and identity (docs/method.md sections 2-3), in
float64; the endpoint solve, the data-space map, the OT-FM-equivalent time and the DDE times."""

import math

import pytest
import torch

from tim_core import TRANSPORTS, get_transport

# Every path, EDM also at sigma_d = 0.5 (where the reference code is wrong) and 1.
CASES = [("ot_fm", {}), ("trigflow", {}), ("edm", {"sigma_d": 0.5}), ("edm", {"sigma_d": 1.0}),
         ("vp", {}), ("ve", {})]
IDS = [f"{n}{p.get('sigma_d', '')}" for n, p in CASES]


def random_times(T, n=64, seed=0):
    """(t, r) with r <= t, drawn from the path's own proposal, away from the degenerate ends."""
    g = torch.Generator().manual_seed(seed)
    a = T.sample_t(n, generator=g, dtype=torch.float64)
    b = T.sample_t(n, generator=g, dtype=torch.float64)
    lo = T.T_min + 1e-3 * (T.T_max - T.T_min)
    t, r = torch.maximum(a, b).clamp(min=2 * lo), torch.minimum(a, b).clamp(min=lo)
    r[:8] = T.T_min  # one-step rows
    return t, r


def ddt(q, t):
    """dq/dt by autograd; zero for a coefficient that does not depend on t."""
    if not q.requires_grad:
        return torch.zeros_like(t)
    return torch.autograd.grad(q.sum(), t, retain_graph=True)[0]


def general(T, t, r):
    """A(t, r), B(t, r), B/(dB/dt), h-coefficients and their t-derivatives from autograd of the coefficients."""
    t = t.clone().requires_grad_(True)
    a_t, s_t, _, _ = T.interpolant(t)
    ah_t, sh_t = T.target_coefficients(t)
    a_r, s_r, _, _ = T.interpolant(r)
    C = a_t * sh_t - s_t * ah_t
    A = (a_r * sh_t - s_r * ah_t) / C
    B = (s_r * a_t - a_r * s_t) / C
    dB, dah, dsh = (ddt(q, t) for q in (B, ah_t, sh_t))
    return A.detach(), B.detach(), dB, ah_t.detach(), sh_t.detach(), dah, dsh


@pytest.mark.parametrize("name,params", CASES, ids=IDS)
def test_interpolant_derivatives_match_autograd(name, params):
    T = get_transport(name, **params)
    t, _ = random_times(T)
    t = t.requires_grad_(True)
    a, s, da, ds = T.interpolant(t)
    assert torch.allclose(ddt(a, t), da.expand_as(t), rtol=1e-9)
    assert torch.allclose(ddt(s, t), ds.expand_as(t), rtol=1e-9)


@pytest.mark.parametrize("name,params", CASES, ids=IDS)
def test_exact_output_lands_on_the_path(name, params):
    """Single-point data: with F = the true h_t, transition(x_t) is exactly x_r on the same (x, eps) path."""
    T = get_transport(name, **params)
    t, r = random_times(T)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 3, generator=g, dtype=torch.float64).expand(len(t), 3)  # one data point
    eps = torch.randn(len(t), 3, generator=g, dtype=torch.float64)
    x_t, h = T.path(x, eps, t), T.diffusion_target(x, eps, t)
    x_r = T.transition(x_t, h, t, r)
    assert (x_r - T.path(x, eps, r)).abs().max() < 1e-6


@pytest.mark.parametrize("name,params", CASES, ids=IDS)
def test_transition_matches_general_A_B(name, params):
    T = get_transport(name, **params)
    t, r = random_times(T)
    A, B, *_ = general(T, t, r)
    g = torch.Generator().manual_seed(2)
    x_t, F = torch.randn(2, len(t), 4, generator=g, dtype=torch.float64)
    expected = A[:, None] * x_t + B[:, None] * F
    assert torch.allclose(T.transition(x_t, F, t, r), expected, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("name,params", CASES, ids=IDS)
def test_transition_target_is_the_state_transition_identity(name, params):
    """F_target from the closed form equals h + (B / B') (h' - dF/dt) with B' and h' from autograd."""
    T = get_transport(name, **params)
    t, r = random_times(T)
    keep = t - r > 1e-6 * T.T_max
    t, r = t[keep], r[keep]
    g = torch.Generator().manual_seed(3)
    x, eps, dF_dt = torch.randn(3, len(t), 4, generator=g, dtype=torch.float64)
    _, B, dB, ah, sh, dah, dsh = general(T, t, r)
    h = ah[:, None] * x + sh[:, None] * eps
    dh = dah[:, None] * x + dsh[:, None] * eps
    expected = h + (B / dB)[:, None] * (dh - dF_dt)
    got = T.transition_target(x, eps, t, r, dF_dt)
    assert torch.allclose(got, expected, rtol=1e-7, atol=1e-7 * expected.abs().max().item())


@pytest.mark.parametrize("name,params", CASES, ids=IDS)
def test_zero_interval_is_identity_and_targets_h(name, params):
    T = get_transport(name, **params)
    t, _ = random_times(T)
    g = torch.Generator().manual_seed(4)
    x, eps, F = torch.randn(3, len(t), 5, generator=g, dtype=torch.float64)
    x_t = T.path(x, eps, t)
    assert torch.allclose(T.transition(x_t, F, t, t), x_t, rtol=1e-12, atol=1e-12)
    assert torch.equal(T.transition_target(x, eps, t, t, F), T.diffusion_target(x, eps, t))


@pytest.mark.parametrize("name", list(TRANSPORTS))
def test_sample_t_in_range_and_seeded(name):
    T = get_transport(name)
    t1 = T.sample_t(4096, generator=torch.Generator().manual_seed(0))
    t2 = T.sample_t(4096, generator=torch.Generator().manual_seed(0))
    assert torch.equal(t1, t2)
    assert t1.min() >= T.T_min and t1.max() <= T.T_max
    assert torch.isfinite(T.c_noise(t1.clamp(min=max(T.T_min, 1e-6)))).all()


def test_broadcasts_scalar_and_row_times():
    T = get_transport("ot_fm")
    x = torch.randn(6, 2, 3, 3)
    F = torch.randn_like(x)
    by_row = T.transition(x, F, torch.full((6,), 0.7), torch.full((6,), 0.2))
    assert torch.allclose(by_row, T.transition(x, F, 0.7, 0.2))
    assert torch.allclose(by_row, x - 0.5 * F)


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="unknown transport name 'rectified'.*ot_fm, trigflow, edm, vp, ve"):
        get_transport("rectified")
    with pytest.raises(ValueError, match="bad parameters for transport 'edm'"):
        get_transport("edm", sigma_data=0.5)
    T = get_transport("ot_fm")
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"t must lie in \[T_min, T_max\]"):
        T.transition(x, x, 1.5, 0.0)
    with pytest.raises(ValueError, match="r must be <= t"):
        T.transition(x, x, 0.3, 0.6)
    with pytest.raises(ValueError, match="r must be >= T_min"):
        T.transition_target(x, x, 0.3, -0.1, x)


def test_prior_scale():
    assert get_transport("ot_fm").prior_scale() == 1.0
    assert math.isclose(get_transport("ve").prior_scale(), 100.0)
    assert math.isclose(get_transport("trigflow").prior_scale(), 1.0, abs_tol=1e-12)


@pytest.mark.parametrize("name,params", CASES, ids=IDS)
def test_predict_endpoints_inverts_the_path_and_to_data_returns_x(name, params):
    """[x_t; h_t] -> (x, eps) exactly, and (x_r - sigma(r) eps) / alpha(r) = x at every r."""
    T = get_transport(name, **params)
    t, r = random_times(T)
    g = torch.Generator().manual_seed(5)
    x, eps = torch.randn(2, len(t), 3, generator=g, dtype=torch.float64)
    x_hat, eps_hat = T.predict_endpoints(T.path(x, eps, t), T.diffusion_target(x, eps, t), t)
    assert torch.allclose(x_hat, x, rtol=1e-9, atol=1e-9) and torch.allclose(eps_hat, eps, rtol=1e-9, atol=1e-9)
    for time in (r, torch.full_like(t, T.T_min)):
        assert torch.allclose(T.to_data(T.path(x, eps, time), time, eps), x, rtol=1e-9, atol=1e-9)


def _vp_b(t):
    return torch.sqrt(torch.expm1(0.5 * 19.9 * t * t + 0.1 * t))


@pytest.mark.parametrize("name,expected", [
    ("ot_fm", lambda t: t),
    ("trigflow", lambda t: torch.sin(t) / (torch.sin(t) + torch.cos(t))),
    ("edm", lambda t: t / (1 + t)),  # sigma / alpha = t for EDM and VE
    ("vp", lambda t: _vp_b(t) / (1 + _vp_b(t))),
    ("ve", lambda t: t / (1 + t)),
])
def test_ot_time_is_the_ot_fm_time_with_the_same_noise_to_signal_ratio(name, expected):
    T = get_transport(name)
    t = torch.linspace(T.T_min, T.T_max, 257, dtype=torch.float64)
    u = T.ot_time(t)
    assert torch.allclose(u, expected(t), rtol=1e-12, atol=1e-12)
    assert (u[1:] > u[:-1]).all() and u[0] >= 0 and u[-1] <= 1
    if name == "ot_fm":
        assert torch.equal(u, t)  # exactly t: the OT-FM weighting is unchanged


@pytest.mark.parametrize("name,step", [("ot_fm", "linear"), ("trigflow", "linear"), ("edm", "log"), ("vp", "log"),
                                       ("ve", "log")])
def test_dde_times_step_in_t_or_ln_t_and_stay_inside(name, step):
    T = get_transport(name)
    assert T.dde_step == step
    e = 0.005
    t = torch.tensor([0.5 * (T.T_min + T.T_max), T.T_max, T.T_min + 1e-3], dtype=torch.float64)
    r = torch.tensor([T.T_min, 0.5 * (T.T_min + T.T_max), T.T_min + 1e-3], dtype=torch.float64)
    up, down = T.dde_times(t, r, e)
    mid = t[0].item()
    want = (mid + e, mid - e) if step == "linear" else (mid * math.exp(e), mid * math.exp(-e))
    assert (up[0].item(), down[0].item()) == pytest.approx(want, rel=1e-12)
    assert up[1] == T.T_max and down[1] < T.T_max  # clamped at T_max: one-sided
    assert down[2] == r[2]                          # never below r


def test_vp_network_time_is_smooth_over_a_dde_step():
    """VP's c_noise moves little over one DDE step everywhere (the paper's 999 t moves ~5 per step)."""
    T = get_transport("vp")
    t = torch.linspace(T.T_min, 1.0, 1001, dtype=torch.float64)
    up, down = T.dde_times(t, torch.full_like(t, T.T_min), 0.005)
    assert (T.c_noise(up) - T.c_noise(down)).abs().max() < 0.05  # measured 0.025 (at t = 1)
