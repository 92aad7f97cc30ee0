"""The TiM objective: DDE against JVP (every path, default step, bf16), the row kinds, the single DDE forward,
weights on every path, the flow-matching time samplers, the directional term, model guidance, bad input."""

import math
from statistics import NormalDist

import pytest
import torch

from tim_core import (
    TRANSPORTS,
    FlowMatchingLoss,
    MeanFlowLoss,
    TransitionLoss,
    build_model,
    build_objective,
    get_transport,
)

from .toy import ToyNet


def randomized_tiny(dtype=torch.float64, seed=0):
    """A tiny TiM whose zero-initialised layers are made non-zero, so its output depends on every input."""
    torch.manual_seed(seed)
    net = build_model("tiny", input_size=8, patch_size=4, hidden_size=32, depth=2, num_heads=2, adaln_rank=8).to(dtype)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return net


class Recorder(torch.nn.Module):
    """Wraps a net and records (rows, grad enabled) of each call."""

    def __init__(self, net):
        super().__init__()
        self.net, self.calls = net, []

    def forward(self, x, t, r, labels):
        self.calls.append((x.shape[0], torch.is_grad_enabled()))
        return self.net(x, t, r, labels)


@pytest.mark.parametrize("transport", ["ot_fm", "trigflow", "edm", "vp", "ve"])
@pytest.mark.parametrize("net_kind", ["mlp", "tim"])
def test_dde_agrees_with_jvp(transport, net_kind):
    T = get_transport(transport)
    torch.manual_seed(0)
    if net_kind == "mlp":
        net, x = ToyNet(dim=3, width=32).double(), torch.randn(16, 3, dtype=torch.float64)
    else:
        net, x = randomized_tiny(), torch.randn(16, 1, 8, 8, dtype=torch.float64)
    eps = torch.randn_like(x)
    g = torch.Generator().manual_seed(1)
    t = T.sample_t(16, generator=g, dtype=torch.float64).clamp(T.T_min + 0.05 * (T.T_max - T.T_min),
                                                                T.T_max - 0.01 * (T.T_max - T.T_min))
    r = t - 0.5 * (t - T.T_min)  # interval well above the DDE step
    labels = torch.zeros(16, dtype=torch.long)
    kw = dict(weighting="constant", label_dropout=0.0)
    dde = TransitionLoss(T, derivative="dde", dde_eps=1e-6 * T.T_max, **kw)._dF_dt_dde(net, x, eps, t, r, labels)
    jvp = TransitionLoss(T, derivative="jvp", **kw)._dF_dt_jvp(net, x, eps, t, r, labels)
    rel = (dde - jvp).norm() / jvp.norm()
    assert rel < 1e-3, f"DDE vs JVP relative error {rel:.2e}"


