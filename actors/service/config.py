"""One TOML file for the station server (``payengine serve --config payengine.toml``).

``[service]`` (the HTTP side), ``[engine]`` and ``[engine.policy]`` (``EngineConfig`` and
``OrderPolicy`` bounds), ``[channels.NAME]`` and ``[routing]`` (the existing channel and
route loaders), ``[risk]`` (the rules of the risk gate), ``[[merchants]]`` (the keys
signed merchant requests are verified with) and ``[discounts]`` (``EngineConfig.discounts``,
``discounts_config``). Read and checked once, on the caller's thread,
before anything is opened: every mistake is a ``ConfigError`` whose ``key`` names the
setting as written (``service.port``, ``engine.policy.pay_window_ms``). Importing this module
needs no extra: it is how the CLI finds out what to serve before FastAPI is looked for.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from payengine.actors.adapters.config import (
    _bool,
    _int,
    _known,
    _text,
    parse_config,
    read_toml,
)
from payengine.actors.adapters.routes_config import parse_routing
from payengine.actors.base import EngineConfig
from payengine.actors.merchant_auth import MerchantRequestConfig, check_public_key
from payengine.actors.notifier import NotificationConfig
from payengine.actors.risk_gate import RiskConfig
from payengine.actors.service.discounts_config import parse_discounts
from payengine.engine.checks import shown
from payengine.engine.errors import ConfigError, PaymentError
from payengine.engine.health import BreakerPolicy
from payengine.engine.merchant_request import SECRET_MAX, SECRET_MIN
from payengine.engine.order import OrderPolicy
from payengine.engine.risk import RiskOutcome, RiskRules
from payengine.engine.withhold import WithholdConfig
from payengine.persistence.group_commit import GroupCommitConfig

T = TypeVar("T")

DEFAULT_DB = "payengine.db"
"""The SQLite file served when neither ``--db`` nor ``[engine] db`` names one."""
MERCHANTS_MAX = 10_000
"""Most ``[[merchants]]`` one file may register."""


@dataclass(frozen=True)
class ServiceConfig:
    """The HTTP side's settings and bounds (``[service]``). Checked when built."""

    host: str = "127.0.0.1"
    port: int = 8000
    """0 picks a free port (tests)."""
    max_body_bytes: int = 65_536
    """A request body larger than this is refused 413 before it is read whole."""
    rate_per_s: int = 200
    """Requests a client address may make per second, on average (token bucket)."""
    rate_burst: int = 400
    """Requests a client address may make at once (the bucket's size)."""
    rate_clients_max: int = 10_000
    """Client addresses whose buckets are kept; the least recently seen is forgotten."""
    threads: int = 16
    """Engine calls running at once (a bounded thread pool, never the event loop)."""
    connections_max: int = 1_000
    """Connections and requests in flight at once; uvicorn answers 503 past it."""
    drain_timeout_ms: int = 10_000
    """At shutdown: how long in-flight requests may take to finish."""
    notify_drain_timeout_ms: int = 5_000
    """At shutdown, after the requests: how long to wait for the outbox to be delivered
    (``engine.notifications.caught_up()``) before the engine is shut down anyway."""
    api_token_env: str | None = None
    """The environment variable holding a bearer token every ``/v1`` call but the signed
    merchant routes and the wallet notifications must carry (``Authorization: Bearer T``);
    ``None``: none asked (a terminal LAN)."""
    shutdown_engine: bool = True
    """The app shuts the engine down when it stops (the runner's case)."""

    def __post_init__(self) -> None:
        _text(self.host, "service.host", 255)
        _int(self.port, "service.port", 0, 65_535)
        _int(self.max_body_bytes, "service.max_body_bytes", 1_024, 16 * 1024 * 1024)
        _int(self.rate_per_s, "service.rate_per_s", 1, 1_000_000)
        _int(self.rate_burst, "service.rate_burst", 1, 1_000_000)
        _int(self.rate_clients_max, "service.rate_clients_max", 1, 10_000_000)
        _int(self.threads, "service.threads", 1, 256)
        _int(self.connections_max, "service.connections_max", 1, 100_000)
        _int(self.drain_timeout_ms, "service.drain_timeout_ms", 0, 600_000)
        _int(self.notify_drain_timeout_ms, "service.notify_drain_timeout_ms", 0, 600_000)
        if self.api_token_env is not None:
            _text(self.api_token_env, "service.api_token_env", 128)
        _bool(self.shutdown_engine, "service.shutdown_engine")

    def api_token(self, environ: Mapping[str, str] | None = None) -> str | None:
        """The bearer token (read when the app is built); ``ConfigError`` if it is unset."""
        if self.api_token_env is None:
            return None
        token = (os.environ if environ is None else environ).get(self.api_token_env, "")
        if len(token) < 16:
            raise ConfigError("service.api_token_env", f"${self.api_token_env} must hold a "
                                                       f"token of at least 16 characters")
        return token


