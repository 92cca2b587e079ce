"""Validation of the arguments of these sections' calls, and more routing file mistakes."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from payengine import AgreementStatus, ConfigError, Engine, InvalidRequest, load_routing
from tests.blackbox_session4b.support import AgreementWallet, Wallet, open_with

BAD_IDS: list[Any] = ["", "x" * 129, "a\nb", "a\x00b", 7, None, "\ud800"]


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    eng = open_with(tmp_path / "v.db", [AgreementWallet("wx"), Wallet("plain")])
    eng.open_account("alice/balance", "CNY")
    eng.open_account("bob/balance", "CNY")
    yield eng
    eng.shutdown()


CALLS: dict[str, Callable[[Engine, Any], Any]] = {
    "get_agreement": lambda e, bad: e.get_agreement(bad),
    "agreements_of": lambda e, bad: e.agreements_of(bad),
    "unsign_agreement": lambda e, bad: e.unsign_agreement(bad),
    "sign_agreement user": lambda e, bad: e.sign_agreement(bad, "wx"),
    "sign_agreement channel": lambda e, bad: e.sign_agreement("alice", bad),
    "callback channel": lambda e, bad: e.handle_agreement_callback(
        bad, "agr-1", "alice", AgreementStatus.SIGNED),
    "callback user": lambda e, bad: e.handle_agreement_callback(
        "wx", "agr-1", bad, AgreementStatus.SIGNED),
    "withhold merchant": lambda e, bad: e.withhold(bad, "n", "alice", 1_00, "CNY", "t"),
    "withhold no": lambda e, bad: e.withhold("m", bad, "alice", 1_00, "CNY", "t"),
    "withhold user": lambda e, bad: e.withhold("m", "n", bad, 1_00, "CNY", "t"),
    "withhold agreement": lambda e, bad: e.withhold("m", "n", "alice", 1_00, "CNY", "t",
                                                    agreement_ids=[bad]),
    "get_withholding merchant": lambda e, bad: e.get_withholding(bad, "n"),
    "get_withholding no": lambda e, bad: e.get_withholding("m", bad),
    "get_transfer": lambda e, bad: e.get_transfer(bad),
    "transfer id": lambda e, bad: e.transfer(bad, "alice/balance", "bob/balance", 1),
    "transfer from": lambda e, bad: e.transfer("t", bad, "bob/balance", 1),
    "transfer to": lambda e, bad: e.transfer("t", "alice/balance", bad, 1),
    "set_account_status": lambda e, bad: e.set_account_status(bad, "frozen"),
}


@pytest.mark.parametrize("bad", BAD_IDS, ids=lambda b: repr(b)[:12])
@pytest.mark.parametrize("call", sorted(CALLS))
def test_a_bad_id_is_invalid_request_before_anything_is_looked_up(engine: Engine, call: str,
                                                                  bad: Any) -> None:
    with pytest.raises(InvalidRequest):
        CALLS[call](engine, bad)


CHANNELS = """
[channels.wechat-1]
kind = "simulated"
wallet = "wechat"
merchant_no = "m1"
credentials = { key = "simulated-wallet-key-0001" }
"""


@pytest.mark.parametrize("snippet,key", [
    ('[[routing.route]]\nchannel = "wechat-1"\n', "routing.route[0].method"),
    ('[[routing.route]]\nmethod = "qr"\nchannel = "wechat-1"\nlimits = { colour = 1 }\n',
     "routing.route[0].limits.colour"),
    ('[[routing.route]]\nmethod = "qr"\nchannel = "wechat-1"\ncurrencies = "CNY"\n',
     "routing.route[0].currencies"),
    ('[[routing.route]]\nmethod = "qr"\nchannel = "wechat-1"\nweight = "3"\n',
     "routing.route[0].weight"),
    ('[[routing.route]]\nmethod = "qr"\nchannel = "wechat-1"\npriority = true\n',
     "routing.route[0].priority"),
    ('[routing]\nfallbacks_max = true\n', "routing.fallbacks_max"),
    ('[routing]\nfallbacks_max = "1"\n', "routing.fallbacks_max"),
    ('[[routing.route]]\nmethod = ""\nchannel = "wechat-1"\n', "routing.route[0].method"),
])
def test_more_routing_mistakes_are_config_errors_naming_the_key(snippet: str, key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_routing(CHANNELS + snippet)
    assert caught.value.key == key


def test_a_config_error_is_a_payment_error_with_code_config_error() -> None:
    import payengine
    assert issubclass(ConfigError, payengine.PaymentError)
    with pytest.raises(ConfigError) as caught:
        load_routing(CHANNELS + "[routing]\nfallbacks_max = 9\n")
    assert caught.value.code == "config_error"
    assert "routing.fallbacks_max" in str(caught.value)
