"""External voucher providers declared in a configuration: ``[providers.NAME]`` tables.

A provider's table gives what the engine must know of it (unit, code tables, query schedule,
bounds); the transport (the integrator's code that makes the network calls and verifies
callbacks, or the simulated carrier of ``payengine.sim.provider``) is given by name to
``load_providers``, which binds each configuration to its transport as a
``ConfiguredProvider``, ready for ``Engine.open(providers=...)``. Every mistake is one
``ConfigError`` naming the key (``providers.carrier-x.codes.try.success``); nothing is built
unless everything is right. No I/O but reading the file.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from payengine.actors.adapters.config import _codes, _int, _known, _text, read_toml
from payengine.actors.provider import (
    PENDING_MAX_LIMIT,
    PROVIDERS_MAX,
    QUERY_GAP_MS_MAX,
    RECORDING_KEEP_MAX,
    ProviderCallback,
)
from payengine.engine.checks import shown
from payengine.engine.codes import CodeTable
from payengine.engine.errors import ConfigError, PaymentError
from payengine.engine.provider import (
    PROVIDER_OPS,
    ProviderCodes,
    ProviderReply,
    check_provider_name,
)

DEFAULT_QUERY_SCHEDULE_MS = (1_000, 2_000, 5_000, 10_000, 30_000)
"""A provider's query schedule when its table names none."""
DEFAULT_PENDING_MAX = 10_000
DEFAULT_RECORDING_KEEP = 1_000
SCHEDULE_GAPS_MAX = 100

_PROVIDER_KEYS = ("unit", "minor_per_unit", "query_schedule_ms", "pending_max",
                  "recording_keep", "codes")
_CODES_KEYS = ("communication_ok", *PROVIDER_OPS)
_TABLE_KEYS = ("success", "failure", "processing")


@dataclass(frozen=True, slots=True)
class ProviderConfig:
    """One provider's settings, checked. Immutable; any thread."""

    name: str
    unit: str
    minor_per_unit: int | None
    codes: ProviderCodes
    query_schedule_ms: tuple[int, ...] = DEFAULT_QUERY_SCHEDULE_MS
    pending_max: int = DEFAULT_PENDING_MAX
    recording_keep: int = DEFAULT_RECORDING_KEEP


class ProviderTransport(Protocol):
    """The network side of one provider: blocking calls, idempotent by ``txn_id``."""

    def try_hold(self, txn_id: str, account_ref: str, amount: int, unit: str
                 ) -> ProviderReply: ...

    def confirm(self, txn_id: str) -> ProviderReply: ...

    def cancel(self, txn_id: str) -> ProviderReply: ...

    def query(self, txn_id: str) -> ProviderReply: ...

    def verify_callback(self, body: bytes, headers: Mapping[str, str]
                        ) -> ProviderCallback: ...


class ConfiguredProvider:
    """A ``VoucherProvider``: a configuration bound to its transport. The calls run on the
    provider's I/O lane (the engine's doing); this object holds no state of its own."""

    def __init__(self, config: ProviderConfig, transport: ProviderTransport) -> None:
        self.config = config
        self.transport = transport
        self.name = config.name
        self.unit = config.unit
        self.minor_per_unit = config.minor_per_unit
        self.codes = config.codes
        self.query_schedule_ms = config.query_schedule_ms
        self.pending_max = config.pending_max
        self.recording_keep = config.recording_keep

    def try_hold(self, txn_id: str, account_ref: str, amount: int, unit: str
                 ) -> ProviderReply:
        return self.transport.try_hold(txn_id, account_ref, amount, unit)

    def confirm(self, txn_id: str) -> ProviderReply:
        return self.transport.confirm(txn_id)

    def cancel(self, txn_id: str) -> ProviderReply:
        return self.transport.cancel(txn_id)

    def query(self, txn_id: str) -> ProviderReply:
        return self.transport.query(txn_id)

    def verify_callback(self, body: bytes, headers: Mapping[str, str]) -> ProviderCallback:
        return self.transport.verify_callback(body, headers)


