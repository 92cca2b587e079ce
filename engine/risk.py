"""The risk gate's pure part: rules from configuration, verdicts, and the step-up record.

A payment is assessed after it is validated and before it is persisted (the third of the
seven steps: validate, route, assess risk, persist, call the channel, update, publish). The
assessment has three outcomes:

- ``pass``: the order is created as usual (``accepted``);
- ``block``: a typed refusal (``RiskBlocked``); nothing is created and nothing held;
- ``step_up``: the order is created in ``needs_verification`` and waits, holding nothing and
  charging nothing, until ``Engine.verify(order_id, code)`` passes (it then goes on as an
  accepted order), or fails (too many wrong codes), or its verification window ends.

This module evaluates the configured rules (``RiskRules``: amounts, blocklists, velocity) as
a function of the request's facts, what the store counted and the time, which are all
arguments: it does no I/O. The shell (``actors.risk_gate``) counts, calls the application's
risk service (a hook) with a timeout, and combines the verdicts (``combine``).

The code a user must type is never stored: the order keeps ``code_digest`` (a SHA-256 over
the order id and the code) and a verify compares digests in constant time
(``hmac.compare_digest``). Standard library only.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from payengine.engine.checks import check_id, check_int, check_setting, shown
from payengine.engine.errors import InvalidRequest

if TYPE_CHECKING:
    from payengine.engine.order import PaymentRequest


class RiskOutcome(enum.StrEnum):
    PASS = "pass"
    BLOCK = "block"
    STEP_UP = "step_up"


_SEVERITY = {RiskOutcome.PASS: 0, RiskOutcome.STEP_UP: 1, RiskOutcome.BLOCK: 2}

REASON_MAX = 128
"""Most characters of a verdict's reason kept (journal, error message)."""
CODE_MAX = 32
"""Most characters of a verification code (an SMS code is 4 to 8 digits)."""
BLOCKLIST_MAX = 100_000
"""Most entries of one blocklist in ``RiskRules``."""


@dataclass(frozen=True, slots=True)
class RiskVerdict:
    """What a rule or the risk service says of one payment.

    ``rule`` names what decided (``amount_max``, ``blocked_user``, ``velocity_user``, a risk
    service's own rule name...): it is shown in ``RiskBlocked`` and the order's journal, so it
    must not carry secrets. ``code``: for a ``step_up`` from the risk service, the code it
    sent the user (e.g. by SMS); the engine keeps only its digest."""

    outcome: RiskOutcome
    rule: str = ""
    code: str | None = field(default=None, repr=False)

    @staticmethod
    def passed(rule: str = "") -> RiskVerdict:
        return RiskVerdict(RiskOutcome.PASS, rule)

    @staticmethod
    def blocked(rule: str) -> RiskVerdict:
        return RiskVerdict(RiskOutcome.BLOCK, rule)

    @staticmethod
    def step_up(rule: str, code: str | None = None) -> RiskVerdict:
        return RiskVerdict(RiskOutcome.STEP_UP, rule, code)


def check_verdict(verdict: object) -> RiskVerdict:
    """A risk service's answer is input from outside: a ``RiskVerdict`` of a known outcome,
    a short printable reason and (step-up only) a code; ``InvalidRequest`` otherwise."""
    if not isinstance(verdict, RiskVerdict) or not isinstance(verdict.outcome, RiskOutcome):
        raise InvalidRequest(f"a risk verdict is a RiskVerdict, not {shown(verdict)}")
    if not isinstance(verdict.rule, str) or len(verdict.rule) > REASON_MAX or not (
        verdict.rule.isprintable()
    ):
        raise InvalidRequest(f"a risk verdict's rule is printable text of at most {REASON_MAX} "
                             "characters")
    if verdict.code is not None:
        check_code(verdict.code)
        if verdict.outcome is not RiskOutcome.STEP_UP:
            raise InvalidRequest("only a step_up verdict carries a code")
    return verdict


def check_code(code: object) -> str:
    """A verification code: 1..``CODE_MAX`` printable characters, no spaces."""
    if not isinstance(code, str) or not 0 < len(code) <= CODE_MAX or not code.isprintable() or (
        code != code.strip() or " " in code
    ):
        raise InvalidRequest(f"a verification code is 1..{CODE_MAX} printable characters "
                             "without spaces")
    return code


