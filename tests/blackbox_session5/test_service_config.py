"""The HTTP service's configuration file: every key's bounds, the errors naming the key,
and `run_server` as the README states its signature."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from payengine.actors.service import ServiceConfig, run_server

from .support import cli, serve

BAD = [
    ("[service]\nport = 70000\n", "service.port: must be from 0 to 65535, not 70000"),
    ("[service]\nport = -1\n", "service.port"),
    ('[service]\nport = "8000"\n', "service.port"),
    ("[service]\nhost = 5\n", "service.host"),
    ("[service]\nmax_body_bytes = 1023\n", "service.max_body_bytes"),
    ("[service]\nmax_body_bytes = 16777217\n", "service.max_body_bytes"),
    ("[service]\nrate_per_s = 0\n", "service.rate_per_s"),
    ("[service]\nrate_per_s = 1000001\n", "service.rate_per_s"),
    ("[service]\nrate_burst = 0\n", "service.rate_burst"),
    ("[service]\nrate_burst = 1000001\n", "service.rate_burst"),
    ("[service]\nrate_clients_max = 0\n", "service.rate_clients_max"),
    ("[service]\nrate_clients_max = 10000001\n", "service.rate_clients_max"),
    ("[service]\nthreads = 0\n", "service.threads"),
    ("[service]\nthreads = 257\n", "service.threads"),
    ("[service]\nconnections_max = 0\n", "service.connections_max"),
    ("[service]\nconnections_max = 100001\n", "service.connections_max"),
    ("[service]\ndrain_timeout_ms = -1\n", "service.drain_timeout_ms"),
    ("[service]\ndrain_timeout_ms = 600001\n", "service.drain_timeout_ms"),
    ("[service]\nnotify_drain_timeout_ms = 600001\n", "service.notify_drain_timeout_ms"),
    ('[service]\napi_token_env = "PE_NO_SUCH_VARIABLE_X"\n',
                 "service.api_token_env"),
    ("[service]\nsurprise = 1\n", "service.surprise"),
    ("surprise = 1\n", "surprise"),
    ('[engine]\nsynchronous = "FAST"\n', "engine.synchronous"),
    ("[engine]\nlive_orders_max = 0\n", "engine.live_orders_max"),
    ("[engine]\nactor_threads = 257\n", "engine.actor_threads"),
    ("[engine]\ndb = 5\n", "engine.db"),
    ("[engine.policy]\npay_window_ms = 0\n", "engine.policy.pay_window_ms"),
    ("[engine.policy]\nquery_schedule_ms = []\n", "engine.policy.query_schedule_ms"),
    ("[engine.merchant_requests]\ntimestamp_window_ms = 999\n",
     "engine.merchant_requests.timestamp_window_ms"),
    ("[engine.currencies]\nXTS = 5\n", "engine.currencies"),
    ("[engine.fee_ppm]\nwechat = 1000000\n", "engine.fee_ppm"),
    ('[channels.w]\nkind = "teleport"\n', "channels.w"),
    ("[risk.rules]\nuser_orders_max = 0\n", "risk.rules.user_orders_max"),
    ("[risk.rules]\nstep_up_amount = { CNY = 100 }\n", "risk"),
    ("[[merchants]]\nsecret = \"" + "s" * 40 + "\"\n", "merchants"),
    ('[[merchants]]\nid = "m1"\n', "merchants"),
    ('[[merchants]]\nid = "m1"\nsecret_env = "PE_NO_SUCH_SECRET_X"\n', "merchants"),
    ('[[merchants]]\nid = "m1"\npublic_key_file = "nope.pem"\n', "merchants"),
    ('[risk.rules]\nuser_orders_max = 3\nvelocity_action = "step_up"\n', "risk"),
    ("[risk]\nhook_timeout_ms = 0\n", "risk.hook_timeout_ms"),
    ("[risk]\nverify_attempts_max = 11\n", "risk.verify_attempts_max"),
    ("[risk]\nsurprise = 1\n", "risk.surprise"),
    ('[[merchants]]\nid = "m1"\nsecret = "short"\n', "merchants"),
    ('[[merchants]]\nid = "m1"\nsecret = "' + "s" * 40 + '"\nsecret_env = "X"\n', "merchants"),
    ('[routing]\nsurprise = 1\n', "routing"),
    ("[engine]\nquotes_max = 0\n", "engine.quotes_max"),
    ("[engine.fee_ppm]\nwechat = -1\n", "engine.fee_ppm"),
    ("[engine.policy]\nhold_grace_ms = 1\n", "engine.policy.hold_grace_ms"),
    ("[engine.merchant_requests]\nnonces_max = 0\n", "engine.merchant_requests.nonces_max"),
    ('[[merchants]]\nid = "m1"\nsecret = "' + "s" * 40 + '"\n[[merchants]]\nid = "m1"\n'
     'secret = "' + "t" * 40 + '"\n', "merchants"),
    ('[channels.wechat]\nkind = "simulated"\nwallet = "wechat"\nmerchant_no = "x"\n'
     'credentials = { key = "short" }\n', "channels.wechat.credentials.key"),
    ('[[merchants]]\nid = "m1"\npublic_key_file = "bad.pem"\n', "merchants"),
    ("[service\n", ""),
]


def _id(case: object) -> str:
    values = getattr(case, "values", case)
    return str(values[1]) or "syntax"  # type: ignore[index]


@pytest.mark.parametrize(("toml", "key"), BAD, ids=[_id(c) for c in BAD])
def test_a_bad_configuration_exits_2_with_the_key_named_before_anything_opens(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], toml: str, key: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.toml").write_text(toml)
    (tmp_path / "bad.pem").write_text("not a key")
    assert run_server(str(tmp_path / "p.toml")) == 2
    out = capsys.readouterr()
    assert key in out.err + out.out
    assert not (tmp_path / "payengine.db").exists()


def test_run_server_takes_config_path_as_the_readme_names_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.toml").write_text("[service]\nport = 70000\n")
    assert run_server(config_path=str(tmp_path / "p.toml")) == 2


def test_service_config_defaults_are_the_tables(tmp_path: Path) -> None:
    c = ServiceConfig()
    assert (c.host, c.port, c.max_body_bytes, c.rate_per_s, c.rate_burst, c.rate_clients_max,
            c.threads, c.connections_max, c.drain_timeout_ms, c.notify_drain_timeout_ms,
            c.api_token_env, c.shutdown_engine) == (
        "127.0.0.1", 8000, 65536, 200, 400, 10000, 16, 1000, 10000, 5000, None, True)


def test_every_key_at_its_edge_is_accepted_and_serves(tmp_path: Path) -> None:
    (tmp_path / "p.toml").write_text(
        "[service]\nmax_body_bytes = 16777216\nrate_per_s = 1000000\nrate_burst = 1\n"
        "rate_clients_max = 1\nthreads = 1\nconnections_max = 100000\ndrain_timeout_ms = 0\n"
        "notify_drain_timeout_ms = 600000\n"
        '[engine]\ndb = "edge.db"\nsynchronous = "NORMAL"\nlive_orders_max = 1\n'
        "actor_threads = 256\n"
        "[engine.policy]\npay_window_ms = 600000\n"
        "query_schedule_ms = [1000, 2000, 5000, 10000, 30000]\n"
        "[engine.merchant_requests]\ntimestamp_window_ms = 3600000\n"
        '[engine.currencies]\nXTS = 2\n'
        "[engine.fee_ppm]\nwechat = 999999\n"
        '[risk.rules]\namount_max = { CNY = 500000 }\nblocked_users = ["mallory"]\n'
        '[[merchants]]\nid = "station-42"\nsecret_env = "STATION_42_SECRET"\n')
    with serve(tmp_path, "--config", "p.toml",
               extra_env={"STATION_42_SECRET": "s" * 40}) as server, server.client() as c:
        assert c.get("/healthz").status_code == 200
    assert (tmp_path / "edge.db").exists()


def test_the_readme_configuration_example_serves(tmp_path: Path) -> None:
    (tmp_path / "p.toml").write_text('''
[service]
host = "0.0.0.0"
port = 8080

[engine]
db = "station.db"
live_orders_max = 50000

[engine.policy]
pay_window_ms = 600000
query_schedule_ms = [1000, 2000, 5000, 10000, 30000]

[channels.wechat-1]
kind = "simulated"
wallet = "wechat"
merchant_no = "sim-0001"
credentials = { key = "simulated-wallet-key-0001" }

[risk.rules]
amount_max = { CNY = 500000 }
blocked_users = ["mallory"]

[[merchants]]
id = "station-42"
secret_env = "STATION_42_SECRET"
''')
    from .support import free_port
    port = free_port()
    with serve(tmp_path, "--config", "p.toml", "--host", "127.0.0.1", "--port", str(port),
               port=port, extra_env={"STATION_42_SECRET": "x" * 32}) as server, \
            server.client() as c:
        r = c.post("/v1/orders", json={
            "merchant_id": "station-42", "merchant_order_no": "big", "user_id": "bob",
            "currency": "CNY", "total_minor": 500001, "title": "t",
            "cash": {"amount_minor": 500001, "channel": "wechat-1"}})
        assert r.status_code == 403 and r.json()["error"]["code"] == "risk_blocked"
        assert "rule" in r.json()["error"]["details"]
        r = c.post("/v1/orders", json={
            "merchant_id": "station-42", "merchant_order_no": "m", "user_id": "mallory",
            "currency": "CNY", "total_minor": 100, "title": "t",
            "cash": {"amount_minor": 100, "channel": "wechat-1"}})
        assert r.status_code == 403
    assert (tmp_path / "station.db").exists()


def test_serve_without_the_server_extra_exits_2_naming_it(tmp_path: Path) -> None:
    code = ("import runpy, sys; sys.modules['fastapi'] = None; sys.modules['uvicorn'] = None; "
            "sys.argv = ['payengine', 'serve']; "
            "runpy.run_module('payengine.sim.cli', run_name='__main__')")
    import subprocess

    from .support import PY, env
    r = subprocess.run([PY, "-c", code], cwd=tmp_path, env=env(), capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert "payengine serve: " in r.stderr
    assert "pip install 'payengine[server]'" in r.stderr


def test_importing_payengine_and_the_service_never_imports_fastapi(tmp_path: Path) -> None:
    import subprocess

    from .support import PY, env
    code = ("import sys, payengine, payengine.actors.service; "
            "print('fastapi' in sys.modules, 'uvicorn' in sys.modules)")
    r = subprocess.run([PY, "-c", code], cwd=tmp_path, env=env(), capture_output=True,
                       text=True, timeout=60)
    assert r.stdout.split() == ["False", "False"], r.stderr


def test_create_app_without_the_extra_raises_extra_missing(tmp_path: Path) -> None:
    import subprocess

    from .support import PY, env
    code = """