def parse_providers(data: object) -> list[ProviderConfig]:
    """The ``[providers.NAME]`` tables of a parsed configuration (none: an empty list)."""
    if not isinstance(data, Mapping):
        raise ConfigError("", f"a configuration is a table, not {shown(data)}")
    tables = data.get("providers", {})
    if not isinstance(tables, Mapping):
        raise ConfigError("providers", "must be tables: [providers.NAME]")
    if len(tables) > PROVIDERS_MAX:
        raise ConfigError("providers", f"at most {PROVIDERS_MAX} providers")
    return [_provider(name, table) for name, table in tables.items()]


def load_provider_configs(source: str | Path) -> list[ProviderConfig]:
    """``parse_providers`` of a TOML file (a ``Path`` or a ``str`` naming a file) or text."""
    parsed, _ = read_toml(source)
    return parse_providers(parsed)


def load_providers(source: str | Path | Mapping[str, Any],
                   transports: Mapping[str, ProviderTransport]) -> list[ConfiguredProvider]:
    """The providers a configuration declares, each bound to ``transports[name]``; a
    provider without a transport, or a transport without a provider, is a ``ConfigError``."""
    configs = parse_providers(source) if isinstance(source, Mapping) else (
        load_provider_configs(source))
    names = {c.name for c in configs}
    for name in transports:
        if name not in names:
            raise ConfigError(f"providers.{name}", "a transport is given for a provider "
                                                   "the configuration does not declare")
    for config in configs:
        if config.name not in transports:
            raise ConfigError(f"providers.{config.name}", "no transport given for it")
    return [ConfiguredProvider(c, transports[c.name]) for c in configs]


def _provider(name: object, table: object) -> ProviderConfig:
    key = f"providers.{name}"
    try:
        check_provider_name(name, "a provider's name")
    except PaymentError as error:
        raise ConfigError(key, error.message) from None
    assert isinstance(name, str)
    fields = _known(table, key, _PROVIDER_KEYS)
    unit = _text(fields.get("unit"), f"{key}.unit", 16)
    minor = fields.get("minor_per_unit")
    if minor is not None:
        minor = _int(minor, f"{key}.minor_per_unit", 1, 1_000_000)
    schedule = fields.get("query_schedule_ms", list(DEFAULT_QUERY_SCHEDULE_MS))
    if not isinstance(schedule, list) or not 1 <= len(schedule) <= SCHEDULE_GAPS_MAX:
        raise ConfigError(f"{key}.query_schedule_ms",
                          f"must be a list of 1 to {SCHEDULE_GAPS_MAX} gaps in ms")
    gaps = tuple(_int(g, f"{key}.query_schedule_ms", 1, QUERY_GAP_MS_MAX) for g in schedule)
    pending_max = _int(fields.get("pending_max", DEFAULT_PENDING_MAX), f"{key}.pending_max",
                       1, PENDING_MAX_LIMIT)
    keep = _int(fields.get("recording_keep", DEFAULT_RECORDING_KEEP),
                f"{key}.recording_keep", 0, RECORDING_KEEP_MAX)
    return ProviderConfig(name, unit, minor, _provider_codes(name, fields.get("codes"), key),
                          gaps, pending_max, keep)


def _provider_codes(name: str, table: object, key: str) -> ProviderCodes:
    codes = _known(table, f"{key}.codes", _CODES_KEYS)
    comm = _codes(codes.get("communication_ok"), f"{key}.codes.communication_ok")
    tables: dict[str, CodeTable] = {}
    for op in PROVIDER_OPS:
        where = f"{key}.codes.{op}"
        op_table = _known(codes.get(op), where, _TABLE_KEYS)
        try:
            tables[op] = CodeTable(
                f"{name}-{op}", comm, _codes(op_table.get("success"), f"{where}.success"),
                _codes(op_table.get("failure"), f"{where}.failure"),
                _codes(op_table.get("processing", []), f"{where}.processing"))
        except ConfigError:
            raise
        except PaymentError as error:
            raise ConfigError(where, error.message) from None
    return ProviderCodes(tables["try"], tables["confirm"], tables["cancel"])
