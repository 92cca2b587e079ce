"""``payengine serve``'s configuration file, the rate bound's token buckets, and the CLI's
exit codes; none of these needs a server running."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from payengine import ConfigError, EngineConfig
from payengine.actors.service import ExtraMissing, ServiceConfig, load_settings, parse_settings
from payengine.actors.service.limits import TokenBuckets
from payengine.sim import cli

FULL = """
[service]
host = "0.0.0.0"
port = 8080
max_body_bytes = 32768
rate_per_s = 50
rate_burst = 100
threads = 8

[engine]
db = "station.db"
synchronous = "NORMAL"
live_orders_max = 5000
actor_threads = 4
fee_ppm = { wechat-1 = 6000 }

[engine.policy]
pay_window_ms = 600000
query_schedule_ms = [1000, 2000, 5000]

[engine.merchant_requests]
timestamp_window_ms = 60000

[channels.wechat-1]
kind = "simulated"
wallet = "wechat"
merchant_no = "sim-0001"
credentials = { key = "simulated-wallet-key-0001" }

[routing]
fallbacks_max = 0

[[routing.route]]
method = "qr"
channel = "wechat-1"

[risk.rules]
amount_max = { CNY = 500000 }
blocked_users = ["mallory"]

[[merchants]]
id = "station-42"
secret_env = "STATION_42_SECRET"
"""


def test_a_full_file_loads_into_the_settings_it_names(tmp_path: Path) -> None:
    path = tmp_path / "payengine.toml"
    path.write_text(FULL)
    settings = load_settings(path, environ={"STATION_42_SECRET": "s" * 40})
    assert settings.service == ServiceConfig(host="0.0.0.0", port=8080, max_body_bytes=32768,
                                             rate_per_s=50, rate_burst=100, threads=8)
    assert (settings.db, settings.synchronous) == ("station.db", "NORMAL")
    assert settings.engine.live_orders_max == 5000 and settings.engine.actor_threads == 4
    assert settings.engine.fee_ppm == {"wechat-1": 6000}
    assert settings.engine.merchant_requests.timestamp_window_ms == 60000
    assert settings.engine.routing.fallbacks_max == 0
    assert [r.channel for r in settings.engine.routing.routes] == ["wechat-1"]
    assert settings.policy is not None and settings.policy.pay_window_ms == 600000
    assert settings.policy.query_schedule_ms == (1000, 2000, 5000)
    assert settings.risk is not None and settings.risk.rules.blocked_users == {"mallory"}
    assert settings.risk.rules.amount_max == {"CNY": 500000}
    assert [(m.merchant_id, m.secret) for m in settings.merchants] == [("station-42",
                                                                        "s" * 40)]
    assert settings.base_dir == tmp_path


def test_no_file_is_every_default_and_the_command_line_wins_over_the_file(
        tmp_path: Path) -> None:
    settings = load_settings(None)
    assert settings.service == ServiceConfig() and settings.db == "payengine.db"
    assert settings.engine == EngineConfig() and settings.channels is None
    path = tmp_path / "payengine.toml"
    path.write_text('[service]\nport = 9000\n[engine]\ndb = "a.db"\n')
    settings = load_settings(path, db="b.db", port=9001)
    assert (settings.db, settings.service.port, settings.service.host) == (
        "b.db", 9001, "127.0.0.1")


@pytest.mark.parametrize(("toml", "key"), [
    ("[service]\nport = 70000", "service.port"),
    ("[service]\nport = \"80\"", "service.port"),
    ("[service]\nmax_body_bytes = 10", "service.max_body_bytes"),
    ("[service]\ncolour = 1", "service.colour"),
    ("[engine]\nlive_orders_max = 0", "engine.live_orders_max"),
    ("[engine]\nsynchronous = \"SOMETIMES\"", "engine.synchronous"),
    ("[engine.policy]\npay_window_ms = 0", "engine.policy.pay_window_ms"),
    ("[engine.policy]\nquery_schedule_ms = [1, \"2\"]", "engine.policy.query_schedule_ms"),
    ("[engine.policy]\nplanted_bugs = []", "engine.policy.planted_bugs"),
    ("[channels.w]\nkind = \"pigeon\"\nwallet = \"w\"\nmerchant_no = \"1\"", "channels.w.kind"),
    ("[routing]\nfallbacks_max = 9", "routing"),
    ("[risk.rules]\nvelocity_action = \"shrug\"", "risk.rules.velocity_action"),
    ("[risk]\nverify_attempts_max = 0", "risk.verify_attempts_max"),
    ("[[merchants]]\nid = \"m\"", "merchants[0]"),
    ("[[merchants]]\nsecret = \"x\"", "merchants[0].id"),
    ("[[merchants]]\nid = \"m\"\nsecret_env = \"NOBODY_SET_THIS\"", "merchants[0].secret_env"),
    ("[[merchants]]\nid = \"m\"\npublic_key_file = \"missing.pem\"",
     "merchants[0].public_key_file"),
    ("surprise = 1", "surprise"),
])
def test_every_mistake_is_a_config_error_naming_its_key(tmp_path: Path, toml: str,
                                                        key: str) -> None:
    path = tmp_path / "payengine.toml"
    path.write_text(toml + "\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(path, environ={})
    assert caught.value.key == key, caught.value.message


@settings(max_examples=60, deadline=None)
@given(name=st.text(st.characters(categories=("Ll",)), min_size=1, max_size=12).filter(
    lambda n: n not in {f for f in ServiceConfig.__dataclass_fields__}),
       value=st.one_of(st.integers(), st.text(max_size=5), st.booleans()))
def test_an_unknown_service_key_is_refused_by_its_name(name: str, value: object) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_settings({"service": {name: value}})
    assert caught.value.key == f"service.{name}"


@settings(max_examples=200, deadline=None)
@given(rate=st.integers(1, 50), burst=st.integers(1, 20),
       steps=st.lists(st.tuples(st.integers(0, 3), st.floats(0, 0.5)), max_size=200))
def test_a_client_never_gets_more_than_its_burst_plus_the_rate_over_the_time_passed(
        rate: int, burst: int, steps: list[tuple[int, float]]) -> None:
    now = [0.0]
    buckets = TokenBuckets(rate, burst, clients_max=4, clock=lambda: now[0])
    granted: dict[int, list[float]] = {}
    for client, advance in steps:
        now[0] += advance
        wait = buckets.take(str(client))
        assert wait >= 0 and len(buckets) <= 4
        if wait == 0:
            granted.setdefault(client, []).append(now[0])
        else:
            assert wait <= 1 / rate + 1e-9  # one token is at most that far away
    for client, times in granted.items():
        assert len(times) <= burst + rate * (times[-1] - times[0]) + 1e-6, (client, times)


def test_the_bucket_table_is_bounded_and_a_forgotten_client_starts_full() -> None:
    buckets = TokenBuckets(1, 1, clients_max=2, clock=lambda: 0.0)
    assert buckets.take("a") == 0 and buckets.take("a") > 0
    assert buckets.take("b") == 0 and buckets.take("c") == 0
    assert len(buckets) == 2
    assert buckets.take("a") == 0  # "a" was the least recently seen: forgotten


def test_serve_with_a_bad_configuration_exits_2_and_names_the_key(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "payengine.toml"
    path.write_text("[service]\nport = -1\n")
    assert cli.main(["serve", "--config", str(path)]) == 2
    assert "service.port" in capsys.readouterr().err
    assert cli.main(["serve", "--config", str(tmp_path / "missing.toml")]) == 2


def test_serve_without_the_server_extra_exits_2_and_create_app_is_a_typed_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    for name in list(sys.modules):
        if name == "fastapi" or name.startswith("fastapi.") or name.startswith(
                "payengine.actors.service.app"):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "fastapi", None)
    assert cli.main(["serve", "--db", str(tmp_path / "x.db")]) == 2
    assert "pip install 'payengine[server]'" in capsys.readouterr().err
    assert not (tmp_path / "x.db").exists()
    from payengine.actors.service import create_app

    with pytest.raises(ExtraMissing) as caught:
        create_app(object())  # type: ignore[arg-type]
    assert caught.value.code == "extra_missing"


def test_the_core_package_imports_without_fastapi() -> None:
    import subprocess

    code = ("import sys; sys.modules['fastapi'] = None; import payengine, "
            "payengine.actors.service, payengine.sim.cli; print('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).resolve().parent.parent)
    assert done.stdout.strip() == "ok", done.stderr


def test_the_channel_loader_names_an_unknown_top_level_key_as_written() -> None:
    from payengine import parse_config

    with pytest.raises(ConfigError) as caught:
        parse_config({"channels": {}, "surprise": 1})
    assert caught.value.key == "surprise"


ENGINE_TABLES = """
[engine.notifications]
merchant_schedule_ms = [0, 15000, 30000]
subscriber_retry_ms = [1000, 5000]
batch_max = 50
posts_in_flight_max = 8
http_timeout_s = 2.5
round_error_backoff_ms = 500
outbox_retention_ms = 86400000
prune_interval_ms = 30000
prune_batch_max = 200

