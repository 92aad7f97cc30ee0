"""Sampler contract: grid endpoints, identity at zero interval, guidance window and NFE, seeds, shape, dtype."""

import pytest
import torch

from tim_core import TRANSPORTS, get_transport, sample, time_grid

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