def path_quantile_times(T, dtype, qs=(0.05, 0.25, 0.5, 0.75, 0.95)):
    """Times at quantiles of the path's own proposal, each once with r inside (t, T_min) and once with r = T_min."""
    draws = T.sample_t(100_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t = draws.quantile(torch.tensor(qs, dtype=torch.float64))
    r = T.T_min + 0.3 * (t - T.T_min)
    return torch.cat([t, t]).to(dtype), torch.cat([r, torch.full_like(t, T.T_min)]).to(dtype)


# Largest relative error (per row, DDE vs JVP) measured at the default e = 0.005 over the 10 rows of
# path_quantile_times, all paths: float64 3.4e-4 (OT-FM), float32 8.6e-4 (VE); the bounds leave 1.5-1.7x.
# Before c_noise and the step were chosen per path: VP 1.2, VE 1.2e-2 (fp64) / 4.6e-2 (fp32), EDM 3.5e-3.
DEFAULT_STEP_BOUND = {torch.float64: 5e-4, torch.float32: 1.5e-3}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("transport", list(TRANSPORTS))
def test_dde_at_the_default_step_agrees_with_jvp_on_every_path(transport, dtype):
    """The default e on a network whose zero-initialised layers are perturbed, at several t and r = T_min."""
    T, net = get_transport(transport), randomized_tiny(dtype)
    t, r = path_quantile_times(T, dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(len(t), 1, 8, 8, generator=g, dtype=torch.float64).to(dtype)
    eps = torch.randn(x.shape, generator=g, dtype=torch.float64).to(dtype)
    labels = torch.zeros(len(t), dtype=torch.long)
    loss_fn = TransitionLoss(T, label_dropout=0.0)
    assert loss_fn.dde_eps == 0.005
    dde = loss_fn._dF_dt_dde(net, x, eps, t, r, labels)
    jvp = TransitionLoss(T, derivative="jvp", label_dropout=0.0)._dF_dt_jvp(net, x, eps, t, r, labels)
    rel = (dde - jvp).flatten(1).norm(dim=1) / jvp.flatten(1).norm(dim=1)
    assert rel.max() < DEFAULT_STEP_BOUND[dtype], f"DDE vs JVP relative error per row: {rel.tolist()}"


def test_dde_under_bf16_autocast_stays_at_the_fp32_error():
    """Measured (tiny net, OT-FM, t = 0.5, e = 0.005, against an fp32 JVP): fp32 DDE 2.1e-4; under bf16
    autocast 4.3e-1 if the two DDE passes follow autocast, 2.1e-4 with them in fp32 (fp32_derivative)."""
    T, net = get_transport("ot_fm"), randomized_tiny(torch.float32)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 1, 8, 8, generator=g)
    eps, labels = torch.randn(x.shape, generator=g), torch.zeros(8, dtype=torch.long)
    t, r = torch.full((8,), 0.5), torch.full((8,), 0.2)
    jvp = TransitionLoss(T, derivative="jvp", label_dropout=0.0)._dF_dt_jvp(net, x, eps, t, r, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        safe = TransitionLoss(T, label_dropout=0.0)._dF_dt_dde(net, x, eps, t, r, labels)
        unsafe = TransitionLoss(T, label_dropout=0.0, fp32_derivative=False)._dF_dt_dde(net, x, eps, t, r, labels)
    assert safe.dtype == torch.float32
    assert (safe - jvp).norm() / jvp.norm() < 5e-4
    assert (unsafe - jvp).norm() / jvp.norm() > 0.1  # what the fp32 passes protect against


class AutocastRecorder(torch.nn.Module):
    """Records (rows, autocast on) of each call."""

    def __init__(self, net):
        super().__init__()
        self.net, self.calls = net, []

    def forward(self, x, t, r, labels):
        self.calls.append((x.shape[0], torch.is_autocast_enabled("cpu")))
        return self.net(x, t, r, labels)


def test_objective_opens_autocast_for_the_gradient_pass_only():
    """autocast_dtype="bfloat16": the gradient pass under autocast, the DDE pass in fp32, so the target is
    bit-identical to the fp32 objective's and the weights' gradients stay fp32."""
    T = get_transport("ot_fm")
    x, labels = torch.randn(12, 1, 8, 8), torch.randint(0, 10, (12,))
    net = AutocastRecorder(randomized_tiny(torch.float32))
    loss_fn = TransitionLoss(T, null_label=10, autocast_dtype="bfloat16")
    loss, logs = loss_fn(net, x, labels, generator=torch.Generator().manual_seed(0))
    assert net.calls == [(12, True), (12, False)]
    loss.backward()
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(9))
    t, r = torch.full((12,), 0.7), torch.full((12,), 0.1)
    plain = loss_fn.target(net, x, eps, t, r, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = loss_fn.target(net, x, eps, t, r, labels)
    assert torch.equal(plain, under)
    with pytest.warns(UserWarning, match="weights are bf16"):
        loss_fn.target(randomized_tiny(torch.bfloat16), x, eps, t, r, labels)


def test_diffusion_rows_get_exactly_h_and_dde_is_one_no_grad_forward_of_the_other_rows():
    T = get_transport("ot_fm")
    net = Recorder(randomized_tiny(torch.float32))
    x = torch.randn(10, 1, 8, 8)
    eps, labels = torch.randn_like(x), torch.randint(0, 10, (10,))
    t = torch.linspace(0.2, 0.9, 10)
    r = t.clone()
    r[6:] = t[6:] / 2  # 4 transition rows
    target = TransitionLoss(T, label_dropout=0.0).target(net, x, eps, t, r, labels)
    assert torch.equal(target[:6], T.diffusion_target(x, eps, t)[:6])
    assert not torch.allclose(target[6:], T.diffusion_target(x, eps, t)[6:])
    assert net.calls == [(8, False)]  # one forward of the stacked +e/-e rows, without a graph


def test_loss_calls_and_logs():
    T = get_transport("ot_fm")
    net = Recorder(randomized_tiny(torch.float32))
    x, labels = torch.randn(20, 1, 8, 8), torch.randint(0, 10, (20,))
    loss_fn = TransitionLoss(T, diffusion_ratio=0.5, consistency_ratio=0.1, null_label=10)
    loss, logs = loss_fn(net, x, labels, generator=torch.Generator().manual_seed(0))
    assert loss.requires_grad and loss.dim() == 0
    assert net.calls == [(20, True), (20, False)]  # gradient pass, then 2 x 10 transition rows
    assert logs["share_diffusion"] == 0.5 and logs["share_consistency"] == pytest.approx(0.1)
    assert logs["share_transition"] == pytest.approx(0.4)
    # adaptive weighting: each row's term is w * L / (L + c), so the loss is about the mean weight
    assert logs["weighted_loss"] == pytest.approx(logs["mean_weight"], rel=1e-3)
    assert {"raw_mse", "raw_mse_diffusion", "raw_mse_transition"} <= set(logs)
    loss.backward()


def test_seeded_loss_is_reproducible():
    T, net = get_transport("ot_fm"), randomized_tiny(torch.float32)
    x, labels = torch.randn(12, 1, 8, 8), torch.randint(0, 10, (12,))
    loss_fn = TransitionLoss(T, null_label=10, directional=0.5)
    a, _ = loss_fn(net, x, labels, generator=torch.Generator().manual_seed(3))
    b, _ = loss_fn(net, x, labels, generator=torch.Generator().manual_seed(3))
    assert a.item() == b.item()


def test_time_weights():
    T = get_transport("ot_fm")
    t, r = torch.tensor([0.8, 0.5]), torch.tensor([0.2, 0.5])
    w = TransitionLoss(T, label_dropout=0.0).time_weight(t, r)
    expected = (1.0 + torch.tan(t) - torch.tan(r)) ** -0.5  # sigma_d = 1 for OT-FM
    assert torch.allclose(w, expected)
    assert torch.allclose(TransitionLoss(T, weighting="square", weight_tau="snr", label_dropout=0.0).time_weight(t, r),
                          (1.0 + t / (1 - t) - r / (1 - r)) ** -2)
    assert torch.equal(TransitionLoss(T, weighting="constant", label_dropout=0.0).time_weight(t, r), torch.ones(2))


def test_label_dropout_uses_the_null_class():
    T = get_transport("ot_fm")
    seen = []

    def net(x, t, r, labels):
        seen.append(labels.clone())
        return torch.zeros_like(x, requires_grad=True)

    FlowMatchingLoss(T, label_dropout=1.0, null_label=7)(net, torch.randn(4, 2), torch.arange(4))
    assert torch.equal(seen[0], torch.full((4,), 7))


def test_baselines_are_settings_of_the_transition_loss():
    T = get_transport("ot_fm")
    fm = build_objective("fm", T, null_label=10)
    assert isinstance(fm, FlowMatchingLoss) and fm.diffusion_ratio == 1.0 and not fm.adaptive
    mf = build_objective("meanflow", T, null_label=10)
    assert isinstance(mf, MeanFlowLoss) and mf.derivative == "jvp" and mf.diffusion_ratio == 0.75
    net = Recorder(randomized_tiny(torch.float32))
    fm(net, torch.randn(6, 1, 8, 8), torch.zeros(6, dtype=torch.long))
    assert net.calls == [(6, True)]  # no derivative pass at all


def test_bad_parameters_name_the_argument():
    T = get_transport("ot_fm")
    with pytest.raises(ValueError, match="unknown objective name 'sit'; allowed: tim, fm, meanflow"):
        build_objective("sit", T)
    with pytest.raises(ValueError, match="derivative must be one of dde, jvp"):
        TransitionLoss(T, derivative="fd")
    with pytest.raises(ValueError, match="weighting must be one of"):
        TransitionLoss(T, weighting="tangent")
    with pytest.raises(ValueError, match="diffusion_ratio \\+ consistency_ratio must be <= 1"):
        TransitionLoss(T, diffusion_ratio=0.8, consistency_ratio=0.3)
    with pytest.raises(ValueError, match="null_label"):
        TransitionLoss(T, label_dropout=0.1)
    with pytest.raises(ValueError, match="autocast_dtype must be None or one of"):
        TransitionLoss(T, label_dropout=0.0, autocast_dtype="int8")
    with pytest.raises(ValueError, match="time_sampling must be one of uniform, logit_normal, max_of_two"):
        FlowMatchingLoss(T, time_sampling="beta")
    with pytest.raises(ValueError, match="model_guidance_interval"):
        TransitionLoss(T, null_label=10, model_guidance=0.5, model_guidance_interval=(0.8, 0.3))
    with pytest.raises(ValueError, match="null_label"):
        TransitionLoss(T, label_dropout=0.0, model_guidance=0.5)
    with pytest.raises(ValueError, match=r"model_guidance must lie in \[0, 1\)"):
        TransitionLoss(T, null_label=10, model_guidance=1.0)
    with pytest.raises(ValueError, match="MeanFlowLoss needs the ot_fm transport"):
        MeanFlowLoss(get_transport("vp"))
    with pytest.raises(ValueError, match="labels must have shape"):
        TransitionLoss(T, label_dropout=0.0)(ToyNet(), torch.randn(4, 2), torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize("transport", list(TRANSPORTS))
def test_default_tim_objective_builds_weights_and_trains_a_step_on_every_path(transport):
    """w = (sigma_d + tan(u_t) - tan(u_r))^(-1/2) with u the OT-FM-equivalent time: finite, positive, 1 /
    sqrt(sigma_d) at t = r and decreasing in t on every path (EDM and VE have T_max far above pi / 2)."""
    T = get_transport(transport)
    loss_fn = build_objective("tim", T, null_label=10)
    t = torch.linspace(T.T_min, T.T_max, 65, dtype=torch.float64)[1:]
    r = torch.full_like(t, T.T_min)
    w = loss_fn.time_weight(t, r)
    expected = (T.sigma_d + torch.tan(T.ot_time(t)) - torch.tan(T.ot_time(r))) ** -0.5
    assert torch.allclose(w, expected, rtol=1e-12)
    assert torch.isfinite(w).all() and (w > 0).all() and (w[1:] < w[:-1]).all()
    assert torch.allclose(loss_fn.time_weight(t, t), torch.full_like(t, T.sigma_d ** -0.5))
    net = randomized_tiny(torch.float32)
    before = [p.detach().clone() for p in net.parameters()]
    loss, logs = loss_fn(net, torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,)),
                         generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and all(math.isfinite(v) for v in logs.values())
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
    torch.optim.SGD(net.parameters(), lr=1e-3).step()
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))