import sys, tempfile
from pathlib import Path
sys.modules['fastapi'] = None
from payengine import Engine, ExtraMissing, ThreadRuntime
from payengine.sim.channel import ChannelFaults, SimulatedChannel
from payengine.actors.service import create_app
world = ThreadRuntime()
w = SimulatedChannel('wechat', world, seed=1, faults=ChannelFaults.none())
e = Engine.open(Path(tempfile.mkdtemp()) / 'x.db', channels=[w])
try:
    create_app(e)
except ExtraMissing as error:
    print(error.code, 'server' in str(error))
e.shutdown(); world.shutdown()
"""
    r = subprocess.run([PY, "-c", code], cwd=tmp_path, env=env(), capture_output=True,
                       text=True, timeout=60)
    assert r.stdout.split() == ["extra_missing", "True"], r.stderr


def test_sigterm_after_requests_exits_zero(tmp_path: Path) -> None:
    from .support import Server, payment
    server = Server(tmp_path)
    server.wait_ready()
    with server.client() as c:
        assert c.post("/v1/orders", json=payment("t-1")).status_code == 200
    assert server.stop(signal.SIGTERM) == 0  # the README once said: ends by the signal


def test_serve_help_lists_its_flags(tmp_path: Path) -> None:
    r = cli("serve", "--help", cwd=tmp_path)
    assert r.returncode == 0
    for flag in ("--config", "--db", "--host", "--port"):
        assert flag in r.stdout
