"""Channel statements (对账单): parse them, and judge each line against the engine's order.

A channel sends a statement of what it really charged and refunded. It is the fourth way a
payment result arrives (after the synchronous reply, the callback and the query) and the
last word: what the queries could not tell, the statement settles. This module is pure: it
turns CSV text into ``StatementLine``s and decides, for one line and a snapshot of its order,
what the line means (``judge``) and what the engine must be told (a ``CashResult`` or
``RefundResult`` with source ``RECONCILIATION``). The actor shell (``actors.reconcile``)
looks the orders up, feeds the events and records the lines.

Format (UTF-8, a header row, then one line per charge or refund)::

    channel,channel_txn_id,out_trade_no,amount,currency,status,time[,refund_id]
    wechat,4200001234,P3f2a...,96.00,CNY,SUCCESS,2026-11-24T10:15:00Z
    wechat,5000000042,P3f2a...,96.00,CNY,REFUND,2026-11-24T11:02:10Z,P3f2a...-R1

``out_trade_no`` is the engine's payment serial (what the channel knows the payment by).
``amount`` is in major units with exactly the currency's minor digits ("96.00" for CNY,
"96" for JPY): a statement that says "96.0" or "96.001" was not written by the channel's
rules, and guessing what it meant is how money goes missing, so it is refused. The digits
come from the engine's currency table (``engine.currency``: ISO 4217 plus
``EngineConfig.currencies``); a line in a currency the table does not know is refused too.
"""

from __future__ import annotations

import csv
import enum
import io
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, replace

from payengine.engine.checks import check_id
from payengine.engine.codes import CodeTable, ResultKind
from payengine.engine.currency import ISO_4217, describe, format_minor, minor_digits
from payengine.engine.errors import InvalidRequest
from payengine.engine.money import AMOUNT_MAX
from payengine.engine.order import (
    SECOND_CHARGE_PREFIX,
    CashResult,
    LegStatus,
    OrderState,
    PartStatus,
    PaymentOrder,
    RefundKind,
    RefundResult,
    ResultSource,
)

MAX_LINES = 1_000_000
"""Most lines one statement may have: a day of a busy merchant, with room to spare. A file
beyond it is refused rather than half-read."""

MAX_CHANNELS = 64
"""Most distinct channels in one statement (normally one): keeps per-import state bounded."""

REQUIRED_COLUMNS = ("channel", "channel_txn_id", "out_trade_no", "amount", "currency", "status",
                    "time")
OPTIONAL_COLUMNS = ("refund_id",)
COLUMNS = REQUIRED_COLUMNS + OPTIONAL_COLUMNS

STATEMENT_CODE = "STATEMENT"
"""The business code the engine records for a result taken from a statement."""
ABSENT_CODE = "ABSENT_FROM_STATEMENT"
"""The code of the failure fed for an order the channel's statement does not know."""

_CURRENCY = re.compile(r"[A-Z]{3}", re.ASCII)
_TIME = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})T([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.([0-9]{1,3}))?"
    r"(Z|\+00:00)", re.ASCII)
_AMOUNT_INT_DIGITS = len(str(AMOUNT_MAX))


class StatementError(InvalidRequest):
    """The statement is malformed; ``line_no`` (1-based, the header is line 1) says where.

    Raised before anything is applied: a statement is taken whole or not at all.
    """

    code = "bad_statement"

    def __init__(self, message: str, line_no: int | None = None) -> None:
        super().__init__(message if line_no is None else f"line {line_no}: {message}")
        self.line_no = line_no


class LineStatus(enum.StrEnum):
    SUCCESS = "SUCCESS"
    """The channel charged the payer."""
    REFUND = "REFUND"
    """The channel gave money back; the line names the engine's ``refund_id``."""


