"""Group commit on one SQLite connection: many writers' changes, one transaction, one fsync.

Every write of the engine (a submit's insert, an actor's decided state, an outbox cursor) is
a *change*: a few statements that must become durable together before their writer
acknowledges or acts. Committing each change alone costs one fsync per change (11 per
payment). Here a change joins the transaction that is open on the connection, inside its own
``SAVEPOINT`` when it is not the first, so a change that fails (a constraint) rolls back alone
and never its batch. Its writer then waits until the batch is committed: persist-before-act
holds exactly as with a transaction per change.

Who commits (leader/follower, as LevelDB's write queue and PostgreSQL's commit_delay do): the
writer that finishes a change while no other writer waits for the connection commits the
batch, so a lone writer commits at once (no added latency) and writers that queued up behind
one another share a commit. Bounds: a batch is committed once it holds ``changes_max`` changes
or ``statements_max`` statements, and a waiting writer whose batch is older than
``wait_max_ms`` commits it itself, so nobody waits on a leader that never comes.

Threads: any thread may write; the connection's lock serialises the statements. Nested
changes on one thread (a change that calls another writer) are plain savepoints of the outer
one.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field

from payengine.engine.checks import check_int
from payengine.engine.errors import EngineClosed


@dataclass(frozen=True)
class GroupCommitConfig:
    """The bounds of one batch. Defaults suit a POS server on one disk."""

    changes_max: int = 512
    """Changes committed together at most."""
    statements_max: int = 8_192
    """Statements (rows of work) in one batch at most: bounds the bytes of a commit."""
    wait_max_ms: int = 20
    """A writer whose batch has been open this long commits it itself."""

    def __post_init__(self) -> None:
        """Settings are input: a bad one is ``InvalidRequest``, even under ``python -O``."""
        check_int(self.changes_max, "group_commit.changes_max", 1, 100_000)
        check_int(self.statements_max, "group_commit.statements_max", 1, 10_000_000)
        check_int(self.wait_max_ms, "group_commit.wait_max_ms", 1, 10_000)


@dataclass
class _Batch:
    opened_at: float
    changes: int = 0
    statements: int = 0
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


@dataclass
class CommitStats:
    """Counters for benchmarks and metrics (read without a lock: figures, not decisions)."""

    commits: int = 0
    changes: int = 0
    failed_changes: int = 0
    largest_batch: int = 0


class GroupCommit:
    """Batches the changes of many threads on ``conn`` (see the module docstring)."""

    def __init__(self, conn: sqlite3.Connection, lock: threading.RLock, *,
                 config: GroupCommitConfig | None = None,
                 is_closed: Callable[[], bool] = lambda: False,
                 after_commit: Callable[[], Callable[[], None] | None] = lambda: None) -> None:
        self._conn = conn
        self._lock = lock
        self._config = config or GroupCommitConfig()
        self._is_closed = is_closed
        self._after_commit = after_commit
        self._batch: _Batch | None = None
        self._depth = 0
        self._waiting = 0
        self._waiting_lock = threading.Lock()
        self.stats = CommitStats()
        self.on_commit: Callable[[int], None] | None = None
        """Told each committed batch's number of changes (metrics), under the connection's
        lock: it must be quick; what it raises is dropped."""

    @property
    def backlog(self) -> int:
        """Writers (threads) waiting for the connection right now (a figure for admission)."""
        return self._waiting

    @contextmanager
    def change(self, statements: int = 1) -> Iterator[sqlite3.Connection]:
        """Run the body's statements as one change; return once they are durable.

        Raises what the body raised (its statements undone, the batch untouched), or the
        commit's error if the batch could not be committed (nothing of it is durable).
        """
        with self._waiting_lock:
            self._waiting += 1
        try:
            self._lock.acquire()
        finally:
            with self._waiting_lock:
                self._waiting -= 1
        if self._depth:  # nested in a change of this thread: a savepoint of it
            try:
                with self._savepoint():
                    yield self._conn
            finally:
                self._lock.release()
            return
        batch, failure, committed = None, None, False
        try:
            if self._is_closed():
                raise EngineClosed("the engine's database is closed")
            batch = self._join(statements)
            self._depth = 1
            try:
                yield self._conn
            except BaseException as exc:
                failure = exc
                self._undo(batch)
            finally:
                self._depth = 0
            if failure is None and not self._conn.in_transaction:
                # SQLite rolled the whole transaction back under this change (disk full, an
                # I/O error the body swallowed): the batch is gone, every writer of it told
                failure = self._lost(batch)
            if failure is None:
                batch.changes += 1
                batch.statements += statements
            committed = self._commit_if_due(batch)
        finally:
            self._lock.release()
        if committed:
            self._run_after_commit()
        if batch is not None and not batch.done.is_set():
            self._wait(batch)
        if failure is not None:
            self.stats.failed_changes += 1
            raise failure
        if batch is not None and batch.error is not None:
            raise batch.error

    def flush(self) -> None:
        """Commit the open batch now (before a close), waking its writers."""
        with self._lock:
            committed = self._batch is not None and self._commit()
        if committed:
            self._run_after_commit()

    def abandon(self) -> None:
        """Power loss: the open batch never commits; its writers get ``EngineClosed``."""
        with self._lock:
            batch, self._batch = self._batch, None
            if batch is not None and self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
        if batch is not None:
            batch.error = EngineClosed("the engine's database closed before this commit")
            batch.done.set()

    # ------------------------------------------------------------------ inside the lock

    def _join(self, statements: int) -> _Batch:
        batch = self._batch
        if batch is not None and not self._conn.in_transaction:
            self._lost(batch)  # rolled back under an earlier change: never join a dead batch
            batch = None
        if batch is None:
            self._conn.execute("BEGIN IMMEDIATE")
            batch = self._batch = _Batch(time.monotonic())
        elif batch.changes:
            self._conn.execute("SAVEPOINT change")
        return batch

    def _undo(self, batch: _Batch) -> None:
        """Undo the failed change: the whole transaction if it was alone in it.

        SQLite itself rolls the whole transaction back on some errors (``SQLITE_FULL``,
        ``SQLITE_IOERR``...): then the other changes of the batch are gone too, and their
        writers are told so (``_lost``), never that they are durable.
        """
        conn = self._conn
        if not conn.in_transaction:
            self._lost(batch)
            return
        try:
            if batch.changes == 0:
                conn.execute("ROLLBACK")
                self._batch = None
                batch.done.set()
            else:
                conn.execute("ROLLBACK TO change")
                conn.execute("RELEASE change")
        except sqlite3.Error:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            self._lost(batch)

    def _lost(self, batch: _Batch) -> sqlite3.OperationalError:
        """The batch's transaction is gone: fail every writer of it; return the error."""
        error = sqlite3.OperationalError(
            "the database rolled back the transaction this change shared with others "
            "(disk full or an I/O error): nothing of it is durable")
        if self._batch is batch:
            self._batch = None
        if batch.error is None:
            batch.error = error
        batch.done.set()
        return error

    @contextmanager
    def _savepoint(self) -> Iterator[None]:
        self._conn.execute("SAVEPOINT nested")
        try:
            yield
        except BaseException:
            self._conn.execute("ROLLBACK TO nested")
            self._conn.execute("RELEASE nested")
            raise
        self._conn.execute("RELEASE nested")

    def _commit_if_due(self, batch: _Batch) -> bool:
        """Commit unless another writer is queued for the connection and will (bounded)."""
        if self._batch is not batch or batch.changes == 0:
            return False
        if self._waiting and not self._full(batch):
            return False
        return self._commit()

    def _full(self, batch: _Batch) -> bool:
        cfg = self._config
        return (batch.changes >= cfg.changes_max or batch.statements >= cfg.statements_max
                or (time.monotonic() - batch.opened_at) * 1000 >= cfg.wait_max_ms)

    def _commit(self) -> bool:
        """Commit the open batch and wake its writers; True if it committed."""
        batch = self._batch
        assert batch is not None
        self._batch = None
        try:
            self._conn.execute("COMMIT")
        except BaseException as exc:
            try:
                if self._conn.in_transaction:  # a failed COMMIT may leave it open
                    self._conn.execute("ROLLBACK")
            finally:  # whatever the ROLLBACK does, the batch's writers are told
                batch.error = exc
                batch.done.set()
            return False
        stats = self.stats
        stats.commits += 1
        stats.changes += batch.changes
        stats.largest_batch = max(stats.largest_batch, batch.changes)
        batch.done.set()
        on_commit = self.on_commit
        if on_commit is not None:
            with suppress(Exception):
                on_commit(batch.changes)
        return True

    def _run_after_commit(self) -> None:
        hook = self._after_commit()
        if hook is not None:
            hook()

    # ------------------------------------------------------------------ followers

    def _wait(self, batch: _Batch) -> None:
        """Wait for a leader to commit ``batch``; commit it ourselves if none comes in time."""
        wait_s = self._config.wait_max_ms / 1000
        while not batch.done.wait(wait_s):
            with self._lock:
                committed = self._batch is batch and self._commit()
            if committed:
                self._run_after_commit()