[engine.group_commit]
changes_max = 64
statements_max = 1000
wait_max_ms = 5

[engine.breaker]
window_calls = 10
calls_min = 3
failure_pct = 60
open_ms = 5000

[engine.withholding]
withhold_attempts_max = 2
agreements_per_user_max = 4
agreements_per_withhold_max = 2
withholds_open_max = 100
recheck_ms = 200
rechecks_max = 10
"""


def test_the_engines_outbox_commit_breaker_and_withholding_bounds_load_from_their_tables(
        ) -> None:
    import tomllib

    from payengine.actors.notifier import NotificationConfig
    from payengine.engine.health import BreakerPolicy
    from payengine.engine.withhold import WithholdConfig
    from payengine.persistence.group_commit import GroupCommitConfig

    engine = parse_settings(tomllib.loads(ENGINE_TABLES)).engine
    assert engine.notifications == NotificationConfig(
        merchant_schedule_ms=(0, 15_000, 30_000), subscriber_retry_ms=(1_000, 5_000),
        batch_max=50, posts_in_flight_max=8, http_timeout_s=2.5, round_error_backoff_ms=500,
        outbox_retention_ms=86_400_000, prune_interval_ms=30_000, prune_batch_max=200)
    assert engine.group_commit == GroupCommitConfig(64, 1_000, 5)
    assert engine.breaker == BreakerPolicy(10, 3, 60, 5_000)
    assert engine.withholding == WithholdConfig(2, 4, 2, 100, 200, 10)
    assert parse_settings({"engine": {"breaker": {}}}).engine.breaker == BreakerPolicy()


@pytest.mark.parametrize(("toml", "key"), [
    ("[engine.notifications]\nbatch_max = 0\n", "engine.notifications.batch_max"),
    ("[engine.notifications]\nmerchant_schedule_ms = []\n",
     "engine.notifications.merchant_schedule_ms"),
    ("[engine.notifications]\nmerchant_schedule_ms = [1, \"2\"]\n",
     "engine.notifications.merchant_schedule_ms"),
    ("[engine.notifications]\ntransport = \"x\"\n", "engine.notifications.transport"),
    ("[engine.notifications]\nhttp_timeout_s = 61\n", "engine.notifications.http_timeout_s"),
    ("[engine.group_commit]\nwait_max_ms = 0\n", "engine.group_commit.wait_max_ms"),
    ("[engine.breaker]\nwindow_calls = 0\n", "engine.breaker.window_calls"),
    ("[engine.breaker]\nfailure_pct = true\n", "engine.breaker.failure_pct"),
    ("[engine.breaker]\ncolour = 1\n", "engine.breaker.colour"),
    ("[engine.withholding]\nrecheck_ms = \"1\"\n", "engine.withholding.recheck_ms"),
    ("[engine]\nbreaker = 3\n", "engine.breaker"),
])
def test_a_bad_engine_sub_table_value_names_its_key(toml: str, key: str) -> None:
    import tomllib

    with pytest.raises(ConfigError) as refused:
        parse_settings(tomllib.loads(toml))
    assert refused.value.message.split(":", 1)[0] == key, refused.value.message