@dataclass(frozen=True, slots=True)
class StatementLine:
    """One line of a statement, validated; money in integer minor units, time in epoch ms."""

    channel: str
    channel_txn_id: str
    out_trade_no: str
    amount_minor: int
    currency: str
    status: LineStatus
    time_ms: int
    refund_id: str | None = None
    line_no: int = 0
    """Where the line is in its file (0: built in code)."""

    def __post_init__(self) -> None:
        for name in ("channel", "channel_txn_id", "out_trade_no"):
            _check_id(getattr(self, name), name, self.line_no)
        if not isinstance(self.status, LineStatus):
            raise StatementError(f"status must be a LineStatus, got {self.status!r}", self.line_no)
        if self.status is LineStatus.REFUND:
            _check_id(self.refund_id, "refund_id (required for a REFUND line)", self.line_no)
        elif self.refund_id is not None:
            raise StatementError("a SUCCESS line has no refund_id", self.line_no)
        if not isinstance(self.currency, str) or not _CURRENCY.fullmatch(self.currency):
            raise StatementError(f"currency must be 3 upper-case letters, got {self.currency!r}",
                                 self.line_no)
        amount = self.amount_minor
        if isinstance(amount, bool) or not isinstance(amount, int) or not 0 < amount <= AMOUNT_MAX:
            raise StatementError(f"amount must be 1..{AMOUNT_MAX} minor units, got {amount!r}",
                                 self.line_no)
        if isinstance(self.time_ms, bool) or not isinstance(self.time_ms, int) or self.time_ms < 0:
            raise StatementError(f"time must be epoch milliseconds, got {self.time_ms!r}",
                                 self.line_no)

    @property
    def key(self) -> tuple[str, str, str, str]:
        """What makes a line the same line in another import: (channel, txn, status, refund)."""
        return (self.channel, self.channel_txn_id, self.status.value, self.refund_id or "")

    @property
    def content(self) -> tuple[str, int, str]:
        """What the same line must say again: another serial or amount under its key is a
        conflict, not a repeat. (The time is left out: re-issued files shift it.)"""
        return (self.out_trade_no, self.amount_minor, self.currency)


# --------------------------------------------------------------------------- amounts, times


def _digits(currency: str, currencies: Mapping[str, int], line_no: int | None) -> int:
    """The currency's minor digits; a currency the table does not know is a bad line (its
    amount cannot be read, and no order can be in it)."""
    try:
        return minor_digits(currency, currencies)
    except InvalidRequest as error:
        raise StatementError(error.message, line_no) from None


def parse_amount(text: str, currency: str, line_no: int | None = None,
                 currencies: Mapping[str, int] = ISO_4217) -> int:
    """``"96.00"`` CNY -> 9600. Exactly the currency's minor digits, no sign, no exponent,
    no leading zeros, positive, at most ``AMOUNT_MAX``; anything else is a ``StatementError``.
    Integer arithmetic only: a float never holds money here, not even for a moment."""
    digits = _digits(currency, currencies, line_no)
    frac = rf"\.([0-9]{{{digits}}})" if digits else "()"
    match = re.fullmatch(rf"(0|[1-9][0-9]{{0,{_AMOUNT_INT_DIGITS}}}){frac}", text, re.ASCII)
    if match is None:
        example = "96" if digits == 0 else "96." + "0" * digits
        raise StatementError(f"amount {text!r} is not a {currency} amount like {example!r}",
                             line_no)
    scale: int = 10**digits
    amount = int(match.group(1)) * scale + int(match.group(2) or "0")
    if not 0 < amount <= AMOUNT_MAX:
        raise StatementError(f"amount {text!r} must be positive and at most {AMOUNT_MAX} minor "
                             "units", line_no)
    return amount


def format_amount(amount_minor: int, currency: str,
                  currencies: Mapping[str, int] = ISO_4217) -> str:
    """9600, CNY -> ``"96.00"``: the inverse of ``parse_amount``."""
    return format_minor(amount_minor, _digits(currency, currencies, None))


def _days_from_civil(year: int, month: int, day: int) -> int:
    """Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm);
    ``datetime`` is kept out of the pure core, which reads no clock."""
    year -= 1 if month <= 2 else 0
    era = year // 400
    yoe = year - era * 400
    doy = (153 * (month + (-3 if month > 2 else 9)) + 2) // 5 + day - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


def _civil_from_days(days: int) -> tuple[int, int, int]:
    days += 719468
    era = days // 146097
    doe = days - era * 146097
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    day = doy - (153 * mp + 2) // 5 + 1
    month = mp + (3 if mp < 10 else -9)
    return yoe + era * 400 + (1 if month <= 2 else 0), month, day


def _month_days(year: int, month: int) -> int:
    if month == 2:
        return 29 if year % 4 == 0 and (year % 100 != 0 or year % 400 == 0) else 28
    return 30 if month in (4, 6, 9, 11) else 31


