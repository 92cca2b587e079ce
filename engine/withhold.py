"""Withholding (代扣): the merchant charges a user on an agreement, and the engine retries
by itself (system auto-retry, SPEC R-PROD) without ever risking a double charge.

A withholding is one trade order (merchant id, merchant order number) paid by attempts
(``PaymentRequest.attempt``), each a cash payment of scenario ``WITHHOLD`` on one agreement.
Pure: ``attempt_outcome`` reads what the latest attempt came to, ``next_step`` decides what
the withholding does about it; the shell (``actors.withholding``) persists the decision and
only then submits the next attempt.

The retry rule, the point of this module:

- an attempt declined with a retryable code (insufficient balance, card refused: the
  channel's ``CodeTable.retryable``) charged nothing: pay again on the next agreement
  that has not declined (another method or card);
- an attempt closed at the end of its pay window (a timeout; one closed on purpose with
  ``Engine.close`` ends the withholding instead) is retried, on the same
  agreement first, only once the channel confirmed that nothing was charged (the cash leg
  ``unpaid``); while its result is unknown (the close not answered, the charge unknown
  after every query) the withholding waits, however long;
- a success ends it; any other failure ends it failed; so does running out of attempts
  (``WithholdConfig.withhold_attempts_max``) or of usable agreements.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from payengine.engine.checks import check_int
from payengine.engine.evolve import evolve
from payengine.engine.order import ATTEMPTS_MAX, LegStatus, OrderState, PaymentOrder, Trigger


@dataclass(frozen=True, slots=True)
class WithholdConfig:
    """Bounds of agreements and withholdings (``EngineConfig.withholding``)."""

    withhold_attempts_max: int = 3
    """Attempts (the first and the system's retries) one withholding may make, 1..10."""
    agreements_per_user_max: int = 16
    """Agreements one user may have in any state; signing one more is ``Overloaded``."""
    agreements_per_withhold_max: int = 8
    """Agreements one withholding may name (its order of preference)."""
    withholds_open_max: int = 10_000
    """Withholdings still paying at once; one more is refused with ``Overloaded``."""
    recheck_ms: int = 1_000
    """How often a withholding waiting for a close's answer looks at its attempt again."""
    rechecks_max: int = 600
    """Looks per wait; then it waits for the next event of that order or ``Engine.open``."""

    def __post_init__(self) -> None:
        check_int(self.withhold_attempts_max, "withhold_attempts_max", 1, ATTEMPTS_MAX)
        check_int(self.agreements_per_user_max, "agreements_per_user_max", 1, 1_000)
        check_int(self.agreements_per_withhold_max, "agreements_per_withhold_max", 1, 64)
        check_int(self.withholds_open_max, "withholds_open_max", 1, 10_000_000)
        check_int(self.recheck_ms, "recheck_ms", 1, 60 * 60 * 1000)
        check_int(self.rechecks_max, "rechecks_max", 1, 1_000_000)


class WithholdState(enum.StrEnum):
    PAYING = "paying"
    """An attempt is being paid, or the engine waits to know it charged nothing."""
    SUCCEEDED = "succeeded"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class Withholding:
    """One withholding: the trade and the agreements it may use, and each attempt's."""

    merchant_id: str
    merchant_order_no: str
    user_id: str
    amount_minor: int
    currency: str
    title: str
    agreement_ids: tuple[str, ...]
    """The agreements it may pay on, in order of preference."""
    attempts: tuple[str, ...]
    """The agreement attempt n paid on is ``attempts[n - 1]``."""
    state: WithholdState
    cause: str
    created_at_ms: int
    updated_at_ms: int
    declined: tuple[str, ...] = ()
    """Agreements an attempt was declined on (retryable code): not used again."""
    version: int = 0

    @property
    def attempt(self) -> int:
        return len(self.attempts)

    @property
    def agreement_id(self) -> str:
        """The agreement of the latest attempt."""
        return self.attempts[-1]


class AttemptOutcome(enum.StrEnum):
    WAITING = "waiting"
    """Still paying, or over with its charge not known yet: nothing may follow it."""
    SUCCEEDED = "succeeded"
    DECLINED = "declined"
    """Failed with a retryable code: nothing was charged, another method may pay."""
    CLOSED_UNPAID = "closed_unpaid"
    """Closed at the end of its pay window and confirmed uncharged by the channel."""
    FAILED = "failed"
    """Failed for good, or charged after its close (and refunded): no retry."""


_UNCHARGED = frozenset({LegStatus.NEW, LegStatus.UNPAID})
"""Cash leg statuses that say no money moved: never sent, or the channel said so."""


def attempt_outcome(order: PaymentOrder, *, retryable: bool,
                    planted_bugs: frozenset[str] = frozenset()) -> AttemptOutcome:
    """What the attempt ``order`` came to. ``retryable``: its cash leg's code is one of its
    channel's retryable failure codes (the shell looks it up)."""
    if order.state is OrderState.SUCCEEDED:
        return AttemptOutcome.SUCCEEDED
    cash = order.cash_leg
    assert cash is not None, f"withholding attempt {order.order_id} has no cash leg"
    if order.state is OrderState.FAILED and cash.status in _UNCHARGED:
        return AttemptOutcome.DECLINED if retryable else AttemptOutcome.FAILED
    if order.state is OrderState.CLOSED:
        if order.cause == Trigger.CLOSE_USER.value and cash.status in _UNCHARGED:
            return AttemptOutcome.FAILED  # closed on purpose (Engine.close): not retried
        if cash.status in _UNCHARGED:
            return AttemptOutcome.CLOSED_UNPAID
        if cash.status is LegStatus.PAYING and (
                "withhold-retry-after-timeout" in planted_bugs):
            return AttemptOutcome.CLOSED_UNPAID  # planted: the close is not answered yet
        if cash.status in (LegStatus.PAYING, LegStatus.UNKNOWN):
            return AttemptOutcome.WAITING
        return AttemptOutcome.FAILED  # charged after the close: refunded, not retried
    if order.is_terminal:  # FAILED after a charge (a shortfall): refunded, not retried
        return AttemptOutcome.FAILED
    return AttemptOutcome.WAITING


def waits_for_close(order: PaymentOrder) -> bool:
    """The attempt is over but its close has not been answered: look again soon."""
    cash = order.cash_leg
    return order.is_terminal and cash is not None and cash.status is LegStatus.PAYING


class StepKind(enum.StrEnum):
    WAIT = "wait"
    RETRY = "retry"
    SUCCEED = "succeed"
    FAIL = "fail"


@dataclass(frozen=True, slots=True)
class Step:
    kind: StepKind
    agreement_id: str | None = None
    """RETRY: the agreement the next attempt pays on."""
    cause: str = ""


def next_step(withholding: Withholding, outcome: AttemptOutcome, active: Sequence[str], *,
              attempts_max: int) -> Step:
    """What ``withholding`` does after its latest attempt came to ``outcome``.

    ``active``: those of its agreements that are active now (an agreement revoked or being
    unsigned is never paid on again). A decline skips its agreement from then on; a
    confirmed close tries the same agreement first (a timeout says nothing of the balance).
    """
    attempt = withholding.attempt
    match outcome:
        case AttemptOutcome.WAITING:
            return Step(StepKind.WAIT, cause=f"attempt {attempt} not known uncharged yet")
        case AttemptOutcome.SUCCEEDED:
            return Step(StepKind.SUCCEED, cause=f"attempt {attempt} succeeded")
        case AttemptOutcome.FAILED:
            return Step(StepKind.FAIL, cause=f"attempt {attempt} failed for good")
    declined = set(withholding.declined)
    if outcome is AttemptOutcome.DECLINED:
        declined.add(withholding.agreement_id)
    why = ("declined" if outcome is AttemptOutcome.DECLINED
           else "closed and confirmed uncharged")
    if attempt >= attempts_max:
        return Step(StepKind.FAIL, cause=f"attempt {attempt} {why}; no attempts left "
                                         f"(withhold_attempts_max {attempts_max})")
    usable = [a for a in withholding.agreement_ids if a in active and a not in declined]
    if not usable:
        return Step(StepKind.FAIL, cause=f"attempt {attempt} {why}; no other active "
                                         "agreement")
    if outcome is AttemptOutcome.CLOSED_UNPAID and withholding.agreement_id in usable:
        choice = withholding.agreement_id
    else:
        choice = usable[0]
    return Step(StepKind.RETRY, choice, f"attempt {attempt} {why}; retry on {choice}")


def after_step(withholding: Withholding, step: Step, outcome: AttemptOutcome, now_ms: int
               ) -> Withholding:
    """``withholding`` with ``step`` taken (for WAIT: unchanged)."""
    if step.kind is StepKind.WAIT:
        return withholding
    declined = withholding.declined
    if outcome is AttemptOutcome.DECLINED and withholding.agreement_id not in declined:
        declined = (*declined, withholding.agreement_id)
    fields: dict[str, object] = {"cause": step.cause, "updated_at_ms": now_ms,
                                 "declined": declined, "version": withholding.version + 1}
    if step.kind is StepKind.RETRY:
        assert step.agreement_id is not None
        fields["attempts"] = (*withholding.attempts, step.agreement_id)
    else:
        fields["state"] = (WithholdState.SUCCEEDED if step.kind is StepKind.SUCCEED
                           else WithholdState.FAILED)
    return evolve(withholding, **fields)
