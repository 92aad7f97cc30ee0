"""Paths ("transports") between data and noise, and the transition that moves a state from time t to r <= t.

A path is x_t = alpha(t) x + sigma(t) eps. The network regresses a "diffusion target" h_t = ah(t) x + sh(t) eps;
solving [x_t; h_t] for (x, eps) and re-noising to time r gives the first-order transition x_r = A x_t + B F
(docs/method.md section 2). Each path below states its coefficients and the closed forms of the transition and of
the state-transition-identity target (section 3); tests/core/test_transports.py checks the closed forms against
the general formulas numerically.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Callable

import torch
from torch import Tensor

__all__ = ["Transport", "OTFM", "TrigFlow", "EDM", "VP", "VE", "get_transport", "TRANSPORTS"]


def _like(t: Tensor | float, x: Tensor) -> Tensor:
    """Broadcast a time against x: a per-row vector (B,) becomes (B, 1, ..., 1); scalars stay scalars."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    if t.dim() == 1 and x.dim() > 1 and t.shape[0] == x.shape[0]:
        t = t.view(-1, *([1] * (x.dim() - 1)))
    return t


def _logit_normal_sigma(n: int, p_mean: float, p_std: float, generator, device, dtype) -> Tensor:
    """sigma with ln(sigma) ~ N(p_mean, p_std^2), the time proposal used by OT-FM, TrigFlow and EDM."""
    z = torch.randn(n, generator=generator, device=device, dtype=dtype)
    return (z * p_std + p_mean).exp()