@dataclass(frozen=True)
class MerchantKey:
    """A ``[[merchants]]`` entry: registered with ``Engine.register_merchant_key`` at start."""

    merchant_id: str
    secret: str | None = field(default=None, repr=False)
    public_key_pem: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class ServerSettings:
    """Everything ``payengine serve`` needs: what to open and how to serve it."""

    service: ServiceConfig = field(default_factory=ServiceConfig)
    db: str = DEFAULT_DB
    synchronous: str = "FULL"
    engine: EngineConfig = field(default_factory=EngineConfig)
    policy: OrderPolicy | None = None
    channels: Mapping[str, Any] | None = None
    """The parsed ``[channels]`` and ``[routing]`` tables (``None``: the simulated wallet)."""
    base_dir: Path | None = None
    risk: RiskConfig | None = None
    merchants: tuple[MerchantKey, ...] = ()


_TOP_KEYS = ("service", "engine", "channels", "routing", "risk", "merchants", "discounts")
_SERVICE_KEYS = tuple(f.name for f in dataclasses.fields(ServiceConfig)
                      if f.name != "shutdown_engine")
_ENGINE_SCALARS = ("ask_timeout_s", "account_idle_ms", "live_orders_max", "actor_threads",
                   "submits_in_flight_max", "admission_wait_ms", "actor_backlog_max",
                   "writer_backlog_max", "pre_hold_ttl_ms", "pre_hold_ttl_ms_max",
                   "duplicate_guard_window_ms", "quotes_max", "fee_ppm", "currencies")
_ENGINE_TABLES: dict[str, type[Any]] = {
    "notifications": NotificationConfig, "group_commit": GroupCommitConfig,
    "breaker": BreakerPolicy, "withholding": WithholdConfig}
"""``[engine.NAME]`` sub-tables: the ``EngineConfig`` field ``NAME``, one key per field."""
_NOT_IN_FILE = frozenset({"transport"})
"""Fields a file cannot name (a Python object: the simulator's own HTTP transport)."""
_ENGINE_KEYS = ("db", "synchronous", "policy", "merchant_requests", *_ENGINE_TABLES,
                *_ENGINE_SCALARS)
_POLICY_KEYS = ("pay_window_ms", "pay_window_ms_max", "hold_grace_ms", "query_schedule_ms",
                "refund_query_schedule_ms", "voucher_retry_schedule_ms",
                "voucher_sentinel_interval_ms", "voucher_sentinel_attempts_max",
                "confirm_query_interval_ms", "legs_max", "refunds_max")
_MERCHANT_REQUEST_KEYS = tuple(f.name for f in dataclasses.fields(MerchantRequestConfig))
_RISK_KEYS = ("rules", "hook_timeout_ms", "verification_window_ms", "verify_attempts_max")
_RULE_KEYS = ("amount_max", "step_up_amount", "blocked_users", "blocked_devices",
              "blocked_payers", "velocity_window_ms", "user_orders_max", "device_orders_max",
              "velocity_action")
_MERCHANT_KEYS = ("id", "secret", "secret_env", "public_key_file")


def load_settings(path: str | Path | None = None, *, db: str | None = None,
                  host: str | None = None, port: int | None = None,
                  environ: Mapping[str, str] | None = None) -> ServerSettings:
    """The settings of a TOML file (``None``: every default), the command line's ``db``,
    ``host`` and ``port`` over it. Reads the file and key files; opens nothing."""
    data: dict[str, Any] = {}
    base: Path | None = None
    if path is not None:
        data, base = read_toml(Path(path))
    settings = parse_settings(data, base_dir=base, environ=environ)
    service = settings.service
    if host is not None or port is not None:
        service = dataclasses.replace(service, host=service.host if host is None else host,
                                      port=service.port if port is None else port)
    return dataclasses.replace(settings, service=service,
                               db=settings.db if db is None else _text(db, "--db", 4_096))


