"""The pure statement module: parsing, amounts and times, and the judgement of each line."""

from __future__ import annotations

import dataclasses
import datetime

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from payengine.engine import statement as stmt
from payengine.engine.codes import ResultKind
from payengine.engine.money import AMOUNT_MAX
from payengine.engine.order import (
    Activate,
    CashPart,
    CashResult,
    LegStatus,
    OrderPolicy,
    OrderState,
    PaymentRequest,
    RefundResult,
    ResultSource,
    build_order,
    decide,
)
from payengine.engine.statement import (
    LineStatus,
    OrderSnapshot,
    RefundSnapshot,
    RefundState,
    StatementError,
    StatementLine,
    Verdict,
    classify,
    confirm,
    format_amount,
    format_time,
    judge,
    judge_absent,
    parse_amount,
    parse_statement,
    parse_time,
    render_statement,
)

HEADER = "channel,channel_txn_id,out_trade_no,amount,currency,status,time"
T = "2026-11-24T10:15:00Z"
T_MS = 1_795_515_300_000


def statement(*rows: str, header: str = HEADER) -> str:
    return "\n".join((header, *rows)) + "\n"


# ---------------------------------------------------------------------- parsing


def test_a_statement_parses_to_lines_in_integer_minor_units_and_epoch_ms() -> None:
    lines = parse_statement(statement(
        f"wechat,4200001,P1,96.00,CNY,SUCCESS,{T},",
        "wechat,5000001,P1,0.01,CNY,REFUND,2026-11-24T10:15:00.250Z,P1-R1",
        header=HEADER + ",refund_id"))
    assert lines == [
        StatementLine("wechat", "4200001", "P1", 9600, "CNY", LineStatus.SUCCESS, T_MS,
                      line_no=2),
        StatementLine("wechat", "5000001", "P1", 1, "CNY", LineStatus.REFUND, T_MS + 250,
                      "P1-R1", line_no=3),
    ]
    assert lines[0].key == ("wechat", "4200001", "SUCCESS", "")
    assert lines[1].key == ("wechat", "5000001", "REFUND", "P1-R1")


def test_columns_in_any_order_a_bom_crlf_quotes_and_blank_lines_are_fine() -> None:
    text = ("\ufefftime,status,currency,amount,out_trade_no,channel_txn_id,channel\r\n"
            f'{T},SUCCESS,JPY,"1200",P9, T-9 ,wechat\r\n\r\n')
    (line,) = parse_statement(text)
    assert (line.channel_txn_id, line.amount_minor, line.currency) == ("T-9", 1200, "JPY")
    assert line.line_no == 2


@pytest.mark.parametrize(("text", "line_no", "words"), [
    ("", 1, "header"),
    ("channel,amount\n", 1, "missing"),
    (HEADER + ",fee\n", 1, "unknown"),
    (HEADER + ",channel\n", 1, "once"),
    (statement("wechat,T1,P1,96.00,CNY,SUCCESS"), 2, "fields"),
    (statement(f"wechat,T1,P1,96.00,CNY,success,{T}"), 2, "status"),
    (statement(f"wechat,T1,P1,96.00,cny,SUCCESS,{T}"), 2, "currency"),
    (statement(f"wechat,T1,P1,96.00,CNY,SUCCESS,{T}", f"wechat,T2,P2,96.0,CNY,SUCCESS,{T}"), 3,
     "amount"),
    (statement(f"wechat,T1,P1,96.00,CNY,REFUND,{T}"), 2, "refund_id"),
    (statement(f"wechat,T1,P1,96.00,CNY,SUCCESS,{T},P1-R1", header=HEADER + ",refund_id"), 2,
     "refund_id"),
    (statement(f",T1,P1,96.00,CNY,SUCCESS,{T}"), 2, "channel"),
    (statement(f"wechat,T1,{'P' * 129},96.00,CNY,SUCCESS,{T}"), 2, "out_trade_no"),
    (statement("wechat,T1,P1,96.00,CNY,SUCCESS,2026-11-24T10:15:00+08:00"), 2, "UTC"),
    (statement("wechat,T1,P1,96.00,CNY,SUCCESS,2026-02-29T10:15:00Z"), 2, "valid"),
    (statement("wechat,T1,P1,96.00,CNY,SUCCESS,2026-11-24T24:00:00Z"), 2, "valid"),
    (statement("wechat,T1,P1,96.00,CNY,SUCCESS,2026-11-24 10:15:00Z"), 2, "ISO"),
    (statement(f'wechat,"T1,P1,96.00,CNY,SUCCESS,{T}'), 2, "CSV"),
    (statement(f"wechat,T\x001,P1,96.00,CNY,SUCCESS,{T}"), 2, ""),
])
def test_a_bad_line_is_a_typed_error_naming_the_line(text: str, line_no: int, words: str) -> None:
    with pytest.raises(StatementError) as caught:
        parse_statement(text)
    assert caught.value.code == "bad_statement"
    assert caught.value.line_no == line_no
    assert f"line {line_no}:" in caught.value.message
    assert words in caught.value.message