def parse_time(text: str, line_no: int | None = None) -> int:
    """``"2026-11-24T10:15:00Z"`` (or ``+00:00``, optional ``.mmm``) -> epoch milliseconds.

    UTC only: a statement in local time without its offset is ambiguous by hours, which is
    exactly the window that decides whether a payment came before or after its close."""
    match = _TIME.fullmatch(text)
    if match is None:
        raise StatementError(f"time {text!r} is not ISO-8601 UTC like '2026-11-24T10:15:00Z'",
                             line_no)
    year, month, day, hour, minute, second = (int(g) for g in match.groups()[:6])
    millis = int((match.group(7) or "0").ljust(3, "0"))
    if not (year >= 1970 and 1 <= month <= 12 and 1 <= day <= _month_days(year, month)
            and hour <= 23 and minute <= 59 and second <= 59):
        raise StatementError(f"time {text!r} is not a valid date and time", line_no)
    days = _days_from_civil(year, month, day)
    return ((days * 24 + hour) * 60 + minute) * 60_000 + second * 1000 + millis


def format_time(time_ms: int) -> str:
    """Epoch milliseconds -> ``"2026-11-24T10:15:00Z"`` (``.mmm`` only when not whole)."""
    days, rest = divmod(time_ms, 86_400_000)
    year, month, day = _civil_from_days(days)
    hour, rest = divmod(rest, 3_600_000)
    minute, rest = divmod(rest, 60_000)
    second, millis = divmod(rest, 1000)
    fraction = f".{millis:03d}" if millis else ""
    return f"{year:04d}-{month:02d}-{day:02d}T{hour:02d}:{minute:02d}:{second:02d}{fraction}Z"


def _check_id(value: object, what: str, line_no: int | None) -> None:
    """The engine's rule for ids (``engine.checks.check_id``), naming the line."""
    try:
        check_id(value, what)
    except InvalidRequest as error:
        raise StatementError(error.message, line_no or None) from None


# --------------------------------------------------------------------------- parsing


def iter_statement(lines: Iterable[str], currencies: Mapping[str, int] = ISO_4217
                   ) -> Iterator[StatementLine]:
    """Parse a statement lazily from its lines (a file opened with ``newline=""``, or
    ``io.StringIO(text, newline="")``). Raises ``StatementError`` at the first bad line.
    ``currencies``: the engine's currency table (code -> minor digits).

    Lazy so that a million-line file is validated in one pass of bounded memory; callers
    that apply lines validate the whole file first (``scan``), since nothing may be applied
    from a file that turns out to be broken further down.
    """
    reader = csv.reader(lines, strict=True)
    try:
        header = next(reader, None)
        if header is None:
            raise StatementError("the statement is empty; it needs a header row: "
                                 + ",".join(REQUIRED_COLUMNS), 1)
        if header and header[0].startswith("\ufeff"):
            header[0] = header[0][1:]  # a UTF-8 byte order mark, as spreadsheet exports write
        names = [h.strip() for h in header]
        unknown = [n for n in names if n not in COLUMNS]
        missing = [n for n in REQUIRED_COLUMNS if n not in names]
        if unknown or missing or len(set(names)) != len(names):
            raise StatementError(
                f"the header must name the columns {','.join(REQUIRED_COLUMNS)}[,refund_id] once "
                f"each (unknown {unknown}, missing {missing})", 1)
        index = {name: i for i, name in enumerate(names)}
        count = 0
        for row in reader:
            if not row or all(not field.strip() for field in row):
                continue  # blank lines (a trailing newline, a spreadsheet's empty rows)
            count += 1
            if count > MAX_LINES:
                raise StatementError(f"more than {MAX_LINES} lines; split the statement",
                                     reader.line_num)
            yield _line(row, index, reader.line_num, currencies)
    except csv.Error as error:
        raise StatementError(f"not valid CSV: {error}", reader.line_num) from None


def _line(row: list[str], index: Mapping[str, int], line_no: int,
          currencies: Mapping[str, int]) -> StatementLine:
    if len(row) != len(index):
        raise StatementError(f"{len(row)} fields, the header has {len(index)}", line_no)

    def field(name: str) -> str:
        return row[index[name]].strip() if name in index else ""

    try:
        status = LineStatus(field("status"))
    except ValueError:
        raise StatementError(f"status must be SUCCESS or REFUND, got {field('status')!r}",
                             line_no) from None
    currency = field("currency")
    if not _CURRENCY.fullmatch(currency):
        raise StatementError(f"currency must be 3 upper-case letters, got {currency!r}", line_no)
    return StatementLine(
        channel=field("channel"), channel_txn_id=field("channel_txn_id"),
        out_trade_no=field("out_trade_no"),
        amount_minor=parse_amount(field("amount"), currency, line_no, currencies),
        currency=currency,
        status=status, time_ms=parse_time(field("time"), line_no),
        refund_id=field("refund_id") or None, line_no=line_no,
    )


