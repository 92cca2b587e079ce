"""Metrics (``payengine.metrics``): a real engine through a few payments, scraped and parsed."""

from __future__ import annotations

import builtins
import importlib
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from payengine import Engine, EngineConfig, ExtraMissing
from payengine.actors.observe import HOOK_ERRORS, NO_OBSERVER, Observer, notify, timed
from tests.helpers import (
    ScriptedChannel,
    fuel_request,
    paid_order,
    wait_for,
)

prometheus_client = pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from payengine.metrics import EngineMetrics  # noqa: E402


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus text exposition, by (name, sorted labels)."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _value(metrics: EngineMetrics, name: str, **labels: str) -> float:
    return _samples(metrics.text()).get((name, tuple(sorted(labels.items()))), 0.0)


def test_payments_are_counted_once_by_final_state_and_channel_in_the_text_exposition(
    engine: Engine, channel: ScriptedChannel
) -> None:
    metrics = EngineMetrics(engine)
    paid_order(engine, "order-1")
    paid_order(engine, "order-2")
    receipt = engine.submit(fuel_request("order-3"))
    wait_for(lambda: engine.get_order(receipt.order_id).state == "paying", what="paying")
    assert engine.close(receipt.order_id).state == "closed"
    wait_for(lambda: engine.get_order(receipt.order_id).settled, what="closed and released")
    wait_for(lambda: _value(metrics, "payengine_payments_total", channel="wechat",
                            state="closed") == 1, what="the close counted")
    wait_for(lambda: _value(metrics, "payengine_settle_seconds_count", channel="wechat",
                            state="closed") == 1, what="the close's settling observed")
    samples = _samples(metrics.text())
    payments = {labels: value for (name, labels), value in samples.items()
                if name == "payengine_payments_total"}
    assert payments == {(("channel", "wechat"), ("state", "succeeded")): 2.0,
                        (("channel", "wechat"), ("state", "closed")): 1.0}
    assert samples[("payengine_submit_seconds_count", ())] == 3.0
    assert samples[("payengine_settle_seconds_count",
                    (("channel", "wechat"), ("state", "succeeded")))] == 2.0
    assert samples[("payengine_channel_call_seconds_count",
                    (("channel", "wechat"), ("operation", "pay")))] == 3.0
    assert samples[("payengine_channel_call_seconds_count",
                    (("channel", "wechat"), ("operation", "close")))] == 1.0
    assert samples[("payengine_up", ())] == 1.0
    assert samples[("payengine_orders", (("state", "succeeded"),))] == 2.0
    assert samples[("payengine_orders", (("state", "closed"),))] == 1.0
    assert samples[("payengine_needs_person", (("item", "needs_reconciliation"),))] == 0.0
    assert samples[("payengine_needs_person", (("item", "owed_follow_ups"),))] == 0.0
    assert samples[("payengine_channel_breaker_state",
                    (("channel", "wechat"), ("state", "closed")))] == 1.0
    assert samples[("payengine_channel_breaker_state",
                    (("channel", "wechat"), ("state", "open")))] == 0.0
    assert samples[("payengine_commits_total", ())] >= 1.0
    assert samples[("payengine_commit_batch_changes_count", ())] >= 1.0
    assert samples[("payengine_observer_errors_total", ())] == 0.0


def test_a_snapshot_names_each_sample_with_its_sorted_labels(engine: Engine) -> None:
    metrics = EngineMetrics(engine)
    paid_order(engine, "order-1")
    wait_for(lambda: metrics.snapshot().get(
        'payengine_payments_total{channel="wechat",state="succeeded"}') == 1.0,
        what="the payment counted")
    snapshot = metrics.snapshot()
    assert snapshot["payengine_up"] == 1.0
    assert snapshot['payengine_queue_depth{queue="writers"}'] >= 0.0
    assert not any(key.split("{")[0].endswith("_created") for key in snapshot)


