"""SQLite persistence for orders, legs, voucher accounts, holds and the journal.

One database file in WAL mode, one writer connection, one lock: every write is a change
that is durable (``synchronous=FULL`` by default) before the caller acknowledges anything or
lets an effect leave the process. Changes of concurrent writers share one transaction and one
fsync (group commit, ``persistence.group_commit``), each in its own savepoint. sqlite-utils creates and
inspects the schema; the hot path uses fixed SQL (see DESIGN.md: the Table API issues ~7x the
statements).

Thread safety: any thread may call any method; the lock serialises them. The lock is held
only for the statements of one transaction, never while waiting on anything else.
"""

from __future__ import annotations

import fcntl
import functools
import json
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, suppress
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any

import sqlite_utils

from payengine.engine.channel_data import (
    PayDetails,
    details_from_json,
    details_json,
    prepay_from_json,
    prepay_json,
    without_auth_code,
)
from payengine.engine.discounts import priced_sale_from_json, priced_sale_json
from payengine.engine.errors import (
    AccountExists,
    AttemptRefused,
    DatabaseInUse,
    EngineClosed,
    IdempotencyConflict,
    IncompatibleDatabase,
    Overloaded,
)
from payengine.engine.ledger import Posting
from payengine.engine.order import (
    FOLLOW_UP_OPS,
    IN_FLIGHT_LEG_STATUSES,
    TERMINAL_STATES,
    AccountUnit,
    Leg,
    LegMode,
    LegStatus,
    OrderState,
    PartStatus,
    PaymentOrder,
    Refund,
    RefundKind,
    RefundPart,
    RefundStatus,
    Transition,
    authorisation_from_json,
    authorisation_json,
    routing_from_json,
    routing_json,
)
from payengine.engine.risk import verification_from_json, verification_json
from payengine.engine.voucher import (
    AccountStatus,
    Fence,
    FenceKey,
    FenceKind,
    FenceScope,
    FenceStatus,
    VoucherAccount,
)
from payengine.persistence import (
    agreements,
    merchants,
    operator,
    outbox,
    quotes,
    rejections,
    statements,
)
from payengine.persistence.group_commit import CommitStats, GroupCommit, GroupCommitConfig

SCHEMA_VERSION = 9
"""Bumped whenever a table changes shape; a file of another version is refused at open
(``IncompatibleDatabase``). 2: fences keyed by (account, scope, owner, leg), not a hold id.
3: one journal row per change, holding that change's transitions. 4: an order's pay details
and prepay (JSON arrays); payment attempts (``payment_orders.attempt``, unique per trade
order; ``trade_orders.order_id`` is the latest attempt). 5: merchants' signing keys and
status, users' status, the nonces of signed requests and the requests refused
(``persistence.merchants``). 6: an order's step-up verification (a JSON array) and device
id (for the risk gate's velocity per device). 7 was an unfinished layout of 8 (development
only, refused). 8: payment agreements and withholdings
(``persistence.agreements``); an order's sale and discount terms
(``payment_orders.sale``, with its station and shift for the shift report) and the quotes
(``persistence.quotes``, each claimed by the trade order it pays); the order's events' sale and
split (``outbox.sale``, ``outbox.split``); a voucher account's status (active, frozen, closed), for
recharges and transfers; an order's routes (``routing``: its method,
the routes it left and a fallback under way, a JSON object), the serials of the routes it
left (``order_serials``) and the channel and serial of a refund of a left route's late
charge (``refunds.channel``, ``refunds.payment_serial``). 9: a pump pre-authorisation's
record (``payment_orders.authorisation``, a JSON array); an order's total and its legs'
amounts are rewritten once (a capture short of the authorisation)."""


@dataclass(frozen=True, slots=True)
class JournalEntry:
    """One transition of an order, a leg or an account, from the append-only journal.

    ``seq`` orders the changes: the transitions one change committed together share it
    (the journal stores them as one row) and keep their order within it."""

    seq: int
    at_ms: int
    entity_kind: str
    entity_id: str
    part: str
    from_state: str
    to_state: str
    cause: str


