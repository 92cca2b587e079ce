"""The simulator's check of the operator attention queue (``Engine.attention``).

Every ``SAMPLE_INTERVAL_MS`` of virtual time while anything is open (and once at the end)
the queue the engine
shows must list exactly the open items the oracle finds on its own: every order
``needs_reconciliation`` (``amount_mismatch`` apart), every flagged voucher follow-up
(``confirm_unknown``, ``release_unknown``, an unknown return), every refund ``unknown``
(walking every order as stored), every outbox dead letter, every given-up merchant
notification and every flagged pump pre-authorisation whose capture or void is unsettled
(``authorisation_unsettled``, ``capture_amount_mismatch``). Invariant
``attention-lists-open-items``; the planted bug ``attention-misses-owed`` leaves owed
follow-ups out of the queue.

Sampled from the deterministic scheduler's ``on_step`` hook, between two steps (a
consistent store), so it schedules nothing and draws no random number: the run is the same
with or without it. Not on ``--runtime threads`` (the engine moves while two reads run).
"""

from __future__ import annotations

from collections.abc import Callable

from payengine.actors.engine import Engine
from payengine.engine.authorisation import AuthorisationFlag
from payengine.engine.operator import ATTENTION_ITEMS_MAX, AttentionKind, item_id
from payengine.engine.order import LegStatus, OrderState, RefundStatus, owed_commands
from payengine.persistence.store import Store
from payengine.sim.oracle import Violation

SAMPLE_INTERVAL_MS = 100
"""Virtual time between two looks (an owed follow-up may be open for half a second only)."""
WALKS_MAX = 200
"""Full comparisons per run, at most (each walks every order)."""
VIOLATIONS_MAX = 5
"""Violations of this invariant reported per run, at most (one bug shows at every sample)."""


def open_items(store: Store) -> dict[str, AttentionKind]:
    """The oracle's own list: item id -> kind, from every order as stored and the outbox."""
    found: dict[str, AttentionKind] = {}
    for order in store.iter_orders():
        if order.state is OrderState.NEEDS_RECONCILIATION:
            kind = (AttentionKind.AMOUNT_MISMATCH if (order.cause or "").startswith("amount_mismatch")
                    else AttentionKind.NEEDS_RECONCILIATION)
            found[item_id(kind, order.order_id)] = kind
        for owed in owed_commands(order) if order.owes_follow_up else ():
            if owed.flagged:
                parts: list[str | int] = [order.order_id, owed.leg_no, owed.operation]
                if owed.refund_id is not None:
                    parts.append(owed.refund_id)
                found[item_id(AttentionKind.OWED_FOLLOW_UP, *parts)] = (
                    AttentionKind.OWED_FOLLOW_UP)
        for leg in order.legs:
            if leg.status in (LegStatus.CONFIRM_FAILED, LegStatus.RELEASE_FAILED):
                kind = AttentionKind.FOLLOW_UP_REFUSED
                found[item_id(kind, order.order_id, leg.leg_no)] = kind
        a, cash = order.authorisation, order.cash_leg
        if a is not None and a.flag is not None and cash is not None and cash.status in (
                LegStatus.CAPTURING, LegStatus.VOIDING):
            kind = (AttentionKind.CAPTURE_AMOUNT_MISMATCH
                    if a.flag is AuthorisationFlag.AMOUNT_MISMATCH
                    else AttentionKind.AUTHORISATION_UNSETTLED)
            found[item_id(kind, order.order_id)] = kind
        for refund in order.refunds:
            if refund.status is RefundStatus.UNKNOWN:
                kind = AttentionKind.REFUND_UNKNOWN
                found[item_id(kind, order.order_id, refund.refund_id)] = kind
    with store._read() as conn:
        for consumer, seq in conn.execute("SELECT consumer, seq FROM outbox_dead_letters"):
            found[item_id(AttentionKind.DEAD_LETTER, consumer, seq)] = AttentionKind.DEAD_LETTER
        for (event_id,) in conn.execute(
                "SELECT event_id FROM merchant_notifications WHERE status = 'given_up'"):
            kind = AttentionKind.NOTIFICATION_GIVEN_UP
            found[item_id(kind, event_id)] = kind
    return found


def check_attention(engine: Engine, at_ms: int) -> list[Violation]:
    """The engine's queue against the oracle's open items (kinds at the read bound apart)."""
    expected = open_items(engine.store)
    shown = {item.item_id for item in engine.attention()}
    full = {kind for kind in AttentionKind
            if sum(k is kind for k in expected.values()) >= ATTENTION_ITEMS_MAX}
    missing = sorted(i for i, kind in expected.items() if i not in shown and kind not in full)
    extra = sorted(i for i in shown - expected.keys())
    if not missing and not extra:
        return []
    return [Violation("attention-lists-open-items", f"attention queue at {at_ms} ms",
                      f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
                      f"not open {extra[:5]}{' ...' if len(extra) > 5 else ''}")]


def anything_open(store: Store) -> bool:
    """A cheap look (one statement) whether any item may be open: the full walk
    (``open_items``) runs only then."""
    with store._read() as conn:
        row = conn.execute(
            "SELECT EXISTS (SELECT 1 FROM legs WHERE status IN ('confirm_unknown',"
            " 'release_unknown')) OR EXISTS (SELECT 1 FROM refunds WHERE status = 'unknown'"
            " OR parts LIKE '%unknown%') OR EXISTS (SELECT 1 FROM payment_orders"
            " WHERE state = 'needs_reconciliation') OR EXISTS (SELECT 1 FROM"
            " outbox_dead_letters) OR EXISTS (SELECT 1 FROM merchant_notifications"
            " WHERE status = 'given_up') OR EXISTS (SELECT 1 FROM payment_orders"
            " WHERE settled = 0 AND json_extract(authorisation, '$[4]') IS NOT NULL)"
            ).fetchone()
    return bool(row[0])


class AttentionSampler:
    """Looks every ``SAMPLE_INTERVAL_MS`` (``on_step``): when the cheap look or the engine's
    queue finds something, the oracle walks every order and compares, at most ``WALKS_MAX``
    times a run; at most ``VIOLATIONS_MAX`` violations are kept. ``engine`` gives the
    engine now (``None`` while crashed)."""

    def __init__(self, engine: Callable[[], Engine | None], now_ms: Callable[[], int]) -> None:
        self.engine, self.now_ms = engine, now_ms
        self.next_at_ms = now_ms()
        self.violations: list[Violation] = []
        self.samples = 0
        self.walks = 0

    def __call__(self) -> None:
        now = self.now_ms()
        if (now < self.next_at_ms or len(self.violations) >= VIOLATIONS_MAX
                or self.walks >= WALKS_MAX):
            return
        engine = self.engine()
        if engine is None:
            return
        self.next_at_ms = now + SAMPLE_INTERVAL_MS
        self.samples += 1
        if not anything_open(engine.store) and not engine.attention():
            return
        self.walks += 1
        self.violations += check_attention(engine, now)
