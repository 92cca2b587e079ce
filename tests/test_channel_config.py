"""Channels from a configuration: the README's file loads; every mistake is one typed
``ConfigError`` naming the key; the same checks for configurations written in Python."""

from __future__ import annotations

import copy
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from payengine import (
    ChannelConfig,
    CodeTable,
    ConfigError,
    Credentials,
    HttpChannel,
    InvalidRequest,
    Operation,
    PaymentError,
    Signing,
    load_channels,
    load_config,
    parse_config,
)
from payengine.actors.adapters import Fee, Limits, ReplyMapping
from payengine.engine.codes import ResultKind
from payengine.sim.channel import SimulatedChannel
from tests.channel_configs import KEY_1, KEY_2, readme_toml


def readme_dict() -> dict[str, Any]:
    return tomllib.loads(readme_toml())


def test_the_readme_configuration_loads_as_it_is(tmp_path: Path) -> None:
    path = tmp_path / "channels.toml"
    path.write_text(readme_toml(), encoding="utf-8")
    configs = {c.name: c for c in load_config(path)}
    assert set(configs) == {"wechat-1", "wechat-2", "sim-wallet"}
    one, two = configs["wechat-1"], configs["wechat-2"]
    assert (one.kind, one.wallet, one.merchant_no) == ("http", "wechat", "1900000109")
    assert (two.wallet, two.merchant_no) == ("wechat", "1900000110")
    assert two.operations == one.operations  # like = "wechat-1"
    assert two.credentials.key == KEY_2 and one.credentials.key == KEY_1
    assert two.recording.file == "wechat-2.jsonl" and two.recording.redact == ("openid",)
    pay_codes, refund_codes = one.codes
    assert pay_codes.classify("SUCCESS", "NOTPAY") is ResultKind.PROCESSING
    assert pay_codes.is_retryable("SUCCESS", "PAYERROR")
    assert not pay_codes.is_retryable("FAIL", "PAYERROR")
    assert refund_codes.failure == frozenset({"REFUNDCLOSE"})
    assert one.fee.of(10_000) == 60 and one.limits.allows(5_000_000)
    assert not one.limits.allows(5_000_001)
    assert one.query_schedule_ms == (1000, 2000, 5000, 10000, 30000)
    channels = load_channels(path)
    assert [type(c) for c in channels] == [HttpChannel, HttpChannel, SimulatedChannel]
    assert channels[2].pay_codes.channel == "sim-wallet"


def test_credentials_are_never_shown() -> None:
    (config, *_) = parse_config(readme_dict())
    for text in (repr(config), str(config), repr(config.credentials)):
        assert KEY_1 not in text
    assert "***" in repr(config.credentials)


def test_a_key_may_come_from_the_environment() -> None:
    data = readme_dict()
    del data["channels"]["wechat-1"]["credentials"]["key"]
    data["channels"]["wechat-1"]["credentials"]["key_env"] = "WECHAT_1_KEY"
    config = parse_config(data, environ={"WECHAT_1_KEY": "from-the-env"})[0]
    assert config.credentials.key == "from-the-env"
    with pytest.raises(ConfigError) as caught:
        parse_config(data, environ={})
    assert caught.value.key == "channels.wechat-1.credentials.key_env"