def _sigmoid(z):
    return 1 / (1 + math.exp(-z))


# OT-FM's proposal: logit(t) ~ N(-0.4, 1). Closed forms of the median and of P(t < 0.2) for each rule.
_LOGIT_02, _PHI = math.log(0.2 / 0.8), NormalDist()
FM_TIME_CLOSED_FORMS = {
    "uniform": (0.5, 0.2),
    "logit_normal": (_sigmoid(-0.4), _PHI.cdf(_LOGIT_02 + 0.4)),
    "max_of_two": (_sigmoid(-0.4 + _PHI.inv_cdf(math.sqrt(0.5))), _PHI.cdf(_LOGIT_02 + 0.4) ** 2),
}


@pytest.mark.parametrize("rule", list(FM_TIME_CLOSED_FORMS))
def test_flow_matching_time_samplers_match_their_closed_forms(rule):
    """200k draws: the median and the low-noise share P(t < 0.2) within 0.005 of the closed forms
    (max_of_two gives the low-noise end 2.6% of the rows, against 20% for uniform and 16% for one draw)."""
    loss_fn = FlowMatchingLoss(get_transport("ot_fm"), time_sampling=rule, label_dropout=0.0)
    t, r, n_diff = loss_fn.sample_pairs(200_000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(t, r) and n_diff == len(t)
    median, low = FM_TIME_CLOSED_FORMS[rule]
    assert t.median().item() == pytest.approx(median, abs=0.005)
    assert (t < 0.2).float().mean().item() == pytest.approx(low, abs=0.005)


def test_time_sampling_defaults():
    T = get_transport("ot_fm")
    assert build_objective("fm", T, null_label=10).time_sampling == "uniform"
    assert build_objective("tim", T, null_label=10).time_sampling == "max_of_two"
    assert build_objective("meanflow", T, null_label=10).time_sampling == "max_of_two"


class PixelScale(torch.nn.Module):
    """F = W * x_t, W one weight per pixel."""

    def __init__(self, shape):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(0)))

    def forward(self, x, t, r, labels):
        return self.w * x