class Store:
    """The engine's database. Open with ``Store(path)``; ``":memory:"`` works for tests."""

    def __init__(self, path: str | Path, *, synchronous: str = "FULL",
                 readers_max: int = 8, exclusive: bool = True,
                 group_commit: GroupCommitConfig | None = None,
                 read_only: bool = False) -> None:
        """``exclusive``: hold a lock file for as long as the store is open, so that a second
        engine on the same file (this process or another) is refused with ``DatabaseInUse``.
        ``read_only`` (inspection beside a running engine: ``payengine show``, ``report``):
        no lock file, a read-only connection, no schema created, so it never writes and never
        waits for the engine's writer; the file must exist with this schema version."""
        assert synchronous in ("FULL", "NORMAL", "OFF"), synchronous
        self.path = str(path)
        self._lock_file: IO[str] | None = None
        if exclusive and not read_only and self.path != ":memory:":
            self._lock_file = _lock_exclusively(self.path + ".lock")
        self._conn = sqlite3.connect(
            f"{Path(self.path).resolve().as_uri()}?mode=ro" if read_only else self.path,
            check_same_thread=False, isolation_level=None, timeout=30.0, uri=read_only,
        )
        self._lock = threading.RLock()
        self._closed = False
        self._readers: deque[sqlite3.Connection] = deque()
        self._readers_open = 0
        self._readers_max = readers_max
        self._units: dict[str, AccountUnit] = {}
        self.after_commit: Callable[[], None] | None = None
        """Called right after each commit; the simulator crashes the engine here, between a
        decision becoming durable and its effects being carried out."""
        self._writer = GroupCommit(self._conn, self._lock, config=group_commit,
                                   is_closed=lambda: self._closed,
                                   after_commit=lambda: self.after_commit)
        self.db = sqlite_utils.Database(self._conn)
        if self.path != ":memory:" and not read_only:
            self.db.enable_wal()
        self._conn.execute(f"PRAGMA synchronous={synchronous}")
        self._conn.execute("PRAGMA busy_timeout=30000")
        try:
            self._check_schema_version()
            if not read_only:
                self._create_schema()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Commit what writers are waiting on, close the connections; later calls raise
        ``EngineClosed``."""
        if not self._closed:
            with suppress(sqlite3.Error):  # its writers got the error; closing goes on
                self._writer.flush()
        self._close()

    def kill(self) -> None:
        """Simulate power loss: nothing after this call commits. What committed stays."""
        self._close()

    def _close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._writer.abandon()
                self._conn.close()
        while True:
            try:
                self._readers.pop().close()
            except IndexError:
                break
        if self._lock_file is not None:
            self._lock_file.close()  # releases the lock
            self._lock_file = None

    @property
    def writer_backlog(self) -> int:
        """Writers (threads) waiting for the writer connection right now."""
        return self._writer.backlog

    @property
    def commit_stats(self) -> CommitStats:
        """Commits, changes and the largest batch so far (for benchmarks and metrics)."""
        return self._writer.stats

    def on_commit(self, hook: Callable[[int], None] | None) -> None:
        """Tell ``hook`` each commit's batch size in changes (metrics; ``None``: nobody)."""
        self._writer.on_commit = hook

    @property
    def closed(self) -> bool:
        return self._closed

    def _tx(self, statements: int = 1) -> AbstractContextManager[sqlite3.Connection]:
        """One change: its statements run on the writer connection and are durable when the
        block exits (group commit: they may share their commit with other threads' changes;
        see ``persistence.group_commit``). A change that raises is undone alone."""
        return self._writer.change(statements)

    @contextmanager
    def _read(self, *, snapshot: bool = True) -> Iterator[sqlite3.Connection]:
        """Reads on a pooled reader connection; ``snapshot`` for several statements.

        In WAL mode readers never wait for the writer, so an API read or an actor loading
        its state does not queue behind other actors' commits. With ``snapshot`` the reads
        run in one transaction and see one consistent state. Without it each statement is
        its own snapshot (autocommit): for a single statement that is the same guarantee
        without a BEGIN and a COMMIT, which were most of the SQL the engine executed. Fetch
        the statement's rows inside the block and keep no cursor: an unfinished statement
        would hold its snapshot open on the pooled connection, and the next read there would
        see stale data. An in-memory database has one connection only, so its reads take the
        write lock.
        """
        if self.path == ":memory:":
            with self._lock:
                if self._closed:
                    raise EngineClosed("the engine's database is closed")
                yield self._conn
            return
        conn = self._borrow_reader()
        try:
            if not snapshot:
                yield conn
            else:
                conn.execute("BEGIN")
                try:
                    yield conn
                finally:
                    conn.execute("COMMIT")
        finally:
            if self._closed:
                conn.close()
            else:
                self._readers.append(conn)

    def _wait_for_reader(self, timeout_s: float = 30.0, poll_s: float = 0.005
                         ) -> sqlite3.Connection:
        """Wait for a pooled reader (all ``readers_max`` are busy), noticing a close."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._closed:
                raise EngineClosed("the engine's database is closed")
            try:
                return self._readers.pop()
            except IndexError:
                time.sleep(poll_s)
        raise Overloaded(f"no database reader free for {timeout_s} s")

    def _borrow_reader(self) -> sqlite3.Connection:
        """An idle reader, a new one (up to ``readers_max``), or the first one freed.

        The pool is a deque: ``pop`` and ``append`` are atomic, so the common case takes no
        lock (a ``queue.LifoQueue`` cost a condition variable per read).
        """
        if self._closed:
            raise EngineClosed("the engine's database is closed")
        try:
            return self._readers.pop()
        except IndexError:
            pass
        with self._lock:
            create = self._readers_open < self._readers_max
            if create:
                self._readers_open += 1
        if not create:
            return self._wait_for_reader()
        conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None,
                               timeout=30.0)
        conn.execute("PRAGMA query_only=1")
        return conn

    def _check_schema_version(self) -> None:
        """Refuse a file another schema wrote (or one with tables and no version): reading
        it with this code would misread it. A new, empty file is fine."""
        tables = set(self.db.table_names())
        if not tables:
            return
        version = None
        if "meta" in tables:
            row = self._conn.execute(
                "SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            version = None if row is None else str(row[0])
        if version != str(SCHEMA_VERSION):
            raise IncompatibleDatabase(
                f"{self.path} has schema version {version or 'unknown'}; this engine reads "
                f"version {SCHEMA_VERSION} only (no migration before 1.0): use a new file")

    def _create_schema(self) -> None:
        db = self.db
        with self._lock:
            db.table("trade_orders").create(
                {"merchant_id": str, "merchant_order_no": str, "fingerprint": str,
                 "order_id": str, "created_at_ms": int},
                pk=("merchant_id", "merchant_order_no"), not_null={"fingerprint", "order_id"},
                if_not_exists=True,
            )
            db.table("payment_orders").create(
                {"order_id": str, "merchant_id": str, "merchant_order_no": str,
                 "payment_serial": str, "user_id": str, "title": str, "currency": str,
                 "total_minor": int, "fingerprint": str, "state": str, "cause": str,
                 "created_at_ms": int, "close_at_ms": int, "hold_expires_at_ms": int,
                 "query_attempt": int, "next_query_at_ms": int, "refund_query_attempt": int,
                 "next_refund_query_at_ms": int, "voucher_attempt": int,
                 "next_voucher_retry_at_ms": int, "version": int, "pay_details": str,
                 "prepay": str, "attempt": int, "verification": str, "device_id": str,
                 "updated_at_ms": int, "settled": int, "sale": str, "station_id": str,
                 "shift_id": str, "routing": str, "authorisation": str},
                pk="order_id",
                not_null={"payment_serial", "state", "total_minor", "version"},
                if_not_exists=True,
            )
            db.table("legs").create(
                {"order_id": str, "leg_no": int, "mode": str, "account_id": str, "amount": int,
                 "unit": str, "value_minor": int, "hold_id": str, "status": str,
                 "channel": str, "channel_txn_id": str, "channel_code": str, "refund_id": str},
                pk=("order_id", "leg_no"), if_not_exists=True,
            )
            db.table("refunds").create(
                {"order_id": str, "refund_id": str, "refund_no": str, "kind": str,
                 "amount_minor": int, "reason": str, "status": str, "requested_at_ms": int,
                 "parts": str, "channel": str, "payment_serial": str},
                pk=("order_id", "refund_id"), not_null={"refund_no", "status", "amount_minor"},
                if_not_exists=True,
            )
            db.table("refunds").create_index(["order_id", "refund_no"], unique=True,
                                             if_not_exists=True)
            # One row per change of an order: its postings as [[memo, [[account, minor],
            # ...]], ...]; posting n of the row is posting "<order_id>:<version>:<n>".
            db.table("ledger").create(
                {"seq": int, "order_id": str, "version": int, "currency": str, "at_ms": int,
                 "postings": str},
                pk="seq", not_null={"order_id", "version", "postings"}, if_not_exists=True,
            )
            db.table("ledger").create_index(["order_id"], if_not_exists=True)
            db.table("voucher_accounts").create(
                {"account_id": str, "unit": str, "minor_per_unit": int, "funded": int,
                 "available": int, "held": int, "spent": int, "version": int,
                 "created_at_ms": int, "status": str},
                pk="account_id", not_null={"unit", "funded", "available", "held", "spent"},
                if_not_exists=True,
            )
            db.table("fundings").create(
                {"funding_id": str, "account_id": str, "amount": int, "at_ms": int},
                pk="funding_id", if_not_exists=True,
            )
            # One row per fence, keyed by its structured FenceKey: a caller's hold id lives in
            # scope 'user' and can never name an order's or a refund's fence.
            db.table("holds").create(
                {"account_id": str, "scope": str, "owner": str, "leg": int, "kind": str,
                 "status": str, "amount": int, "order_id": str, "expires_at_ms": int,
                 "updated_at_ms": int},
                pk=("account_id", "scope", "owner", "leg"),
                not_null={"scope", "owner", "leg", "kind", "status", "amount"},
                if_not_exists=True,
            )
            db.table("journal").create(
                {"seq": int, "at_ms": int, "entity_kind": str, "entity_id": str,
                 "transitions": str},
                pk="seq", not_null={"transitions"}, if_not_exists=True,
            )
            # The serials of routes an order left (its current one is payment_orders'): a
            # late report for one still finds its order. At most FALLBACKS_MAX per order.
            db.table("order_serials").create({"payment_serial": str, "order_id": str},
                                             pk="payment_serial", not_null={"order_id"},
                                             if_not_exists=True)
            db.table("meta").create({"key": str, "value": str}, pk="key", if_not_exists=True)
            db.table("meta").insert({"key": "schema_version", "value": str(SCHEMA_VERSION)},
                              ignore=True)
            db.table("payment_orders").create_index(["payment_serial"], unique=True,
                                              if_not_exists=True)
            db.table("payment_orders").create_index(
                ["merchant_id", "merchant_order_no", "attempt"], unique=True, if_not_exists=True)
            db.table("payment_orders").create_index(["settled"], if_not_exists=True)
            db.execute(  # partial: orders without a fuel sale cost the index nothing
                "CREATE INDEX IF NOT EXISTS idx_payment_orders_shift ON payment_orders"
                " (station_id, shift_id, order_id) WHERE station_id IS NOT NULL")
            db.table("payment_orders").create_index(["user_id", "created_at_ms"], if_not_exists=True)
            db.table("payment_orders").create_index(["device_id", "created_at_ms"],
                                                    if_not_exists=True)
            db.table("holds").create_index(["status", "expires_at_ms"], if_not_exists=True)
            db.table("journal").create_index(["entity_kind", "entity_id"], if_not_exists=True)
            outbox.create_schema(db)
            statements.create_schema(db)
            rejections.create_schema(db)
            merchants.create_schema(db)
            agreements.create_schema(db)
            quotes.create_schema(db)
            operator.create_schema(db)

    # ------------------------------------------------------------------ orders

    def insert_order(self, order: PaymentOrder, now_ms: int,
                     also_journal: Sequence[Transition] = (),
                     may_follow: Callable[[PaymentOrder], None] | None = None,
                     nonce: merchants.NonceUse | None = None) -> PaymentOrder | None:
        """Insert a new order under its idempotency key, or return the order that holds the key.

        The primary key of ``trade_orders`` on (merchant_id, merchant_order_no) is the backstop:
        of many concurrent submits exactly one insert wins. Returns ``None`` if this one won.
        Raises ``IdempotencyConflict`` if the key is taken by different parameters.
        ``also_journal``: transitions journalled with the submit (the routing decision).
        An order of attempt 2 or more is inserted only if ``may_follow`` (given the trade
        order's latest attempt, read in the same transaction) does not raise.

        ``nonce``: a signed request's, recorded in the same change as the new order, so the
        order and its nonce are stored together or not at all; a nonce used before raises
        ``RequestRejected`` (``replayed_nonce``) and nothing is stored. When the key is taken
        (the order is returned) the nonce is *not* recorded: the caller decides.
        """
        if order.attempt != 1:
            assert may_follow is not None, "a next attempt is checked against the latest"
            return self._insert_attempt(order, now_ms, also_journal, may_follow, nonce)
        try:
            with self._tx() as conn:
                if nonce is not None:
                    merchants.insert_nonce(conn, nonce)
                _claim_quote(conn, order)
                conn.execute(
                    "INSERT INTO trade_orders (merchant_id, merchant_order_no, fingerprint,"
                    " order_id, created_at_ms) VALUES (?, ?, ?, ?, ?)",
                    (order.merchant_id, order.merchant_order_no, order.fingerprint,
                     order.order_id, now_ms),
                )
                conn.execute(_INSERT_ORDER, _order_row(order, now_ms))
                conn.executemany(_INSERT_LEG, [_leg_row(order.order_id, leg) for leg in order.legs])
                submitted = [Transition("order", "", order.state.value, order.cause)]
                self._journal(conn, now_ms, "order", order.order_id,
                              [*submitted, *also_journal])
                outbox.record_order_events(conn, order, submitted, now_ms)
            return None
        except sqlite3.IntegrityError:
            pass
        with self._read(snapshot=False) as conn:
            row = conn.execute(  # attempt 1's: the trade order's key may have later attempts
                "SELECT order_id, fingerprint FROM payment_orders"
                " WHERE merchant_id = ? AND merchant_order_no = ? AND attempt = 1",
                (order.merchant_id, order.merchant_order_no),
            ).fetchone()
        assert row is not None, "insert failed on a key that does not exist"
        if row[1] != order.fingerprint:
            raise IdempotencyConflict(
                f"merchant order {order.merchant_id}/{order.merchant_order_no} was submitted "
                "before with different parameters"
            )
        existing = self.load_order(row[0])
        assert existing is not None
        return existing

    def _insert_attempt(self, order: PaymentOrder, now_ms: int,
                        also_journal: Sequence[Transition],
                        may_follow: Callable[[PaymentOrder], None],
                        nonce: merchants.NonceUse | None) -> PaymentOrder | None:
        key = (order.merchant_id, order.merchant_order_no)
        if self.attempt_order_id(*key, order.attempt) is None:
            try:
                with self._tx() as conn:
                    if conn.execute(  # made meanwhile by a concurrent submit: answer with it
                        "SELECT 1 FROM payment_orders WHERE merchant_id = ?"
                        " AND merchant_order_no = ? AND attempt = ?", (*key, order.attempt)
                    ).fetchone() is not None:
                        raise _AttemptExists
                    row = conn.execute(
                        "SELECT order_id FROM trade_orders WHERE merchant_id = ?"
                        " AND merchant_order_no = ?", key).fetchone()
                    if row is None:
                        raise AttemptRefused(
                            f"trade order {key[0]}/{key[1]} was never submitted: attempt "
                            f"{order.attempt} needs attempt 1 first")
                    rows = conn.execute(_LOAD_ORDER, (row[0],)).fetchall()
                    may_follow(_order_from_rows(rows[0][:_HAS_REFUNDS], [
                        r[_HAS_REFUNDS + 1:] for r in rows if r[_HAS_REFUNDS + 1] is not None]))
                    if nonce is not None:
                        merchants.insert_nonce(conn, nonce)
                    _claim_quote(conn, order)
                    conn.execute("UPDATE trade_orders SET order_id = ? WHERE merchant_id = ?"
                                 " AND merchant_order_no = ?", (order.order_id, *key))
                    conn.execute(_INSERT_ORDER, _order_row(order, now_ms))
                    conn.executemany(_INSERT_LEG, [_leg_row(order.order_id, leg)
                                                   for leg in order.legs])
                    submitted = [Transition("order", "", order.state.value,
                                            f"{order.cause} (attempt {order.attempt})")]
                    self._journal(conn, now_ms, "order", order.order_id,
                                  [*submitted, *also_journal])
                    outbox.record_order_events(conn, order, submitted, now_ms)
                return None
            except (sqlite3.IntegrityError, _AttemptExists):
                pass  # a concurrent submit of the same attempt won
        existing_id = self.attempt_order_id(*key, order.attempt)
        assert existing_id is not None, "an attempt refused by its index exists"
        existing = self.load_order(existing_id)
        assert existing is not None
        if existing.fingerprint != order.fingerprint:
            raise IdempotencyConflict(
                f"attempt {order.attempt} of merchant order {key[0]}/{key[1]} was submitted "
                "before with different parameters")
        return existing

    def attempt_order_id(self, merchant_id: str, merchant_order_no: str, attempt: int
                         ) -> str | None:
        """The order of one attempt of a trade order, if it was made."""
        with self._read(snapshot=False) as conn:
            row = conn.execute(
                "SELECT order_id FROM payment_orders WHERE merchant_id = ?"
                " AND merchant_order_no = ? AND attempt = ?",
                (merchant_id, merchant_order_no, attempt)).fetchone()
        return None if row is None else str(row[0])

    def save_order(
        self, order: PaymentOrder, transitions: Sequence[Transition], now_ms: int,
        postings: Sequence[Posting] = (), *, before: PaymentOrder | None = None,
        skew_ledger: bool = False,
    ) -> None:
        """Write a decided order with its ledger postings, as one change. Optimistic: the
        stored version must be ``before``'s (the order as last stored), or ``order.version
        - 1`` without it. Given ``before``, only the legs that changed are written, and
        ``transitions`` and ``postings`` are those of every decision since ``before``.

        ``skew_ledger`` is the simulator's planted bug ``ledger-unbalanced``: one entry off by
        one minor unit, for proving the oracle's zero-sum check has teeth. Never set it.
        """
        with self._tx(1 + len(order.legs) + len(transitions) + 2 * len(postings)) as conn:
            cur = conn.execute(
                "UPDATE payment_orders SET state = ?, cause = ?, query_attempt = ?,"
                " next_query_at_ms = ?, refund_query_attempt = ?, next_refund_query_at_ms = ?,"
                " voucher_attempt = ?, next_voucher_retry_at_ms = ?,"
                " version = ?, prepay = ?, pay_details = ?, verification = ?, updated_at_ms = ?,"
                " settled = ?, payment_serial = ?, routing = ?, total_minor = ?,"
                " authorisation = ?"
                " WHERE order_id = ? AND version = ?",
                (order.state.value, order.cause, order.query_attempt, order.next_query_at_ms,
                 order.refund_query_attempt, order.next_refund_query_at_ms,
                 order.voucher_attempt, order.next_voucher_retry_at_ms, order.version,
                 _json_or_none(prepay_json(order.prepay)),
                 _json_or_none(details_json(_stored_details(order))),
                 _json_or_none(verification_json(order.verification)), now_ms,
                 int(order.is_settled), order.payment_serial,
                 _json_or_none(routing_json(order)), order.total_minor,
                 _json_or_none(authorisation_json(order)), order.order_id,
                 order.version - 1 if before is None else before.version),
            )
            assert cur.rowcount == 1, (
                f"order {order.order_id}: stored version is not the one it was decided from; "
                "two writers for one order"
            )
            left = order.tried if before is None else order.tried[len(before.tried):]
            if left:
                conn.executemany(
                    "INSERT OR IGNORE INTO order_serials (payment_serial, order_id) VALUES (?, ?)",
                    [(t.payment_serial, order.order_id) for t in left])
            changed_legs = order.legs if before is None else [
                leg for leg, old in zip(order.legs, before.legs, strict=True)
                if leg is not old and leg != old]
            if changed_legs:
                _update_legs(conn, order.order_id, changed_legs)
            entities = {t.entity for t in transitions if t.entity.startswith("refund:")}
            if entities:
                conn.executemany(_UPSERT_REFUND, [
                    _refund_row(order.order_id, r) for r in order.refunds
                    if any(e == f"refund:{r.refund_id}" or e.startswith(f"refund:{r.refund_id}:")
                           for e in entities)])
            if postings:
                conn.execute(_INSERT_POSTINGS, _postings_row(order, postings, now_ms, skew_ledger))
            self._journal(conn, now_ms, "order", order.order_id, transitions)
            outbox.record_order_events(conn, order, transitions, now_ms)

    # ------------------------------------------------------------------ ledger

    def ledger_balances(self, order_id: str | None = None) -> dict[str, dict[str, int]]:
        """``{currency: {account: minor}}`` of every ledger account (of one order's postings
        if ``order_id``). Amounts of two currencies are never added together."""
        where, args = ("WHERE l.order_id = ?", (order_id,)) if order_id else ("", ())
        with self._read(snapshot=False) as conn:
            rows = conn.execute(f"SELECT {_ENTRY_CURRENCY}, {_ENTRY_ACCOUNT}, SUM({_ENTRY_MINOR})"
                                f" FROM {_LEDGER_ENTRIES} {where}"
                                " GROUP BY 1, 2 ORDER BY 1, 2", args).fetchall()
        balances: dict[str, dict[str, int]] = {}
        for currency, account, total in rows:
            balances.setdefault(str(currency), {})[str(account)] = int(total)
        return balances

    def unbalanced_postings(self, limit: int = 100) -> list[tuple[str, int]]:
        """Postings whose entries do not sum to zero (none, unless there is a bug)."""
        with self._read(snapshot=False) as conn:
            rows = conn.execute(
                f"SELECT {_POSTING_ID}, SUM({_ENTRY_MINOR}) FROM {_LEDGER_ENTRIES}"
                f" GROUP BY l.seq, p.key HAVING SUM({_ENTRY_MINOR}) != 0 LIMIT ?",
                (limit,)).fetchall()
        return [(str(posting), int(total)) for posting, total in rows]

    def ledger_entries(self, order_id: str) -> list[tuple[str, str, int, str]]:
        """(posting_id, account, amount_minor, memo) of one order, oldest first."""
        with self._read(snapshot=False) as conn:
            rows = conn.execute(
                f"SELECT {_POSTING_ID}, {_ENTRY_ACCOUNT}, {_ENTRY_MINOR}, {_POSTING_MEMO}"
                f" FROM {_LEDGER_ENTRIES} WHERE l.order_id = ? ORDER BY l.seq, p.key, e.key",
                (order_id,)).fetchall()
        return [(str(p), str(a), int(m), str(memo)) for p, a, m, memo in rows]

    def iter_account_movements(self, account: str, batch_size: int = 1_000
                               ) -> Iterator[tuple[int, str, int]]:
        """(at_ms, currency, minor) of every ledger change that moved ``account``, in commit
        order, read in batches of ``batch_size`` (a report's time series: the simulator's
        money in transit)."""
        with self._read(snapshot=True) as conn:
            cursor = conn.execute(
                f"SELECT l.at_ms, {_ENTRY_CURRENCY}, SUM({_ENTRY_MINOR}) FROM {_LEDGER_ENTRIES}"
                f" WHERE {_ENTRY_ACCOUNT} = ? GROUP BY l.seq ORDER BY l.seq", (account,))
            try:
                while rows := cursor.fetchmany(batch_size):
                    for at_ms, currency, minor in rows:
                        yield int(at_ms), str(currency), int(minor)
            finally:
                cursor.close()  # a consumer that stopped early leaves no statement open

    def load_order(self, order_id: str) -> PaymentOrder | None:
        """The order with its legs and refunds, as last committed.

        One statement (the order joined to its legs, and whether it has refunds), which is
        its own snapshot: an actor's start (100,000 of them when an engine reopens with that
        many open orders) was a BEGIN, three queries and a COMMIT. An order with refunds is
        read again in one snapshot with them.
        """
        with self._read(snapshot=False) as conn:
            rows = conn.execute(_LOAD_ORDER, (order_id,)).fetchall()
        if not rows:
            return None
        if not rows[0][_HAS_REFUNDS]:
            legs = [r[_HAS_REFUNDS + 1:] for r in rows if r[_HAS_REFUNDS + 1] is not None]
            return _order_from_rows(rows[0][:_HAS_REFUNDS], legs)
        return self._load_order_with_refunds(order_id)

    def _load_order_with_refunds(self, order_id: str) -> PaymentOrder | None:
        with self._read() as conn:
            row = conn.execute(f"SELECT {_ORDER_COLUMNS} FROM payment_orders WHERE order_id = ?",
                               (order_id,)).fetchone()
            if row is None:
                return None
            legs = conn.execute(
                f"SELECT {_LEG_COLUMNS} FROM legs WHERE order_id = ? ORDER BY leg_no", (order_id,)
            ).fetchall()
            refunds = conn.execute(
                f"SELECT {_REFUND_COLUMNS} FROM refunds WHERE order_id = ? ORDER BY rowid",
                (order_id,)).fetchall()
        order = _order_from_rows(row, legs)
        if refunds:
            order = replace(order, refunds=tuple(_refund_from_row(r) for r in refunds))
        return order

    def order_exists(self, order_id: str) -> bool:
        with self._read(snapshot=False) as conn:
            return conn.execute("SELECT 1 FROM payment_orders WHERE order_id = ?",
                                (order_id,)).fetchone() is not None

    def order_id_for_serial(self, payment_serial: str) -> str | None:
        """The order paying under ``payment_serial`` now, or that paid under it by a route it
        left (``order_serials``)."""
        with self._read(snapshot=False) as conn:
            row = conn.execute("SELECT order_id FROM payment_orders WHERE payment_serial = ?"
                               " UNION ALL SELECT order_id FROM order_serials"
                               " WHERE payment_serial = ? LIMIT 1",
                               (payment_serial, payment_serial)).fetchone()
        return None if row is None else str(row[0])

    def order_id_for_merchant(self, merchant_id: str, merchant_order_no: str) -> str | None:
        with self._read(snapshot=False) as conn:
            row = conn.execute("SELECT order_id FROM trade_orders WHERE merchant_id = ?"
                               " AND merchant_order_no = ?",
                               (merchant_id, merchant_order_no)).fetchone()
        return None if row is None else str(row[0])

    def unsettled_order_ids(self) -> list[str]:
        """Orders with work left: not terminal, or a leg still in flight. Oldest first."""
        with self._read(snapshot=False) as conn:
            rows = conn.execute(
                "SELECT order_id FROM payment_orders WHERE settled = 0 ORDER BY created_at_ms"
            ).fetchall()
        return [str(r[0]) for r in rows]

    def unsettled_orders_by_channel(self) -> dict[str, int]:
        """How many unsettled orders have a cash leg through each channel (``Engine.open``
        checks every one is configured). At most one row per channel ever used."""
        with self._read(snapshot=False) as conn:
            rows = conn.execute(
                "SELECT l.channel, COUNT(DISTINCT o.order_id) FROM payment_orders o"
                " JOIN legs l ON l.order_id = o.order_id"
                " WHERE o.settled = 0 AND l.channel IS NOT NULL GROUP BY l.channel"
            ).fetchall()
        return {str(channel): int(n) for channel, n in rows}

    def unsettled_authorisations_by_channel(self) -> dict[str, int]:
        """How many unsettled pump pre-authorisations have their cash leg still authorising,
        authorised, capturing or voiding through each channel (``Engine.open`` checks each
        such channel can pre-authorise; a captured one owing only refunds or voucher
        follow-ups needs no authorisation calls)."""
        with self._read(snapshot=False) as conn:
            rows = conn.execute(
                "SELECT l.channel, COUNT(DISTINCT o.order_id) FROM payment_orders o"
                " JOIN legs l ON l.order_id = o.order_id WHERE o.settled = 0"
                " AND o.authorisation IS NOT NULL AND l.mode = 'cash' AND l.channel IS NOT NULL"
                " AND l.status IN ('authorising', 'authorised', 'capturing', 'voiding')"
                " GROUP BY l.channel").fetchall()
        return {str(channel): int(n) for channel, n in rows}

    def unsettled_orders_by_provider(self) -> dict[str, int]:
        """How many unsettled orders have a voucher leg on an account of no voucher account
        here whose id has a ``<provider>:`` prefix, by that prefix (``Engine.open`` checks
        each such provider is given). At most one row per provider ever used."""
        with self._read(snapshot=False) as conn:
            rows = conn.execute(
                "SELECT substr(l.account_id, 1, instr(l.account_id, ':') - 1) AS p,"
                " COUNT(DISTINCT o.order_id) FROM payment_orders o"
                " JOIN legs l ON l.order_id = o.order_id"
                " WHERE o.settled = 0 AND instr(l.account_id, ':') > 1"
                " AND l.account_id NOT IN (SELECT account_id FROM voucher_accounts)"
                " GROUP BY p"
            ).fetchall()
        return {str(name): int(n) for name, n in rows}

    def orders_owing_follow_ups(self, limit: int) -> list[str]:
        """Unsettled orders, oldest first, that may owe a voucher follow-up: a leg confirming,
        cancelling, reversing or flagged, or a refund part sent or unknown (``engine.order.
        owed_commands`` says exactly what). At most ``limit``."""
        with self._read(snapshot=False) as conn:
            rows = conn.execute(
                "SELECT o.order_id FROM payment_orders o WHERE o.settled = 0 AND (EXISTS"
                " (SELECT 1 FROM legs l WHERE l.order_id = o.order_id AND l.status IN"
                f" ({','.join('?' * len(FOLLOW_UP_OPS))})) OR EXISTS (SELECT 1 FROM refunds r"
                " JOIN json_each(r.parts) p JOIN legs v ON v.order_id = r.order_id"
                " AND v.leg_no = json_extract(p.value, '$[0]') AND v.mode != ?"
                " WHERE r.order_id = o.order_id"
                " AND json_extract(p.value, '$[3]') IN (?, ?, ?)))"
                " ORDER BY o.created_at_ms, o.order_id LIMIT ?",
                (*(status.value for status in FOLLOW_UP_OPS), LegMode.CASH.value,
                 PartStatus.SENT.value, PartStatus.UNKNOWN.value, PartStatus.REVERSING.value,
                 limit)).fetchall()
        return [str(r[0]) for r in rows]

    def orders_of_shift(self, station_id: str, shift_id: str, batch_size: int = 500
                        ) -> Iterator[PaymentOrder]:
        """The orders sold at ``station_id`` during ``shift_id`` (``FuelSale``), in batches
        so memory stays bounded; by the (station, shift) index."""
        return self._orders_where("station_id = ? AND shift_id = ? AND", (station_id, shift_id),
                                  batch_size)

    def iter_orders(self, batch_size: int = 500) -> Iterator[PaymentOrder]:
        """Every order, in batches so memory stays bounded."""
        return self._orders_where("", (), batch_size)

    def _orders_where(self, condition: str, args: tuple[object, ...], batch_size: int
                      ) -> Iterator[PaymentOrder]:
        """The orders matching ``condition`` (a constant SQL prefix ending in AND, or ""),
        by order id, ``batch_size`` ids read at a time."""
        last = ""
        while True:
            with self._read(snapshot=False) as conn:
                ids = [r[0] for r in conn.execute(
                    f"SELECT order_id FROM payment_orders WHERE {condition} order_id > ?"
                    " ORDER BY order_id LIMIT ?", (*args, last, batch_size)).fetchall()]
            if not ids:
                return
            for order_id in ids:
                order = self.load_order(order_id)
                assert order is not None
                yield order
            last = ids[-1]

    def count_orders_by_state(self) -> dict[str, int]:
        with self._read(snapshot=False) as conn:
            rows = conn.execute(
                "SELECT state, COUNT(*) FROM payment_orders GROUP BY state ORDER BY state"
            ).fetchall()
        return {str(state): int(n) for state, n in rows}

    def recent_user_orders(self, user_id: str, since_ms: int, total_minor: int, currency: str,
                           limit: int = 10) -> list[PaymentOrder]:
        """The user's newest orders for this amount since ``since_ms`` (for the duplicate
        guard), newest first; the index on (user_id, created_at_ms) keeps it cheap."""
        with self._read(snapshot=False) as conn:
            ids = [r[0] for r in conn.execute(
                "SELECT order_id FROM payment_orders WHERE user_id = ? AND created_at_ms >= ?"
                " AND total_minor = ? AND currency = ? ORDER BY created_at_ms DESC LIMIT ?",
                (user_id, since_ms, total_minor, currency, limit)).fetchall()]
        return [o for o in map(self.load_order, ids) if o is not None]

    def count_recent_orders(self, *, since_ms: int, until_ms: int, count_max: int,
                            user_id: str | None = None, device_id: str | None = None) -> int:
        """Orders of ``user_id`` (or from ``device_id``) created in ``since_ms < created <=
        until_ms`` (``engine.risk.in_window``), counted up to ``count_max``: bounded, and
        cheap on the (user_id | device_id, created_at_ms) indexes. For the risk gate."""
        column, value = ("user_id", user_id) if user_id is not None else ("device_id", device_id)
        assert value is not None and column in ("user_id", "device_id")
        with self._read(snapshot=False) as conn:
            row = conn.execute(
                f"SELECT COUNT(*) FROM (SELECT 1 FROM payment_orders WHERE {column} = ?"
                " AND created_at_ms > ? AND created_at_ms <= ? LIMIT ?)",
                (value, since_ms, until_ms, count_max)).fetchone()
        return int(row[0])

    # ------------------------------------------------------------------ accounts

    def create_account(self, account: VoucherAccount, now_ms: int) -> VoucherAccount:
        """Create an empty account, or return the existing one if it has the same unit."""
        try:
            with self._tx() as conn:
                conn.execute(
                    "INSERT INTO voucher_accounts (account_id, unit, minor_per_unit, funded,"
                    " available, held, spent, version, created_at_ms)"
                    " VALUES (?, ?, ?, 0, 0, 0, 0, 0, ?)",
                    (account.account_id, account.unit, account.minor_per_unit, now_ms),
                )
                self._journal(conn, now_ms, "account", account.account_id,
                              [Transition("account", "", "open", f"unit {account.unit}")])
            return account
        except sqlite3.IntegrityError:
            existing = self.load_account(account.account_id)
            assert existing is not None
            if (existing.unit, existing.minor_per_unit) != (account.unit, account.minor_per_unit):
                raise AccountExists(
                    f"account {account.account_id} exists in {existing.unit}"
                    f" ({existing.minor_per_unit} minor per unit)"
                ) from None
            return existing

    def load_account(self, account_id: str) -> VoucherAccount | None:
        with self._read(snapshot=False) as conn:
            row = conn.execute(
                f"SELECT {_ACCOUNT_COLUMNS}"
                " FROM voucher_accounts WHERE account_id = ?", (account_id,)).fetchone()
        return None if row is None else _account_from_row(row)

    def account_units(self, account_ids: Iterable[str]) -> dict[str, AccountUnit]:
        """The unit of each account that exists. An account's unit never changes once it is
        created, so units are remembered (bounded) and every submit is not a read."""
        cache = self._units
        units: dict[str, AccountUnit] = {}
        for account_id in account_ids:
            known = cache.get(account_id)  # get: another thread may clear it meanwhile
            if known is not None:
                units[account_id] = known
        ids = [a for a in dict.fromkeys(account_ids) if a not in units]
        if not ids:
            return units
        marks = ",".join("?" * len(ids))
        with self._read(snapshot=False) as conn:
            rows = conn.execute(
                f"SELECT account_id, unit, minor_per_unit FROM voucher_accounts"
                f" WHERE account_id IN ({marks})", ids).fetchall()
        if len(cache) + len(rows) > _UNITS_REMEMBERED_MAX:
            cache.clear()
        for account_id, unit, minor_per_unit in rows:
            units[account_id] = cache[account_id] = AccountUnit(unit, minor_per_unit)
        return units

    def load_fence(self, account_id: str, key: FenceKey) -> Fence | None:
        with self._read(snapshot=False) as conn:
            row = conn.execute(f"SELECT {_FENCE_COLUMNS} FROM holds"
                               " WHERE account_id = ? AND scope = ? AND owner = ? AND leg = ?",
                               (account_id, key.scope.value, key.owner, key.leg)).fetchone()
        return None if row is None else _fence_from_row(row)

    def pending_holds(self, account_id: str) -> list[Fence]:
        with self._read(snapshot=False) as conn:
            rows = conn.execute(f"SELECT {_FENCE_COLUMNS} FROM holds WHERE account_id = ?"
                                " AND status = 'pending' ORDER BY expires_at_ms",
                                (account_id,)).fetchall()
        return [_fence_from_row(r) for r in rows]

    def funding_amount(self, funding_id: str) -> tuple[str, int] | None:
        with self._read(snapshot=False) as conn:
            row = conn.execute("SELECT account_id, amount FROM fundings WHERE funding_id = ?",
                               (funding_id,)).fetchone()
        return None if row is None else (str(row[0]), int(row[1]))

    def save_account(
        self,
        before: VoucherAccount,
        after: VoucherAccount,
        fences: Sequence[Fence],
        transitions: Sequence[Transition],
        now_ms: int,
        funding: tuple[str, int] | None = None,
    ) -> None:
        """Write balances (checked against ``before``), fence rows and journal in one commit,
        with an outbox event for each hold that expired (``pending -> expired``: its owner has
        the voucher back)."""
        with self._tx() as conn:
            cur = conn.execute(
                "UPDATE voucher_accounts SET funded = ?, available = ?, held = ?, spent = ?,"
                " version = version + 1 WHERE account_id = ? AND funded = ? AND available = ?"
                " AND held = ? AND spent = ?",
                (after.funded, after.available, after.held, after.spent, after.account_id,
                 before.funded, before.available, before.held, before.spent),
            )
            assert cur.rowcount == 1, f"account {after.account_id}: balances changed underneath"
            conn.executemany(
                "INSERT INTO holds (account_id, scope, owner, leg, kind, status, amount, order_id,"
                " expires_at_ms, updated_at_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (account_id, scope, owner, leg) DO UPDATE SET"
                " status = excluded.status, order_id = excluded.order_id,"
                " amount = excluded.amount,"
                " expires_at_ms = excluded.expires_at_ms, updated_at_ms = excluded.updated_at_ms",
                [(f.account_id, f.key.scope.value, f.key.owner, f.key.leg, f.kind.value,
                  f.status.value, f.amount, f.order_id, f.expires_at_ms, f.updated_at_ms)
                 for f in fences],
            )
            if funding is not None:
                conn.execute("INSERT INTO fundings (funding_id, account_id, amount, at_ms)"
                             " VALUES (?, ?, ?, ?)", (funding[0], after.account_id, funding[1],
                                                      now_ms))
            self._journal(conn, now_ms, "account", after.account_id, transitions)
            expired = _hold_expiries(after, fences, transitions)
            if expired:
                version = conn.execute("SELECT version FROM voucher_accounts WHERE account_id = ?",
                                       (after.account_id,)).fetchone()[0]
                outbox.record_hold_events(conn, int(version), expired, now_ms)

    def set_account_status(self, before: VoucherAccount, after: VoucherAccount,
                           now_ms: int) -> None:
        """Write an account's new status with its journal entry, as one change."""
        with self._tx(2) as conn:
            conn.execute("UPDATE voucher_accounts SET status = ?, version = version + 1"
                         " WHERE account_id = ?", (after.status.value, after.account_id))
            self._journal(conn, now_ms, "account", after.account_id, [
                Transition("status", before.status.value, after.status.value, "set")])

    def accounts_with_pending_holds(self) -> list[str]:
        with self._read(snapshot=False) as conn:
            rows = conn.execute("SELECT DISTINCT account_id FROM holds WHERE status = 'pending'"
                                " ORDER BY account_id").fetchall()
        return [str(r[0]) for r in rows]

    def extend_holds_of_unsettled_orders(self, now_ms: int, grace_ms: int) -> int:
        """At open: give every pending hold of an unsettled order time to be decided.

        A hold's expiry is set past its order's close, so in a running engine the order's
        Confirm or Cancel always arrives in time. After a long outage it may not: an order
        that decided success (or is deducting) would find its hold expired and the voucher
        back with the user. Every unsettled order confirms or cancels each of its holds once
        resumed, so their expiry is moved to ``now + grace`` first. Returns how many.
        """
        with self._tx() as conn:
            # A pending fence bound to an order is one of that order's legs: its own fence
            # (scope 'order') or the user's pre-hold a leg adopted (scope 'user').
            rows = conn.execute(
                "SELECT h.account_id, h.scope, h.owner, h.leg, h.expires_at_ms FROM holds h"
                " JOIN payment_orders o ON o.order_id = h.order_id"
                " WHERE h.status = 'pending' AND o.settled = 0"
                " AND h.expires_at_ms < ?", (now_ms + grace_ms,)).fetchall()
            for account_id, scope, owner, leg, old in rows:
                key = FenceKey(FenceScope(scope), str(owner), int(leg))
                conn.execute("UPDATE holds SET expires_at_ms = ?, updated_at_ms = ?"
                             " WHERE account_id = ? AND scope = ? AND owner = ? AND leg = ?",
                             (now_ms + grace_ms, now_ms, account_id, scope, owner, leg))
                self._journal(conn, now_ms, "account", account_id, [Transition(
                    key.journal_part, "pending", "pending",
                    f"expiry {old} extended at open: its order has not decided yet")])
        return len(rows)

    def confirm_owed(self, fence: Fence) -> bool:
        """True if the order holding ``fence`` decided to confirm it and has not heard the
        answer yet (its leg is ``confirming`` or ``confirm_unknown``): the hold must not
        expire under it. An order's own fence names its leg; an adopted pre-hold is found
        by the order's pre-held leg on that account."""
        key = fence.key
        if fence.order_id is None or key.scope is FenceScope.REFUND:
            return False
        statuses = (LegStatus.CONFIRMING.value, LegStatus.CONFIRM_UNKNOWN.value)
        with self._read(snapshot=False) as conn:
            if key.scope is FenceScope.ORDER:
                row = conn.execute(
                    "SELECT 1 FROM legs WHERE order_id = ? AND leg_no = ? AND account_id = ?"
                    " AND status IN (?, ?)",
                    (key.owner, key.leg, fence.account_id, *statuses)).fetchone()
            else:
                row = conn.execute(
                    "SELECT 1 FROM legs WHERE order_id = ? AND account_id = ? AND hold_id = ?"
                    " AND mode = ? AND status IN (?, ?)",
                    (fence.order_id, fence.account_id, key.owner, LegMode.PRE_HELD.value,
                     *statuses)).fetchone()
        return row is not None

    # ------------------------------------------------------------------ journal

    @staticmethod
    def _journal(conn: sqlite3.Connection, now_ms: int, kind: str, entity_id: str,
                 transitions: Sequence[Transition]) -> None:
        """Append one change's transitions as one row (one statement, not one per
        transition: a payment's journal was a quarter of its statements)."""
        if transitions:
            conn.execute(
                "INSERT INTO journal (at_ms, entity_kind, entity_id, transitions)"
                " VALUES (?, ?, ?, ?)",
                (now_ms, kind, entity_id, json.dumps(
                    [[t.entity, t.from_state, t.to_state, t.cause] for t in transitions],
                    ensure_ascii=False, separators=(",", ":"))))

    def journal(self, entity_kind: str, entity_id: str) -> list[JournalEntry]:
        with self._read(snapshot=False) as conn:
            rows = conn.execute(
                "SELECT seq, at_ms, transitions FROM journal"
                " WHERE entity_kind = ? AND entity_id = ? ORDER BY seq",
                (entity_kind, entity_id)).fetchall()
        return [JournalEntry(int(seq), int(at_ms), entity_kind, entity_id, str(part),
                             str(from_state), str(to_state), str(cause))
                for seq, at_ms, packed in rows
                for part, from_state, to_state, cause in json.loads(packed)]

    def all_accounts(self) -> list[VoucherAccount]:
        with self._read(snapshot=False) as conn:
            rows = conn.execute(
                f"SELECT {_ACCOUNT_COLUMNS}"
                " FROM voucher_accounts ORDER BY account_id").fetchall()
        return [_account_from_row(r) for r in rows]

    def accounts_with_fences(self) -> list[tuple[VoucherAccount, list[Fence]]]:
        """Every account with all its fences, read in one snapshot (for consistency checks
        while actors keep writing)."""
        with self._read() as conn:
            accounts = [_account_from_row(r) for r in conn.execute(
                f"SELECT {_ACCOUNT_COLUMNS}"
                " FROM voucher_accounts ORDER BY account_id").fetchall()]
            fences: dict[str, list[Fence]] = {a.account_id: [] for a in accounts}
            for row in conn.execute(f"SELECT {_FENCE_COLUMNS} FROM holds"
                                    " ORDER BY scope, owner, leg"):
                fence = _fence_from_row(row)
                fences.setdefault(fence.account_id, []).append(fence)
        return [(a, fences[a.account_id]) for a in accounts]

    def top_ups(self) -> dict[str, int]:
        """Each account's top-ups (``Engine.fund``) summed: what it was funded with besides
        the credits of recharges and transfers (its ``credit`` fences)."""
        with self._read(snapshot=False) as conn:
            rows = conn.execute("SELECT account_id, SUM(amount) FROM fundings"
                                " GROUP BY account_id").fetchall()
        return {str(r[0]): int(r[1]) for r in rows}

    def fences_of(self, account_id: str) -> list[Fence]:
        with self._read(snapshot=False) as conn:
            rows = conn.execute(f"SELECT {_FENCE_COLUMNS} FROM holds WHERE account_id = ?"
                                " ORDER BY scope, owner, leg", (account_id,)).fetchall()
        return [_fence_from_row(r) for r in rows]


