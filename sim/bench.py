"""``payengine bench``: the real engine, on threads and a SQLite file, measured and printed.

A combined payment (cash through an instant channel, a red packet and points held at
submit) is submitted by client threads, closed loop (as fast as the engine takes them) or
open loop (paced at ``--rate`` payments per second, so latency is measured at a load, not
at saturation). A payment counts when a subscriber hears it ``succeeded``. Printed: payments
per second, submit→receipt and submit→settled p50/p99, SQLite commits, write statements and
rows per payment (counted on the engine's writer connection), peak threads and RSS.

Figures are printed, never asserted: the machine is shared and noisy; compare runs made
side by side (``../shared/bench/peers/`` for the ratio to hand-written SQL).
"""

from __future__ import annotations

import json
import resource
import sqlite3
import tempfile
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from payengine.actors.channel import ChannelNotification, ChannelReply, SignedJsonNotifications
from payengine.actors.engine import Engine
from payengine.engine.channel_data import PayDetails
from payengine.engine.codes import WECHAT_LIKE_PAY_CODES, WECHAT_LIKE_REFUND_CODES
from payengine.engine.errors import Overloaded
from payengine.engine.order import CashPart, PaymentRequest, VoucherPart
from payengine.persistence.outbox import ORDER_STATE_CHANGED, OutboxEvent
from payengine.sim.progress import Progress

USERS = 50
_CLOSED_LOOP_BACKOFF_S = 0.002
_CLOSED_LOOP_BACKOFF_MAX_S = 0.064
"""A closed-loop client refused ``Overloaded`` waits 2 ms before asking again, doubling up to
64 ms while it is refused, as a till would (a client retrying at once only steals the CPU
the engine needs to catch up)."""
_CLOSED_LOOP_REFUSED_MAX_S = 30.0
"""A closed-loop client refused for this long gives its payment up (counted refused): an
engine that refuses every submit shows as a failed run, not as a benchmark that hangs."""
PAYMENTS_MAX = 1_000_000


class InstantChannel:
    """A wallet that charges at once, in the synchronous reply: the engine is what is timed."""

    name = "wechat"
    pay_codes = WECHAT_LIKE_PAY_CODES
    refund_codes = WECHAT_LIKE_REFUND_CODES
    notifications = SignedJsonNotifications(b"payengine-bench-channel-key")

    def pay(self, payment_serial: str, amount_minor: int, currency: str, title: str,
            details: PayDetails | None = None) -> ChannelReply:
        return ChannelReply("SUCCESS", "SUCCESS", f"T-{payment_serial}", amount_minor)

    def query(self, payment_serial: str) -> ChannelReply:
        return ChannelReply("SUCCESS", "SUCCESS", f"T-{payment_serial}")

    def query_charge(self, payment_serial: str, channel_txn_id: str) -> ChannelReply:
        return ChannelReply("SUCCESS", "ORDERNOTEXIST")

    def close(self, payment_serial: str) -> ChannelReply:
        return ChannelReply("SUCCESS", "CLOSED")

    def refund(self, payment_serial: str, refund_id: str, amount_minor: int, currency: str
               ) -> ChannelReply:
        return ChannelReply("SUCCESS", "SUCCESS")

    def query_refund(self, payment_serial: str, refund_id: str) -> ChannelReply:
        return ChannelReply("SUCCESS", "SUCCESS")

    def verify_notification(self, body: bytes, headers: Mapping[str, str]
                            ) -> ChannelNotification:
        return self.notifications.verify(body, headers)


@dataclass(frozen=True)
class BenchResult:
    payments: int
    settled: int
    synchronous: str
    workers: int
    offered_per_s: float | None
    """``None``: closed loop (as fast as the engine takes them)."""
    wall_s: float
    payments_per_s: float
    receipt_p50_ms: float
    receipt_p99_ms: float
    settled_p50_ms: float
    settled_p99_ms: float
    commits_per_payment: float
    write_statements_per_payment: float
    rows_per_payment: float
    peak_threads: int
    max_rss_mib: float
    refused: int = 0
    """Submits refused ``Overloaded`` (admission): nothing was created for them. Closed
    loop, each was asked again after a moment; open loop, that payment was shed."""
    refused_p99_ms: float = float("nan")
    """How long a refused submit took to be told."""

    def render(self) -> str:
        load = ("closed loop" if self.offered_per_s is None
                else f"{self.offered_per_s:,.0f}/s offered")
        refused = ([f"  refused           {self.refused} submits Overloaded, told in p99 "
                    f"{self.refused_p99_ms:.1f} ms"] if self.refused else [])
        return "\n".join([
            f"payengine bench: {self.settled}/{self.payments} combined payments settled, "
            f"{load}, {self.workers} client threads, synchronous={self.synchronous}",
            f"  throughput        {self.payments_per_s:10,.0f} payments/s "
            f"({self.wall_s:.1f} s wall)",
            f"  submit->receipt   p50 {self.receipt_p50_ms:8.1f} ms   "
            f"p99 {self.receipt_p99_ms:8.1f} ms",
            f"  submit->settled   p50 {self.settled_p50_ms:8.1f} ms   "
            f"p99 {self.settled_p99_ms:8.1f} ms",
            f"  per payment       {self.commits_per_payment:.1f} commits, "
            f"{self.write_statements_per_payment:.1f} write statements, "
            f"{self.rows_per_payment:.1f} rows",
            *refused,
            f"  peak threads {self.peak_threads}, max RSS {self.max_rss_mib:,.0f} MiB",
        ])

    def as_json(self) -> str:
        return json.dumps(asdict(self))