def test_directional_term_is_the_cosine_over_each_rows_flattened_vector():
    """One channel: a cosine over channels is +-1 with no gradient; over the flattened row it is neither."""
    T = get_transport("ot_fm")
    x, labels = torch.randn(6, 1, 4, 4), torch.zeros(6, dtype=torch.long)
    kw = dict(time_sampling="uniform", label_dropout=0.0)
    net = PixelScale((1, 4, 4))
    plain = FlowMatchingLoss(T, **kw)
    directed = FlowMatchingLoss(T, **kw)
    directed.directional = 1.0
    g = torch.Generator().manual_seed(0)
    loss_plain, _ = plain(net, x, labels, generator=torch.Generator().manual_seed(0))
    loss_dir, _ = directed(net, x, labels, generator=torch.Generator().manual_seed(0))
    t, _, _ = plain.sample_pairs(6, generator=g)
    eps = torch.randn(x.shape, generator=g)
    F, h = net(T.path(x, eps, t), None, None, None), T.diffusion_target(x, eps, t)
    cos = (F.flatten(1) * h.flatten(1)).sum(1) / (F.flatten(1).norm(dim=1) * h.flatten(1).norm(dim=1))
    assert (loss_dir - loss_plain).item() == pytest.approx((1 - cos).mean().item(), rel=1e-5)
    (grad,) = torch.autograd.grad(loss_dir - loss_plain, net.w)
    assert grad.abs().max() > 1e-4


