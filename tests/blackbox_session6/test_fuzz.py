"""The service fuzzed from its own OpenAPI document (the issue: "fuzzed from its own OpenAPI
with schemathesis: no 5xx"), and the 5xx that fuzzing found (a zero unit price), fixed since."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from .support import child_env, error_of, payment, unique


def schemathesis_command() -> list[str]:
    for name in ("schemathesis", "st"):
        script = Path(sys.executable).parent / name
        if script.exists():
            return [str(script)]
    pytest.skip("schemathesis is not installed")


def test_schemathesis_fuzzing_from_openapi_json_finds_no_5xx_and_no_schema_mismatch(
        main_server: Any, tmp_path: Path) -> None:
    result = subprocess.run(
        [*schemathesis_command(), "run", main_server.url + "/openapi.json",
         "--checks", "not_a_server_error,response_schema_conformance",
         "--phases", "fuzzing", "--max-examples", "10", "--seed", "1", "--workers", "2",
         "--no-color"],
        cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout[-4000:]
    assert "Tested: 34" in result.stdout or "34 total" in result.stdout


SALE_WITHOUT_PRICE = {"station_id": "st-fuzz", "pump": 1, "nozzle": 1,
                      "line": {"grade": "95", "unit_price_minor": 0, "amount_minor": 100_00}}


def fresh_post(url: str, path: str, body: dict[str, Any]) -> Any:
    import httpx
    with httpx.Client(base_url=url, timeout=30) as http:    # the answer may drop its connection
        return http.post(path, json=body)


def test_a_quote_for_a_sale_with_a_unit_price_of_0_is_400_invalid_request(main_server: Any) -> None:
    response = fresh_post(main_server.url, "/v1/quotes", {"merchant_id": "station-bb", "user_id": "u",
                                                           "sale": SALE_WITHOUT_PRICE})
    assert (response.status_code, error_of(response)["code"]) == (400, "invalid_request")


def test_a_payment_for_a_sale_with_a_unit_price_of_0_is_400_invalid_request(main_server: Any) -> None:
    number = unique("zero-price")
    response = fresh_post(main_server.url, "/v1/orders",
                          payment(number, "wechat", 100_00, sale=SALE_WITHOUT_PRICE))
    assert (response.status_code, error_of(response)["code"]) == (400, "invalid_request")


def test_a_payment_for_a_sale_with_a_unit_price_of_0_creates_nothing(main_server: Any) -> None:
    import httpx
    number = unique("zero-price")
    fresh_post(main_server.url, "/v1/orders", payment(number, "wechat", 100_00, sale=SALE_WITHOUT_PRICE))
    with httpx.Client(base_url=main_server.url, timeout=30) as http:
        found = http.get("/v1/orders", params={"merchant_id": "station-bb", "merchant_order_no": number})
    assert (found.status_code, error_of(found)["code"]) == (404, "unknown_order")
