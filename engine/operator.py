"""Operator tools, the pure part: what an order search returns, what needs a person, and
which resolutions apply to what (README "Operator tools").

The attention queue lists everything the engine cannot finish by itself and a person should
look at; each item has a stable id (``kind:...``) and ``since_ms``, the moment this
occurrence of it began. ``resolve`` journals an operator's action on one occurrence: the
same (item, action, occurrence) resolved again returns the first record and does nothing
more. Standard library only; time is an argument. Any thread.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from payengine.engine.checks import ID_MAX, TIME_MS_MAX, check_id, check_int, check_text, shown
from payengine.engine.errors import ActionNotApplicable, InvalidRequest, UnknownAttentionItem
from payengine.engine.order import OrderState

FIND_ORDERS_LIMIT_MAX = 500
"""Orders per page of ``find_orders``, at most (default ``FIND_ORDERS_LIMIT_DEFAULT``)."""
FIND_ORDERS_LIMIT_DEFAULT = 100
ATTENTION_ITEMS_MAX = 1_000
"""Items per kind the attention queue reads, at most (oldest first)."""
REASON_MAX = 500
"""Characters in an operator's reason, at most."""
RESOLUTIONS_KEPT_MAX = 100_000
"""Operator journal rows kept; the oldest beyond this are deleted as new ones come."""
CURSOR_MAX = 2 * ID_MAX
"""Characters in a ``find_orders`` cursor, at most."""


class AttentionKind(enum.StrEnum):
    NEEDS_RECONCILIATION = "needs_reconciliation"
    """The query schedule ran out with the cash result unknown: money may have moved."""
    AMOUNT_MISMATCH = "amount_mismatch"
    """The channel reported a charge of another amount; the order waits for a person."""
    OWED_FOLLOW_UP = "owed_follow_up"
    """A voucher Confirm, release or return went unanswered on its whole retry schedule."""
    FOLLOW_UP_REFUSED = "follow_up_refused"
    """A voucher system (an external provider, say) refused a Confirm or a release the
    order had decided (``confirm_failed``, ``release_failed``): nothing re-sends it."""
    REFUND_UNKNOWN = "refund_unknown"
    """A refund with no definitive answer after every query."""
    DEAD_LETTER = "dead_letter"
    """An outbox event an in-process subscriber refused on every attempt."""
    NOTIFICATION_GIVEN_UP = "notification_given_up"
    """A merchant notification never accepted on its whole schedule."""
    AUTHORISATION_UNSETTLED = "authorisation_unsettled"
    """A pump pre-authorisation's capture or void unanswered (or undecided) on its whole
    query schedule: the sentinel goes on asking while the voucher holds may expire."""
    CAPTURE_AMOUNT_MISMATCH = "capture_amount_mismatch"
    """A pre-authorisation's wallet said it captured another amount than asked: not
    believed; the order stays capturing until the wallet answers the amount asked."""


class Action(enum.StrEnum):
    RETRY = "retry"
    """Send it again now: an owed follow-up re-sent by its order, a dead letter replayed to
    its subscriber, a given-up notification POSTed once more, a pre-authorisation's capture
    or void asked of its wallet once more."""
    ACKNOWLEDGE = "acknowledge"
    """Handled by a person: the occurrence leaves the queue, nothing is sent."""


