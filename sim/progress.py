"""Progress bars of the long runs (``demo``, ``sim`` over seeds, ``bench``) on stderr.

Drawn by rich (the ``cli`` extra) when it is installed, else by ``click.progressbar``;
only when stderr is a terminal and the caller enables it (the CLI disables it with
``--json``): a log file or a CI capture gets no bar at all, and stdout never does.
Called from the thread that runs the command (``show`` from a loop that polls or consumes
results), never from an actor.
"""

from __future__ import annotations

import sys
from typing import Any

import click


def rich_available() -> bool:
    """Whether the optional ``cli`` extra (rich) is installed."""
    try:
        import rich.progress  # noqa: F401
    except ImportError:
        return False
    return True


def _rich_bar(label: str, total: int, force: bool) -> tuple[Any, Any]:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
    from rich.progress import Progress as RichProgress

    bar = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                       TextColumn("{task.fields[note]}"), TimeElapsedColumn(),
                       console=Console(file=sys.stderr, force_terminal=force or None))
    task = bar.add_task(label, total=total, note="")
    bar.start()
    return bar, task


class Progress:
    """A bar of ``total`` steps labelled ``label``; ``show(done, note)`` moves it to ``done``
    (never back), ``finish`` ends it. Does nothing unless ``enabled`` and stderr is a
    terminal (``force``: draw whatever stderr is, for tests)."""

    def __init__(self, label: str, total: int, enabled: bool = True, *,
                 force: bool = False, use_rich: bool | None = None) -> None:
        self.label, self.total = label.strip(), max(total, 1)
        self.live = enabled and (force or sys.stderr.isatty())
        self.done = 0
        self._rich: Any = None
        self._task: Any = None
        self._click: Any = None
        if not self.live:
            return
        if rich_available() if use_rich is None else use_rich:
            self._rich, self._task = _rich_bar(self.label, self.total, force)
        else:
            self._click = click.progressbar(length=self.total, label=self.label,
                                            file=sys.stderr, show_pos=True)
            self._click.render_progress()

    def show(self, done: int, note: str = "") -> None:
        if not self.live:
            return
        done = min(max(done, self.done), self.total)
        if self._rich is not None:
            self._rich.update(self._task, completed=done, note=note)
        elif done > self.done:
            self._click.update(done - self.done)
        self.done = done

    def finish(self) -> None:
        if not self.live:
            return
        self.live = False
        if self._rich is not None:
            self._rich.stop()
        else:
            self._click.render_finish()