class _AttemptExists(Exception):
    """Leaves an attempt's insert, writing nothing: a concurrent submit made that attempt."""


def _hold_expiries(account: VoucherAccount, fences: Sequence[Fence],
                   transitions: Sequence[Transition]) -> list[outbox.HoldChange]:
    """The holds of one account commit that went ``pending -> expired``: outbox events."""
    changes: list[outbox.HoldChange] = []
    for fence in fences:
        if fence.status is not FenceStatus.EXPIRED:
            continue
        for t in transitions:
            if t.entity == fence.key.journal_part and (t.from_state, t.to_state) == (
                FenceStatus.PENDING.value, FenceStatus.EXPIRED.value
            ):
                changes.append(outbox.HoldChange(fence.account_id, fence.key.public_id, fence.amount,
                                                 account.unit, fence.order_id, t.from_state,
                                                 t.to_state, t.cause))
    return changes


def _lock_exclusively(lock_path: str) -> IO[str]:
    handle = open(lock_path, "a+", encoding="utf-8")  # noqa: SIM115 - held while open
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise DatabaseInUse(
            f"{lock_path[:-5]} is open in another engine; close it first") from None
    return handle


# ---------------------------------------------------------------------- row mapping

_LEG_CHANGING_COLUMNS = ("status", "channel_txn_id", "channel_code", "refund_id", "channel",
                         "amount", "value_minor")
