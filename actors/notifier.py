"""Delivery of outbox events: to in-process subscribers and to merchants' callback URLs.

Owned by the notifications work (issue 4 item 5). ``Engine.open`` builds one
``Notifications`` after the actors' context and calls ``start``; the order actor calls
``kick`` after each commit that wrote events; ``Engine.shutdown`` and ``abandon`` call
``stop``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from actors.base import Context

Subscriber = Callable[[Any], None]


class Notifications:
    """Delivers every outbox event at least once to each subscriber and merchant."""

    def __init__(self, ctx: Context, subscribers: Mapping[str, Subscriber]) -> None:
        self.ctx = ctx
        self.subscribers = dict(subscribers)

    def start(self) -> None:
        """Resume delivery of everything not yet delivered (after a restart too)."""

    def kick(self) -> None:
        """New events were committed: deliver them soon. Any thread; never blocks."""

    def stop(self) -> None:
        """Stop delivering; undelivered events stay in the outbox for the next open."""
