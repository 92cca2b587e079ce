"""A simulated WeChat-Pay-like channel: the outside world the engine pays through.

It keeps the ground truth (what was really charged and refunded per payment serial) that
the oracle compares the engine against. Its fate for each payment is drawn from a seeded
``random.Random``: sync failures, timeouts, unknown codes, users who pay late or never,
callbacks lost, duplicated and delayed, queries that fail to answer.

The channel is outside the engine: it schedules on its own ``world`` (a runtime with a clock,
timers and I/O lanes), so an engine crash does not erase a payment the user already made.
Callbacks go to whatever engine is ``attach``-ed now; to a crashed one they are lost.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from payengine.actors.adapters.config import ChannelConfig
from payengine.actors.channel import (
    AgreementStatus,
    AuthorisationReply,
    ChannelNotification,
    ChannelReply,
    NotificationKind,
    SignedJsonNotifications,
)
from payengine.engine.channel_data import PayDetails, PayScenario, Prepay
from payengine.engine.codes import (
    WECHAT_LIKE_PAY_CODES,
    WECHAT_LIKE_REFUND_CODES,
    CodeTable,
    ResultKind,
)
from payengine.engine.errors import EngineClosed, PaymentError
from payengine.engine.order import AuthorisationStatus


class World(Protocol):
    """What the channel needs of its surroundings (``actors.runtime.Runtime`` fits)."""

    def now_ms(self) -> int: ...

    def call_at(self, due_at_ms: int, fn: Callable[[], None]) -> Any: ...

    def run_io(self, lane: str, fn: Callable[[], Any], done: Callable[[Any], None]) -> None: ...


class CallbackSink(Protocol):
    """Where notifications go: an ``Engine`` has this method."""

    def handle_notification(self, channel: str, body: bytes,
                            headers: Mapping[str, str] | None = None, *,
                            wait: bool = True) -> str: ...


@dataclass(frozen=True)
class ChannelFaults:
    """How often each thing goes wrong, as probabilities in [0, 1], and delays in ms."""

    sync_failure: float = 0.05
    sync_timeout: float = 0.05
    sync_unknown_code: float = 0.03
    user_never_pays: float = 0.04
    user_pays_late: float = 0.04
    callback_lost: float = 0.10
    callback_duplicated: float = 0.10
    query_no_answer: float = 0.10
    query_says_processing: float = 0.0
    """A query answers "USERPAYING" although the payment already succeeded or failed."""
    double_charge: float = 0.0
    """The channel charges a paid payment a second time, under another transaction id."""
    refund_callback_lost: float = 0.0
    refund_callback_duplicated: float = 0.0
    withhold_declined: float = 0.0
    """A withholding pay answered NOTENOUGH (balance too low): retryable, nothing charged."""
    withhold_timeout: float = 0.0
    """A withholding pay times out; the wallet charges later (or never, if closed first)."""
    withhold_close_lost: float = 0.0
    """The answer to the close of a withholding pay is lost (the close itself took)."""
    withhold_close_losses_min: int = 0
    """The first this many closes of withholding pays lose their answer, whatever
    ``withhold_close_lost`` drew (a run always has a timed-out attempt whose close is not
    answered yet, before which no next attempt may go out)."""
    agreement_pending: float = 0.0
    """The user confirms an agreement later: ``sign`` answers PENDING, a callback follows."""
    agreement_refused: float = 0.0
    """The user declines an agreement: ``sign`` answers FAILED."""
    authorisation_declined: float = 0.0
    """A pump pre-authorisation is declined (the payer's limit): nothing held."""
    authorisation_request_lost: float = 0.0
    """An authorise, capture or void call times out before the wallet saw it."""
    authorisation_answer_lost: float = 0.0
    """An authorise, capture or void call took, and its answer is lost (a timeout)."""
    capture_amount_misreported: float = 0.0
    """An answer about a captured authorisation says another amount than the wallet took
    (less, by 1 fen up to a tenth): the engine must not believe it."""
    double_charges_min: int = 0
    """The first this many payments users pay are charged twice, whatever ``double_charge``
    drew: a run with double charges on always has second charges, whose notifications the
    engine must refuse until the channel confirms them (the wallet then sends them again)."""
    user_pay_delay_ms: tuple[int, int] = (10, 300)
    late_pay_delay_ms: tuple[int, int] = (1_000, 4_000)
    callback_delay_ms: tuple[int, int] = (0, 200)
    refund_delay_ms: tuple[int, int] = (20, 200)

    @staticmethod
    def none() -> ChannelFaults:
        """Every user pays promptly, every message arrives once."""
        return ChannelFaults(0, 0, 0, 0, 0, 0, 0, 0)


@dataclass
class SimPayment:
    """The channel's own record of one payment: the ground truth."""

    serial: str
    amount_minor: int
    state: str
    txn_id: str
    charged_minor: int = 0
    refunds: dict[str, SimRefund] = field(default_factory=dict)
    scenario: PayScenario = PayScenario.NATIVE
    charges: list[tuple[str, int, int]] = field(default_factory=list)
    """Every charge really made: (transaction id, amount, at_ms); two for a double charge."""

    @property
    def refunded_minor(self) -> int:
        return sum(r.amount_minor for r in self.refunds.values() if r.state == "SUCCESS")


@dataclass
class Notice:
    """One notification the wallet sends until the merchant acknowledges it: its sends and
    their answers, the wallet's ground truth of what the engine acknowledged."""

    key: str
    """``payment <serial> <transaction id>`` or ``refund <serial> <refund id>``."""
    serial: str
    send: Callable[[CallbackSink], object] = field(repr=False)
    first_at_ms: int = 0
    sends: int = 0
    """Sends made, the lost ones included (at most the wallet's ``notify_sends_max``)."""
    acknowledged_at_ms: int | None = None
    refusals: list[str] = field(default_factory=list)
    """Why sends were not acknowledged (an error code and reason, or ``no_answer``), newest
    ``NOTIFY_REFUSALS_KEPT_MAX``."""
    gave_up: bool = False
    """Every send went unacknowledged: the wallet stopped (a real one at its 16th)."""
    timer: Any = field(default=None, repr=False)


@dataclass
class SimAuthorisation:
    """The wallet's own record of one pre-authorisation: the ground truth."""

    serial: str
    amount_minor: int
    state: AuthorisationStatus
    txn_id: str
    captured_minor: int = 0
    capture_id: str | None = None


@dataclass
class SimRefund:
    refund_id: str
    amount_minor: int
    state: str


PAY_CODE_MEANINGS: Mapping[str, ResultKind] = {
    "SUCCESS": ResultKind.SUCCESS, "PAYERROR": ResultKind.FAILURE,
    "CLOSED": ResultKind.FAILURE, "USERPAYING": ResultKind.PROCESSING,
    "SYSTEMBUSY_X": ResultKind.PROCESSING, "ORDERNOTEXIST": ResultKind.PROCESSING,
    "NOTENOUGH": ResultKind.FAILURE, "SYSTEM_DOWN": ResultKind.FAILURE}
"""Every business code this wallet answers a payment call with (return code ``SUCCESS``),
and what it means: the truth a configured code table must agree with (``sim.oracle``)."""
REFUND_CODE_MEANINGS: Mapping[str, ResultKind] = {
    "SUCCESS": ResultKind.SUCCESS, "REFUNDCLOSE": ResultKind.FAILURE,
    "PROCESSING": ResultKind.PROCESSING, "REFUNDNOTEXIST": ResultKind.PROCESSING}

NOTIFY_RESEND_SCHEDULE_MS = (15_000, 15_000, 30_000, 180_000, 600_000, 1_200_000,
                             1_800_000, 1_800_000, 1_800_000, 3_600_000, 10_800_000,
                             10_800_000, 10_800_000, 21_600_000, 21_600_000)
"""WeChat Pay's gaps between sends of a notification the merchant did not acknowledge
(15 s, 15 s, 30 s, 3 m, 10 m, 20 m, 30 m, 30 m, 30 m, 60 m, 3 h, 3 h, 3 h, 6 h, 6 h)."""
NOTIFY_SENDS_MAX = 5
"""Sends of one notification a simulated wallet makes at most (the first and four re-sends,
over four virtual minutes): within the simulator's quiet phase. A real wallet's is 16."""
NOTIFY_REFUSALS_KEPT_MAX = 8
"""Refusal codes a wallet keeps per notification (the newest), for the oracle's messages."""

AGREEMENT_CALLBACK_TRIES = 40
AGREEMENT_CALLBACK_GAP_MS = 500
"""A wallet sends an agreement callback again this long after a failed one."""
class BorrowedWorld:
    """The world of a simulated wallet built without one (``load_channels`` without
    ``world=``): the runtime of the engine it is given to (``SimulatedChannel.use_runtime``,
    called by ``Engine.open``). It starts no thread of its own, so nothing is left running
    that nobody stops: the engine's shutdown stops its runtime, and with it the wallet's
    pending events (a user about to pay); a reopened engine lends its new runtime. Before
    any engine took the wallet its clock is the wall clock and it can schedule nothing
    (``EngineClosed``: no engine could have asked it anything yet). Thread-safe."""

    def __init__(self) -> None:
        self._runtime: World | None = None

    def use(self, runtime: World) -> None:
        self._runtime = runtime

    def _lent(self) -> World:
        runtime = self._runtime
        if runtime is None:
            raise EngineClosed("this simulated wallet was given to no engine yet: it "
                               "schedules on the runtime of the engine it is given to")
        return runtime

    def now_ms(self) -> int:
        runtime = self._runtime
        return time.time_ns() // 1_000_000 if runtime is None else runtime.now_ms()

    def call_at(self, due_at_ms: int, fn: Callable[[], None]) -> Any:
        return self._lent().call_at(due_at_ms, fn)

    def run_io(self, lane: str, fn: Callable[[], Any], done: Callable[[Any], None]) -> None:
        self._lent().run_io(lane, fn, done)


SENT_KEPT_MAX = 200
"""Notifications a simulated wallet keeps for replay attacks (sim.forger)."""


SIM_PAY_CODES = replace(WECHAT_LIKE_PAY_CODES,
                        failure=WECHAT_LIKE_PAY_CODES.failure | {"NOTENOUGH"},
                        retryable=frozenset({"NOTENOUGH"}))
"""WeChat-like, and NOTENOUGH (WeChat's "balance too low"), which a withholding pay is
declined with: a failure after which another method may pay (retryable)."""


class SimulatedChannel:
    """A channel whose every answer is drawn from ``rng``; thread-safe."""

    pay_codes: CodeTable = SIM_PAY_CODES
    refund_codes: CodeTable = WECHAT_LIKE_REFUND_CODES

    def __init__(self, name: str, world: World, *, seed: int = 0,
                 faults: ChannelFaults | None = None, wait_for_ack: bool = True,
                 txn_prefix: str = "T", signing_key: bytes | None = None,
                 pay_codes: CodeTable | None = None,
                 refund_codes: CodeTable | None = None) -> None:
        self.name = name
        if pay_codes is not None:
            self.pay_codes = pay_codes
        if refund_codes is not None:
            self.refund_codes = refund_codes
        self.config: ChannelConfig | None = None
        """The configuration it was built from (``from_config``), if any."""
        self.notifications = SignedJsonNotifications(
            signing_key or f"payengine-simulated-{name}-key".encode())
        """Signs what this wallet sends and verifies it for the engine (the adapter's side
        shares the key, as a real merchant shares its API key with the wallet)."""
        self.txn_prefix = txn_prefix
        """Transaction ids are ``<prefix><n>``: a channel that outlives one run (the demo
        on the same file) needs a prefix of its own, as a real channel's ids are unique."""
        self.wait_for_ack = wait_for_ack
        """Deliver a notification as an HTTP server would (wait until the engine committed
        it); the deterministic simulator turns this off, it has one thread."""
        self.world = world
        self.faults = faults or ChannelFaults()
        self.rng = random.Random(seed)
        self.payments: dict[str, SimPayment] = {}
        self.sink: CallbackSink | None = None
        self.counts: dict[str, int] = {}
        self.sent_notifications: list[tuple[bytes, dict[str, str]]] = []
        """The newest notifications sent (``SENT_KEPT_MAX``), for replaying them."""
        self.down: tuple[int, int] | None = None
        """While the world's clock is in [start, end) the wallet is down for payments: it
        refuses every new pay with ``SYSTEM_DOWN`` (a retryable failure: it records and
        charges nothing, so a query says ORDERNOTEXIST) (``channel-down``)."""
        self.retryable_refusals: set[str] = set()
        """Serials this wallet answered a retryable failure code for (the oracle's proof
        that a routing fallback left it only after an explicit refusal)."""
        self.pay_details: dict[str, list[PayDetails | None]] = {}
        """The details every ``pay`` call brought, by serial: what the oracle compares with
        the request's (a pay re-sent after a crash must bring the same)."""
        self._lock = threading.RLock()
        self.agreements: dict[str, tuple[str, AgreementStatus]] = {}
        """Agreement id -> (user, status) as the wallet sees it: the ground truth."""
        self.agreement_rng = random.Random(seed + 21)
        """Every draw for agreements and withholding pays: a stream of its own, so the
        other payments' fates are what they were before withholding existed."""
        self.authorisations: dict[str, SimAuthorisation] = {}
        """Pump pre-authorisations by serial, as the wallet sees them: the ground truth."""
        self.authorisation_rng = random.Random(seed + 27)
        """Every draw for pre-authorisations: a stream of its own, as ``agreement_rng``."""
        self.misreport_rng = random.Random(seed + 31)
        """Every draw for ``capture_amount_misreported``: a stream of its own, so the other
        pre-authorisation draws are what they were before it."""
        self.notify_rng = random.Random(seed + 50)
        """Every draw for re-sent notifications (lost again or not) and for the forced
        double charges' delays: a stream of its own, as ``agreement_rng``."""
        self.notify_sends_max = NOTIFY_SENDS_MAX
        self.notify_resend_schedule_ms: tuple[int, ...] = NOTIFY_RESEND_SCHEDULE_MS
        """Gaps between sends (real time on threads: the simulator shortens them there)."""
        self.notices: dict[str, Notice] = {}
        """Every notification sent, by key: the oracle checks what it says was acknowledged
        against what the engine knows."""
        self.double_charged = 0
        self.withhold_closes_lost = 0
        """Payments charged twice so far (drawn or forced, ``double_charges_min``)."""

    @classmethod
    def from_config(cls, config: ChannelConfig, world: World, *, seed: int | None = None,
                    faults: ChannelFaults | None = None, wait_for_ack: bool = True
                    ) -> SimulatedChannel:
        """The simulated wallet a configuration declares (``kind = "simulated"``): its name,
        code tables and notification key from the config, its seed, transaction id prefix and
        faults from ``[channels.NAME.simulated]`` unless ``seed`` or ``faults`` are given
        (the simulator draws its own per run)."""
        options = config.simulated
        if faults is None:
            if options.faults == "none":
                faults = ChannelFaults.none()
            else:
                overrides = {} if isinstance(options.faults, str) else dict(options.faults)
                faults = ChannelFaults(**{  # type: ignore[arg-type]  # checked by the config
                    name: tuple(value) if isinstance(value, list | tuple) else value
                    for name, value in overrides.items()})
        assert config.credentials.key is not None
        pay_codes, refund_codes = config.codes
        channel = cls(config.name, world, seed=options.seed if seed is None else seed,
                      faults=faults, wait_for_ack=wait_for_ack, txn_prefix=options.txn_prefix,
                      signing_key=config.credentials.key.encode(), pay_codes=pay_codes,
                      refund_codes=refund_codes)
        channel.config = config
        return channel

    @property
    def query_schedule_ms(self) -> tuple[int, ...] | None:
        """Its configuration's query schedule, if any (``Engine.open`` uses it)."""
        return None if self.config is None else self.config.query_schedule_ms

    @property
    def refund_query_schedule_ms(self) -> tuple[int, ...] | None:
        return None if self.config is None else self.config.refund_query_schedule_ms

    def use_runtime(self, runtime: World) -> None:
        """``Engine.open`` lends its runtime: a wallet built without a world (a
        ``BorrowedWorld``) schedules on it; one with a world of its own keeps that."""
        if isinstance(self.world, BorrowedWorld):
            self.world.use(runtime)

    def attach(self, sink: CallbackSink | None) -> None:
        """Send notifications to ``sink`` from now on (``None``: the merchant is down)."""
        self.sink = sink

    # ------------------------------------------------------------------ the Channel API

    def pay(self, payment_serial: str, amount_minor: int, currency: str, title: str,
            details: PayDetails | None = None) -> ChannelReply:
        with self._lock:
            self.pay_details.setdefault(payment_serial, []).append(details)
            payment = self.payments.get(payment_serial)
            if payment is not None:
                return self._answered(self._reply(payment), payment_serial)
            if details is not None and details.scenario is PayScenario.WITHHOLD:
                return self._answered(self._withhold(payment_serial, amount_minor, details),
                                      payment_serial)
            if self.down is not None and self.down[0] <= self.world.now_ms() < self.down[1]:
                self.counts["channel_down"] = self.counts.get("channel_down", 0) + 1
                return self._answered(ChannelReply("SUCCESS", "SYSTEM_DOWN"), payment_serial)
            f = self.faults
            payment = SimPayment(payment_serial, amount_minor, "USERPAYING",
                                 f"{self.txn_prefix}{len(self.payments):012d}",
                                 scenario=PayScenario.NATIVE if details is None
                                 else details.scenario)
            self.payments[payment_serial] = payment
            if self._chance(f.sync_failure, "sync_failure"):
                payment.state = "PAYERROR"
                return self._answered(self._reply(payment), payment_serial)
            if self._chance(f.user_never_pays, "user_never_pays"):
                pass
            elif self._chance(f.user_pays_late, "user_pays_late"):
                self._after(f.late_pay_delay_ms, lambda: self._user_pays(payment_serial))
            else:
                self._after(f.user_pay_delay_ms, lambda: self._user_pays(payment_serial))
            if self._chance(f.sync_timeout, "sync_timeout"):
                raise TimeoutError(f"{self.name}: pay {payment_serial} timed out")
            if self._chance(f.sync_unknown_code, "sync_unknown_code"):
                return ChannelReply("SUCCESS", "SYSTEMBUSY_X", payment.txn_id)
            return self._reply(payment)

    def query(self, payment_serial: str) -> ChannelReply:
        with self._lock:
            if self._chance(self.faults.query_no_answer, "query_no_answer"):
                return ChannelReply("FAIL", None)
            payment = self.payments.get(payment_serial)
            if payment is None:
                return ChannelReply("SUCCESS", "ORDERNOTEXIST")
            if payment.state != "USERPAYING" and self._chance(
                self.faults.query_says_processing, "query_says_processing"
            ):
                return ChannelReply("SUCCESS", "USERPAYING", payment.txn_id)
            return self._answered(self._reply(payment), payment_serial)

    def query_charge(self, payment_serial: str, channel_txn_id: str) -> ChannelReply:
        """One transaction of the payment: a success only for a charge really made."""
        with self._lock:
            if self._chance(self.faults.query_no_answer, "query_no_answer"):
                return ChannelReply("FAIL", None)
            payment = self.payments.get(payment_serial)
            charge = None if payment is None else next(
                (c for c in payment.charges if c[0] == channel_txn_id), None)
            if charge is None:
                return ChannelReply("SUCCESS", "ORDERNOTEXIST")
            return ChannelReply("SUCCESS", "SUCCESS", charge[0], charge[1])

    def verify_notification(self, body: bytes, headers: Mapping[str, str]
                            ) -> ChannelNotification:
        return self.notifications.verify(body, headers)

    def close(self, payment_serial: str) -> ChannelReply:
        with self._lock:
            payment = self.payments.get(payment_serial)
            if payment is None:
                payment = SimPayment(payment_serial, 0, "CLOSED", "")
                self.payments[payment_serial] = payment
            elif payment.state == "USERPAYING":
                payment.state = "CLOSED"
            if payment.scenario is PayScenario.WITHHOLD and (self._agreement_chance(
                    self.faults.withhold_close_lost, "withhold_close_lost")
                    or self.withhold_closes_lost < self.faults.withhold_close_losses_min):
                self.withhold_closes_lost += 1
                self.counts["withhold_close_answers_lost"] = self.withhold_closes_lost
                raise TimeoutError(f"{self.name}: close {payment_serial} timed out")
            return self._reply(payment)

    # ------------------------------------------------------------------ pre-authorisation

    def authorise(self, payment_serial: str, amount_minor: int, currency: str, title: str,
                  details: PayDetails | None = None) -> AuthorisationReply:
        """Hold ``amount_minor`` (or decline); a serial seen before answers as it stands."""
        with self._lock:
            self._auth_fault("authorisation_request_lost")
            record = self.authorisations.get(payment_serial)
            if record is None:
                declined = self._auth_chance(self.faults.authorisation_declined,
                                             "authorisation_declined")
                record = SimAuthorisation(
                    payment_serial, amount_minor,
                    AuthorisationStatus.DECLINED if declined else AuthorisationStatus.AUTHORISED,
                    f"{self.txn_prefix}A{len(self.authorisations):011d}")
                self.authorisations[payment_serial] = record
            self._auth_fault("authorisation_answer_lost")
            return self._auth_reply(record)

    def capture(self, payment_serial: str, capture_id: str, amount_minor: int
                ) -> AuthorisationReply:
        """Charge ``amount_minor`` of an authorisation (declined above it); idempotent by
        ``capture_id``; the rest is released."""
        with self._lock:
            self._auth_fault("authorisation_request_lost")
            record = self.authorisations.get(payment_serial)
            if record is None:
                return AuthorisationReply(AuthorisationStatus.NOT_FOUND)
            if record.state is AuthorisationStatus.AUTHORISED:
                if amount_minor > record.amount_minor:
                    self.counts["capture_above_declined"] = (
                        self.counts.get("capture_above_declined", 0) + 1)
                    return AuthorisationReply(AuthorisationStatus.DECLINED,
                                              reason="above the authorised amount")
                record.state = AuthorisationStatus.CAPTURED
                record.captured_minor = amount_minor
                record.capture_id = capture_id
                payment = SimPayment(payment_serial, amount_minor, "SUCCESS", record.txn_id)
                self._charge(payment)
                self.payments[payment_serial] = payment
            self._auth_fault("authorisation_answer_lost")
            return self._auth_reply(record)

    def void(self, payment_serial: str) -> AuthorisationReply:
        """Release the authorisation; a serial never seen is recorded voided."""
        with self._lock:
            self._auth_fault("authorisation_request_lost")
            record = self.authorisations.get(payment_serial)
            if record is None:
                record = SimAuthorisation(payment_serial, 0, AuthorisationStatus.VOIDED, "")
                self.authorisations[payment_serial] = record
            elif record.state is AuthorisationStatus.AUTHORISED:
                record.state = AuthorisationStatus.VOIDED
            self._auth_fault("authorisation_answer_lost")
            return self._auth_reply(record)

    def query_authorisation(self, payment_serial: str) -> AuthorisationReply:
        with self._lock:
            if self._chance(self.faults.query_no_answer, "query_no_answer"):
                raise TimeoutError(f"{self.name}: query of authorisation {payment_serial}")
            record = self.authorisations.get(payment_serial)
            if record is None:
                return AuthorisationReply(AuthorisationStatus.NOT_FOUND)
            return self._auth_reply(record)

    def authorisation(self, payment_serial: str) -> SimAuthorisation | None:
        """The wallet's record of a pre-authorisation (ground truth for the oracle)."""
        with self._lock:
            record = self.authorisations.get(payment_serial)
            return None if record is None else replace(record)

    def _auth_reply(self, record: SimAuthorisation) -> AuthorisationReply:
        amount = {AuthorisationStatus.AUTHORISED: record.amount_minor,
                  AuthorisationStatus.CAPTURED: record.captured_minor}.get(record.state)
        p = self.faults.capture_amount_misreported
        if (record.state is AuthorisationStatus.CAPTURED and amount is not None and amount >= 2
                and p > 0 and self.misreport_rng.random() < p):
            self.counts["capture_amount_misreported"] = (
                self.counts.get("capture_amount_misreported", 0) + 1)
            amount -= self.misreport_rng.randint(1, max(1, amount // 10))
        return AuthorisationReply(record.state, amount or None, record.txn_id or None,
                                  record.state.value)

    def _auth_fault(self, kind: str) -> None:
        if self._auth_chance(getattr(self.faults, kind), kind):
            raise TimeoutError(f"{self.name}: {kind.replace('_', ' ')}")

    def _auth_chance(self, probability: float, kind: str) -> bool:
        hit = probability > 0 and self.authorisation_rng.random() < probability
        if hit:
            self.counts[kind] = self.counts.get(kind, 0) + 1
        return hit

    # ------------------------------------------------------------------ agreements

    def sign(self, agreement_id: str, user_id: str) -> AgreementStatus:
        """The user confirms at once, or later (a callback: ``agreement_pending``), or
        declines (``agreement_refused``)."""
        with self._lock:
            known = self.agreements.get(agreement_id)
            if known is not None:
                return known[1]
            if self._agreement_chance(self.faults.agreement_refused, "agreement_refused"):
                self.agreements[agreement_id] = (user_id, AgreementStatus.FAILED)
                return AgreementStatus.FAILED
            if not self._agreement_chance(self.faults.agreement_pending, "agreement_pending"):
                self.agreements[agreement_id] = (user_id, AgreementStatus.SIGNED)
                return AgreementStatus.SIGNED
            self.agreements[agreement_id] = (user_id, AgreementStatus.PENDING)
            delay = self.agreement_rng.randint(10, 500)
        self._agreement_decided(agreement_id, AgreementStatus.SIGNED, delay)
        return AgreementStatus.PENDING

    def unsign(self, agreement_id: str) -> AgreementStatus:
        with self._lock:
            known = self.agreements.get(agreement_id)
            if known is None:
                return AgreementStatus.FAILED
            self.agreements[agreement_id] = (known[0], AgreementStatus.TERMINATED)
            return AgreementStatus.TERMINATED

    def revoke(self, agreement_id: str) -> bool:
        """The user cancels the agreement in the wallet app: it ends here at once, and the
        wallet tells the merchant (the engine) by a callback a moment later."""
        with self._lock:
            known = self.agreements.get(agreement_id)
            if known is None or known[1] is not AgreementStatus.SIGNED:
                return False
            delay = self.agreement_rng.randint(0, 200)
        self._agreement_decided(agreement_id, AgreementStatus.TERMINATED, delay)
        return True

    def agreement_status(self, agreement_id: str) -> AgreementStatus | None:
        with self._lock:
            known = self.agreements.get(agreement_id)
            return None if known is None else known[1]

    def _agreement_decided(self, agreement_id: str, status: AgreementStatus,
                           delay_ms: int = 0) -> None:
        with self._lock:
            user, before = self.agreements[agreement_id]
            if before in (AgreementStatus.TERMINATED, AgreementStatus.FAILED):
                return
            self.agreements[agreement_id] = (user, status)

        self.world.call_at(self.world.now_ms() + delay_ms,
                           lambda: self._tell_agreement(agreement_id, user, status, 0))

    def _tell_agreement(self, agreement_id: str, user: str, status: AgreementStatus,
                        tries: int) -> None:
        """Send an agreement callback until the merchant takes it, as a wallet does (every
        ``AGREEMENT_CALLBACK_GAP_MS``, at most ``AGREEMENT_CALLBACK_TRIES`` times)."""
        if tries >= AGREEMENT_CALLBACK_TRIES:
            return

        def again(result: object) -> None:
            if isinstance(result, BaseException) and not isinstance(result, PaymentError):
                self.world.call_at(
                    self.world.now_ms() + AGREEMENT_CALLBACK_GAP_MS,
                    lambda: self._tell_agreement(agreement_id, user, status, tries + 1))

        def call() -> object:
            handle = getattr(self.sink, "handle_agreement_callback", None)
            if handle is None:
                raise ConnectionError("the merchant is down")
            return handle(self.name, agreement_id, user, status)

        self.world.run_io(f"notify-{self.name}", call, again)

    def _withhold(self, serial: str, amount_minor: int, details: PayDetails) -> ChannelReply:
        """A withholding pay: on a signed agreement, charged at once, unless the balance is
        too low (PAYERROR) or the call times out (charged later, if not closed first)."""
        f = self.faults
        payment = SimPayment(serial, amount_minor, "USERPAYING",
                             f"{self.txn_prefix}{len(self.payments):012d}",
                             scenario=PayScenario.WITHHOLD)
        self.payments[serial] = payment
        known = self.agreements.get(details.agreement_id or "")
        if known is None or known[1] is not AgreementStatus.SIGNED:
            payment.state = "PAYERROR"
            self.counts["withhold_no_agreement"] = self.counts.get("withhold_no_agreement", 0) + 1
            return self._reply(payment)
        if self._agreement_chance(f.withhold_declined, "withhold_declined"):
            payment.state = "NOTENOUGH"
            return self._reply(payment)
        if self._agreement_chance(f.withhold_timeout, "withhold_timeout"):
            if self.agreement_rng.random() < 0.5:
                delay = self.agreement_rng.randint(*f.late_pay_delay_ms)
                self.world.call_at(self.world.now_ms() + delay,
                                   lambda: self._withhold_charged(serial))
            raise TimeoutError(f"{self.name}: withhold {serial} timed out")
        self._charge(payment)
        return self._reply(payment)

    def _withhold_charged(self, serial: str) -> None:
        """A timed-out withholding pay goes through after all (if it was not closed)."""
        with self._lock:
            payment = self.payments[serial]
            if payment.state != "USERPAYING":
                return
            self._charge(payment)
            reply = self._reply(payment)
            notice = self._notice(ChannelNotification(NotificationKind.PAYMENT, serial, reply),
                                  payment.txn_id)
        self._send_notice(notice)

    def _charge(self, payment: SimPayment) -> None:
        payment.state = "SUCCESS"
        payment.charged_minor = payment.amount_minor
        payment.charges.append((payment.txn_id, payment.amount_minor, self.world.now_ms()))

    def _agreement_chance(self, probability: float, kind: str) -> bool:
        hit = probability > 0 and self.agreement_rng.random() < probability
        if hit:
            self.counts[kind] = self.counts.get(kind, 0) + 1
        return hit

    def refund(self, payment_serial: str, refund_id: str, amount_minor: int, currency: str
               ) -> ChannelReply:
        with self._lock:
            payment = self.payments.get(payment_serial)
            if payment is None or payment.state != "SUCCESS":
                return ChannelReply("SUCCESS", "REFUNDCLOSE")
            refund = payment.refunds.get(refund_id)
            if refund is None:
                # No cap on what is refunded, unlike a real channel: the engine must never
                # ask for more than was paid, and the oracle sees it if it does.
                refund = SimRefund(refund_id, amount_minor, "PROCESSING")
                payment.refunds[refund_id] = refund
                self._after(self.faults.refund_delay_ms,
                            lambda: self._refund_done(payment_serial, refund_id))
            return ChannelReply("SUCCESS", refund.state)

    def query_refund(self, payment_serial: str, refund_id: str) -> ChannelReply:
        with self._lock:
            if self._chance(self.faults.query_no_answer, "query_no_answer"):
                return ChannelReply("FAIL", None)
            payment = self.payments.get(payment_serial)
            refund = None if payment is None else payment.refunds.get(refund_id)
            if refund is None:
                return ChannelReply("SUCCESS", "REFUNDNOTEXIST")
            return ChannelReply("SUCCESS", refund.state)

    # ------------------------------------------------------------------ ground truth

    def refunded(self, payment_serial: str) -> int:
        """What the channel really gave back for this serial."""
        with self._lock:
            payment = self.payments.get(payment_serial)
            return 0 if payment is None else payment.refunded_minor

    def refund_given(self, payment_serial: str, refund_id: str) -> int:
        """What this channel really gave back under ``refund_id``."""
        with self._lock:
            payment = self.payments.get(payment_serial)
            refund = None if payment is None else payment.refunds.get(refund_id)
            return refund.amount_minor if refund is not None and refund.state == "SUCCESS" else 0

    def net_charged(self, payment_serial: str) -> int:
        """What the payer is really out of pocket for this serial: charged minus refunded."""
        with self._lock:
            payment = self.payments.get(payment_serial)
            return 0 if payment is None else payment.charged_minor - payment.refunded_minor

    # ------------------------------------------------------------------ the world's events

    def _user_pays(self, payment_serial: str) -> None:
        with self._lock:
            payment = self.payments[payment_serial]
            if payment.state != "USERPAYING":
                return
            payment.state = "SUCCESS"
            payment.charged_minor = payment.amount_minor
            payment.charges.append((payment.txn_id, payment.amount_minor, self.world.now_ms()))
            reply = self._reply(payment)
            if self._chance(self.faults.double_charge, "double_charge"):
                self._after(self.faults.callback_delay_ms,
                            lambda: self._charge_again(payment_serial))
                self.double_charged += 1
            elif self.double_charged < self.faults.double_charges_min:
                self.counts["double_charge_forced"] = self.counts.get(
                    "double_charge_forced", 0) + 1
                self.double_charged += 1
                self.world.call_at(
                    self.world.now_ms() + self.notify_rng.randint(*self.faults.callback_delay_ms),
                    lambda: self._charge_again(payment_serial))
            notice = self._notice(ChannelNotification(NotificationKind.PAYMENT, payment_serial,
                                                      reply), payment.txn_id)
        self._notify(notice)

    def _charge_again(self, payment_serial: str) -> None:
        """A second charge for a paid payment (a channel fault): its own notification."""
        with self._lock:
            payment = self.payments[payment_serial]
            txn = f"{payment.txn_id}-2"
            payment.charged_minor += payment.amount_minor
            payment.charges.append((txn, payment.amount_minor, self.world.now_ms()))
            reply = ChannelReply("SUCCESS", "SUCCESS", txn, payment.amount_minor)
            notice = self._notice(ChannelNotification(NotificationKind.PAYMENT, payment_serial,
                                                      reply), txn)
        self._notify(notice)

    def _refund_done(self, payment_serial: str, refund_id: str) -> None:
        with self._lock:
            refund = self.payments[payment_serial].refunds[refund_id]
            refund.state = "SUCCESS"
        reply = ChannelReply("SUCCESS", "SUCCESS", None, refund.amount_minor)
        with self._lock:
            notice = self._notice(ChannelNotification(NotificationKind.REFUND, payment_serial,
                                                      reply, refund_id), refund_id)
        self._notify(notice, refund=True)

    def _notice(self, notification: ChannelNotification, ident: str) -> Notice:
        """The notification as the wallet POSTs it (signed body bytes and headers), kept
        for the replays of ``sim.forger`` and recorded as owed until acknowledged."""
        body, headers = self.notifications.sign(notification)
        with self._lock:
            self.sent_notifications.append((body, headers))
            del self.sent_notifications[:-SENT_KEPT_MAX]
            key = f"{notification.kind.value} {notification.payment_serial} {ident}"
            notice = Notice(key, notification.payment_serial,
                            lambda sink: sink.handle_notification(self.name, body, headers,
                                                                  wait=self.wait_for_ack),
                            first_at_ms=self.world.now_ms())
            self.notices[key] = notice
            return notice

    def _notify(self, notice: Notice, *, refund: bool = False) -> None:
        """Send a notification: maybe lost, maybe twice, after a delay; never blocks. Its
        first send starts the re-send schedule (``_send_notice``); a lost one is re-sent."""
        with self._lock:
            f = self.faults
            lost, duplicated = ((f.refund_callback_lost, f.refund_callback_duplicated) if refund
                                else (f.callback_lost, f.callback_duplicated))
            prefix = "refund_" if refund else ""
            if self._chance(lost, f"{prefix}callback_lost"):
                self._send_notice(notice, lost=True)
                return
            copies = 2 if self._chance(duplicated, f"{prefix}callback_duplicated") else 1
            delays = [self._draw(f.callback_delay_ms) for _ in range(copies)]
        now = self.world.now_ms()
        self.world.call_at(now + delays[0], lambda: self._send_notice(notice))
        for delay in delays[1:]:  # a copy the network made: not one of the wallet's sends
            self.world.call_at(now + delay, lambda: self._deliver(notice))

    def _send_notice(self, notice: Notice, *, lost: bool = False) -> None:
        """One of the wallet's sends of ``notice`` (``lost``: it never arrives), with the
        next one armed ``NOTIFY_RESEND_SCHEDULE_MS`` later: an acknowledgement disarms it,
        so a refusal, an error and no answer at all (the engine down, or crashed while it
        handled it) are all sent again, at most ``notify_sends_max`` times in all."""
        with self._lock:
            if notice.acknowledged_at_ms is not None or notice.gave_up:
                return
            if notice.sends:
                self.counts["notify_resent"] = self.counts.get("notify_resent", 0) + 1
            notice.sends += 1
            schedule = self.notify_resend_schedule_ms
            if notice.sends < min(self.notify_sends_max, len(schedule) + 1):
                gap = schedule[notice.sends - 1]
                notice.timer = self.world.call_at(self.world.now_ms() + gap,
                                                  lambda: self._resend(notice))
            elif lost:
                self._give_up(notice)
        if not lost:
            self._deliver(notice)

    def _give_up(self, notice: Notice) -> None:
        """The last send went unacknowledged: the wallet stops sending this one."""
        with self._lock:
            if not notice.gave_up and notice.acknowledged_at_ms is None:
                notice.gave_up = True
                self.counts["notify_gave_up"] = self.counts.get("notify_gave_up", 0) + 1

    def _resend(self, notice: Notice) -> None:
        """The schedule's next send, lost with the faults' chance (its own stream)."""
        with self._lock:
            f = self.faults
            refund = notice.key.startswith(NotificationKind.REFUND.value)
            chance = f.refund_callback_lost if refund else f.callback_lost
            lost = chance > 0 and self.notify_rng.random() < chance
        self._send_notice(notice, lost=lost)

    def _deliver(self, notice: Notice) -> None:
        sink = self.sink
        if sink is None:  # the merchant is down: no answer
            self._answered_notice(notice, ConnectionError("no answer"))
            return

        def call() -> object:
            return notice.send(sink)

        self.world.run_io(f"notify-{self.name}", call,
                          lambda result: self._answered_notice(notice, result))

    def _answered_notice(self, notice: Notice, result: object) -> None:
        """The merchant's answer: a state is an acknowledgement (the schedule stops); an
        error (a refusal, the engine closed) is none: the next send stays armed."""
        with self._lock:
            if isinstance(result, str):
                if notice.acknowledged_at_ms is None:
                    notice.acknowledged_at_ms = self.world.now_ms()
                    notice.gave_up = False
                    cancel = getattr(notice.timer, "cancel", None)
                    if cancel is not None:
                        cancel()
                return
            reason = getattr(result, "reason", None)
            code = getattr(result, "code", None) if isinstance(result, PaymentError) \
                else "no_answer"
            notice.refusals.append(f"{code}:{reason}" if reason else str(code))
            del notice.refusals[:-NOTIFY_REFUSALS_KEPT_MAX]
            if notice.sends >= self.notify_sends_max:
                self._give_up(notice)

    def sending(self) -> bool:
        """Whether a notification is still being sent (neither acknowledged nor given up)."""
        with self._lock:
            return any(n.acknowledged_at_ms is None and not n.gave_up
                       for n in self.notices.values())

    def unacknowledged(self) -> list[Notice]:
        """Notifications never acknowledged (given up, or still being sent)."""
        with self._lock:
            return [n for n in self.notices.values() if n.acknowledged_at_ms is None]

    def acknowledged(self, key: str) -> bool:
        with self._lock:
            notice = self.notices.get(key)
            return notice is not None and notice.acknowledged_at_ms is not None

    # ------------------------------------------------------------------ helpers

    def _answered(self, reply: ChannelReply, payment_serial: str) -> ChannelReply:
        if reply.result_code in self.pay_codes.retryable:
            self.retryable_refusals.add(payment_serial)
        return reply

    def refused_retryably(self, payment_serial: str) -> bool:
        """Whether this wallet ever answered a retryable failure for the serial."""
        with self._lock:
            return payment_serial in self.retryable_refusals

    def _reply(self, payment: SimPayment) -> ChannelReply:
        # the trade's own amount, as a real channel reports it (not the sum of a double charge)
        amount = payment.amount_minor if payment.state == "SUCCESS" else None
        # a trade closed before it was paid has no transaction id: None, not ""
        prepay = self.prepay_for(payment) if payment.state == "USERPAYING" else None
        return ChannelReply("SUCCESS", payment.state, payment.txn_id or None, amount,
                            prepay=prepay)

    def pay_details_sent(self, payment_serial: str) -> list[PayDetails | None]:
        with self._lock:
            return list(self.pay_details.get(payment_serial, ()))

    def prepay_given(self, payment_serial: str) -> Prepay | None:
        with self._lock:
            payment = self.payments.get(payment_serial)
            return None if payment is None else self.prepay_for(payment)

    def prepay_for(self, payment: SimPayment) -> Prepay:
        """What this wallet gives the payer for an unpaid trade, by its scenario."""
        serial = payment.serial
        match payment.scenario:
            case PayScenario.JSAPI | PayScenario.APP:
                return Prepay(prepay_id=f"prepay-{serial}")
            case PayScenario.H5:
                return Prepay(deeplink=f"https://{self.name}.sim.example/h5/{serial}")
            case PayScenario.BARCODE:
                return Prepay(user_action="enter_password")
        return Prepay(code_url=f"{self.name}://qr/{serial}")

    def _chance(self, probability: float, kind: str) -> bool:
        hit = probability > 0 and self.rng.random() < probability
        if hit:
            self.counts[kind] = self.counts.get(kind, 0) + 1
        return hit

    def _draw(self, bounds: tuple[int, int]) -> int:
        return self.rng.randint(*bounds)

    def _after(self, bounds: tuple[int, int], fn: Callable[[], None]) -> None:
        self.world.call_at(self.world.now_ms() + self._draw(bounds), fn)
