"""Typed errors for expected failures.

Every expected failure (bad input, insufficient balance, unknown order, idempotency
conflict, illegal transition) is one of these. Raising one never changes state: the core
raises before it builds a new value, and the shell raises before it persists. Broken
invariants are not errors of this kind; they are ``AssertionError`` and fail loudly.
"""

from __future__ import annotations


class PaymentError(Exception):
    """Base of every expected failure the engine reports to its caller."""

    code: str = "payment_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidAmount(PaymentError):
    """An amount is a float, a bool, not an int, zero, negative or too large."""

    code = "invalid_amount"


class InvalidRequest(PaymentError):
    """A request is malformed: a missing field, an unknown mode, legs that do not add up."""

    code = "invalid_request"


class CurrencyMismatch(PaymentError):
    """Two amounts that must share a currency (or unit) do not."""

    code = "currency_mismatch"


class UnknownOrder(PaymentError):
    """No payment order has this id (or payment serial)."""

    code = "unknown_order"


class UnknownAccount(PaymentError):
    """No voucher account has this id."""

    code = "unknown_account"


class AccountExists(PaymentError):
    """A voucher account with this id exists already with other parameters."""

    code = "account_exists"


class UnknownHold(PaymentError):
    """No hold (TCC fence) has this id on this account."""

    code = "unknown_hold"


class InsufficientBalance(PaymentError):
    """The voucher account's available balance does not cover the amount."""

    code = "insufficient_balance"


class AccountFrozen(PaymentError):
    """The voucher account is frozen (``Engine.set_account_status``): nothing new is held,
    debited, credited or topped up on it until it is active again. Nothing moved."""

    code = "account_frozen"


class AccountClosed(PaymentError):
    """The voucher account is closed (final): nothing new is held, debited, credited or
    topped up on it. Nothing moved."""

    code = "account_closed"


class HoldRefused(PaymentError):
    """A Try (or a debit) was refused: its id was cancelled before (hanging), or it is not usable."""

    code = "hold_refused"


class HoldNotPending(PaymentError):
    """Confirm or cancel met a hold that is no longer pending (posted, voided or expired)."""

    code = "hold_not_pending"


class IdempotencyConflict(PaymentError):
    """The same idempotency key came again with different parameters."""

    code = "idempotency_conflict"


class AttemptRefused(PaymentError):
    """A new attempt of a trade order cannot be made now: its latest attempt is still being
    paid, or succeeded, or the attempt number is not the next one. Nothing was created."""

    code = "attempt_refused"


class IllegalTransition(PaymentError):
    """The order's state does not allow this event (e.g. a user close of a paid order)."""

    code = "illegal_transition"


class Overloaded(PaymentError):
    """A bound was reached (live orders, queued timers); the caller should retry later."""

    code = "overloaded"


class EngineClosed(PaymentError):
    """The engine was shut down (or abandoned) and accepts no more work."""

    code = "engine_closed"


class DatabaseInUse(PaymentError):
    """Another engine has this database open; two engines on one file would both act."""

    code = "database_in_use"


class IncompatibleDatabase(PaymentError):
    """The database file was written by a version of the engine with another schema.

    Refused at open rather than misread; the engine does not migrate files before 1.0.
    """

    code = "incompatible_database"


class ActorBroken(AssertionError):
    """An actor stopped on a broken invariant: a bug, not an expected failure.

    Its order or account is quarantined until the engine is reopened (after a fix), so a
    bug fails loudly once instead of crashing and restarting in a hot loop. Its state in
    the database is what was last committed; no money moved on the broken decision.
    """


class ChannelsMissing(PaymentError):
    """Work left on a channel the engine was not given: ``Engine.open`` without a channel
    that unsettled orders still pay or refund through, or a refund of an order whose
    channel is no longer configured. Refused before anything started or changed (no order
    is resumed, no money moves); open again with the channels. ``channels`` maps each
    missing channel to the orders that need it (unsettled ones at ``open``)."""

    code = "channels_missing"

    def __init__(self, message: str, channels: dict[str, int] | None = None) -> None:
        super().__init__(message)
        self.channels = dict(channels or {})


