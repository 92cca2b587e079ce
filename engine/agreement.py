"""A payment agreement (签约): a user's standing permission for a merchant to charge one
wallet without asking each time, the ground withholding (代扣) stands on.

Pure: ``agreement_event(agreement, event, now_ms) -> Agreement`` is the only place an
agreement changes; the shell (``actors.withholding``) persists the result and only then
calls the wallet. Life cycle::

    SIGNING --signed--> ACTIVE --unsign asked--> UNSIGNING --unsigned--> TERMINATED
       \\--sign_failed/revoked--> FAILED     \\--revoked--> TERMINATED  --revoked--^

A withholding pays only on an ACTIVE agreement. UNSIGNING already refuses new payments:
the user asked to stop, whatever the wallet takes to confirm it. TERMINATED and FAILED are
final. ``revoked`` is the wallet's word that the user cancelled the agreement in its app.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

from payengine.engine.errors import AgreementInactive, IllegalTransition
from payengine.engine.evolve import evolve


class AgreementState(enum.StrEnum):
    SIGNING = "signing"
    """Asked of the wallet; the user has not confirmed it there yet (or the answer is lost)."""
    ACTIVE = "active"
    """Signed: withholdings may pay on it."""
    UNSIGNING = "unsigning"
    """The merchant asked to end it; the wallet has not confirmed. No new payment uses it."""
    TERMINATED = "terminated"
    """Ended (unsigned, or revoked by the user in the wallet). Final."""
    FAILED = "failed"
    """Never signed: the wallet refused, or the user cancelled while signing. Final."""


FINAL_AGREEMENT_STATES = frozenset({AgreementState.TERMINATED, AgreementState.FAILED})
LIVE_AGREEMENT_STATES = frozenset(set(AgreementState) - FINAL_AGREEMENT_STATES)


class AgreementEvent(enum.StrEnum):
    SIGNED = "signed"
    SIGN_FAILED = "sign_failed"
    UNSIGN = "unsign"
    """The merchant (or user, through the merchant) asks to end it."""
    UNSIGNED = "unsigned"
    """The wallet confirmed an asked unsign."""
    REVOKED = "revoked"
    """The wallet says the agreement ended on its side (the user cancelled it in the app)."""


A = AgreementState
E = AgreementEvent
AGREEMENT_TRANSITIONS: Mapping[tuple[AgreementState, AgreementEvent], AgreementState] = {
    (A.SIGNING, E.SIGNED): A.ACTIVE,
    (A.SIGNING, E.SIGN_FAILED): A.FAILED,
    (A.SIGNING, E.REVOKED): A.FAILED,
    (A.ACTIVE, E.UNSIGN): A.UNSIGNING,
    (A.ACTIVE, E.REVOKED): A.TERMINATED,
    (A.UNSIGNING, E.UNSIGNED): A.TERMINATED,
    (A.UNSIGNING, E.REVOKED): A.TERMINATED,
}
"""(state, event) -> next state; anything absent is illegal (or, when the agreement is
already where the event leads, a duplicate)."""

assert not any(src in FINAL_AGREEMENT_STATES for src, _ in AGREEMENT_TRANSITIONS)


@dataclass(frozen=True, slots=True)
class Agreement:
    """One agreement of ``user_id`` on ``channel``; ``agreement_id`` is the engine's."""

    agreement_id: str
    user_id: str
    channel: str
    state: AgreementState
    cause: str
    created_at_ms: int
    updated_at_ms: int
    version: int = 0

    @property
    def is_active(self) -> bool:
        return self.state is AgreementState.ACTIVE


def new_agreement(agreement_id: str, user_id: str, channel: str, now_ms: int) -> Agreement:
    """An agreement just asked of the wallet: SIGNING."""
    return Agreement(agreement_id, user_id, channel, AgreementState.SIGNING, "sign asked",
                     now_ms, now_ms)


def agreement_event(agreement: Agreement, event: AgreementEvent, now_ms: int, cause: str
                    ) -> Agreement:
    """``agreement`` after ``event``: the same object when it is already where the event
    leads (a duplicate callback), ``IllegalTransition`` when the event does not apply."""
    target = AGREEMENT_TRANSITIONS.get((agreement.state, event))
    if target is None:
        if _already(agreement.state, event):
            return agreement
        raise IllegalTransition(f"agreement {agreement.agreement_id} is "
                                f"{agreement.state.value}: {event.value} does not apply")
    return evolve(agreement, state=target, cause=cause, updated_at_ms=now_ms,
                  version=agreement.version + 1)


_OUTCOMES: Mapping[AgreementEvent, frozenset[AgreementState]] = {
    E.SIGNED: frozenset({A.ACTIVE}),
    E.SIGN_FAILED: frozenset({A.FAILED}),
    E.UNSIGN: frozenset({A.UNSIGNING}),
    E.UNSIGNED: frozenset({A.TERMINATED}),
    E.REVOKED: frozenset({A.TERMINATED, A.FAILED}),
}


def _already(state: AgreementState, event: AgreementEvent) -> bool:
    return state in _OUTCOMES[event]


def check_usable(agreement: Agreement) -> Agreement:
    """``agreement`` if a withholding may pay on it; ``AgreementInactive`` otherwise."""
    if not agreement.is_active:
        raise AgreementInactive(f"agreement {agreement.agreement_id} is "
                                f"{agreement.state.value}, not active")
    return agreement