class Transport(ABC):
    """Base class. Subclasses define the coefficients and the closed-form transition and target."""

    name: str = ""
    T_min: float
    T_max: float
    sigma_d: float  # data scale used by the time weighting of the objective
    # How the DDE step is taken (docs/method.md section 4.2): "linear" evaluates F at t +- e, "log" at
    # t * exp(+-e), a step of e in ln t. Paths whose noise level spans decades (EDM, VE, VP) use "log".
    dde_step: str = "linear"

    def __init__(self, **params):
        self.params = params  # what get_transport needs to rebuild this path (saved with models)

    # --- coefficients -------------------------------------------------------------------------------------
    @abstractmethod
    def interpolant(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(alpha, sigma, d_alpha/dt, d_sigma/dt) at t."""
        ...

    @abstractmethod
    def target_coefficients(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(ah, sh) with the diffusion target h_t = ah x + sh eps."""
        ...

    @abstractmethod
    def sample_t(self, n: int, generator: torch.Generator | None = None, device=None,
                 dtype=torch.float32) -> Tensor:
        """n training times from the path's proposal distribution, inside [T_min, T_max]."""
        ...

    @abstractmethod
    def c_noise(self, t: Tensor) -> Tensor:
        """The time value the network sees (its embedding input), chosen per path so that the DDE step moves it
        smoothly (docs/method.md section 2.3)."""
        ...

    # --- the path -----------------------------------------------------------------------------------------
    def path(self, x: Tensor, eps: Tensor, t) -> Tensor:
        """x_t = alpha(t) x + sigma(t) eps."""
        a, s, _, _ = self.interpolant(_like(t, x))
        return a * x + s * eps

    def velocity(self, x: Tensor, eps: Tensor, t) -> Tensor:
        """dx_t/dt along the path through (x, eps)."""
        _, _, da, ds = self.interpolant(_like(t, x))
        return da * x + ds * eps

    def diffusion_target(self, x: Tensor, eps: Tensor, t) -> Tensor:
        """h_t, what a plain diffusion model regresses (and TiM at r = t)."""
        ah, sh = self.target_coefficients(_like(t, x))
        return ah * x + sh * eps

    def ot_time(self, t) -> Tensor:
        """The OT-FM time with the same noise-to-signal ratio: sigma / (alpha + sigma), in [0, 1].

        A clock shared by every path, used by the time weighting (docs/method.md section 4.5) and the
        model-guidance window (section 5). For OT-FM it is t itself.
        """
        t = torch.as_tensor(t)
        a, s, _, _ = self.interpolant(t)
        return s / (a + s)

    def predict_endpoints(self, x_t: Tensor, F: Tensor, t) -> tuple[Tensor, Tensor]:
        """(x_hat, eps_hat): the data and noise that the pair [x_t; F] implies at time t.

        Solves x_t = alpha x + sigma eps, F = ah x + sh eps (docs/method.md section 2.2).
        """
        t = _like(t, x_t)
        a, s, _, _ = self.interpolant(t)
        ah, sh = self.target_coefficients(t)
        C = a * sh - s * ah
        return (sh * x_t - s * F) / C, (a * F - ah * x_t) / C

    def to_data(self, x_r: Tensor, r, eps_hat: Tensor) -> Tensor:
        """Map a state at time r back to data space: x = (x_r - sigma(r) eps_hat) / alpha(r).

        The sampler applies it to the state at T_min with the noise estimate of its last step, so every path
        returns data (docs/method.md section 7.5); with alpha(T_min) = 1 and sigma(T_min) = 0 (OT-FM,
        TrigFlow) it returns x_r unchanged.
        """
        a, s, _, _ = self.interpolant(_like(r, x_r))
        return (x_r - s * eps_hat) / a

    def dde_times(self, t: Tensor, r: Tensor, e: float) -> tuple[Tensor, Tensor]:
        """The two times of the DDE central difference around t: (t_plus, t_minus).

        t_plus is clamped to T_max and t_minus to r (r <= t - e, a one-sided difference near the ends).
        """
        if self.dde_step == "log":
            up, down = t * math.exp(e), t * math.exp(-e)
        else:
            up, down = t + e, t - e
        return up.clamp(max=self.T_max), torch.maximum(down, r)

    def prior_scale(self) -> float:
        """Standard deviation of the noise part at T_max: the sampler starts from prior_scale() * N(0, I)."""
        return float(self.interpolant(torch.tensor(self.T_max, dtype=torch.float64))[1])

    # --- transition ---------------------------------------------------------------------------------------
    def transition(self, x_t: Tensor, F: Tensor, t, r) -> Tensor:
        """x_r = A(t, r) x_t + B(t, r) F: move the state at time t to time r <= t."""
        t, r = self.check_times(t, r, x_t)
        return self._transition(x_t, F, t, r)

    def transition_target(self, x: Tensor, eps: Tensor, t, r, dF_dt: Tensor) -> Tensor:
        """F_target = h_t + (B / dB/dt) (dh_t/dt - dF/dt): the state-transition identity solved for F.

        dF_dt is the total derivative of the network output along the path (x_t moving, r fixed).
        """
        t, r = self.check_times(t, r, x)
        return self._transition_target(x, eps, t, r, dF_dt)

    @abstractmethod
    def _transition(self, x_t, F, t, r):
        ...

    @abstractmethod
    def _transition_target(self, x, eps, t, r, dF_dt):
        ...

    def check_times(self, t, r, x: Tensor) -> tuple[Tensor, Tensor]:
        """Broadcast t and r against x and reject times outside [T_min, T_max] or r > t."""
        t, r = _like(t, x), _like(r, x)
        tol = 1e-6 * max(1.0, self.T_max)
        if bool((t < self.T_min - tol).any() | (t > self.T_max + tol).any()):
            raise ValueError(f"t must lie in [T_min, T_max] = [{self.T_min}, {self.T_max}] for transport "
                             f"'{self.name}'; got values in [{float(t.min())}, {float(t.max())}]")
        if bool((r < self.T_min - tol).any()):
            raise ValueError(f"r must be >= T_min = {self.T_min} for transport '{self.name}'; got {float(r.min())}")
        if bool((r > t + tol).any()):
            raise ValueError("r must be <= t (a transition goes from time t back to an earlier time r); "
                             f"got r - t up to {float((r - t).max())}")
        return t, r

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.params.items())
        return f"{type(self).__name__}({args})"


class OTFM(Transport):
    """Linear (rectified) flow: alpha = 1 - t, sigma = t, target the velocity v = eps - x."""

    name = "ot_fm"

    def __init__(self, P_mean: float = -0.4, P_std: float = 1.0, sigma_d: float = 1.0):
        super().__init__(P_mean=P_mean, P_std=P_std, sigma_d=sigma_d)
        self.P_mean, self.P_std, self.sigma_d = P_mean, P_std, sigma_d
        self.T_min, self.T_max = 0.0, 1.0

    def interpolant(self, t):
        return 1 - t, t, -torch.ones_like(t), torch.ones_like(t)

    def target_coefficients(self, t):
        return -torch.ones_like(t), torch.ones_like(t)

    def sample_t(self, n, generator=None, device=None, dtype=torch.float32):
        sig = _logit_normal_sigma(n, self.P_mean, self.P_std, generator, device, dtype)
        return sig / (1 + sig)

    def c_noise(self, t):
        # t itself: a DiT-style 1000 t would turn the DDE step e = 0.005 into 5-radian phase steps at the
        # embedding's highest frequency, and the central difference would no longer estimate dF/dt.
        return t

    def ot_time(self, t):
        return torch.as_tensor(t)  # exactly t (sigma / (alpha + sigma) can round differently)

    def _transition(self, x_t, F, t, r):
        return x_t - (t - r) * F

    def _transition_target(self, x, eps, t, r, dF_dt):
        return (eps - x) - (t - r) * dF_dt


