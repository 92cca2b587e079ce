"""The engine's loggers: structlog in front, the standard library's ``logging`` behind.

A library must not print when embedded. Every payengine logger is a structlog
``BoundLogger`` over a stdlib logger under ``"payengine"``, built with its own processors
so the application's global ``structlog.configure`` neither silences nor redirects it, and
the ``"payengine"`` logger has a ``NullHandler``: nothing is shown until the application
configures ``logging`` (``logging.basicConfig(level=logging.INFO)``, or a handler with
``structlog.stdlib.ProcessorFormatter`` for JSON). ``filter_by_level`` comes first, so an
event below the logger's level is dropped before anything is built for it.
"""

from __future__ import annotations

import logging
from typing import Any

import structlog

ROOT_LOGGER_NAME = "payengine"

logging.getLogger(ROOT_LOGGER_NAME).addHandler(logging.NullHandler())

_PROCESSORS: list[Any] = [
    structlog.stdlib.filter_by_level,
    structlog.stdlib.add_logger_name,
    structlog.stdlib.add_log_level,
    structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
]


_METHOD_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
                  "warn": logging.WARNING, "error": logging.ERROR, "exception": logging.ERROR,
                  "critical": logging.CRITICAL, "fatal": logging.CRITICAL}


class LevelFilteredLogger(structlog.stdlib.BoundLogger):
    """A stdlib-backed structlog logger that does nothing at all below the stdlib logger's
    level: no context copied, no processor run (``logging.Logger.isEnabledFor`` is cached
    by the standard library, so the check is one dict lookup). Embedded with logging off,
    the engine's logging costs a method call per event. Every level method goes through
    ``_proxy_to_logger``, so the check sits there, once."""

    def _proxy_to_logger(self, method_name: str, event: str | None = None,
                         *event_args: str, **event_kw: Any) -> Any:
        level = _METHOD_LEVELS.get(method_name)
        if level is not None and not self._logger.isEnabledFor(level):
            return None
        return super()._proxy_to_logger(method_name, event, *event_args, **event_kw)

    def is_enabled_for(self, level: int) -> bool:
        """For a caller that would build many events (a loop): ask once, skip them all."""
        return bool(self._logger.isEnabledFor(level))


def get_logger(name: str = ROOT_LOGGER_NAME) -> Any:
    """A structlog logger writing to the stdlib logger ``name`` (under ``payengine``)."""
    assert name == ROOT_LOGGER_NAME or name.startswith(ROOT_LOGGER_NAME + "."), name
    return structlog.wrap_logger(logging.getLogger(name), processors=_PROCESSORS,
                                 wrapper_class=LevelFilteredLogger,
                                 cache_logger_on_first_use=True)


def json_handler(stream: Any, level: int = logging.INFO) -> logging.Handler:
    """A handler rendering payengine's records as JSON lines, for the CLI and tests."""
    handler = logging.StreamHandler(stream)
    handler.setLevel(level)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.TimeStamper(fmt="iso", utc=True),
                    structlog.processors.JSONRenderer()]))
    return handler
