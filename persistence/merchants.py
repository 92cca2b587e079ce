"""Merchants' signing keys and standing, users' standing, the nonces of signed requests, and
the signed requests refused.

Tables (``Store`` calls ``create_schema`` when it opens):

- ``merchants``: one row per merchant that has a signing key or a status: its status
  (``active``, ``frozen``, ``closed``), sign type and key (the HMAC secret, or the RSA public
  key in PEM). Kept apart from ``merchant_endpoints`` (where the engine *sends*
  notifications, with the secret *it* signs with): a merchant may call in without taking
  notifications, or the other way round, and each key is changed on its own.
- ``users``: the status of each user that was ever given one (no row: active).
- ``request_nonces``: (merchant, nonce) of every signed request taken, with its timestamp,
  until the timestamp is outside the window (``NonceBook``). Persisted, so a restart does
  not let a replay in; bounded in rows.
- ``rejected_requests`` and ``request_rejection_counts``: every refused request (bounded,
  newest kept) and the counts by reason (exact), for fund-loss monitoring.

The functions take the ``Store`` and use its transaction helpers (its lock, group commit and
crash hook), as ``persistence.rejections`` does.
"""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import sqlite_utils

from payengine.engine.errors import IllegalTransition, Overloaded, RequestRejected
from payengine.engine.merchant_request import AccountStatus, SignType
from payengine.engine.order import Transition
from payengine.persistence.rejections import append_refusal, newest_refusals, refusal_counts

if TYPE_CHECKING:
    from payengine.persistence.store import Store

REQUEST_REJECTIONS_KEPT_MAX = 100_000
"""Refused requests kept in detail; older ones are deleted (their counts are kept)."""

_WINDOW_KEY = "request_window_ms"
_FLOOR_KEY = "request_timestamp_floor_ms"


def create_schema(db: sqlite_utils.Database) -> None:
    """Create the tables and indexes if they do not exist (called under the store's lock)."""
    db.table("merchants").create(
        {"merchant_id": str, "status": str, "sign_type": str, "secret": str,
         "public_key_pem": str, "key_set_at_ms": int, "updated_at_ms": int},
        pk="merchant_id", not_null={"status", "updated_at_ms"}, if_not_exists=True,
    )
    db.table("users").create({"user_id": str, "status": str, "updated_at_ms": int},
                             pk="user_id", not_null={"status", "updated_at_ms"},
                             if_not_exists=True)
    db.table("request_nonces").create(
        {"merchant_id": str, "nonce": str, "timestamp_ms": int},
        pk=("merchant_id", "nonce"), not_null={"timestamp_ms"}, if_not_exists=True,
    )
    db.table("request_nonces").create_index(["timestamp_ms"], if_not_exists=True)
    db.table("rejected_requests").create(
        {"seq": int, "at_ms": int, "merchant_id": str, "op": str, "merchant_order_no": str,
         "nonce": str, "reason": str, "detail": str},
        pk="seq", not_null={"reason"}, if_not_exists=True,
    )
    db.table("request_rejection_counts").create({"reason": str, "count": int}, pk="reason",
                                                if_not_exists=True)


# ---------------------------------------------------------------------- merchants and users


@dataclass(frozen=True, slots=True)
class MerchantRecord:
    """A merchant's standing and signing key. The secret is kept out of ``repr`` and views."""

    merchant_id: str
    status: AccountStatus
    sign_type: SignType | None
    """``None``: no key registered (the merchant only has a status): it cannot sign."""
    secret: str | None = field(default=None, repr=False)
    public_key_pem: str | None = field(default=None, repr=False)
    key_set_at_ms: int | None = None
    updated_at_ms: int = 0


def load_merchant(store: Store, merchant_id: str) -> MerchantRecord | None:
    with store._read(snapshot=False) as conn:
        row = conn.execute(
            "SELECT merchant_id, status, sign_type, secret, public_key_pem, key_set_at_ms,"
            " updated_at_ms FROM merchants WHERE merchant_id = ?", (merchant_id,)).fetchone()
    if row is None:
        return None
    merchant_id, status, sign_type, secret, pem, key_set, updated = row
    return MerchantRecord(str(merchant_id), AccountStatus(status),
                          None if sign_type is None else SignType(sign_type), secret, pem,
                          key_set, int(updated))


def set_key(store: Store, merchant_id: str, sign_type: SignType, secret: str | None,
            public_key_pem: str | None, now_ms: int) -> MerchantRecord:
    """Register (or replace) the merchant's key; a new merchant is active. A closed merchant
    keeps its status: a key does not reopen it."""
    with store._tx(2) as conn:
        conn.execute(
            "INSERT INTO merchants (merchant_id, status, sign_type, secret, public_key_pem,"
            " key_set_at_ms, updated_at_ms) VALUES (?, 'active', ?, ?, ?, ?, ?)"
            " ON CONFLICT (merchant_id) DO UPDATE SET sign_type = excluded.sign_type,"
            " secret = excluded.secret, public_key_pem = excluded.public_key_pem,"
            " key_set_at_ms = excluded.key_set_at_ms, updated_at_ms = excluded.updated_at_ms",
            (merchant_id, sign_type.value, secret, public_key_pem, now_ms, now_ms))
        store._journal(conn, now_ms, "merchant", merchant_id,
                       [Transition("key", "", sign_type.value, "key registered")])
    record = load_merchant(store, merchant_id)
    assert record is not None
    return record


