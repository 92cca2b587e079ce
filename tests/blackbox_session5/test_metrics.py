"""Metrics (README *Metrics*): every metric of the table, its type and labels, exact values
after payments that succeed, fail and close; snapshot(), text(), ExtraMissing."""

from __future__ import annotations

import contextlib
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

import payengine
from payengine import (
    CashPart,
    ChannelReply,
    Engine,
    EngineConfig,
    InvalidRequest,
    PaymentRequest,
    VoucherPart,
)
from payengine.metrics import NO_OBSERVER, EngineMetrics, Observer
from tests.helpers import SLOW_POLICY, ScriptedChannel, paid_reply, signed_callback, wait_for

from .support import PY, ROOT, env


@pytest.fixture
def channel() -> ScriptedChannel:
    return ScriptedChannel("wechat")


@pytest.fixture
def engine(tmp_path: Path, channel: ScriptedChannel) -> Iterator[Engine]:
    eng = Engine.open(tmp_path / "m.db", channels=[channel], policy=SLOW_POLICY,
                      config=EngineConfig(duplicate_guard_window_ms=0))
    eng.open_account("alice/rp", "CNY")
    eng.fund("alice/rp", 500, funding_id="rp-1")
    yield eng
    with contextlib.suppress(Exception):
        eng.shutdown()


@pytest.fixture
def metrics(engine: Engine) -> EngineMetrics:
    return EngineMetrics(engine)


def cash(no: str, total: int = 100) -> PaymentRequest:
    return PaymentRequest("station-1", no, "alice", "CNY", total, "Fuel",
                          CashPart(total, "wechat"))


def pay(engine: Engine, channel: ScriptedChannel, no: str, total: int = 100) -> str:
    receipt = engine.submit(cash(no, total))
    wait_for(lambda: engine.get_order(receipt.order_id).state == "paying")
    signed_callback(engine, "wechat", receipt.payment_serial, paid_reply(receipt.payment_serial))
    wait_for(lambda: engine.get_order(receipt.order_id).settled)
    return receipt.order_id


def key(name: str, **labels: str) -> str:
    if not labels:
        return name
    return name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"