class LabelShift(torch.nn.Module):
    """F = 0.3 x_t + label: F(y) - F(null) = y - null in every pixel. Records (rows, grad enabled)."""

    num_classes = 10

    def __init__(self):
        super().__init__()
        self.p = torch.nn.Parameter(torch.tensor(0.3))
        self.calls = []

    def forward(self, x, t, r, labels):
        self.calls.append((x.shape[0], torch.is_grad_enabled()))
        return self.p * x + labels.view(-1, *[1] * (x.dim() - 1)).to(x.dtype)


def test_model_guidance_shifts_h_inside_the_window_on_kept_labels_only():
    """Target = the unguided target + w (F_g(y) - F_g(null)) on rows with ot_time(t) in [lo, hi] whose label is
    not the null class, on diffusion and transition rows alike; everything else untouched."""
    T = get_transport("ot_fm")
    loss_fn = TransitionLoss(T, null_label=10, model_guidance=0.5, model_guidance_interval=(0.3, 0.8))
    x = torch.randn(8, 1, 4, 4)
    eps = torch.randn_like(x)
    t = torch.tensor([0.1, 0.3, 0.5, 0.8, 0.9, 0.5, 0.6, 0.7])
    r = torch.tensor([0.1, 0.3, 0.5, 0.8, 0.9, 0.5, 0.2, 0.0])  # last two are transition rows
    labels = torch.tensor([4, 4, 4, 4, 4, 10, 2, 7])               # row 5 dropped to the null class
    guide = LabelShift()
    shift = loss_fn.guidance_shift(guide, x, eps, t, labels)
    expected_rows = torch.tensor([False, True, True, True, False, False, True, True])
    delta = 0.5 * (labels - 10).float().view(-1, 1, 1, 1) * expected_rows.view(-1, 1, 1, 1)
    assert torch.allclose(shift, delta.expand_as(x), atol=1e-6)
    net = ToyNet(dim=16, width=32)  # a smooth net for the transition rows' derivative, on the flattened pixels

    def flat_net(xx, tt, rr, yy):
        return net(xx.flatten(1), tt, rr, yy).view_as(xx)
    guided = loss_fn.target(flat_net, x, eps, t, r, labels, guidance=shift)
    unguided = loss_fn.target(flat_net, x, eps, t, r, labels)
    assert torch.allclose(guided - unguided, delta.expand_as(x), atol=1e-6)


