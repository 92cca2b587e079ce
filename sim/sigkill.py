"""Real SIGKILLs of a real engine process: nothing the engine acknowledged may be lost.

The promise checked: anything the engine acknowledged (a receipt returned by ``submit``, a
refund accepted, a top-up or a pre-hold answered) is durable, and is carried to a correct
end after a crash; money is conserved. ``abandon()`` (tests/test_crash_recovery.py) only
simulates a crash inside one process; here the process really dies, at a random moment,
in whatever state its threads, SQLite's WAL and the page cache are, so the window between
a commit's write and its fsync is sampled too (it is inside SQLite, under load).

Two roles, one module:

- the **child** (``python -m payengine.sim.sigkill child --db FILE --wallet FILE ...``)
  opens the engine on the file, opens and funds the voucher accounts (idempotent on a
  reopen), then submits combined payments (cash + vouchers, some with a user's pre-hold)
  from several threads and refunds some that succeeded, and after each acknowledgement
  writes one JSON line to stdout (``{"ack": "submit", ...}``), unbuffered. It runs until it
  is killed (or, bounded, ``--max-run-s``).
- the **parent** (``python -m payengine.sim.sigkill run --kills 200``) starts the child on the
  same files again and again, lets it run for a seeded random 50-600 ms after it is ready
  (one start in six is instead killed 0-150 ms after it began opening: a kill during
  recovery), ``SIGKILL``s it, and records every acknowledgement it printed. After the last
  kill it opens the engine in-process, lets every order settle, and checks (``check_database``).

The cash channel is ``DurableWallet``: a simulated wallet whose records live in its own
SQLite file (the wallet's server, which a POS crash does not touch). It is deterministic
and idempotent by payment serial and refund id, answers "processing" to a third of the
payments (the user pays by the first status query), and is the ground truth the money
oracle (``sim.oracle``) compares each order's cash with.

``synchronous=FULL`` is the default. ``--synchronous NORMAL`` shows the difference: in WAL
mode NORMAL does not fsync at each commit, so a *power loss* may drop the last commits, but
a *process kill* never does (the commit is in the OS's page cache, which survives the
process): this harness must pass with both, and cannot tell them apart.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import zlib
from collections import Counter, deque
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from payengine.actors.base import EngineConfig
from payengine.actors.channel import ChannelNotification, ChannelReply, SignedJsonNotifications
from payengine.actors.engine import Engine
from payengine.engine.channel_data import PayDetails
from payengine.engine.codes import WECHAT_LIKE_PAY_CODES, WECHAT_LIKE_REFUND_CODES
from payengine.engine.errors import PaymentError, UnknownHold, UnknownOrder
from payengine.engine.order import (
    CashPart,
    LegMode,
    OrderPolicy,
    OrderState,
    PartStatus,
    PaymentRequest,
    RefundKind,
    VoucherPart,
)
from payengine.sim.oracle import Violation, check

MERCHANT_ID = "station-1"
CHANNEL_NAME = "wechat"
USERS = 6
FUNDED_PLENTY = 10**9
"""What each user's accounts are funded with: never short, whatever the run's length."""
TINY_ACCOUNT = "tiny/pts"
TINY_FUNDED_POINTS = 400
"""A shared points account funded for 20 orders only: later orders naming it fail at their
hold, so failed orders (holds released, nothing spent) are exercised too."""
POINTS_MINOR_PER_UNIT = 10
SUBMIT_THREADS = 4
RESUBMIT_WINDOW = 2 * SUBMIT_THREADS + 4
"""A child starts this many order numbers below the highest acknowledged one: the POS
retries submits it was never answered (and some it was), which must get the same receipt."""
PRE_HOLD_TTL_MS = 2_000
"""Short, so a pre-hold acknowledged just before a kill, whose order was never submitted,
expires during the final settling."""
KILLS_MAX = 100_000
CHILD_READY_TIMEOUT_S = 60.0
CHILD_EXIT_TIMEOUT_S = 30.0
SETTLE_TIMEOUT_S = 120.0

POLICY = OrderPolicy(
    pay_window_ms=30 * 60 * 1000,  # no order times out during a run: every one can succeed
    query_schedule_ms=(50, 100, 200, 400, 800, 1_600, 3_200, 6_400),
    refund_query_schedule_ms=(50, 100, 200, 400, 800, 1_600, 3_200, 6_400),
)
CONFIG = EngineConfig(ask_timeout_s=10.0, duplicate_guard_window_ms=0,
                      pre_hold_ttl_ms=PRE_HOLD_TTL_MS)
EXPECTED_CHILD_ERRORS = frozenset({"refund:illegal_transition", "pre_hold:hold_refused",
                                   *(f"{op}:overloaded" for op in ("submit", "refund",
                                                                   "pre_hold", "fund"))})
"""Refusals (``op:code``) a child may meet in a healthy engine: a refund asked while its
order still confirms its vouchers; ``Overloaded`` for any call (admission above capacity,
the live-order bound, or an actor that did not answer within the ask timeout on a loaded
machine: retryable, nothing done); a pre-hold asked again (same hold id) by the next child
after it expired (TTL 2 s; a restart under load can take longer), which the engine refuses
as a Try after its expiry. Any other is reported as a violation."""

# ---------------------------------------------------------------------------- the wallet


class DurableWallet:
    """A WeChat-Pay-like wallet whose records survive the POS process (its own SQLite file).

    Deterministic and idempotent: a serial is charged at most once, a refund id gives back
    at most once; a third of the serials (by a hash) answer ``USERPAYING`` to ``pay`` and are
    charged when first queried (the user paid meanwhile). Thread-safe (one lock); called on
    the engine's I/O threads. Also the oracle's ``GroundTruth``.
    """

    name = CHANNEL_NAME
    pay_codes = WECHAT_LIKE_PAY_CODES
    refund_codes = WECHAT_LIKE_REFUND_CODES
    notifications = SignedJsonNotifications(b"payengine-sigkill-wallet-key")

    def __init__(self, path: str | Path) -> None:
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(str(path), check_same_thread=False,
                                     isolation_level=None, timeout=30.0)
        self._conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL survives a process kill (the only crash here); the wallet is not
        # what is under test.
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.execute("CREATE TABLE IF NOT EXISTS payments (serial TEXT PRIMARY KEY,"
                           " amount_minor INTEGER NOT NULL, state TEXT NOT NULL)")
        self._conn.execute("CREATE TABLE IF NOT EXISTS refunds (serial TEXT NOT NULL,"
                           " refund_id TEXT NOT NULL, amount_minor INTEGER NOT NULL,"
                           " PRIMARY KEY (serial, refund_id))")

    def disconnect(self) -> None:
        """Close the wallet's file (the channel's ``close`` closes a payment)."""
        with self._lock:
            self._conn.close()

    @staticmethod
    def pays_later(payment_serial: str) -> bool:
        """The user is still entering the PIN at ``pay``: answered ``USERPAYING``."""
        return zlib.crc32(payment_serial.encode()) % 3 == 0

    def _payment(self, payment_serial: str) -> tuple[int, str] | None:
        row = self._conn.execute("SELECT amount_minor, state FROM payments WHERE serial = ?",
                                 (payment_serial,)).fetchone()
        return None if row is None else (int(row[0]), str(row[1]))

    def _reply(self, payment_serial: str, amount_minor: int, state: str) -> ChannelReply:
        if state == "SUCCESS":
            return ChannelReply("SUCCESS", "SUCCESS", f"T-{payment_serial}", amount_minor)
        return ChannelReply("SUCCESS", state)

    def pay(self, payment_serial: str, amount_minor: int, currency: str, title: str,
            details: PayDetails | None = None) -> ChannelReply:
        with self._lock:
            state = "USERPAYING" if self.pays_later(payment_serial) else "SUCCESS"
            self._conn.execute("INSERT OR IGNORE INTO payments VALUES (?, ?, ?)",
                               (payment_serial, amount_minor, state))
            payment = self._payment(payment_serial)
            assert payment is not None
            return self._reply(payment_serial, *payment)

    def query(self, payment_serial: str) -> ChannelReply:
        with self._lock:
            payment = self._payment(payment_serial)
            if payment is None:
                return ChannelReply("SUCCESS", "ORDERNOTEXIST")
            if payment[1] == "USERPAYING":  # the user has paid by now
                self._conn.execute("UPDATE payments SET state = 'SUCCESS' WHERE serial = ?",
                                   (payment_serial,))
                payment = (payment[0], "SUCCESS")
            return self._reply(payment_serial, *payment)

    def query_charge(self, payment_serial: str, channel_txn_id: str) -> ChannelReply:
        with self._lock:
            payment = self._payment(payment_serial)
            if payment is None or payment[1] != "SUCCESS" or channel_txn_id != f"T-{payment_serial}":
                return ChannelReply("SUCCESS", "ORDERNOTEXIST")
            return self._reply(payment_serial, *payment)

    def close(self, payment_serial: str) -> ChannelReply:
        with self._lock:
            self._conn.execute("INSERT OR IGNORE INTO payments VALUES (?, 0, 'CLOSED')",
                               (payment_serial,))
            self._conn.execute("UPDATE payments SET state = 'CLOSED' WHERE serial = ?"
                               " AND state = 'USERPAYING'", (payment_serial,))
            payment = self._payment(payment_serial)
            assert payment is not None
            return self._reply(payment_serial, *payment)

    def refund(self, payment_serial: str, refund_id: str, amount_minor: int, currency: str
               ) -> ChannelReply:
        with self._lock:
            payment = self._payment(payment_serial)
            if payment is None or payment[1] != "SUCCESS":
                return ChannelReply("SUCCESS", "REFUNDCLOSE")
            # no cap: the engine must never ask for more than was paid (the oracle checks)
            self._conn.execute("INSERT OR IGNORE INTO refunds VALUES (?, ?, ?)",
                               (payment_serial, refund_id, amount_minor))
            return ChannelReply("SUCCESS", "SUCCESS")

    def query_refund(self, payment_serial: str, refund_id: str) -> ChannelReply:
        with self._lock:
            row = self._conn.execute("SELECT 1 FROM refunds WHERE serial = ? AND refund_id = ?",
                                     (payment_serial, refund_id)).fetchone()
        return ChannelReply("SUCCESS", "SUCCESS" if row else "REFUNDNOTEXIST")

    def verify_notification(self, body: bytes, headers: Mapping[str, str]
                            ) -> ChannelNotification:
        return self.notifications.verify(body, headers)

    # ------------------------------------------------------------------ ground truth

    def charged(self, payment_serial: str) -> int:
        with self._lock:
            payment = self._payment(payment_serial)
        return payment[0] if payment is not None and payment[1] == "SUCCESS" else 0

    def refunded(self, payment_serial: str) -> int:
        with self._lock:
            row = self._conn.execute("SELECT COALESCE(SUM(amount_minor), 0) FROM refunds"
                                     " WHERE serial = ?", (payment_serial,)).fetchone()
        return int(row[0])

    def refund_given(self, payment_serial: str, refund_id: str) -> int:
        with self._lock:
            row = self._conn.execute("SELECT amount_minor FROM refunds WHERE serial = ?"
                                     " AND refund_id = ?", (payment_serial, refund_id)).fetchone()
        return 0 if row is None else int(row[0])

    def net_charged(self, payment_serial: str) -> int:
        return self.charged(payment_serial) - self.refunded(payment_serial)

    def charged_serials(self) -> list[str]:
        with self._lock:
            rows = self._conn.execute("SELECT serial FROM payments WHERE state = 'SUCCESS'"
                                      ).fetchall()
        return [str(r[0]) for r in rows]


# ---------------------------------------------------------------------------- the workload


@dataclass(frozen=True)
class AccountPlan:
    account_id: str
    unit: str
    minor_per_unit: int | None
    funded: int

    @property
    def funding_id(self) -> str:
        return f"fund-{self.account_id}"


def account_plans() -> list[AccountPlan]:
    """Every voucher account a run uses, with its one top-up."""
    plans = [AccountPlan(TINY_ACCOUNT, "POINTS", POINTS_MINOR_PER_UNIT, TINY_FUNDED_POINTS)]
    for user in range(USERS):
        plans.append(AccountPlan(f"u{user}/rp", "CNY", None, FUNDED_PLENTY))
        plans.append(AccountPlan(f"u{user}/pts", "POINTS", POINTS_MINOR_PER_UNIT, FUNDED_PLENTY))
    return plans


@dataclass(frozen=True)
class OrderPlan:
    """Order number ``n`` of a run: the same request in every child (a retry is equal)."""

    n: int
    request: PaymentRequest
    pre_hold: VoucherPart | None
    """The points part the user ticked before ordering (``PRE_HELD``), if any."""
    refunds: tuple[tuple[str, int], ...]
    """(refund_no, amount_minor) the merchant gives back once the order succeeded."""


def order_plan(seed: int, n: int) -> OrderPlan:
    rng = random.Random(seed * 1_000_003 + n)
    user = n % USERS
    total = 5_000 + rng.randrange(100)
    rp_mode = rng.choice([LegMode.PRE_DEDUCT, LegMode.POST_DEDUCT])
    pre_held = rng.random() < 0.3
    pts = (VoucherPart(f"u{user}/pts", 20, LegMode.PRE_HELD, hold_id=f"h{n}") if pre_held
           else VoucherPart(f"u{user}/pts", 20))
    vouchers = [VoucherPart(f"u{user}/rp", 100, rp_mode), pts]
    if rng.random() < 0.1:
        vouchers.append(VoucherPart(TINY_ACCOUNT, 20))
    voucher_minor = 100 + sum(POINTS_MINOR_PER_UNIT * v.amount for v in vouchers[1:])
    request = PaymentRequest(MERCHANT_ID, f"k{n}", f"u{user}", "CNY", total, "Fuel",
                             CashPart(total - voucher_minor, CHANNEL_NAME), tuple(vouchers))
    refunds: tuple[tuple[str, int], ...] = ()
    if n % 4 == 1:
        refunds = ((f"rf-{n}", total),)  # whole: cash and every voucher back
    elif n % 4 == 3:
        refunds = ((f"rf-{n}-a", 1_000), (f"rf-{n}-b", 500))  # cash only, in two parts
    return OrderPlan(n, request, pts if pre_held else None, refunds)


# ---------------------------------------------------------------------------- the child


class AckWriter:
    """One JSON line per acknowledgement on fd 1, one ``write`` each (atomic below PIPE_BUF,
    so a kill never interleaves two lines); called from every child thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def emit(self, **fields: Any) -> None:
        data = (json.dumps(fields, separators=(",", ":")) + "\n").encode()
        with self._lock:
            os.write(1, data)