def test_the_readme_metrics_example_runs_as_it_is(tmp_path: Path) -> None:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### Metrics"):text.index("## HTTP service")]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code
    r = subprocess.run([PY, "-c", code.group(1)], cwd=tmp_path, env=env(), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert 'payengine_payments_total{channel="wechat",state="succeeded"} 1.0' in r.stdout
    assert "# TYPE payengine_submit_seconds histogram" in r.stdout


def test_payments_are_counted_once_by_final_state_and_cash_channel(
        engine: Engine, channel: ScriptedChannel, metrics: EngineMetrics) -> None:
    paid = pay(engine, channel, "ok-1")
    closing = engine.submit(cash("cl-1"))
    wait_for(lambda: engine.get_order(closing.order_id).state == "paying")
    engine.close(closing.order_id)
    wait_for(lambda: engine.get_order(closing.order_id).settled)
    v_ok = engine.submit(PaymentRequest("station-1", "v-1", "alice", "CNY", 100, "t",
                                        vouchers=(VoucherPart("alice/rp", 100),)))
    v_fail = engine.submit(PaymentRequest("station-1", "v-2", "alice", "CNY", 1000, "t",
                                          vouchers=(VoucherPart("alice/rp", 1000),)))
    for oid in (v_ok.order_id, v_fail.order_id):
        wait_for(lambda oid=oid: engine.get_order(oid).settled)
    channel.refund_reply = ChannelReply("SUCCESS", "SUCCESS")
    engine.refund(paid, "r-1", 50)
    wait_for(lambda: engine.get_order(paid).refund("r-1").status == "succeeded")
    snap = metrics.snapshot()
    assert snap[key("payengine_payments_total", channel="wechat", state="succeeded")] == 1.0
    assert snap[key("payengine_payments_total", channel="wechat", state="closed")] == 1.0
    assert snap[key("payengine_payments_total", channel="none", state="succeeded")] == 1.0
    assert snap[key("payengine_payments_total", channel="none", state="failed")] == 1.0
    assert sum(v for k, v in snap.items() if k.startswith("payengine_payments_total")) == 4.0


def test_submit_and_settle_histograms_count_what_the_readme_says(
        engine: Engine, channel: ScriptedChannel, metrics: EngineMetrics) -> None:
    pay(engine, channel, "h-1")
    engine.submit(cash("h-1"))  # a retried submit returns a receipt too
    snap = metrics.snapshot()
    assert snap["payengine_submit_seconds_count"] == 2.0
    assert snap['payengine_submit_seconds_bucket{le="10.0"}'] == 2.0
    assert snap['payengine_submit_seconds_bucket{le="0.001"}'] <= 2.0
    assert snap[key("payengine_settle_seconds_count", channel="wechat", state="succeeded")] \
        == 1.0
    assert key("payengine_settle_seconds_bucket", channel="wechat", le="0.05",
               state="succeeded") in snap
    assert key("payengine_settle_seconds_bucket", channel="wechat", le="3600.0",
               state="succeeded") in snap


def test_histogram_buckets_span_the_documented_ranges(metrics: EngineMetrics) -> None:
    text = metrics.text()

    def les(name: str) -> list[float]:
        found = re.findall(name + r'_bucket\{.*?le="([^"]+)"', text)
        return sorted({float(x) for x in found if x != "+Inf"})

    assert les("payengine_submit_seconds")[0] == 0.001
    assert les("payengine_submit_seconds")[-1] == 10.0
    assert les("payengine_commit_batch_changes")[0] == 1.0
    assert les("payengine_commit_batch_changes")[-1] == 1024.0


def test_channel_calls_are_timed_and_failures_counted(
        engine: Engine, channel: ScriptedChannel, metrics: EngineMetrics) -> None:
    pay(engine, channel, "c-1")
    snap = metrics.snapshot()
    assert snap[key("payengine_channel_call_seconds_count", channel="wechat",
                    operation="pay")] == float(channel.count("pay"))
    channel.pay_reply = RuntimeError("wallet down")
    receipt = engine.submit(cash("c-2"))
    wait_for(lambda: channel.count("pay") >= 2)
    wait_for(lambda: metrics.snapshot().get(key(
        "payengine_channel_call_failures_total", channel="wechat", operation="pay")) == 1.0)
    assert engine.get_order(receipt.order_id).state in ("paying", "accepted")


def test_commit_and_admission_counters_agree_with_the_engine(
        engine: Engine, channel: ScriptedChannel, metrics: EngineMetrics) -> None:
    pay(engine, channel, "a-1")
    snap = metrics.snapshot()
    assert snap["payengine_commits_total"] >= 1.0
    assert snap["payengine_changes_committed_total"] >= snap["payengine_commits_total"]
    assert snap["payengine_failed_changes_total"] == 0.0
    assert snap["payengine_commit_batch_changes_count"] >= 1.0
    assert snap["payengine_submits_admitted_total"] == 1.0
    assert snap["payengine_submits_refused_total"] == 0.0
    stats = engine.admission_stats
    assert stats.admitted == 1


def test_gauges_read_the_engine_when_scraped(
        engine: Engine, channel: ScriptedChannel, metrics: EngineMetrics) -> None:
    pay(engine, channel, "g-1")
    open_one = engine.submit(cash("g-2"))
    wait_for(lambda: engine.get_order(open_one.order_id).state == "paying")
    snap = metrics.snapshot()
    assert snap["payengine_up"] == 1.0
    assert snap[key("payengine_orders", state="succeeded")] == 1.0
    assert snap[key("payengine_orders", state="paying")] == 1.0
    assert snap["payengine_orders_in_flight"] >= 1.0
    assert snap["payengine_threads"] >= 1.0
    assert snap["payengine_pool_threads"] >= 1.0
    for q in ("actor_messages", "writers", "pool_ready"):
        assert key("payengine_queue_depth", queue=q) in snap
    states = {s: snap[key("payengine_channel_breaker_state", channel="wechat", state=s)]
              for s in ("closed", "open", "half_open")}
    assert states == {"closed": 1.0, "open": 0.0, "half_open": 0.0}
    for item in ("needs_reconciliation", "owed_follow_ups", "dead_letters",
                 "notifications_given_up", "broken_actors"):
        assert snap[key("payengine_needs_person", item=item)] == 0.0
    assert snap["payengine_broken_actors"] == 0.0
    for status in ("pending", "delivered", "given_up"):
        assert key("payengine_merchant_notifications", status=status) in snap
    assert "payengine_order_actors" in snap and "payengine_account_actors" in snap


def test_up_is_zero_after_shutdown(engine: Engine, metrics: EngineMetrics) -> None:
    engine.shutdown()
    snap = metrics.snapshot()
    assert snap["payengine_up"] == 0.0


def test_snapshot_format_labels_sorted_no_created_no_braces_without_labels(
        engine: Engine, channel: ScriptedChannel, metrics: EngineMetrics) -> None:
    pay(engine, channel, "s-1")
    snap = metrics.snapshot()
    assert not any("_created" in k for k in snap)
    assert all(isinstance(v, float) for v in snap.values())
    for k in snap:
        m = re.fullmatch(r"([a-z_]+)(\{(.*)\})?", k)
        assert m, k
        if m.group(3) is not None:
            names = re.findall(r'(\w+)="', m.group(3))
            assert names == sorted(names), k
            assert names, k
    assert "payengine_up" in snap


def test_every_metric_of_the_table_is_exposed_with_its_type(
        engine: Engine, channel: ScriptedChannel, metrics: EngineMetrics) -> None:
    pay(engine, channel, "t-1")
    text = metrics.text()
    table = {
        "payengine_payments": "counter", "payengine_submit_seconds": "histogram",
        "payengine_settle_seconds": "histogram", "payengine_channel_call_seconds": "histogram",
        "payengine_channel_call_failures": "counter",
        "payengine_commit_batch_changes": "histogram", "payengine_commits": "counter",
        "payengine_changes_committed": "counter", "payengine_failed_changes": "counter",
        "payengine_submits_admitted": "counter", "payengine_submits_refused": "counter",
        "payengine_up": "gauge", "payengine_order_actors": "gauge",
        "payengine_orders_in_flight": "gauge", "payengine_account_actors": "gauge",
        "payengine_threads": "gauge", "payengine_pool_threads": "gauge",
        "payengine_queue_depth": "gauge", "payengine_outbox_lag_events": "gauge",
        "payengine_dead_letters": "gauge", "payengine_merchant_notifications": "gauge",
        "payengine_channel_breaker_state": "gauge", "payengine_orders": "gauge",
        "payengine_needs_person": "gauge", "payengine_broken_actors": "gauge",
        "payengine_observer_errors": "counter",
    }
    for name, kind in table.items():
        assert (f"# TYPE {name} {kind}\n" in text
                or f"# TYPE {name}_total {kind}\n" in text), name
    for name, kind in table.items():
        if kind == "counter" and name != "payengine_channel_call_failures":  # none failed
            assert re.search(rf"^{name}_total(\{{| )", text, re.M), name


def test_text_is_generate_latest_of_the_registry(engine: Engine) -> None:
    registry = CollectorRegistry()
    metrics = EngineMetrics(engine, registry=registry)
    assert metrics.registry is registry
    a, b = metrics.text(), generate_latest(registry)
    a = a.decode() if isinstance(a, bytes) else a
    strip = re.compile(r"^payengine_(threads|up|queue_depth|order_actors|orders_in_flight)"
                       r".*$", re.M)
    assert strip.sub("", a) == strip.sub("", b.decode())


def test_a_second_engine_metrics_on_one_registry_is_invalid_request(engine: Engine) -> None:
    registry = CollectorRegistry()
    EngineMetrics(engine, registry=registry)
    with pytest.raises(InvalidRequest):
        EngineMetrics(engine, registry=registry)


def test_engine_metrics_is_also_exported_at_the_top() -> None:
    assert payengine.EngineMetrics is EngineMetrics
    assert isinstance(NO_OBSERVER, Observer)


def test_counters_start_at_zero_with_each_engine_metrics(
        engine: Engine, channel: ScriptedChannel) -> None:
    first = EngineMetrics(engine)
    pay(engine, channel, "z-1")
    wait_for(lambda: first.snapshot().get(
        key("payengine_payments_total", channel="wechat", state="succeeded")) == 1.0)
    second = EngineMetrics(engine)
    assert second.snapshot().get(
        key("payengine_payments_total", channel="wechat", state="succeeded"), 0.0) == 0.0
    assert second.snapshot()[key("payengine_orders", state="succeeded")] == 1.0


def test_an_observer_that_raises_never_fails_a_payment_and_is_counted(
        engine: Engine, channel: ScriptedChannel) -> None:
    metrics = EngineMetrics(engine)
    before = metrics.snapshot()["payengine_observer_errors_total"]

    class Broken(Observer):
        def payment_finished(self, order_id: str, channel: str, state: str) -> None:
            raise RuntimeError("observer bug")

    engine.set_observer(Broken())
    oid = pay(engine, channel, "o-1")
    assert engine.get_order(oid).state == "succeeded"
    wait_for(lambda: metrics.snapshot()["payengine_observer_errors_total"] >= before + 1)


def test_a_custom_observer_gets_each_hook(engine: Engine, channel: ScriptedChannel) -> None:
    seen: list[tuple[str, tuple]] = []

    class Recorder(Observer):
        enabled = True

        def submitted(self, seconds: float) -> None:
            seen.append(("submitted", (seconds,)))

        def payment_finished(self, order_id: str, channel: str, state: str) -> None:
            seen.append(("finished", (order_id, channel, state)))

        def payment_settled(self, order_id: str, channel: str, state: str,
                            created_at_ms: int, settled_at_ms: int) -> None:
            seen.append(("settled", (order_id, channel, state, created_at_ms, settled_at_ms)))

        def channel_call(self, channel: str, operation: str, seconds: float,
                         failed: bool) -> None:
            seen.append(("call", (channel, operation, failed)))

        def group_commit(self, changes: int) -> None:
            seen.append(("commit", (changes,)))

    engine.set_observer(Recorder())
    oid = pay(engine, channel, "r-1")
    wait_for(lambda: any(k == "settled" for k, _ in seen))
    kinds = {k for k, _ in seen}
    assert kinds == {"submitted", "finished", "settled", "call", "commit"}
    assert ("finished", (oid, "wechat", "succeeded")) in seen
    assert ("call", ("wechat", "pay", False)) in seen
    settled = next(a for k, a in seen if k == "settled")
    assert settled[:3] == (oid, "wechat", "succeeded") and settled[4] >= settled[3]


def test_without_prometheus_client_engine_metrics_raises_extra_missing(tmp_path: Path) -> None:
    code = """
import sys, tempfile
from pathlib import Path
sys.modules['prometheus_client'] = None
from payengine import CashPart, Engine, ExtraMissing, PaymentRequest, ThreadRuntime
from payengine.sim.channel import ChannelFaults, SimulatedChannel
from payengine.metrics import EngineMetrics
world = ThreadRuntime()
w = SimulatedChannel('wechat', world, seed=1, faults=ChannelFaults.none())
e = Engine.open(Path(tempfile.mkdtemp()) / 'x.db', channels=[w])
w.attach(e)
try:
    EngineMetrics(e)
except ExtraMissing as error:
    print(error.code, error.extra, "pip install 'payengine[metrics]'" in str(error))
r = e.submit(PaymentRequest('s', 'n', 'u', 'CNY', 100, 't', CashPart(100, 'wechat')))
import time
deadline = time.time() + 20
while not e.get_order(r.order_id).settled and time.time() < deadline:
    time.sleep(0.05)
print(e.get_order(r.order_id).state)
e.shutdown(); world.shutdown()
"""
    r = subprocess.run([PY, "-c", code], cwd=tmp_path, env=env(), capture_output=True,
                       text=True, timeout=60)
    assert r.stdout.split() == ["extra_missing", "metrics", "True", "succeeded"], r.stderr


def test_the_engine_itself_never_imports_prometheus_client(tmp_path: Path) -> None:
    code = """
import sys, tempfile
from pathlib import Path
from payengine import CashPart, Engine, PaymentRequest, ThreadRuntime
from payengine.sim.channel import ChannelFaults, SimulatedChannel
world = ThreadRuntime()
w = SimulatedChannel('wechat', world, seed=1, faults=ChannelFaults.none())
e = Engine.open(Path(tempfile.mkdtemp()) / 'x.db', channels=[w])
w.attach(e)
e.submit(PaymentRequest('s', 'n', 'u', 'CNY', 100, 't', CashPart(100, 'wechat')))
e.shutdown(); world.shutdown()
print('prometheus_client' in sys.modules)
"""
    r = subprocess.run([PY, "-c", code], cwd=tmp_path, env=env(), capture_output=True,
                       text=True, timeout=60)
    assert r.stdout.strip() == "False", r.stderr


def test_metrics_over_http_is_501_extra_missing_without_prometheus_client(
        tmp_path: Path) -> None:
    from .support import free_port
    port = free_port()
    code = ("import runpy, sys; sys.modules['prometheus_client'] = None; "
            f"sys.argv = ['payengine', 'serve', '--port', '{port}']; "
            "runpy.run_module('payengine.sim.cli', run_name='__main__')")
    import signal
    import time

    import httpx
    proc = subprocess.Popen([PY, "-c", code], cwd=tmp_path, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.1)
        r = httpx.get(f"http://127.0.0.1:{port}/metrics")
        assert r.status_code == 501
        assert r.json()["error"]["code"] == "extra_missing"
        assert httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)