ACTIONS: dict[AttentionKind, frozenset[Action]] = {
    AttentionKind.NEEDS_RECONCILIATION: frozenset({Action.ACKNOWLEDGE}),
    AttentionKind.AMOUNT_MISMATCH: frozenset({Action.ACKNOWLEDGE}),
    AttentionKind.OWED_FOLLOW_UP: frozenset({Action.RETRY, Action.ACKNOWLEDGE}),
    AttentionKind.FOLLOW_UP_REFUSED: frozenset({Action.ACKNOWLEDGE}),
    AttentionKind.REFUND_UNKNOWN: frozenset({Action.ACKNOWLEDGE}),
    AttentionKind.DEAD_LETTER: frozenset({Action.RETRY, Action.ACKNOWLEDGE}),
    AttentionKind.NOTIFICATION_GIVEN_UP: frozenset({Action.RETRY, Action.ACKNOWLEDGE}),
    AttentionKind.AUTHORISATION_UNSETTLED: frozenset({Action.RETRY, Action.ACKNOWLEDGE}),
    AttentionKind.CAPTURE_AMOUNT_MISMATCH: frozenset({Action.RETRY, Action.ACKNOWLEDGE}),
}
"""The actions that apply to each kind. Money moves only through the engine's own
decisions: a retry re-sends what the engine decided already; nothing here pays or refunds."""

RETRY_NEEDS_ENGINE = frozenset({AttentionKind.OWED_FOLLOW_UP,
                                AttentionKind.AUTHORISATION_UNSETTLED,
                                AttentionKind.CAPTURE_AMOUNT_MISMATCH})
"""Retries only the engine's process can make (its order actor re-sends): from another
process (``payengine resolve``) they are refused ``ActionNotApplicable``."""


@dataclass(frozen=True, slots=True)
class OrderSummary:
    """One row of an order search: what an operator scans a list by."""

    order_id: str
    merchant_id: str
    merchant_order_no: str
    user_id: str
    state: str
    cause: str
    total_minor: int
    currency: str
    created_at_ms: int
    settled: bool
    station_id: str | None
    channel: str | None
    """The cash leg's channel (``None``: vouchers only, or not routed yet)."""


@dataclass(frozen=True, slots=True)
class OrderPage:
    orders: tuple[OrderSummary, ...]
    next_after: str | None
    """Pass as ``after`` for the next page; ``None``: this was the last page."""


@dataclass(frozen=True, slots=True)
class OrderFilter:
    """A checked search: every field is ``None`` (any) or a value to match exactly;
    ``since_ms <= created_at_ms < until_ms``."""

    state: str | None = None
    since_ms: int | None = None
    until_ms: int | None = None
    merchant_id: str | None = None
    user_id: str | None = None
    station_id: str | None = None
    channel: str | None = None
    limit: int = FIND_ORDERS_LIMIT_DEFAULT
    after: tuple[int, str] | None = None
    """(created_at_ms, order_id) of the last order of the previous page."""


def order_filter(*, state: object = None, since_ms: object = None, until_ms: object = None,
                 merchant_id: object = None, user_id: object = None, station_id: object = None,
                 channel: object = None, limit: object = FIND_ORDERS_LIMIT_DEFAULT,
                 after: object = None) -> OrderFilter:
    """Check a search from outside (``InvalidRequest`` naming the field) and build it."""
    if state is not None and state not in {s.value for s in OrderState}:
        raise InvalidRequest(f"state must be one of {sorted(s.value for s in OrderState)}, "
                             f"got {shown(state)}")
    times = [None if t is None else check_int(t, name, 0, TIME_MS_MAX)
             for t, name in ((since_ms, "since_ms"), (until_ms, "until_ms"))]
    ids = [None if v is None else check_id(v, name)
           for v, name in ((merchant_id, "merchant_id"), (user_id, "user_id"),
                           (station_id, "station_id"), (channel, "channel"))]
    return OrderFilter(None if state is None else str(state), times[0], times[1],
                       merchant_id=ids[0], user_id=ids[1], station_id=ids[2], channel=ids[3],
                       limit=check_int(limit, "limit", 1, FIND_ORDERS_LIMIT_MAX),
                       after=None if after is None else parse_cursor(after))


def cursor_of(summary: OrderSummary) -> str:
    return f"{summary.created_at_ms}:{summary.order_id}"