@dataclass
class _ChildState:
    """Shared by the child's threads (under ``lock``)."""

    next_n: int
    last_n: int
    lock: threading.Lock = field(default_factory=threading.Lock)
    refundable: deque[int] = field(default_factory=deque)
    stop: threading.Event = field(default_factory=threading.Event)

    def take(self) -> int | None:
        with self.lock:
            if self.next_n > self.last_n:
                return None
            n, self.next_n = self.next_n, self.next_n + 1
            return n


def _submit_loop(engine: Engine, out: AckWriter, seed: int, state: _ChildState) -> None:
    """A POS terminal (its own thread): submit the next order, print its receipt."""
    while not state.stop.is_set() and (n := state.take()) is not None:
        plan = order_plan(seed, n)
        request = plan.request
        op = "submit"
        try:
            if plan.pre_hold is not None and not _exists(engine, request.merchant_order_no):
                op = "pre_hold"
                hold_id = plan.pre_hold.hold_id
                assert hold_id is not None
                hold = engine.pre_hold(plan.pre_hold.account_id, plan.pre_hold.amount,
                                       hold_id=hold_id, ttl_ms=PRE_HOLD_TTL_MS)
                out.emit(ack="pre_hold", n=n, account_id=hold.account_id, hold_id=hold_id,
                         status=hold.status)
                op = "submit"
            receipt = engine.submit(request)
        except PaymentError as error:  # the POS shows it; the user may try again later
            out.emit(error=error.code, op=op, n=n, message=error.message[:200])
            continue
        out.emit(ack="submit", n=n, merchant_order_no=request.merchant_order_no,
                 order_id=receipt.order_id, payment_serial=receipt.payment_serial)
        if plan.refunds:
            with state.lock:
                state.refundable.append(n)


