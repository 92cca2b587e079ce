"""Group commit: many writers share a commit, each returns only once its change is durable,
and a change that fails fails alone (persistence/group_commit.py)."""

from __future__ import annotations

import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from payengine.engine.errors import EngineClosed
from payengine.persistence.group_commit import GroupCommit, GroupCommitConfig
from payengine.persistence.store import Store


def _store(path: Path, **config: int) -> Store:
    store = Store(path, group_commit=GroupCommitConfig(**config))
    with store._tx() as conn:
        conn.execute("CREATE TABLE t (k INTEGER PRIMARY KEY, writer TEXT)")
    return store


def _durable_keys(path: Path) -> set[int]:
    """What another connection (another process, after a crash) would read."""
    conn = sqlite3.connect(path)
    try:
        return {int(r[0]) for r in conn.execute("SELECT k FROM t")}
    finally:
        conn.close()


def _write(store: Store, key: int, seen_durable: list[bool], path: Path) -> None:
    with store._tx() as conn:
        conn.execute("INSERT INTO t (k, writer) VALUES (?, ?)", (key, "w"))
    seen_durable.append(key in _durable_keys(path))  # acknowledged => durable


def test_concurrent_writers_share_commits_and_each_returns_only_when_durable(
        tmp_path: Path) -> None:
    path = tmp_path / "g.db"
    store = _store(path)
    seen: list[bool] = []
    commits_before = store.commit_stats.commits
    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(lambda k: _write(store, k, seen, path), range(800)))
    commits = store.commit_stats.commits - commits_before
    store.close()
    assert seen == [True] * 800
    assert _durable_keys(path) == set(range(800))
    assert commits < 800  # writers queued behind one another shared commits


def test_a_lone_writer_commits_at_once(tmp_path: Path) -> None:
    path = tmp_path / "g.db"
    store = _store(path)
    before = store.commit_stats.commits
    for k in range(5):
        with store._tx() as conn:
            conn.execute("INSERT INTO t (k) VALUES (?)", (k,))
        assert k in _durable_keys(path)
    assert store.commit_stats.commits - before == 5
    store.close()


def test_a_failing_change_fails_alone_and_leaves_its_batch_whole(tmp_path: Path) -> None:
    path = tmp_path / "g.db"
    store = _store(path)
    with store._tx() as conn:
        conn.execute("INSERT INTO t (k) VALUES (0)")
    start = threading.Barrier(12)
    outcomes: dict[int, str] = {}

    def write(k: int) -> None:
        start.wait()
        try:
            with store._tx() as conn:
                conn.execute("INSERT INTO t (k) VALUES (?)", (1000 + k,))
                # every third change then breaks a constraint: all of it must go
                conn.execute("INSERT INTO t (k) VALUES (?)", (0 if k % 3 == 0 else 2000 + k,))
            outcomes[k] = "ok"
        except sqlite3.IntegrityError:
            outcomes[k] = "failed"

    with ThreadPoolExecutor(max_workers=12) as pool:
        list(pool.map(write, range(12)))
    store.close()
    keys = _durable_keys(path)
    for k, outcome in outcomes.items():
        assert ((1000 + k) in keys) == (outcome == "ok"), (k, outcome)
        assert outcome == ("failed" if k % 3 == 0 else "ok")


def test_nested_changes_are_savepoints_of_the_outer_one(tmp_path: Path) -> None:
    path = tmp_path / "g.db"
    store = _store(path)
    with store._tx() as conn:
        conn.execute("INSERT INTO t (k) VALUES (1)")
        with pytest.raises(sqlite3.IntegrityError), store._tx() as inner:
            inner.execute("INSERT INTO t (k) VALUES (2)")
            inner.execute("INSERT INTO t (k) VALUES (1)")
        with store._tx() as inner:
            inner.execute("INSERT INTO t (k) VALUES (3)")
    store.close()
    assert _durable_keys(path) == {1, 3}