def test_model_guidance_queries_the_guide_net_without_gradient():
    T = get_transport("ot_fm")
    x, labels = torch.randn(16, 1, 4, 4), torch.randint(0, 10, (16,))
    loss_fn = TransitionLoss(T, null_label=10, label_dropout=0.0, model_guidance=0.5,
                             model_guidance_interval=(0.0, 1.0))
    net, ema = LabelShift(), LabelShift()
    _, logs = loss_fn(net, x, labels, generator=torch.Generator().manual_seed(0), guide_net=ema)
    assert ema.calls == [(32, False)] and logs["share_guided"] == 1.0  # every row: y and null stacked
    assert net.calls == [(16, True), (16, False)]                         # gradient pass, DDE of 8 rows
    alone = LabelShift()
    loss_fn(alone, x, labels, generator=torch.Generator().manual_seed(0))
    assert alone.calls == [(16, True), (32, False), (16, False)]          # no guide_net: the net itself
    off = LabelShift()
    _, logs = TransitionLoss(T, null_label=10, label_dropout=0.0)(off, x, labels, guide_net=ema)
    assert len(off.calls) == 2 and "share_guided" not in logs and len(ema.calls) == 1


def test_rows_whose_label_was_dropped_are_not_guided():
    """They train the null class, which must stay the unguided field that guidance subtracts."""
    T = get_transport("ot_fm")
    x, labels = torch.randn(16, 1, 4, 4), torch.randint(0, 10, (16,))
    guide = LabelShift()
    loss_fn = TransitionLoss(T, null_label=10, label_dropout=1.0, model_guidance=0.5,
                             model_guidance_interval=(0.0, 1.0))
    _, logs = loss_fn(LabelShift(), x, labels, generator=torch.Generator().manual_seed(0), guide_net=guide)
    assert guide.calls == [] and logs["share_guided"] == 0.0


# Each path's data scale at its defaults, and its OT-FM-equivalent time u(t) in closed form (sigma / (alpha + sigma)).
DEFAULT_DATA_SCALE = {"ot_fm": 1.0, "trigflow": 0.5, "edm": 0.5, "vp": 1.0, "ve": 1.0}
OT_TIME = {"ot_fm": lambda t: t, "trigflow": lambda t: torch.sin(t) / (torch.sin(t) + torch.cos(t)),
           "edm": lambda t: t / (1 + t), "vp": lambda t: _vp_b(t) / (1 + _vp_b(t)), "ve": lambda t: t / (1 + t)}


def _vp_b(t):
    return torch.sqrt(torch.expm1(0.5 * 19.9 * t * t + 0.1 * t))


@pytest.mark.parametrize("transport", list(TRANSPORTS))
def test_time_weights_at_each_paths_defaults_follow_their_closed_forms(transport):
    """get_transport(name) with no arguments: the data scale sigma_d is the path's documented default, and the
    sqrt and soft-min-SNR weights equal their closed forms written with that number (not read back from the
    transport): (sd + tan u_t - tan u_r)^(-1/2) and 1 / ((tan u_t - tan u_r)^2 + sd^2)."""
    T, sd = get_transport(transport), DEFAULT_DATA_SCALE[transport]
    assert T.sigma_d == sd
    t = torch.linspace(T.T_min, T.T_max, 33, dtype=torch.float64)[1:]
    r = T.T_min + torch.linspace(0.0, 0.9, 32, dtype=torch.float64) * (t - T.T_min)  # r = T_min .. 0.9 t, and t
    r = torch.cat([r, t])
    t = torch.cat([t, t])
    delta = torch.tan(OT_TIME[transport](t)) - torch.tan(OT_TIME[transport](r))
    sqrt_w = TransitionLoss(T, label_dropout=0.0).time_weight(t, r)
    assert torch.allclose(sqrt_w, (sd + delta) ** -0.5, rtol=1e-10)
    assert torch.allclose(sqrt_w[32:], torch.full((32,), sd ** -0.5, dtype=torch.float64), rtol=1e-12)  # r = t
    soft = TransitionLoss(T, weighting="soft_min_snr", label_dropout=0.0).time_weight(t, r)
    assert torch.allclose(soft, 1 / (delta ** 2 + sd ** 2), rtol=1e-10)
    assert torch.allclose(soft[32:], torch.full((32,), sd ** -2, dtype=torch.float64), rtol=1e-12)