def _exists(engine: Engine, merchant_order_no: str) -> bool:
    try:
        engine.find_order(MERCHANT_ID, merchant_order_no)
    except UnknownOrder:
        return False
    return True


def _refund_loop(engine: Engine, out: AckWriter, seed: int, state: _ChildState) -> None:
    """The merchant's back office (its own thread): refund orders once they succeeded."""
    attempts: Counter[int] = Counter()
    while not state.stop.is_set():
        with state.lock:
            n = state.refundable.popleft() if state.refundable else None
        if n is None:
            time.sleep(0.01)
            continue
        plan = order_plan(seed, n)
        try:
            order = engine.find_order(MERCHANT_ID, plan.request.merchant_order_no)
        except UnknownOrder:
            continue  # submitted by a killed child, never committed: nothing to refund
        if order.state != OrderState.SUCCEEDED.value or not order.settled:
            attempts[n] += 1
            if order.state in ("accepted", "paying", "succeeded") and attempts[n] < 500:
                with state.lock:
                    state.refundable.append(n)  # not yet: ask again shortly
            time.sleep(0.002)
            continue
        for refund_no, amount in plan.refunds:
            try:
                refund = engine.refund(order.order_id, refund_no, amount, reason="sigkill")
            except PaymentError as error:
                out.emit(error=error.code, op="refund", n=n, message=error.message[:200])
                continue
            out.emit(ack="refund", n=n, order_id=order.order_id, refund_no=refund_no,
                     refund_id=refund.refund_id, amount_minor=refund.amount_minor)


