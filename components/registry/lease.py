"""The registered model's promotion lease: one promotion or rollback at a time moves its aliases.

MLflow has no compare-and-set, so the lease is a tag on the registered model taken with Fischer's timed protocol
(docs/registry.md describes the window that remains).
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_random

from components.common.errors import Contended
from components.registry.client import LockParams, registered_model

LEASE_TAG = "tim.promotion.lease"


class _Busy(Exception):
    """Another holder has the lease (internal: retried until LockParams.wait_s)."""


@contextmanager
def lease(client, name: str, p: LockParams) -> Iterator[str]:
    """Hold the registered model's promotion lease; yields this holder's token.

    Fischer's protocol: write our token only when the lease is free or expired, wait ``settle_s``, and hold it
    only if our token is still there. Two contenders cannot both hold it as long as ``settle_s`` exceeds the
    time between a contender's read and its write (one registry round trip)."""
    from mlflow.exceptions import MlflowException

    token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"

    def holder() -> dict | None:
        raw = registered_model(client, name).tags.get(LEASE_TAG)
        return json.loads(raw) if raw else None

    def take() -> None:
        held = holder()
        if held and held["owner"] != token and held["expires"] > time.time():
            raise _Busy(held)
        try:
            client.set_registered_model_tag(name, LEASE_TAG,
                                            json.dumps({"owner": token, "expires": time.time() + p.lease_s}))
        except MlflowException:
            # Two first writes of the tag collide in the store (a unique-key violation on PostgreSQL): lost race.
            if holder() is None:
                raise
            raise _Busy(holder()) from None
        time.sleep(p.settle_s)
        held = holder()
        if not held or held["owner"] != token:
            raise _Busy(held)

    try:
        Retrying(retry=retry_if_exception_type(_Busy), stop=stop_after_delay(p.wait_s), wait=wait_random(0.1, 0.5),
                 reraise=True)(take)
    except _Busy as busy:
        raise Contended(f"{name!r}: another promotion or rollback holds the lease {busy.args[0]} after "
                            f"waiting {p.wait_s:g} s; retry later, or delete the registered-model tag "
                            f"{LEASE_TAG} if its holder crashed") from None
    try:
        yield token
    finally:
        held = holder()
        if held and held["owner"] == token:
            client.delete_registered_model_tag(name, LEASE_TAG)
