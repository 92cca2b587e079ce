"""Channels declared in a configuration: a TOML file, its parsed dict, or these objects.

One ``ChannelConfig`` per channel, and a channel is one merchant number (商户号) at one
wallet: two merchant numbers of the same wallet are two channels, with their own name,
credentials, code tables, I/O lane and recording, so one cannot starve or mislead the other.

Every setting is checked here, before anything is built, and every mistake is one typed
error, ``ConfigError``, whose ``key`` names the setting as it is written in the file
(``channels.wechat-1.signing.method``). The objects check themselves too (their
``__post_init__``), so a configuration written in Python gets the same checks; the parser
only adds where in the file the value was.

Nothing here does I/O except ``load_config`` reading the file (and the key files it names)
and ``credentials.key_env`` reading the environment; see ``actors.adapters.http`` for the
HTTP adapter and ``actors.adapters.channels`` for building channels.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

from payengine.engine.channel_data import URL_MAX, PayScenario
from payengine.engine.checks import ID_MAX, shown
from payengine.engine.codes import CodeTable
from payengine.engine.currency import ISO_4217
from payengine.engine.errors import ConfigError, PaymentError

T = TypeVar("T")

CHANNELS_MAX = 1_000
"""Most channels in one configuration (the engine's own bound, ``actors.engine``)."""
CONFIG_BYTES_MAX = 1024 * 1024
"""The largest configuration file read."""
KEY_FILE_BYTES_MAX = 16 * 1024
"""The largest PEM key file read."""
TEXT_MAX = 1_024
"""Most characters in a template, a header value, a path."""
SECRET_MAX = 4_096
"""Most characters in a shared key."""
CODES_MAX = 200
"""Most codes in one list of a code table."""
CODE_MAX = 64
"""Most characters in one code."""
FIELDS_MAX = 64
"""Most fields (at every level) in one operation's request template, or headers."""
TEMPLATE_DEPTH_MAX = 4
"""Most levels of nested tables in a request template."""
TIMEOUT_MS_MAX = 120_000
"""The longest per-call timeout: two minutes. A call that takes longer is abandoned (the
engine queries the payment instead), so a hung wallet frees its worker."""
REPLY_BYTES_MAX = 1024 * 1024
"""The largest reply body a channel may send (``reply_bytes_max`` is at most this)."""
RECORDS_MAX = 100_000
"""Most exchanges kept in memory per channel (``recording.keep``)."""
RECORD_FILE_BYTES_MAX = 1024 * 1024 * 1024
"""The largest recording file before it is rotated (``recording.file_bytes_max``)."""
SCHEDULE_GAPS_MAX = 100
DAY_MS = 24 * 60 * 60 * 1000
AMOUNT_MAX = 10**15

KINDS = ("http", "simulated")
SIGNING_METHODS = ("none", "hmac-sha256", "md5", "rsa-sha256")
SIGNING_FORMS = ("sorted-pairs", "body")
SIGNATURE_ENCODINGS = ("hex", "hex-upper", "base64")
OPERATIONS = ("pay", "query", "query_charge", "close", "refund", "query_refund")
HTTP_METHODS = ("POST", "GET")
BODY_ENCODINGS = ("json", "form")
AMOUNT_FORMATS = ("minor", "decimal")
REPLY_FIELDS = ("return_code", "result_code", "channel_txn_id", "amount", "currency",
                "prepay_id", "code_url", "deeplink", "user_action")
STATUS_PATH = "@status"
"""A reply path that means the HTTP status, as ``HTTP_200``: for wallets whose replies carry
no communication code of their own (the status is it)."""

COMMON_PLACEHOLDERS = ("serial", "merchant_no", "wallet", "channel", "nonce", "timestamp",
                       "timestamp_ms", "app_id")
PLACEHOLDERS: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "pay": (*COMMON_PLACEHOLDERS, "amount", "amount_decimal", "currency", "title",
            "notify_url", "scenario", "trade_type", "payer_id", "auth_code", "client_ip",
            "device_id"),
    "query": COMMON_PLACEHOLDERS,
    "query_charge": (*COMMON_PLACEHOLDERS, "channel_txn_id"),
    "close": COMMON_PLACEHOLDERS,
    "refund": (*COMMON_PLACEHOLDERS, "refund_id", "amount", "amount_decimal", "currency",
               "refund_notify_url"),
    "query_refund": (*COMMON_PLACEHOLDERS, "refund_id"),
})
"""What each operation's request template may use, as ``{name}``."""