class TrigFlow(Transport):
    """TrigFlow: alpha = cos t, sigma = sin t on [0, pi/2], target the velocity."""

    name = "trigflow"

    def __init__(self, P_mean: float = -1.0, P_std: float = 1.6, sigma_d: float = 0.5):
        super().__init__(P_mean=P_mean, P_std=P_std, sigma_d=sigma_d)
        self.P_mean, self.P_std, self.sigma_d = P_mean, P_std, sigma_d
        self.T_min, self.T_max = 0.0, math.pi / 2

    def interpolant(self, t):
        return torch.cos(t), torch.sin(t), -torch.sin(t), torch.cos(t)

    def target_coefficients(self, t):
        return -torch.sin(t), torch.cos(t)

    def sample_t(self, n, generator=None, device=None, dtype=torch.float32):
        return torch.atan(_logit_normal_sigma(n, self.P_mean, self.P_std, generator, device, dtype))

    def c_noise(self, t):
        return t  # as OT-FM: keeps the DDE step small against the time embedding's frequencies

    def _transition(self, x_t, F, t, r):
        return torch.cos(t - r) * x_t - torch.sin(t - r) * F

    def _transition_target(self, x, eps, t, r, dF_dt):
        a, s, da, ds = self.interpolant(t)
        x_t, v = a * x + s * eps, da * x + ds * eps
        return v - torch.tan(t - r) * (x_t + dF_dt)


class EDM(Transport):
    """EDM in the unit-variance form: alpha = 1/S, sigma = t/S with S = sqrt(t^2 + sd^2).

    Target h = t/(sd S) x - sd/S eps (EDM's F-prediction). A, B and B/B' are derived from the general
    formula, so they are right for any sigma_d (docs/method.md section 10: the authors' coefficients are only
    right for sigma_d = 1). The DDE step is taken in ln t (t spans [0.002, 80]).
    """

    name = "edm"
    dde_step = "log"

    def __init__(self, P_mean: float = -1.2, P_std: float = 1.2, sigma_d: float = 0.5,
                 T_min: float = 0.002, T_max: float = 80.0):
        super().__init__(P_mean=P_mean, P_std=P_std, sigma_d=sigma_d, T_min=T_min, T_max=T_max)
        self.P_mean, self.P_std, self.sigma_d = P_mean, P_std, sigma_d
        self.T_min, self.T_max = T_min, T_max

    def _S(self, t):
        return torch.sqrt(t * t + self.sigma_d ** 2)

    def interpolant(self, t):
        S = self._S(t)
        sd2 = self.sigma_d ** 2
        return 1 / S, t / S, -t / S ** 3, sd2 / S ** 3

    def target_coefficients(self, t):
        S, sd = self._S(t), self.sigma_d
        return t / (sd * S), -sd / S

    def sample_t(self, n, generator=None, device=None, dtype=torch.float32):
        t = _logit_normal_sigma(n, self.P_mean, self.P_std, generator, device, dtype)
        return t.clamp(self.T_min, self.T_max)

    def c_noise(self, t):
        return torch.log(t) / 4

    def _transition(self, x_t, F, t, r):
        St, Sr, sd = self._S(t), self._S(r), self.sigma_d
        return ((sd ** 2 + t * r) * x_t + sd * (t - r) * F) / (St * Sr)

    def _transition_target(self, x, eps, t, r, dF_dt):
        S, sd = self._S(t), self.sigma_d
        h = self.diffusion_target(x, eps, t)
        dh_dt = sd / S ** 3 * (x + t * eps)
        B_over_dB = (t - r) * (t * t + sd ** 2) / (sd ** 2 + t * r)
        return h + B_over_dB * (dh_dt - dF_dt)