def worst(*verdicts: RiskVerdict) -> RiskVerdict:
    """The most severe verdict (block > step_up > pass); of equals the first, except that
    a step-up whose code was sent already (the risk service's) beats one without, so the
    user is never sent a second code."""
    best = verdicts[0]
    for verdict in verdicts[1:]:
        severity, best_severity = _SEVERITY[verdict.outcome], _SEVERITY[best.outcome]
        if severity > best_severity or (severity == best_severity and best.code is None
                                        and verdict.code is not None):
            best = verdict
    return best


@dataclass(frozen=True, slots=True)
class RiskFacts:
    """What the rules look at in a payment request."""

    merchant_id: str
    user_id: str
    currency: str
    total_minor: int
    device_id: str | None
    payer_id: str | None
    client_ip: str | None

    @staticmethod
    def of(request: PaymentRequest) -> RiskFacts:
        details = None if request.cash is None else request.cash.details
        return RiskFacts(
            request.merchant_id, request.user_id, request.currency, request.total_minor,
            None if details is None else details.device_id,
            None if details is None else details.payer_id,
            None if details is None else details.client_ip)


@dataclass(frozen=True, slots=True)
class Velocity:
    """Orders created in the velocity window before this one: by the user, by the device
    (``None``: the request names no device). Counted by the store, up to the rule's limit."""

    user_orders: int = 0
    device_orders: int | None = None


@dataclass(frozen=True)
class RiskRules:
    """Risk rules from configuration, evaluated at every new submit (``evaluate``).

    Every limit is optional (``None`` or empty: the rule is off). Amounts are in minor units
    of the currency they are keyed by.
    """

    amount_max: Mapping[str, int] = field(default_factory=dict)
    """Currency -> the largest total accepted; above it the payment is blocked."""
    step_up_amount: Mapping[str, int] = field(default_factory=dict)
    """Currency -> totals at or above this need a step-up verification."""
    blocked_users: frozenset[str] = frozenset()
    blocked_devices: frozenset[str] = frozenset()
    """Device ids (``PayDetails.device_id``) whose payments are blocked."""
    blocked_payers: frozenset[str] = frozenset()
    """Payer ids at the wallet (``PayDetails.payer_id``) whose payments are blocked."""
    velocity_window_ms: int = 60_000
    user_orders_max: int | None = None
    """At most this many orders per user within ``velocity_window_ms``; the next one gets
    ``velocity_action``."""
    device_orders_max: int | None = None
    """At most this many orders per device within ``velocity_window_ms``."""
    velocity_action: RiskOutcome = RiskOutcome.BLOCK
    """What a payment over a velocity limit gets: ``block`` or ``step_up``."""

    def __post_init__(self) -> None:
        """Settings are input too: a bad one is ``InvalidRequest``, even under ``python -O``."""
        for name in ("amount_max", "step_up_amount"):
            table = getattr(self, name)
            check_setting(isinstance(table, Mapping), f"{name} maps currencies to minor units")
            for currency, amount in table.items():
                check_id(currency, f"{name} currency")
                check_int(amount, f"{name}[{currency!r}]", 1, 10**15)
            object.__setattr__(self, name, dict(table))  # a plain dict: copied, pickled
        for name in ("blocked_users", "blocked_devices", "blocked_payers"):
            ids = getattr(self, name)
            check_setting(isinstance(ids, frozenset) and len(ids) <= BLOCKLIST_MAX,
                          f"{name} is a frozenset of at most {BLOCKLIST_MAX} ids")
            for ident in ids:
                check_id(ident, f"{name} entry")
        check_int(self.velocity_window_ms, "velocity_window_ms", 1, 7 * 24 * 3_600_000)
        for name in ("user_orders_max", "device_orders_max"):
            limit = getattr(self, name)
            if limit is not None:
                check_int(limit, name, 1, 1_000_000)
        check_setting(self.velocity_action in (RiskOutcome.BLOCK, RiskOutcome.STEP_UP),
                      f"velocity_action is block or step_up, not {shown(self.velocity_action)}")

    @property
    def may_step_up(self) -> bool:
        """Whether some rule may ask for a step-up (the engine then needs a code issuer)."""
        velocity = self.user_orders_max is not None or self.device_orders_max is not None
        return bool(self.step_up_amount) or (
            velocity and self.velocity_action is RiskOutcome.STEP_UP)

    def evaluate(self, facts: RiskFacts, velocity: Velocity) -> RiskVerdict:
        """The most severe verdict of the rules for this payment (``pass`` if none fires)."""
        verdicts = [RiskVerdict.passed()]
        limit = self.amount_max.get(facts.currency)
        if limit is not None and facts.total_minor > limit:
            verdicts.append(RiskVerdict.blocked("amount_max"))
        if facts.user_id in self.blocked_users:
            verdicts.append(RiskVerdict.blocked("blocked_user"))
        if facts.device_id is not None and facts.device_id in self.blocked_devices:
            verdicts.append(RiskVerdict.blocked("blocked_device"))
        if facts.payer_id is not None and facts.payer_id in self.blocked_payers:
            verdicts.append(RiskVerdict.blocked("blocked_payer"))
        if over_velocity(velocity.user_orders, self.user_orders_max):
            verdicts.append(RiskVerdict(self.velocity_action, "velocity_user"))
        if velocity.device_orders is not None and over_velocity(velocity.device_orders,
                                                                self.device_orders_max):
            verdicts.append(RiskVerdict(self.velocity_action, "velocity_device"))
        threshold = self.step_up_amount.get(facts.currency)
        if threshold is not None and facts.total_minor >= threshold:
            verdicts.append(RiskVerdict.step_up("step_up_amount"))
        return worst(*verdicts)