def test_a_statement_beyond_the_line_limit_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stmt, "MAX_LINES", 3)
    rows = [f"wechat,T{i},P{i},1.00,CNY,SUCCESS,{T}" for i in range(4)]
    assert len(parse_statement(statement(*rows[:3]))) == 3
    with pytest.raises(StatementError, match="more than 3 lines") as caught:
        parse_statement(statement(*rows))
    assert caught.value.line_no == 5


def test_lines_built_in_code_are_validated_too() -> None:
    with pytest.raises(StatementError, match="amount"):
        StatementLine("wechat", "T1", "P1", 0, "CNY", LineStatus.SUCCESS, T_MS)
    with pytest.raises(StatementError, match="amount"):
        StatementLine("wechat", "T1", "P1", 96.0, "CNY", LineStatus.SUCCESS, T_MS)  # type: ignore[arg-type]
    with pytest.raises(StatementError, match="refund_id"):
        StatementLine("wechat", "T1", "P1", 1, "CNY", LineStatus.REFUND, T_MS)


# ---------------------------------------------------------------------- amounts and times


@pytest.mark.parametrize("text", ["96.0", "-1.00", "1e3", "96.001", "+96.00", "96", "096.00",
                                  "96.00 ", "96,00", "0.00", "٩٦.00", "1_000.00", "",
                                  "10000000000000.01", "NaN", "inf", ".50", "96."])
def test_malformed_cny_amounts_are_refused(text: str) -> None:
    with pytest.raises(StatementError):
        parse_amount(text, "CNY")


def test_amounts_follow_the_currency_minor_digits() -> None:
    assert parse_amount("96.00", "CNY") == 9600
    assert parse_amount("96", "JPY") == 96
    assert parse_amount("1.005", "KWD") == 1005
    assert parse_amount("10000000000000.00", "CNY") == AMOUNT_MAX
    for text, currency in (("96.00", "JPY"), ("1.00", "KWD"), ("96", "CNY")):
        with pytest.raises(StatementError):
            parse_amount(text, currency)


CURRENCIES = st.sampled_from(["CNY", "USD", "JPY", "KRW", "KWD", "BHD"])


@given(st.integers(min_value=1, max_value=AMOUNT_MAX), CURRENCIES)
def test_amounts_round_trip(amount: int, currency: str) -> None:
    text = format_amount(amount, currency)
    assert parse_amount(text, currency) == amount


@given(st.text(alphabet="0123456789.-+eE_ ,x\u0663", max_size=20), CURRENCIES)
def test_any_amount_text_is_either_refused_or_canonical(text: str, currency: str) -> None:
    """No spelling is taken loosely: whatever parses is exactly how it would be written."""
    try:
        amount = parse_amount(text, currency)
    except StatementError:
        return
    assert format_amount(amount, currency) == text


@given(st.integers(min_value=1, max_value=AMOUNT_MAX), CURRENCIES,
       st.sampled_from(["{}0", "-{}", "+{}", "0{}", "{}.", "{} ", "{}e0", "{}1"]))
def test_a_valid_amount_altered_is_refused(amount: int, currency: str, shape: str) -> None:
    text = shape.format(format_amount(amount, currency))
    assume(shape not in ("{}0", "{}1") or stmt.minor_digits(currency) > 0)  # "96" + "0" is 960 yen
    with pytest.raises(StatementError):
        parse_amount(text, currency)


