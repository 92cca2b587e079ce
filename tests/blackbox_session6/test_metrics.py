"""`/metrics` scraped and `EngineMetrics` from Python (README *Metrics*): the documented
names and labels are there and count what this test did, on a fresh server of its own."""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import NEVER_PAYS, has_modules
from .support import Server, child_env, error_of, payment, settled_view, unique, wait_for

CONFIG = '''
[engine.policy]
pay_window_ms = 120000

[channels.wechat]
kind = "simulated"
wallet = "wechat"
merchant_no = "sim-0001"
credentials = { key = "bb-wechat-key-000001" }
simulated = { seed = 1, faults = "none" }

[channels.slow]
kind = "simulated"
wallet = "wechat"
merchant_no = "sim-0002"
credentials = { key = "bb-slow-key-00000002" }
simulated = { seed = 2, faults = NEVER_PAYS }
'''

# name -> the label names each sample of it carries (README's metric table)
DOCUMENTED = {
    "payengine_payments_total": {"state", "channel"},
    "payengine_submit_seconds_bucket": {"le"},
    "payengine_submit_seconds_count": set(),
    "payengine_submit_seconds_sum": set(),
    "payengine_settle_seconds_bucket": {"channel", "state", "le"},
    "payengine_channel_call_seconds_bucket": {"channel", "operation", "le"},
    "payengine_commit_batch_changes_bucket": {"le"},
    "payengine_commits_total": set(),
    "payengine_changes_committed_total": set(),
    "payengine_failed_changes_total": set(),
    "payengine_submits_admitted_total": set(),
    "payengine_submits_refused_total": set(),
    "payengine_up": set(),
    "payengine_order_actors": set(),
    "payengine_orders_in_flight": set(),
    "payengine_account_actors": set(),
    "payengine_threads": set(),
    "payengine_pool_threads": set(),
    "payengine_queue_depth": {"queue"},
    "payengine_outbox_lag_events": {"consumer"},
    "payengine_merchant_notifications": {"status"},
    "payengine_channel_breaker_state": {"channel", "state"},
    "payengine_orders": {"state"},
    "payengine_needs_person": {"item"},
    "payengine_broken_actors": set(),
    "payengine_observer_errors_total": set(),
}
SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([^}]*)\})? (\S+)$')