def over_velocity(earlier: int, limit: int | None) -> bool:
    """``earlier`` orders in the window already: this one is over a limit of ``limit``."""
    return limit is not None and earlier >= limit


def in_window(created_at_ms: int, now_ms: int, window_ms: int) -> bool:
    """Whether an order created at ``created_at_ms`` counts for velocity at ``now_ms``: it
    was created within the last ``window_ms`` (``now - window < created <= now``). The store
    counts with the same bounds (``Store.count_recent_orders``)."""
    return now_ms - window_ms < created_at_ms <= now_ms


# --------------------------------------------------------------------------- step-up


class VerificationStatus(enum.StrEnum):
    PENDING = "pending"
    """Waiting for the user's code."""
    PASSED = "passed"
    FAILED = "failed"
    """Too many wrong codes."""
    EXPIRED = "expired"
    """The verification window ended without the right code."""
    CLOSED = "closed"
    """The order was closed (user, or its pay window) while waiting."""


@dataclass(frozen=True, slots=True)
class Verification:
    """A step-up the order waits for, or waited for: kept with the order."""

    code_digest: str
    """``code_digest(order_id, code)``: never the code itself."""
    expires_at_ms: int
    attempts_max: int
    rule: str
    """What asked for it (``step_up_amount``, a risk service's rule...)."""
    attempts: int = 0
    """Wrong codes so far."""
    status: VerificationStatus = VerificationStatus.PENDING

    @property
    def attempts_left(self) -> int:
        return max(self.attempts_max - self.attempts, 0)


def code_digest(order_id: str, code: str) -> str:
    """The digest an order keeps of its verification code: SHA-256 over the order id and the
    code, so two orders with the same code keep different digests. A short code can still
    be guessed from its digest offline: the attempts bound the guesses online only."""
    return hashlib.sha256(f"payengine-verify\x00{order_id}\x00{code}".encode()).hexdigest()


def code_matches(verification: Verification, order_id: str, code: str) -> bool:
    """Whether ``code`` is the expected one, compared in constant time."""
    return hmac.compare_digest(code_digest(order_id, code), verification.code_digest)


def verification_json(verification: Verification | None) -> list[object] | None:
    if verification is None:
        return None
    v = verification
    return [v.code_digest, v.expires_at_ms, v.attempts_max, v.rule, v.attempts, v.status.value]


def verification_from_json(data: object) -> Verification | None:
    if data is None:
        return None
    assert isinstance(data, list) and len(data) == 6, f"a stored verification: {data!r}"
    digest, expires, attempts_max, rule, attempts, status = data
    return Verification(str(digest), int(expires), int(attempts_max), str(rule), int(attempts),
                        VerificationStatus(status))