def parse_statement(text: str, currencies: Mapping[str, int] = ISO_4217
                    ) -> list[StatementLine]:
    """Parse a whole statement held in memory (tests, small files)."""
    return list(iter_statement(io.StringIO(text, newline=""), currencies))


@dataclass(frozen=True, slots=True)
class StatementSummary:
    """What a validating pass learns: enough to plan the import without keeping the lines."""

    lines: int
    channels: frozenset[str]
    first_time_ms: int | None
    last_time_ms: int | None


def scan(lines: Iterable[StatementLine]) -> StatementSummary:
    """Consume ``lines`` (validating them, if they come from ``iter_statement``)."""
    count, channels = 0, set()
    first: int | None = None
    last: int | None = None
    for line in lines:
        count += 1
        if line.channel not in channels:
            channels.add(line.channel)
            if len(channels) > MAX_CHANNELS:
                raise StatementError(f"more than {MAX_CHANNELS} channels in one statement",
                                     line.line_no or None)
        first = line.time_ms if first is None else min(first, line.time_ms)
        last = line.time_ms if last is None else max(last, line.time_ms)
    return StatementSummary(count, frozenset(channels), first, last)


def render_statement(lines: Iterable[StatementLine],
                     currencies: Mapping[str, int] = ISO_4217) -> str:
    """Write lines as statement CSV text (with the optional ``refund_id`` column)."""
    out = io.StringIO(newline="")
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(COLUMNS)
    for line in lines:
        writer.writerow([line.channel, line.channel_txn_id, line.out_trade_no,
                         format_amount(line.amount_minor, line.currency, currencies),
                         line.currency,
                         line.status.value, format_time(line.time_ms), line.refund_id or ""])
    return out.getvalue()


# --------------------------------------------------------------------------- verdicts


class Verdict(enum.StrEnum):
    MATCHED = "MATCHED"
    """The engine knows the charge exactly as the channel does."""
    RESOLVED_SUCCESS = "RESOLVED_SUCCESS"
    """The order was still waiting (paying, or awaiting reconciliation) within its window:
    the statement's success makes it succeed."""
    ERROR_REFUND = "ERROR_REFUND"
    """The channel charged an order that is closed, failed, unknown, or past its window:
    refunded by the original route (差错退款)."""
    DUPLICATE_CHARGE = "DUPLICATE_CHARGE"
    """The order is paid under another channel transaction: a second charge, refunded."""
    AMOUNT_MISMATCH = "AMOUNT_MISMATCH"
    """Amount or currency differs from the order's cash part: flagged, never a success."""
    UNKNOWN_ORDER = "UNKNOWN_ORDER"
    """No order with this serial paid through this channel."""
    ALREADY_IMPORTED = "ALREADY_IMPORTED"
    """The same line was imported before: nothing done."""
    CONFLICTING_LINE = "CONFLICTING_LINE"
    """A line imported before under the same channel transaction said something else."""
    REFUND_MATCHED = "REFUND_MATCHED"
    """The engine knows the refund succeeded."""
    REFUND_RESOLVED = "REFUND_RESOLVED"
    """A refund the engine was still waiting for (or gave up asking about) succeeded."""
    UNKNOWN_REFUND = "UNKNOWN_REFUND"
    """A refund the engine never asked for."""
    MISSING_ON_STATEMENT = "MISSING_ON_STATEMENT"
    """The engine thinks the channel charged the order; the statement does not. Reported,
    never changed automatically: the next day's statement or a person decides."""
    RESOLVED_FAILED = "RESOLVED_FAILED"
    """Awaiting reconciliation with its pay window closed by the statement's cut-off (or
    closed with the charge unknown) and absent from the statement: the channel never
    charged it; the cash leg becomes unpaid, the order fails (or stays closed), its holds
    are released."""
    REFUND_RESENT = "REFUND_RESENT"
    """A refund the engine never heard the end of is absent from the statement: it never
    happened, and the engine asks the channel again (idempotent by refund id)."""
    UNRESOLVED = "UNRESOLVED"
    """The statement says something the engine could not act on; see the detail."""