"""The channel changes only when a payment falls back to its next route; the amounts only
when a pre-authorisation is captured short."""


@functools.lru_cache(maxsize=16)
def _update_legs_sql(legs: int) -> str:
    """One UPDATE for ``legs`` legs of one order (a CASE per column), not one per leg."""
    whens = " ".join(["WHEN ? THEN ?"] * legs)
    sets = ", ".join(f"{col} = CASE leg_no {whens} END" for col in _LEG_CHANGING_COLUMNS)
    marks = ", ".join(["?"] * legs)
    return f"UPDATE legs SET {sets} WHERE order_id = ? AND leg_no IN ({marks})"


def _update_legs(conn: sqlite3.Connection, order_id: str, legs: Sequence[Leg]) -> None:
    """Write the changing columns of ``legs`` (rows that exist) in one statement."""
    params: list[object] = []
    columns: tuple[list[object], ...] = (  # in the order of _LEG_CHANGING_COLUMNS
        [leg.status.value for leg in legs], [leg.channel_txn_id for leg in legs],
        [leg.channel_code for leg in legs], [leg.refund_id for leg in legs],
        [leg.channel for leg in legs], [leg.amount for leg in legs],
        [leg.value_minor for leg in legs])
    for values in columns:
        for leg, value in zip(legs, values, strict=True):
            params += (leg.leg_no, value)
    params.append(order_id)
    params += [leg.leg_no for leg in legs]
    cur = conn.execute(_update_legs_sql(len(legs)), params)
    assert cur.rowcount == len(legs), f"order {order_id}: legs missing from the table"