def parse(text: str) -> dict[str, float]:
    """The exposition text as `{'name{label="v",...}': value}` with labels sorted."""
    samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = SAMPLE.match(line)
        assert match, line
        name, _, labels, value = match.groups()
        pairs = sorted(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', labels or ""))
        key = name + ("{" + ",".join(f'{k}="{v}"' for k, v in pairs) + "}" if pairs else "")
        samples[key] = float(value)
    return samples


def names_and_labels(samples: dict[str, float]) -> dict[str, set[frozenset[str]]]:
    found: dict[str, set[frozenset[str]]] = {}
    for key in samples:
        name = key.split("{", 1)[0]
        labels = frozenset(re.findall(r'(\w+)="', key))
        found.setdefault(name, set()).add(labels)
    return found


@pytest.fixture(scope="module")
def scraped(server_extra: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A fresh server: three payments succeed, one is closed, then /metrics is scraped."""
    if not has_modules("prometheus_client"):
        pytest.skip("the metrics extra is not installed")
    import httpx
    folder = tmp_path_factory.mktemp("metrics")
    (folder / "payengine.toml").write_text(CONFIG.replace("NEVER_PAYS", NEVER_PAYS))
    server = Server(folder, config=folder / "payengine.toml").start()
    with httpx.Client(base_url=server.url, timeout=30) as http:
        before = http.get("/metrics")
        paid = [http.post("/v1/orders", json=payment(unique("m"), "wechat", 10_00)).json()
                for _ in range(3)]
        waiting = http.post("/v1/orders", json=payment(unique("m"), "slow", 10_00)).json()
        for receipt in paid:
            settled_view(http, receipt["order_id"])
        wait_for(lambda: http.get(f"/v1/orders/{waiting['order_id']}").json()["state"] == "paying")
        http.post(f"/v1/orders/{waiting['order_id']}/close")
        settled_view(http, waiting["order_id"])
        key = 'payengine_payments_total{channel="slow",state="closed"}'
        wait_for(lambda: parse(http.get("/metrics").text).get(key) == 1.0)
        after = http.get("/metrics")
        yield {"before": before, "after": after, "samples": parse(after.text), "server": server,
               "http": http}
    server.stop()


def test_metrics_answers_200_in_the_prometheus_text_format(scraped: dict[str, Any]) -> None:
    response = scraped["after"]
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert "# TYPE payengine_payments_total counter" in response.text
    assert "# TYPE payengine_submit_seconds histogram" in response.text


def test_every_documented_metric_is_exposed_with_its_documented_labels(scraped: dict[str, Any]) -> None:
    found = names_and_labels(scraped["samples"])
    missing = {name for name in DOCUMENTED if name not in found}
    assert not missing, missing
    for name, labels in DOCUMENTED.items():
        assert frozenset(labels) in found[name], (name, found[name])


def test_payments_are_counted_once_by_final_state_and_channel(scraped: dict[str, Any]) -> None:
    samples = scraped["samples"]
    payments = {k: v for k, v in samples.items() if k.startswith("payengine_payments_total")}
    assert payments == {'payengine_payments_total{channel="wechat",state="succeeded"}': 3.0,
                        'payengine_payments_total{channel="slow",state="closed"}': 1.0}
    assert samples["payengine_submit_seconds_count"] == 4.0
    assert samples["payengine_submits_admitted_total"] == 4.0
    assert samples['payengine_settle_seconds_count{channel="wechat",state="succeeded"}'] == 3.0
    assert samples['payengine_channel_call_seconds_count{channel="wechat",operation="pay"}'] == 3.0
    assert samples["payengine_up"] == 1.0


def test_the_gauges_read_the_engine_now(scraped: dict[str, Any]) -> None:
    samples = scraped["samples"]
    assert samples['payengine_orders{state="succeeded"}'] == 3.0
    assert samples['payengine_orders{state="closed"}'] == 1.0
    for channel in ("wechat", "slow"):
        assert samples[f'payengine_channel_breaker_state{{channel="{channel}",state="closed"}}'] == 1.0
        assert samples[f'payengine_channel_breaker_state{{channel="{channel}",state="open"}}'] == 0.0
    for queue in ("actor_messages", "writers", "pool_ready"):
        assert f'payengine_queue_depth{{queue="{queue}"}}' in samples
    for item in ("needs_reconciliation", "owed_follow_ups", "dead_letters",
                 "notifications_given_up", "broken_actors"):
        assert samples[f'payengine_needs_person{{item="{item}"}}'] == 0.0
    assert samples["payengine_broken_actors"] == 0.0
    assert samples["payengine_observer_errors_total"] == 0.0


def test_before_any_payment_no_payment_was_counted(scraped: dict[str, Any]) -> None:
    before = parse(scraped["before"].text)
    assert not any(k.startswith("payengine_payments_total") and v for k, v in before.items())
    assert before["payengine_up"] == 1.0


# ---------------------------------------------------------------- from Python, no server


@pytest.fixture()
def engine_and_world() -> Iterator[tuple[Any, Any]]:
    if not has_modules("prometheus_client"):
        pytest.skip("the metrics extra is not installed")
    from payengine import Engine, ThreadRuntime
    from payengine.sim.channel import ChannelFaults, SimulatedChannel
    world = ThreadRuntime()
    wechat = SimulatedChannel("wechat", world, seed=1, faults=ChannelFaults.none())
    engine = Engine.open(Path(tempfile.mkdtemp()) / "station.db", channels=[wechat])
    wechat.attach(engine)
    yield engine, world
    if engine.is_open:
        engine.shutdown()
    world.shutdown()


def pay(engine: Any, number: str) -> Any:
    from payengine import CashPart, PaymentRequest
    return engine.submit(PaymentRequest("station-1", number, "alice-" + number, "CNY", 5_000,
                                        "Fuel", CashPart(5_000, "wechat")))


def test_the_readmes_python_example_counts_the_payment_once_it_succeeded(
        engine_and_world: tuple[Any, Any]) -> None:
    import prometheus_client

    from payengine import EngineMetrics as TopLevel
    from payengine.metrics import EngineMetrics
    engine, _ = engine_and_world
    assert TopLevel is EngineMetrics
    metrics = EngineMetrics(engine)
    pay(engine, "A-1")
    key = 'payengine_payments_total{channel="wechat",state="succeeded"}'
    assert wait_for(lambda: metrics.snapshot().get(key) == 1.0)
    snapshot = metrics.snapshot()
    assert not any(k.split("{")[0].endswith("_created") for k in snapshot)
    assert snapshot["payengine_up"] == 1.0
    text = metrics.text()
    assert key + " 1.0" in text
    assert set(parse(text)) - {k for k in parse(text) if "_created" in k} == set(
        parse(prometheus_client.generate_latest(metrics.registry).decode())) - {
        k for k in parse(text) if "_created" in k}


def test_a_second_engine_metrics_on_the_same_registry_is_invalid_request(
        engine_and_world: tuple[Any, Any]) -> None:
    from payengine import InvalidRequest
    from payengine.metrics import EngineMetrics
    engine, _ = engine_and_world
    metrics = EngineMetrics(engine)
    with pytest.raises(InvalidRequest):
        EngineMetrics(engine, registry=metrics.registry)


def test_after_shutdown_payengine_up_is_0(engine_and_world: tuple[Any, Any]) -> None:
    from payengine.metrics import EngineMetrics
    engine, _ = engine_and_world
    metrics = EngineMetrics(engine)
    engine.shutdown()
    assert metrics.snapshot()["payengine_up"] == 0.0


def test_an_observer_that_raises_never_fails_a_payment_and_is_counted(
        engine_and_world: tuple[Any, Any]) -> None:
    from payengine.metrics import EngineMetrics, Observer
    engine, _ = engine_and_world
    metrics = EngineMetrics(engine)
    assert metrics.snapshot()["payengine_observer_errors_total"] == 0.0

    class Raising(Observer):
        def payment_finished(self, order_id: str, channel: str, state: str) -> None:
            raise RuntimeError("observer bug")

    engine.set_observer(Raising())
    receipt = pay(engine, "A-2")
    assert wait_for(lambda: engine.get_order(receipt.order_id).settled)
    assert engine.get_order(receipt.order_id).state == "succeeded"
    assert wait_for(lambda: metrics.snapshot()["payengine_observer_errors_total"] >= 1.0)


def test_without_prometheus_client_engine_metrics_raises_extra_missing_and_the_engine_pays_on(
        tmp_path: Path) -> None:
    shim = tmp_path / "shim" / "prometheus_client"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('no prometheus_client here')\n")
    script = '''
import tempfile, time
from pathlib import Path
from payengine import CashPart, Engine, ExtraMissing, PaymentRequest, ThreadRuntime
from payengine.sim.channel import ChannelFaults, SimulatedChannel
world = ThreadRuntime()
wechat = SimulatedChannel("wechat", world, seed=1, faults=ChannelFaults.none())
engine = Engine.open(Path(tempfile.mkdtemp()) / "s.db", channels=[wechat])
wechat.attach(engine)
try:
    from payengine.metrics import EngineMetrics
    EngineMetrics(engine)
    print("NO ERROR")
except ExtraMissing as error:
    print(error.code, error.extra, "payengine[metrics]" in str(error))
r = engine.submit(PaymentRequest("s", "A-1", "u", "CNY", 100, "t", CashPart(100, "wechat")))
for _ in range(400):
    if engine.get_order(r.order_id).settled:
        break
    time.sleep(0.05)
print(engine.get_order(r.order_id).state)
engine.shutdown(); world.shutdown()
'''
    env = child_env()
    env["PYTHONPATH"] = str(shim.parent) + ((":" + env["PYTHONPATH"]) if env.get("PYTHONPATH") else "")
    result = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:2] == ["extra_missing metrics True", "succeeded"]


def test_metrics_over_http_without_prometheus_client_is_501_extra_missing(
        server_extra: None, tmp_path: Path) -> None:
    import httpx
    shim = tmp_path / "shim" / "prometheus_client"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('no prometheus_client here')\n")
    env = {"PYTHONPATH": str(shim.parent) + (
        (":" + child_env()["PYTHONPATH"]) if child_env().get("PYTHONPATH") else "")}
    server = Server(tmp_path, env=env).start()
    try:
        response = httpx.get(server.url + "/metrics", timeout=30)
        assert (response.status_code, error_of(response)["code"]) == (501, "extra_missing")
        assert httpx.get(server.url + "/readyz", timeout=30).status_code == 200
    finally:
        server.stop()
