"""Reconciliation (对账): import a channel statement and settle what it says.

``reconcile(engine, statement)`` reads a statement (see ``engine.statement`` for the format)
and, for each line not imported before, finds the order by its payment serial, judges the
line against it and feeds the order what the statement says, through the order's own actor,
like any callback. Then it looks the other way: orders of the statement's period that the
statement does not mention. In short:

- a charge the engine knows: matched; one it was waiting for: the order succeeds;
- a charge for an order that is closed, failed, unknown or past its window: refunded by
  the original route (差错退款), and recorded;
- a second charge under another transaction: refunded;
- another amount or currency: flagged, never a success;
- an order the engine thinks was charged but the statement lacks: reported, never changed;
- an order awaiting reconciliation that the statement lacks, whose pay window closed within
  the statement's period: the channel never charged it, it fails and its holds are released
  (one whose window is still open past the cut-off is left alone: the user may yet pay);
  likewise a closed order whose charge stayed unknown becomes unpaid.

Safety: the whole statement is validated before anything is applied; a line is recorded only
after its order committed, so a crash mid-import re-feeds it next time (the core ignores a
result it already has); a line imported before is not applied again. Memory is bounded:
lines are streamed twice (validate, apply) in batches, and orders are searched in batches.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from payengine.engine.checks import check_ids, check_time_ms
from payengine.engine.codes import ResultKind
from payengine.engine.currency import ISO_4217, describe, minor_digits
from payengine.engine.errors import InvalidRequest, PaymentError
from payengine.engine.order import (
    REFUND_ABSENT_CODE,
    LegStatus,
    PartStatus,
    RefundResult,
    ResultSource,
)
from payengine.engine.statement import (
    FLAGGED,
    MAX_CHANNELS,
    Judgement,
    LineStatus,
    OrderSnapshot,
    StatementError,
    StatementLine,
    Verdict,
    confirm,
    format_time,
    iter_statement,
    judge,
    judge_absent,
    scan,
)
from payengine.persistence import rejections, statements
from payengine.persistence.statements import LineKey, RecordedLine

if TYPE_CHECKING:
    from payengine.actors.engine import Engine

StatementSource = str | os.PathLike[str] | Sequence[StatementLine]
"""A statement: CSV text (``str``), a CSV file (a ``Path``), or lines already parsed."""

ROUTINE = frozenset({Verdict.MATCHED, Verdict.REFUND_MATCHED, Verdict.ALREADY_IMPORTED})
"""Verdicts that need nobody: the table view lists them only as counts."""


@dataclass(frozen=True, slots=True)
class ReportEntry:
    """One line of the statement, or one order the statement lacks (``line_no`` None)."""

    verdict: Verdict
    line_no: int | None
    channel: str
    out_trade_no: str
    """The payment serial."""
    order_id: str | None
    amount_minor: int | None
    currency: str | None
    detail: str
    channel_txn_id: str | None = None
    refund_id: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {"verdict": self.verdict.value, "line_no": self.line_no, "channel": self.channel,
                "channel_txn_id": self.channel_txn_id, "out_trade_no": self.out_trade_no,
                "refund_id": self.refund_id, "order_id": self.order_id,
                "amount_minor": self.amount_minor, "currency": self.currency,
                "detail": self.detail}


@dataclass
class ReconciliationReport:
    """What an import found and did. ``ok``: nothing flagged for a person."""

    import_id: int
    source: str
    digest: str
    lines: int
    period_start_ms: int | None
    period_end_ms: int | None
    channels: tuple[str, ...]
    counts: dict[Verdict, int] = field(default_factory=lambda: dict.fromkeys(Verdict, 0))
    entries: list[ReportEntry] = field(default_factory=list)
    entries_omitted: int = 0
    """Entries beyond ``entries_max`` (counted, recorded in the database, not listed)."""
    currencies: Mapping[str, int] = field(default_factory=lambda: dict(ISO_4217), repr=False,
                                          compare=False)
    """The engine's currency table, to write amounts with their currency's digits."""

    def count(self, verdict: Verdict) -> int:
        return self.counts.get(verdict, 0)

    @property
    def flagged(self) -> int:
        return sum(n for verdict, n in self.counts.items() if verdict in FLAGGED)

    @property
    def ok(self) -> bool:
        return self.flagged == 0

    def entries_for(self, verdict: Verdict) -> list[ReportEntry]:
        return [e for e in self.entries if e.verdict is verdict]

    def as_json(self) -> dict[str, Any]:
        """A JSON-able dict with stable keys; ``counts`` lists every verdict, zeros too."""
        return {
            "import_id": self.import_id, "source": self.source, "digest": self.digest,
            "lines": self.lines,
            "period": {"start_ms": self.period_start_ms, "end_ms": self.period_end_ms},
            "channels": list(self.channels),
            "counts": {v.value: self.counts.get(v, 0) for v in Verdict},
            "flagged": self.flagged, "ok": self.ok,
            "entries": [e.as_json() for e in self.entries],
            "entries_omitted": self.entries_omitted,
        }

    def to_json(self) -> str:
        return json.dumps(self.as_json(), sort_keys=False, ensure_ascii=False)

    def to_table(self, *, routine: bool = False) -> str:
        """A fixed-width text report: the counts, then every entry that is not routine
        (``routine=True`` lists matched and already imported lines too)."""
        period = ("-" if self.period_start_ms is None or self.period_end_ms is None
                  else f"{format_time(self.period_start_ms)} .. {format_time(self.period_end_ms)}")
        out = [f"statement {self.source}  import #{self.import_id}  sha256 {self.digest[:16]}",
               f"{self.lines} lines  channels {', '.join(self.channels) or '-'}  period {period}",
               "", f"{'verdict':<22}{'count':>8}", "-" * 32]
        out += [f"{v.value:<22}{n:>8}{'  flagged' if v in FLAGGED else ''}"
                for v, n in self.counts.items() if n]
        shown = [e for e in self.entries if routine or e.verdict not in ROUTINE]
        if shown:
            out += ["", f"{'verdict':<21} {'line':>7} {'serial':<34} {'order':<38} "
                        f"{'amount':>14}  detail", "-" * 140]
            for e in shown:
                amount = ("" if e.amount_minor is None or e.currency is None
                          else describe(e.amount_minor, e.currency, self.currencies))
                out.append(f"{e.verdict.value:<21} {e.line_no if e.line_no else '-':>7} "
                           f"{_cut(e.out_trade_no, 34):<34} {_cut(e.order_id or '-', 38):<38} "
                           f"{amount:>14}  {e.detail}")
        hidden = len(self.entries) - len(shown)
        if hidden:
            out.append(f"({hidden} routine entries not listed; --json lists them)")
        if self.entries_omitted:
            out.append(f"({self.entries_omitted} entries beyond the report's limit; every line "
                       "is recorded in the statement_lines table)")
        out += ["", "RESULT: " + ("OK, nothing flagged" if self.ok
                                  else f"{self.flagged} flagged for a person")]
        return "\n".join(out)


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "~"


# --------------------------------------------------------------------------- the import


def reconcile(engine: Engine, statement: StatementSource, *,
              period_start_ms: int | None = None, period_end_ms: int | None = None,
              channels: Iterable[str] | None = None, batch_size: int = 500,
              entries_max: int = 100_000) -> ReconciliationReport:
    """Import ``statement`` into ``engine``; returns what was found and done.

    ``statement``: CSV text (``str``), a CSV file (``pathlib.Path`` or another
    ``os.PathLike``), or ``StatementLine``s. A malformed statement raises ``StatementError``
    (an ``InvalidRequest``) naming the line, and nothing is applied.

    The period (orders created in it are expected on the statement; its end is the
    statement's cut-off) defaults to the first and last line's time: pass the statement's
    real period (e.g. the whole day of a daily statement), or orders created before the first
    charge are not looked for. ``channels`` (whose orders are expected) defaults to the
    statement's channels.
    """
    if channels is not None:
        channels = check_ids(channels, "channels", MAX_CHANNELS)
    for name, value in (("period_start_ms", period_start_ms), ("period_end_ms", period_end_ms)):
        if value is not None:
            check_time_ms(value, name)
    if not 0 < batch_size <= 10_000 or entries_max < 0:
        raise InvalidRequest("batch_size must be 1..10000 and entries_max not negative")
    currencies = engine._ctx.config.currency_table
    source = _Source(statement, currencies)
    summary = scan(source.lines())  # validates everything before anything is applied
    start = summary.first_time_ms if period_start_ms is None else period_start_ms
    end = summary.last_time_ms if period_end_ms is None else period_end_ms
    period = None if start is None or end is None else (start, end)
    if period is not None and period[0] > period[1]:
        raise InvalidRequest(f"the period ends ({end}) before it starts ({start})")
    wanted = tuple(sorted(summary.channels if channels is None else set(channels)))
    store = engine.store
    import_id = statements.begin_import(store, digest=source.digest(), source=source.name,
                                        lines=summary.lines, period=period,
                                        now_ms=engine.runtime.now_ms())
    report = ReconciliationReport(import_id, source.name, source.digest(), summary.lines,
                                  start if period else None, end if period else None, wanted,
                                  currencies=currencies)
    run = _Run(engine, report, import_id, batch_size, entries_max, currencies)
    run.apply_lines(source.lines())
    if period is not None:
        for channel in wanted:
            run.settle_absent(channel, period)
            run.resend_absent_refunds(channel, period)
    statements.finish_import(store, import_id, {v.value: n for v, n in report.counts.items()},
                             engine.runtime.now_ms())
    return report


class _Source:
    """A statement that can be read twice (validate, then apply) without holding it all."""

    def __init__(self, statement: StatementSource, currencies: Mapping[str, int]) -> None:
        self._statement = statement
        self._currencies = currencies
        self._digest: str | None = None
        if isinstance(statement, str):
            self.name = "<text>"
        elif isinstance(statement, os.PathLike):
            # what the import records as its source: a file name may hold bytes that are
            # not UTF-8 (or a lone surrogate), which the database could not store
            self.name = os.fsdecode(statement).encode("utf-8", "backslashreplace").decode()
        elif isinstance(statement, Sequence) and not isinstance(statement, bytes | bytearray):
            self.name = "<lines>"  # (bytes are a sequence too, of ints: decode them first)
        else:
            raise InvalidRequest("a statement is CSV text (str), a file (Path) or StatementLines, "
                                 f"not {type(statement).__name__}")

    def lines(self) -> Iterator[StatementLine]:
        statement, currencies = self._statement, self._currencies
        if isinstance(statement, str):
            yield from iter_statement(io.StringIO(statement, newline=""), currencies)
        elif isinstance(statement, os.PathLike):
            try:
                with open(statement, encoding="utf-8", newline="") as handle:
                    yield from iter_statement(handle, currencies)
            except UnicodeDecodeError as error:
                raise StatementError(f"{self.name} is not UTF-8 text: {error.reason}") from None
            except (OSError, UnicodeEncodeError) as error:
                raise StatementError(f"cannot read {self.name}: {_why(error)}") from None
        else:
            for line in statement:
                if not isinstance(line, StatementLine):
                    raise StatementError(f"not a StatementLine: {type(line).__name__}")
                try:  # built in code, so checked against this engine's table only here
                    minor_digits(line.currency, currencies)
                except InvalidRequest as error:
                    raise StatementError(error.message, line.line_no or None) from None
                yield line

    def digest(self) -> str:
        """SHA-256 of the file (or text), so an import says which statement it was."""
        if self._digest is None:
            hasher = hashlib.sha256()
            statement = self._statement
            if isinstance(statement, str):
                hasher.update(statement.encode("utf-8", "surrogatepass"))
            elif isinstance(statement, os.PathLike):
                try:
                    with open(statement, "rb") as handle:
                        for chunk in iter(lambda: handle.read(1 << 20), b""):
                            hasher.update(chunk)
                except (OSError, UnicodeEncodeError) as error:
                    raise StatementError(f"cannot read {self.name}: {_why(error)}") from None
            else:
                for line in statement:
                    hasher.update(repr(dataclasses.astuple(line)[:-1]).encode() + b"\n")
            self._digest = hasher.hexdigest()
        return self._digest


def _why(error: Exception) -> str:
    """Why a statement file could not be read, in a few words."""
    return (error.strerror or type(error).__name__) if isinstance(error, OSError) else (
        "its name cannot be encoded for the file system")


class _Run:
    """One import in progress: feeds orders, records lines in batches, fills the report."""

    def __init__(self, engine: Engine, report: ReconciliationReport, import_id: int,
                 batch_size: int, entries_max: int, currencies: Mapping[str, int]) -> None:
        self.engine = engine
        self.currencies = currencies
        self.store = engine.store
        self.report = report
        self.import_id = import_id
        self.batch_size = batch_size
        self.entries_max = entries_max
        # The channels the engine pays and refunds through; private, but this is the engine's
        # own package, and they cannot change while it is open.
        self.channels = engine._ctx.channels

    # ---- statement lines

    def apply_lines(self, lines: Iterator[StatementLine]) -> None:
        batch: list[StatementLine] = []
        for line in lines:
            batch.append(line)
            if len(batch) >= self.batch_size:
                self._apply_batch(batch)
                batch = []
        self._apply_batch(batch)

    def _apply_batch(self, batch: Sequence[StatementLine]) -> None:
        if not batch:
            return
        previous = statements.previous_lines(self.store, (line.key for line in batch))
        here: dict[LineKey, RecordedLine] = {}
        records: list[RecordedLine] = []
        conflicts: list[RecordedLine] = []
        try:
            for line in batch:
                earlier = here.get(line.key)
                before = previous.get(line.key)
                if earlier is not None:
                    seen: tuple[tuple[str, int, str], str, str] | None = (
                        earlier.line.content, earlier.verdict, "earlier in this statement")
                elif before is not None and (before.final or before.import_id == self.import_id
                                             or before.content != line.content):
                    seen = (before.content, before.verdict, f"in import #{before.import_id}")
                else:
                    seen = None
                if seen is not None:
                    content, verdict, where = seen
                    if content != line.content:
                        rec = RecordedLine(line, None, Verdict.CONFLICTING_LINE.value,
                                           f"{line.channel_txn_id} was imported {where} for "
                                           f"{content[0]}, {content[1]} {content[2]}: this line "
                                           "is ignored", True)
                        conflicts.append(rec)
                    else:
                        rec = RecordedLine(line, None, Verdict.ALREADY_IMPORTED.value,
                                           f"imported {where} as {verdict}", True)
                    self._entry_for_line(rec)
                    continue
                rec = self._apply_line(line)
                records.append(rec)
                here[line.key] = rec
                self._entry_for_line(rec)
        except BaseException:
            # Whatever was fed and committed is recorded; the rest is fed again next time.
            with contextlib.suppress(PaymentError):
                statements.record_lines(self.store, self.import_id, records,
                                        self.engine.runtime.now_ms())
            raise
        now_ms = self.engine.runtime.now_ms()
        statements.record_lines(self.store, self.import_id, records, now_ms)
        statements.record_conflicts(self.store, self.import_id, conflicts, now_ms)

    def _apply_line(self, line: StatementLine) -> RecordedLine:
        order_id = self.store.order_id_for_serial(line.out_trade_no)
        before = None if order_id is None else self._snapshot(order_id)
        judgement = judge(line, before, self.currencies)
        owner = self._foreign_owner(line, order_id) if judgement.event is not None else None
        if owner is not None:
            judgement = Judgement(
                Verdict.CONFLICTING_LINE,
                f"transaction {line.channel_txn_id} belongs to order {owner}, not to serial "
                f"{line.out_trade_no}: one transaction pays one payment only; nothing fed")
            rejections.record(self.store, rejections.Rejection(
                self.engine.runtime.now_ms(), line.channel, line.out_trade_no, line.refund_id,
                "statement", "foreign_transaction", judgement.detail))
        elif judgement.event is not None:
            assert order_id is not None and before is not None
            judgement = self._feed(order_id, judgement, before, line)
        return RecordedLine(line, order_id, judgement.verdict.value, judgement.detail,
                            judgement.final)

    def _foreign_owner(self, line: StatementLine, order_id: str | None) -> str | None:
        """The other order a charge line's transaction id already belongs to, if any."""
        if line.status is not LineStatus.SUCCESS:
            return None
        owner = rejections.txn_owner(self.store, line.channel, line.channel_txn_id)
        return owner if owner is not None and owner != order_id else None

    def _feed(self, order_id: str, judgement: Judgement, before: OrderSnapshot,
              line: StatementLine | None) -> Judgement:
        """Feed the judgement's event and wait for the order's commit; then check it."""
        channel = before.channel
        if channel not in self.channels:
            return Judgement(Verdict.UNRESOLVED, f"{judgement.verdict.value}: {judgement.detail}; "
                             f"but this engine was opened without channel {channel}, so nothing "
                             "was fed", final=False)
        self.engine._feed(order_id, judgement.event, True)
        after = self._snapshot(order_id)
        assert after is not None
        return confirm(judgement, before, after, line)

    def _snapshot(self, order_id: str) -> OrderSnapshot | None:
        order = self.store.load_order(order_id)
        if order is None:
            return None
        cash = order.cash_leg
        channel = None if cash is None or cash.channel is None else self.channels.get(cash.channel)
        return OrderSnapshot.of(order, self.engine.runtime.now_ms(),
                                None if channel is None else channel.pay_codes)

    def _entry_for_line(self, rec: RecordedLine) -> None:
        line = rec.line
        self._add(ReportEntry(Verdict(rec.verdict), line.line_no or None, line.channel,
                              line.out_trade_no, rec.order_id, line.amount_minor, line.currency,
                              rec.detail, line.channel_txn_id, line.refund_id))

    def _add(self, entry: ReportEntry) -> None:
        report = self.report
        report.counts[entry.verdict] = report.counts.get(entry.verdict, 0) + 1
        if len(report.entries) < self.entries_max:
            report.entries.append(entry)
        else:
            report.entries_omitted += 1

    # ---- orders the statement lacks

    def resend_absent_refunds(self, channel: str, period: tuple[int, int]) -> None:
        """Refunds of the period left unknown and absent from every statement imported: the
        money is still owed, so the order asks the channel again. Never a guess at failure."""
        for order_id in statements.iter_orders_with_unknown_refunds(
            self.store, channel, period[0], period[1], self.batch_size
        ):
            order = self.store.load_order(order_id)
            cash = None if order is None else order.cash_leg
            if order is None or cash is None:
                continue
            ids = [r.refund_id for r in order.refunds
                   if (p := r.part(cash.leg_no)) is not None and p.status is PartStatus.UNKNOWN]
            if cash.status is LegStatus.REFUND_UNKNOWN and cash.refund_id is not None:
                ids.append(cash.refund_id)
            for refund_id in ids:
                if statements.refund_on_statement(self.store, channel, refund_id):
                    continue
                self.engine._feed(order_id, RefundResult(
                    refund_id, ResultKind.FAILURE, ResultSource.RECONCILIATION,
                    REFUND_ABSENT_CODE), True)
                self._add(ReportEntry(Verdict.REFUND_RESENT, None, channel,
                                      order.payment_serial, order_id, None, order.currency,
                                      f"refund {refund_id} absent from the statement: asked "
                                      "again", cash.channel_txn_id, refund_id))

    def settle_absent(self, channel: str, period: tuple[int, int]) -> None:
        """Orders of the period the statement does not charge: report the ones the engine
        thinks were charged; fail the ones that were waiting for this very answer."""
        for order_id, any_line in statements.iter_absent_orders(
            self.store, channel, period[0], period[1], self.batch_size
        ):
            before = self._snapshot(order_id)
            if before is None:
                continue
            judgement = judge_absent(before, any_line=any_line, period_end_ms=period[1])
            if judgement is None:
                continue
            if judgement.event is not None:
                judgement = self._feed(order_id, judgement, before, None)
            self._add(ReportEntry(judgement.verdict, None, channel, before.payment_serial,
                                  order_id, before.cash_amount_minor, before.currency,
                                  judgement.detail, before.channel_txn_id))