def _set(data: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    data = copy.deepcopy(data)
    *parents, last = path.split("/")
    table = data
    for part in parents:
        table = table[part]
    if value is _DELETE:
        del table[last]
    else:
        table[last] = value
    return data


_DELETE = object()
W1 = "channels/wechat-1"


@pytest.mark.parametrize(("path", "value", "key", "words"), [
    (f"{W1}/signing/method", "sha1", "channels.wechat-1.signing.method", "must be one of"),
    (f"{W1}/kind", "ftp", "channels.wechat-1.kind", "must be one of http, simulated"),
    (f"{W1}/merchant_no", _DELETE, "channels.wechat-1.merchant_no", "missing"),
    (f"{W1}/timeout_ms", 0, "channels.wechat-1.timeout_ms", "from 1 to 120000"),
    (f"{W1}/timeout_ms", 10**9, "channels.wechat-1.timeout_ms", "from 1 to 120000"),
    (f"{W1}/timeout_ms", "3s", "channels.wechat-1.timeout_ms", "must be an integer"),
    (f"{W1}/timeout", 3000, "channels.wechat-1.timeout", "unknown key"),
    (f"{W1}/base_url", "ftp://x", "channels.wechat-1.base_url", "http(s)://"),
    (f"{W1}/base_url", _DELETE, "channels.wechat-1.base_url", "needs"),
    (f"{W1}/credentials/key", _DELETE, "channels.wechat-1.credentials.key", "shared key"),
    (f"{W1}/credentials/secret", "x", "channels.wechat-1.credentials.secret", "unknown key"),
    (f"{W1}/signing/encoding", "base32", "channels.wechat-1.signing.encoding", "must be one"),
    (f"{W1}/codes/pay/failure", ["SUCCESS"], "channels.wechat-1.codes.pay.failure",
     "also listed as success"),
    (f"{W1}/codes/pay/retryable", ["NOTPAY"], "channels.wechat-1.codes.pay.retryable",
     "only failure codes"),
    (f"{W1}/codes/pay/processing", ["CLOSED"], "channels.wechat-1.codes.pay.processing",
     "also listed"),
    (f"{W1}/codes/pay/success", "SUCCESS", "channels.wechat-1.codes.pay.success",
     "list of codes"),
    (f"{W1}/codes/pay/communication_ok", _DELETE,
     "channels.wechat-1.codes.pay.communication_ok", "missing"),
    (f"{W1}/operations/pay/fields/total_fee", "{amout}",
     "channels.wechat-1.operations.pay.fields.total_fee", "unknown placeholder {amout}"),
    (f"{W1}/operations/query/fields/x", "{refund_id}", "channels.wechat-1.operations.query."
     "fields", "{refund_id} has no value in a query request"),
    (f"{W1}/operations/query/method", "PUT", "channels.wechat-1.operations.query.method",
     "POST, GET"),
    (f"{W1}/operations/query/path", "pay", "channels.wechat-1.operations.query.path",
     "starting with /"),
    (f"{W1}/operations/query", _DELETE, "channels.wechat-1.operations.query", "needs it"),
    (f"{W1}/operations/query_refund", _DELETE, "channels.wechat-1.operations.query_refund",
     "refunds"),
    (f"{W1}/operations/pay/fields/nested", {"a": "{serial}"},
     "channels.wechat-1.operations.pay.fields.nested", "flat fields"),
    (f"{W1}/operations/capture", {"path": "/c"}, "channels.wechat-1.operations.capture",
     "unknown key"),
    (f"{W1}/reply/amount_format", "cents", "channels.wechat-1.reply.amount_format",
     "minor, decimal"),
    (f"{W1}/reply/result_code", "a b", "channels.wechat-1.reply.result_code", "dotted path"),
    (f"{W1}/fee/basis_points", 10_001, "channels.wechat-1.fee.basis_points", "0 to 10000"),
    (f"{W1}/limits/amount_max_minor", 0, "channels.wechat-1.limits.amount_max_minor",
     "from 1"),
    (f"{W1}/recording/keep", -1, "channels.wechat-1.recording.keep", "from 0"),
    (f"{W1}/query_schedule_ms", [], "channels.wechat-1.query_schedule_ms", "1 to 100 gaps"),
    (f"{W1}/query_schedule_ms", [1, 0], "channels.wechat-1.query_schedule_ms", "from 1"),
    (f"{W1}/currency", "YUAN", "channels.wechat-1.currency", "ISO 4217"),
    (f"{W1}/enabled", "yes", "channels.wechat-1.enabled", "true or false"),
    (f"{W1}/signing/form", "body", "channels.wechat-1.signing.header", "header"),
    ("channels/wechat-2/like", "wechat-9", "channels.wechat-2.like", "names no channel"),
    ("channels/wechat-2/recording", {"file": "wechat-1.jsonl"},
     "channels.wechat-2.recording.file", "also the recording file of wechat-1"),
    ("channels/sim-wallet/credentials", {"key": "short"}, "channels.sim-wallet.credentials.key",
     "at least 16 bytes"),
    ("channels/sim-wallet/simulated/faults", {"sync_failure": 2},
     "channels.sim-wallet.simulated.faults.sync_failure", "probability"),
    ("channels/sim-wallet/simulated/faults", {"gremlins": 0.1},
     "channels.sim-wallet.simulated.faults.gremlins", "unknown fault"),
    ("channels/bad name", {}, "channels.bad name", "a channel name"),
    ("channels", {}, "channels", "at least one channel"),
])
def test_every_mistake_names_its_key(path: str, value: Any, key: str, words: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(_set(readme_dict(), path, value))
    error = caught.value
    assert error.key == key, error.message
    assert words in error.message
    assert error.message.startswith(f"{key}: ")
    assert error.code == "config_error" and isinstance(error, PaymentError)


def test_like_in_a_circle_is_refused() -> None:
    data = _set(readme_dict(), "channels/wechat-1/like", "wechat-2")
    with pytest.raises(ConfigError, match="circle"):
        parse_config(data)


def test_a_missing_key_file_and_bad_toml_are_config_errors(tmp_path: Path) -> None:
    data = _set(readme_dict(), f"{W1}/signing/method", "rsa-sha256")
    data = _set(data, f"{W1}/credentials/private_key_file", "nope.pem")
    with pytest.raises(ConfigError) as caught:
        parse_config(data, base_dir=tmp_path)
    assert caught.value.key == "channels.wechat-1.credentials.private_key_file"
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config("[channels.x\nkind = 1")
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml")
    with pytest.raises(ConfigError):
        load_channels(12)  # type: ignore[arg-type]


def test_too_many_channels_are_refused() -> None:
    from payengine.actors import engine
    from payengine.actors.adapters import config

    assert config.CHANNELS_MAX == engine.CHANNELS_MAX
    sim = readme_dict()["channels"]["sim-wallet"]
    data = {"channels": {f"s{i}": sim for i in range(1_001)}}
    with pytest.raises(ConfigError, match="at most 1000 channels"):
        parse_config(data)


def test_the_same_checks_for_python_objects() -> None:
    config = ChannelConfig(
        name="wechat-3", kind="http", wallet="wechat", merchant_no="1900000111",
        base_url="https://api.example.com", credentials=Credentials(key="k" * 32),
        signing=Signing(method="hmac-sha256"),
        operations={"pay": Operation("/pay", fields={"out_trade_no": "{serial}",
                                                     "total_fee": "{amount}"}),
                    "query": Operation("/query", fields={"out_trade_no": "{serial}"})})
    (channel,) = load_channels([config])
    assert channel.name == "wechat-3"
    with pytest.raises(ConfigError) as caught:
        ChannelConfig(name="w", kind="http", wallet="wechat", merchant_no="1",
                      base_url="https://x", timeout_ms=-5)
    assert caught.value.key == "channels.w.timeout_ms"
    with pytest.raises(ConfigError) as caught:
        ChannelConfig(name="w", kind="http", wallet="wechat", merchant_no="1",
                      base_url="https://x", operations={"query": Operation("/q")},
                      signing=Signing(method="md5"))
    assert caught.value.key == "channels.w.operations.pay"
    with pytest.raises(ConfigError, match="must be one of"):
        Signing(method="rot13")
    with pytest.raises(ConfigError):
        Fee(basis_points=-1)
    with pytest.raises(ConfigError):
        Limits(amount_min_minor=10, amount_max_minor=5)
    with pytest.raises(ConfigError):
        ReplyMapping(amount="x y")
    with pytest.raises(ConfigError, match="two channels have this name"):
        load_channels([config, config])


def test_code_tables_keep_their_old_form_and_check_the_new_sets() -> None:
    table = CodeTable("x", frozenset({"OK"}), frozenset({"DONE"}), frozenset({"NO"}))
    assert table.processing == frozenset() and table.retryable == frozenset()
    assert not table.is_retryable("OK", "NO")
    with pytest.raises(InvalidRequest, match="retryable"):
        CodeTable("x", frozenset({"OK"}), frozenset(), frozenset({"NO"}),
                  retryable=frozenset({"MAYBE"}))
    with pytest.raises(InvalidRequest, match="processing"):
        CodeTable("x", frozenset({"OK"}), frozenset({"DONE"}), frozenset(),
                  processing=frozenset({"DONE"}))


# ---------------------------------------------------------------------------- hypothesis

_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-2**70, max_value=2**70)
    | st.floats(allow_nan=True) | st.text(max_size=20)
    | st.sampled_from(["", "{serial}", "{nope}", "md5", "http", "simulated", "POST",
                       "https://x", "@status", "hmac-sha256", "rsa-sha256", "body"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.text(max_size=8) | st.sampled_from(["kind", "path", "fields", "key", "method"]),
        inner, max_size=4),
    max_leaves=12)


def _paths(data: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(data, dict):
        for key, value in data.items():
            out += _paths(value, (*prefix, key))
    elif isinstance(data, list):
        for i, value in enumerate(data):
            out += _paths(value, (*prefix, i))
    return out


@st.composite
def broken_configs(draw: st.DrawFn) -> Any:
    data: Any = readme_dict()
    for _ in range(draw(st.integers(1, 4))):
        paths = _paths(data)
        path = draw(st.sampled_from(paths))
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        if not path:
            data = draw(_VALUES)
            continue
        parent = data
        for part in path[:-1]:
            parent = parent[part]
        if action == "delete":
            del parent[path[-1]]
        elif action == "add" and isinstance(parent[path[-1]], dict):
            parent[path[-1]][draw(st.text(max_size=10))] = draw(_VALUES)
        else:
            parent[path[-1]] = draw(_VALUES)
    return data


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(broken_configs())
def test_arbitrary_broken_configs_raise_only_the_typed_error(data: Any) -> None:
    try:
        configs = parse_config(data, environ={})
    except ConfigError as error:
        assert error.key is not None and error.message
        assert KEY_1 not in error.message and KEY_2 not in error.message
        return
    for config in configs:  # what loads builds
        load_channels([config], world=_NoWorld())


class _NoWorld:
    def now_ms(self) -> int:
        return 0

    def call_at(self, due_at_ms: int, fn: Any) -> None:
        return None

    def run_io(self, lane: str, fn: Any, done: Any) -> None:
        return None


def test_the_readme_python_examples_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                        ) -> None:
    from tests.channel_configs import readme_python_blocks

    monkeypatch.chdir(tmp_path)
    (tmp_path / "channels.toml").write_text(readme_toml(), encoding="utf-8")
    (tmp_path / "wechat-1.jsonl").write_text("", encoding="utf-8")
    blocks = readme_python_blocks()
    assert len(blocks) == 3
    for block in blocks:
        namespace: dict[str, Any] = {}
        exec(compile(block, "README.md", "exec"), namespace)
        engine = namespace.get("engine")
        if engine is not None:
            engine.shutdown()
