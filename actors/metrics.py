"""Prometheus metrics of one engine (the optional extra ``payengine[metrics]``).

``EngineMetrics(engine)`` registers on a prometheus-client ``CollectorRegistry`` (a new one
unless given): counters and histograms fed by the engine's observation hooks
(``actors.observe``: a payment's final state, latencies, channel calls, group commits), and
gauges read from the engine when scraped (actors, queues, threads, outbox lag, dead letters,
breakers, what needs a person), which cost nothing between scrapes. Read it without a server:
``text()`` (the Prometheus text format) or ``snapshot()`` (a dict); serve
``generate_latest(metrics.registry)`` at ``/metrics`` to have it scraped.

prometheus_client is imported here only, when an ``EngineMetrics`` is made: without the
extra, that raises ``ExtraMissing`` and the engine runs as before.

Threads: hooks run on the engine's threads (see ``actors.observe``) and only touch
prometheus-client's metric objects, which are thread-safe. A scrape (``collect``) runs on the
scraper's thread and reads the database through the engine's readers (a few ``COUNT``s and
``GROUP BY``s), never its writer.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from types import ModuleType
from typing import TYPE_CHECKING, Any

from payengine.actors.observe import HOOK_ERRORS, Observer
from payengine.engine.errors import EngineClosed, ExtraMissing, InvalidRequest
from payengine.engine.operator import AttentionKind

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

    from payengine.actors.engine import Engine

NAMESPACE = "payengine"
OWED_COUNT_MAX = 10_000
"""Orders owing a voucher follow-up are counted up to this many at a scrape (a bounded read);
the gauge shows this figure when there are more."""

SUBMIT_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
SETTLE_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)
CHANNEL_CALL_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
BREAKER_STATES = ("closed", "open", "half_open")


def prometheus() -> ModuleType:
    """The prometheus_client module, or ``ExtraMissing`` when the extra is not installed."""
    try:
        return importlib.import_module("prometheus_client")
    except ImportError:
        raise ExtraMissing(
            "metrics need prometheus-client: pip install 'payengine[metrics]'",
            "metrics") from None


class _Hooks(Observer):
    """The counters and histograms the engine's hooks feed (see ``actors.observe``)."""

    enabled = True

    def __init__(self, client: ModuleType, registry: CollectorRegistry) -> None:
        n = NAMESPACE
        self.payments = client.Counter(
            "payments", "Payment orders by final state and cash channel (none: vouchers "
            "only), counted when the order reaches it", ["state", "channel"], namespace=n,
            registry=registry)
        self.submit = client.Histogram(
            "submit_seconds", "Engine.submit, from the call to the receipt", namespace=n,
            buckets=SUBMIT_BUCKETS_S, registry=registry)
        self.settle = client.Histogram(
            "settle_seconds", "A payment from its submit to settled (final, nothing in flight "
            "or owed), on the engine clock", ["channel", "state"], namespace=n,
            buckets=SETTLE_BUCKETS_S, registry=registry)
        self.channel_calls = client.Histogram(
            "channel_call_seconds", "A call to a wallet from the I/O lane, by channel and "
            "operation", ["channel", "operation"], namespace=n, buckets=CHANNEL_CALL_BUCKETS_S,
            registry=registry)
        self.channel_failures = client.Counter(
            "channel_call_failures", "Calls to a wallet that raised (no answer)",
            ["channel", "operation"], namespace=n, registry=registry)
        self.batch = client.Histogram(
            "commit_batch_changes", "Writers' changes committed together in one transaction",
            namespace=n, buckets=BATCH_BUCKETS, registry=registry)

    def submitted(self, seconds: float) -> None:
        self.submit.observe(seconds)

    def payment_finished(self, order_id: str, channel: str, state: str) -> None:
        self.payments.labels(state=state, channel=channel).inc()

    def payment_settled(self, order_id: str, channel: str, state: str, created_at_ms: int,
                        settled_at_ms: int) -> None:
        self.settle.labels(channel=channel, state=state).observe(
            max(0, settled_at_ms - created_at_ms) / 1000)

    def channel_call(self, channel: str, operation: str, seconds: float, failed: bool) -> None:
        self.channel_calls.labels(channel=channel, operation=operation).observe(seconds)
        if failed:
            self.channel_failures.labels(channel=channel, operation=operation).inc()

    def group_commit(self, changes: int) -> None:
        self.batch.observe(changes)