def _percentile(values: list[float], fraction: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


class _WriterCounter:
    """Counts what the engine's writer connection executes (SQLite's trace callback)."""

    def __init__(self) -> None:
        self.statements = 0
        self.commits = 0

    def __call__(self, sql: str) -> None:
        head = sql.lstrip()[:6].upper()
        if head == "COMMIT":
            self.commits += 1
        elif head not in ("BEGIN ", "SAVEPO", "RELEAS", "PRAGMA", "SELECT"):
            self.statements += 1


def _request(i: int) -> PaymentRequest:
    user = i % USERS
    return PaymentRequest("station-1", f"bench-{i}", f"u{user}", "CNY", 10_000 + i, "Fuel",
                          CashPart(9_700 + i, "wechat"),
                          (VoucherPart(f"rp{user}", 100), VoucherPart(f"pts{user}", 20)))


def run_bench(payments: int = 1_000, *, workers: int = 8, rate_per_s: float | None = None,
              synchronous: str = "FULL", progress: bool = False,
              settle_timeout_s: float = 600.0) -> BenchResult:
    """Run one measurement on a fresh temporary database and return its figures."""
    assert 0 < payments <= PAYMENTS_MAX and 0 < workers <= 256
    assert rate_per_s is None or rate_per_s > 0
    submitted_at: dict[str, float] = {}
    settled_at: dict[str, float] = {}
    lock = threading.Lock()

    def subscriber(event: OutboxEvent) -> None:
        if event.event_type == ORDER_STATE_CHANGED and event.to_state == "succeeded":
            with lock:
                settled_at.setdefault(event.order_id, time.perf_counter())

    with tempfile.TemporaryDirectory(prefix="payengine-bench-") as tmp:
        engine = Engine.open(Path(tmp) / "bench.db", channels=[InstantChannel()],
                             synchronous=synchronous, subscribers={"bench": subscriber})
        try:
            for k in range(USERS):
                for name, unit, rate in (("rp", "CNY", None), ("pts", "POINTS", 10)):
                    engine.open_account(f"{name}{k}", unit, minor_per_unit=rate)
                    engine.fund(f"{name}{k}", 10**12, funding_id=f"{name}{k}")
            counter = _WriterCounter()
            # The writer connection is touched only inside a change (the group commit's
            # exclusive turn): set_trace_callback and total_changes hold the GIL while they
            # wait for SQLite's connection mutex, and a writer stepping with the callback
            # installed holds that mutex while it waits for the GIL: a deadlock otherwise.
            with engine.store._tx(0) as conn:
                conn.set_trace_callback(counter)
                rows_before = conn.total_changes
            receipts_ms: list[float] = []
            refused_ms: list[float] = []
            shed = [0]  # refusals a closed-loop client retried (not lost payments)
            peak_threads = threading.active_count()
            started = time.perf_counter()

            def submit(i: int) -> None:
                if rate_per_s is not None:  # open loop: the i-th payment is due at i / rate
                    delay = started + i / rate_per_s - time.perf_counter()
                    if delay > 0:
                        time.sleep(delay)
                backoff_s = _CLOSED_LOOP_BACKOFF_S
                first_try = time.perf_counter()
                while True:
                    at = time.perf_counter()
                    try:
                        receipt = engine.submit(_request(i))
                        break
                    except Overloaded:
                        with lock:
                            refused_ms.append((time.perf_counter() - at) * 1000)
                        if rate_per_s is not None or (
                            at - first_try > _CLOSED_LOOP_REFUSED_MAX_S
                        ):
                            return  # open loop: the load above capacity is shed
                        shed[0] += 1  # closed loop: back off (doubling) and ask again
                        time.sleep(backoff_s)
                        backoff_s = min(2 * backoff_s, _CLOSED_LOOP_BACKOFF_MAX_S)
                done = time.perf_counter()
                with lock:
                    submitted_at[receipt.order_id] = at
                    receipts_ms.append((done - at) * 1000)

            bar = Progress("submitted", payments, progress)
            with ThreadPoolExecutor(max_workers=workers) as pool:
                for n, _ in enumerate(pool.map(submit, range(payments)), start=1):
                    bar.show(n)
            bar.finish()
            deadline = time.perf_counter() + settle_timeout_s
            accepted = payments - len(refused_ms) + shed[0]
            while len(settled_at) < accepted and time.perf_counter() < deadline:
                peak_threads = max(peak_threads, threading.active_count())
                time.sleep(0.005)
            wall = max(settled_at.values(), default=time.perf_counter()) - started
            with engine.store._tx(0) as conn:
                conn.set_trace_callback(None)
                rows = conn.total_changes - rows_before
        finally:
            engine.shutdown()
    to_settle = [(settled_at[o] - at) * 1000 for o, at in submitted_at.items() if o in settled_at]
    count = len(settled_at)
    return BenchResult(
        payments=payments, settled=count, synchronous=synchronous, workers=workers,
        offered_per_s=rate_per_s, wall_s=wall, payments_per_s=count / wall if wall > 0 else 0.0,
        receipt_p50_ms=_percentile(receipts_ms, 0.5),
        receipt_p99_ms=_percentile(receipts_ms, 0.99),
        settled_p50_ms=_percentile(to_settle, 0.5), settled_p99_ms=_percentile(to_settle, 0.99),
        commits_per_payment=counter.commits / max(accepted, 1),
        write_statements_per_payment=counter.statements / max(accepted, 1),
        rows_per_payment=rows / max(accepted, 1), peak_threads=peak_threads,
        max_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        refused=len(refused_ms), refused_p99_ms=_percentile(refused_ms, 0.99))


@dataclass(frozen=True)
class OverloadResult:
    capacity: BenchResult
    """Closed loop: what the engine takes when clients wait for each receipt."""
    overloaded: BenchResult
    """Twice that offered, paced (open loop), from 64 client threads."""

    @property
    def completion_share(self) -> float:
        """Completions per second at twice the capacity offered, over the capacity."""
        capacity = self.capacity.payments_per_s
        return self.overloaded.payments_per_s / capacity if capacity else float("nan")

    def render(self) -> str:
        return "\n".join([
            self.capacity.render(), "", self.overloaded.render(), "",
            f"at 2x capacity offered: completions {100 * self.completion_share:.0f}% of "
            f"capacity, {self.overloaded.refused} submits refused (told in p99 "
            f"{self.overloaded.refused_p99_ms:.1f} ms)",
        ])

    def as_json(self) -> str:
        return json.dumps({"capacity": asdict(self.capacity),
                           "overloaded": asdict(self.overloaded),
                           "completion_share": self.completion_share})


def run_overload(payments: int = 1_000, *, synchronous: str = "FULL",
                 progress: bool = False) -> OverloadResult:
    """Measure capacity closed loop, then offer twice it for as long (open loop)."""
    capacity = run_bench(payments, workers=8, synchronous=synchronous, progress=progress)
    offered = 2 * max(capacity.payments_per_s, 1.0)
    overloaded = run_bench(min(2 * payments, PAYMENTS_MAX), workers=64, rate_per_s=offered,
                           synchronous=synchronous, progress=progress)
    return OverloadResult(capacity, overloaded)


class SilentChannel(InstantChannel):
    """A wallet whose users never pay: every order stays open (``paying``)."""

    def pay(self, payment_serial: str, amount_minor: int, currency: str, title: str,
            details: PayDetails | None = None) -> ChannelReply:
        return ChannelReply("SUCCESS", "USERPAYING")

    def query(self, payment_serial: str) -> ChannelReply:
        return ChannelReply("SUCCESS", "USERPAYING")


@dataclass(frozen=True)
class OpenOrdersResult:
    open_orders: int
    accepted: int
    """Submits taken: the others met the live-order bound (``Overloaded``); one refused
    because the engine was behind is retried."""
    submit_s: float
    threads: int
    rss_mib: float
    """Resident memory with every order open (now, not the peak)."""
    bytes_per_open_order: float
    """What the open orders added to the resident memory, per order: its actor, state,
    timers and directory entry (and the SQLite pages and allocator slack they brought)."""
    reopen_s: float
    """``Engine.open`` of the file with every order unsettled, until every order's
    activation was handled (``Engine.resuming() == 0``)."""
    reopen_returned_s: float
    """Until ``Engine.open`` returned: the resume goes on, paced, after it."""
    reopen_threads: int
    max_rss_mib: float

    def render(self) -> str:
        return "\n".join([
            f"payengine bench --open-orders {self.open_orders}: {self.accepted} accepted in "
            f"{self.submit_s:.1f} s",
            f"  with them open: {self.threads} threads, RSS {self.rss_mib:,.0f} MiB "
            f"({self.bytes_per_open_order:,.0f} bytes per open order)",
            f"  reopen with {self.accepted} unsettled: {self.reopen_s:.1f} s to resume them all "
            f"(open returned after {self.reopen_returned_s:.1f} s), {self.reopen_threads} "
            "threads",
            f"  max RSS {self.max_rss_mib:,.0f} MiB",
        ])

    def as_json(self) -> str:
        return json.dumps(asdict(self))


def _rss_mib() -> float:
    """The process's resident memory now (Linux ``/proc``; the peak elsewhere)."""
    try:
        with open("/proc/self/statm") as statm:
            pages = int(statm.read().split()[1])
        return pages * resource.getpagesize() / 2**20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _wait_until_quiet(engine: Engine, quiet_s: float = 1.0, timeout_s: float = 600.0) -> None:
    """Wait until the engine's writer has committed nothing for ``quiet_s``: the orders took
    their holds and called the channel. (Measured before this, a reopen also finished the
    work the first engine had queued, and timed that.)"""
    conn: sqlite3.Connection = engine.store._conn
    deadline = time.perf_counter() + timeout_s
    changes, quiet_since = conn.total_changes, time.perf_counter()
    while time.perf_counter() < deadline and time.perf_counter() - quiet_since < quiet_s:
        time.sleep(0.05)
        if conn.total_changes != changes:
            changes, quiet_since = conn.total_changes, time.perf_counter()


def run_open_orders(open_orders: int, *, workers: int = 8) -> OpenOrdersResult:
    """Hold ``open_orders`` payments open (their users never pay), then measure the
    process's threads and RSS, shut down, and time the reopen that resumes them all."""
    import gc

    from payengine.engine.errors import Overloaded
    from payengine.engine.order import OrderPolicy

    assert 0 < open_orders <= PAYMENTS_MAX
    policy = OrderPolicy(pay_window_ms=24 * 60 * 60 * 1000,
                         query_schedule_ms=(24 * 60 * 60 * 1000,))  # nothing fires meanwhile
    accepted = 0
    lock = threading.Lock()
    with tempfile.TemporaryDirectory(prefix="payengine-bench-") as tmp:
        path = Path(tmp) / "open.db"
        engine = Engine.open(path, channels=[SilentChannel()], policy=policy,
                             synchronous="NORMAL")
        try:
            for k in range(USERS):
                for name, unit, rate in (("rp", "CNY", None), ("pts", "POINTS", 10)):
                    engine.open_account(f"{name}{k}", unit, minor_per_unit=rate)
                    engine.fund(f"{name}{k}", 10**12, funding_id=f"{name}{k}")
            gc.collect()
            rss_before = _rss_mib()
            started = time.perf_counter()

            def submit(i: int) -> None:
                nonlocal accepted
                while True:
                    try:
                        engine.submit(_request(i))
                        break
                    except Overloaded as refused:
                        # Admission refuses while the actors or the writer are behind (the
                        # orders already taken come first): wait and retry, as a client would
                        # (idempotent). Only the live-order bound ends the filling.
                        if "orders in flight" in str(refused):
                            return
                        time.sleep(0.002)
                with lock:
                    accepted += 1

            with ThreadPoolExecutor(max_workers=workers) as pool:
                list(pool.map(submit, range(open_orders)))
            submit_s = time.perf_counter() - started
            _wait_until_quiet(engine)  # every order holding its vouchers, its user paying
            gc.collect()
            threads = threading.active_count()
            rss = _rss_mib()
        finally:
            engine.shutdown()
        started = time.perf_counter()
        reopened = Engine.open(path, channels=[SilentChannel()], policy=policy,
                               synchronous="NORMAL")
        try:
            returned_s = time.perf_counter() - started
            while reopened.resuming():
                time.sleep(0.005)
            reopen_s = time.perf_counter() - started
            reopen_threads = threading.active_count()
        finally:
            reopened.shutdown()
    return OpenOrdersResult(
        open_orders, accepted, submit_s, threads, rss,
        (rss - rss_before) * 2**20 / max(1, accepted), reopen_s, returned_s, reopen_threads,
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
