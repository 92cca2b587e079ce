"""A simulated merchant server: receives the engine's signed notifications, sometimes down.

It stands in for the HTTP endpoint behind ``Notifications.register_merchant`` (through
``NotificationConfig.transport``), so the simulator can check that every terminal order,
finished refund and expired hold reaches the merchant, signed, however often the merchant
fails and the engine crashes. It lives outside the engine: what it received survives the
engine's crashes, like a real merchant's database.
"""

from __future__ import annotations

import json
import random
import threading
from collections.abc import Callable, Mapping

from payengine.actors.notifier import EVENT_ID_HEADER, SIGNATURE_HEADER, verify_signature
from payengine.sim.oracle import Told, told_key


class SimMerchant:
    """Answers SUCCESS, or fails (an HTTP 500, a wrong body) with probability ``down()``."""

    def __init__(self, secret: str, rng: random.Random, down: Callable[[], float]) -> None:
        self.secret = secret
        self.rng = rng
        self.down = down
        self.received: dict[str, Told] = {}
        """event id -> what it told (``sim.oracle.Told``): each event once, however often."""
        self.duplicates = 0
        self.refused = 0
        self.bad_signatures: list[str] = []
        self._lock = threading.Lock()

    def __call__(self, url: str, body: bytes, headers: Mapping[str, str], timeout_s: float
                 ) -> tuple[bool, str]:
        with self._lock:
            event_id = headers.get(EVENT_ID_HEADER, "?")
            if not verify_signature(self.secret, body, headers.get(SIGNATURE_HEADER, "")):
                self.bad_signatures.append(event_id)
                return False, "HTTP 401, signature"
            if self.rng.random() < self.down():
                self.refused += 1
                return False, self.rng.choice(["HTTP 500", "HTTP 200, body b'FAIL'"])
            payload = json.loads(body)
            if event_id in self.received:
                self.duplicates += 1
            self.received[event_id] = told_key(
                str(payload["event_type"]), str(payload["order_id"]), str(payload["to_state"]),
                payload.get("refund_id"), payload.get("account_id"), payload.get("hold_id"))
            return True, "HTTP 200"