def test_a_failing_wallet_call_is_counted_as_a_failure_of_its_operation(
    engine: Engine, channel: ScriptedChannel
) -> None:
    metrics = EngineMetrics(engine)
    channel.pay_reply = ConnectionError("the wallet is down")
    engine.submit(fuel_request("order-1"))
    wait_for(lambda: _value(metrics, "payengine_channel_call_failures_total", channel="wechat",
                            operation="pay") == 1, what="the failed pay counted")


def test_outbox_lag_and_dead_letters_are_read_at_scrape_time(tmp_path: Any) -> None:
    seen: list[str] = []
    engine = Engine.open(tmp_path / "pay.db", channels=[ScriptedChannel()],
                         subscribers={"erp": lambda event: seen.append(event.event_id)},
                         config=EngineConfig(duplicate_guard_window_ms=0))
    try:
        metrics = EngineMetrics(engine)
        assert metrics.snapshot()['payengine_outbox_lag_events{consumer="erp"}'] == 0.0
        assert 'payengine_dead_letters{subscriber="erp"}' not in metrics.snapshot()
    finally:
        engine.shutdown()


def test_a_shut_down_engine_scrapes_as_down_with_nothing_else_read(engine: Engine) -> None:
    metrics = EngineMetrics(engine)
    engine.shutdown()
    snapshot = metrics.snapshot()
    assert snapshot["payengine_up"] == 0.0
    assert "payengine_orders_in_flight" not in snapshot


def test_two_engines_metrics_live_on_registries_of_their_own(engine: Engine, tmp_path: Any
                                                             ) -> None:
    first = EngineMetrics(engine)
    other = Engine.open(tmp_path / "other.db", channels=[ScriptedChannel()])
    try:
        second = EngineMetrics(other)
        assert first.registry is not second.registry
    finally:
        other.shutdown()


def test_without_prometheus_client_metrics_raise_extra_missing_and_the_engine_pays_on(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_import = builtins.__import__

    def no_prometheus(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.startswith("prometheus_client"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_prometheus)
    monkeypatch.setattr(importlib, "import_module", lambda name, *a: no_prometheus(name))
    with pytest.raises(ExtraMissing) as raised:
        EngineMetrics(engine)
    assert raised.value.code == "extra_missing"
    assert raised.value.extra == "metrics"
    assert "payengine[metrics]" in raised.value.message
    assert engine._ctx.observer is NO_OBSERVER
    assert paid_order(engine, "order-1").state == "succeeded"


def test_set_observer_refuses_what_is_not_an_observer(engine: Engine) -> None:
    from payengine import InvalidRequest

    with pytest.raises(InvalidRequest):
        engine.set_observer(object())  # type: ignore[arg-type]


class _Exploding(Observer):
    enabled = True

    def submitted(self, seconds: float) -> None:
        raise RuntimeError("a broken collector")

    def payment_finished(self, order_id: str, channel: str, state: str) -> None:
        raise RuntimeError("a broken collector")


def test_an_observer_that_raises_never_fails_a_payment_and_is_counted(engine: Engine) -> None:
    before = HOOK_ERRORS[0]
    engine.set_observer(_Exploding())
    assert paid_order(engine, "order-1").state == "succeeded"
    wait_for(lambda: HOOK_ERRORS[0] >= before + 2, what="both hooks' errors counted")
    assert engine.vitals().observer_errors >= before + 2


def test_vitals_read_the_engine_s_memory(engine: Engine) -> None:
    vitals = engine.vitals()
    assert vitals.breaker_states == {"wechat": "closed"}
    assert vitals.broken_actors == 0
    assert vitals.threads >= 1


class _Recorder(Observer):
    enabled = True

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, bool]] = []

    def channel_call(self, channel: str, operation: str, seconds: float, failed: bool) -> None:
        assert seconds >= 0
        self.calls.append((channel, operation, failed))


