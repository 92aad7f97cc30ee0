"""Register, promote, roll back and load, against real MLflow stores: an embedded SQLite file and a
PostgreSQL-backed `mlflow server` (each test runs on both)."""

from __future__ import annotations

import json
import threading

import pandas as pd
import pytest

from components.common.errors import RegistryError, UserError
from components.registry.client import aliases as alias_map
from components.registry.promote import StaleChampion, apply, decide, promote, rollback
from tests.registry.conftest import SIZE

GOOD = {1: 40.0, 2: 30.0, 4: 20.0}
BETTER = {1: 30.0, 2: 22.0, 4: 15.0}
BEST = {1: 25.0, 2: 18.0, 4: 12.0}
WORSE = {1: 45.0, 2: 33.0, 4: 24.0}


def aliases(store, name) -> dict[str, str]:
    return alias_map(store.client().get_registered_model(name))


def test_register_then_load_by_alias_and_sample(store, name):
    import mlflow

    version = store.version(name, GOOD)
    mv = store.client().get_model_version(name, version)
    assert mv.tags["tim.eval.nfe_4.fid"] == "20" and mv.tags["tim.eval.monotone"] == "true"
    assert mv.tags["tim.recommended_nfe"] == "4"  # 20 is the best; 30 is not within 10% of it
    assert {"tim.train.run_id", "tim.code.version", "tim.data.version"} <= set(mv.tags)
    assert promote(store.params(name), version, tracking=store.tracking)["verdict"] == "promoted"

    with store.tracking.active():
        model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    out = model.predict(pd.DataFrame({"label": [2, 0], "num_images": [3, 1], "seed": [1, 2]}))
    assert len(out) == 4 and set(out["nfe"]) == {4}  # no NFE asked: the recommended one
    assert (out["width"] == SIZE).all() and out["label"].tolist() == [2, 2, 2, 0]
    again = model.predict(pd.DataFrame({"label": [2], "num_images": [3], "seed": [1], "nfe": [1]}))
    assert set(again["nfe"]) == {1} and again["image"].tolist() != out["image"][:3].tolist()


def test_gate_moves_aliases(store, name):
    client = store.client()
    first = store.version(name, GOOD)
    assert promote(store.params(name), first, tracking=store.tracking)["aliases"] == {"champion": first}

    worse = store.version(name, WORSE, seed=1)
    decision = promote(store.params(name), worse, tracking=store.tracking)
    assert decision["verdict"] == "rejected" and decision["champion"]["version"] == first
    assert aliases(store, name) == {"champion": first, "challenger": worse}

    failed = store.version(name, {**BEST, 1: float("nan")}, seed=2)  # diverged at one step
    assert promote(store.params(name), failed, tracking=store.tracking)["verdict"] == "rejected"
    assert aliases(store, name) == {"champion": first, "challenger": failed}

    better = store.version(name, BETTER, seed=3)
    decision = promote(store.params(name), better, tracking=store.tracking)
    assert decision["verdict"] == "promoted"
    assert aliases(store, name) == {"champion": better, "previous": first, "challenger": failed}
    runs = client.list_artifacts(decision["challenger"]["run_id"], "promotion")
    assert len(runs) == 1 and runs[0].path.endswith(".json")  # the decision is logged to MLflow

    tie = store.version(name, BETTER, seed=4)  # the same figures: the 2% relative margin is not met
    assert promote(store.params(name), tie, tracking=store.tracking)["verdict"] == "rejected"
    lenient = store.params(name, gate={"min_rel_improvement": 0.0})
    assert promote(lenient, tie, tracking=store.tracking)["verdict"] == "promoted"
    assert aliases(store, name)["champion"] == tie


