"""One simulated run: the real engine, a seeded world full of faults, crashes, and the oracle.

``run(SimConfig(seed=...))`` builds a world from the seed (swarm testing: each seed draws
which faults are on and how hard), opens the engine on a SQLite file, lets customers pay for
fuel while the world misbehaves and the engine crashes, then turns the faults off and lets
time run until nothing is left to do. The oracle checks the money at every crash and at the
end. The same seed gives the same run: the ``trace_hash`` of two runs is equal.

On the deterministic runtime (``runtime="sim"``) everything happens on this thread in
virtual time. With ``runtime="threads"`` the same workload runs on real ThreadingActors and
real (scaled) time: not reproducible, but the same oracle.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import multiprocessing
import random
import shutil
import tempfile
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from multiprocessing.pool import AsyncResult
from pathlib import Path
from typing import Any

from payengine.actors.adapters.config import PLANTED_CONFIG_BUGS, load_config
from payengine.actors.adapters.routes_config import load_routing
from payengine.actors.base import EngineConfig
from payengine.actors.directory import Directory
from payengine.actors.engine import Engine
from payengine.actors.merchant_auth import MerchantRequestConfig
from payengine.actors.messages import Receipt
from payengine.actors.notifier import NotificationConfig
from payengine.actors.risk_gate import RiskConfig
from payengine.actors.runtime import Runtime, ThreadRuntime
from payengine.engine.channel_data import PayDetails, PayScenario
from payengine.engine.errors import (
    ActorBroken,
    DuplicateSuspected,
    IllegalTransition,
    PaymentError,
    RequestRejected,
    RiskBlocked,
)
from payengine.engine.order import (
    PLANTABLE_BUGS,
    CashPart,
    LegMode,
    LegStatus,
    OrderPolicy,
    OrderState,
    PaymentRequest,
    RefundKind,
    RefundStatus,
    VoucherPart,
)
from payengine.engine.statement import FLAGGED, Verdict
from payengine.persistence.outbox import OutboxEvent
from payengine.persistence.store import Store
from payengine.sim.attention_check import AttentionSampler, check_attention
from payengine.sim.beneficiary import RechargesAndTransfers
from payengine.sim.channel import ChannelFaults, SimulatedChannel
from payengine.sim.deliberate import Deliberate
from payengine.sim.forger import Forger
from payengine.sim.merchant import SimMerchant
from payengine.sim.metrics_probe import (
    MetricsProbe,
    SimSeries,
    check_payments_counted,
    series_of,
)
from payengine.sim.oracle import (
    OracleReport,
    Told,
    Violation,
    check,
    check_authorisations,
    check_beneficiaries,
    check_code_tables,
    check_fallbacks,
    check_notified,
    check_one_success_per_trade,
    check_pre_holds,
    check_routes,
    check_step_ups,
    check_wallet_notices,
    told_of,
)
from payengine.sim.preauth import Pumps
from payengine.sim.preholds import PreHolder
from payengine.sim.provider import ProviderWorkload
from payengine.sim.quotes import QuotingTerminals, sim_discounts
from payengine.sim.reopen import (
    CannotAuthorise,
    ReopenTry,
    check_reopens,
    try_plain_each,
    try_without_each,
)
from payengine.sim.risk import StepUpUser, risk_config
from payengine.sim.runtime import Scheduler, SimRuntime, SimWorld
from payengine.sim.signed_requests import SignedRequests
from payengine.sim.statement import statement_from_channel
from payengine.sim.voucher_link import LossyVoucherLink, VoucherFaults
from payengine.sim.withholds import Withholds

FAULT_KINDS = (
    "jitter", "callback-lost", "callback-duplicated", "callback-reordered", "callback-early",
    "channel-timeout", "unknown-code", "pay-failure", "query-no-answer", "query-processing",
    "user-never-pays", "user-pays-late", "duplicate-submit", "user-close", "timeout-close",
    "voucher-faults", "crash", "double-charge", "refund-callback-lost",
    "refund-callback-duplicated", "merchant-down", "forged-notification", "pre-holds",
    "late-close", "forged-request", "risk", "withhold", "channel-down",
)
"""Every fault the simulator can inject; ``--faults`` picks from these."""

LATER_KINDS = frozenset({"pre-holds", "late-close"})
"""Faults (and features) added after the others: drawn from a stream of their own
(``FaultMix.draw``'s ``later``), so that adding them changed no other fault's draws."""

OWN_STREAM_KINDS = frozenset({"risk", "withhold", "channel-down"})
"""Features drawn (and run) from a stream each of their own (``Simulation``), not by
``FaultMix.draw``: adding one changes no other draw of a seed."""

SIM_CHANNELS_TOML = """
[channels.wechat]
kind = "simulated"
wallet = "wechat"
merchant_no = "sim-wechat-0001"
credentials = { key = "payengine-simulated-wechat-key" }
simulated = { txn_prefix = "T" }

[channels.wechat.codes.pay]
communication_ok = ["SUCCESS"]
success = ["SUCCESS"]
failure = ["PAYERROR", "CLOSED", "REVOKED", "NOTENOUGH", "SYSTEM_DOWN"]
processing = ["USERPAYING", "NOTPAY"]
retryable = ["PAYERROR", "NOTENOUGH", "SYSTEM_DOWN"]
not_found = ["ORDERNOTEXIST"]

[channels.wechat.codes.refund]
communication_ok = ["SUCCESS"]
success = ["SUCCESS"]
failure = ["REFUNDCLOSE"]
processing = ["PROCESSING", "CHANGE"]

[channels.alipay]
like = "wechat"
wallet = "alipay"
merchant_no = "sim-alipay-0001"
credentials = { key = "payengine-simulated-alipay-key" }
simulated = { txn_prefix = "A" }

[routing]
fallbacks_max = 1

# WeChat takes QR payments up to 150.00 (a merchant number's cap), Alipay the rest and
# whatever comes while WeChat's breaker is open, or after WeChat refused it retryably.
[[routing.route]]
method = "qr"
channel = "wechat"
limits = { amount_max_minor = 15000 }

[[routing.route]]
method = "qr"
channel = "alipay"
priority = 1
"""
"""The simulator's two wallets, as a channel configuration (``actors.adapters``). Seeds,
faults and the signing keys are those the wallets had before they came from a
configuration, so every seed's run is the same."""

REQUEST_KINDS = frozenset({"forged-request"})
"""Signed merchant requests (``sim.signed_requests``): drawn from a stream of their own too
(``FaultMix.draw``'s ``requests``), after the later ones, which they leave as they were."""

REQUEST_WINDOW_MS = 5_000
"""The signed requests' timestamp window in the simulator: short, so that replays fall both
inside it (refused as replays) and outside (stale), and nonces are pruned during a run."""

SIM_POLICY = OrderPolicy(
    pay_window_ms=3_000,
    hold_grace_ms=15_000,
    query_schedule_ms=(100, 200, 500, 1_000, 2_000),
    refund_query_schedule_ms=(100, 200, 500, 1_000, 2_000),
    voucher_retry_schedule_ms=(200, 400, 800, 1_600, 3_000),
    voucher_sentinel_interval_ms=2_000,
)


SIM_SCENARIOS = tuple(s for s in PayScenario if s is not PayScenario.WITHHOLD)
"""Scenarios a terminal's payment draws (a withholding is ``Engine.withhold``'s)."""
CASH_UNRESOLVED = frozenset({LegStatus.UNKNOWN, LegStatus.REFUND_UNKNOWN,
                             LegStatus.REFUND_FAILED})
"""Cash outcomes the channel's statement must settle (a voucher system's silence it cannot)."""

MERCHANT_SCHEDULE_MS = (0, 100, 200, 400, 800, 1_600, 3_000, 3_000, 3_000, 3_000, 3_000,
                        3_000, 3_000, 3_000)
"""The merchant notification schedule in the simulator: WeChat-like growth, in seconds."""

OUTBOX_RETENTION_MS = 5_000
"""Delivered events are pruned after 5 virtual seconds, so pruning runs all through a run,
racing deliveries, retries and crashes; the oracle's notification checks (every terminal
order notified and accepted) would catch an event pruned before its consumers had it."""

PRE_HOLD_TOP_UP = 500
"""Points each customer's points account gets on top when users pre-hold (``pre-holds``)."""

POINTS_FUNDED_MAX = 500 + PRE_HOLD_TOP_UP
"""The most any points account is funded with (``Simulation._setup``)."""

VOUCHER_OUTAGE_MS = (6_500, 8_000)
"""How long one voucher system is unreachable (fault ``voucher-faults``): longer than the
whole voucher retry schedule, so follow-ups sent into it are only done by the sentinel."""

ALIPAY_SHARE = 0.2
ROUTED_SHARE = 0.3
"""Payments that name the method ``qr`` instead of a wallet: routing picks the channel."""
SIM_ROUTES = load_routing(SIM_CHANNELS_TOML)
"""The routes of ``SIM_CHANNELS_TOML``: read by the loader, as a deployment's are."""
CHANNEL_DOWN_MS = (1_000, 3_000)
"""How long WeChat refuses payments (fault ``channel-down``): routed payments fall back to
Alipay meanwhile."""
"""Share of orders paying through the second channel, ``alipay`` (the rest: ``wechat``)."""

REFUND_SHARE = 0.3
PAY_AGAIN_SHARE = 0.15
"""Orders whose terminal asks to pay again (a next attempt), at a random moment: refused
while the attempt may still succeed, taken once it failed or closed."""
SIM_ATTEMPTS_MAX = 3
"""Share of submitted orders the merchant later asks to refund (if they succeeded)."""

DOUBLE_CHARGES_MIN = 3
"""With ``double-charge`` on, each wallet charges at least this many payments twice (the
first ones paid), whatever the draws: their second notifications are refused until the
channel confirms the charge, so every such run has refused notifications the wallet sends
again (``sim.channel.NOTIFY_RESEND_SCHEDULE_MS``)."""

QUIET_PHASE_MAX_MS = 15 * 60 * 1000
"""Virtual time the quiet phase may take. Every schedule of ``SIM_POLICY`` ends within a
minute of the last fault, so work still scheduled after this is a loop: a violation."""


class SimulatedCrash(BaseException):
    """Raised from inside the engine (right after a commit) to crash it there."""


@dataclass(frozen=True)
class SimConfig:
    seed: int
    orders: int = 200
    faults: frozenset[str] = frozenset(FAULT_KINDS)
    """Faults this run may draw from; each seed switches a random subset on."""
    crashes: int = 2
    runtime: str = "sim"
    plant_bug: str | None = None
    db_dir: str | None = None
    record_series: bool = False
    """Keep what a chaos report draws (``SimResult.series``): settlement latencies and money
    in transit over time, bounded (``sim.metrics_probe``)."""

    def __post_init__(self) -> None:
        assert 0 < self.orders <= 1_000_000
        assert 0 <= self.crashes <= 1_000
        assert self.runtime in ("sim", "threads")
        unknown = self.faults - set(FAULT_KINDS)
        assert not unknown, f"unknown faults {sorted(unknown)}"
        assert self.plant_bug is None or self.plant_bug in PLANTABLE_BUGS, self.plant_bug


@dataclass
class SimResult:
    seed: int
    orders: int
    trace_hash: str
    violations: list[Violation]
    final_states: dict[str, int]
    faults: dict[str, int]
    crashes: int
    virtual_seconds: float
    wall_seconds: float
    runtime: str
    plant_bug: str | None
    fault_mix: list[str]
    traces: dict[str, list[str]] = field(default_factory=dict)
    series: SimSeries | None = None
    """What a chaos report draws; only with ``SimConfig.record_series``."""

    @property
    def ok(self) -> bool:
        return not self.violations

    def as_json(self) -> dict[str, Any]:
        return {
            "seed": self.seed, "orders": self.orders, "trace_hash": self.trace_hash,
            "violations": [str(v) for v in self.violations], "final_states": self.final_states,
            "faults": self.faults, "crashes": self.crashes,
            "virtual_seconds": round(self.virtual_seconds, 3),
            "wall_seconds": round(self.wall_seconds, 3), "runtime": self.runtime,
            "plant_bug": self.plant_bug, "fault_mix": self.fault_mix, "ok": self.ok,
        }


class SeqIds:
    """Deterministic ids that stay unique across the engine's reincarnations."""

    def __init__(self) -> None:
        self.n = 0
        self.quotes = 0

    def _next(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}{self.n:07d}"

    def new_order_id(self) -> str:
        return self._next("ord")

    def new_payment_serial(self) -> str:
        return self._next("P")

    def new_hold_id(self) -> str:
        return self._next("hold")

    def new_agreement_id(self) -> str:
        return self._next("agr")
    def new_quote_id(self) -> str:
        """Counted apart, so the quotes leave the other ids of a seed as they were."""
        self.quotes += 1
        return f"quote{self.quotes:07d}"


@dataclass(frozen=True)
class FaultMix:
    """What this seed's world does wrong (swarm testing: a different mix per seed)."""

    on: frozenset[str]
    channel: ChannelFaults
    io_latency_ms: tuple[int, int]
    duplicate_submit: float
    user_close: float
    pay_window_ms: int
    vouchers: VoucherFaults
    merchant_down: float = 0.0
    """How often the merchant's notification endpoint fails an attempt."""
    forgeries: float = 0.0
    """Chance per order that the forger (``sim.forger``) strikes at it, at a random time."""
    pre_holds: float = 0.0
    """Share of orders whose user pre-holds points first (``sim.preholds``)."""
    late_close: float = 0.0
    """Chance per order of a user close after its pay window (``Engine.close``)."""
    forged_requests: float = 0.0
    """Signed-request episodes per order (``sim.signed_requests``): a genuine signed pay
    and two attacks each."""
    voucher_outage: tuple[str, int, int] | None = None
    """One voucher system unreachable: (accounts ending so, start after the workload's
    start, length), in ms; ``None``: no outage."""

    @staticmethod
    def draw(rng: random.Random, allowed: frozenset[str], *, swarm: bool = True,
             later: random.Random | None = None,
             requests: random.Random | None = None) -> FaultMix:
        """Switch each allowed fault on with probability 0.6 (all of them if not ``swarm``).

        ``LATER_KINDS`` and the voucher outage are drawn from ``later`` (a fixed stream if
        not given), after the others, so that they leave the others' draws as they were;
        ``REQUEST_KINDS`` from ``requests`` likewise.
        """
        later = later or random.Random(0)
        requests = requests or random.Random(1)
        on = frozenset(k for k in sorted(allowed - LATER_KINDS - REQUEST_KINDS - OWN_STREAM_KINDS)
                       if rng.random() < 0.6 or not swarm)
        on |= frozenset(k for k in sorted(allowed & LATER_KINDS)
                        if later.random() < 0.6 or not swarm)
        on |= frozenset(k for k in sorted(allowed & REQUEST_KINDS)
                        if requests.random() < 0.6 or not swarm)

        def p(kind: str, high: float) -> float:
            return rng.uniform(0.02, high) if kind in on else 0.0

        def p_later(kind: str, high: float) -> float:
            return later.uniform(0.02, high) if kind in on else 0.0

        early = "callback-early" in on
        channel = ChannelFaults(
            sync_failure=p("pay-failure", 0.15),
            sync_timeout=p("channel-timeout", 0.2),
            sync_unknown_code=p("unknown-code", 0.2),
            user_never_pays=p("user-never-pays", 0.1),
            user_pays_late=p("user-pays-late", 0.15),
            callback_lost=p("callback-lost", 0.4),
            callback_duplicated=p("callback-duplicated", 0.4),
            query_no_answer=p("query-no-answer", 0.4),
            query_says_processing=p("query-processing", 0.5),
            double_charge=p("double-charge", 0.1),
            double_charges_min=DOUBLE_CHARGES_MIN if "double-charge" in on else 0,
            refund_callback_lost=p("refund-callback-lost", 0.4),
            refund_callback_duplicated=p("refund-callback-duplicated", 0.4),
            user_pay_delay_ms=(0, 50) if early else (10, 400),
            late_pay_delay_ms=(2_000, 6_000),
            callback_delay_ms=(0, 2_000) if "callback-reordered" in on else (0, 50),
        )
        jitter = "jitter" in on
        io = (1, 400) if jitter else (1, 10)
        if early:
            io = (io[0], max(io[1], 200))  # the sync reply comes after the callback
        return FaultMix(
            on=on, channel=channel, io_latency_ms=io,
            duplicate_submit=p("duplicate-submit", 0.3),
            user_close=p("user-close", 0.2),
            pay_window_ms=rng.choice([800, 1_500]) if "timeout-close" in on else 3_000,
            merchant_down=p("merchant-down", 0.3),
            forgeries=p("forged-notification", 0.5),
            pre_holds=p_later("pre-holds", 0.4),
            late_close=p_later("late-close", 0.3),
            forged_requests=requests.uniform(0.05, 0.3) if "forged-request" in on else 0.0,
            voucher_outage=(
                later.choice(["/pts", "/rp"]), later.randint(0, 1_000_000),
                later.randint(*VOUCHER_OUTAGE_MS))
            if "voucher-faults" in on and (later.random() < 0.5 or not swarm) else None,
            vouchers=VoucherFaults(
                request_lost=p("voucher-faults", 0.25), reply_lost=p("voucher-faults", 0.25),
                unavailable=p("voucher-faults", 0.25),
                delay_ms=(0, 300) if "voucher-faults" in on else (0, 5)),
        )


class Simulation:
    """One run. Not thread-safe (the threads runtime drives it from the world's timers)."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.rng = random.Random(config.seed)
        self.details_rng = random.Random(config.seed + 11)
        self.route_rng = random.Random(config.seed + 12)
        self.attempt_rng = random.Random(config.seed + 13)
        # A planted bug is shown against every allowed fault, so a default run triggers it.
        self.requests_rng = random.Random(config.seed + 17)
        self.mix = FaultMix.draw(self.rng, config.faults, swarm=config.plant_bug is None,
                                 later=random.Random(config.seed + 6),
                                 requests=self.requests_rng)
        # The risk gate (``sim.risk``): its own stream, so a seed's other draws stay as
        # they were; on for every planted bug, like every fault.
        self.risk_rng = random.Random(config.seed + 9)
        self.risk: RiskConfig | None = None
        self.step_ups: StepUpUser | None = None
        if "risk" in config.faults and (self.risk_rng.random() < 0.6
                                        or config.plant_bug is not None):
            self.mix = replace(self.mix, on=self.mix.on | {"risk"})
            self.risk = risk_config(self.risk_rng, config.seed)
        # Agreements and withholding (``sim.withholds``): their own stream too.
        self.withhold_rng = random.Random(config.seed + 21)
        self.withholds: Withholds | None = None
        if "withhold" in config.faults and (self.withhold_rng.random() < 0.6
                                            or config.plant_bug is not None):
            self.mix = replace(self.mix, on=self.mix.on | {"withhold"})
            self.withholds = Withholds(
                self.withhold_rng, config.seed, engine=lambda: self.engine,
                wallets={}, at=self._at, now_ms=lambda: self.world.now_ms(),
                counts=Counter(), quiet=lambda: self.quiet)
            self.mix = replace(self.mix, channel=self.withholds.faults(self.mix.channel))
        # WeChat going down mid-run (``channel-down``): its own stream too
        self.down_rng = random.Random(config.seed + 19)
        self.channel_down: tuple[float, int] | None = None
        """(where in the workload it starts, as a share of its span; how long, in ms)."""
        if "channel-down" in config.faults and (self.down_rng.random() < 0.5
                                                or config.plant_bug is not None):
            self.mix = replace(self.mix, on=self.mix.on | {"channel-down"})
            self.channel_down = (self.down_rng.random(), self.down_rng.randint(*CHANNEL_DOWN_MS))
        # Pumps that pre-authorise (``sim.preauth``): in every run, their own stream too
        self.pumps = Pumps(random.Random(config.seed + 27), seed=config.seed,
                           now_ms=lambda: self.world.now_ms(), at=self._at,
                           engine=lambda: self.engine, quiet=lambda: self.quiet,
                           counts=Counter())
        self.mix = replace(self.mix, channel=Pumps.faults(self.mix.channel))
        self.scheduler: Scheduler | None = None
        self.world: Any
        if config.runtime == "sim":
            self.scheduler = Scheduler(config.seed)
            self.world = SimWorld(self.scheduler, io_latency_ms=(1, 30))
        else:
            self.world = ThreadRuntime()
        bugs = frozenset({config.plant_bug}) if config.plant_bug else frozenset()
        # The wallets come from a channel configuration, as a deployment's do: the loader,
        # its code tables and the simulated kind run in every seed.
        wallets = {c.name: c for c in load_config(SIM_CHANNELS_TOML,
                                                  planted_bugs=bugs & PLANTED_CONFIG_BUGS)}
        self.channel = SimulatedChannel.from_config(wallets["wechat"], self.world,
                                                    seed=config.seed + 1,
                                                    faults=self.mix.channel,
                                                    wait_for_ack=config.runtime == "threads")
        self.alipay = SimulatedChannel.from_config(wallets["alipay"], self.world,
                                                   seed=config.seed + 4,
                                                   faults=self.mix.channel,
                                                   wait_for_ack=config.runtime == "threads")
        self.channels = {"wechat": self.channel, "alipay": self.alipay}
        if config.runtime == "threads":  # real time: re-sends a hundred times sooner
            for wallet in self.channels.values():
                wallet.notify_resend_schedule_ms = tuple(
                    gap // 100 for gap in wallet.notify_resend_schedule_ms)
        if self.withholds is not None:
            self.withholds.wallets = self.channels
        self.forged_counts: dict[str, int] = {}
        self.forger = Forger(random.Random(config.seed + 5), self.channels, self.forged_counts,
                             planted_bugs=bugs)
        self.policy = OrderPolicy(
            pay_window_ms=self.mix.pay_window_ms, hold_grace_ms=SIM_POLICY.hold_grace_ms,
            query_schedule_ms=SIM_POLICY.query_schedule_ms,
            refund_query_schedule_ms=SIM_POLICY.refund_query_schedule_ms,
            voucher_retry_schedule_ms=SIM_POLICY.voucher_retry_schedule_ms,
            voucher_sentinel_interval_ms=SIM_POLICY.voucher_sentinel_interval_ms,
            planted_bugs=bugs)
        self.merchant = SimMerchant(f"secret-{config.seed:012d}", random.Random(config.seed + 3),
                                    lambda: 0.0 if self.quiet else self.mix.merchant_down)
        self.engine_config = EngineConfig(account_idle_ms=2_000, planted_bugs=bugs,
                                          routing=SIM_ROUTES,
                                          notifications=NotificationConfig(
                                              merchant_schedule_ms=MERCHANT_SCHEDULE_MS,
                                              outbox_retention_ms=OUTBOX_RETENTION_MS,
                                              prune_interval_ms=1_000, prune_batch_max=50,
                                              transport=self.merchant),
                                          discounts=sim_discounts(self.world.now_ms()),
                                          merchant_requests=MerchantRequestConfig(
                                              timestamp_window_ms=REQUEST_WINDOW_MS,
                                              nonce_prune_interval_ms=500),
                                          ask_timeout_s=30.0)
        self.ids = SeqIds()
        self.probe = MetricsProbe(keep_latencies=config.record_series)
        """Every incarnation's observer: what the metrics would count (``sim.metrics_probe``)."""
        self.start_ms: int = self.world.now_ms()
        self.series: SimSeries | None = None
        self._tmp = Path(config.db_dir or tempfile.mkdtemp(prefix="payengine-sim-"))
        self.path = self._tmp / f"sim-{config.seed}.db"
        self.engine: Engine | None = None
        self.runtime: Runtime | None = None
        self.receipts: dict[tuple[str, int], Receipt] = {}
        """Every acknowledged submit, by (merchant order number, attempt)."""
        self.violations: list[Violation] = []
        self.crashes_done = 0
        self.counts: Counter[str] = Counter()
        if self.withholds is not None:
            self.withholds.counts = self.counts
        self.pumps.counts = self.counts
        self.pending_submits: list[PaymentRequest] = []
        self.quiet = False
        self.link_rng = random.Random(config.seed + 2)
        self.link_counts: dict[str, int] = {}
        self.notified: dict[str, Told] = {}
        """Outbox events the downstream subscriber received: event id -> what it told."""
        self.pre_holder: PreHolder | None = None
        if "pre-holds" in self.mix.on:
            self.pre_holder = PreHolder(
                random.Random(config.seed + 7), self.mix.pre_holds, now_ms=self.world.now_ms,
                at=self._at, engine=lambda: self.engine, counts=self.counts,
                violations=self.violations, points_funded_max=POINTS_FUNDED_MAX)
        self.late_rng = random.Random(config.seed + 8)
        self.beneficiaries = RechargesAndTransfers(
            random.Random(config.seed + 23), seed=config.seed,
            pay_window_ms=self.mix.pay_window_ms, now_ms=self.world.now_ms, at=self._at,
            engine=lambda: self.engine, quiet=lambda: self.quiet, counts=self.counts)
        self.signed: SignedRequests | None = None
        if "forged-request" in self.mix.on:
            self.signed = SignedRequests(
                self.requests_rng, self.mix.forged_requests, window_ms=REQUEST_WINDOW_MS,
                engine=lambda: self.engine, now_ms=self.world.now_ms, at=self._at,
                quiet=lambda: self.quiet, counts=self.counts, violations=self.violations,
                seed=config.seed)
        if self.risk is not None:
            self.step_ups = StepUpUser(self.risk_rng, config.seed, self.risk, at=self._at,
                                       now_ms=self.world.now_ms, engine=lambda: self.engine,
                                       counts=self.counts)
        # External voucher providers (``sim.provider``): a carrier's phone credit, async
        # legs with their own faults; its own stream, so a seed's other draws stay as they were
        self.provider_work = ProviderWorkload(
            random.Random(config.seed + 29), self.world, lambda: self.engine,
            self.counts, planted=config.plant_bug)
        self.close_refused: set[str] = set()
        """Orders a late user close was refused for (paid): they never end closed."""
        self.risk_blocked: set[str] = set()
        """Merchant order numbers a submit of was refused by the risk gate."""
        self.closed_by_user: set[str] = set()
        """Orders a late user close answered closed (or failed): they never end paid."""
        # Situations some planted bugs need, made on purpose (``sim.deliberate``): in every
        # run with faults, from a stream of their own
        self.deliberate: Deliberate | None = None
        if self.mix.on:
            self.deliberate = Deliberate(
                random.Random(config.seed + 40), engine=lambda: self.engine, at=self._at,
                now_ms=self.world.now_ms, quiet=lambda: self.quiet,
                pay_window_ms=self.mix.pay_window_ms, counts=self.counts,
                violations=self.violations, receipts=self.receipts)
        self.quoter: QuotingTerminals | None = None
        if config.runtime == "sim":  # submits up to 75 s after their quote: virtual time only
            self.quoter = QuotingTerminals(
                random.Random(config.seed + 25), seed=config.seed, engine=lambda: self.engine,
                now_ms=self.world.now_ms, at=self._at, counts=self.counts,
                violations=self.violations)

    # ------------------------------------------------------------------ engine lifecycle

    def _new_runtime(self) -> Runtime:
        if self.scheduler is not None:
            return SimRuntime(self.scheduler, io_latency_ms=self.mix.io_latency_ms)
        return ThreadRuntime()

    def _open_engine(self, runtime: Runtime, *, without: str | None = None,
                     plain: str | None = None) -> Engine:
        """``without``: that channel left out; ``plain``: that one unable to pre-authorise
        (``sim.reopen``'s tries)."""
        channels: list[Any] = [CannotAuthorise(c) if name == plain else c
                               for name, c in self.channels.items() if name != without]
        return Engine.open(self.path, channels=channels,
                           policy=self.policy,
                           config=self.engine_config, runtime=runtime, ids=self.ids,
                           synchronous="OFF" if self.scheduler else "NORMAL",
                           voucher_link=self._voucher_link,
                           subscribers={"downstream": self._downstream},
                           risk=self.risk, providers=self.provider_work.providers)

    def _open(self, tries: list[ReopenTry] | None = None) -> None:
        """Open the engine; ``tries``: the opens without a channel just refused or accepted,
        checked against the store before anything runs (``sim.reopen``)."""
        runtime = self._new_runtime()
        self.runtime = runtime
        self.engine = self._open_engine(runtime)
        self.engine.set_observer(self.probe)
        if tries:
            self.violations += check_reopens(tries)
        for channel in self.channels.values():
            channel.attach(self.engine)
        retry, self.pending_submits = self.pending_submits, []
        for request in retry:
            self._submit(request)

    def _unsettled_by_channel(self) -> dict[str, int]:
        """Read from the file before an open: ``Engine.open`` itself may start work (a
        withholding's next attempt is submitted as it resumes)."""
        store = Store(self.path, exclusive=False)
        try:
            return store.unsettled_orders_by_channel()
        finally:
            store.close()

    def _unsettled_authorisations(self) -> dict[str, int]:
        """Unsettled pre-authorisations by channel, read from the file before an open."""
        store = Store(self.path, exclusive=False)
        try:
            return store.unsettled_authorisations_by_channel()
        finally:
            store.close()

    def _downstream(self, event: OutboxEvent) -> None:
        """A downstream system (settlement, terminal push): keeps what it was told, by id.

        It lives outside the engine, so it remembers across the engine's crashes; at least
        once delivery shows as the same event id twice, which it counts and ignores.
        """
        if event.event_id in self.notified:
            self.counts["notification_duplicated"] += 1
            return
        self.notified[event.event_id] = told_of(event)

    def _voucher_link(self, directory: Directory) -> LossyVoucherLink:
        return LossyVoucherLink(directory, self.world, self.link_rng, self._voucher_faults,
                                self.link_counts)

    def _voucher_faults(self) -> VoucherFaults:
        return VoucherFaults() if self.quiet else self.mix.vouchers

    def _crash(self) -> None:
        """Power loss: actors, messages, timers and I/O of this incarnation are gone."""
        engine, runtime = self.engine, self.runtime
        if engine is None:
            return
        self.engine = None
        self._note_broken(engine)
        for channel in self.channels.values():
            channel.attach(None)
        if isinstance(runtime, SimRuntime):
            runtime.crash()
        engine.abandon()
        self.crashes_done += 1
        self.counts["crash"] += 1
        downtime = self.rng.randint(0, 3_000)
        self._at(self.world.now_ms() + downtime, self._reopen)

    def _note_broken(self, engine: Engine) -> None:
        """Every actor quarantined on a broken invariant is a violation (a reopen forgets)."""
        for actor, error in engine.broken_actors().items():
            kind, ident = actor.split(":", 1)
            violation = Violation("invariant-held", f"{kind} {ident}", error)
            if violation not in self.violations:
                self.violations.append(violation)

    def _reopen(self) -> None:
        self._open(self._try_reopens_without_a_channel())
        assert self.engine is not None
        self._check_during_run()

    def _try_reopens_without_a_channel(self) -> list[ReopenTry]:
        """Each channel left out once (``sim.reopen``); deterministic runtime only: there an
        accepted engine runs nothing before it is abandoned."""
        if self.scheduler is None:
            return []
        runtimes: list[Runtime] = []

        def open_without(name: str) -> Engine:
            runtimes.append(self._new_runtime())
            return self._open_engine(runtimes[-1], without=name)

        def abandon(engine: Engine) -> None:
            runtime = runtimes[-1]
            if isinstance(runtime, SimRuntime):
                runtime.crash()
            engine.abandon()

        tries = try_without_each(self.channels, open_without, abandon,
                                 self._unsettled_by_channel)
        self.counts["reopen_refused_without_a_channel"] += sum(
            t.named is not None for t in tries)

        def open_plain(name: str) -> Engine:
            runtimes.append(self._new_runtime())
            return self._open_engine(runtimes[-1], plain=name)

        plain = try_plain_each(self.channels, open_plain, abandon,
                               self._unsettled_authorisations)
        self.counts["reopen_refused_channel_cannot_authorise"] += sum(
            t.named is not None for t in plain)
        return tries + plain

    def _arm_crash_after_commit(self) -> None:
        """The next commit of the engine crashes it: its decision is durable, its effects lost."""
        engine = self.engine
        if engine is None:
            return

        def crash_now() -> None:
            engine.store.after_commit = None
            raise SimulatedCrash

        engine.store.after_commit = crash_now

    # ------------------------------------------------------------------ the workload

    def _at(self, due_at_ms: int, fn: Callable[[], None]) -> None:
        def guarded() -> None:
            try:
                fn()
            except SimulatedCrash:
                self._crash()

        self.world.call_at(due_at_ms, guarded)

    def _setup(self) -> list[str]:
        engine = self.engine
        assert engine is not None
        engine.notifications.register_merchant("station-1", "https://merchant.sim/notify",
                                               self.merchant.secret)
        customers = [f"c{i}" for i in range(max(5, self.config.orders // 4))]
        for c in customers:
            engine.open_account(f"{c}/rp", "CNY")
            engine.fund(f"{c}/rp", self.rng.choice([300, 1_000]), funding_id=f"{c}/rp")
            engine.open_account(f"{c}/pts", "POINTS", minor_per_unit=10)
            engine.fund(f"{c}/pts", self.rng.choice([60, 500]), funding_id=f"{c}/pts")
        if self.pre_holder is not None:  # points to tick in the app, besides the orders'
            for c in customers:
                engine.fund(f"{c}/pts", PRE_HOLD_TOP_UP, funding_id=f"{c}/pts-pre")
        if self.signed is not None:
            self.signed.setup(engine, customers)
        if self.withholds is not None:
            self.withholds.setup(customers)
        self.beneficiaries.setup(engine, customers)
        self.provider_work.setup(customers)
        self.pumps.setup(engine, customers)
        return customers

    def _request(self, i: int, customers: list[str]) -> PaymentRequest:
        rng = self.rng
        c = rng.choice(customers)
        mode = rng.choices([LegMode.PRE_DEDUCT, LegMode.POST_DEDUCT], weights=[75, 25])[0]
        vouchers = []
        if rng.random() < 0.7:
            vouchers.append(VoucherPart(f"{c}/rp", 100, mode))
        if rng.random() < 0.6:
            vouchers.append(VoucherPart(f"{c}/pts", 20, mode))
        total = rng.randint(10, 300) * 100
        value = sum(100 if v.account_id.endswith("/rp") else 200 for v in vouchers)
        phone = self.provider_work.part(c)  # phone credit at the carrier (its own stream)
        if phone is not None:
            vouchers.append(phone)
            value += phone.amount
        wallet = "alipay" if rng.random() < ALIPAY_SHARE else "wechat"
        if self.route_rng.random() < ROUTED_SHARE:
            wallet = "qr"
        return PaymentRequest("station-1", f"s{self.config.seed}-{i:06d}", c, "CNY", total,
                               "Fuel", CashPart(total - value, wallet, self._pay_details(c)),
                               tuple(vouchers))

    def _pay_details(self, customer: str) -> PayDetails | None:
        """How the customer pays: a scenario and what it needs (drawn from its own stream, so
        the rest of a seed's workload is what it was before details existed)."""
        rng = self.details_rng
        scenario = rng.choice([*SIM_SCENARIOS, None])
        if scenario is None:
            return None
        return PayDetails(
            scenario,
            payer_id=f"openid-{customer}" if scenario is PayScenario.JSAPI else None,
            auth_code="".join(rng.choices("0123456789", k=18))
            if scenario is PayScenario.BARCODE else None,
            client_ip=f"10.0.{rng.randint(0, 255)}.{rng.randint(1, 254)}"
            if scenario is PayScenario.H5 else None,
            device_id=f"pump-{rng.randint(1, 12)}" if rng.random() < 0.5 else None)

    def _submit(self, request: PaymentRequest) -> None:
        engine = self.engine
        if engine is None:  # the server is down: the terminal retries after the restart
            self.pending_submits.append(request)
            return
        try:
            if self.signed is not None and self.signed.takes(request):
                receipt = self.signed.submit(engine, request)  # the merchant's signed pay
            else:
                receipt = engine.submit(request)
        except RequestRejected as error:
            # a genuine signed pay; only a retry whose first try was taken (its answer lost
            # in a crash) may come after the order's pay window
            if error.reason == "pay_window_over" and self._order_exists(request):
                self.counts["signed_pay_too_late"] += 1
            else:
                self.violations.append(Violation(
                    "genuine-request-taken", f"merchant order {request.merchant_order_no}",
                    f"refused {error.reason}: {error.message}"))
            return
        except DuplicateSuspected:
            # the cashier shows "an order of this amount exists, pay anyway?"; the user
            # confirms (a different pump, a second car), and the terminal submits again
            self.counts["duplicate_warning"] += 1
            self._submit(replace(request, confirm_duplicate=True))
            return
        except PaymentError as error:
            self.counts[f"submit_refused:{error.code}"] += 1
            if isinstance(error, RiskBlocked):
                self.risk_blocked.add(request.merchant_order_no)
            return
        key = (request.merchant_order_no, request.attempt)
        first = self.receipts.setdefault(key, receipt)
        if first is receipt and receipt.needs_verification and self.step_ups is not None:
            self.step_ups.stepped_up(receipt.order_id, request.merchant_order_no)
        if first != receipt:
            self.violations.append(Violation(
                "duplicate-submit-same-receipt", f"key {key}", f"{first} != {receipt}"))
        if first is receipt and self.deliberate is not None and (
            self.signed is None or not self.signed.takes(request)  # its queries name attempt 1
        ):
            self.deliberate.submitted(request, receipt)
        if not self.quiet and self.rng.random() < self.mix.user_close:
            self.counts["user_close"] += 1
            delay = self.rng.randint(0, self.mix.pay_window_ms)
            self._at(self.world.now_ms() + delay, lambda: self._close(receipt.order_id))
        if first is receipt and not self.quiet and self.mix.late_close and (
            self.late_rng.random() < self.mix.late_close
        ):
            self._schedule_late_closes(receipt.order_id)
        if first is receipt and not self.quiet and self.rng.random() < REFUND_SHARE:
            self._schedule_refunds(receipt.order_id, request.total_minor)
        if first is receipt and not self.quiet and request.attempt < SIM_ATTEMPTS_MAX and (
            self.attempt_rng.random() < PAY_AGAIN_SHARE
        ):
            at = self.world.now_ms() + self.attempt_rng.randint(0, 2 * self.mix.pay_window_ms)
            self._at(at, functools.partial(self._pay_again, request))
        if first is receipt and request.cash is not None and (
            self.rng.random() < self.mix.forgeries
        ):
            for _ in range(self.rng.randint(1, 3)):
                at = self.world.now_ms() + self.rng.randint(0, 2 * self.mix.pay_window_ms + 3_000)
                self._at(at, functools.partial(self._forge, receipt,
                                               request.cash.amount_minor))

    def _pay_again(self, request: PaymentRequest) -> None:
        """The terminal pays the trade again (the next attempt, maybe with the other wallet):
        refused (``attempt_refused``) while the last attempt may still succeed."""
        if self.quiet:
            return
        self.counts["pay_again"] += 1
        cash = request.cash
        if cash is not None:
            wallet = self.attempt_rng.choice(["wechat", "alipay", "qr"])
            cash = replace(cash, channel=wallet)
        self._submit(replace(request, attempt=request.attempt + 1, cash=cash))

    def _order_exists(self, request: PaymentRequest) -> bool:
        engine = self.engine
        if engine is None:
            return False
        try:
            engine.find_order(request.merchant_id, request.merchant_order_no)
        except PaymentError:
            return False
        return True

    def _schedule_refunds(self, order_id: str, total_minor: int) -> None:
        """The merchant refunds some paid orders: whole, in parts, twice, several at once.

        Amounts are drawn so that some requests ask for more than is left (they must be
        refused); some reuse a refund number (the same refund must come back).
        """
        base = self.world.now_ms() + self.mix.pay_window_ms + self.rng.randint(200, 3_000)
        for _ in range(self.rng.randint(1, 3)):
            amount = self.rng.choice([total_minor, total_minor // 2, self.rng.randint(1, total_minor)])
            refund_no = f"rf-{self.rng.randint(1, 2)}"
            at = base + self.rng.choice([0, 0, self.rng.randint(1, 500)])
            self._at(at, functools.partial(self._refund, order_id, refund_no, max(amount, 1)))

    def _refund(self, order_id: str, refund_no: str, amount_minor: int) -> None:
        engine = self.engine
        if engine is None or self.quiet:
            return
        self.counts["merchant_refund"] += 1
        try:
            engine.refund(order_id, refund_no, amount_minor)
        except PaymentError as error:
            self.counts[f"refund_refused:{error.code}"] += 1
        except ActorBroken:
            self.counts["refund_refused:actor_broken"] += 1  # a violation, noted at the end

    def _forge(self, receipt: Receipt, amount_minor: int) -> None:
        """The forger strikes at this order (fault ``forged-notification``), through the
        channel its cash leg is on (the one routing chose, for a method)."""
        engine = self.engine
        if engine is None or self.quiet:
            return
        with contextlib.suppress(PaymentError):
            order = engine.get_order(receipt.order_id)
            channel = order.legs[0].channel
            assert channel is not None, "only orders with a cash part are forged at"
            self.forger.strike(engine, channel, receipt.payment_serial, amount_minor,
                               [r.refund_id for r in order.refunds])

    def _close(self, order_id: str) -> None:
        if self.engine is not None:
            with contextlib.suppress(PaymentError):
                self.engine.request_close(order_id)

    def _schedule_late_closes(self, order_id: str) -> None:
        """The user closes the order late (fault ``late-close``): at the end of its pay
        window (racing the timeout close), after it (the order closed, or paid: the close is
        refused), while the user pays late (racing the late payment, which must then be
        refunded), and sometimes twice (the second finds it closed already)."""
        rng, window = self.late_rng, self.mix.pay_window_ms
        at = self.world.now_ms() + rng.choice([
            rng.randint(max(0, window - 50), window + 50),
            rng.randint(window, window + 3_000),
            rng.randint(2_000, 6_000),  # the channel's late payments come then
        ])
        self._at(at, functools.partial(self._late_close, order_id))
        if rng.random() < 0.3:
            self._at(at + rng.randint(0, 500), functools.partial(self._late_close, order_id))

    def _late_close(self, order_id: str) -> None:
        """A user close that waits for its answer (``Engine.close``): closed (or already
        failed), or ``IllegalTransition`` for an order already paid."""
        engine = self.engine
        if engine is None or self.quiet:
            return
        self.counts["late_close"] += 1
        try:
            view = engine.close(order_id)
        except IllegalTransition:
            self.counts["late_close_refused_paid"] += 1
            self.close_refused.add(order_id)
            return
        except (PaymentError, ActorBroken) as error:
            self.counts[f"late_close_error:{getattr(error, 'code', 'actor_broken')}"] += 1
            return
        self.counts[f"late_close_{view.state}"] += 1
        if view.state not in ("closed", "failed"):
            self.violations.append(Violation(
                "close-answers-truthfully", f"order {order_id}",
                f"a user close answered {view.state}"))
        else:
            self.closed_by_user.add(order_id)

    def _schedule_workload(self, customers: list[str]) -> int:
        now: int = self.world.now_ms()
        span_ms = max(1_000, self.config.orders * 20)
        faults_end = now + span_ms + self.mix.pay_window_ms + 3_000
        if self.mix.voucher_outage is not None:
            # In the second half of the orders: the first half's Confirms go out into it.
            # The faults last until it is over.
            system, start, length = self.mix.voucher_outage
            start = now + span_ms // 2 + start % (span_ms // 2 + 1)
            self.mix = replace(self.mix, vouchers=replace(
                self.mix.vouchers, outage=(system, start, start + length)))
            faults_end = max(faults_end, start + length)
            if self.deliberate is not None:
                retries_ms = sum(self.policy.voucher_retry_schedule_ms)
                self.deliberate.into_outage(system, start, start + length - retries_ms - 300)
        if self.channel_down is not None:
            share, length = self.channel_down
            start = now + int(share * span_ms)
            self.channel.down = (start, start + length)
            faults_end = max(faults_end, start + length)
        for i in range(self.config.orders):
            request = self._request(i, customers)
            at = now + self.rng.randint(0, span_ms)
            submit: Callable[[], None] = functools.partial(self._submit, request)
            if self.pre_holder is not None:
                request, submit = self.pre_holder.around_order(request, at, self._submit)
            self._at(at, submit)
            if self.rng.random() < self.mix.duplicate_submit:
                self.counts["duplicate_submit"] += 1
                self._at(at + self.rng.randint(0, 5), functools.partial(self._submit, request))
        if self.deliberate is not None:
            self.deliberate.schedule(now, span_ms)
        if self.signed is not None:
            self.signed.schedule(now, span_ms, self.config.orders)
        if self.withholds is not None:
            self.withholds.schedule(now, span_ms, self.config.orders)
        if self.quoter is not None:
            self.quoter.schedule(now, span_ms, self.config.orders, customers)
        self.beneficiaries.schedule(now, span_ms, self.config.orders, customers)
        self.pumps.schedule(now, span_ms, self.config.orders, customers)
        crashes = self.config.crashes if "crash" in self.mix.on else 0
        for _ in range(crashes):
            at = now + self.rng.randint(0, span_ms + self.mix.pay_window_ms)
            if self.scheduler is None or self.rng.random() < 0.5:
                # On threads a BaseException in an actor makes pykka stop every actor in
                # the process, so mid-handler crashes are for the deterministic runtime only.
                self._at(at, self._crash)
            else:
                self._at(at, self._arm_crash_after_commit)
        return faults_end

    # ------------------------------------------------------------------ checks

    def _check_during_run(self) -> None:
        engine = self.engine
        assert engine is not None
        report = check(engine.store, {}, order_ids=[])  # accounts only: cheap
        self.violations += report.violations

    def _final_check(self) -> OracleReport:
        engine = self.engine
        assert engine is not None
        # Every order, loaded once for the three checks that go through them all
        # (the run is over: nothing changes them any more).
        orders = list(engine.store.iter_orders())
        report = check(engine.store, self.channels, now_ms=self.world.now_ms(),
                       all_orders=orders, providers=frozenset({"carrier-x"}))
        report.violations += self.provider_work.check(orders, engine.store)
        report.violations += check_code_tables(self.channels)
        self._note_broken(engine)
        report.violations += check_one_success_per_trade(orders)
        report.violations += check_payments_counted(
            self.probe.counted, {order.order_id: order.state.value for order in orders})
        report.violations += check_beneficiaries(engine.store, orders)
        report.violations += check_authorisations(orders, self.channels, self.pumps.accepted)
        for (key, attempt), receipt in self.receipts.items():
            try:
                found = engine.find_order("station-1", key, attempt)
            except PaymentError:
                report.violations.append(Violation("acknowledged-submit-survives", f"key {key}",
                                                   f"receipt {receipt.order_id} lost"))
                continue
            if found.order_id != receipt.order_id:
                report.violations.append(Violation(
                    "one-order-per-key", f"key {key}",
                    f"receipt {receipt.order_id}, database {found.order_id}"))
        report.violations += check_routes(engine.store, SIM_ROUTES, orders)
        report.violations += check_fallbacks(self.channels, orders)
        report.violations += check_notified(engine.store, set(self.notified.values()),
                                            set(self.merchant.received.values()), ["station-1"],
                                            all_orders=orders)
        for order in orders:
            if not order.is_settled:
                report.violations.append(Violation(
                    "converged-after-quiet-phase", f"order {order.order_id}",
                    f"{order.state.value} with legs "
                    f"{[leg.status.value for leg in order.legs]}"))
            cash = order.cash_leg
            if (cash is not None and cash.status in CASH_UNRESOLVED) or any(
                r.status is RefundStatus.UNKNOWN or (
                    r.status is RefundStatus.FAILED and r.kind is RefundKind.DUPLICATE_CHARGE)
                for r in order.refunds
            ):
                report.violations.append(Violation(
                    "resolved-by-reconciliation", f"order {order.order_id}",
                    f"cash leg {cash and cash.status.value}, refunds "
                    f"{[r.status.value for r in order.refunds]} after the statement"))
        for order_id in sorted(self.close_refused | self.closed_by_user):
            late = engine.store.load_order(order_id)
            state = None if late is None else late.state
            if order_id in self.close_refused and state is OrderState.CLOSED:
                report.violations.append(Violation(
                    "paid-order-never-closed", f"order {order_id}",
                    "a user close was refused as the order was paid, yet it ended closed"))
            if order_id in self.closed_by_user and state is OrderState.SUCCEEDED:
                report.violations.append(Violation(
                    "closed-order-never-paid", f"order {order_id}",
                    "a user close answered closed, yet the order ended succeeded"))
        # orders the gate refused every submit of: no order, as promised (one per key)
        self.counts["orders_blocked_by_risk"] = len(
            self.risk_blocked - {no for no, _ in self.receipts})
        if self.step_ups is not None:
            report.violations += check_step_ups(engine.store, self.channels,
                                                self.step_ups.right_code_sent, all_orders=orders)
        if self.pre_holder is not None:
            violations, counts = check_pre_holds(engine.store, self.pre_holder.plans)
            report.violations += violations
            self.counts.update(counts)
        if self.signed is not None:
            report.violations += self.signed.check(engine)
        if self.withholds is not None:
            report.violations += self.withholds.check(engine.store)
        if self.quoter is not None:
            report.violations += self.quoter.check(engine)
            report.violations += self.quoter.check_shift_reports(engine, orders)
        for forgery in self.forger.acknowledged[:5]:
            report.violations.append(Violation(
                "forged-notification-unacknowledged", forgery,
                "the service acknowledged a notification the engine refused: the wallet "
                "would not send it again"))
        for event_id in self.merchant.bad_signatures[:5]:
            report.violations.append(Violation(
                "notification-signed", f"event {event_id}", "the signature did not verify"))
        return report

    # ------------------------------------------------------------------ the run

    def run(self) -> SimResult:
        started = time.monotonic()
        try:
            final, traces = self._run_phases()
        except Exception as error:  # a deadlock, a step limit, an engine bug: this seed fails
            self.violations.append(Violation("run-completes", f"seed {self.config.seed}",
                                             repr(error)[:1_000]))
            final, traces = {}, {}
            if self.engine is not None:
                self.engine.abandon()
        finally:
            if isinstance(self.world, ThreadRuntime):
                self.world.shutdown()
            if self.config.db_dir is None:
                shutil.rmtree(self._tmp, ignore_errors=True)
        return self._result(started, final, traces)

    def _run_phases(self) -> tuple[dict[str, int], dict[str, list[str]]]:
        """Workload with faults, quiet phase, statement, final check: the final states and
        the traces of the orders the first violations name."""
        self._open()
        sampler = None
        if self.scheduler is not None:  # between two steps: reads only, draws nothing
            sampler = AttentionSampler(lambda: self.engine, self.world.now_ms)
            self.scheduler.on_step = sampler
        customers = self._setup()
        quiet_at = self._schedule_workload(customers)
        self._at(quiet_at, self._start_quiet_phase)
        self._drive(quiet_at)
        quiet_deadline_ms = quiet_at + QUIET_PHASE_MAX_MS
        looped: list[Violation] = []
        while True:
            if self.engine is None:
                self._open()
            self._flush_pending()
            self._drive(None, deadline_ms=quiet_deadline_ms)
            if self.world.now_ms() > quiet_deadline_ms:
                looped.append(Violation(
                    "quiet-phase-ends", f"seed {self.config.seed}",
                    f"work still scheduled {QUIET_PHASE_MAX_MS // 1000} virtual seconds "
                    "after the faults stopped: a retry or timer loop"))
                if self.engine is None:
                    self._open()
                break
            if self.engine is not None and not self.pending_submits:
                break
        assert self.engine is not None
        before_statement = check_wallet_notices(self.engine.store, self.channels)
        self._reconcile(quiet_deadline_ms)
        report = self._final_check()
        report.violations += before_statement
        if sampler is not None:
            assert self.scheduler is not None and self.engine is not None
            self.scheduler.on_step = None
            report.violations += sampler.violations or check_attention(
                self.engine, self.world.now_ms())
            self.counts["attention_samples"] += sampler.samples
        # What the final check names (an order, with its journal) goes first: a loop is
        # often its consequence, e.g. a hold kept for a Confirm that is never sent again.
        self.violations += report.violations + looped
        engine = self.engine
        assert engine is not None
        final = engine.store.count_orders_by_state()
        traces = self._traces(engine)
        if self.config.record_series:
            self.series = series_of(engine.store, self.probe, self.start_ms,
                                    self.world.now_ms())
        engine.shutdown()
        return final, traces

    def _result(self, started: float, final: dict[str, int], traces: dict[str, list[str]]
                ) -> SimResult:
        merchant = Counter({"merchant_refused": self.merchant.refused,
                            "notification_duplicated_at_merchant": self.merchant.duplicates})
        faults = dict(Counter(self.channel.counts) + Counter(self.alipay.counts) + self.counts
                      + Counter(self.link_counts) + Counter(self.forged_counts) + merchant)
        start = self.scheduler.start_ms if self.scheduler else 0
        virtual = (self.world.now_ms() - start) / 1000 if self.scheduler else 0.0
        return SimResult(
            seed=self.config.seed, orders=self.config.orders,
            trace_hash=self.scheduler.trace_hash if self.scheduler else "",
            violations=self.violations, final_states=final, faults=dict(sorted(faults.items())),
            crashes=self.crashes_done, virtual_seconds=virtual,
            wall_seconds=time.monotonic() - started, runtime=self.config.runtime,
            plant_bug=self.config.plant_bug, fault_mix=sorted(self.mix.on), traces=traces,
            series=self.series)

    def _reconcile(self, deadline_ms: int) -> None:
        """The quiet phase ends with the channel's statement, as a day ends with its file.

        The statement is the channel's ground truth, so every line must be understood: a
        flagged verdict other than a second charge (which the engine refunds) is a violation.
        Then time runs on until the refunds it started are done.
        """
        engine = self.engine
        assert engine is not None
        start = self.scheduler.start_ms if self.scheduler else 0
        for name, channel in self.channels.items():
            report = engine.reconcile(statement_from_channel(channel), period_start_ms=start,
                                      period_end_ms=self.world.now_ms(), channels=[name])
            self.counts["statement_lines"] += report.lines
            for entry in report.entries:
                if entry.verdict in FLAGGED and entry.verdict is not Verdict.DUPLICATE_CHARGE:
                    self.violations.append(Violation(
                        "statement-understood", f"order {entry.order_id or entry.out_trade_no}",
                        f"{entry.verdict.value}: {entry.detail}"))
        self._drive(None, deadline_ms=deadline_ms)

    def _flush_pending(self) -> None:
        retry, self.pending_submits = self.pending_submits, []
        for request in retry:
            self._submit(request)

    def _start_quiet_phase(self) -> None:
        """Faults off; from here time runs on until nothing is left to do."""
        self.quiet = True
        self.provider_work.quiet()
        for channel in self.channels.values():
            channel.faults = ChannelFaults.none()
        if self.engine is not None:
            self.engine.store.after_commit = None

    def _drive(self, until_ms: int | None, deadline_ms: int | None = None) -> None:
        """Run to ``until_ms``, or (None) until idle but never past ``deadline_ms``."""
        if self.scheduler is not None:
            self._drive_sim(until_ms, deadline_ms)
        else:
            self._drive_threads(until_ms)

    def _drive_sim(self, until_ms: int | None, deadline_ms: int | None) -> None:
        sched = self.scheduler
        assert sched is not None
        while True:
            try:
                if until_ms is None:
                    sched.run_until(lambda: False, deadline_ms=deadline_ms)
                else:
                    sched.run_until(lambda: sched.now_ms >= until_ms)
                return
            except SimulatedCrash:
                self._crash()

    def _drive_threads(self, until_ms: int | None) -> None:
        deadline = time.monotonic() + 120
        if until_ms is not None:
            while self.world.now_ms() < until_ms and time.monotonic() < deadline:
                time.sleep(0.02)
            return
        while time.monotonic() < deadline:
            engine = self.engine
            if engine is not None and not self.pending_submits and engine.unsettled_count() == 0 \
                    and not any(a.held for a in engine.store.all_accounts()) \
                    and engine.notifications.caught_up() \
                    and not any(w.sending() for w in self.channels.values()):
                return
            time.sleep(0.05)

    def _traces(self, engine: Engine) -> dict[str, list[str]]:
        """The journal of every order a violation names, for the report."""
        traces: dict[str, list[str]] = {}
        for violation in self.violations[:5]:
            if violation.subject.startswith("order "):
                order_id = violation.subject.split(" ", 1)[1]
                traces[order_id] = [
                    f"{e.at_ms} {e.part} {e.from_state or '-'} -> {e.to_state} ({e.cause})"
                    for e in engine.journal(order_id)]
        return traces


def run(config: SimConfig) -> SimResult:
    """Run one simulation and return its result."""
    return Simulation(config).run()


JOBS_MAX = 64
"""Worker processes ``run_many`` starts at most (each holds an engine and its database)."""


def run_many(configs: Iterable[SimConfig], *, jobs: int = 1) -> Iterator[SimResult]:
    """Run simulations ``jobs`` at a time in worker processes; yield results in input order.

    Runs share nothing (each has its own database, scheduler and seed), so running them side
    by side changes no trace hash: it only puts every core to work, as a sweep of seeds
    should. One process runs one simulation at a time, on one thread (the GIL would make
    threads useless). At most ``2 * jobs`` runs are submitted ahead of the result being
    yielded, so a sweep of 100,000 seeds holds a few configs, not all of them. A caller that
    stops early (or fails) has the workers killed, runs in progress included: nobody will
    read them. With ``jobs == 1`` the runs happen in this process, one after the other.

    Workers are spawned, not forked: a fork would copy whatever threads and locks the caller
    holds (an embedding server's, or a previous run's).
    """
    assert 1 <= jobs <= JOBS_MAX, f"jobs must be 1..{JOBS_MAX}, got {jobs}"
    if jobs == 1:
        for config in configs:
            yield run(config)
        return
    pool = multiprocessing.get_context("spawn").Pool(processes=jobs)
    finished = False
    try:
        todo = iter(configs)
        ahead: deque[AsyncResult[SimResult]] = deque(
            pool.apply_async(run, (config,)) for config in itertools.islice(todo, 2 * jobs))
        while ahead:
            result = ahead.popleft().get()
            for config in itertools.islice(todo, 1):
                ahead.append(pool.apply_async(run, (config,)))
            yield result
        finished = True
    finally:
        if finished:
            pool.close()
        else:
            pool.terminate()
        pool.join()
