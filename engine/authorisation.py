"""A pump pre-authorisation's values: what was authorised, what the caller and the channel say.

Data only (the order's transitions for it are ``engine.preauth``): the ``Authorisation``
record an order keeps, the events that reach the order (``CaptureAuthorisation``,
``VoidAuthorisation``, an ``AuthorisationChannel``'s ``AuthorisationResult``), the effects
it asks the shell to carry out (``AuthoriseCash``, ``CaptureCash``, ``VoidCash``,
``QueryAuthorisation``) and ``split_capture``, the pure arithmetic of a capture short of its
authorisation. Nothing here depends on ``engine.order``, so that module can build on it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING

from payengine.engine.channel_data import PayDetails
from payengine.engine.errors import InvalidAmount

if TYPE_CHECKING:
    from payengine.engine.order import PaymentOrder

# --------------------------------------------------------------------------- the record

CAPTURE_ORDERS = frozenset({"vouchers_first", "cash_first"})
"""How a capture short of its authorisation is split (``OrderPolicy.capture_order``)."""


class AuthorisationFlag(enum.StrEnum):
    """Why a pre-authorisation waits for a person (``Authorisation.flag``): listed by
    ``Engine.attention`` while its capture or void is unsettled."""

    UNSETTLED = "unsettled"
    """A capture or a void went unanswered (or undecided) on its whole query schedule; the
    sentinel goes on asking (``authorisation_unsettled``)."""
    AMOUNT_MISMATCH = "amount_mismatch"
    """The wallet said it captured another amount than the capture asked: never believed;
    the order stays capturing and goes on asking (``capture_amount_mismatch``)."""


FLAG_NOTE_MAX = 256
"""Characters of an ``Authorisation.flag_note``, at most (a wallet's reason is cut)."""


@dataclass(frozen=True, slots=True)
class Authorisation:
    """What a pump pre-authorisation authorised, and its capture once decided.

    The order's legs and ``total_minor`` are the authorised maxima until a capture is
    decided, and the captured split from then on (what the ledger, refunds, events and
    shift reports see); this record keeps the authorised figures."""

    authorised_minor: int
    """The order total authorised: the most a capture may take."""
    legs: tuple[tuple[int, int, int], ...]
    """``(leg_no, amount in the leg's unit, value_minor)`` of every leg as authorised."""
    capture_id: str | None = None
    """The caller's id of the capture decided (``None``: none yet); a capture again under
    it with the same amount is answered the same, under another id it is refused."""
    captured_minor: int | None = None
    """What the decided capture takes (``None``: none decided). 0 never: a capture of 0 is
    a void."""
    flag: AuthorisationFlag | None = None
    """Set when the capture or void needs a person (kept once set: the attention queue
    lists it only while the cash leg is still capturing or voiding)."""
    flag_note: str = ""
    """What was seen, for the person: at most ``FLAG_NOTE_MAX`` characters."""
    flagged_at_ms: int = 0
    """When the flag was raised (0: not flagged): the attention item's occurrence, so an
    operator's resolution acts on this flag only and a flag raised again is a new item."""


def authorisation_json(order: PaymentOrder) -> list[object] | None:
    """An order's authorisation as stored (``None``: not a pre-authorisation)."""
    a = order.authorisation
    if a is None:
        return None
    stored: list[object] = [a.authorised_minor, [list(leg) for leg in a.legs], a.capture_id,
                            a.captured_minor]
    if a.flag is not None:  # unflagged records keep the 4-item form older releases read
        stored += [a.flag.value, a.flag_note, a.flagged_at_ms]
    return stored


def authorisation_from_json(data: object) -> Authorisation | None:
    """``authorisation_json``'s inverse: 4 items unflagged, 7 flagged (6: flagged before
    ``flagged_at_ms`` was stored, read as raised at 0)."""
    if data is None:
        return None
    assert isinstance(data, list) and len(data) in (4, 6, 7), data
    authorised, legs, capture_id, captured = data[:4]
    flag, note, at_ms = [*data[4:], 0][:3] if len(data) > 4 else (None, "", 0)
    return Authorisation(int(authorised), tuple((int(n), int(a), int(v)) for n, a, v in legs),
                         None if capture_id is None else str(capture_id),
                         None if captured is None else int(captured),
                         None if flag is None else AuthorisationFlag(str(flag)), str(note),
                         int(at_ms))


# --------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class CaptureAuthorisation:
    """The pump stopped: charge ``amount_minor`` (0..authorised; 0 voids) of an authorised
    order. ``capture_id``: the caller's idempotency key of this capture."""

    capture_id: str
    amount_minor: int


@dataclass(frozen=True, slots=True)
class VoidAuthorisation:
    """Release a pre-authorisation without charging anything (``Engine.void``)."""


class AuthorisationStatus(enum.StrEnum):
    """An ``AuthorisationChannel``'s answer: where the channel's authorisation stands."""

    AUTHORISED = "authorised"
    """Held for the payer, not captured."""
    DECLINED = "declined"
    """Refused: nothing is held (or, to a capture, nothing was captured)."""
    CAPTURED = "captured"
    VOIDED = "voided"
    PENDING = "pending"
    """Not decided yet: the engine asks again on its query schedule."""
    NOT_FOUND = "not_found"
    """The channel knows no authorisation by this serial."""


class AuthorisationOp(enum.StrEnum):
    AUTHORISE = "authorise"
    CAPTURE = "capture"
    VOID = "void"
    QUERY = "query"


@dataclass(frozen=True, slots=True)
class AuthorisationResult:
    """An ``AuthorisationChannel`` call came back (``status`` ``None``: it failed, the
    answer is unknown). ``amount_minor``: the amount the channel says it authorised or
    captured, checked against the order's when given."""

    op: AuthorisationOp
    status: AuthorisationStatus | None
    amount_minor: int | None = None
    payment_serial: str | None = None
    channel_txn_id: str | None = None
    reason: str = ""

# --------------------------------------------------------------------------- effects


@dataclass(frozen=True, slots=True)
class AuthoriseCash:
    """Ask the channel to authorise (hold) ``amount_minor`` for the payer; idempotent by
    ``payment_serial``."""

    channel: str
    payment_serial: str
    amount_minor: int
    currency: str
    title: str
    details: PayDetails | None = None


@dataclass(frozen=True, slots=True)
class CaptureCash:
    """Capture ``amount_minor`` of the authorisation; idempotent by ``capture_id``."""

    channel: str
    payment_serial: str
    capture_id: str
    amount_minor: int


@dataclass(frozen=True, slots=True)
class VoidCash:
    """Void the authorisation (also one the channel has not seen: it may never come)."""

    channel: str
    payment_serial: str


@dataclass(frozen=True, slots=True)
class QueryAuthorisation:
    channel: str
    payment_serial: str


# --------------------------------------------------------------------------- capture split


def split_capture(authorisation: Authorisation, amount_minor: int, cash_leg_no: int,
                  capture_order: str, *, over_to_cash: bool = False
                  ) -> dict[int, tuple[int, int]]:
    """How a capture of ``amount_minor`` falls on the authorised legs: leg number ->
    (amount in the leg's unit, value in minor units). Pure integer arithmetic.

    ``vouchers_first``: the vouchers (points legs first, then money vouchers, each in leg
    order), then the cash; ``cash_first``: the cash, then the vouchers likewise. No leg
    takes more than it authorised. A points leg takes whole points only, rounded down; the
    fen left over fall to the next legs in that order, and points go first within the
    vouchers so that a money leg can take them. ``InvalidAmount`` if whole points cannot
    make the amount within the authorisation (every money leg full). ``over_to_cash``: the
    planted bug ``capture-above-authorisation`` (the cash takes whatever is left over)."""
    assert capture_order in CAPTURE_ORDERS, capture_order

    def rank(leg: tuple[int, int, int]) -> tuple[int, int, int]:
        leg_no, units, value = leg
        is_cash = leg_no == cash_leg_no
        group = (0 if is_cash else 1) if capture_order == "cash_first" else (1 if is_cash else 0)
        return group, 0 if value != units else 1, leg_no

    shares: dict[int, tuple[int, int]] = {}
    left = amount_minor
    for leg_no, units, value in sorted(authorisation.legs, key=rank):
        per_unit = value // units
        assert per_unit * units == value, (leg_no, units, value)
        taken = min(units, left // per_unit)
        shares[leg_no] = (taken, taken * per_unit)
        left -= taken * per_unit
    if left and over_to_cash:  # the planted bug: the cash leg captures past its authorisation
        units, value = shares[cash_leg_no]
        shares[cash_leg_no] = (units + left, value + left)
        left = 0
    if left:
        raise InvalidAmount(f"a capture of {amount_minor} cannot be made of whole points within "
                            f"the authorisation ({left} minor units left over): capture "
                            "another amount")
    return shares
