"""The TiM training objective (docs/method.md sections 3-5) and the two baselines expressed as settings of it.

Every objective is a callable ``loss, logs = objective(net, x, labels, generator=None, guide_net=None)`` where
``net(x_t, c_noise(t), c_noise(r), labels)`` is the network: the objective applies the path's c_noise.
Flow matching is TiM with every row a diffusion row (r = t) and its own time sampling; MeanFlow is TiM on OT-FM
with the JVP derivative, a quarter of the rows with r != t and constant time weighting, as in its paper
(section 6).

Mixed precision (section 4.3): the derivative's forward passes run with autocast disabled and float32 inputs
(``fp32_derivative``, on by default), because a bf16 central difference is mostly rounding noise. Either wrap
the call in ``torch.autocast`` or let the objective open it for the gradient pass (``autocast_dtype``); keep the
network's weights in float32 either way.
"""

from __future__ import annotations

import math
import warnings
from contextlib import nullcontext
from typing import Callable, Literal

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from .transports import Transport, _like

__all__ = ["TransitionLoss", "FlowMatchingLoss", "MeanFlowLoss", "build_objective", "OBJECTIVES"]

Net = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]
WEIGHTINGS = ("constant", "sqrt", "reciprocal", "square", "soft_min_snr")
WEIGHT_TAUS = ("tan", "snr")
TIME_SAMPLINGS = ("uniform", "logit_normal", "max_of_two")
AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
                   "fp16": torch.float16}


