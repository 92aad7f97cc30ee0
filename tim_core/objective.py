"""The TiM training objective (spec section 3) and the two baselines expressed as settings of it.

Every objective is a callable ``loss, logs = objective(net, x, labels, generator=None)`` where
``net(x_t, c_noise(t), c_noise(r), labels)`` is the network: the objective applies the path's c_noise.
Flow matching is TiM with every row a diffusion row (r = t); MeanFlow is TiM on OT-FM with the JVP derivative,
a quarter of the rows with r != t and constant time weighting, as in its paper.
"""

from __future__ import annotations

import math
from typing import Callable, Literal

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from .transports import Transport, _like

__all__ = ["TransitionLoss", "FlowMatchingLoss", "MeanFlowLoss", "build_objective", "OBJECTIVES"]

Net = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]
WEIGHTINGS = ("constant", "sqrt", "reciprocal", "square", "soft_min_snr")
WEIGHT_TAUS = ("tan", "snr")


def _wide(x: Tensor) -> Tensor:
    """At least float32 (bf16/fp16 outputs are widened, float64 kept) for differences and the loss."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(str, allowed))}; got {value!r}")


def _ratio(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1]; got {value}")


class TransitionLoss:
    """TiM loss: regress F(x_t, t, r) onto sg(F_target) from the state-transition identity.

    Args:
        transport: the path (see ``get_transport``).
        diffusion_ratio: share of rows with r = t (plain diffusion rows, target h_t, weight 1).
        consistency_ratio: share of rows with r = T_min (one-step rows).
        derivative: "dde" (central finite difference, forward passes only) or "jvp" (torch.func.jvp).
        dde_eps: the finite-difference step e.
        weighting: time weight w(t, r) = (sigma_d + tau(t) - tau(r))^-p with p = 1/2 ("sqrt", the paper's
            default), 1 ("reciprocal") or 2 ("square"); "soft_min_snr" is 1 / ((tau(t) - tau(r))^2 + sigma_d^2);
            "constant" is 1.
        weight_tau: tau = tan ("tan") or t / (1 - t) ("snr").
        adaptive: divide each row's loss by sg(loss) + adaptive_c (the paper's adaptive weighting).
        directional: weight of the extra term mean(1 - cos(F, F_target)) over channels (0 = off).
        label_dropout: probability of replacing a label by ``null_label`` (classifier-free guidance).
        null_label: the null class id (the network's ``num_classes``); needed when label_dropout > 0.
    """

    def __init__(self, transport: Transport, *, diffusion_ratio: float = 0.5, consistency_ratio: float = 0.1,
                 derivative: Literal["dde", "jvp"] = "dde", dde_eps: float = 0.005,
                 weighting: str = "sqrt", weight_tau: str = "tan", adaptive: bool = True,
                 adaptive_c: float = 1e-5, directional: float = 0.0, label_dropout: float = 0.1,
                 null_label: int | None = None):
        _ratio("diffusion_ratio", diffusion_ratio)
        _ratio("consistency_ratio", consistency_ratio)
        if diffusion_ratio + consistency_ratio > 1.0:
            raise ValueError("diffusion_ratio + consistency_ratio must be <= 1; "
                             f"got {diffusion_ratio} + {consistency_ratio}")
        _choice("derivative", derivative, ("dde", "jvp"))
        _choice("weighting", weighting, WEIGHTINGS)
        _choice("weight_tau", weight_tau, WEIGHT_TAUS)
        _ratio("label_dropout", label_dropout)
        if dde_eps <= 0:
            raise ValueError(f"dde_eps must be > 0; got {dde_eps}")
        tau_limit = {"tan": math.pi / 2, "snr": 1.0}[weight_tau]
        if weighting != "constant" and transport.T_max > tau_limit:
            raise ValueError(f"weight_tau={weight_tau!r} needs T_max <= {tau_limit:.4g}, but transport "
                             f"{transport.name!r} has T_max = {transport.T_max}; use weighting='constant'")
        if label_dropout > 0 and null_label is None:
            raise ValueError("null_label (the network's num_classes) is required when label_dropout > 0")
        self.transport = transport
        self.diffusion_ratio, self.consistency_ratio = diffusion_ratio, consistency_ratio
        self.derivative, self.dde_eps = derivative, dde_eps
        self.weighting, self.weight_tau = weighting, weight_tau
        self.adaptive, self.adaptive_c = adaptive, adaptive_c
        self.directional = directional
        self.label_dropout, self.null_label = label_dropout, null_label

    # --- (t, r) pairs -------------------------------------------------------------------------------------
    def sample_pairs(self, n: int, generator=None, device=None) -> tuple[Tensor, Tensor, int]:
        """t = max(t1, t2), r = min(t1, t2); the first rows get r = t, the next r = T_min.

        Returns (t, r, n_diffusion_rows). Rows are i.i.d., so assigning kinds by position is unbiased.
        """
        T = self.transport
        t1 = T.sample_t(n, generator=generator, device=device)
        t2 = T.sample_t(n, generator=generator, device=device)
        t, r = torch.maximum(t1, t2), torch.minimum(t1, t2)
        n_diff = round(self.diffusion_ratio * n)
        n_cons = min(round(self.consistency_ratio * n), n - n_diff)
        r = r.clone()
        r[:n_diff] = t[:n_diff]
        r[n_diff:n_diff + n_cons] = T.T_min
        return t, r, n_diff

    # --- dF/dt along the path -----------------------------------------------------------------------------
    def _net_on_path(self, net: Net, x, eps, t, r, labels) -> Tensor:
        T = self.transport
        return net(T.path(x, eps, t), T.c_noise(t), T.c_noise(r), labels)

    @torch.no_grad()
    def _dF_dt_dde(self, net: Net, x, eps, t, r, labels) -> Tensor:
        """Central difference of F along the path, both evaluations in ONE forward of the stacked rows."""
        T = self.transport
        t_plus = (t + self.dde_eps).clamp(max=T.T_max)
        t_minus = torch.maximum(t - self.dde_eps, r)  # keep r <= t - e: one-sided near r = t
        F = self._net_on_path(net, torch.cat([x, x]), torch.cat([eps, eps]), torch.cat([t_plus, t_minus]),
                              torch.cat([r, r]), torch.cat([labels, labels]))
        F_plus, F_minus = _wide(F).chunk(2)
        return (F_plus - F_minus) / _like(t_plus - t_minus, F_plus)

    @torch.no_grad()
    def _dF_dt_jvp(self, net: Net, x, eps, t, r, labels) -> Tensor:
        """Forward-mode derivative along the tangent (dx_t = v_t, dt = 1, dr = 0)."""
        def along_path(tt):
            return self._net_on_path(net, x, eps, tt, r, labels)
        # Fused/flash attention kernels have no forward-mode derivative (the paper's case for DDE): use the
        # math kernel, which autograd can differentiate forward.
        with sdpa_kernel(SDPBackend.MATH):
            _, dF = torch.func.jvp(along_path, (t,), (torch.ones_like(t),))
        return _wide(dF)

    @torch.no_grad()
    def target(self, net: Net, x: Tensor, eps: Tensor, t: Tensor, r: Tensor, labels: Tensor) -> Tensor:
        """sg(F_target), at least float32: h_t on rows with r = t, the transition target elsewhere.

        Only rows with t != r need dF/dt, so only they go through the derivative's extra forward pass.
        """
        T = self.transport
        target = _wide(T.diffusion_target(x, eps, t))
        idx = (t != r).nonzero().squeeze(1)
        if idx.numel():
            sub = (x[idx], eps[idx], t[idx], r[idx], labels[idx])
            dF_dt = (self._dF_dt_dde if self.derivative == "dde" else self._dF_dt_jvp)(net, *sub)
            target[idx] = T.transition_target(*map(_wide, sub[:4]), dF_dt).to(target.dtype)
        return target

    # --- weights ------------------------------------------------------------------------------------------
    def time_weight(self, t: Tensor, r: Tensor) -> Tensor:
        if self.weighting == "constant":
            return torch.ones_like(t)
        tau = torch.tan if self.weight_tau == "tan" else (lambda u: u / (1 - u).clamp_min(1e-4))
        delta, sd = tau(t) - tau(r), self.transport.sigma_d
        if self.weighting == "soft_min_snr":
            return 1 / (delta ** 2 + sd ** 2)
        power = {"sqrt": 0.5, "reciprocal": 1.0, "square": 2.0}[self.weighting]
        return (sd + delta) ** -power

    # --- the loss -----------------------------------------------------------------------------------------
    def __call__(self, net: Net, x: Tensor, labels: Tensor, generator: torch.Generator | None = None
                 ) -> tuple[Tensor, dict[str, float]]:
        if labels.shape != (x.shape[0],):
            raise ValueError(f"labels must have shape ({x.shape[0]},) to match x of shape {tuple(x.shape)}; "
                             f"got {tuple(labels.shape)}")
        T, n = self.transport, x.shape[0]
        t, r, n_diff = self.sample_pairs(n, generator=generator, device=x.device)
        t, r = t.to(x.dtype), r.to(x.dtype)
        eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        if self.label_dropout > 0:
            drop = torch.rand(n, generator=generator, device=x.device) < self.label_dropout
            labels = torch.where(drop, torch.full_like(labels, self.null_label), labels)

        F = _wide(self._net_on_path(net, x, eps, t, r, labels))
        target = self.target(net, x, eps, t, r, labels)

        dims = tuple(range(1, x.dim()))
        mse = ((F - target) ** 2).mean(dim=dims)
        per_row = mse
        if self.directional > 0:
            cos = torch.nn.functional.cosine_similarity(F, target, dim=1, eps=1e-8)
            per_row = per_row + self.directional * (1 - cos).reshape(n, -1).mean(dim=1)
        w = self.time_weight(_wide(t), _wide(r))
        w[:n_diff] = 1.0
        if self.adaptive:
            per_row = per_row / (per_row.detach() + self.adaptive_c)
        weighted = w * per_row
        loss = weighted.mean()

        is_diff = t == r
        is_cons = (~is_diff) & (r == T.T_min)
        figures = torch.stack([
            mse.mean(), _masked_mean(mse, is_diff), _masked_mean(mse, ~is_diff), loss.detach(), w.mean(),
            is_diff.float().mean(), is_cons.float().mean(), (~is_diff & ~is_cons).float().mean(),
        ]).tolist()
        names = ("raw_mse", "raw_mse_diffusion", "raw_mse_transition", "weighted_loss", "mean_weight",
                 "share_diffusion", "share_consistency", "share_transition")
        return loss, {k: v for k, v in zip(names, figures) if not math.isnan(v)}


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean over the masked rows, NaN when there are none (dropped from the logs)."""
    return values[mask].mean() if bool(mask.any()) else values.new_tensor(float("nan"))


class FlowMatchingLoss(TransitionLoss):
    """Flow matching / diffusion baseline: every row has r = t, target h_t, unweighted MSE."""

    def __init__(self, transport: Transport, *, label_dropout: float = 0.1, null_label: int | None = None):
        super().__init__(transport, diffusion_ratio=1.0, consistency_ratio=0.0, weighting="constant",
                         adaptive=False, label_dropout=label_dropout, null_label=null_label)


class MeanFlowLoss(TransitionLoss):
    """MeanFlow baseline (Geng et al. 2025): OT-FM, JVP derivative, 25% of rows with r != t, adaptive loss.

    MeanFlow's average-velocity target u = v - (t - r) du/dt is exactly TiM's OT-FM target.
    """

    def __init__(self, transport: Transport, *, r_neq_t_ratio: float = 0.25, adaptive_c: float = 1e-3,
                 label_dropout: float = 0.1, null_label: int | None = None):
        if transport.name != "ot_fm":
            raise ValueError(f"MeanFlowLoss needs the ot_fm transport; got {transport.name!r}")
        _ratio("r_neq_t_ratio", r_neq_t_ratio)
        super().__init__(transport, diffusion_ratio=1.0 - r_neq_t_ratio, consistency_ratio=0.0,
                         derivative="jvp", weighting="constant", adaptive=True, adaptive_c=adaptive_c,
                         label_dropout=label_dropout, null_label=null_label)


OBJECTIVES = {"tim": TransitionLoss, "fm": FlowMatchingLoss, "meanflow": MeanFlowLoss}


def build_objective(name: str, transport: Transport, **params) -> TransitionLoss:
    """Build an objective by name: tim (TransitionLoss), fm (FlowMatchingLoss) or meanflow (MeanFlowLoss)."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective name {name!r}; allowed: {', '.join(OBJECTIVES)}")
    try:
        return OBJECTIVES[name](transport, **params)
    except TypeError as e:
        raise ValueError(f"bad parameters for objective {name!r}: {e}") from None