class ProvidersMissing(PaymentError):
    """``Engine.open`` without an external voucher provider that unsettled orders still owe
    a Try, Confirm or Cancel to. Refused before anything started (no order is resumed, no
    money moves); open again with the providers. ``providers`` maps each missing provider to
    the number of unsettled orders that need it."""

    code = "providers_missing"

    def __init__(self, message: str, providers: dict[str, int] | None = None) -> None:
        super().__init__(message)
        self.providers = dict(providers or {})


class ProviderCallbackRejected(PaymentError):
    """A voucher provider's callback did not verify (bad signature, malformed) or names a
    provider this engine was not given. Nothing changed; do not acknowledge it."""

    code = "provider_callback_rejected"


class RefundRefused(PaymentError):
    """A refund asks for more than the payment may still give back, or cannot be split."""

    code = "refund_refused"


class DuplicateSuspected(PaymentError):
    """The same user paid (or is paying) the same amount moments ago: ask before going on.

    Nothing was created. Show the user the warning; if they want to pay anyway, submit the
    request again with ``confirm_duplicate=True``. ``order_ids`` names the similar orders.
    """

    code = "duplicate_suspected"

    def __init__(self, message: str, order_ids: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.order_ids = order_ids


class ConfigError(PaymentError):
    """A channel configuration (a TOML file, its parsed dict, or ``ChannelConfig`` objects)
    is wrong: ``key`` names the setting (``channels.wechat-1.signing.method``), ``problem``
    says what is wrong with it. Nothing was built."""

    code = "config_error"

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}" if key else problem)
        self.key = key
        self.problem = problem

    def within(self, prefix: str) -> ConfigError:
        """The same error, its key under ``prefix`` (``channels.wechat-1`` + ``fee``)."""
        return ConfigError(f"{prefix}.{self.key}" if self.key else prefix, self.problem)


class NotificationRejected(PaymentError):
    """A channel notification (or statement line) does not match what the engine knows.

    Its signature does not verify, it names another channel, currency or amount than the
    order's, or a transaction id that belongs to another payment. Nothing changed; the
    rejection is recorded (``Engine.rejected_notifications``). ``reason`` is a short code:
    ``bad_signature``, ``wrong_channel``, ``wrong_currency``, ``wrong_amount``,
    ``foreign_transaction``, ``unknown_refund``, ``malformed``, ``unverified`` (a parsed
    notification that would change something: the order asks the channel instead) or
    ``unconfirmed`` (a verified second charge or refund failure the channel has not
    confirmed yet: it is asked).
    """

    code = "notification_rejected"

    def __init__(self, message: str, reason: str = "malformed") -> None:
        super().__init__(message)
        self.reason = reason


class RequestRejected(PaymentError):
    """A merchant's request from outside the process was refused before it took effect.

    Its envelope or body is not the wire format, its signature does not verify with the
    merchant's key, its timestamp is outside the window, its nonce was used before, a party
    is frozen or closed, or it asks to pay an order whose pay window is over. Nothing was
    created (not even the nonce); the refusal is recorded (``Engine.rejected_requests``).
    ``reason`` is a short code: ``malformed``, ``unknown_merchant``, ``wrong_sign_type``,
    ``unsupported_sign_type``, ``bad_signature``, ``stale_timestamp``, ``replayed_nonce``,
    ``merchant_frozen``, ``merchant_closed``, ``user_frozen``, ``user_closed``,
    ``pay_window_over``.
    """

    code = "request_rejected"

    def __init__(self, message: str, reason: str = "malformed") -> None:
        super().__init__(message)
        self.reason = reason