def run_child(db: Path, wallet_path: Path, *, seed: int, first_order: int,
              synchronous: str = "FULL", threads: int = SUBMIT_THREADS,
              orders_max: int = 100_000, max_run_s: float = 60.0) -> int:
    """The process that is killed: open, fund, pay and refund, print each acknowledgement.

    Runs on the main thread; ``threads`` submit threads and one refund thread do the work.
    Returns only if nobody killed it within ``max_run_s`` (bounded, like every wait here).
    """
    out = AckWriter()
    out.emit(phase="opening", pid=os.getpid())
    wallet = DurableWallet(wallet_path)
    engine = Engine.open(db, channels=[wallet], policy=POLICY, config=CONFIG,
                         synchronous=synchronous)
    for plan in account_plans():
        engine.open_account(plan.account_id, plan.unit, minor_per_unit=plan.minor_per_unit)
        view = engine.fund(plan.account_id, plan.funded, funding_id=plan.funding_id)
        out.emit(ack="fund", account_id=plan.account_id, funding_id=plan.funding_id,
                 amount=plan.funded, funded=view.funded)
    state = _ChildState(next_n=first_order, last_n=first_order + orders_max - 1)
    # the previous child's last orders may still wait for their refunds
    state.refundable.extend(n for n in range(max(0, first_order - 64), first_order)
                            if order_plan(seed, n).refunds)
    out.emit(phase="ready", first_order=first_order)
    workers = [threading.Thread(target=_submit_loop, args=(engine, out, seed, state),
                                name=f"pos-{i}", daemon=True) for i in range(threads)]
    workers.append(threading.Thread(target=_refund_loop, args=(engine, out, seed, state),
                                    name="back-office", daemon=True))
    for worker in workers:
        worker.start()
    deadline = time.monotonic() + max_run_s
    while time.monotonic() < deadline and any(w.is_alive() for w in workers[:-1]):
        time.sleep(0.05)
    state.stop.set()
    for worker in workers:
        worker.join(timeout=15)
    engine.shutdown()
    wallet.disconnect()
    out.emit(phase="done")
    return 0