def parse_cursor(value: object) -> tuple[int, str]:
    """``after`` as ``find_orders`` gave it (``created_at_ms:order_id``)."""
    check_text(value, "after", CURSOR_MAX, required=True)
    assert isinstance(value, str)
    at, _, order_id = value.partition(":")
    if not at.isdigit() or len(at) > 16 or not order_id:
        raise InvalidRequest(f"after must be a cursor from a previous page, got {shown(value)}")
    return int(at), check_id(order_id, "after's order id")


@dataclass(frozen=True, slots=True)
class AttentionItem:
    item_id: str
    """``kind:...``: pass it to ``resolve``."""
    kind: AttentionKind
    since_ms: int
    """When it was last seen to change: the order's last commit, the refund's request, the
    dead letter's setting aside, the notification's giving up."""
    why: str
    occurrence: int = 0
    """Which time this item is up: 0 for an order's or a refund's (they come up once); a
    dead letter's ``since_ms`` (a failed replay sets it aside anew); a notification's
    attempts (a requeued one given up again). Resolutions are idempotent per occurrence."""
    order_id: str | None = None
    refund_id: str | None = None
    event_id: str | None = None
    subscriber: str | None = None


@dataclass(frozen=True, slots=True)
class Resolution:
    """One journalled operator action."""

    item_id: str
    kind: AttentionKind
    action: Action
    operator: str
    reason: str
    at_ms: int
    occurrence: int
    """The occurrence it resolved (the item's ``occurrence`` then)."""
    outcome: str
    """``acknowledged``, ``resent`` (an order re-sent its owed follow-ups), ``asked_again``
    (a pre-authorisation's order asked its wallet again),
    ``replay_requested`` (the notifier replays the dead letter on its next round),
    ``requeued`` (the notification gets one more attempt)."""
    repeated: bool = False
    """True if this occurrence had been resolved so before: nothing was done again."""


def item_id(kind: AttentionKind, *parts: str | int) -> str:
    return ":".join([kind.value, *map(str, parts)])


def parse_item_id(value: object) -> AttentionKind:
    """The kind an item id names (``UnknownAttentionItem`` if none)."""
    check_text(value, "item", 4 * ID_MAX, required=True)
    assert isinstance(value, str)
    try:
        return AttentionKind(value.partition(":")[0])
    except ValueError:
        raise UnknownAttentionItem(f"no attention item {shown(value)}: an item id starts "
                                   f"with one of {sorted(k.value for k in AttentionKind)}"
                                   ) from None


def check_resolution(item: AttentionItem, action: object, operator: object, reason: object,
                     *, in_engine: bool) -> Action:
    """The action, if it applies to ``item`` here; ``ActionNotApplicable`` or
    ``InvalidRequest`` otherwise (nothing is changed)."""
    check_id(operator, "operator")
    check_text(reason, "reason", REASON_MAX, required=True)
    try:
        chosen = Action(action)  # type: ignore[arg-type]
    except ValueError:
        raise InvalidRequest(f"action must be one of {sorted(a.value for a in Action)}, "
                             f"got {shown(action)}") from None
    if chosen not in ACTIONS[item.kind]:
        raise ActionNotApplicable(f"{chosen.value} does not apply to a {item.kind.value} item; "
                                  f"it takes {sorted(a.value for a in ACTIONS[item.kind])}")
    if chosen is Action.RETRY and item.kind in RETRY_NEEDS_ENGINE and not in_engine:
        raise ActionNotApplicable(f"retrying a {item.kind.value} needs the engine's process "
                                  "(Engine.resolve); its sentinel re-sends it meanwhile")
    return chosen


def outcome_of(kind: AttentionKind, action: Action) -> str:
    if action is Action.ACKNOWLEDGE:
        return "acknowledged"
    return {AttentionKind.OWED_FOLLOW_UP: "resent", AttentionKind.DEAD_LETTER: "replay_requested",
            AttentionKind.NOTIFICATION_GIVEN_UP: "requeued",
            AttentionKind.AUTHORISATION_UNSETTLED: "asked_again",
            AttentionKind.CAPTURE_AMOUNT_MISMATCH: "asked_again"}[kind]
