"""The service's answer to a wallet notification (``answer_notification``), without a
server: acknowledged only when the engine took it, in the wallet's own format."""

from __future__ import annotations

import json
from collections.abc import Mapping

from hypothesis import given
from hypothesis import strategies as st

from payengine import NotificationRejected, Overloaded, UnknownOrder
from payengine.actors.service.notify import ACK_FORMATS, ACK_REFUSALS_BUG, answer_notification
from payengine.engine.errors import EngineClosed, InvalidRequest, PaymentError

ERRORS = st.one_of(
    st.builds(NotificationRejected, st.just("refused"),
              st.sampled_from(["bad_signature", "malformed", "wrong_channel", "wrong_amount",
                               "unverified", "unconfirmed"])),
    st.builds(UnknownOrder, st.just("no order")),
    st.builds(Overloaded, st.just("busy")),
    st.builds(EngineClosed, st.just("closed")),
    st.builds(InvalidRequest, st.just("bad channel")))


class Sink:
    def __init__(self, outcome: str | PaymentError) -> None:
        self.outcome = outcome
        self.calls: list[tuple[str, bytes, bool]] = []

    def handle_notification(self, channel: str, body: bytes,
                            headers: Mapping[str, str] | None = None, *,
                            wait: bool = True) -> str:
        self.calls.append((channel, body, wait))
        if isinstance(self.outcome, PaymentError):
            raise self.outcome
        return self.outcome


@given(error=ERRORS, fmt=st.sampled_from(sorted(ACK_FORMATS)))
def test_a_refused_notification_is_never_acknowledged_and_fails_in_the_wallets_format(
        error: PaymentError, fmt: str) -> None:
    answer = answer_notification(Sink(error), "wechat-1", b"{}", {}, ACK_FORMATS[fmt])
    assert not answer.acknowledged and answer.status >= 400
    assert answer.code == error.code
    if fmt == "alipay":
        assert answer.body == b"fail"
    else:
        failed = json.loads(answer.body)
        assert failed.get("return_code", failed.get("code")) == "FAIL"
    assert ("Retry-After" in answer.headers) == isinstance(error, (Overloaded, EngineClosed))


@given(state=st.sampled_from(["paying", "deducting", "succeeded", "closed", "queued"]),
       fmt=st.sampled_from(sorted(ACK_FORMATS)), wait=st.booleans())
def test_a_notification_the_engine_took_is_acknowledged_with_its_state(
        state: str, fmt: str, wait: bool) -> None:
    sink = Sink(state)
    answer = answer_notification(sink, "wechat-1", b"{}", {}, ACK_FORMATS[fmt], wait=wait)
    assert answer.status == 200 and answer.code == ""
    assert answer.headers == {"X-Payengine-Order-State": state}
    assert answer.body in (b"success", b'{"return_code":"SUCCESS","return_msg":"OK"}',
                           b'{"code":"SUCCESS","message":"OK"}')
    assert sink.calls == [("wechat-1", b"{}", wait)]


def test_the_planted_bug_acknowledges_a_refusal() -> None:
    answer = answer_notification(Sink(NotificationRejected("x", "bad_signature")), "w", b"{}",
                                 {}, ACK_FORMATS["json"], planted_bugs=frozenset(
                                     {ACK_REFUSALS_BUG}))
    assert answer.acknowledged and answer.code == "notification_rejected"