# ---------------------------------------------------------------------------- the parent


@dataclass
class Acks:
    """What the children were answered, as the parent read it from their stdout."""

    submits: dict[str, set[str]] = field(default_factory=dict)
    """merchant_order_no -> every order id a submit of it was answered with (one, if right)."""
    submit_ns: dict[str, int] = field(default_factory=dict)
    refunds: dict[tuple[str, str], set[tuple[str, int]]] = field(default_factory=dict)
    """(order_id, refund_no) -> {(refund_id, amount_minor)} it was answered with."""
    funds: dict[str, int] = field(default_factory=dict)
    """funding_id -> amount."""
    fund_accounts: dict[str, str] = field(default_factory=dict)
    pre_holds: set[tuple[str, str]] = field(default_factory=set)
    """(account_id, hold_id) answered."""
    counts: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def max_submit_n(self) -> int:
        return max(self.submit_ns.values(), default=-1)

    def record(self, line: Mapping[str, Any]) -> None:
        kind = line.get("ack")
        if kind == "submit":
            self.submits.setdefault(line["merchant_order_no"], set()).add(line["order_id"])
            self.submit_ns[line["merchant_order_no"]] = int(line["n"])
        elif kind == "refund":
            key = (str(line["order_id"]), str(line["refund_no"]))
            self.refunds.setdefault(key, set()).add((line["refund_id"], int(line["amount_minor"])))
        elif kind == "fund":
            self.funds[line["funding_id"]] = int(line["amount"])
            self.fund_accounts[line["funding_id"]] = line["account_id"]
        elif kind == "pre_hold":
            self.pre_holds.add((line["account_id"], line["hold_id"]))
        elif "error" in line:
            self.errors[f"{line.get('op')}:{line['error']}"] += 1
            return
        else:
            return
        self.counts[str(kind)] += 1


@dataclass
class SigkillReport:
    kills: int
    kills_during_opening: int
    seed: int
    synchronous: str
    db_dir: str
    wall_s: float
    acknowledgements: dict[str, int]
    orders: int
    final_states: dict[str, int]
    refunds: int
    child_errors: dict[str, int]
    settle_s: float
    violations: list[str]

    @property
    def ok(self) -> bool:
        return not self.violations

    def render(self) -> str:
        acks = ", ".join(f"{k} {v}" for k, v in sorted(self.acknowledgements.items()))
        states = ", ".join(f"{k} {v}" for k, v in sorted(self.final_states.items()))
        errors = ", ".join(f"{k} {v}" for k, v in sorted(self.child_errors.items())) or "none"
        lines = [
            f"payengine sigkill: {self.kills} SIGKILLs ({self.kills_during_opening} while "
            f"opening), seed {self.seed}, synchronous={self.synchronous}, "
            f"{self.wall_s:.1f} s wall",
            f"  acknowledged   {sum(self.acknowledgements.values())} ({acks})",
            f"  orders         {self.orders} ({states}); {self.refunds} refunds",
            f"  refusals seen  {errors}",
            f"  final settle   {self.settle_s:.1f} s",
            f"  violations     {len(self.violations)}"
            + ("" if self.ok else f"  (database kept in {self.db_dir})"),
        ]
        lines += [f"    {v}" for v in self.violations[:50]]
        return "\n".join(lines)

    def as_json(self) -> str:
        return json.dumps(asdict(self))


@dataclass
class _ChildRun:
    lines: list[bytes] = field(default_factory=list)
    opening: threading.Event = field(default_factory=threading.Event)
    ready: threading.Event = field(default_factory=threading.Event)


def _drain(stream: IO[bytes], run: _ChildRun) -> None:
    """Read the child's stdout to EOF (the reader thread), flagging its phases."""
    for raw in stream:
        run.lines.append(raw)
        if raw.startswith(b'{"phase":"opening"'):
            run.opening.set()
        elif raw.startswith(b'{"phase":"ready"'):
            run.ready.set()


def _package_root() -> str:
    """The directory holding this ``payengine``: the child imports the same code."""
    import payengine

    return str(Path(payengine.__file__).resolve().parent.parent)