def test_soft_min_snr_weight_with_the_snr_tau_is_its_closed_form():
    """OT-FM, tau(u) = u / (1 - u): at t = 0.75, r = 0.5 the difference is 3 - 1 = 2, so w = 1 / (4 + 1) = 0.2."""
    loss_fn = TransitionLoss(get_transport("ot_fm"), weighting="soft_min_snr", weight_tau="snr", label_dropout=0.0)
    w = loss_fn.time_weight(torch.tensor([0.75, 0.5, 0.75], dtype=torch.float64),
                            torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64))
    assert torch.allclose(w, torch.tensor([0.2, 1.0, 0.1], dtype=torch.float64), rtol=1e-12)


def test_adaptive_loss_is_each_rows_loss_over_its_stopped_value_plus_c():
    """adaptive: each row's term is L / (sg(L) + c): its value L / (L + c), its gradient grad(L) / (L + c).
    Diffusion rows only and constant weighting, so L is the plain MSE to h_t; c = 0.5 makes the sign of c
    visible (L / (L - c) would differ by a factor, not by 1e-5)."""
    T = get_transport("ot_fm")
    n, c = 6, 0.5
    x, labels = torch.randn(n, 1, 4, 4, dtype=torch.float64), torch.zeros(n, dtype=torch.long)
    net = PixelScale((1, 4, 4)).double()
    loss_fn = TransitionLoss(T, diffusion_ratio=1.0, consistency_ratio=0.0, weighting="constant", adaptive=True,
                             adaptive_c=c, label_dropout=0.0)
    loss, _ = loss_fn(net, x, labels, generator=torch.Generator().manual_seed(0))
    (grad,) = torch.autograd.grad(loss, net.w)
    # The same draws as the objective: (t, r) first, then eps.
    g = torch.Generator().manual_seed(0)
    t, r, n_diff = loss_fn.sample_pairs(n, generator=g)
    assert n_diff == n and torch.equal(t, r)
    eps = torch.randn(x.shape, generator=g, dtype=x.dtype)
    t = t.to(x.dtype)
    h = T.diffusion_target(x, eps, t)
    rows = [((net.w * T.path(x[i], eps[i], t[i]) - h[i]) ** 2).mean() for i in range(n)]
    values = torch.stack([row.detach() for row in rows])
    assert loss.item() == pytest.approx((values / (values + c)).mean().item(), rel=1e-12)
    assert values.min() > 0.05  # rows of the size of c: the closed form is not near a limit
    expected = sum(torch.autograd.grad(row, net.w)[0] / (v + c) for row, v in zip(rows, values)) / n
    assert torch.allclose(grad, expected, rtol=1e-10, atol=0)


def test_labels_shape_error_is_the_whole_message():
    T = get_transport("ot_fm")
    with pytest.raises(ValueError) as e:
        TransitionLoss(T, label_dropout=0.0)(ToyNet(), torch.randn(4, 2), torch.zeros(3, dtype=torch.long))
    assert str(e.value) == "labels must have shape (4,) to match x of shape (4, 2); got (3,)"


def test_meanflow_at_its_defaults_keeps_its_jvp_in_fp32_under_bf16_autocast():
    """The default MeanFlow objective (build_objective("meanflow")) called inside torch.autocast(bf16): its
    target, whose dF/dt comes from a JVP, is bit-identical to the fp32 target. Measured (tiny net, t = 0.5,
    r = 0.2): a JVP that follows autocast (fp32_derivative=False) is 1e-2 off in dF/dt, 2.4e-3 in the target."""
    T, net = get_transport("ot_fm"), randomized_tiny(torch.float32)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 1, 8, 8, generator=g)
    eps, labels = torch.randn(x.shape, generator=g), torch.zeros(8, dtype=torch.long)
    t, r = torch.full((8,), 0.5), torch.full((8,), 0.2)
    mf = build_objective("meanflow", T, null_label=10)
    assert mf.derivative == "jvp"
    plain_dF, plain = mf._dF_dt_jvp(net, x, eps, t, r, labels), mf.target(net, x, eps, t, r, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_dF, under = mf._dF_dt_jvp(net, x, eps, t, r, labels), mf.target(net, x, eps, t, r, labels)
        bf16_dF = MeanFlowLoss(T, null_label=10, fp32_derivative=False)._dF_dt_jvp(net, x, eps, t, r, labels)
    assert under_dF.dtype == torch.float32 and torch.equal(under_dF, plain_dF) and torch.equal(under, plain)
    assert (bf16_dF - plain_dF).norm() / plain_dF.norm() > 1e-3  # what the default protects against
