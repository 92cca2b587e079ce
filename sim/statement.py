"""Statements and the simulated channel: the channel's ground truth as a statement, and a
simulated channel that knows what a statement says.

``statement_from_channel`` writes what a ``SimulatedChannel`` really charged and refunded as
statement CSV, which is what a real channel's daily file is: reconciling the engine against
it must find nothing to fix once the engine converged. ``channel_knowing`` builds the channel
``payengine reconcile`` talks to: the simulated wallet of the demo, whose records (gone with
the demo's process) are rebuilt from the statement, so a refund the reconciliation asks for
finds the charge it gives back.
"""

from __future__ import annotations

from collections.abc import Iterable

from payengine.engine.statement import LineStatus, StatementLine, render_statement
from payengine.sim.channel import ChannelFaults, SimPayment, SimRefund, SimulatedChannel, World


def lines_from_channel(channel: SimulatedChannel, *, currency: str = "CNY",
                       time_ms: int | None = None) -> list[StatementLine]:
    """Every charge the channel made (``SUCCESS``, a double charge twice) and every completed
    refund (``REFUND``) as lines.

    The simulated channel keeps no currency, so the statement is in ``currency``. Charges are
    dated when they were made; refunds (undated at the channel) ``time_ms``, default the
    channel's world clock now. A refund line's transaction id is made from the payment's and
    the refund's ids.
    """
    now = channel.world.now_ms() if time_ms is None else time_ms
    lines: list[StatementLine] = []
    for payment in sorted(list(channel.payments.values()), key=lambda p: p.txn_id):
        if payment.state != "SUCCESS" or payment.charged_minor <= 0:
            continue
        charges = list(payment.charges) or [(payment.txn_id, payment.charged_minor, now)]
        for txn_id, amount, at in charges:
            lines.append(StatementLine(channel.name, txn_id, payment.serial, amount, currency,
                                       LineStatus.SUCCESS, at))
        for refund in list(payment.refunds.values()):
            if refund.state == "SUCCESS":
                lines.append(StatementLine(channel.name, f"{payment.txn_id}-{refund.refund_id}",
                                           payment.serial, refund.amount_minor, currency,
                                           LineStatus.REFUND, now, refund.refund_id))
    return lines


def statement_from_channel(channel: SimulatedChannel, *, currency: str = "CNY",
                           time_ms: int | None = None) -> str:
    """The channel's ground truth as statement CSV text (see ``lines_from_channel``)."""
    return render_statement(lines_from_channel(channel, currency=currency, time_ms=time_ms))


def channel_knowing(name: str, world: World, lines: Iterable[StatementLine]) -> SimulatedChannel:
    """A fault-free simulated channel whose records hold the statement's charges and refunds
    of channel ``name`` (other channels' lines are skipped). Memory grows with the statement:
    this is the simulator's stand-in for a real wallet, which keeps its own records."""
    channel = SimulatedChannel(name, world, faults=ChannelFaults.none())
    payments = channel.payments
    refunds: list[StatementLine] = []
    for line in lines:
        if line.channel != name:
            continue
        if line.status is LineStatus.REFUND:
            refunds.append(line)
        else:
            payment = payments.get(line.out_trade_no)
            if payment is None:
                payment = payments[line.out_trade_no] = SimPayment(
                    line.out_trade_no, line.amount_minor, "SUCCESS", line.channel_txn_id)
            payment.charged_minor += line.amount_minor  # a double charge: two lines
            payment.charges.append((line.channel_txn_id, line.amount_minor, line.time_ms))
    for line in refunds:
        payment = payments.get(line.out_trade_no)
        if payment is not None and line.refund_id is not None:
            payment.refunds[line.refund_id] = SimRefund(line.refund_id, line.amount_minor,
                                                        "SUCCESS")
    return channel
