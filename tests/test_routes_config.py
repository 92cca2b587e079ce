"""Routes declared in the channel configuration file: ``[routing]`` and ``[[routing.route]]``
(issue 11, item 3), and the ``not_found`` codes of a code table."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from payengine import ConfigError, Route, RoutingTable, load_config, load_routing

CHANNELS = """
[channels.wechat-1]
kind = "simulated"
wallet = "wechat"
merchant_no = "m-1"
credentials = { key = "key-of-merchant-number-one" }

[channels.wechat-1.codes.pay]
communication_ok = ["SUCCESS"]
success = ["SUCCESS"]
failure = ["PAYERROR", "CLOSED", "BANK_DOWN"]
retryable = ["BANK_DOWN"]
not_found = ["ORDERNOTEXIST"]

[channels.wechat-2]
like = "wechat-1"
merchant_no = "m-2"
credentials = { key = "key-of-merchant-number-two" }
"""

ROUTING = """
[routing]
fallbacks_max = 2

[[routing.route]]
method = "qr"
channel = "wechat-1"
priority = 0
weight = 3
fee_ppm = 6000
limits = { amount_min_minor = 100, amount_max_minor = 15000 }
currencies = ["CNY"]

[[routing.route]]
method = "qr"
channel = "wechat-2"
priority = 1
"""


def test_the_routes_of_the_file_become_the_routing_table(tmp_path: Path) -> None:
    path = tmp_path / "channels.toml"
    path.write_text(CHANNELS + ROUTING, encoding="utf-8")
    assert load_routing(path) == RoutingTable((
        Route("qr", "wechat-1", priority=0, weight=3, amount_min_minor=100,
              amount_max_minor=15_000, currencies=frozenset({"CNY"}), fee_ppm=6_000),
        Route("qr", "wechat-2", priority=1)), fallbacks_max=2)
    assert [c.name for c in load_config(path)] == ["wechat-1", "wechat-2"]  # still loads


def test_a_file_without_routing_has_no_routes_and_one_fallback_by_default() -> None:
    assert load_routing(CHANNELS) == RoutingTable()
    assert RoutingTable().fallbacks_max == 1


def test_the_not_found_codes_are_read_and_classify_as_processing() -> None:
    codes, _ = load_config(CHANNELS)[0].codes
    assert codes.not_found == frozenset({"ORDERNOTEXIST"})
    assert codes.classify("SUCCESS", "ORDERNOTEXIST").value == "processing"
    assert codes.is_not_found("SUCCESS", "ORDERNOTEXIST")
    assert not codes.is_not_found("FAIL", "ORDERNOTEXIST")


@pytest.mark.parametrize(("change", "key"), [
    (('channel = "wechat-2"', 'channel = "alipay"'), "routing.route[1].channel"),
    (("fallbacks_max = 2", "fallbacks_max = 4"), "routing.fallbacks_max"),
    (("weight = 3", "weight = 0"), "routing.route[0].weight"),
    (("priority = 1", "priority = -1"), "routing.route[1].priority"),
    (("fee_ppm = 6000", "fee_ppm = 1000001"), "routing.route[0].fee_ppm"),
    (('currencies = ["CNY"]', 'currencies = ["cny"]'), "routing.route[0].currencies"),
    (("amount_max_minor = 15000", "amount_max_minor = 50"),
     "routing.route[0].limits.amount_max_minor"),
    (("priority = 0", "colour = 0"), "routing.route[0].colour"),
    (('method = "qr"\nchannel = "wechat-2"', 'method = "qr"\nchannel = "wechat-1"'),
     "routing.route[1]"),
    (('[[routing.route]]\nmethod = "qr"\nchannel = "wechat-2"', '[[routing.route]]\n'
      'channel = "wechat-2"'), "routing.route[1].method"),
])
def test_a_bad_routing_setting_is_a_config_error_naming_its_key(change: tuple[str, str],
                                                                key: str) -> None:
    text = CHANNELS + ROUTING.replace(*change)
    with pytest.raises(ConfigError) as caught:
        load_routing(text)
    assert caught.value.key == key


def test_a_not_found_code_that_is_also_a_failure_is_refused() -> None:
    text = CHANNELS.replace('not_found = ["ORDERNOTEXIST"]', 'not_found = ["CLOSED"]')
    with pytest.raises(ConfigError) as caught:
        load_config(text)
    assert caught.value.key == "channels.wechat-1.codes.pay.not_found"


def test_routes_may_name_the_channels_given_instead_of_the_files() -> None:
    with pytest.raises(ConfigError, match="names no channel"):
        load_routing(CHANNELS + ROUTING, channels=["wechat-1"])
    assert len(load_routing(ROUTING, channels=["wechat-1", "wechat-2"]).routes) == 2


@given(st.integers(min_value=-5, max_value=10))
def test_fallbacks_max_is_taken_exactly_from_zero_to_three(value: int) -> None:
    text = CHANNELS + ROUTING.replace("fallbacks_max = 2", f"fallbacks_max = {value}")
    if 0 <= value <= 3:
        assert load_routing(text).fallbacks_max == value
    else:
        with pytest.raises(ConfigError, match="from 0 to 3"):
            load_routing(text)
