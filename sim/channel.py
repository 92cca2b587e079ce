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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from payengine.actors.adapters.config import ChannelConfig
from payengine.actors.channel import (
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
class SimRefund:
    refund_id: str
    amount_minor: int
    state: str


PAY_CODE_MEANINGS: Mapping[str, ResultKind] = {
    "SUCCESS": ResultKind.SUCCESS, "PAYERROR": ResultKind.FAILURE,
    "CLOSED": ResultKind.FAILURE, "USERPAYING": ResultKind.PROCESSING,
    "SYSTEMBUSY_X": ResultKind.PROCESSING, "ORDERNOTEXIST": ResultKind.PROCESSING,
    "SYSTEM_DOWN": ResultKind.FAILURE}
"""Every business code this wallet answers a payment call with (return code ``SUCCESS``),
and what it means: the truth a configured code table must agree with (``sim.oracle``)."""
REFUND_CODE_MEANINGS: Mapping[str, ResultKind] = {
    "SUCCESS": ResultKind.SUCCESS, "REFUNDCLOSE": ResultKind.FAILURE,
    "PROCESSING": ResultKind.PROCESSING, "REFUNDNOTEXIST": ResultKind.PROCESSING}

SENT_KEPT_MAX = 200
"""Notifications a simulated wallet keeps for replay attacks (sim.forger)."""


class SimulatedChannel:
    """A channel whose every answer is drawn from ``rng``; thread-safe."""

    pay_codes: CodeTable = WECHAT_LIKE_PAY_CODES
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
            return self._reply(payment)

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
        self._notify(self._signed(ChannelNotification(NotificationKind.PAYMENT, payment_serial,
                                                      reply)))

    def _charge_again(self, payment_serial: str) -> None:
        """A second charge for a paid payment (a channel fault): its own notification."""
        with self._lock:
            payment = self.payments[payment_serial]
            txn = f"{payment.txn_id}-2"
            payment.charged_minor += payment.amount_minor
            payment.charges.append((txn, payment.amount_minor, self.world.now_ms()))
            reply = ChannelReply("SUCCESS", "SUCCESS", txn, payment.amount_minor)
        self._notify(self._signed(ChannelNotification(NotificationKind.PAYMENT, payment_serial,
                                                      reply)))

    def _refund_done(self, payment_serial: str, refund_id: str) -> None:
        with self._lock:
            refund = self.payments[payment_serial].refunds[refund_id]
            refund.state = "SUCCESS"
        reply = ChannelReply("SUCCESS", "SUCCESS", None, refund.amount_minor)
        self._notify(self._signed(ChannelNotification(NotificationKind.REFUND, payment_serial,
                                                      reply, refund_id)), refund=True)

    def _signed(self, notification: ChannelNotification) -> Callable[[CallbackSink], object]:
        """The notification as the wallet POSTs it: signed body bytes and headers."""
        body, headers = self.notifications.sign(notification)
        with self._lock:
            self.sent_notifications.append((body, headers))
            del self.sent_notifications[:-SENT_KEPT_MAX]
        return lambda sink: sink.handle_notification(self.name, body, headers,
                                                     wait=self.wait_for_ack)

    def _notify(self, send: Callable[[CallbackSink], object], *, refund: bool = False) -> None:
        """Send a notification: maybe lost, maybe twice, after a delay; never blocks."""
        with self._lock:
            f = self.faults
            lost, duplicated = ((f.refund_callback_lost, f.refund_callback_duplicated) if refund
                                else (f.callback_lost, f.callback_duplicated))
            prefix = "refund_" if refund else ""
            if self._chance(lost, f"{prefix}callback_lost"):
                return
            copies = 2 if self._chance(duplicated, f"{prefix}callback_duplicated") else 1
            delays = [self._draw(f.callback_delay_ms) for _ in range(copies)]
        for delay in delays:
            self.world.call_at(self.world.now_ms() + delay, lambda: self._deliver(send))

    def _deliver(self, send: Callable[[CallbackSink], object]) -> None:
        sink = self.sink
        if sink is None:
            return

        def call() -> object:
            return send(sink)

        self.world.run_io(f"notify-{self.name}", call, _ignore_result)

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


def _ignore_result(result: object) -> None:
    """A notification's answer is the merchant's business; the channel only sends it.

    An error (unknown order, engine down) counts as not acknowledged: a real channel would
    retry, this one leaves it to the engine's queries, which is the harder case.
    """