def kill_once(db: Path, wallet_path: Path, stderr_log: IO[bytes], *, seed: int,
              first_order: int, synchronous: str, delay_s: float, during_opening: bool,
              acks: Acks, violations: list[Violation]) -> None:
    """Start one child, ``SIGKILL`` it ``delay_s`` after it was ready (or began opening),
    and record what it acknowledged. Runs on the parent's main thread."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [_package_root(),
                                                      env.get("PYTHONPATH")]))
    # SQLite's own temporary files (etilqs_*) go beside the database: a kill that lands
    # between SQLite creating one and unlinking it leaves it in the run's folder, not in
    # the system's temporary directory
    env["SQLITE_TMPDIR"] = str(db.parent)
    command = [sys.executable, "-m", "payengine.sim.sigkill", "child", "--db", str(db),
               "--wallet", str(wallet_path), "--seed", str(seed), "--first-order",
               str(first_order), "--synchronous", synchronous]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr_log, env=env)
    run = _ChildRun()
    assert proc.stdout is not None
    reader = threading.Thread(target=_drain, args=(proc.stdout, run), daemon=True)
    reader.start()
    anchor = run.opening if during_opening else run.ready
    try:
        if not anchor.wait(CHILD_READY_TIMEOUT_S):
            violations.append(Violation("child-starts", f"pid {proc.pid}",
                                        f"not {'opening' if during_opening else 'ready'} "
                                        f"within {CHILD_READY_TIMEOUT_S} s"))
        else:
            time.sleep(delay_s)
    finally:
        with contextlib.suppress(ProcessLookupError):  # reaped already: it died alone
            os.kill(proc.pid, signal.SIGKILL)
        returncode = proc.wait(timeout=CHILD_EXIT_TIMEOUT_S)
        reader.join(timeout=CHILD_EXIT_TIMEOUT_S)
        proc.stdout.close()
    if returncode != -signal.SIGKILL:
        violations.append(Violation("child-dies-only-by-the-kill", f"pid {proc.pid}",
                                    f"exited {returncode} before the kill (see the stderr "
                                    "log in the database folder)"))
    for raw in run.lines:
        if not raw.endswith(b"\n"):
            continue  # cut by the kill mid-line: the client never heard it
        line = json.loads(raw)
        acks.record(line)
        if "error" in line and f"{line.get('op')}:{line['error']}" not in EXPECTED_CHILD_ERRORS:
            violations.append(Violation("unexpected-refusal", f"order k{line.get('n')}",
                                        f"{line.get('op')}: {line['error']}: "
                                        f"{line.get('message')}"))


def run_kills(kills: int, *, seed: int = 0, db_dir: Path | None = None,
              synchronous: str = "FULL", delay_ms: tuple[int, int] = (50, 600),
              progress: bool = False) -> SigkillReport:
    """The whole check: ``kills`` children killed, then the final reopen and its checks."""
    assert 0 < kills <= KILLS_MAX and synchronous in ("FULL", "NORMAL")
    assert 0 <= delay_ms[0] <= delay_ms[1]
    started = time.monotonic()
    folder = Path(db_dir) if db_dir is not None else Path(tempfile.mkdtemp(prefix="sigkill-"))
    folder.mkdir(parents=True, exist_ok=True)
    db, wallet_path = folder / "engine.db", folder / "wallet.db"
    if db.exists() or wallet_path.exists():
        raise FileExistsError(f"{folder} holds a database already: the acknowledgements "
                              "of its runs are unknown here; use an empty folder")
    rng = random.Random(seed)
    acks = Acks()
    violations: list[Violation] = []
    during_opening = 0
    with open(folder / "child-stderr.log", "ab") as stderr_log:
        for k in range(kills):
            first_order = max(0, acks.max_submit_n() + 1 - RESUBMIT_WINDOW)
            opening = k > 0 and rng.random() < 1 / 6
            during_opening += opening
            delay_s = (rng.uniform(0.0, 0.15) if opening
                       else rng.uniform(delay_ms[0], delay_ms[1]) / 1000)
            seen = len(violations)
            kill_once(db, wallet_path, stderr_log, seed=seed, first_order=first_order,
                      synchronous=synchronous, delay_s=delay_s, during_opening=opening,
                      acks=acks, violations=violations)
            if progress:
                for violation in violations[seen:]:
                    print(f"\nsigkill: kill {k + 1}: {violation}", file=sys.stderr)
                print(f"\rsigkill: {k + 1}/{kills} kills, {acks.total} acknowledged, "
                      f"{len(violations)} violations", end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    final = check_database(db, wallet_path, acks, synchronous=synchronous)
    violations += final.violations
    if db_dir is None and not violations:
        shutil.rmtree(folder, ignore_errors=True)  # a temporary folder is kept only to look at
    return SigkillReport(
        kills=kills, kills_during_opening=during_opening, seed=seed, synchronous=synchronous,
        db_dir=str(folder), wall_s=time.monotonic() - started,
        acknowledgements=dict(acks.counts), orders=final.orders,
        final_states=dict(final.final_states), refunds=final.refunds,
        child_errors=dict(acks.errors), settle_s=final.settle_s,
        violations=[str(v) for v in violations])


# ---------------------------------------------------------------------------- the check


@dataclass
class FinalCheck:
    violations: list[Violation]
    orders: int
    final_states: Counter[str]
    refunds: int
    settle_s: float


def check_database(db: Path, wallet_path: Path, acks: Acks, *, synchronous: str = "FULL",
                   settle_timeout_s: float = SETTLE_TIMEOUT_S) -> FinalCheck:
    """Reopen the engine in this process, let everything settle (bounded), and check every
    acknowledgement and the money. Runs on the caller's thread; the engine is shut down
    before it returns."""
    wallet = DurableWallet(wallet_path)
    engine = Engine.open(db, channels=[wallet], policy=POLICY, config=CONFIG,
                         synchronous=synchronous)
    violations: list[Violation] = []
    started = time.monotonic()
    try:
        deadline = started + settle_timeout_s
        while engine.unsettled_count() and time.monotonic() < deadline:
            time.sleep(0.05)
        while (any(a.held for a in engine.store.all_accounts())
               and time.monotonic() < deadline):
            time.sleep(0.05)
        settle_s = time.monotonic() - started
        unsettled = engine.store.unsettled_order_ids()
        if unsettled:
            violations.append(Violation("every-order-settles", f"{len(unsettled)} orders",
                                        f"unsettled after {settle_timeout_s} s: "
                                        f"{unsettled[:5]}"))
        violations += _check_acks(engine, acks)
        violations += _check_money(engine, wallet)
        for actor, error in engine.broken_actors().items():
            violations.append(Violation("no-actor-broken", actor, error))
        report = check(engine.store, {CHANNEL_NAME: wallet}, now_ms=engine.runtime.now_ms())
        violations += report.violations
        orders = list(engine.store.iter_orders())
    finally:
        engine.shutdown()
        wallet.disconnect()
    states = Counter(o.state.value for o in orders)
    refunds = sum(len(o.refunds) for o in orders)
    return FinalCheck(violations, len(orders), states, refunds, settle_s)


def _check_acks(engine: Engine, acks: Acks) -> list[Violation]:
    """Every acknowledgement is in the database, as it was answered, and carried to its end."""
    v: list[Violation] = []
    store = engine.store
    for no, order_ids in sorted(acks.submits.items()):
        subject = f"submit {MERCHANT_ID}/{no}"
        if len(order_ids) > 1:
            v.append(Violation("one-receipt-per-key", subject,
                               f"answered with several order ids {sorted(order_ids)}"))
        try:
            order = engine.find_order(MERCHANT_ID, no)
        except UnknownOrder:
            v.append(Violation("acknowledged-submit-survives", subject,
                               f"answered {sorted(order_ids)}; no such order after the crash"))
            continue
        if order_ids != {order.order_id}:
            v.append(Violation("acknowledged-submit-survives", subject,
                               f"answered {sorted(order_ids)}; the database has "
                               f"{order.order_id}"))
        if not order.settled or order.state not in ("succeeded", "failed", "closed"):
            v.append(Violation("acknowledged-submit-finishes", subject,
                               f"{order.order_id} is {order.state}, settled {order.settled}"))
    for (order_id, refund_no), answers in sorted(acks.refunds.items()):
        subject = f"refund {order_id}/{refund_no}"
        if len(answers) > 1:
            v.append(Violation("one-refund-per-number", subject, f"answered {sorted(answers)}"))
        stored = store.load_order(order_id)
        refund = None if stored is None else stored.refund(refund_no=refund_no)
        if refund is None:
            v.append(Violation("acknowledged-refund-survives", subject,
                               f"answered {sorted(answers)}; no such refund after the crash"))
            continue
        if answers != {(refund.refund_id, refund.amount_minor)}:
            v.append(Violation("acknowledged-refund-survives", subject,
                               f"answered {sorted(answers)}; the database has "
                               f"{(refund.refund_id, refund.amount_minor)}"))
        if refund.status.value != "succeeded":
            v.append(Violation("acknowledged-refund-finishes", subject,
                               f"{refund.status.value} (the wallet refunds every one)"))
    for funding_id, amount in sorted(acks.funds.items()):
        account_id = acks.fund_accounts[funding_id]
        funding = store.funding_amount(funding_id)
        account = store.load_account(account_id)
        if account is None or account.funded < amount or funding != (account_id, amount):
            v.append(Violation("acknowledged-funding-survives", f"account {account_id}",
                               f"{funding_id} of {amount} answered; the account is {account}"))
    for account_id, hold_id in sorted(acks.pre_holds):
        try:
            hold = engine.get_hold(account_id, hold_id)
        except UnknownHold:
            v.append(Violation("acknowledged-pre-hold-survives", f"hold {account_id}/{hold_id}",
                               "answered; no such hold after the crash"))
            continue
        if hold.status == "pending":
            v.append(Violation("pre-hold-finishes", f"hold {account_id}/{hold_id}",
                               "still pending after every order settled and its TTL"))
    return v


def _check_money(engine: Engine, wallet: DurableWallet) -> list[Violation]:
    """Conservation: each account's balances add up and agree with what the orders spent
    less what refunds gave back; each order's cash counted once, in the ledger and at the
    wallet; every charge at the wallet belongs to an order."""
    v: list[Violation] = []
    store = engine.store
    for posting, total in engine.unbalanced_postings():
        v.append(Violation("ledger-balanced", f"posting {posting}", f"sums to {total}"))
    spent_by_orders: Counter[str] = Counter()
    serials: set[str] = set()
    for order in store.iter_orders():
        serials.add(order.payment_serial)
        subject = f"order {order.order_id}"
        cash = order.cash_leg
        refunded_cash = 0
        for leg in order.legs:
            returned = sum(p.amount for r in order.refunds if r.kind is RefundKind.MERCHANT
                           for p in r.parts if p.leg_no == leg.leg_no
                           and p.status is PartStatus.DONE)
            if leg.is_cash:
                refunded_cash = returned
            elif order.state is OrderState.SUCCEEDED and leg.account_id is not None:
                spent_by_orders[leg.account_id] += leg.amount - returned
        if cash is not None and order.state is OrderState.SUCCEEDED:
            payer = store.ledger_balances(order.order_id).get(order.currency, {}).get(
                f"payer:{CHANNEL_NAME}", 0)
            if payer != -(cash.amount - refunded_cash):
                v.append(Violation("payment-counted-once", subject,
                                   f"the payer's ledger shows {payer}; paid {cash.amount}, "
                                   f"refunded {refunded_cash}"))
            charged = wallet.charged(order.payment_serial)
            if charged != cash.amount:
                v.append(Violation("payment-counted-once", subject,
                                   f"the wallet charged {charged} for a cash part of "
                                   f"{cash.amount}"))
    for serial in wallet.charged_serials():
        if serial not in serials:
            v.append(Violation("wallet-charge-has-an-order", f"serial {serial}",
                               "the wallet charged it; no order has this serial"))
    for account in store.all_accounts():
        subject = f"account {account.account_id}"
        if account.funded != account.available + account.held + account.spent:
            v.append(Violation("voucher-conservation", subject, repr(account)))
        if account.held:
            v.append(Violation("nothing-held-when-nothing-pending", subject,
                               f"held {account.held} with every order settled"))
        if account.spent != spent_by_orders[account.account_id]:
            v.append(Violation("voucher-spent-as-orders-say", subject,
                               f"spent {account.spent}; succeeded orders less refunds "
                               f"say {spent_by_orders[account.account_id]}"))
    return v


# ---------------------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m payengine.sim.sigkill",
        description="SIGKILL a real engine process again and again under load, then check "
                    "that nothing it acknowledged was lost and that money is conserved.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="the parent: start, kill, repeat; then check")
    run.add_argument("--kills", type=int, default=200, help="children killed (default 200)")
    run.add_argument("--seed", type=int, default=0, help="seeds the kill times and the orders")
    run.add_argument("--db", default=None, metavar="DIR",
                     help="an empty folder for the databases (default: a new temporary one)")
    run.add_argument("--synchronous", choices=["FULL", "NORMAL"], default="FULL",
                     help="SQLite durability of the engine (default FULL; NORMAL in WAL may "
                          "lose the last commits on power loss, never on a process kill)")
    run.add_argument("--json", action="store_true", help="print the report as one JSON object")
    run.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    child = sub.add_parser("child", help="the process that is killed (started by run)")
    child.add_argument("--db", required=True, help="the engine's SQLite file")
    child.add_argument("--wallet", required=True, help="the simulated wallet's SQLite file")
    child.add_argument("--seed", type=int, default=0)
    child.add_argument("--first-order", type=int, default=0)
    child.add_argument("--synchronous", choices=["FULL", "NORMAL"], default="FULL")
    child.add_argument("--threads", type=int, default=SUBMIT_THREADS)
    child.add_argument("--max-run-s", type=float, default=60.0,
                       help="exit by itself after this long if nobody killed it")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "child":
        if not 0 < args.threads <= 64 or not 0 < args.max_run_s <= 3_600:
            print("sigkill child: --threads 1..64, --max-run-s 0..3600", file=sys.stderr)
            return 2
        try:
            return run_child(Path(args.db), Path(args.wallet), seed=args.seed,
                             first_order=args.first_order, synchronous=args.synchronous,
                             threads=args.threads, max_run_s=args.max_run_s)
        except BaseException:
            traceback.print_exc()
            raise
    if not 0 < args.kills <= KILLS_MAX:
        print(f"sigkill: --kills 1..{KILLS_MAX}", file=sys.stderr)
        return 2
    try:
        report = run_kills(args.kills, seed=args.seed,
                           db_dir=None if args.db is None else Path(args.db),
                           synchronous=args.synchronous,
                           progress=not args.no_progress and not args.json)
    except FileExistsError as error:
        print(f"sigkill: {error}", file=sys.stderr)
        return 2
    print(report.as_json() if args.json else report.render())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
