"""The service fuzzed from its own OpenAPI document with schemathesis (hypothesis under the
hood), over real HTTP: no request gets a 5xx, and every refused request (4xx) leaves the
money and its parties as they were (a digest of those tables before and after)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402

from payengine.actors.runtime import ThreadRuntime  # noqa: E402
from payengine.actors.service import ServiceConfig  # noqa: E402
from tests.service_support import payment, serving, state_digest, wallet  # noqa: E402

EXAMPLES_PER_OPERATION = 15
"""Per operation and generation mode: about 1,000 requests in all, a minute or two."""


def _quiet(db: Path) -> str:
    """The digest once background work (a payment just accepted) has stopped moving it."""
    deadline = time.monotonic() + 10
    last, still = state_digest(db), 0
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = state_digest(db)
        still = still + 1 if now == last else 0
        if still >= 3:  # unchanged for 150 ms: a loaded machine may pause work for 50
            return now
        last = now
    return last


@pytest.fixture
def world() -> Iterator[ThreadRuntime]:
    runtime = ThreadRuntime()
    yield runtime
    runtime.shutdown()


def test_no_request_from_the_openapi_gets_a_5xx_and_every_refused_one_changes_nothing(
        tmp_path: Path, world: ThreadRuntime) -> None:
    db = tmp_path / "pay.db"
    config = ServiceConfig(port=0, rate_per_s=1_000_000, rate_burst=1_000_000)
    with serving(db, wallet(world, user_never_pays=1.0), config) as served, \
            served.client() as client:
        client.post("/v1/accounts", json={"account_id": "alice/points", "unit": "POINTS",
                                          "minor_per_unit": 10})
        client.post("/v1/orders", json=payment("seed-1"))
        schema = schemathesis.openapi.from_url(served.url + "/openapi.json")
        operations = [result.ok() for result in schema.get_all_operations()]
        assert len(operations) >= 25
        seen: dict[int, int] = {}
        for operation in operations:
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                strategy = operation.as_strategy(generation_mode=mode)

                @given(case=strategy)
                @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None,
                          suppress_health_check=list(HealthCheck))
                def run(case: schemathesis.Case) -> None:
                    before = _quiet(db)
                    response = case.call()
                    seen[response.status_code] = seen.get(response.status_code, 0) + 1
                    assert response.status_code < 500, (case.method, case.path,
                                                        response.text)
                    if response.status_code >= 400:
                        assert "error" in response.json() or case.path.startswith(
                            "/v1/notify/")
                        assert state_digest(db) == before, (case.method, case.path,
                                                            response.status_code)

                try:
                    run()
                except Unsatisfiable:  # nothing to make invalid (no parameters, no body)
                    assert mode is GenerationMode.NEGATIVE
        assert any(400 <= status < 500 for status in seen)
        assert any(status < 300 for status in seen)
