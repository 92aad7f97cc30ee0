"""The promotion lease, with races made deterministic: another holder is simulated by writing its lease tag
(``tim.promotion.lease`` = {owner, expires}) into the registry before the stage runs, as a live promotion (or one
that crashed holding the lease) would have left it. Each test runs on both stores."""

from __future__ import annotations

import json
import time

import pytest

from components.common.errors import Contended, RegistryError
from components.registry.client import aliases as alias_map
from components.registry.lease import LEASE_TAG
from components.registry.promote import promote, rollback

GOOD = {1: 40.0, 2: 30.0, 4: 20.0}
BETTER = {1: 30.0, 2: 22.0, 4: 15.0}
OTHER = "other-host:4242:deadbeef"


def hold(store, name: str, expires_in: float, owner: str = OTHER) -> None:
    """Write another holder's lease tag, expiring ``expires_in`` seconds from now (negative: already expired)."""
    store.client().set_registered_model_tag(name, LEASE_TAG,
                                            json.dumps({"owner": owner, "expires": time.time() + expires_in}))


def lease_tag(store, name: str) -> dict | None:
    raw = store.client().get_registered_model(name).tags.get(LEASE_TAG)
    return json.loads(raw) if raw else None


def aliases(store, name) -> dict[str, str]:
    return alias_map(store.client().get_registered_model(name))


def test_an_expired_lease_is_taken_over_at_once(store, name):
    """A holder that crashed long ago left its tag behind, expired: the next promotion takes it, no waiting."""
    first = store.version(name, GOOD)
    hold(store, name, expires_in=-5)
    params = store.params(name, lock={"settle_s": 0.2, "wait_s": 0})  # no queueing allowed: must take it now
    assert promote(params, first, tracking=store.tracking)["verdict"] == "promoted"
    assert aliases(store, name) == {"champion": first}
    assert lease_tag(store, name) is None  # ours replaced the dead one, and ours was released


def test_a_crashed_holder_blocks_only_until_its_lease_expires(store, name):
    """The crashed holder's lease is still live when the promotion starts: it queues, then takes it over."""
    first = store.version(name, GOOD)
    hold(store, name, expires_in=3.0)
    params = store.params(name, lock={"settle_s": 0.2, "wait_s": 30})
    start = time.monotonic()
    assert promote(params, first, tracking=store.tracking)["verdict"] == "promoted"
    waited = time.monotonic() - start
    assert 2.5 < waited < 25, f"waited {waited:.1f} s for a lease that expired after 3 s"
    assert lease_tag(store, name) is None


def test_waiting_past_wait_s_is_contended_naming_the_holder_and_moves_nothing(store, name):
    first = store.version(name, GOOD)
    promote(store.params(name), first, tracking=store.tracking)
    challenger = store.version(name, BETTER, seed=1)
    hold(store, name, expires_in=600)
    params = store.params(name, lock={"settle_s": 0.2, "wait_s": 1.5})
    start = time.monotonic()
    with pytest.raises(Contended, match=OTHER) as raised:
        promote(params, challenger, tracking=store.tracking)
    assert 1.5 <= time.monotonic() - start < 15  # gave up after wait_s, not at once and not never
    assert raised.value.exit_code == 75 and "after waiting 1.5 s" in str(raised.value)
    assert aliases(store, name) == {"champion": first}
    assert lease_tag(store, name)["owner"] == OTHER  # the live holder's lease is left alone


def test_rollback_under_contention_waits_for_the_lease(store, name):
    first = store.version(name, GOOD)
    promote(store.params(name), first, tracking=store.tracking)
    second = store.version(name, BETTER, seed=1)
    promote(store.params(name), second, tracking=store.tracking)

    hold(store, name, expires_in=600)
    with pytest.raises(Contended, match=OTHER):
        rollback(store.params(name, lock={"settle_s": 0.2, "wait_s": 1.0}), tracking=store.tracking)
    assert aliases(store, name) == {"champion": second, "previous": first}  # nothing moved

    hold(store, name, expires_in=2.0)  # the holder finishes (its lease runs out) while rollback waits
    record = rollback(store.params(name, lock={"settle_s": 0.2, "wait_s": 30}), tracking=store.tracking)
    assert (record["from"], record["to"]) == (second, first)
    assert aliases(store, name) == {"champion": first}
    assert lease_tag(store, name) is None


def test_a_champion_without_a_gate_figure_is_an_error_and_moves_nothing(store, name):
    """The champion was judged under an older gate (NFE 1 and 2); today's gate asks for NFE 4 too."""
    old = store.version(name, {1: 40.0, 2: 30.0})
    promote(store.params(name, gate={"nfe": [1, 2]}), old, tracking=store.tracking)
    challenger = store.version(name, BETTER, seed=1)
    with pytest.raises(RegistryError, match=r"champion's evaluation .* has no finite fid at NFE 4"):
        promote(store.params(name), challenger, tracking=store.tracking)
    assert aliases(store, name) == {"champion": old}
    tags = store.client().get_model_version(name, challenger).tags
    assert "tim.promotion.verdict" not in tags
    assert lease_tag(store, name) is None  # released on the error