FLAGGED = frozenset({Verdict.AMOUNT_MISMATCH, Verdict.UNKNOWN_ORDER, Verdict.CONFLICTING_LINE,
                     Verdict.UNKNOWN_REFUND, Verdict.MISSING_ON_STATEMENT, Verdict.UNRESOLVED,
                     Verdict.DUPLICATE_CHARGE})
"""Verdicts a person must look at. A duplicate charge is refunded automatically, but a
payer charged twice is worth a look (a channel or integration fault) all the same."""


class RefundState(enum.StrEnum):
    """A refund's cash part as far as the channel statement is concerned."""

    REFUNDING = "refunding"
    REFUNDED = "refunded"
    FAILED = "failed"
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class RefundSnapshot:
    refund_id: str
    kind: str
    """``error`` (a charge after the close), ``merchant`` or ``duplicate_charge``."""
    amount_minor: int
    """What its cash part gives back through the channel."""
    state: RefundState
    refund_no: str | None = None
    """The second charge's transaction id, for a duplicate-charge refund (its ``refund_no``
    without ``SECOND_CHARGE_PREFIX``)."""


@dataclass(frozen=True, slots=True)
class OrderSnapshot:
    """What the judgement needs to know of an order, at ``as_of_ms``."""

    order_id: str
    payment_serial: str
    state: OrderState
    currency: str
    created_at_ms: int
    close_at_ms: int
    cash_status: LegStatus | None
    """``None``: the order has no cash part."""
    cash_amount_minor: int | None
    channel: str | None
    channel_txn_id: str | None
    refunds: tuple[RefundSnapshot, ...]
    version: int
    as_of_ms: int
    charge_reported: bool = False
    """A channel once answered this payment with a success (an amount mismatch leaves the
    leg ``unknown`` with it): then absence from a statement proves nothing."""
    left_routes: tuple[tuple[str, str], ...] = ()
    """(channel, serial) of every route the payment left (a routing fallback): a charge
    there is a late charge, given back by that channel."""

    def left_route(self, serial: str, channel: str) -> bool:
        return (channel, serial) in self.left_routes

    @staticmethod
    def of(order: PaymentOrder, as_of_ms: int, pay_codes: CodeTable | None = None
           ) -> OrderSnapshot:
        """``pay_codes``: the channel's table, to tell a success code the leg kept."""
        cash = order.cash_leg
        refunds: list[RefundSnapshot] = []
        if cash is not None and cash.refund_id is not None:
            state = _LEG_REFUND_STATES.get(cash.status)
            if state is not None:
                refunds.append(RefundSnapshot(cash.refund_id, "error", cash.amount, state))
        for refund in order.refunds:
            part = None if cash is None else refund.part(cash.leg_no)
            if part is not None:  # a voucher-only refund never reaches the channel
                refunds.append(RefundSnapshot(
                    refund.refund_id, refund.kind.value, part.amount, _PART_STATES[part.status],
                    refund.refund_no.removeprefix(SECOND_CHARGE_PREFIX)
                    if refund.kind is RefundKind.DUPLICATE_CHARGE else None))
        return OrderSnapshot(
            order.order_id, order.payment_serial, order.state, order.currency,
            order.created_at_ms, order.close_at_ms,
            None if cash is None else cash.status, None if cash is None else cash.amount,
            None if cash is None else cash.channel, None if cash is None else cash.channel_txn_id,
            tuple(refunds), order.version, as_of_ms,
            cash is not None and (
                cash.channel_txn_id is not None or cash.channel_code == STATEMENT_CODE
                or (pay_codes is not None and cash.channel_code in pay_codes.success)),
            tuple((t.channel, t.payment_serial) for t in order.tried))

    def refund(self, refund_id: str) -> RefundSnapshot | None:
        return next((r for r in self.refunds if r.refund_id == refund_id), None)

    def second_charge_refund(self, channel_txn_id: str) -> RefundSnapshot | None:
        return next((r for r in self.refunds if r.refund_no == channel_txn_id), None)