@given(st.integers(min_value=0, max_value=253_402_300_799_999))
def test_times_round_trip_and_agree_with_datetime(time_ms: int) -> None:
    text = format_time(time_ms)
    assert parse_time(text) == time_ms
    moment = datetime.datetime.fromtimestamp(time_ms / 1000, datetime.UTC).replace(
        microsecond=(time_ms % 1000) * 1000)
    assert parse_time(moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")) == time_ms
    assert parse_time(moment.isoformat(timespec="milliseconds")) == time_ms


LINES = st.builds(
    lambda i, amount, currency, refund, t: StatementLine(
        "wechat", f"T{i}", f"P{i}", amount, currency,
        LineStatus.REFUND if refund else LineStatus.SUCCESS, t, f"P{i}-R1" if refund else None),
    st.integers(0, 10**6), st.integers(1, AMOUNT_MAX), CURRENCIES, st.booleans(),
    st.integers(0, 4_102_444_800_000))


@given(st.lists(LINES, max_size=20))
def test_a_rendered_statement_parses_back_to_the_same_lines(lines: list[StatementLine]) -> None:
    parsed = parse_statement(render_statement(lines))
    assert [dataclasses.replace(p, line_no=0) for p in parsed] == lines


# ---------------------------------------------------------------------- judgement


def snap(**changes: object) -> OrderSnapshot:
    base = OrderSnapshot(
        order_id="ord-1", payment_serial="P1", state=OrderState.SUCCEEDED, currency="CNY",
        created_at_ms=T_MS - 60_000, close_at_ms=T_MS + 60_000, cash_status=LegStatus.PAID,
        cash_amount_minor=9600, channel="wechat", channel_txn_id="T1", refunds=(), version=5,
        as_of_ms=T_MS)
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def charge(amount: int = 9600, txn: str = "T1", currency: str = "CNY",
           channel: str = "wechat") -> StatementLine:
    return StatementLine(channel, txn, "P1", amount, currency, LineStatus.SUCCESS, T_MS)


def refund_line(refund_id: str = "P1-R1", amount: int = 9600) -> StatementLine:
    return StatementLine("wechat", "RT1", "P1", amount, "CNY", LineStatus.REFUND, T_MS, refund_id)


SUCCESS_FED = CashResult(ResultKind.SUCCESS, ResultSource.RECONCILIATION, "STATEMENT", "T1", 9600)


@pytest.mark.parametrize(("line", "order", "verdict", "event"), [
    (charge(), None, Verdict.UNKNOWN_ORDER, None),
    (charge(channel="alipay"), snap(), Verdict.UNKNOWN_ORDER, None),
    (charge(), snap(cash_status=None, cash_amount_minor=None, channel=None), Verdict.UNKNOWN_ORDER,
     None),
    (charge(), snap(), Verdict.MATCHED, None),
    (charge(), snap(channel_txn_id=None), Verdict.MATCHED, None),
    (charge(), snap(state=OrderState.DEDUCTING), Verdict.MATCHED, None),
    (charge(), snap(state=OrderState.CLOSED, cash_status=LegStatus.REFUNDED), Verdict.MATCHED, None),
    (charge(txn="T2"), snap(), Verdict.DUPLICATE_CHARGE,
     dataclasses.replace(SUCCESS_FED, channel_txn_id="T2")),
    (charge(txn="T2"), snap(refunds=(RefundSnapshot("P1-DC1", "duplicate_charge", 9600,
                                                    RefundState.REFUNDED, "T2"),)),
     Verdict.MATCHED, None),
    (charge(), snap(state=OrderState.PAYING, cash_status=LegStatus.PAYING, channel_txn_id=None),
     Verdict.RESOLVED_SUCCESS, SUCCESS_FED),
    (charge(), snap(state=OrderState.NEEDS_RECONCILIATION, cash_status=LegStatus.PAYING,
                    channel_txn_id=None), Verdict.RESOLVED_SUCCESS, SUCCESS_FED),
    (charge(), snap(state=OrderState.NEEDS_RECONCILIATION, cash_status=LegStatus.PAYING,
                    channel_txn_id=None, close_at_ms=T_MS), Verdict.ERROR_REFUND, SUCCESS_FED),
    (charge(), snap(state=OrderState.CLOSED, cash_status=LegStatus.UNPAID, channel_txn_id=None),
     Verdict.ERROR_REFUND, SUCCESS_FED),
    (charge(), snap(state=OrderState.CLOSED, cash_status=LegStatus.UNKNOWN, channel_txn_id=None),
     Verdict.ERROR_REFUND, SUCCESS_FED),
    (charge(), snap(state=OrderState.CLOSED, cash_status=LegStatus.PAYING, channel_txn_id=None),
     Verdict.ERROR_REFUND, SUCCESS_FED),
    (charge(), snap(state=OrderState.FAILED, cash_status=LegStatus.UNPAID, channel_txn_id=None),
     Verdict.ERROR_REFUND, SUCCESS_FED),
    (charge(9500), snap(state=OrderState.NEEDS_RECONCILIATION, cash_status=LegStatus.PAYING),
     Verdict.AMOUNT_MISMATCH, dataclasses.replace(SUCCESS_FED, amount_minor=9500)),
    (charge(9500), snap(state=OrderState.PAYING, cash_status=LegStatus.PAYING),
     Verdict.AMOUNT_MISMATCH, dataclasses.replace(SUCCESS_FED, amount_minor=9500)),
    (charge(9500), snap(state=OrderState.CLOSED, cash_status=LegStatus.UNPAID),
     Verdict.AMOUNT_MISMATCH, None),
    (charge(9500), snap(), Verdict.AMOUNT_MISMATCH, None),
    (charge(currency="USD"), snap(state=OrderState.PAYING, cash_status=LegStatus.PAYING),
     Verdict.AMOUNT_MISMATCH, None),
    (charge(), snap(state=OrderState.NEEDS_RECONCILIATION, cash_status=LegStatus.UNKNOWN,
                    charge_reported=True), Verdict.AMOUNT_MISMATCH, None),
    (charge(), snap(state=OrderState.ACCEPTED, cash_status=LegStatus.NEW, channel_txn_id=None),
     Verdict.UNRESOLVED, None),
])
def test_each_charge_line_is_judged_against_its_order(
    line: StatementLine, order: OrderSnapshot | None, verdict: Verdict,
    event: CashResult | None,
) -> None:
    judgement = judge(line, order)
    assert judgement.verdict is verdict
    assert judgement.event == event
    assert classify(line, order) is verdict
    assert judgement.detail


def refunds(state: RefundState, kind: str = "error", amount: int = 9600) -> tuple[RefundSnapshot]:
    return (RefundSnapshot("P1-R1", kind, amount, state),)


REFUND_FED = RefundResult("P1-R1", ResultKind.SUCCESS, ResultSource.RECONCILIATION, "STATEMENT")
CLOSED = {"state": OrderState.CLOSED, "cash_status": LegStatus.REFUNDING}


@pytest.mark.parametrize(("line", "order", "verdict", "event"), [
    (refund_line(), None, Verdict.UNKNOWN_REFUND, None),
    (refund_line(), snap(), Verdict.UNKNOWN_REFUND, None),
    (refund_line("P1-R9"), snap(**CLOSED, refunds=refunds(RefundState.REFUNDING)),
     Verdict.UNKNOWN_REFUND, None),
    (refund_line(), snap(**CLOSED, refunds=refunds(RefundState.REFUNDED)), Verdict.REFUND_MATCHED,
     None),
    (refund_line(), snap(**CLOSED, refunds=refunds(RefundState.REFUNDING)),
     Verdict.REFUND_RESOLVED, REFUND_FED),
    (refund_line(), snap(**CLOSED, refunds=refunds(RefundState.UNKNOWN)), Verdict.REFUND_RESOLVED,
     REFUND_FED),
    (refund_line(amount=100), snap(refunds=refunds(RefundState.REFUNDING, "merchant", 100)),
     Verdict.REFUND_RESOLVED, REFUND_FED),
    (refund_line(amount=200), snap(refunds=refunds(RefundState.REFUNDING, "merchant", 100)),
     Verdict.AMOUNT_MISMATCH, None),
    (refund_line(), snap(**CLOSED, refunds=refunds(RefundState.FAILED)), Verdict.UNRESOLVED, None),
])
def test_each_refund_line_is_judged_against_its_order(
    line: StatementLine, order: OrderSnapshot | None, verdict: Verdict,
    event: RefundResult | None,
) -> None:
    judgement = judge(line, order)
    assert (judgement.verdict, judgement.event) == (verdict, event)


WAITING = {"state": OrderState.NEEDS_RECONCILIATION, "cash_status": LegStatus.PAYING,
           "channel_txn_id": None}


@pytest.mark.parametrize(("order", "any_line", "verdict", "fed"), [
    (snap(), False, Verdict.MISSING_ON_STATEMENT, False),
    (snap(state=OrderState.CLOSED, cash_status=LegStatus.REFUNDED), False,
     Verdict.MISSING_ON_STATEMENT, False),
    (snap(**WAITING), False, Verdict.RESOLVED_FAILED, True),
    (snap(**WAITING, close_at_ms=T_MS + 60_001), False, None, False),  # may pay after cut-off
    (snap(state=OrderState.CLOSED, cash_status=LegStatus.UNKNOWN, channel_txn_id=None), False,
     Verdict.RESOLVED_FAILED, True),
    (snap(state=OrderState.CLOSED, cash_status=LegStatus.UNKNOWN, channel_txn_id=None,
          close_at_ms=T_MS + 60_001), False, Verdict.RESOLVED_FAILED, True),
    (snap(state=OrderState.NEEDS_RECONCILIATION, cash_status=LegStatus.UNKNOWN,
          charge_reported=True), False, Verdict.UNRESOLVED, False),
    (snap(state=OrderState.CLOSED, cash_status=LegStatus.UNKNOWN, channel_txn_id=None,
          charge_reported=True), False, Verdict.UNRESOLVED, False),
    (snap(**WAITING), True, Verdict.UNRESOLVED, False),
    (snap(state=OrderState.PAYING, cash_status=LegStatus.PAYING), False, None, False),
    (snap(state=OrderState.CLOSED, cash_status=LegStatus.UNPAID), False, None, False),
    (snap(state=OrderState.CLOSED, cash_status=LegStatus.PAYING), False, None, False),
])
def test_an_order_the_statement_lacks_is_reported_or_failed(
    order: OrderSnapshot, any_line: bool, verdict: Verdict | None, fed: bool
) -> None:
    judgement = judge_absent(order, any_line=any_line, period_end_ms=T_MS + 60_000)
    assert (judgement and judgement.verdict) == verdict
    if judgement is not None:
        assert (judgement.event is not None) == fed
        if fed:
            assert judgement.event == CashResult(ResultKind.FAILURE, ResultSource.RECONCILIATION,
                                                 "ABSENT_FROM_STATEMENT")


def test_confirm_names_what_the_core_really_did() -> None:
    waiting = snap(state=OrderState.NEEDS_RECONCILIATION, cash_status=LegStatus.PAYING,
                   channel_txn_id=None)
    expected = judge(charge(), waiting)
    assert expected.verdict is Verdict.RESOLVED_SUCCESS
    succeeded = confirm(expected, waiting, snap(), charge())
    assert succeeded.verdict is Verdict.RESOLVED_SUCCESS and succeeded.final
    too_late = confirm(expected, waiting, snap(**CLOSED), charge())
    assert too_late.verdict is Verdict.ERROR_REFUND and too_late.final
    ignored = confirm(expected, waiting, waiting, charge())
    assert ignored.verdict is Verdict.UNRESOLVED and not ignored.final
    second = judge(charge(txn="T2"), snap())
    assert not confirm(second, snap(), snap(), charge(txn="T2")).final
    refunded = snap(refunds=(RefundSnapshot("P1-DC1", "duplicate_charge", 9600,
                                            RefundState.REFUNDING, "T2"),))
    assert confirm(second, snap(), refunded, charge(txn="T2")).final


@given(amount=st.integers(1, AMOUNT_MAX), txn=st.sampled_from(["T1", "T2"]),
       state=st.sampled_from(list(OrderState)), status=st.sampled_from(list(LegStatus)),
       late=st.booleans())
def test_a_mismatching_amount_never_matches_and_never_pays(
    amount: int, txn: str, state: OrderState, status: LegStatus, late: bool
) -> None:
    assume(amount != 9600)
    order = snap(state=state, cash_status=status, close_at_ms=T_MS if late else T_MS + 1)
    judgement = judge(charge(amount, txn), order)
    assert judgement.verdict in (Verdict.AMOUNT_MISMATCH, Verdict.DUPLICATE_CHARGE)


@given(amount=st.integers(1, AMOUNT_MAX), late=st.booleans())
def test_the_core_never_succeeds_an_order_on_what_a_mismatching_line_feeds(
    amount: int, late: bool
) -> None:
    """End to end in the pure core: the event the judgement feeds, through ``decide``."""
    assume(amount != 9600)
    policy = OrderPolicy()
    order = build_order(
        PaymentRequest("m", "no-1", "u", "CNY", 9600, "Fuel", cash=CashPart(9600, "wechat")),
        order_id="ord-1", payment_serial="P1", now_ms=T_MS - 1000, accounts={}, policy=policy)
    order = decide(order, Activate(), now_ms=T_MS - 900, policy=policy).order
    assert order.state is OrderState.PAYING
    now = order.close_at_ms + 1 if late else T_MS
    judgement = judge(charge(amount), OrderSnapshot.of(order, now))
    assert judgement.verdict is Verdict.AMOUNT_MISMATCH and judgement.event is not None
    after = decide(order, judgement.event, now_ms=now, policy=policy).order
    assert after.state is not OrderState.SUCCEEDED
    assert after.cash_leg is not None and after.cash_leg.status is LegStatus.UNKNOWN