def _wide(x: Tensor) -> Tensor:
    """At least float32 (bf16/fp16 outputs are widened, float64 kept) for differences and the loss."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(str, allowed))}; got {value!r}")


def _ratio(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1]; got {value}")


def _autocast_dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype) and value in AUTOCAST_DTYPES.values():
        return value
    if isinstance(value, str) and value in AUTOCAST_DTYPES:
        return AUTOCAST_DTYPES[value]
    raise ValueError(f"autocast_dtype must be None or one of {', '.join(AUTOCAST_DTYPES)}; got {value!r}")


def _half_weights(net) -> bool:
    params = getattr(net, "parameters", None)
    if params is None:
        return False
    p = next((p for p in params() if p.is_floating_point()), None)
    return p is not None and p.dtype in (torch.bfloat16, torch.float16)


class TransitionLoss:
    """TiM loss: regress F(x_t, t, r) onto sg(F_target) from the state-transition identity.

    Args:
        transport: the path (see ``get_transport``).
        diffusion_ratio: share of rows with r = t (plain diffusion rows, target h_t, weight 1).
        consistency_ratio: share of rows with r = T_min (one-step rows).
        derivative: "dde" (central finite difference, forward passes only) or "jvp" (torch.func.jvp).
        dde_eps: the finite-difference step e, in t for OT-FM and TrigFlow and in ln t for EDM, VP and VE
            (``transport.dde_step``; docs/method.md section 4.2).
        weighting: time weight w(t, r) = (sigma_d + tau(t) - tau(r))^-p with p = 1/2 ("sqrt", the paper's
            default), 1 ("reciprocal") or 2 ("square"); "soft_min_snr" is 1 / ((tau(t) - tau(r))^2 + sigma_d^2);
            "constant" is 1. Defined on every path through its OT-FM-equivalent time (section 4.5).
        weight_tau: tau(u) = tan(u) ("tan") or u / (1 - u) ("snr"), u = ``transport.ot_time(t)``.
        adaptive: divide each row's loss by sg(loss) + adaptive_c (the paper's adaptive weighting).
        directional: weight of the extra term 1 - cos(F, F_target), the cosine over each row's flattened
            vector (0 = off; section 4.4).
        label_dropout: probability of replacing a label by ``null_label`` (classifier-free guidance).
        null_label: the null class id (the network's ``num_classes``); needed when label_dropout > 0 or with
            model guidance.
        fp32_derivative: run the derivative's forward passes with autocast disabled, on float32 inputs, and
            difference in float32 (section 4.3). Needs float32 weights to have an effect.
        autocast_dtype: None, "bfloat16" or "float16": run the gradient pass (and the guidance pass) under
            ``torch.autocast(x.device.type, dtype)``; the derivative stays float32 when ``fp32_derivative``.
        model_guidance: w in [0, 1) of model guidance in training (0 = off; section 5): inside the window, h_t
            in the target becomes h_t + w (F_g(x_t, t, t, y) - F_g(x_t, t, t, null)), F_g the guide network;
            the trained model then behaves like classifier-free guidance of scale 1 / (1 - w) there.
        model_guidance_interval: (lo, hi): the window on ``transport.ot_time(t)``, endpoints included.
    """

    time_sampling = "max_of_two"  # TiM's (t, r) rule; flow matching chooses its own (section 6)

    def __init__(self, transport: Transport, *, diffusion_ratio: float = 0.5, consistency_ratio: float = 0.1,
                 derivative: Literal["dde", "jvp"] = "dde", dde_eps: float = 0.005,
                 weighting: str = "sqrt", weight_tau: str = "tan", adaptive: bool = True,
                 adaptive_c: float = 1e-5, directional: float = 0.0, label_dropout: float = 0.1,
                 null_label: int | None = None, fp32_derivative: bool = True,
                 autocast_dtype: str | torch.dtype | None = None, model_guidance: float = 0.0,
                 model_guidance_interval: tuple[float, float] = (0.3, 0.8)):
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
        if directional < 0:
            raise ValueError(f"directional must be >= 0; got {directional}")
        if not 0.0 <= model_guidance < 1.0:
            # The guide is the model itself (or its EMA): at the fixed point F_c - F_u = (h_c - h_u) / (1 - w),
            # classifier-free guidance of scale 1 / (1 - w), which has no fixed point at w >= 1.
            raise ValueError(f"model_guidance must lie in [0, 1) (equivalent guidance scale 1 / (1 - w)); "
                             f"got {model_guidance}")
        lo, hi = model_guidance_interval
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"model_guidance_interval must satisfy 0 <= lo <= hi <= 1; got {model_guidance_interval}")
        if (label_dropout > 0 or model_guidance > 0) and null_label is None:
            raise ValueError("null_label (the network's num_classes) is required when label_dropout > 0 or "
                             "model_guidance > 0")
        self.transport = transport
        self.diffusion_ratio, self.consistency_ratio = diffusion_ratio, consistency_ratio
        self.derivative, self.dde_eps = derivative, dde_eps
        self.weighting, self.weight_tau = weighting, weight_tau
        self.adaptive, self.adaptive_c = adaptive, adaptive_c
        self.directional = directional
        self.label_dropout, self.null_label = label_dropout, null_label
        self.fp32_derivative = fp32_derivative
        self.autocast_dtype = _autocast_dtype(autocast_dtype)
        self.model_guidance, self.model_guidance_interval = model_guidance, (lo, hi)

    # --- (t, r) pairs -------------------------------------------------------------------------------------
    def sample_pairs(self, n: int, generator=None, device=None) -> tuple[Tensor, Tensor, int]:
        """(t, r, n_diffusion_rows). "max_of_two": t = max(t1, t2), r = min(t1, t2) from the path's proposal,
        then the first rows get r = t and the next r = T_min. "uniform" / "logit_normal": one draw per row
        (uniform on [T_min, T_max], or the path's own proposal) and r = t.

        Rows are i.i.d., so assigning kinds by position is unbiased.
        """
        T = self.transport
        if self.time_sampling == "uniform":
            u = torch.rand(n, generator=generator, device=device)
            t = T.T_min + (T.T_max - T.T_min) * u
            return t, t.clone(), n
        if self.time_sampling == "logit_normal":
            t = T.sample_t(n, generator=generator, device=device)
            return t, t.clone(), n
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

    def _derivative_precision(self, x: Tensor):
        """Autocast off for the derivative's passes (forward only, so float32 costs no activation memory)."""
        if not self.fp32_derivative:
            return nullcontext()
        return torch.autocast(x.device.type, enabled=False)

    def _derivative_inputs(self, net: Net, *tensors: Tensor) -> tuple[Tensor, ...]:
        if not self.fp32_derivative:
            return tensors
        if _half_weights(net):
            warnings.warn("fp32_derivative: the network's weights are bf16/fp16, so the derivative's passes run "
                          "at that precision; keep float32 weights and use autocast (docs/method.md 4.3)",
                          stacklevel=3)
        return tuple(_wide(v) for v in tensors)

    @torch.no_grad()
    def _dF_dt_dde(self, net: Net, x, eps, t, r, labels) -> Tensor:
        """Central difference of F along the path, both evaluations in ONE forward of the stacked rows."""
        x, eps, t, r = self._derivative_inputs(net, x, eps, t, r)
        t_plus, t_minus = self.transport.dde_times(t, r, self.dde_eps)
        with self._derivative_precision(x):
            F = self._net_on_path(net, torch.cat([x, x]), torch.cat([eps, eps]), torch.cat([t_plus, t_minus]),
                                  torch.cat([r, r]), torch.cat([labels, labels]))
        F_plus, F_minus = _wide(F).chunk(2)
        return (F_plus - F_minus) / _like(t_plus - t_minus, F_plus)

    @torch.no_grad()
    def _dF_dt_jvp(self, net: Net, x, eps, t, r, labels) -> Tensor:
        """Forward-mode derivative along the tangent (dx_t = v_t, dt = 1, dr = 0)."""
        x, eps, t, r = self._derivative_inputs(net, x, eps, t, r)

        def along_path(tt):
            return self._net_on_path(net, x, eps, tt, r, labels)
        # Fused/flash attention kernels have no forward-mode derivative (the paper's case for DDE): use the
        # math kernel, which autograd can differentiate forward.
        with self._derivative_precision(x), sdpa_kernel(SDPBackend.MATH):
            _, dF = torch.func.jvp(along_path, (t,), (torch.ones_like(t),))
        return _wide(dF)

    @torch.no_grad()
    def target(self, net: Net, x: Tensor, eps: Tensor, t: Tensor, r: Tensor, labels: Tensor,
               guidance: Tensor | None = None) -> Tensor:
        """sg(F_target), at least float32: h_t on rows with r = t, the transition target elsewhere.

        Only rows with t != r need dF/dt, so only they go through the derivative's extra forward pass.
        ``guidance`` (from ``guidance_shift``) is added to every row: F_target is h_t plus terms that do not
        involve h_t, so replacing h_t by h_t + delta shifts the target by delta (docs/method.md section 5).
        """
        T = self.transport
        target = _wide(T.diffusion_target(x, eps, t))
        idx = (t != r).nonzero().squeeze(1)
        if idx.numel():
            sub = (x[idx], eps[idx], t[idx], r[idx], labels[idx])
            dF_dt = (self._dF_dt_dde if self.derivative == "dde" else self._dF_dt_jvp)(net, *sub)
            target[idx] = T.transition_target(*map(_wide, sub[:4]), dF_dt).to(target.dtype)
        if guidance is not None:
            target = target + guidance
        return target

    # --- model guidance -----------------------------------------------------------------------------------
    def guidance_rows(self, t: Tensor, guided_labels: Tensor) -> Tensor:
        """Rows that model guidance shifts: ot_time(t) inside the window, label not the null class."""
        lo, hi = self.model_guidance_interval
        u = self.transport.ot_time(t)
        return (u >= lo) & (u <= hi) & (guided_labels != self.null_label)

    @torch.no_grad()
    def guidance_shift(self, guide: Net, x: Tensor, eps: Tensor, t: Tensor, labels: Tensor) -> Tensor:
        """w (F_g(x_t, t, t, y) - F_g(x_t, t, t, null)) on the guided rows, 0 elsewhere; one forward of 2k rows."""
        T = self.transport
        shift = torch.zeros(x.shape, dtype=_wide(x).dtype, device=x.device)
        idx = self.guidance_rows(t, labels).nonzero().squeeze(1)
        if idx.numel():
            x_t, c = T.path(x[idx], eps[idx], t[idx]), T.c_noise(t[idx])
            F_c, F_u = _wide(guide(torch.cat([x_t, x_t]), torch.cat([c, c]), torch.cat([c, c]),
                                   torch.cat([labels[idx], torch.full_like(labels[idx], self.null_label)]))).chunk(2)
            shift[idx] = (self.model_guidance * (F_c - F_u)).to(shift.dtype)
        return shift

    # --- weights ------------------------------------------------------------------------------------------
    def time_weight(self, t: Tensor, r: Tensor) -> Tensor:
        """w(t, r) with tau applied to the OT-FM-equivalent times (docs/method.md section 4.5)."""
        if self.weighting == "constant":
            return torch.ones_like(t)
        T = self.transport
        tau = torch.tan if self.weight_tau == "tan" else (lambda u: u / (1 - u).clamp_min(1e-4))
        delta, sd = tau(T.ot_time(t)) - tau(T.ot_time(r)), T.sigma_d
        if self.weighting == "soft_min_snr":
            return 1 / (delta ** 2 + sd ** 2)
        power = {"sqrt": 0.5, "reciprocal": 1.0, "square": 2.0}[self.weighting]
        return (sd + delta) ** -power

    # --- the loss -----------------------------------------------------------------------------------------
    def __call__(self, net: Net, x: Tensor, labels: Tensor, generator: torch.Generator | None = None,
                 guide_net: Net | None = None) -> tuple[Tensor, dict[str, float]]:
        """One batch: (loss, logs). ``guide_net`` is the network model guidance queries (e.g. the EMA); when
        None, ``net`` itself without gradient. Unused when ``model_guidance`` is 0."""
        if labels.shape != (x.shape[0],):
            raise ValueError(f"labels must have shape ({x.shape[0]},) to match x of shape {tuple(x.shape)}; "
                             f"got {tuple(labels.shape)}")
        T, n = self.transport, x.shape[0]
        t, r, n_diff = self.sample_pairs(n, generator=generator, device=x.device)
        time_dtype = torch.promote_types(x.dtype, torch.float32)  # never build times in bf16
        t, r = t.to(time_dtype), r.to(time_dtype)
        eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        if self.label_dropout > 0:
            drop = torch.rand(n, generator=generator, device=x.device) < self.label_dropout
            labels = torch.where(drop, torch.full_like(labels, self.null_label), labels)

        amp = (torch.autocast(x.device.type, dtype=self.autocast_dtype) if self.autocast_dtype is not None
               else nullcontext())
        with amp:
            F = _wide(self._net_on_path(net, x, eps, t, r, labels))
            guidance = None
            if self.model_guidance > 0:
                # Rows whose label was dropped keep the plain h_t: the null class must learn the unguided
                # field that guidance queries (docs/method.md section 10).
                guidance = self.guidance_shift(guide_net if guide_net is not None else net, x, eps, t, labels)
        target = self.target(net, x, eps, t, r, labels, guidance=guidance)

        dims = tuple(range(1, x.dim()))
        mse = ((F - target) ** 2).mean(dim=dims)
        per_row = mse
        if self.directional > 0:
            cos = torch.nn.functional.cosine_similarity(F.reshape(n, -1), target.reshape(n, -1), dim=1, eps=1e-8)
            per_row = per_row + self.directional * (1 - cos)
        w = self.time_weight(_wide(t), _wide(r))
        w[:n_diff] = 1.0
        if self.adaptive:
            per_row = per_row / (per_row.detach() + self.adaptive_c)
        weighted = w * per_row
        loss = weighted.mean()

        is_diff = t == r
        is_cons = (~is_diff) & (r == T.T_min)
        figures = [mse.mean(), _masked_mean(mse, is_diff), _masked_mean(mse, ~is_diff), loss.detach(), w.mean(),
                   is_diff.float().mean(), is_cons.float().mean(), (~is_diff & ~is_cons).float().mean()]
        names = ["raw_mse", "raw_mse_diffusion", "raw_mse_transition", "weighted_loss", "mean_weight",
                 "share_diffusion", "share_consistency", "share_transition"]
        if guidance is not None:
            figures.append(self.guidance_rows(t, labels).float().mean())
            names.append("share_guided")
        figures = torch.stack([f.to(mse.dtype) for f in figures]).tolist()
        return loss, {k: v for k, v in zip(names, figures) if not math.isnan(v)}


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean over the masked rows, NaN when there are none (dropped from the logs)."""
    return values[mask].mean() if bool(mask.any()) else values.new_tensor(float("nan"))


class FlowMatchingLoss(TransitionLoss):
    """Flow matching / diffusion baseline: every row has r = t, target h_t, unweighted MSE.

    time_sampling: "uniform" (default; SiT, the paper's flow-matching baseline, draws t uniformly),
    "logit_normal" (one draw of the path's own proposal: on OT-FM logit(t) ~ N(P_mean, P_std), as SD3) or
    "max_of_two" (the max of two proposal draws: TiM's t rule, which starves the low-noise end;
    docs/method.md section 6).
    """

    def __init__(self, transport: Transport, *, time_sampling: str = "uniform", label_dropout: float = 0.1,
                 null_label: int | None = None, autocast_dtype: str | torch.dtype | None = None):
        _choice("time_sampling", time_sampling, TIME_SAMPLINGS)
        super().__init__(transport, diffusion_ratio=1.0, consistency_ratio=0.0, weighting="constant",
                         adaptive=False, label_dropout=label_dropout, null_label=null_label,
                         autocast_dtype=autocast_dtype)
        self.time_sampling = time_sampling


class MeanFlowLoss(TransitionLoss):
    """MeanFlow baseline (Geng et al. 2025): OT-FM, JVP derivative, 25% of rows with r != t, adaptive loss.

    MeanFlow's average-velocity target u = v - (t - r) du/dt is exactly TiM's OT-FM target, and its (t, r)
    are the max and min of two logit-normal draws, as TiM's.
    """

    def __init__(self, transport: Transport, *, r_neq_t_ratio: float = 0.25, adaptive_c: float = 1e-3,
                 label_dropout: float = 0.1, null_label: int | None = None, fp32_derivative: bool = True,
                 autocast_dtype: str | torch.dtype | None = None):
        if transport.name != "ot_fm":
            raise ValueError(f"MeanFlowLoss needs the ot_fm transport; got {transport.name!r}")
        _ratio("r_neq_t_ratio", r_neq_t_ratio)
        super().__init__(transport, diffusion_ratio=1.0 - r_neq_t_ratio, consistency_ratio=0.0,
                         derivative="jvp", weighting="constant", adaptive=True, adaptive_c=adaptive_c,
                         label_dropout=label_dropout, null_label=null_label, fp32_derivative=fp32_derivative,
                         autocast_dtype=autocast_dtype)


OBJECTIVES = {"tim": TransitionLoss, "fm": FlowMatchingLoss, "meanflow": MeanFlowLoss}


def build_objective(name: str, transport: Transport, **params) -> TransitionLoss:
    """Build an objective by name: tim (TransitionLoss), fm (FlowMatchingLoss) or meanflow (MeanFlowLoss)."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective name {name!r}; allowed: {', '.join(OBJECTIVES)}")
    try:
        return OBJECTIVES[name](transport, **params)
    except TypeError as e:
        raise ValueError(f"bad parameters for objective {name!r}: {e}") from None