_LEG_REFUND_STATES = {
    LegStatus.REFUNDING: RefundState.REFUNDING, LegStatus.REFUNDED: RefundState.REFUNDED,
    LegStatus.REFUND_FAILED: RefundState.FAILED, LegStatus.REFUND_UNKNOWN: RefundState.UNKNOWN,
}
_PART_STATES = {
    PartStatus.WAITING: RefundState.REFUNDING, PartStatus.SENT: RefundState.REFUNDING,
    PartStatus.DONE: RefundState.REFUNDED, PartStatus.FAILED: RefundState.FAILED,
    PartStatus.NOT_SENT: RefundState.FAILED, PartStatus.UNKNOWN: RefundState.UNKNOWN,
}

CHARGED_STATUSES = frozenset({LegStatus.PAID, LegStatus.REFUNDING, LegStatus.REFUNDED,
                              LegStatus.REFUND_FAILED, LegStatus.REFUND_UNKNOWN})
"""Cash leg statuses in which the engine believes the channel charged the payer."""

_UNCHARGED = frozenset({LegStatus.PAYING, LegStatus.UNKNOWN, LegStatus.UNPAID})
"""Cash leg statuses in which the engine does not (yet) believe in a charge."""


@dataclass(frozen=True, slots=True)
class Judgement:
    verdict: Verdict
    detail: str
    event: CashResult | RefundResult | None = None
    """What to feed the order (``None``: nothing)."""
    final: bool = True
    """Record the line as imported. A line the engine could not act on stays open, so a
    later import tries it again (feeding is idempotent) instead of calling it a repeat."""


def judge(line: StatementLine, order: OrderSnapshot | None,
          currencies: Mapping[str, int] = ISO_4217) -> Judgement:
    """What ``line`` means for ``order`` (the order with the line's serial, or ``None``).
    ``currencies`` only says how amounts are written in the detail."""
    if line.status is LineStatus.REFUND:
        return _judge_refund(line, order, currencies)
    if order is None:
        return Judgement(Verdict.UNKNOWN_ORDER, f"no order with serial {line.out_trade_no}")
    if order.left_route(line.out_trade_no, line.channel):
        return _judge_left_route(line, order, currencies)
    if order.cash_status is None or order.channel != line.channel:
        paid_by = "no cash part" if order.cash_status is None else f"channel {order.channel}"
        return Judgement(Verdict.UNKNOWN_ORDER,
                         f"order {order.order_id} pays by {paid_by}, not {line.channel}")
    asked = describe(order.cash_amount_minor or 0, order.currency, currencies)
    said = describe(line.amount_minor, line.currency, currencies)
    if line.currency != order.currency:
        # Not fed: the core compares amounts, not currencies, and would take it as paid.
        return Judgement(Verdict.AMOUNT_MISMATCH, f"statement says {said}, order asked {asked}; "
                         "flagged, nothing changed")
    status = order.cash_status
    charged = status in CHARGED_STATUSES
    if charged and order.channel_txn_id and line.channel_txn_id != order.channel_txn_id:
        known = order.second_charge_refund(line.channel_txn_id)
        if known is not None:  # the engine heard of it (a callback) and gives it back already
            return Judgement(Verdict.MATCHED, f"second charge, known: refund {known.refund_id} "
                             f"{known.state.value}")
        return Judgement(Verdict.DUPLICATE_CHARGE,
                         f"{said} charged again under {line.channel_txn_id}, the order was paid "
                         f"under {order.channel_txn_id}: refunded by the original route",
                         _success(line))
    if line.amount_minor != order.cash_amount_minor:
        feed = status in (LegStatus.PAYING, LegStatus.UNKNOWN) and order.state in (
            OrderState.PAYING, OrderState.NEEDS_RECONCILIATION)
        return Judgement(Verdict.AMOUNT_MISMATCH,
                         f"statement says {said}, order asked {asked}; "
                         + ("the order awaits reconciliation, never succeeds" if feed
                            else f"flagged, order {order.state.value} left as it is"),
                         _success(line) if feed else None)
    if status is LegStatus.UNKNOWN and order.charge_reported:
        # The channel answered this payment with another amount before: two channel sources
        # disagree, and neither is taken over the other.
        return Judgement(Verdict.AMOUNT_MISMATCH, f"statement says {said} as asked, but the "
                         "channel reported another amount before; flagged, nothing changed")
    if charged:
        refunded = next((f"; refund {r.refund_id} {r.state.value}" for r in order.refunds
                         if r.kind == "error"), "")
        return Judgement(Verdict.MATCHED, f"cash {status.value}{refunded}")
    if status not in _UNCHARGED:  # NEW: the channel was never asked for this serial
        return Judgement(Verdict.UNRESOLVED, f"order {order.order_id} is {order.state.value} and "
                         "has not asked its channel yet; left for a later import", final=False)
    if order.state in (OrderState.PAYING, OrderState.NEEDS_RECONCILIATION) and (
        order.as_of_ms < order.close_at_ms
    ):
        return Judgement(Verdict.RESOLVED_SUCCESS, f"{order.state.value} -> paid by the statement",
                         _success(line))
    why = (f"{order.state.value} past its pay window" if order.state not in _TERMINAL_ENDS
           else f"{order.state.value} (cash {status.value})")
    return Judgement(Verdict.ERROR_REFUND, f"charged while {why}: refunded by the original route",
                     _success(line))