_UNITS_REMEMBERED_MAX = 100_000
"""Account units kept in memory by ``Store.account_units`` (dropped all at once beyond)."""

_ORDER_COLUMNS = (
    "order_id, merchant_id, merchant_order_no, payment_serial, user_id, title, currency,"
    " total_minor, fingerprint, state, cause, created_at_ms, close_at_ms, hold_expires_at_ms,"
    " query_attempt, next_query_at_ms, refund_query_attempt, next_refund_query_at_ms,"
    " voucher_attempt, next_voucher_retry_at_ms, version, pay_details, prepay, attempt,"
    " verification, sale, routing, authorisation"
)
_INSERT_ORDER = (
    f"INSERT INTO payment_orders ({_ORDER_COLUMNS}, device_id, station_id, shift_id,"
    " updated_at_ms, settled) VALUES (" + ",".join("?" * 33) + ")"
)
_LEG_COLUMNS = (
    "leg_no, mode, account_id, amount, unit, value_minor, hold_id, status, channel,"
    " channel_txn_id, channel_code, refund_id"
)
_HAS_REFUNDS = _ORDER_COLUMNS.count(",") + 1
"""Index of the refunds flag in a ``_LOAD_ORDER`` row: after the order's columns."""
_LOAD_ORDER = (
    "SELECT " + ", ".join(f"o.{c.strip()}" for c in _ORDER_COLUMNS.split(","))
    + ", EXISTS (SELECT 1 FROM refunds r WHERE r.order_id = o.order_id), "
    + ", ".join(f"l.{c.strip()}" for c in _LEG_COLUMNS.split(","))
    + " FROM payment_orders o LEFT JOIN legs l ON l.order_id = o.order_id"
    " WHERE o.order_id = ? ORDER BY l.leg_no"
)
_INSERT_LEG = (
    f"INSERT INTO legs (order_id, {_LEG_COLUMNS}) VALUES (" + ",".join("?" * 13) + ")"
)
_ACCOUNT_COLUMNS = ("account_id, unit, minor_per_unit, funded, available, held, spent,"
                    " COALESCE(status, 'active')")