def parse_settings(data: object, *, base_dir: Path | None = None,
                   environ: Mapping[str, str] | None = None) -> ServerSettings:
    """``load_settings`` of an already parsed TOML document."""
    if not isinstance(data, Mapping):
        raise ConfigError("", f"a configuration is a table, not {shown(data)}")
    for name in data:
        if name not in _TOP_KEYS:
            raise ConfigError(str(name), f"unknown key (known: {', '.join(_TOP_KEYS)})")
    top = dict(data)
    env = os.environ if environ is None else environ
    service = _service(top.get("service", {}))
    service.api_token(env)  # an unset or short token is found before anything is opened
    engine_table = _known(top.get("engine", {}), "engine", _ENGINE_KEYS)
    channels = None
    if "channels" in top:
        channels = {"channels": top["channels"]}
        if "routing" in top:
            channels["routing"] = top["routing"]
        parse_config(channels, base_dir=base_dir, environ=env)  # checked now, built later
    elif "routing" in top:
        raise ConfigError("routing", "routes need [channels.NAME] tables in the same file")
    return ServerSettings(
        service=service,
        db=_text(engine_table.get("db", DEFAULT_DB), "engine.db", 4_096),
        synchronous=_choice_text(engine_table.get("synchronous", "FULL"), "engine.synchronous",
                                 ("FULL", "NORMAL", "OFF")),
        engine=_engine_config(engine_table, channels, top.get("discounts")),
        policy=_policy(engine_table.get("policy")),
        channels=channels, base_dir=base_dir,
        risk=_risk(top["risk"]) if "risk" in top else None,
        merchants=_merchants(top.get("merchants", []), base_dir, env))


def _service(table: object) -> ServiceConfig:
    values = _known(table, "service", _SERVICE_KEYS)
    return _built(ServiceConfig, values, "service")


def _engine_config(table: Mapping[str, Any], channels: Mapping[str, Any] | None,
                   discounts: object) -> EngineConfig:
    values = {name: _as_setting(table[name], f"engine.{name}")
              for name in _ENGINE_SCALARS if name in table}
    if discounts is not None:
        values["discounts"] = parse_discounts(discounts)
    if "merchant_requests" in table:
        requests = _known(table["merchant_requests"], "engine.merchant_requests",
                          _MERCHANT_REQUEST_KEYS)
        values["merchant_requests"] = _built(MerchantRequestConfig, requests,
                                             "engine.merchant_requests")
    for name, cls in _ENGINE_TABLES.items():
        if name in table:
            values[name] = _sub_table(table[name], f"engine.{name}", cls)
    if channels is not None and "routing" in channels:
        values["routing"] = parse_routing(channels)
    if "currencies" in values:  # its errors name a currency, not the key: checked alone
        _built(EngineConfig, {"currencies": values["currencies"]}, "engine.currencies")
    return _built(EngineConfig, values, "engine")


def _sub_table(table: object, key: str, cls: type[T]) -> T:
    """``cls`` of a table holding some of its fields (the others default)."""
    names = tuple(f.name for f in dataclasses.fields(cls)  # type: ignore[arg-type]
                  if f.init and f.name not in _NOT_IN_FILE)
    values = _known(table, key, names)
    return _built(cls, {k: _as_setting(v, f"{key}.{k}") for k, v in values.items()}, key)


def _policy(table: object) -> OrderPolicy | None:
    if table is None:
        return None
    values = _known(table, "engine.policy", _POLICY_KEYS)
    return _built(OrderPolicy, {k: _as_setting(v, f"engine.policy.{k}")
                                for k, v in values.items()}, "engine.policy")


def _risk(table: object) -> RiskConfig:
    values = dict(_known(table, "risk", _RISK_KEYS))
    rules = _known(values.pop("rules", {}), "risk.rules", _RULE_KEYS)
    converted: dict[str, Any] = {}
    for name, value in rules.items():
        key = f"risk.rules.{name}"
        if name.startswith("blocked_"):
            converted[name] = frozenset(_strings(value, key))
        elif name == "velocity_action":
            converted[name] = RiskOutcome(_choice_text(value, key, ("block", "step_up")))
        else:
            converted[name] = _as_setting(value, key)
    values["rules"] = _built(RiskRules, converted, "risk.rules")
    return _built(RiskConfig, values, "risk")