class _Scraped:
    """A custom collector: the gauges (and engine-kept counters) read at scrape time."""

    def __init__(self, client: ModuleType, engine: Engine) -> None:
        self._core = importlib.import_module("prometheus_client.core")
        self._client = client
        self._engine = engine
        # the hook-error count is process-wide: this registry's counter starts at zero
        self._observer_errors_before = HOOK_ERRORS[0]

    def collect(self) -> Iterator[Metric]:
        core, engine = self._core, self._engine
        up = core.GaugeMetricFamily(f"{NAMESPACE}_up", "1 while the engine is open")
        is_open = not engine.store.closed
        up.add_metric([], 1 if is_open else 0)
        yield up
        if not is_open:
            return
        try:
            families = [*self._vitals(), *self._stored()]
        except EngineClosed:  # closed during the scrape: what was read is dropped
            return
        yield from families

    def _gauge(self, name: str, doc: str, value: float) -> Metric:
        family: GaugeMetricFamily = self._core.GaugeMetricFamily(f"{NAMESPACE}_{name}", doc)
        family.add_metric([], value)
        return family

    def _counter(self, name: str, doc: str, value: float) -> Metric:
        family: CounterMetricFamily = self._core.CounterMetricFamily(f"{NAMESPACE}_{name}", doc)
        family.add_metric([], value)
        return family

    def _labelled(self, name: str, doc: str, labels: list[str],
                  values: dict[tuple[str, ...], float]) -> Metric:
        family: GaugeMetricFamily = self._core.GaugeMetricFamily(f"{NAMESPACE}_{name}", doc, labels=labels)
        for key, value in sorted(values.items()):
            family.add_metric(list(key), value)
        return family

    def _vitals(self) -> list[Metric]:
        v = self._engine.vitals()
        return [
            self._gauge("order_actors", "Order actors running now", v.live_order_actors),
            self._gauge("orders_in_flight", "Orders with an actor, running or passivated",
                        v.orders_in_flight),
            self._gauge("account_actors", "Voucher account actors running now",
                        v.live_account_actors),
            self._gauge("threads", "Threads of the process", v.threads),
            self._gauge("pool_threads", "Worker threads of the actor pool", v.pool_threads),
            self._labelled("queue_depth", "Work waiting: actor_messages (told, not handled), "
                           "writers (threads waiting for the group commit), pool_ready "
                           "(actors waiting for a pool thread)", ["queue"],
                           {("actor_messages",): v.actor_backlog, ("writers",): v.writer_backlog,
                            ("pool_ready",): v.pool_ready}),
            self._counter("commits", "Transactions committed (group commits)", v.commits),
            self._counter("changes_committed", "Writers' changes committed", v.changes_committed),
            self._counter("failed_changes", "Writers' changes that failed", v.failed_changes),
            self._counter("submits_admitted", "Submits past the admission gate",
                          v.submits_admitted),
            self._counter("submits_refused", "Submits refused Overloaded", v.submits_refused),
            self._labelled("channel_breaker_state", "1 for each channel's breaker state, 0 "
                           "for the others", ["channel", "state"],
                           {(channel, state): float(state == now)
                            for channel, now in v.breaker_states.items()
                            for state in BREAKER_STATES}),
            self._gauge("broken_actors", "Actors quarantined on a broken invariant",
                        v.broken_actors),
            self._counter("observer_errors", "Exceptions observation hooks raised (dropped)",
                          v.observer_errors - self._observer_errors_before),
        ]

    def _stored(self) -> list[Metric]:
        engine = self._engine
        store, notifications = engine.store, engine.notifications
        by_state = store.count_orders_by_state()
        owed = len(store.orders_owing_follow_ups(OWED_COUNT_MAX))
        dead = notifications.dead_letter_counts()
        merchant_counts = notifications.counts()
        return [
            self._labelled("orders", "Payment orders in the database by state", ["state"],
                           {(state,): n for state, n in by_state.items()}),
            self._labelled("outbox_lag_events", "Outbox events a consumer has not handled "
                           "yet (~merchants: the merchant dispatcher)", ["consumer"],
                           {(c,): n for c, n in notifications.lag().items()}),
            self._labelled("dead_letters", "Events a subscriber refused until its retries "
                           "ran out", ["subscriber"], {(s,): n for s, n in dead.items()}),
            self._labelled("merchant_notifications", "Merchant notifications by status",
                           ["status"], {(s,): n for s, n in merchant_counts.items()}),
            self._labelled(
                "needs_person", "Items a person has to look at", ["item"], {
                    ("needs_reconciliation",): by_state.get("needs_reconciliation", 0),
                    ("owed_follow_ups",): owed,
                    ("dead_letters",): sum(dead.values()),
                    ("notifications_given_up",): merchant_counts.get("given_up", 0),
                    ("broken_actors",): len(engine.broken_actors())}),
            self._labelled("attention_items", "Items of the operator's attention queue "
                           "(Engine.attention) by kind", ["kind"], _attention_counts(engine)),
        ]