_ACCOUNT_STATUSES = {m.value: m for m in AccountStatus}


def _account_from_row(r: Sequence[Any]) -> VoucherAccount:
    account_id, unit, minor_per_unit, funded, available, held, spent, status = r
    return VoucherAccount(str(account_id), str(unit),
                          None if minor_per_unit is None else int(minor_per_unit), int(funded),
                          int(available), int(held), int(spent), _ACCOUNT_STATUSES[status])


_FENCE_COLUMNS = ("scope, owner, leg, account_id, kind, status, amount, order_id, expires_at_ms,"
                  " updated_at_ms")


_INSERT_POSTINGS = (
    "INSERT INTO ledger (order_id, version, currency, at_ms, postings) VALUES (?, ?, ?, ?, ?)"
)
# The ledger's entries, one row each, out of the packed rows (SQLite's JSON1 table functions):
# l = the change's row, p = one of its postings, e = one entry of that posting.
_LEDGER_ENTRIES = "ledger l, json_each(l.postings) p, json_each(p.value, '$[1]') e"
_ENTRY_ACCOUNT = "json_extract(e.value, '$[0]')"
_ENTRY_MINOR = "json_extract(e.value, '$[1]')"
_ENTRY_CURRENCY = "l.currency"
_POSTING_MEMO = "json_extract(p.value, '$[0]')"
_POSTING_ID = "l.order_id || ':' || l.version || ':' || p.key"


