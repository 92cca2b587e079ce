"""`LegView.channels_tried`: the last entry is the current channel, its leg status and last answer."""

from __future__ import annotations

from pathlib import Path

from payengine import CashPart, ChannelReply, PaymentRequest
from tests.blackbox_session4b.support import QUICK, Wallet, open_with
from tests.helpers import wait_for


def test_a_paying_order_shows_its_channel_paying_with_the_last_answer(tmp_path: Path) -> None:
    a = Wallet("a", pay=ChannelReply("SUCCESS", "USERPAYING"))
    eng = open_with(tmp_path / "x.db", [a])
    try:
        r = eng.submit(PaymentRequest("s-1", "n-1", "alice", "CNY", 50_00, "Fuel",
                                      cash=CashPart(50_00, "a")))
        tried = wait_for(lambda: (t := eng.get_order(r.order_id).legs[0].channels_tried)
                         and t[-1].code and t)
        assert [(t.channel, t.payment_serial, t.outcome, t.code) for t in tried] == [
            ("a", r.payment_serial, "paying", "USERPAYING")]
    finally:
        eng.shutdown()


def test_a_failed_direct_payment_shows_its_leg_status_and_the_refusal_code(tmp_path: Path
                                                                           ) -> None:
    a = Wallet("a", pay=ChannelReply("SUCCESS", "PAYERROR"))
    eng = open_with(tmp_path / "x.db", [a], policy=QUICK)
    try:
        r = eng.submit(PaymentRequest("s-1", "n-1", "alice", "CNY", 50_00, "Fuel",
                                      cash=CashPart(50_00, "a")))
        view = wait_for(lambda: (o := eng.get_order(r.order_id)).settled and o)
        assert view.state == "failed"
        only = view.legs[0].channels_tried
        assert len(only) == 1
        assert only[0].outcome == view.legs[0].status
        assert only[0].code == "PAYERROR"
    finally:
        eng.shutdown()