_TERMINAL_ENDS = frozenset({OrderState.CLOSED, OrderState.FAILED, OrderState.SUCCEEDED})


def _judge_left_route(line: StatementLine, order: OrderSnapshot,
                      currencies: Mapping[str, int]) -> Judgement:
    """A charge on a route the payment left (a routing fallback): never the order's payment;
    given back whole by that channel, like a second charge."""
    said = describe(line.amount_minor, line.currency, currencies)
    where = f"left route {line.channel} ({line.out_trade_no})"
    known = order.second_charge_refund(line.channel_txn_id)
    if known is not None:
        return Judgement(Verdict.MATCHED, f"late charge on {where}, known: refund "
                         f"{known.refund_id} {known.state.value}")
    if line.currency != order.currency or line.amount_minor != order.cash_amount_minor:
        return Judgement(Verdict.AMOUNT_MISMATCH, f"late charge of {said} on {where}; "
                         "flagged, nothing changed")
    return Judgement(Verdict.DUPLICATE_CHARGE,
                     f"{said} charged late on {where}: refunded by that channel",
                     replace(_success(line), payment_serial=line.out_trade_no,
                             channel=line.channel))


def _judge_refund(line: StatementLine, order: OrderSnapshot | None,
                  currencies: Mapping[str, int]) -> Judgement:
    refund_id = line.refund_id
    assert refund_id is not None
    if order is None or (order.channel != line.channel
                         and not order.left_route(line.out_trade_no, line.channel)):
        return Judgement(Verdict.UNKNOWN_REFUND, f"no order with serial {line.out_trade_no} "
                         f"paid through {line.channel}")
    refund = order.refund(refund_id)
    if refund is None:
        return Judgement(Verdict.UNKNOWN_REFUND, f"order {order.order_id} has no refund {refund_id}")
    said = describe(line.amount_minor, line.currency, currencies)
    if line.currency != order.currency or line.amount_minor != refund.amount_minor:
        asked = describe(refund.amount_minor, order.currency, currencies)
        return Judgement(Verdict.AMOUNT_MISMATCH, f"refund {refund_id}: statement says {said}, "
                         f"the engine asked {asked}; flagged, nothing changed")
    match refund.state:
        case RefundState.REFUNDED:
            return Judgement(Verdict.REFUND_MATCHED, f"refund {refund_id} ({refund.kind})")
        case RefundState.REFUNDING | RefundState.UNKNOWN:
            return Judgement(Verdict.REFUND_RESOLVED,
                             f"refund {refund_id} ({refund.kind}) {refund.state.value} -> refunded",
                             RefundResult(refund_id, ResultKind.SUCCESS, ResultSource.RECONCILIATION,
                                          STATEMENT_CODE))
    return Judgement(Verdict.UNRESOLVED, f"refund {refund_id}: the engine recorded it failed, the "
                     "statement says the channel refunded it", final=False)


def _success(line: StatementLine) -> CashResult:
    return CashResult(ResultKind.SUCCESS, ResultSource.RECONCILIATION, STATEMENT_CODE,
                      channel_txn_id=line.channel_txn_id, amount_minor=line.amount_minor)


def classify(line: StatementLine, order: OrderSnapshot | None) -> Verdict:
    """The verdict alone (``judge`` has the detail and the event to feed)."""
    return judge(line, order).verdict


