"""Edges of the HTTP service: a refund whose channel is missing, a wallet adapter that
raises, a notification once the engine is closed."""

from __future__ import annotations

from pathlib import Path

from payengine import CashPart, Engine, EngineConfig, PaymentRequest
from payengine.actors.service import ServiceConfig, create_app
from tests.helpers import SLOW_POLICY, ScriptedChannel, paid_reply, signed_callback, wait_for

from .support import InProcess, payment
from .test_service_app import err, notify


class Raising(ScriptedChannel):
    def verify_notification(self, body: bytes, headers: object) -> object:
        raise KeyError("secret-detail-xyz")


def test_a_refund_through_a_channel_not_given_is_409_channels_missing(tmp_path: Path) -> None:
    wechat, alipay = ScriptedChannel("wechat"), ScriptedChannel("alipay")
    eng = Engine.open(tmp_path / "x.db", channels=[wechat, alipay], policy=SLOW_POLICY,
                      config=EngineConfig(duplicate_guard_window_ms=0))
    receipt = eng.submit(PaymentRequest("station-42", "al-1", "alice", "CNY", 100, "t",
                                        CashPart(100, "alipay")))
    wait_for(lambda: eng.get_order(receipt.order_id).state == "paying")
    signed_callback(eng, "alipay", receipt.payment_serial, paid_reply(receipt.payment_serial))
    wait_for(lambda: eng.get_order(receipt.order_id).settled)
    eng.shutdown()
    eng = Engine.open(tmp_path / "x.db", channels=[wechat], policy=SLOW_POLICY)
    with InProcess(create_app(eng)) as served, served.client() as http:
        r = http.post(f"/v1/orders/{receipt.order_id}/refunds",
                      json={"refund_no": "r1", "amount_minor": 50})
        assert r.status_code == 409
        assert err(r)["code"] == "channels_missing"
        assert "alipay" in err(r)["details"]["channels"]


def test_a_wallet_adapter_that_raises_is_refused_and_shows_nothing_of_it(
        tmp_path: Path) -> None:
    eng = Engine.open(tmp_path / "b.db", channels=[Raising("boom")], policy=SLOW_POLICY)
    with InProcess(create_app(eng)) as served, served.client() as http:
        r = http.post("/v1/notify/boom", content=b"{}")
        assert r.status_code in (400, 500)
        assert "secret-detail-xyz" not in r.text
        assert r.json()["code"] == "FAIL"


def test_a_notification_once_the_engine_is_closed_is_503_in_the_wallets_format(
        tmp_path: Path) -> None:
    eng = Engine.open(tmp_path / "c.db", channels=[ScriptedChannel("mywallet")],
                      policy=SLOW_POLICY)
    with InProcess(create_app(eng, config=ServiceConfig(shutdown_engine=False))) as served, \
            served.client() as http:
        receipt = http.post("/v1/orders", json=payment("c-1", channel="mywallet")).json()
        eng.shutdown()
        r = notify(http, "mywallet", receipt["payment_serial"],
                   paid_reply(receipt["payment_serial"]))
        assert r.status_code == 503
        assert r.json()["code"] == "FAIL"
        assert r.json()["message"].startswith("engine_closed")