_STATUS_TABLES = {"merchant": ("merchants", "merchant_id"), "user": ("users", "user_id")}


def set_status(store: Store, kind: str, ident: str, status: AccountStatus,
               now_ms: int) -> AccountStatus:
    """Set a merchant's or user's status (journalled); returns the one it had (``active``
    if none). ``closed`` is final: changing it raises ``IllegalTransition``."""
    table, key = _STATUS_TABLES[kind]
    with store._tx(3) as conn:
        row = conn.execute(f"SELECT status FROM {table} WHERE {key} = ?", (ident,)).fetchone()
        before = AccountStatus.ACTIVE if row is None else AccountStatus(row[0])
        if before is AccountStatus.CLOSED and status is not AccountStatus.CLOSED:
            raise IllegalTransition(f"{kind} {ident} is closed, which is final")
        if before is not status or row is None:
            conn.execute(
                f"INSERT INTO {table} ({key}, status, updated_at_ms) VALUES (?, ?, ?)"
                f" ON CONFLICT ({key}) DO UPDATE SET status = excluded.status,"
                " updated_at_ms = excluded.updated_at_ms", (ident, status.value, now_ms))
            store._journal(conn, now_ms, kind, ident,
                           [Transition("status", before.value, status.value, "status set")])
    return before


def user_status(store: Store, user_id: str) -> AccountStatus:
    with store._read(snapshot=False) as conn:
        row = conn.execute("SELECT status FROM users WHERE user_id = ?", (user_id,)).fetchone()
    return AccountStatus.ACTIVE if row is None else AccountStatus(row[0])


def party_statuses(store: Store, merchant_id: str, user_id: str | None
                   ) -> tuple[AccountStatus | None, AccountStatus | None]:
    """The merchant's and the user's status in one statement (``None``: never given one)."""
    with store._read(snapshot=False) as conn:
        merchant, user = conn.execute(
            "SELECT (SELECT status FROM merchants WHERE merchant_id = ?),"
            " (SELECT status FROM users WHERE user_id = ?)", (merchant_id, user_id)).fetchone()
    return (None if merchant is None else AccountStatus(merchant),
            None if user is None else AccountStatus(user))


def any_restricted(store: Store) -> bool:
    """Whether any merchant or user is frozen or closed (else status checks can be skipped)."""
    with store._read(snapshot=False) as conn:
        row = conn.execute(
            "SELECT EXISTS (SELECT 1 FROM merchants WHERE status != 'active')"
            " OR EXISTS (SELECT 1 FROM users WHERE status != 'active')").fetchone()
    return bool(row[0])


# ---------------------------------------------------------------------- nonces


@dataclass(frozen=True, slots=True)
class NonceUse:
    """A signed request's nonce, to be recorded with what the request does."""

    merchant_id: str
    nonce: str
    timestamp_ms: int


def insert_nonce(conn: sqlite3.Connection, use: NonceUse) -> None:
    """Record ``use`` inside the caller's change; ``RequestRejected`` (``replayed_nonce``) if
    the merchant used the nonce before (the change is then undone whole)."""
    cur = conn.execute(
        "INSERT INTO request_nonces (merchant_id, nonce, timestamp_ms) VALUES (?, ?, ?)"
        " ON CONFLICT (merchant_id, nonce) DO NOTHING",
        (use.merchant_id, use.nonce, use.timestamp_ms))
    if cur.rowcount != 1:
        raise RequestRejected(f"merchant {use.merchant_id} used nonce {use.nonce} before: a "
                              "replay (sign every request, retries too, with a new nonce)",
                              "replayed_nonce")