def test_missing_evaluation_is_an_error_and_moves_nothing(store, name):
    from components.registry.register import register

    first = store.version(name, GOOD)
    promote(store.params(name), first, tracking=store.tracking)
    unevaluated = store.trained(seed=5, metrics=None)  # evaluate never logged to this run
    with pytest.raises(RegistryError, match="evaluation/metrics.json"):
        register(store.params(name), unevaluated / "tim", unevaluated / "train_run.json", None,
                 tracking=store.tracking)
    # A version registered by other means (here straight from the run's model) is judged the same way.
    client = store.client()
    run_id = json.loads((unevaluated / "train_run.json").read_text())["run_id"]
    client.log_artifacts(run_id, str(unevaluated / "tim"), "model")
    by_hand = client.create_model_version(name, f"runs:/{run_id}/model", run_id=run_id).version
    with pytest.raises(RegistryError, match="no readable evaluation/metrics.json"):
        promote(store.params(name), by_hand, tracking=store.tracking)
    assert aliases(store, name) == {"champion": first}
    assert "tim.promotion.lease" not in client.get_registered_model(name).tags  # the lease was released


def test_bad_names_and_versions(store, name):
    store.version(name, GOOD)
    with pytest.raises(RegistryError, match="not found"):
        promote(store.params("no-such-model"), 1, tracking=store.tracking)
    with pytest.raises(RegistryError, match="has no version 99"):
        promote(store.params(name), 99, tracking=store.tracking)
    with pytest.raises(RegistryError, match="'champion' points nowhere"):
        rollback(store.params(name), tracking=store.tracking)
    assert aliases(store, name) == {}


def test_guard_refuses_a_move_judged_against_a_stale_champion(store, name):
    client = store.client()
    first = store.version(name, GOOD)
    promote(store.params(name), first, tracking=store.tracking)
    slow = decide(client, name, store.version(name, BETTER, seed=1), store.params(name).gate)
    fast = store.version(name, BEST, seed=2)
    promote(store.params(name), fast, tracking=store.tracking)  # the champion moves while `slow` was being judged
    with pytest.raises(StaleChampion, match=f"changed from {first} to {fast}"):
        apply(client, slow)
    assert aliases(store, name) == {"champion": fast, "previous": first}


def test_concurrent_promotions_never_judge_against_a_stale_champion(store, name):
    first = store.version(name, GOOD)
    promote(store.params(name), first, tracking=store.tracking)
    challengers = [store.version(name, BETTER, seed=1), store.version(name, BEST, seed=2)]
    decisions, errors = {}, []
    start = threading.Barrier(len(challengers))

    def contend(version):
        start.wait()
        try:
            decisions[version] = promote(store.params(name), version, tracking=store.tracking)
        except Exception as e:  # noqa: BLE001  (reported below, with which promotion raised it)
            errors.append((version, e))

    threads = [threading.Thread(target=contend, args=(v,)) for v in challengers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    # The lease serialised them: the promoted decisions chain, each judged against its predecessor's champion.
    chain, champion = [d for d in decisions.values() if d["verdict"] == "promoted"], first
    while chain:
        following = [d for d in chain if d["champion"]["version"] == champion]
        assert len(following) == 1, f"judged against a champion already replaced: {chain}"
        champion = following[0]["challenger"]["version"]
        chain.remove(following[0])
    assert aliases(store, name)["champion"] == champion == challengers[1]  # the best one wins either way
    for d in decisions.values():
        if d["verdict"] == "rejected":  # only possible when judged against the best, already champion
            assert d["champion"]["version"] == challengers[1]


def test_rollback(store, name):
    first = store.version(name, GOOD)
    promote(store.params(name), first, tracking=store.tracking)
    second = store.version(name, BETTER, seed=1)
    promote(store.params(name), second, tracking=store.tracking)
    record = rollback(store.params(name), tracking=store.tracking)
    assert (record["from"], record["to"]) == (second, first)
    assert aliases(store, name) == {"champion": first}
    assert store.client().get_model_version(name, second).tags["tim.promotion.verdict"] == "rolled_back"
    with pytest.raises(RegistryError, match="'previous' points nowhere"):
        rollback(store.params(name), tracking=store.tracking)
    assert aliases(store, name) == {"champion": first}


def test_a_missing_store_is_an_error_and_is_not_created(tmp_path):
    from components.common.tracking import Tracking
    from components.registry.client import RegistryParams

    db = tmp_path / "nowhere" / "mlruns.db"
    for stage in (lambda p, **kw: promote(p, 1, **kw), rollback):
        with pytest.raises(UserError, match="no MLflow store at"):
            stage(RegistryParams(), tracking=Tracking(f"sqlite:///{db}"))
    assert not db.parent.exists()