class VP(Transport):
    """Variance preserving: alpha = 1/sqrt(b^2 + 1), sigma = b/sqrt(b^2 + 1), b(t)^2 = exp(bd t^2/2 + bmin t) - 1.

    Target the noise eps. b = sigma / alpha is the noise level; the network sees ln(b) / 4 (EDM's choice for
    its own noise level) instead of the paper's 999 t, and the DDE step is taken in ln t, where b is smooth
    (b ~ sqrt(bmin t) near t = 0). docs/method.md sections 2.3 and 4.2.
    """

    name = "vp"
    dde_step = "log"

    def __init__(self, beta_d: float = 19.9, beta_min: float = 0.1, T_min: float = 1e-5, sigma_d: float = 1.0):
        super().__init__(beta_d=beta_d, beta_min=beta_min, T_min=T_min, sigma_d=sigma_d)
        self.beta_d, self.beta_min, self.sigma_d = beta_d, beta_min, sigma_d
        self.T_min, self.T_max = T_min, 1.0

    def _b(self, t):
        u = 0.5 * self.beta_d * t * t + self.beta_min * t
        b = torch.sqrt(torch.expm1(u))
        db = torch.exp(u) * (self.beta_d * t + self.beta_min) / (2 * b)
        return b, db

    def interpolant(self, t):
        b, db = self._b(t)
        n = torch.sqrt(b * b + 1)
        return 1 / n, b / n, -b * db / n ** 3, db / n ** 3

    def target_coefficients(self, t):
        return torch.zeros_like(t), torch.ones_like(t)

    def sample_t(self, n, generator=None, device=None, dtype=torch.float32):
        u = torch.rand(n, generator=generator, device=device, dtype=dtype)
        return self.T_min + (self.T_max - self.T_min) * u

    def c_noise(self, t):
        # ln(b) / 4 with b^2 = expm1(u): in [-1.73, 1.26] over [1e-5, 1]. The paper's 999 t moves the time
        # embedding by ~5 radians over one DDE step and the central difference stops estimating dF/dt.
        u = 0.5 * self.beta_d * t * t + self.beta_min * t
        return torch.log(torch.expm1(u)) / 8

    def _transition(self, x_t, F, t, r):
        bt, _ = self._b(t)
        br, _ = self._b(r)
        nr = torch.sqrt(br * br + 1)
        return torch.sqrt(bt * bt + 1) / nr * x_t + (br - bt) / nr * F

    def _transition_target(self, x, eps, t, r, dF_dt):
        bt, dbt = self._b(t)
        br, _ = self._b(r)
        return eps - (bt - br) / dbt * dF_dt


class VE(Transport):
    """Variance exploding: alpha = 1, sigma = t, target -eps. The DDE step is taken in ln t (t spans
    [0.02, 100])."""

    name = "ve"
    dde_step = "log"

    def __init__(self, T_min: float = 0.02, T_max: float = 100.0, sigma_d: float = 1.0):
        super().__init__(T_min=T_min, T_max=T_max, sigma_d=sigma_d)
        self.sigma_d = sigma_d
        self.T_min, self.T_max = T_min, T_max

    def interpolant(self, t):
        return torch.ones_like(t), t, torch.zeros_like(t), torch.ones_like(t)

    def target_coefficients(self, t):
        return torch.zeros_like(t), -torch.ones_like(t)

    def sample_t(self, n, generator=None, device=None, dtype=torch.float32):
        u = torch.rand(n, generator=generator, device=device, dtype=dtype)
        lo, hi = math.log(self.T_min), math.log(self.T_max)
        return torch.exp(lo + (hi - lo) * u)

    def c_noise(self, t):
        return torch.log(t / 2)

    def _transition(self, x_t, F, t, r):
        return x_t + (t - r) * F

    def _transition_target(self, x, eps, t, r, dF_dt):
        return (r - t) * dF_dt - eps


TRANSPORTS: dict[str, Callable[..., Transport]] = {
    cls.name: cls for cls in (OTFM, TrigFlow, EDM, VP, VE)
}


def get_transport(name: str = "ot_fm", **params) -> Transport:
    """Build a path by name: ot_fm (default), trigflow, edm, vp, ve. params override the path's defaults."""
    if name not in TRANSPORTS:
        raise ValueError(f"unknown transport name {name!r}; allowed: {', '.join(TRANSPORTS)}")
    try:
        return TRANSPORTS[name](**params)
    except TypeError as e:
        raise ValueError(f"bad parameters for transport {name!r}: {e}") from None