def test_a_crash_with_a_batch_open_loses_only_unacknowledged_changes(tmp_path: Path) -> None:
    """Writers parked on an open batch when the power goes get ``EngineClosed``: their
    changes were never acknowledged, and none of them is in the file."""
    path = tmp_path / "g.db"
    store = _store(path, wait_max_ms=10_000)
    acknowledged: list[int] = []
    refused: list[int] = []
    in_batch = threading.Event()

    def write(k: int) -> None:
        try:
            with store._tx() as conn:
                conn.execute("INSERT INTO t (k) VALUES (?)", (k,))
                in_batch.set()
            acknowledged.append(k)
        except EngineClosed:
            refused.append(k)

    # Hold the connection as a queued writer would: the change above cannot commit while
    # someone waits for the connection, so it stays in the open batch until the crash.
    store._writer._waiting += 1
    try:
        thread = threading.Thread(target=write, args=(7,))
        thread.start()
        assert in_batch.wait(5)
        store.kill()
    finally:
        store._writer._waiting -= 1
    thread.join(5)
    assert not thread.is_alive()
    assert (acknowledged, refused) == ([], [7])
    assert _durable_keys(path) == set()


def test_a_batch_is_bounded_by_its_changes(tmp_path: Path) -> None:
    path = tmp_path / "g.db"
    store = _store(path, changes_max=4)
    seen: list[bool] = []
    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(lambda k: _write(store, k, seen, path), range(400)))
    assert store.commit_stats.largest_batch <= 4
    store.close()
    assert _durable_keys(path) == set(range(400))


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(plan=st.lists(st.tuples(st.integers(0, 30), st.booleans()), min_size=1, max_size=40),
       changes_max=st.integers(1, 8))
def test_exactly_the_acknowledged_changes_are_durable(tmp_path_factory: pytest.TempPathFactory,
                                                      plan: list[tuple[int, bool]],
                                                      changes_max: int) -> None:
    """Any mix of writers, some failing on purpose and some colliding on a key: what each
    writer was told (acknowledged or an error) is exactly what the file holds."""
    path = tmp_path_factory.mktemp("gc") / "g.db"
    store = _store(path, changes_max=changes_max)
    acknowledged: list[int] = []
    lock = threading.Lock()

    def write(item: tuple[int, tuple[int, bool]]) -> None:
        n, (key, fail) = item
        try:
            with store._tx() as conn:
                conn.execute("INSERT INTO t (k, writer) VALUES (?, ?)", (key, str(n)))
                if fail:
                    raise ValueError("the change's own failure")
            with lock:
                acknowledged.append(key)
        except (ValueError, sqlite3.IntegrityError):
            pass

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(write, enumerate(plan)))
    store.close()
    assert sorted(acknowledged) == sorted(_durable_keys(path))
    assert len(acknowledged) == len(set(acknowledged))


def test_disk_full_in_one_change_fails_its_whole_batch_and_never_acknowledges_it(
        tmp_path: Path) -> None:
    """SQLite rolls the whole transaction back on SQLITE_FULL: the other changes of the
    batch are gone too, so their writers must hear an error, never that they are durable
    (found in review: a follower was acknowledged for a row that was not there)."""
    conn = sqlite3.connect(tmp_path / "g.db", isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE t (who TEXT, pad TEXT)")
    conn.execute("PRAGMA max_page_count=30")  # a small disk
    writer = GroupCommit(conn, threading.RLock(), config=GroupCommitConfig(wait_max_ms=3_000))
    outcome: dict[str, str] = {}

    def follower() -> None:
        try:
            with writer.change() as c:
                c.execute("INSERT INTO t VALUES ('a', '')")
            outcome["a"] = "acknowledged"
        except sqlite3.Error:
            outcome["a"] = "refused"

    writer._waiting += 1  # a writer is queued: the follower leaves the commit to it
    thread = threading.Thread(target=follower)
    thread.start()
    time.sleep(0.2)
    writer._waiting -= 1
    with pytest.raises(sqlite3.Error), writer.change() as c:  # a change that fills the disk
        for _ in range(1_000):
            c.execute("INSERT INTO t VALUES ('b', ?)", ("x" * 4_000,))
    with writer.change() as c:  # the next writer starts a batch of its own
        c.execute("INSERT INTO t VALUES ('c', '')")
    thread.join(5)
    rows = [r[0] for r in conn.execute("SELECT who FROM t")]
    conn.close()
    assert outcome == {"a": "refused"} and rows == ["c"]