def _postings_row(order: PaymentOrder, postings: Sequence[Posting], now_ms: int,
                  skew: bool) -> tuple[object, ...]:
    """One change's postings as one row (one statement, where one row per entry was a fifth
    of a payment's statements). ``skew``: the planted bug, first entry off by one."""
    packed = [[posting.memo, [[entry.account, entry.amount_minor + (
        1 if skew and n == 0 and i == 0 else 0)] for i, entry in enumerate(posting.entries)]]
        for n, posting in enumerate(postings)]
    return (order.order_id, order.version, order.currency, now_ms,
            json.dumps(packed, ensure_ascii=False, separators=(",", ":")))


_REFUND_COLUMNS = ("refund_id, refund_no, kind, amount_minor, reason, status, requested_at_ms,"
                   " parts, channel, payment_serial")
_UPSERT_REFUND = (
    f"INSERT INTO refunds (order_id, {_REFUND_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (order_id, refund_id) DO UPDATE SET status = excluded.status,"
    " parts = excluded.parts"
)


def _refund_row(order_id: str, refund: Refund) -> tuple[object, ...]:
    parts = json.dumps([[p.leg_no, p.amount, p.value_minor, p.status.value] for p in refund.parts])
    return (order_id, refund.refund_id, refund.refund_no, refund.kind.value, refund.amount_minor,
            refund.reason, refund.status.value, refund.requested_at_ms, parts, refund.channel,
            refund.payment_serial)


