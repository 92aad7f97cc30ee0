"""The TiM objective: DDE against JVP, the row kinds, the single DDE forward, weights, baselines, bad input."""

import pytest
import torch

from tim_core import FlowMatchingLoss, MeanFlowLoss, TransitionLoss, build_model, build_objective, get_transport

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


def test_default_dde_step_is_accurate_on_ot_fm():
    """The paper's e = 0.005 on OT-FM also agrees with JVP to 1e-3 on a smooth network."""
    T, net = get_transport("ot_fm"), randomized_tiny()
    x = torch.randn(8, 1, 8, 8, dtype=torch.float64)
    eps, labels = torch.randn_like(x), torch.zeros(8, dtype=torch.long)
    t = torch.linspace(0.3, 0.9, 8, dtype=torch.float64)
    r = t / 3
    kw = dict(label_dropout=0.0)
    dde = TransitionLoss(T, **kw)._dF_dt_dde(net, x, eps, t, r, labels)
    jvp = TransitionLoss(T, derivative="jvp", **kw)._dF_dt_jvp(net, x, eps, t, r, labels)
    assert (dde - jvp).norm() / jvp.norm() < 1e-3


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
    with pytest.raises(ValueError, match="needs T_max"):
        TransitionLoss(get_transport("edm"), label_dropout=0.0)
    with pytest.raises(ValueError, match="MeanFlowLoss needs the ot_fm transport"):
        MeanFlowLoss(get_transport("vp"))
    with pytest.raises(ValueError, match="labels must have shape"):
        TransitionLoss(T, label_dropout=0.0)(ToyNet(), torch.randn(4, 2), torch.zeros(3, dtype=torch.long))
