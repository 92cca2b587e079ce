"""A channel's health: a circuit breaker over its recent calls (R-PROD: routing skips a
channel that is down, so a failing merchant number cannot take payments with it).

A call *fails* when the channel did not answer well-formed (an exception: timeout,
connection reset; a reply whose communication code is not OK). A business refusal (the
payer's card declined) is an answer, not a failure. The breaker:

- ``closed``: counts the last ``BreakerPolicy.window_calls`` outcomes; when at least
  ``calls_min`` of them are there and ``failure_pct`` percent or more failed, it opens;
- ``open``: the channel is skipped by routing for ``open_ms``;
- ``half_open``: after that, routing may send it **one** payment (the probe: ``probe``); the
  next outcome closes it (a success) or opens it again (a failure). A probe that brings no
  outcome within ``open_ms`` (the payment went elsewhere, the call hangs) lets another one
  through.

Pure: time comes in as ``now_ms``; the shell keeps one breaker per channel.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from payengine.engine.checks import check_int


class BreakerState(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True, slots=True)
class BreakerPolicy:
    window_calls: int = 20
    """Outcomes remembered (1..1000)."""
    calls_min: int = 5
    """Outcomes needed before the breaker may open (1..window_calls)."""
    failure_pct: int = 50
    """Share of failures, in percent, that opens it (1..100)."""
    open_ms: int = 30_000
    """How long an open breaker keeps its channel out of routing (1 ms..1 h)."""

    def __post_init__(self) -> None:
        check_int(self.window_calls, "breaker window_calls", 1, 1_000)
        check_int(self.calls_min, "breaker calls_min", 1, self.window_calls)
        check_int(self.failure_pct, "breaker failure_pct", 1, 100)
        check_int(self.open_ms, "breaker open_ms", 1, 3_600_000)


@dataclass(frozen=True, slots=True)
class Breaker:
    """One channel's breaker. Immutable: ``record`` returns the next one."""

    outcomes: tuple[bool, ...] = ()
    """The latest outcomes while closed, oldest first (``True``: answered)."""
    open_until_ms: int | None = None
    """Set while open or half open: when the open period ends(ed)."""
    probe_until_ms: int | None = None
    """Half open: until when the payment routed to it as a probe is waited for."""

    def state(self, now_ms: int) -> BreakerState:
        if self.open_until_ms is None:
            return BreakerState.CLOSED
        return BreakerState.OPEN if now_ms < self.open_until_ms else BreakerState.HALF_OPEN

    def available(self, now_ms: int) -> bool:
        """Whether routing may choose the channel now: closed, or half open with no probe
        out."""
        state = self.state(now_ms)
        if state is BreakerState.HALF_OPEN:
            return self.probe_until_ms is None or now_ms >= self.probe_until_ms
        return state is BreakerState.CLOSED

    def probe(self, now_ms: int, policy: BreakerPolicy) -> Breaker:
        """Routing chose the channel: a half-open breaker lets nothing else through until
        the probe's outcome (or ``open_ms``)."""
        if self.state(now_ms) is not BreakerState.HALF_OPEN:
            return self
        return Breaker(self.outcomes, self.open_until_ms, now_ms + policy.open_ms)

    def record(self, answered: bool, now_ms: int, policy: BreakerPolicy) -> Breaker:
        state = self.state(now_ms)
        if state is BreakerState.OPEN:
            return self  # a call started before it opened: already counted as down
        if state is BreakerState.HALF_OPEN:
            return Breaker() if answered else Breaker((), now_ms + policy.open_ms)
        outcomes = (*self.outcomes, answered)[-policy.window_calls:]
        failures = outcomes.count(False)
        if len(outcomes) >= policy.calls_min and failures * 100 >= (
            policy.failure_pct * len(outcomes)
        ):
            return Breaker((), now_ms + policy.open_ms)
        return Breaker(outcomes)