_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")
"""A channel's name (its id in ``CashPart.channel``): letters, digits, ``_ . : -``."""
_FIELD_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
_PATH = re.compile(r"(@status|=[A-Za-z0-9_.:-]{1,64}|[A-Za-z0-9_:-]{1,64}(\.[A-Za-z0-9_:-]{1,64}){0,7})")
_HEADER = re.compile(r"[A-Za-z0-9-]{1,64}")
_URL = re.compile(r"https?://[A-Za-z0-9.\-\[\]:]+(/[^\s?#]*)?")
_URL_PATH = re.compile(r"/[^\s#]{0,1023}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


# ---------------------------------------------------------------------------- checks


def _text(value: object, key: str, max_len: int = TEXT_MAX, *, empty: bool = False) -> str:
    if not isinstance(value, str):
        raise ConfigError(key, f"must be a string, not {shown(value)}")
    if not value and not empty:
        raise ConfigError(key, "must not be empty")
    if len(value) > max_len:
        raise ConfigError(key, f"must be at most {max_len} characters")
    if _CONTROL.search(value):
        raise ConfigError(key, "must not hold control characters")
    return value


def _match(value: object, key: str, pattern: re.Pattern[str], what: str) -> str:
    text = _text(value, key)
    if not pattern.fullmatch(text):
        raise ConfigError(key, f"must be {what}, not {shown(value)}")
    return text


def _int(value: object, key: str, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(key, f"must be an integer, not {shown(value)}")
    if not low <= value <= high:
        raise ConfigError(key, f"must be from {low} to {high}, not {shown(value)}")
    return value


def _bool(value: object, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(key, f"must be true or false, not {shown(value)}")
    return value


def _choice(value: object, key: str, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(key, f"must be one of {', '.join(choices)}; not {shown(value)}")
    return value


def _codes(value: object, key: str) -> frozenset[str]:
    if isinstance(value, str | bytes) or not isinstance(value, list | tuple | set | frozenset):
        raise ConfigError(key, f"must be a list of codes, not {shown(value)}")
    if len(value) > CODES_MAX:
        raise ConfigError(key, f"must hold at most {CODES_MAX} codes")
    for code in value:
        _text(code, key, CODE_MAX)
    return frozenset(value)


def _schedule(value: object, key: str) -> tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, str | bytes) or not isinstance(value, list | tuple):
        raise ConfigError(key, f"must be a list of gaps in ms, not {shown(value)}")
    if not 1 <= len(value) <= SCHEDULE_GAPS_MAX:
        raise ConfigError(key, f"must hold 1 to {SCHEDULE_GAPS_MAX} gaps")
    return tuple(_int(gap, key, 1, DAY_MS) for gap in value)


def _frozen_map(value: object, key: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(key, f"must be a table, not {shown(value)}")
    return MappingProxyType(dict(value))


def _check_within(prefix: str, check: Callable[[], T]) -> T:
    """Run ``check()``; a ``ConfigError`` from it gets ``prefix`` in front of its key."""
    try:
        return check()
    except ConfigError as error:
        raise error.within(prefix) from None


# ---------------------------------------------------------------------------- the objects


def _secret_repr(value: object) -> str:
    return "None" if value is None else "'***'"


@dataclass(frozen=True, slots=True, repr=False)
class Credentials:
    """A merchant number's secrets. Never shown: ``repr`` masks them, recordings redact them.

    ``key``: the shared key (HMAC-SHA256 and MD5 signing; a simulated wallet's notification
    key). ``private_key_pem``: the merchant's RSA private key (``rsa-sha256``), PEM.
    ``wallet_public_key_pem``: the wallet's RSA public key, to verify what it signs."""

    key: str | None = None
    private_key_pem: bytes | None = None
    wallet_public_key_pem: bytes | None = None
    app_id: str | None = None
    """Not a secret: the wallet's application id (WeChat appid), for ``{app_id}``."""

    def __post_init__(self) -> None:
        if self.key is not None and (not isinstance(self.key, str) or not self.key
                                     or len(self.key) > SECRET_MAX
                                     or _CONTROL.search(self.key)):
            # never shown, not even a wrong one
            raise ConfigError("key", f"must be a non-empty string of at most {SECRET_MAX} "
                                     "characters without control characters")
        for name in ("private_key_pem", "wallet_public_key_pem"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, bytes)
                                      or not 0 < len(value) <= KEY_FILE_BYTES_MAX):
                raise ConfigError(name, f"must be PEM bytes of at most {KEY_FILE_BYTES_MAX}")
        if self.app_id is not None:
            _text(self.app_id, "app_id", ID_MAX)

    def __repr__(self) -> str:
        return (f"Credentials(key={_secret_repr(self.key)}, "
                f"private_key_pem={_secret_repr(self.private_key_pem)}, "
                f"wallet_public_key_pem={_secret_repr(self.wallet_public_key_pem)}, "
                f"app_id={self.app_id!r})")

    def secrets(self) -> tuple[str, ...]:
        """The secret strings, for redaction (longest first)."""
        found = [self.key] if self.key else []
        return tuple(sorted(found, key=len, reverse=True))


@dataclass(frozen=True, slots=True)
class Signing:
    """How requests are signed and replies and notifications verified.

    ``form``: ``sorted-pairs`` signs ``k1=v1&k2=v2...`` over the request's fields sorted by
    name (empty values and the signature itself left out), then ``&key=KEY`` for the
    shared-key methods (WeChat Pay v2); ``body`` signs the exact body bytes (the query
    string of a GET). The signature goes into the body field ``field`` (``sorted-pairs``
    only) or the header ``header``."""

    method: str = "none"
    form: str = "sorted-pairs"
    field: str | None = "sign"
    header: str | None = None
    encoding: str | None = None
    """``hex``, ``hex-upper`` or ``base64``; default: ``hex-upper`` for the shared-key
    methods (WeChat's), ``base64`` for RSA."""
    key_param: str = "key"
    """The name the shared key is appended under, in ``sorted-pairs``: ``&key=KEY``."""
    verify_replies: bool = False
    """Check the signature of every reply too (same form, field or header); a reply that
    does not verify is an error (the engine queries again), never a result."""

    def __post_init__(self) -> None:
        _choice(self.method, "method", SIGNING_METHODS)
        _choice(self.form, "form", SIGNING_FORMS)
        if self.field is not None:
            _match(self.field, "field", _FIELD_NAME, "a field name")
        if self.header is not None:
            _match(self.header, "header", _HEADER, "a header name")
        if self.encoding is not None:
            _choice(self.encoding, "encoding", SIGNATURE_ENCODINGS)
        _match(self.key_param, "key_param", _FIELD_NAME, "a field name")
        _bool(self.verify_replies, "verify_replies")
        if self.method != "none":
            if self.field is None and self.header is None:
                raise ConfigError("field", "a signed channel needs a field or a header "
                                           "for the signature")
            if self.form == "body" and self.header is None:
                raise ConfigError("header", "form = \"body\" signs the body, so the signature "
                                            "must go into a header")

    @property
    def signature_encoding(self) -> str:
        if self.encoding is not None:
            return self.encoding
        return "base64" if self.method == "rsa-sha256" else "hex-upper"

    @property
    def in_header(self) -> bool:
        return self.form == "body" or self.field is None


@dataclass(frozen=True, slots=True)
class ReplyMapping:
    """Where a reply's (or a notification's) values are: a field name, a dotted path into
    nested objects (``data.trade_state``), ``@status`` (the HTTP status, as ``HTTP_200``),
    ``=TEXT`` (the constant ``TEXT``: a notification's communication code, which has no
    status), or ``None``/``""`` (not in this reply)."""

    return_code: str | None = "return_code"
    result_code: str | None = "result_code"
    channel_txn_id: str | None = "transaction_id"
    amount: str | None = "total_fee"
    currency: str | None = None
    prepay_id: str | None = "prepay_id"
    code_url: str | None = "code_url"
    deeplink: str | None = "mweb_url"
    user_action: str | None = None
    amount_format: str = "minor"
    """``minor``: an integer of minor units (WeChat's fen); ``decimal``: a decimal string in
    the major unit (Alipay's ``"88.88"``), converted by the currency's minor digits."""
    rename_result: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    """Result codes renamed before they are classified, for one operation whose codes say
    something else than the trade's state: WeChat v2's order-creation reply answers
    ``SUCCESS`` for "prepay created", not "paid", so ``{ SUCCESS = "PREPAY_CREATED" }``."""

    def __post_init__(self) -> None:
        for name in REPLY_FIELDS:
            value = getattr(self, name)
            if value is not None and value != "":
                _match(value, name, _PATH, "a field name, a dotted path, @status or =TEXT")
        _choice(self.amount_format, "amount_format", AMOUNT_FORMATS)
        renames = _frozen_map(self.rename_result, "rename_result")
        if len(renames) > CODES_MAX:
            raise ConfigError("rename_result", f"at most {CODES_MAX} codes")
        for code, to in renames.items():
            _text(code, "rename_result", CODE_MAX)
            _text(to, f"rename_result.{code}", CODE_MAX)
        object.__setattr__(self, "rename_result", renames)

    def path(self, name: str) -> str | None:
        value: str | None = getattr(self, name)
        return value or None


@dataclass(frozen=True, slots=True)
class Operation:
    """One call to the wallet: where it goes and what it sends.

    ``fields``: the request's fields, each a literal or a template (``"{serial}"``); a
    template that is one placeholder alone keeps the value's type (``"{amount}"`` is a JSON
    number), one with text around it is a string; a field whose placeholders have no value
    (``{payer_id}`` without a payer) is left out. Nested tables are nested objects."""

    path: str
    """Appended to ``base_url``; may hold placeholders (``/orders/{serial}``), URL-quoted."""
    method: str = "POST"
    fields: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    reply: ReplyMapping | None = None
    """This operation's reply mapping; ``None``: the channel's ``reply``."""

    def __post_init__(self) -> None:
        _match(self.path, "path", _URL_PATH, "a path starting with /")
        _check_template(self.path, "path", 1, [0])  # its placeholders, URL-quoted
        _choice(self.method, "method", HTTP_METHODS)
        if self.reply is not None and not isinstance(self.reply, ReplyMapping):
            raise ConfigError("reply", f"must be a ReplyMapping, not {shown(self.reply)}")
        object.__setattr__(self, "fields", _check_template(self.fields, "fields", 1, [0]))


def _check_template(value: object, key: str, depth: int, count: list[int]) -> Any:
    """A request template, checked and frozen: tables of literals and template strings."""
    if depth > TEMPLATE_DEPTH_MAX:
        raise ConfigError(key, f"nests more than {TEMPLATE_DEPTH_MAX} levels")
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for name, inner in value.items():
            count[0] += 1
            if count[0] > FIELDS_MAX:
                raise ConfigError(key, f"more than {FIELDS_MAX} fields")
            _match(name, f"{key}.{name}" if isinstance(name, str) else key, _FIELD_NAME,
                   "a field name")
            out[name] = _check_template(inner, f"{key}.{name}", depth + 1, count)
        return MappingProxyType(out)
    if isinstance(value, str):
        _text(value, key, empty=True)
        for name in _PLACEHOLDER.findall(value.replace("{{", "").replace("}}", "")):
            if name not in PLACEHOLDERS["pay"] + PLACEHOLDERS["refund"] + ("channel_txn_id",):
                raise ConfigError(key, f"unknown placeholder {{{name}}}")
        return value
    if isinstance(value, bool) or (isinstance(value, int) and abs(value) <= AMOUNT_MAX):
        return value
    raise ConfigError(key, f"must be a string, an integer, true/false or a table, not "
                           f"{shown(value)}")


def placeholders_in(template: Any) -> set[str]:
    """Every ``{name}`` a request template uses."""
    if isinstance(template, Mapping):
        return set().union(*(placeholders_in(v) for v in template.values()))
    if isinstance(template, str):
        return set(_PLACEHOLDER.findall(template.replace("{{", "").replace("}}", "")))
    return set()


@dataclass(frozen=True, slots=True)
class NotificationMapping:
    """How the wallet's notifications are read, once their signature verified: where the
    payment serial is, where a refund's id is (a notification that has one is a refund's),
    and the reply mapping of their codes (``None``: the channel's ``reply``)."""

    serial: str = "out_trade_no"
    refund_id: str | None = "out_refund_no"
    reply: ReplyMapping | None = None
    refund_reply: ReplyMapping | None = None
    """A refund notification's mapping; ``None``: ``reply``."""

    def __post_init__(self) -> None:
        _match(self.serial, "serial", _PATH, "a field name or dotted path")
        if self.refund_id is not None:
            _match(self.refund_id, "refund_id", _PATH, "a field name or dotted path")
        for name in ("reply", "refund_reply"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, ReplyMapping):
                raise ConfigError(name, f"must be a ReplyMapping, not {shown(value)}")


@dataclass(frozen=True, slots=True)
class Fee:
    """What the channel charges per payment: ``basis_points`` of the amount (rounded half
    up to the minor unit) plus ``fixed_minor``. For the routing to compare channels."""

    basis_points: int = 0
    fixed_minor: int = 0

    def __post_init__(self) -> None:
        _int(self.basis_points, "basis_points", 0, 10_000)
        _int(self.fixed_minor, "fixed_minor", 0, AMOUNT_MAX)

    def of(self, amount_minor: int) -> int:
        return self.fixed_minor + (amount_minor * self.basis_points + 5_000) // 10_000


@dataclass(frozen=True, slots=True)
class Limits:
    """The amounts the channel takes per payment, in minor units, both ends included."""

    amount_min_minor: int = 1
    amount_max_minor: int = AMOUNT_MAX

    def __post_init__(self) -> None:
        _int(self.amount_min_minor, "amount_min_minor", 1, AMOUNT_MAX)
        _int(self.amount_max_minor, "amount_max_minor", self.amount_min_minor, AMOUNT_MAX)

    def allows(self, amount_minor: int) -> bool:
        return self.amount_min_minor <= amount_minor <= self.amount_max_minor


@dataclass(frozen=True, slots=True)
class Recording:
    """What is kept of the messages exchanged: the newest ``keep`` in memory (0: none), and
    every one appended to ``file`` (JSON lines) if given, the file rotated to ``file.1`` past
    ``file_bytes_max``. Secrets are redacted before anything is kept: the credentials, the
    signature, ``auth_code`` (masked), and the fields named in ``redact``."""

    keep: int = 1_000
    file: str | None = None
    file_bytes_max: int = 64 * 1024 * 1024
    redact: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _int(self.keep, "keep", 0, RECORDS_MAX)
        if self.file is not None:
            _text(self.file, "file")
        _int(self.file_bytes_max, "file_bytes_max", 1_024, RECORD_FILE_BYTES_MAX)
        if isinstance(self.redact, str) or not isinstance(self.redact, tuple | list):
            raise ConfigError("redact", f"must be a list of field names, not "
                                        f"{shown(self.redact)}")
        if len(self.redact) > FIELDS_MAX:
            raise ConfigError("redact", f"at most {FIELDS_MAX} names")
        for name in self.redact:
            _match(name, "redact", _FIELD_NAME, "a field name")
        object.__setattr__(self, "redact", tuple(self.redact))


SIM_FAULTS = ("sync_failure", "sync_timeout", "sync_unknown_code", "user_never_pays",
              "user_pays_late", "callback_lost", "callback_duplicated", "query_no_answer",
              "query_says_processing", "double_charge", "refund_callback_lost",
              "refund_callback_duplicated")
SIM_DELAYS = ("user_pay_delay_ms", "late_pay_delay_ms", "callback_delay_ms", "refund_delay_ms")


@dataclass(frozen=True, slots=True)
class SimulatedOptions:
    """A simulated wallet's own settings (``kind = "simulated"``): its random seed, its
    transaction id prefix, and its faults (probabilities in [0, 1] and ``[low, high]`` delays
    in ms, by the names of ``payengine.sim.channel.ChannelFaults``; unnamed ones keep their
    default; ``faults = "none"``: every user pays promptly, every message arrives once)."""

    seed: int = 0
    txn_prefix: str = "T"
    faults: Mapping[str, Any] | str = field(default_factory=lambda: MappingProxyType({}))

    def __post_init__(self) -> None:
        _int(self.seed, "seed", 0, 2**63 - 1)
        _match(self.txn_prefix, "txn_prefix", re.compile(r"[A-Za-z0-9_-]{1,16}"),
               "1 to 16 letters, digits, _ or -")
        if isinstance(self.faults, str):
            _choice(self.faults, "faults", ("none", "default"))
            return
        faults = _frozen_map(self.faults, "faults")
        for name, value in faults.items():
            if name in SIM_FAULTS:
                if isinstance(value, bool) or not isinstance(value, int | float) or not (
                        0 <= value <= 1):
                    raise ConfigError(f"faults.{name}", f"must be a probability from 0 to 1,"
                                                        f" not {shown(value)}")
            elif name in SIM_DELAYS:
                if (isinstance(value, str) or not isinstance(value, list | tuple)
                        or len(value) != 2):
                    raise ConfigError(f"faults.{name}", f"must be [low, high] in ms, not "
                                                        f"{shown(value)}")
                low = _int(value[0], f"faults.{name}", 0, DAY_MS)
                _int(value[1], f"faults.{name}", low, DAY_MS)
            else:
                raise ConfigError(f"faults.{name}", "unknown fault (known: "
                                                    f"{', '.join(SIM_FAULTS + SIM_DELAYS)})")
        object.__setattr__(self, "faults", faults)


@dataclass(frozen=True, slots=True)
class ChannelConfig:
    """One channel: one merchant number at one wallet.

    ``name`` is the channel's id (``CashPart.channel``, ``Engine.handle_notification``'s
    first argument, its I/O lane). Defaults suit a WeChat-Pay-v2-like JSON wallet; see
    README.md, "Channels from a configuration file", for every key."""

    name: str
    kind: str
    wallet: str
    merchant_no: str
    credentials: Credentials = field(default_factory=Credentials)
    enabled: bool = True
    """``False``: kept for the orders that used it (queries, refunds), offered for no new
    payment (by the routing)."""
    base_url: str | None = None
    notify_url: str | None = None
    """Where the wallet posts notifications (``{notify_url}``, unless a payment's
    ``PayDetails.notify_url`` says otherwise)."""
    refund_notify_url: str | None = None
    currency: str | None = None
    """The currency of the wallet's amounts when a reply does not name one (for a
    ``decimal`` amount, whose minor digits depend on it)."""
    timeout_ms: int = 5_000
    """The most one call may take, connecting, sending and reading the whole reply; then
    it raises ``TimeoutError`` (the engine queries again later)."""
    reply_bytes_max: int = 64 * 1024
    body: str = "json"
    """``json``: the request body is a JSON object; ``form``: form-urlencoded pairs."""
    headers: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    operations: Mapping[str, Operation] = field(default_factory=lambda: MappingProxyType({}))
    reply: ReplyMapping = field(default_factory=ReplyMapping)
    signing: Signing = field(default_factory=Signing)
    notifications: NotificationMapping = field(default_factory=NotificationMapping)
    scenarios: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({
        "native": "NATIVE", "jsapi": "JSAPI", "barcode": "MICROPAY", "app": "APP",
        "h5": "MWEB"}))
    """The wallet's trade type per ``PayScenario``, for ``{trade_type}``."""
    pay_codes: CodeTable | None = None
    refund_codes: CodeTable | None = None
    query_schedule_ms: tuple[int, ...] | None = None
    refund_query_schedule_ms: tuple[int, ...] | None = None
    fee: Fee = field(default_factory=Fee)
    limits: Limits = field(default_factory=Limits)
    recording: Recording = field(default_factory=Recording)
    simulated: SimulatedOptions = field(default_factory=SimulatedOptions)

    def __post_init__(self) -> None:
        where = self.name if isinstance(self.name, str) and _NAME.fullmatch(self.name) else "?"
        _check_within(f"channels.{where}", self._check)

    def _check(self) -> None:
        _match(self.name, "name", _NAME, "1 to 64 letters, digits, _ . : or -, starting "
                                         "with a letter or digit")
        _choice(self.kind, "kind", KINDS)
        _match(self.wallet, "wallet", _NAME, "a wallet's name (letters, digits, _ . : -)")
        _text(self.merchant_no, "merchant_no", ID_MAX)
        _bool(self.enabled, "enabled")
        for name, kind in (("credentials", Credentials), ("reply", ReplyMapping),
                           ("signing", Signing), ("notifications", NotificationMapping),
                           ("fee", Fee), ("limits", Limits), ("recording", Recording),
                           ("simulated", SimulatedOptions)):
            if not isinstance(getattr(self, name), kind):
                raise ConfigError(name, f"must be a {kind.__name__}, not "
                                        f"{shown(getattr(self, name))}")
        for name in ("pay_codes", "refund_codes"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, CodeTable):
                raise ConfigError(f"codes.{name.split('_')[0]}", f"must be a CodeTable, not "
                                                                 f"{shown(value)}")
        for name in ("notify_url", "refund_notify_url"):
            value = getattr(self, name)
            if value is not None:
                _text(value, name, URL_MAX)
                if not re.fullmatch(r"[a-zA-Z][a-zA-Z0-9+.-]*://[^\s]+", value):
                    raise ConfigError(name, f"must be a URL, not {shown(value)}")
        if self.currency is not None and (not isinstance(self.currency, str)
                                          or self.currency not in ISO_4217):
            raise ConfigError("currency", f"must be an ISO 4217 code, not {shown(self.currency)}")
        _int(self.timeout_ms, "timeout_ms", 1, TIMEOUT_MS_MAX)
        _int(self.reply_bytes_max, "reply_bytes_max", 256, REPLY_BYTES_MAX)
        _choice(self.body, "body", BODY_ENCODINGS)
        headers = _frozen_map(self.headers, "headers")
        if len(headers) > FIELDS_MAX:
            raise ConfigError("headers", f"at most {FIELDS_MAX} headers")
        for name, value in headers.items():
            _match(name, "headers", _HEADER, "a header name")
            _text(value, f"headers.{name}", empty=True)
            if not value.isascii():
                raise ConfigError(f"headers.{name}", "must be ASCII (HTTP header values)")
        object.__setattr__(self, "headers", headers)
        scenarios = _frozen_map(self.scenarios, "scenarios")
        for name, value in scenarios.items():
            _choice(name, "scenarios", tuple(s.value for s in PayScenario))
            _text(value, f"scenarios.{name}", CODE_MAX)
        object.__setattr__(self, "scenarios", scenarios)
        for name in ("query_schedule_ms", "refund_query_schedule_ms"):
            object.__setattr__(self, name, _schedule(getattr(self, name), name))
        operations = _frozen_map(self.operations, "operations")
        for name, operation in operations.items():
            _choice(name, "operations", OPERATIONS)
            if not isinstance(operation, Operation):
                raise ConfigError(f"operations.{name}", f"must be an Operation, not "
                                                        f"{shown(operation)}")
            allowed = set(PLACEHOLDERS[name])
            for used in sorted(placeholders_in(operation.path) - allowed):
                raise ConfigError(f"operations.{name}.path",
                                  f"{{{used}}} has no value in a {name} request")
            for used in sorted(placeholders_in(operation.fields) - allowed):
                raise ConfigError(f"operations.{name}.fields",
                                  f"{{{used}}} has no value in a {name} request")
        object.__setattr__(self, "operations", operations)
        if self.kind == "http":
            self._check_http()
        elif self.credentials.key is None or len(self.credentials.key.encode()) < 16:
            raise ConfigError("credentials.key", "a simulated wallet signs its notifications"
                                                 " with a key of at least 16 bytes")

    def _check_http(self) -> None:
        if self.base_url is None:
            raise ConfigError("base_url", "an http channel needs its wallet's URL")
        _text(self.base_url, "base_url", URL_MAX)
        if not _URL.fullmatch(self.base_url):
            raise ConfigError("base_url", f"must be http(s)://host[:port][/path] without a "
                                          f"query, not {shown(self.base_url)}")
        for name in ("pay", "query"):
            if name not in self.operations:
                raise ConfigError(f"operations.{name}", "an http channel needs it")
        if "refund" in self.operations and "query_refund" not in self.operations:
            raise ConfigError("operations.query_refund", "a channel that refunds must be "
                                                         "able to query a refund")
        signing = self.signing
        if signing.method in ("hmac-sha256", "md5") and not self.credentials.key:
            raise ConfigError("credentials.key", f"signing method {signing.method} needs the "
                                                 "shared key (key or key_env)")
        if signing.method == "rsa-sha256":
            if self.credentials.private_key_pem is None:
                raise ConfigError("credentials.private_key_file",
                                  "rsa-sha256 needs the merchant's private key")
            if signing.verify_replies and self.credentials.wallet_public_key_pem is None:
                raise ConfigError("credentials.wallet_public_key_file",
                                  "verifying rsa-sha256 replies needs the wallet's public key")
            from payengine.actors.adapters import signing as signing_module

            signing_module.check_rsa_keys(self.credentials)
        if signing.method != "none" and signing.form == "sorted-pairs":
            for name, operation in self.operations.items():
                for field_name, value in operation.fields.items():
                    if isinstance(value, Mapping):
                        raise ConfigError(f"operations.{name}.fields.{field_name}",
                                          "sorted-pairs signing needs flat fields (sign the "
                                          "body instead: signing.form = \"body\")")

    @property
    def codes(self) -> tuple[CodeTable, CodeTable]:
        """The pay and refund code tables (WeChat-like defaults when none were given)."""
        from payengine.engine.codes import WECHAT_LIKE_PAY_CODES, WECHAT_LIKE_REFUND_CODES

        return (self.pay_codes or replace(WECHAT_LIKE_PAY_CODES, channel=self.name),
                self.refund_codes or replace(WECHAT_LIKE_REFUND_CODES,
                                             channel=f"{self.name}-refund"))

    def operation_reply(self, operation: str) -> ReplyMapping:
        op = self.operations.get(operation)
        return op.reply if op is not None and op.reply is not None else self.reply


# ---------------------------------------------------------------------------- the parser


PLANTED_CONFIG_BUGS = frozenset({"codes-processing-as-failure"})
"""Bugs of this module the simulator can plant: a code table's ``processing`` codes read as
failures (a payment the wallet is still waiting for is failed, and the payer pays anyway)."""


def load_config(source: str | Path, *, planted_bugs: frozenset[str] = frozenset()
                ) -> list[ChannelConfig]:
    """The channels of a TOML file (a ``Path``, or a ``str`` naming an existing file) or of
    TOML text (any other ``str``). Key files are read relative to the file's folder."""
    parsed, base = read_toml(source)
    return parse_config(parsed, base_dir=base, planted_bugs=planted_bugs)


def read_toml(source: str | Path) -> tuple[dict[str, Any], Path | None]:
    """The parsed TOML of a file (a ``Path``, or a ``str`` naming an existing file) or of
    TOML text (any other ``str``), with the file's folder (``None`` for text)."""
    base: Path | None = None
    if isinstance(source, Path) or (isinstance(source, str) and "\n" not in source
                                    and "=" not in source):
        path = Path(source)
        try:
            with path.open("rb") as f:
                data = f.read(CONFIG_BYTES_MAX + 1)
        except OSError as error:
            raise ConfigError("", f"cannot read {str(path)!r}: {error.strerror}") from None
        if len(data) > CONFIG_BYTES_MAX:
            raise ConfigError("", f"{str(path)!r} is larger than {CONFIG_BYTES_MAX} bytes")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise ConfigError("", f"{str(path)!r} is not UTF-8") from None
        base = path.parent
    elif isinstance(source, str):
        if len(source) > CONFIG_BYTES_MAX:
            raise ConfigError("", f"the configuration is larger than {CONFIG_BYTES_MAX}")
        text = source
    else:
        raise ConfigError("", f"a configuration is a path or TOML text, not {shown(source)}")
    try:
        parsed = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError("", f"not valid TOML: {error}") from None
    return parsed, base


def parse_config(data: object, *, base_dir: str | Path | None = None,
                 environ: Mapping[str, str] | None = None,
                 planted_bugs: frozenset[str] = frozenset()) -> list[ChannelConfig]:
    """The channels of a parsed configuration: ``{"channels": {name: table, ...}}``.

    ``base_dir``: where relative key files are (default: the current folder);
    ``environ``: where ``key_env`` names are looked up (default: ``os.environ``)."""
    try:
        return _parse(data, Path(base_dir) if base_dir is not None else Path("."),
                      os.environ if environ is None else environ, planted_bugs)
    except ConfigError:
        raise
    except PaymentError as error:  # a CodeTable's own check
        raise ConfigError("channels", error.message) from None
    except RecursionError:
        raise ConfigError("channels", "nested too deeply") from None


def _known(table: object, key: str, allowed: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(table, Mapping):
        raise ConfigError(key, f"must be a table, not {shown(table)}")
    for name in table:
        if name not in allowed:
            where = (f"{key}.{name}" if key else name) if isinstance(name, str) else key
            raise ConfigError(where, f"unknown key (known: {', '.join(allowed)})")
    return dict(table)


def _parse(data: object, base: Path, environ: Mapping[str, str],
           planted_bugs: frozenset[str]) -> list[ChannelConfig]:
    unknown = set(planted_bugs) - PLANTED_CONFIG_BUGS
    if unknown:
        raise ConfigError("planted_bugs", f"unknown {sorted(unknown)}")
    # [routing] is the routes' (``actors.adapters.routes_config.load_routing``)
    top = _known(data, "", ("channels", "routing")) if isinstance(data, Mapping) else None
    if top is None:
        raise ConfigError("", f"a configuration is a table, not {shown(data)}")
    channels = top.get("channels")
    if not isinstance(channels, Mapping) or not channels:
        raise ConfigError("channels", "must be a table of at least one channel: "
                                      "[channels.NAME]")
    if len(channels) > CHANNELS_MAX:
        raise ConfigError("channels", f"at most {CHANNELS_MAX} channels")
    configs = [_channel(name, _resolve_like(channels, name), base, environ, planted_bugs)
               for name, table in channels.items()]
    files: dict[str, str] = {}
    for config in configs:
        file = config.recording.file
        if file is not None:
            if file in files:
                raise ConfigError(f"channels.{config.name}.recording.file",
                                  f"also the recording file of {files[file]}")
            files[file] = config.name
    return configs


LIKE_DEPTH_MAX = 8


def _resolve_like(channels: Mapping[str, Any], name: str) -> object:
    """A channel's table with ``like = "other"`` resolved: the other channel's table, this
    one's keys merged over it (tables key by key, anything else replaced; ``credentials``
    replaced whole)."""
    table = channels[name]
    seen = [name]
    while isinstance(table, Mapping) and "like" in table:
        other = table["like"]
        key = f"channels.{seen[-1]}.like"
        if not isinstance(other, str) or other not in channels:
            raise ConfigError(key, f"names no channel of this file: {shown(other)}")
        if other in seen or len(seen) > LIKE_DEPTH_MAX:
            raise ConfigError(key, "channels are like each other in a circle (or too deep)")
        seen.append(other)
        base = channels[other]
        if not isinstance(base, Mapping):
            raise ConfigError(f"channels.{other}", f"must be a table, not {shown(base)}")
        rest = {k: v for k, v in table.items() if k != "like"}
        credentials = rest.pop("credentials", None)
        table = _merged(base, rest)
        if credentials is not None:  # another merchant's secrets: whole, never mixed
            table["credentials"] = credentials
    return table


def _merged(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merged(out[key], value)
        else:
            out[key] = value
    return out


_CHANNEL_KEYS = ("kind", "wallet", "merchant_no", "enabled", "base_url", "notify_url",
                 "refund_notify_url", "currency", "timeout_ms", "reply_bytes_max", "body", "headers",
                 "credentials", "signing", "operations", "reply", "notifications",
                 "scenarios", "codes", "query_schedule_ms", "refund_query_schedule_ms", "fee",
                 "limits", "recording", "simulated")


def _channel(name: object, table: object, base: Path, environ: Mapping[str, str],
             planted_bugs: frozenset[str]) -> ChannelConfig:
    key = f"channels.{name}"
    _match(name, key, _NAME, "a channel name: 1 to 64 letters, digits, _ . : or -")
    assert isinstance(name, str)
    t = _known(table, key, _CHANNEL_KEYS)
    for required in ("kind", "wallet", "merchant_no"):
        if required not in t:
            raise ConfigError(f"{key}.{required}", "missing")
    args: dict[str, Any] = {k: t[k] for k in (
        "kind", "wallet", "merchant_no", "enabled", "base_url", "notify_url",
        "refund_notify_url", "currency", "timeout_ms", "reply_bytes_max", "body", "headers",
        "query_schedule_ms", "refund_query_schedule_ms", "scenarios") if k in t}
    args["credentials"] = _credentials(t.get("credentials", {}), f"{key}.credentials", base,
                                       environ)
    if "signing" in t:
        args["signing"] = _simple(Signing, t["signing"], f"{key}.signing")
    channel_reply = t.get("reply", {})
    if "reply" in t:
        args["reply"] = _reply(channel_reply, f"{key}.reply")
    if "operations" in t:
        ops = _known(t["operations"], f"{key}.operations", OPERATIONS)
        args["operations"] = {op: _operation(spec, f"{key}.operations.{op}", channel_reply)
                              for op, spec in ops.items()}
    if "notifications" in t:
        n = _known(t["notifications"], f"{key}.notifications",
                   ("serial", "refund_id", "reply", "refund_reply"))
        for part in ("reply", "refund_reply"):
            if part in n:
                n[part] = _reply(n[part], f"{key}.notifications.{part}", channel_reply)
        args["notifications"] = _check_within(f"{key}.notifications",
                                              lambda: NotificationMapping(**n))
    if "codes" in t:
        codes = _known(t["codes"], f"{key}.codes", ("pay", "refund"))
        for op in ("pay", "refund"):
            if op in codes:
                args[f"{op}_codes"] = _code_table(
                    codes[op], f"{key}.codes.{op}", name if op == "pay" else f"{name}-refund",
                    planted_bugs)
    for part, kind in (("fee", Fee), ("limits", Limits), ("recording", Recording),
                       ("simulated", SimulatedOptions)):
        if part in t:
            args[part] = _simple(kind, t[part], f"{key}.{part}")
    return ChannelConfig(name=name, **args)  # its errors name channels.NAME.key already


def _simple(kind: Any, table: object, key: str) -> Any:
    names = tuple(f.name for f in fields(kind))
    values = _known(table, key, names)
    if "redact" in values and isinstance(values["redact"], list):
        values["redact"] = tuple(values["redact"])
    return _check_within(key, lambda: kind(**values))


def _reply(table: object, key: str, under: object = None) -> ReplyMapping:
    """A reply mapping; ``under``: the channel's reply table, whose keys it keeps unless
    this one names them."""
    names = tuple(f.name for f in fields(ReplyMapping))
    values = _known(table, key, names)
    if isinstance(under, Mapping):
        values = {**{k: v for k, v in under.items() if k in names}, **values}
    for name in REPLY_FIELDS:
        if values.get(name) == "":
            values[name] = None
    return _check_within(key, lambda: ReplyMapping(**values))


def _operation(table: object, key: str, channel_reply: object) -> Operation:
    values = _known(table, key, ("path", "method", "fields", "reply"))
    if "path" not in values:
        raise ConfigError(f"{key}.path", "missing")
    if "reply" in values:
        values["reply"] = _reply(values["reply"], f"{key}.reply", channel_reply)
    return _check_within(key, lambda: Operation(**values))


def _code_table(table: object, key: str, channel: str, planted_bugs: frozenset[str]
                ) -> CodeTable:
    values = _known(table, key, ("communication_ok", "success", "failure", "processing",
                                 "retryable", "not_found"))
    for required in ("communication_ok", "success", "failure"):
        if required not in values:
            raise ConfigError(f"{key}.{required}", "missing")
    sets = {name: _codes(value, f"{key}.{name}") for name, value in values.items()}
    both = sets["success"] & sets["failure"]
    if both:
        raise ConfigError(f"{key}.failure", f"codes also listed as success: {sorted(both)}")
    decided = sets.get("processing", frozenset()) & (sets["success"] | sets["failure"])
    if decided:
        raise ConfigError(f"{key}.processing", f"codes also listed as success or failure: "
                                               f"{sorted(decided)}")
    stray = sets.get("retryable", frozenset()) - sets["failure"]
    if stray:
        raise ConfigError(f"{key}.retryable", f"only failure codes can be retryable, not "
                                              f"{sorted(stray)}")
    decided = sets.get("not_found", frozenset()) & (sets["success"] | sets["failure"])
    if decided:
        raise ConfigError(f"{key}.not_found", f"codes also listed as success or failure (a "
                                              f"'not found' means processing): {sorted(decided)}")
    if "codes-processing-as-failure" in planted_bugs:  # the planted bug
        sets["failure"] = sets["failure"] | sets.pop("processing", frozenset())
    return CodeTable(channel=channel, **sets)


def _credentials(table: object, key: str, base: Path, environ: Mapping[str, str]
                 ) -> Credentials:
    values = _known(table, key, ("key", "key_env", "private_key_file",
                                 "wallet_public_key_file", "app_id"))
    if "key" in values and "key_env" in values:
        raise ConfigError(f"{key}.key_env", "give key or key_env, not both")
    secret = values.get("key")
    if "key_env" in values:
        env_name = _match(values["key_env"], f"{key}.key_env", re.compile(r"[A-Za-z_][A-Za-z0-9_]*"),
                          "an environment variable's name")
        secret = environ.get(env_name)
        if secret is None:
            raise ConfigError(f"{key}.key_env", f"the environment has no {env_name}")
    pems: dict[str, bytes] = {}
    for name, target in (("private_key_file", "private_key_pem"),
                         ("wallet_public_key_file", "wallet_public_key_pem")):
        if name in values:
            pems[target] = _read_key(values[name], f"{key}.{name}", base)
    return _check_within(key, lambda: Credentials(key=secret, app_id=values.get("app_id"),
                                                  **pems))


def _read_key(value: object, key: str, base: Path) -> bytes:
    path = base / _text(value, key)
    try:
        with path.open("rb") as f:
            data = f.read(KEY_FILE_BYTES_MAX + 1)
    except OSError as error:
        raise ConfigError(key, f"cannot read {str(path)!r}: {error.strerror}") from None
    if not data or len(data) > KEY_FILE_BYTES_MAX:
        raise ConfigError(key, f"{str(path)!r} must hold a PEM key of at most "
                               f"{KEY_FILE_BYTES_MAX} bytes")
    return data
