"""A database file of another schema version is refused at open with a typed error.

There is no migration before 1.0: a file written by an engine whose tables had another shape
(such as the fences' table before it was keyed by scope, owner and leg) is refused, not
misread.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from payengine import Engine, IncompatibleDatabase
from payengine.persistence.store import SCHEMA_VERSION, Store
from tests.helpers import ScriptedChannel


@pytest.mark.parametrize("old", ["older version", "no version"])
def test_a_file_of_another_schema_is_refused_with_a_typed_error_not_misread(
    tmp_path: Path, old: str
) -> None:
    """A file whose tables have another shape would be misread: it is refused at open, the
    file untouched and nothing left running, and a new file opens as usual."""
    path = tmp_path / "old.db"
    Store(path).close()
    with sqlite3.connect(path) as conn:
        if old == "older version":
            conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'",
                         (str(SCHEMA_VERSION - 1),))
        else:
            conn.execute("DROP TABLE meta")
    conn.close()
    threads = threading.active_count()
    for _ in range(2):  # the lock is released: refused again, never DatabaseInUse
        with pytest.raises(IncompatibleDatabase) as refused:
            Engine.open(path, channels=[ScriptedChannel()])
        assert refused.value.code == "incompatible_database"
        assert f"version {SCHEMA_VERSION}" in refused.value.message
    assert threading.active_count() == threads
    with sqlite3.connect(path) as conn:  # untouched: neither upgraded nor given a version
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        versions = ([r[0] for r in conn.execute("SELECT value FROM meta")] if "meta" in tables
                    else None)
    conn.close()
    assert versions == ([str(SCHEMA_VERSION - 1)] if old == "older version" else None)
    engine = Engine.open(tmp_path / "new.db", channels=[ScriptedChannel()])
    engine.shutdown()
    reopened = Engine.open(tmp_path / "new.db", channels=[ScriptedChannel()])
    reopened.shutdown()