def test_a_failed_cash_payment_is_counted_failed_on_its_channel(
        engine: Engine, channel: ScriptedChannel, metrics: EngineMetrics) -> None:
    receipt = engine.submit(cash("f-1"))
    wait_for(lambda: engine.get_order(receipt.order_id).state == "paying")
    channel.query_reply = ChannelReply("SUCCESS", "PAYERROR")
    with contextlib.suppress(Exception):
        signed_callback(engine, "wechat", receipt.payment_serial,
                        ChannelReply("SUCCESS", "PAYERROR"))
    wait_for(lambda: engine.get_order(receipt.order_id).settled, timeout_s=20)
    state = engine.get_order(receipt.order_id).state
    wait_for(lambda: metrics.snapshot().get(
        key("payengine_payments_total", channel="wechat", state=state)) == 1.0)


def test_outbox_lag_is_given_per_subscriber_by_name(tmp_path: Path,
                                                     channel: ScriptedChannel) -> None:
    heard: list[object] = []
    eng = Engine.open(tmp_path / "o.db", channels=[channel], policy=SLOW_POLICY,
                      subscribers={"books": heard.append})
    try:
        metrics = EngineMetrics(eng)
        pay(eng, channel, "ob-1")
        wait_for(lambda: metrics.snapshot().get(
            key("payengine_outbox_lag_events", consumer="books")) == 0.0)
        assert heard
    finally:
        eng.shutdown()


