"""An operator's mistake at a restart: a channel left out that unsettled orders still use.

At every reopen after a crash (deterministic runtime only) the simulator first opens the
engine once without each channel in turn. ``Engine.open`` must refuse (``ChannelsMissing``)
exactly when unsettled orders use the channel left out, naming it with their number, and
before anything ran: an engine that took such an open would leave those orders' actors with
no channel at every timer. Nothing of the workload is drawn here, so seeds' workloads stay
the same; a refused open starts nothing, an accepted one is abandoned before it was driven.

Then it opens once with each channel in turn unable to pre-authorise (``CannotAuthorise``):
``Engine.open`` must refuse (``AuthorisationChannelsMissing``) exactly when unsettled pump
pre-authorisations use it (invariant ``reopen-needs-authorising-channels``; the planted bug
``open-with-non-authorising-channel`` skips the check).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from payengine.actors.engine import Engine
from payengine.engine.errors import AuthorisationChannelsMissing, ChannelsMissing
from payengine.sim.oracle import Violation


@dataclass(frozen=True, slots=True)
class ReopenTry:
    """One open without ``missing`` (or, ``plain``, with ``missing`` unable to
    pre-authorise): refused with ``named`` (channel -> unsettled orders, or unsettled
    pre-authorisations), or accepted (``named`` is ``None``)."""

    missing: str
    named: dict[str, int] | None
    used: dict[str, int]
    """Unsettled orders (``plain``: pre-authorisations) by channel, read from the file just
    before this open (an accepted open may itself start work: a resumed withholding submits
    its next attempt)."""
    plain: bool = False


AUTHORISATION_METHODS = frozenset({"authorise", "capture", "void", "query_authorisation"})


class CannotAuthorise:
    """A wallet as an operator might configure it by mistake: the same channel without its
    ``AuthorisationChannel`` methods (an HTTP adapter of the same wallet, say)."""

    def __init__(self, inner: object) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> object:
        if name in AUTHORISATION_METHODS:
            raise AttributeError(name)
        return getattr(self._inner, name)


def try_without_each(channels: Mapping[str, object],
                     open_without: Callable[[str], Engine],
                     abandon: Callable[[Engine], None],
                     usage: Callable[[], dict[str, int]]) -> list[ReopenTry]:
    """Open without each channel in turn (``open_without(name)``), in name order, each
    after reading ``usage()`` (unsettled orders by channel, from the file)."""
    return _try_each(channels, open_without, abandon, usage, ChannelsMissing, plain=False)


def try_plain_each(channels: Mapping[str, object],
                   open_plain: Callable[[str], Engine],
                   abandon: Callable[[Engine], None],
                   usage: Callable[[], dict[str, int]]) -> list[ReopenTry]:
    """Open with each channel in turn unable to pre-authorise (``open_plain(name)``), in
    name order, each after reading ``usage()`` (unsettled pre-authorisations by channel)."""
    return _try_each(channels, open_plain, abandon, usage, AuthorisationChannelsMissing,
                     plain=True)


def _try_each(channels: Mapping[str, object], open_one: Callable[[str], Engine],
              abandon: Callable[[Engine], None], usage: Callable[[], dict[str, int]],
              refusal: type[ChannelsMissing], *, plain: bool) -> list[ReopenTry]:
    """One open per channel, in name order: a ``refusal`` is recorded with the channels it
    names, an accepted open is abandoned and recorded as such."""
    tries = []
    for name in sorted(channels):
        used = usage()
        try:
            engine = open_one(name)
        except refusal as refused:
            tries.append(ReopenTry(name, dict(refused.channels), used, plain=plain))
            continue
        abandon(engine)
        tries.append(ReopenTry(name, None, used, plain=plain))
    return tries


def check_reopens(tries: list[ReopenTry]) -> list[Violation]:
    """A refusal names exactly the channel left out and its orders; an accepted open left
    out a channel no unsettled order used."""
    violations = []
    for t in tries:
        used = t.used.get(t.missing, 0)
        if t.plain:
            violations += _check_plain(t, used)
        elif t.named is None and used:
            violations.append(Violation(
                "reopen-needs-its-channels", f"channel {t.missing}",
                f"an engine opened without channel {t.missing}, which {used} unsettled "
                "orders use"))
        elif t.named is not None and t.named != {t.missing: used}:
            violations.append(Violation(
                "reopen-needs-its-channels", f"channel {t.missing}",
                f"the open without it was refused naming {t.named}, but {used} unsettled "
                "orders use it"))
    return violations


def _check_plain(t: ReopenTry, used: int) -> list[Violation]:
    """An open with a channel unable to pre-authorise is refused exactly when unsettled
    pre-authorisations use it, naming it with their number."""
    if t.named is None and used:
        return [Violation("reopen-needs-authorising-channels", f"channel {t.missing}",
                          f"an engine opened with channel {t.missing} unable to "
                          f"pre-authorise, which {used} unsettled pre-authorisations use")]
    if t.named is not None and t.named != {t.missing: used}:
        return [Violation("reopen-needs-authorising-channels", f"channel {t.missing}",
                          f"the open was refused naming {t.named}, but {used} unsettled "
                          "pre-authorisations use it")]
    return []