@settings(max_examples=50, deadline=None)
@given(outcomes=st.lists(st.booleans(), max_size=20))
def test_timed_reports_every_call_once_with_its_outcome(outcomes: list[bool]) -> None:
    recorder = _Recorder()
    for fails in outcomes:
        def call(fails: bool = fails) -> str:
            if fails:
                raise ValueError("no answer")
            return "reply"

        wrapped = timed(recorder, "wechat", "pay", call)
        if fails:
            with pytest.raises(ValueError):
                wrapped()
        else:
            assert wrapped() == "reply"
    assert recorder.calls == [("wechat", "pay", fails) for fails in outcomes]


def test_timed_adds_no_wrapper_for_an_observer_that_measures_nothing() -> None:
    def call() -> str:
        return "reply"

    assert timed(NO_OBSERVER, "wechat", "pay", call) is call


def test_notify_swallows_and_counts_what_a_hook_raises() -> None:
    before = HOOK_ERRORS[0]

    def hook(*args: Any) -> None:
        raise RuntimeError("broken")

    notify(hook, 1)
    assert HOOK_ERRORS[0] == before + 1



def test_the_readme_s_metrics_example_runs_as_it_is(capsys: pytest.CaptureFixture[str]) -> None:
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("### Metrics\n"):]
    start = section.index("```python\n") + len("```python\n")
    code = section[start:section.index("```\n", start)]
    exec(compile(code, "README.md#metrics", "exec"), {"__name__": "readme_example"})
    text = capsys.readouterr().out
    assert 'payengine_payments_total{channel="wechat",state="succeeded"} 1.0' in text
    assert "payengine_up 1.0" in text


def test_a_second_engine_metrics_on_the_same_registry_is_refused(engine: Engine, tmp_path: Any
                                                                 ) -> None:
    from payengine import InvalidRequest

    first = EngineMetrics(engine)
    other = Engine.open(tmp_path / "other.db", channels=[ScriptedChannel()])
    try:
        with pytest.raises(InvalidRequest, match="one EngineMetrics per registry"):
            EngineMetrics(other, registry=first.registry)
    finally:
        other.shutdown()


def test_the_attention_queue_is_a_gauge_by_kind_every_kind_listed_and_acknowledged_left_out(
        tmp_path: Any, channel: ScriptedChannel) -> None:
    from payengine.actors.notifier import NotificationConfig
    from payengine.engine.operator import AttentionKind
    from tests.helpers import fund_customer
    from tests.test_operator_tools import Picky

    config = EngineConfig(ask_timeout_s=5.0, duplicate_guard_window_ms=0,
                          notifications=NotificationConfig(subscriber_retry_ms=(5,)))
    engine = Engine.open(tmp_path / "attention.db", channels=[channel],  # type: ignore[list-item]
                         config=config, subscribers={"books": Picky()})
    try:
        metrics = EngineMetrics(engine)
        fund_customer(engine)
        engine.submit(fuel_request("o1"))
        letters = wait_for(lambda: [i for i in engine.attention()
                                    if i.kind is AttentionKind.DEAD_LETTER], what="dead letter")
        def gauge() -> dict[str, float]:
            return {dict(labels)["kind"]: value for (name, labels), value
                    in _samples(metrics.text()).items() if name == "payengine_attention_items"}

        def queue() -> dict[str, float]:
            listed = {kind.value: 0.0 for kind in AttentionKind}
            for item in engine.attention():
                listed[item.kind.value] += 1
            return listed

        assert set(gauge()) == {kind.value for kind in AttentionKind}
        wait_for(lambda: gauge() == queue(), what="the gauge to match the queue")
        assert gauge()["dead_letter"] >= 1
        for item in letters:
            engine.resolve(item.item_id, "acknowledge", operator="ops-anna", reason="seen")
        acknowledged = {item.item_id for item in letters}
        assert not acknowledged & {i.item_id for i in engine.attention()}
        wait_for(lambda: _value(metrics, "payengine_attention_items", kind="dead_letter")
                 == sum(i.kind is AttentionKind.DEAD_LETTER for i in engine.attention()),
                 what="the gauge to count only what the queue lists")
    finally:
        engine.shutdown()
