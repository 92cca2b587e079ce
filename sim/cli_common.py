"""What the ``payengine`` commands share: the --db, --config, --json options, how a
database is found and opened for reading, and how a command says what went wrong. Runs on
the main thread of the command's process."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

DEFAULT_DB = "payengine.db"
PROG = "payengine"

F = TypeVar("F", bound=Callable[..., Any])


def fail(command: str, message: str, code: int = 2) -> int:
    click.echo(f"{PROG} {command}: {message}", err=True)
    return code


def out(text: str) -> None:
    click.echo(text)


def db_option(f: F) -> F:
    return click.option("--db", default=None, metavar="PATH",
                        help=f"SQLite file (default: the configuration's [engine] db, else "
                             f"{DEFAULT_DB})"
                        )(f)


def config_option(f: F) -> F:
    return click.option("--config", default=None, metavar="FILE",
                        type=click.Path(dir_okay=False),
                        help="a payengine TOML file (as payengine serve reads it); its [engine] db "
                             "is the default of --db")(f)


def json_option(what: str) -> Callable[[F], F]:
    def decorate(f: F) -> F:
        return click.option("--json", "as_json", is_flag=True, help=what)(f)
    return decorate


def progress_option(f: F) -> F:
    return click.option("--no-progress", is_flag=True,
                        help="no progress bar on stderr (there is none with --json, or when "
                             "stderr is not a terminal)")(f)


def database(command: str, db: str | None, config: str | None) -> str | None:
    """``--db``, else the configuration's ``[engine] db`` (as ``payengine serve`` reads it:
    relative to the working directory), else ``payengine.db``; ``None`` after saying on
    stderr what is wrong with the configuration (its ``[discounts]`` are checked too, so a
    mistake there is found by every command given the file, not only by ``serve``)."""
    data = {} if config is None else _read_config(command, config)
    if data is None:
        return None
    if "discounts" in data and _discounts(command, config, data) is None:
        return None
    if db is not None:
        return db
    if config is None:
        return DEFAULT_DB
    engine = data.get("engine", {})
    if not isinstance(engine, dict):
        fail(command, f"--config {config}: engine must be a table")
        return None
    value = engine.get("db", DEFAULT_DB)
    if not isinstance(value, str) or not value or "\x00" in value:
        fail(command, f"--config {config}: engine.db must be a non-empty string (a file path)")
        return None
    return value


def discount_rules(command: str, config: str | None) -> Any:
    """The configuration's ``[discounts]`` as ``DiscountRules`` (the defaults without a file
    or the table), for the commands that open an engine; ``None`` after saying on stderr
    what is wrong."""
    from payengine.engine.discounts import DiscountRules

    data = {} if config is None else _read_config(command, config)
    if data is None:
        return None
    return _discounts(command, config, data) if "discounts" in data else DiscountRules()


def _read_config(command: str, config: str) -> dict[str, Any] | None:
    from payengine.actors.adapters.config import read_toml
    from payengine.engine.errors import ConfigError

    try:
        data, _ = read_toml(Path(config))
    except ConfigError as error:
        fail(command, f"--config: {error.message}")
        return None
    return data


def _discounts(command: str, config: str | None, data: dict[str, Any]) -> Any:
    from payengine.actors.service.discounts_config import parse_discounts
    from payengine.engine.errors import ConfigError

    try:
        return parse_discounts(data["discounts"])
    except ConfigError as error:
        fail(command, f"--config {config}: {error.message}")
        return None


def store_for_reading(db: str, command: str) -> Any:
    """The store at ``db`` opened beside any running engine (no lock), or ``None`` after
    saying why on stderr: no such file, a folder, a file that is not a database of this
    schema. Checked on a read-only connection first, so a read never writes (an empty or
    foreign file is not given the engine's tables)."""
    import sqlite3

    from payengine.persistence.store import SCHEMA_VERSION, Store

    path = Path(db)
    if not path.is_file():
        fail(command, f"no database at {db}")
        return None
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        finally:
            conn.close()
    except sqlite3.Error:
        row = None
    if row is None or row[0] != str(SCHEMA_VERSION):
        found = "no payengine database" if row is None else f"schema version {row[0]}"
        fail(command, f"{db} is not a payengine database of schema version "
                       f"{SCHEMA_VERSION} ({found})")
        return None
    return Store(db, read_only=True)


def open_for_reading(command: str, db: str | None, config: str | None) -> Any:
    path = database(command, db, config)
    return None if path is None else store_for_reading(path, command)
