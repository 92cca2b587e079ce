"""Every channel's circuit breaker (``engine.health``), fed by the outcome of each channel
call and read by routing at submit.

Thread-safe: outcomes are recorded on the channels' I/O lanes (the callback of each call),
routing reads on the submitting thread. One breaker per configured channel: bounded.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable

from payengine.engine.health import Breaker, BreakerPolicy, BreakerState


class ChannelHealth:
    def __init__(self, channels: Iterable[str], policy: BreakerPolicy,
                 clock_ms: Callable[[], int]) -> None:
        self._policy = policy
        self._clock_ms = clock_ms
        self._breakers = {name: Breaker() for name in channels}
        self._lock = threading.Lock()

    def record(self, channel: str, answered: bool) -> None:
        """One call's outcome: ``answered`` (a well-formed reply, whatever it said) or not
        (an exception, a communication failure)."""
        now = self._clock_ms()
        with self._lock:
            breaker = self._breakers.get(channel)
            if breaker is not None:
                self._breakers[channel] = breaker.record(answered, now, self._policy)

    def chosen(self, channel: str) -> None:
        """Routing chose ``channel`` for a payment: a half-open breaker's probe is out."""
        now = self._clock_ms()
        with self._lock:
            breaker = self._breakers.get(channel)
            if breaker is not None:
                self._breakers[channel] = breaker.probe(now, self._policy)

    def unavailable(self) -> frozenset[str]:
        """Channels whose breaker is open now: routing skips them."""
        now = self._clock_ms()
        with self._lock:
            return frozenset(name for name, b in self._breakers.items() if not b.available(now))

    def states(self) -> dict[str, BreakerState]:
        now = self._clock_ms()
        with self._lock:
            return {name: b.state(now) for name, b in self._breakers.items()}