def _merchants(listed: object, base_dir: Path | None, environ: Mapping[str, str]
               ) -> tuple[MerchantKey, ...]:
    if not isinstance(listed, list):
        raise ConfigError("merchants", "must be a list of tables: [[merchants]]")
    if len(listed) > MERCHANTS_MAX:
        raise ConfigError("merchants", f"at most {MERCHANTS_MAX} merchants")
    keys: list[MerchantKey] = []
    seen: set[str] = set()
    for i, spec in enumerate(listed):
        key = f"merchants[{i}]"
        values = _known(spec, key, _MERCHANT_KEYS)
        if "id" not in values:
            raise ConfigError(f"{key}.id", "missing")
        merchant_id = _text(values["id"], f"{key}.id", 128)
        if merchant_id in seen:
            raise ConfigError(f"{key}.id", f"{merchant_id!r} is listed twice")
        seen.add(merchant_id)
        given = [name for name in ("secret", "secret_env", "public_key_file") if name in values]
        if len(given) != 1:
            raise ConfigError(key, "needs exactly one of secret, secret_env, public_key_file")
        secret = pem = None
        if "secret" in values:
            secret = _secret(_text(values["secret"], f"{key}.secret", 256), f"{key}.secret")
        elif "secret_env" in values:
            name = _text(values["secret_env"], f"{key}.secret_env", 128)
            if name not in environ:
                raise ConfigError(f"{key}.secret_env", f"${name} is not set")
            secret = _secret(environ[name], f"{key}.secret_env")
        else:
            pem = _read_small(values["public_key_file"], f"{key}.public_key_file", base_dir)
            try:  # parsed now, so a bad key file is found before anything is opened
                check_public_key(pem)
            except PaymentError as error:
                raise ConfigError(f"{key}.public_key_file", error.message) from None
        keys.append(MerchantKey(merchant_id, secret, pem))
    return tuple(keys)


def _secret(value: str, key: str) -> str:
    """An HMAC secret as ``register_merchant_key`` takes it, checked before anything opens."""
    if not SECRET_MIN <= len(value) <= SECRET_MAX:
        raise ConfigError(key, f"an HMAC secret of {SECRET_MIN}..{SECRET_MAX} characters, "
                               f"not {len(value)}: a short one can be guessed")
    return value


def _read_small(value: object, key: str, base_dir: Path | None) -> str:
    path = Path(_text(value, key, 4_096))
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    try:
        with path.open("rb") as f:
            data = f.read(16_385)
    except OSError as error:
        raise ConfigError(key, f"cannot read {str(path)!r}: {error.strerror}") from None
    if len(data) > 16_384:
        raise ConfigError(key, "the key file is larger than 16 KiB")
    try:
        return data.decode("ascii")
    except UnicodeDecodeError:
        raise ConfigError(key, "the key file is not a PEM text") from None


def _built(cls: type[T], values: Mapping[str, Any], key: str) -> T:
    """``cls(**values)``, its own checks' ``InvalidRequest`` as a ``ConfigError`` under
    ``key`` (the field it names, when the message starts with one)."""
    try:
        return cls(**values)
    except ConfigError:
        raise
    except PaymentError as error:
        by_length = sorted(values, key=len, reverse=True)
        named = next((name for name in by_length if error.message.startswith(name)), None)
        if named is None:  # "breaker window_calls must be ...": the field in the message
            named = next((name for name in by_length
                          if re.search(rf"\b{re.escape(name)}\b", error.message)), None)
        raise ConfigError(f"{key}.{named}" if named else key, error.message) from None
    except (TypeError, ValueError) as error:
        raise ConfigError(key, str(error)) from None


def _as_setting(value: object, key: str) -> object:
    """A TOML value as the dataclasses take it: arrays of integers become tuples, tables
    of integers stay mappings; anything else is checked by the dataclass itself."""
    if isinstance(value, list):
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise ConfigError(key, f"must be a list of integers, not {shown(value)}")
        return tuple(value)
    if isinstance(value, Mapping):
        for name, v in value.items():
            if not isinstance(v, int) or isinstance(v, bool):
                raise ConfigError(f"{key}.{name}", f"must be an integer, not {shown(v)}")
        return dict(value)
    return value


def _strings(value: object, key: str) -> list[str]:
    if not isinstance(value, list) or len(value) > 100_000:
        raise ConfigError(key, "must be a list of at most 100,000 strings")
    return [_text(v, f"{key}[{i}]", 128) for i, v in enumerate(value)]


def _choice_text(value: object, key: str, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(key, f"must be one of {', '.join(choices)}; not {shown(value)}")
    return value
