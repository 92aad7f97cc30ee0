"""Any-step sampling (docs/method.md section 7): one network, a float64 time grid from T_max to T_min, one
transition per step, classifier-free guidance inside a time window, an honest count of network evaluations (NFE),
and a final map of the state at T_min to data space."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from .transports import Transport, get_transport

__all__ = ["sample", "SampleResult", "time_grid", "GRIDS", "default_grid"]

GRIDS = ("uniform", "karras", "log")
KARRAS_RHO = 7.0


@dataclass
class SampleResult:
    samples: Tensor                 # data-space samples, shape and dtype of the noise
    nfe: int                        # network evaluations per sample (a guided step counts 2)
    times: Tensor                   # the float64 grid t_0 = T_max > ... > t_N = T_min
    trajectory: Tensor | None = None  # (steps + 1, *noise.shape) path states at the grid times, when asked


def default_grid(transport: Transport) -> str:
    """"karras" for the paths whose time is a noise level spanning decades (EDM, VE), else "uniform"."""
    return "karras" if transport.name in ("edm", "ve") else "uniform"


def time_grid(transport: Transport, steps: int, kind: str | None = None) -> Tensor:
    """float64 grid of steps + 1 decreasing times, exactly T_max first and T_min last (docs/method.md 7.1).

    kind: "uniform" in t; "karras" uniform in t^(1/7) (Karras et al. 2022, rho = 7); "log" uniform in ln t
    (needs T_min > 0); None: ``default_grid(transport)``.
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps (the number of transitions, NFE without guidance) must be an int >= 1; got {steps!r}")
    kind = default_grid(transport) if kind is None else kind
    if kind not in GRIDS:
        raise ValueError(f"grid must be one of {', '.join(GRIDS)}; got {kind!r}")
    hi, lo = float(transport.T_max), float(transport.T_min)
    u = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)
    if kind == "uniform":
        grid = torch.linspace(hi, lo, steps + 1, dtype=torch.float64)
    elif kind == "karras":
        a, b = hi ** (1 / KARRAS_RHO), lo ** (1 / KARRAS_RHO)
        grid = (a + u * (b - a)) ** KARRAS_RHO
    else:
        if lo <= 0:
            raise ValueError(f"grid 'log' needs T_min > 0; transport {transport.name!r} has T_min = {lo}")
        grid = torch.exp(math.log(hi) + u * (math.log(lo) - math.log(hi)))
    grid[0], grid[-1] = hi, lo
    return grid


@torch.no_grad()
def sample(model: nn.Module, noise: Tensor, labels: Tensor, steps: int, transport: Transport | None = None,
           cfg_scale: float = 1.0, cfg_interval: tuple[float, float] = (0.0, 1.0), stochasticity: float = 0.0,
           mode: Literal["transition", "diffusion"] = "transition", return_trajectory: bool = False,
           null_label: int | None = None, generator: torch.Generator | None = None,
           grid: str | None = None) -> SampleResult:
    """Generate from standard-normal ``noise`` in ``steps`` transitions.

    Args:
        model: any ``net(x_t, c_noise(t), c_noise(r), labels)``; its ``num_classes`` is the null label unless
            ``null_label`` is given.
        noise: N(0, I) of the data's shape; the start state is ``transport.prior_scale() * noise``.
        labels: (B,) class ids.
        steps: number of transitions (>= 1).
        transport: the path the model was trained on (default OT-FM).
        cfg_scale: guidance F = F_u + w (F_c - F_u), applied when t lies in [lo, hi] * T_max, endpoints included.
        stochasticity: rho of the OT-FM stochastic step (never on the first or last step); 0 = deterministic.
        mode: "transition" uses F(x, t_i, t_{i+1}); "diffusion" uses F(x, t_i, t_i) with the same update.
        generator: for the stochastic noise.
        grid: the time grid, "uniform", "karras" or "log"; None = ``default_grid(transport)`` ("karras" for
            EDM and VE).

    The returned samples are in data space: the state at T_min is mapped back with the last step's noise
    estimate, x = (x_Tmin - sigma(T_min) eps_hat) / alpha(T_min) (docs/method.md section 7.5).
    """
    transport = transport or get_transport("ot_fm")
    if mode not in ("transition", "diffusion"):
        raise ValueError(f"mode must be one of transition, diffusion; got {mode!r}")
    if labels.shape != (noise.shape[0],):
        raise ValueError(f"labels must have shape ({noise.shape[0]},) to match noise of shape "
                         f"{tuple(noise.shape)}; got {tuple(labels.shape)}")
    lo, hi = cfg_interval
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"cfg_interval must satisfy 0 <= lo <= hi <= 1; got {cfg_interval}")
    if stochasticity < 0 or (stochasticity > 0 and transport.name != "ot_fm"):
        raise ValueError(f"stochasticity must be >= 0 and is defined for the ot_fm transport only; "
                         f"got {stochasticity} with {transport.name!r}")
    guided = cfg_scale != 1.0
    if guided:
        null_label = getattr(model, "num_classes", None) if null_label is None else null_label
        if null_label is None:
            raise ValueError("cfg_scale != 1 needs null_label (or a model with a num_classes attribute)")

    times = time_grid(transport, steps, grid)
    net_dtype = next(model.parameters(), noise).dtype  # run the net in its own dtype, keep the state in noise's
    x = noise * transport.prior_scale()
    trajectory = [x] if return_trajectory else None
    nfe = 0
    for i in range(steps):
        t, r = times[i], times[i + 1]
        r_net = t if mode == "diffusion" else r
        c_t, c_r = transport.c_noise(t).float(), transport.c_noise(r_net).float()
        x_in = x.to(net_dtype)
        if guided and lo * transport.T_max <= float(t) <= hi * transport.T_max:
            F_c, F_u = model(torch.cat([x_in, x_in]), c_t, c_r,
                             torch.cat([labels, torch.full_like(labels, null_label)])).chunk(2)
            F = F_u + cfg_scale * (F_c - F_u)
            nfe += 2
        else:
            F = model(x_in, c_t, c_r, labels)
            nfe += 1
        F = F.to(x.dtype)
        x_r = transport.transition(x, F, t.to(x.dtype), r.to(x.dtype))
        if i == steps - 1:  # the noise estimate that maps the final state to data
            _, eps_hat = transport.predict_endpoints(x, F, t.to(x.dtype))
        if stochasticity > 0 and 0 < i < steps - 1:
            dt = float(t - r)
            noise_hat = x + (1 - float(t)) * F
            z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x_r = x_r - stochasticity * noise_hat * dt + (2 * stochasticity * float(t) * dt) ** 0.5 * z
        x = x_r
        if trajectory is not None:
            trajectory.append(x)
    samples = transport.to_data(x, times[-1].to(x.dtype), eps_hat)
    return SampleResult(samples=samples, nfe=nfe, times=times,
                        trajectory=torch.stack(trajectory) if trajectory is not None else None)