class RiskBlocked(PaymentError):
    """The risk gate refused the payment: nothing was created and nothing held.

    ``rule`` names what refused it (``amount_max``, ``blocked_user``, ``blocked_device``,
    ``blocked_payer``, ``velocity_user``, ``velocity_device``, ``step_up_unavailable``, or the
    risk service's own rule name): never the data it matched."""

    code = "risk_blocked"

    def __init__(self, message: str, rule: str = "") -> None:
        super().__init__(message)
        self.rule = rule


class VerificationFailed(PaymentError):
    """A step-up verification code was wrong. The attempt counts (unlike other refusals,
    this one changes the order: that is its point): ``attempts_left`` more may be tried;
    at 0 the order has failed and released everything."""

    code = "verification_failed"

    def __init__(self, message: str, attempts_left: int = 0, state: str = "") -> None:
        super().__init__(message)
        self.attempts_left = attempts_left
        self.state = state


class AgreementNotFound(PaymentError):
    """No payment agreement has this id (or none of this user's is named)."""

    code = "agreement_not_found"


class AgreementInactive(PaymentError):
    """The agreement is not active (still signing, being unsigned, terminated or failed):
    nothing may be paid on it, nor may it be unsigned. Nothing was created or changed."""

    code = "agreement_inactive"


class AgreementMismatch(PaymentError):
    """A wallet's agreement callback names another channel or user than the agreement's.
    Nothing changed."""

    code = "agreement_mismatch"


class AgreementsUnsupported(PaymentError):
    """The channel cannot sign agreements (it does not implement ``AgreementChannel``)."""

    code = "agreements_unsupported"


class UnknownWithholding(PaymentError):
    """No withholding has this merchant id and merchant order number."""

    code = "unknown_withholding"


class ExtraMissing(PaymentError):
    """An optional feature was asked for whose extra is not installed (``metrics``:
    prometheus-client, ``report``: matplotlib, ``server``: FastAPI and uvicorn). Nothing was
    started or changed; install ``payengine[<extra>]``. ``extra`` names it."""

    code = "extra_missing"

    def __init__(self, message: str, extra: str) -> None:
        super().__init__(message)
        self.extra = extra


class UnknownAttentionItem(PaymentError):
    """No such item is in the attention queue now (it never was, or it was resolved)."""

    code = "unknown_attention_item"


class ActionNotApplicable(PaymentError):
    """The action does not apply to this kind of attention item, or not from this process
    (``payengine resolve`` cannot make the engine's order actors re-send)."""

    code = "action_not_applicable"


class AuthorisationChannelsMissing(ChannelsMissing):
    """``Engine.open`` given a channel that unsettled pump pre-authorisations use but that
    does not implement ``AuthorisationChannel`` (no ``authorise``, ``capture``, ``void``,
    ``query_authorisation``): their captures, voids and queries could never be asked, the
    payer's money held at the wallet meanwhile. Refused before anything started or changed,
    as ``ChannelsMissing`` (a subclass of it); open again with a channel that implements it.
    ``channels`` maps each such channel to its unsettled pre-authorisations."""

    code = "authorisation_channels_missing"


class AuthorisationUnsupported(PaymentError):
    """A pre-authorisation (``PaymentRequest.authorise``) through a channel that does not
    implement ``AuthorisationChannel``, or of a payment that cannot be one (a recharge, a
    transfer, a post-deduct voucher, a withholding). Nothing was created."""

    code = "authorisation_unsupported"


class AlreadyCaptured(PaymentError):
    """The authorisation was captured already, under another capture id. Nothing moved."""

    code = "already_captured"


class CaptureAboveAuthorised(PaymentError):
    """A capture of more than the authorised amount. Nothing moved."""

    code = "capture_above_authorised"


class AuthorisationVoided(PaymentError):
    """A capture of an authorisation that was voided or expired (or is being). Nothing moved."""

    code = "authorisation_voided"