class NonceBook:
    """Bounds and prunes ``request_nonces``; the window's floor after a widening.

    A nonce is kept while a request with its timestamp could still be taken: until the
    timestamp is more than ``window_ms`` in the past (then the timestamp check refuses the
    replay). Pruned ``prune_batch_max`` rows at a time, at most every ``prune_interval_ms``
    (and whenever the table is full). The rows are counted here (loaded once at open, then
    kept by the commits of this engine, the only writer): past ``rows_max`` a request is
    refused with ``Overloaded``, never stored. Concurrent requests may pass the bound by
    at most the number of them in flight.

    A window widened at a restart would let in a request whose nonce the narrower window
    already forgot; so the timestamps of the previous window's reach are refused
    (``floor_ms``, kept in ``meta`` until it no longer matters).

    Thread-safe: the count and the prune schedule are under a lock never held across I/O.
    """

    def __init__(self, store: Store, *, window_ms: int, rows_max: int, prune_interval_ms: int,
                 prune_batch_max: int, now_ms: int) -> None:
        self._store = store
        self.window_ms = window_ms
        self._rows_max = rows_max
        self._prune_interval_ms = prune_interval_ms
        self._prune_batch_max = prune_batch_max
        self._lock = threading.Lock()
        self._next_prune_ms = now_ms
        with store._read() as conn:
            self._rows = int(conn.execute("SELECT COUNT(*) FROM request_nonces").fetchone()[0])
            meta = dict(conn.execute("SELECT key, value FROM meta WHERE key IN (?, ?)",
                                     (_WINDOW_KEY, _FLOOR_KEY)).fetchall())
        floor = int(meta.get(_FLOOR_KEY, 0))
        previous = meta.get(_WINDOW_KEY)
        if previous is not None and int(previous) < window_ms:
            floor = max(floor, now_ms - int(previous))
        self.floor_ms = floor
        if meta.get(_WINDOW_KEY) != str(window_ms) or meta.get(_FLOOR_KEY, "0") != str(floor):
            with store._tx(2) as conn:
                conn.executemany("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key)"
                                 " DO UPDATE SET value = excluded.value",
                                 [(_WINDOW_KEY, str(window_ms)), (_FLOOR_KEY, str(floor))])

    @property
    def rows(self) -> int:
        """Nonces remembered (as counted by this engine)."""
        return self._rows

    def reserve(self, now_ms: int) -> None:
        """Before a nonce is recorded: prune if due; ``Overloaded`` if the table is full."""
        with self._lock:
            due = now_ms >= self._next_prune_ms or self._rows >= self._rows_max
            if due:
                self._next_prune_ms = now_ms + self._prune_interval_ms
        if due:
            self.prune(now_ms)
        if self._rows >= self._rows_max:
            raise Overloaded(
                f"{self._rows} request nonces are remembered (at most {self._rows_max}) and "
                f"none is older than the {self.window_ms} ms window: retry later")

    def added(self) -> None:
        """A nonce was recorded (its change committed)."""
        with self._lock:
            self._rows += 1

    def prune(self, now_ms: int) -> int:
        """Forget nonces whose timestamp left the window; returns how many."""
        with self._store._tx() as conn:
            deleted = conn.execute(
                "DELETE FROM request_nonces WHERE rowid IN (SELECT rowid FROM request_nonces"
                " WHERE timestamp_ms < ? ORDER BY timestamp_ms LIMIT ?)",
                (now_ms - self.window_ms, self._prune_batch_max)).rowcount
        with self._lock:
            self._rows = max(0, self._rows - deleted)
        return int(deleted)

    def use(self, use: NonceUse, now_ms: int) -> None:
        """Record ``use`` on its own (a request whose effect is not in the engine's own
        transaction): ``replayed_nonce`` if it was used before."""
        self.reserve(now_ms)
        with self._store._tx() as conn:
            insert_nonce(conn, use)
        self.added()

    def known(self, merchant_id: str, nonce: str) -> bool:
        """Whether the nonce is remembered (for tests and operators)."""
        with self._store._read(snapshot=False) as conn:
            return conn.execute("SELECT 1 FROM request_nonces WHERE merchant_id = ? AND"
                                " nonce = ?", (merchant_id, nonce)).fetchone() is not None


# ---------------------------------------------------------------------- refusals


@dataclass(frozen=True, slots=True)
class RequestRejection:
    """One signed request the engine refused, and why (what it claimed, clipped)."""

    at_ms: int
    merchant_id: str
    """As the request claimed it (``""`` if it had none): unverified when the reason is
    ``malformed``, ``unknown_merchant``, ``wrong_sign_type`` or ``bad_signature``."""
    op: str
    """``pay``, ``close``, ``refund``, ``query``; ``""`` if the body was not read."""
    merchant_order_no: str
    nonce: str
    reason: str
    detail: str


def record_rejection(store: Store, rejection: RequestRejection) -> None:
    """Record one refusal and count it; prune the oldest beyond the bound."""
    append_refusal(store, "rejected_requests", "request_rejection_counts", {
        "at_ms": rejection.at_ms, "merchant_id": rejection.merchant_id, "op": rejection.op,
        "merchant_order_no": rejection.merchant_order_no, "nonce": rejection.nonce,
        "reason": rejection.reason, "detail": rejection.detail,
    }, REQUEST_REJECTIONS_KEPT_MAX)


def recent_rejections(store: Store, limit: int = 100) -> list[RequestRejection]:
    """The newest refusals first, at most ``limit``."""
    return [RequestRejection(*row) for row in newest_refusals(
        store, "rejected_requests",
        "at_ms, merchant_id, op, merchant_order_no, nonce, reason, detail", limit)]


def rejection_counts(store: Store) -> dict[str, int]:
    """Refusals ever recorded, by reason."""
    return refusal_counts(store, "request_rejection_counts")
