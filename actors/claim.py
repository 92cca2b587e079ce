"""An asked message that is either handled or withdrawn, never both: ``Claim``.

An ask that times out (``Overloaded``) normally leaves its message queued: the actor
handles it later, and a caller that retries has it handled twice. For an ask that must
count once whatever the caller does (``Engine.verify``: a wrong code counts against the
user's attempts), the message carries a ``Claim``: the actor takes it just before it
handles the message, the asker withdraws it when it stops waiting, and exactly one of the
two wins (a lock decides). Withdrawn: the actor skips the message, so ``Overloaded`` means
"nothing was done". Taken: the asker waits for the outcome the actor hands over
(``finish``), bounded, instead of saying "overloaded" about a message being handled.

Threads: ``take`` and ``finish`` run on the actor's thread, ``withdraw`` and ``outcome``
on the asker's.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from payengine.engine.errors import Overloaded

_OPEN, _TAKEN, _WITHDRAWN = "open", "taken", "withdrawn"


class Claim:
    """Who decides an asked message: the actor that takes it, or the asker that withdraws
    it; the first one wins. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._state = _OPEN
        self._finished = threading.Event()
        self._outcome: Any = None

    def take(self) -> bool:
        """The actor is about to handle the message: True unless the asker withdrew it."""
        with self._lock:
            if self._state == _OPEN:
                self._state = _TAKEN
            return self._state == _TAKEN

    def withdraw(self) -> bool:
        """The asker stops waiting: True if the actor had not taken it (it never will)."""
        with self._lock:
            if self._state == _OPEN:
                self._state = _WITHDRAWN
            return self._state == _WITHDRAWN

    def finish(self, outcome: Any) -> None:
        """The actor's answer (a reply, or the exception it raised) for a late asker."""
        self._outcome = outcome
        self._finished.set()

    def outcome(self, timeout_s: float) -> Any:
        """The answer of a message the actor took: returned, or raised if it is an error.
        ``Overloaded`` if it did not come within ``timeout_s``."""
        if not self._finished.wait(timeout_s):
            raise Overloaded(f"the request was taken but not answered within {timeout_s} s: "
                             "it may have been applied; read the state before retrying")
        if isinstance(self._outcome, BaseException):
            raise self._outcome
        return self._outcome


@dataclass(frozen=True, slots=True)
class Claimed:
    """An order event asked under a ``Claim`` (``OrderBehaviour`` unwraps it)."""

    claim: Claim
    event: Any