def judge_absent(order: OrderSnapshot, *, any_line: bool, period_end_ms: int
                 ) -> Judgement | None:
    """An order created within the statement's period that no SUCCESS line names.

    ``any_line``: some other line (a refund) does name its serial. Returns ``None`` when
    absence says nothing: the order never charged, is still being worked on, or awaits
    reconciliation with its pay window open past ``period_end_ms`` (the user may still pay
    after the statement's cut-off; failing it now would refund a payment made in time).
    """
    status = order.cash_status
    if status in CHARGED_STATUSES:
        assert status is not None
        return Judgement(Verdict.MISSING_ON_STATEMENT,
                         f"the engine has cash {status.value} (order {order.state.value}); "
                         "the statement has no charge. Reported only")
    awaiting = order.state is OrderState.NEEDS_RECONCILIATION and status is LegStatus.PAYING
    if not awaiting and status is not LegStatus.UNKNOWN:
        return None
    assert status is not None
    if awaiting and order.close_at_ms > period_end_ms:
        return None
    if any_line:
        return Judgement(Verdict.UNRESOLVED, "the statement has a refund but no charge for it",
                         final=False)
    if status is LegStatus.UNKNOWN and order.charge_reported:
        # a channel once reported a charge (of another amount): absence is no proof
        return Judgement(Verdict.UNRESOLVED, "the channel reported a charge (of another amount"
                         f"{', under ' + order.channel_txn_id if order.channel_txn_id else ''}) "
                         "that the statement lacks; left for a person", final=False)
    return Judgement(Verdict.RESOLVED_FAILED,
                     f"{order.state.value}, cash {status.value}: not charged by the channel",
                     CashResult(ResultKind.FAILURE, ResultSource.RECONCILIATION, ABSENT_CODE))


def confirm(judgement: Judgement, before: OrderSnapshot, after: OrderSnapshot,
            line: StatementLine | None = None) -> Judgement:
    """Check that the order did what the judgement expected once fed.

    The snapshot can be stale by the time the event is handled (a callback, a close timer),
    and the core is the only judge of the order: this names what really happened, and
    turns an expectation the core did not meet into ``UNRESOLVED`` (left open for retry).
    """
    if judgement.event is None:
        return judgement
    cash = after.cash_status
    state = after.state
    where = f"order {state.value}, cash {cash.value if cash else '-'}"
    match judgement.verdict:
        case Verdict.RESOLVED_SUCCESS:
            if state in (OrderState.SUCCEEDED, OrderState.DEDUCTING):
                return judgement
            if cash in CHARGED_STATUSES and cash is not LegStatus.PAID:
                return Judgement(Verdict.ERROR_REFUND, f"the pay window had passed: {where}; "
                                 "refunded by the original route", judgement.event)
        case Verdict.ERROR_REFUND:
            if cash in CHARGED_STATUSES and cash is not LegStatus.PAID:
                return Judgement(judgement.verdict, f"{judgement.detail} ({where})",
                                 judgement.event)
            if state in (OrderState.SUCCEEDED, OrderState.DEDUCTING):  # raced a callback
                return Judgement(Verdict.RESOLVED_SUCCESS, f"paid within its window: {where}",
                                 judgement.event)
        case Verdict.RESOLVED_FAILED:
            if cash is LegStatus.UNPAID:
                return Judgement(judgement.verdict, f"{judgement.detail} ({where})",
                                 judgement.event)
        case Verdict.REFUND_RESOLVED:
            refund = None if line is None or line.refund_id is None else after.refund(
                line.refund_id)
            if refund is not None and refund.state is RefundState.REFUNDED:
                return judgement
        case Verdict.DUPLICATE_CHARGE:
            txn = None if line is None else line.channel_txn_id
            refund = None if txn is None else after.second_charge_refund(txn)
            if refund is not None:
                return Judgement(judgement.verdict, f"{judgement.detail} (refund "
                                 f"{refund.refund_id} {refund.state.value})", judgement.event)
            return Judgement(judgement.verdict, f"{judgement.detail}; but the engine did not "
                             f"refund it ({where}): left open for a later import",
                             judgement.event, final=False)
        case Verdict.AMOUNT_MISMATCH:
            return Judgement(judgement.verdict, f"{judgement.detail} ({where})", judgement.event)
        case _:
            return judgement
    return Judgement(Verdict.UNRESOLVED, f"expected {judgement.verdict.value} but the engine left "
                     f"{where}; left open for a later import", judgement.event, final=False)