def _refund_from_row(r: Sequence[Any]) -> Refund:
    refund_id, refund_no, kind, amount, reason, status, requested, parts, channel, serial = r
    return Refund(
        refund_id=str(refund_id), refund_no=str(refund_no), kind=RefundKind(kind),
        amount_minor=int(amount), reason=str(reason or ""), status=RefundStatus(status),
        parts=tuple(RefundPart(int(leg), int(units), int(value), PartStatus(st))
                    for leg, units, value, st in json.loads(parts)),
        requested_at_ms=int(requested),
        channel=None if channel is None else str(channel),
        payment_serial=None if serial is None else str(serial),
    )


def _claim_quote(conn: sqlite3.Connection, order: PaymentOrder) -> None:
    """The quote a new order was priced by becomes its trade order's (``quotes.claim``)."""
    if order.sale is not None and order.sale.quote_id is not None:
        quotes.claim(conn, order.sale.quote_id, order.merchant_order_no)


def _order_row(order: PaymentOrder, now_ms: int) -> tuple[object, ...]:
    return (
        order.order_id, order.merchant_id, order.merchant_order_no, order.payment_serial,
        order.user_id, order.title, order.currency, order.total_minor, order.fingerprint,
        order.state.value, order.cause, order.created_at_ms, order.close_at_ms,
        order.hold_expires_at_ms, order.query_attempt, order.next_query_at_ms,
        order.refund_query_attempt, order.next_refund_query_at_ms, order.voucher_attempt,
        order.next_voucher_retry_at_ms, order.version,
        _json_or_none(details_json(order.pay_details)), _json_or_none(prepay_json(order.prepay)),
        order.attempt, _json_or_none(verification_json(order.verification)),
        _json_or_none(priced_sale_json(order.sale)),
        _json_or_none(routing_json(order)),
        _json_or_none(authorisation_json(order)),
        None if order.pay_details is None else order.pay_details.device_id,
        None if order.sale is None else order.sale.sale.station_id,
        None if order.sale is None else order.sale.sale.shift_id,
        now_ms, int(order.is_settled),
    )


def _stored_details(order: PaymentOrder) -> PayDetails | None:
    """The pay details as stored: the payment code only while the cash leg may still be
    paid (``engine.channel_data.without_auth_code``)."""
    cash = order.cash_leg
    if cash is not None and cash.status in (LegStatus.NEW, LegStatus.PAYING):
        return order.pay_details
    return without_auth_code(order.pay_details)


def _json_or_none(value: object) -> str | None:
    return None if value is None else json.dumps(value, separators=(",", ":"))


def _json_loaded(stored: object) -> object:
    return None if stored is None else json.loads(str(stored))


def _leg_row(order_id: str, leg: Leg) -> tuple[object, ...]:
    return (
        order_id, leg.leg_no, leg.mode.value, leg.account_id, leg.amount, leg.unit,
        leg.value_minor, leg.hold_id, leg.status.value, leg.channel, leg.channel_txn_id,
        leg.channel_code, leg.refund_id,
    )


_ORDER_STATES = {m.value: m for m in OrderState}
_LEG_MODES = {m.value: m for m in LegMode}
_LEG_STATUSES = {m.value: m for m in LegStatus}
_FENCE_SCOPES = {m.value: m for m in FenceScope}
_FENCE_KINDS = {m.value: m for m in FenceKind}
_FENCE_STATUSES = {m.value: m for m in FenceStatus}
"""Enum members by stored value: a lookup, where calling the enum cost microseconds per
column (an engine reopening with 100,000 open orders reads 200,000 pending holds)."""


def _order_from_rows(row: Sequence[Any], legs: Sequence[Sequence[Any]]) -> PaymentOrder:
    (order_id, merchant_id, merchant_order_no, serial, user_id, title, currency, total,
     fingerprint, state, cause, created, close_at, hold_exp, q_attempt, next_q, rq_attempt,
     next_rq, v_attempt, next_v, version, pay_details, prepay, attempt, verification,
     sale, routing, authorisation) = row
    method, tried, fallback = routing_from_json(_json_loaded(routing))
    return PaymentOrder(
        order_id=str(order_id), merchant_id=str(merchant_id),
        merchant_order_no=str(merchant_order_no), payment_serial=str(serial),
        user_id=str(user_id), title=str(title), currency=str(currency),
        total_minor=int(total),
        fingerprint=str(fingerprint), state=_ORDER_STATES[state], cause=str(cause),
        created_at_ms=int(created), close_at_ms=int(close_at),
        hold_expires_at_ms=int(hold_exp),
        legs=tuple(_leg_from_row(r) for r in legs),
        query_attempt=int(q_attempt),
        next_query_at_ms=None if next_q is None else int(next_q),
        refund_query_attempt=int(rq_attempt),
        next_refund_query_at_ms=None if next_rq is None else int(next_rq),
        voucher_attempt=int(v_attempt or 0),
        next_voucher_retry_at_ms=None if next_v is None else int(next_v),
        version=int(version),
        pay_details=details_from_json(_json_loaded(pay_details)),
        prepay=prepay_from_json(_json_loaded(prepay)),
        attempt=int(attempt),
        verification=verification_from_json(_json_loaded(verification)),
        sale=priced_sale_from_json(_json_loaded(sale)),
        method=method, tried=tried, fallback=fallback,
        authorisation=authorisation_from_json(_json_loaded(authorisation)),
    )


def _leg_from_row(r: Sequence[Any]) -> Leg:
    (leg_no, mode, account_id, amount, unit, value, hold_id, status, channel, txn, code,
     refund_id) = r
    return Leg(
        leg_no=int(leg_no), mode=_LEG_MODES[mode],
        account_id=None if account_id is None else str(account_id),
        amount=int(amount), unit=str(unit), value_minor=int(value),
        hold_id=None if hold_id is None else str(hold_id), status=_LEG_STATUSES[status],
        channel=None if channel is None else str(channel),
        channel_txn_id=None if txn is None else str(txn),
        channel_code=None if code is None else str(code),
        refund_id=None if refund_id is None else str(refund_id),
    )


def _fence_from_row(r: Sequence[Any]) -> Fence:
    scope, owner, leg, account_id, kind, status, amount, order_id, expires, updated = r
    return Fence(
        key=FenceKey(_FENCE_SCOPES[scope], str(owner), int(leg)), account_id=str(account_id),
        kind=_FENCE_KINDS[kind], status=_FENCE_STATUSES[status], amount=int(amount),
        order_id=None if order_id is None else str(order_id),
        expires_at_ms=None if expires is None else int(expires),
        updated_at_ms=int(updated),
    )


__all__ = ["IN_FLIGHT_LEG_STATUSES", "TERMINAL_STATES", "JournalEntry", "Store"]