def test_after_shutdown_only_up_is_read(engine: Engine, channel: ScriptedChannel,
                                        metrics: EngineMetrics) -> None:
    pay(engine, channel, "sd-1")
    engine.shutdown()
    snap = metrics.snapshot()
    assert snap["payengine_up"] == 0.0
    assert not any(k.startswith("payengine_orders{") for k in snap)
    assert not any(k.startswith("payengine_queue_depth") for k in snap)


def test_a_close_is_timed_as_the_close_operation(
        engine: Engine, channel: ScriptedChannel, metrics: EngineMetrics) -> None:
    receipt = engine.submit(cash("cc-1"))
    wait_for(lambda: engine.get_order(receipt.order_id).state == "paying")
    engine.close(receipt.order_id)
    wait_for(lambda: engine.get_order(receipt.order_id).settled)
    wait_for(lambda: metrics.snapshot().get(key(
        "payengine_channel_call_seconds_count", channel="wechat", operation="close"))
        == float(channel.count("close")) > 0)


def test_a_submit_refused_overloaded_is_counted_refused(tmp_path: Path,
                                                        channel: ScriptedChannel) -> None:
    from payengine import Overloaded

    eng = Engine.open(tmp_path / "l.db", channels=[channel], policy=SLOW_POLICY,
                      config=EngineConfig(duplicate_guard_window_ms=0, live_orders_max=1))
    try:
        metrics = EngineMetrics(eng)
        eng.submit(cash("l-1"))
        with pytest.raises(Overloaded):
            eng.submit(cash("l-2"))
        stats = eng.admission_stats
        assert stats.refused_live_orders == 1
        snap = metrics.snapshot()
        assert snap["payengine_submits_refused_total"] == float(
            stats.refused_busy + stats.refused_backlog + stats.refused_live_orders)
        assert snap["payengine_submits_admitted_total"] == float(stats.admitted)
        assert snap["payengine_submit_seconds_count"] == 1.0
    finally:
        eng.shutdown()
