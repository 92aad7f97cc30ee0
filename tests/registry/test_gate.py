"""The gate's rule on figures alone (no registry): margins, ties, thresholds, failed evaluations, monotonicity,
and the recommended NFE."""

from __future__ import annotations

import math

import pytest

from components.registry.client import Evaluation, GateParams, RecommendParams, recommended_nfe
from components.registry.promote import judge
from tests.registry.conftest import metrics_json


def ev(fid: dict[int, float], **kw) -> Evaluation:
    return Evaluation.from_metrics("run", metrics_json(fid, **kw))


def passed(checks) -> bool:
    return all(c["passed"] for c in checks)


CHAMPION = ev({1: 40.0, 2: 30.0, 4: 20.0})


@pytest.mark.parametrize("challenger, gate, promoted", [
    ({1: 30.0, 2: 25.0, 4: 15.0}, {}, True),                                   # better everywhere
    ({1: 30.0, 2: 25.0, 4: 21.0}, {}, False),                                  # worse at one gate NFE
    ({1: 40.0, 2: 30.0, 4: 20.0}, {"min_rel_improvement": 0.0}, True),        # tie, zero margin: newer wins
    ({1: 40.0, 2: 30.0, 4: 20.0}, {"min_rel_improvement": 0.02}, False),      # tie, relative margin
    ({1: 39.5, 2: 30.0, 4: 19.5}, {"min_improvement": 1.0}, False),           # better, but not by 1.0
    ({1: 39.0, 2: 30.0, 4: 19.0}, {"min_improvement": 1.0}, True),            # exactly the absolute margin
    ({1: 39.0, 2: 30.0, 4: 19.0}, {"min_improvement": 1.0, "min_rel_improvement": 0.1}, False),  # both apply
])
def test_margin(challenger, gate, promoted):
    assert passed(judge(ev(challenger), CHAMPION, GateParams(**gate))) is promoted


def test_higher_is_better_metrics_flip_the_comparison():
    gate = GateParams(metric="accuracy", nfe=[1])
    assert passed(judge(ev({1: 50.0}, accuracy=0.95), ev({1: 50.0}, accuracy=0.9), gate))
    assert not passed(judge(ev({1: 50.0}, accuracy=0.85), ev({1: 50.0}, accuracy=0.9), gate))


def test_absolute_thresholds_hold_without_a_champion():
    gate = GateParams(max={"fid": 25.0}, min={"accuracy": 0.5})
    assert passed(judge(ev({1: 20.0, 4: 10.0}), None, gate))
    checks = judge(ev({1: 30.0, 4: 10.0}), None, gate)
    assert [c["check"] for c in checks if not c["passed"]] == ["fid <= 25"]
    assert not passed(judge(ev({1: 20.0, 4: 10.0}, accuracy=0.3), None, gate))


@pytest.mark.parametrize("fid, monotone", [
    ({1: math.nan, 4: 10.0}, True),   # a diverged model: FID is not a number
    ({1: 20.0}, True),                # the gate NFE 4 was never measured
    ({1: 20.0, 4: 10.0}, None),       # one noise seed: no monotonicity verdict
])
def test_incomplete_evaluation_is_not_promoted(fid, monotone):
    checks = judge(ev(fid, monotone=monotone), None, GateParams())
    assert checks[0]["check"] == "evaluation complete" and not checks[0]["passed"]


def test_monotonicity_is_required_only_when_configured():
    not_monotone = ev({1: 20.0, 4: 10.0}, monotone=False)
    assert not passed(judge(not_monotone, None, GateParams(require_monotone=True)))
    assert passed(judge(not_monotone, None, GateParams(require_monotone=False)))


def test_recommended_nfe_is_the_smallest_within_tolerance():
    figures = ev({1: 30.0, 2: 21.0, 4: 20.0, 8: 19.5, 16: 19.0})
    assert recommended_nfe(figures, RecommendParams(tolerance=0.10)) == 4  # 20.0 <= 1.1 x 19.0 < 21.0
    assert recommended_nfe(figures, RecommendParams(tolerance=0.0)) == 16
    assert recommended_nfe(figures, RecommendParams(tolerance=1.0)) == 1
    assert recommended_nfe(ev({1: math.nan}), RecommendParams()) is None


def test_the_gate_and_the_recommendation_read_the_chosen_guidance_scale():
    """metrics.json with an unguided and a guided set (honest NFE 2 and 8 for 1 and 4 guided steps)."""
    metrics = metrics_json({1: 40.0, 4: 20.0})
    guided = {"ema": {"nfe_2": {"fid": 12.0, "accuracy": 0.9}, "nfe_8": {"fid": 11.0, "accuracy": 0.9}},
              "monotone": {"verdict": True}}
    metrics["scales"]["1.5"] = guided
    unguided, at_guided = Evaluation.from_metrics("r", metrics), Evaluation.from_metrics("r", metrics, 1.5)
    assert unguided.figure(1, "fid") == 40.0 and at_guided.figure(2, "fid") == 12.0
    assert at_guided.cfg_scale == 1.5 and at_guided.figure(1, "fid") is None
    assert recommended_nfe(at_guided, RecommendParams(guidance_scale=1.5)) == 2   # 12 is within 10% of 11
    assert passed(judge(at_guided, None, GateParams(nfe=[2, 8], guidance_scale=1.5)))
    with pytest.raises(Exception, match="no figures at guidance scale 2"):
        Evaluation.from_metrics("r", metrics, 2.0)