def _attention_counts(engine: Engine) -> dict[tuple[str, ...], float]:
    """``Engine.attention()`` counted by kind, every kind present (0 when none): what the
    operator tools list, unacknowledged, at most ``ATTENTION_ITEMS_MAX`` of each kind."""
    counts: dict[tuple[str, ...], float] = {(kind.value,): 0 for kind in AttentionKind}
    for item in engine.attention():
        counts[(item.kind.value,)] += 1
    return counts


class EngineMetrics:
    """Prometheus metrics of ``engine`` on ``registry`` (a new ``CollectorRegistry`` if
    ``None``). Installs its hooks as the engine's observer (``Engine.set_observer``): one
    ``EngineMetrics`` per engine and per registry (a second on the same registry:
    ``InvalidRequest``). ``ExtraMissing`` without prometheus-client.

    Counters and histograms count from when it is made (a new engine, after a restart:
    from zero again, which Prometheus handles as a counter reset).
    """

    def __init__(self, engine: Engine, registry: CollectorRegistry | None = None) -> None:
        client = prometheus()
        self.registry: CollectorRegistry = registry or client.CollectorRegistry()
        self._client = client
        try:
            self.hooks = _Hooks(client, self.registry)
        except ValueError:  # prometheus-client: "Duplicated timeseries in CollectorRegistry"
            raise InvalidRequest("this registry has an engine's metrics already: one "
                                 "EngineMetrics per registry") from None
        self.registry.register(_Scraped(client, engine))
        engine.set_observer(self.hooks)

    def text(self) -> str:
        """Every metric in the Prometheus text format (what ``/metrics`` serves)."""
        return str(self._client.generate_latest(self.registry).decode("utf-8"))

    def snapshot(self) -> dict[str, float]:
        """Every sample as ``{'name{label="value",...}': value}`` (labels sorted; no braces
        without labels), ``_created`` timestamps left out. For tests, logs, a JSON API."""
        samples: dict[str, float] = {}
        for family in self.registry.collect():
            for sample in family.samples:
                if sample.name.endswith("_created"):
                    continue
                samples[_sample_key(sample.name, sample.labels)] = float(sample.value)
        return samples


def _sample_key(name: str, labels: dict[str, Any]) -> str:
    if not labels:
        return name
    inner = ",".join(f'{k}="{labels[k]}"' for k in sorted(labels))
    return f"{name}{{{inner}}}"
