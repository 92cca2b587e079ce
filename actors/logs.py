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


def get_logger(name: str = ROOT_LOGGER_NAME) -> Any:
    """A structlog logger writing to the stdlib logger ``name`` (under ``payengine``)."""
    assert name == ROOT_LOGGER_NAME or name.startswith(ROOT_LOGGER_NAME + "."), name
    return structlog.wrap_logger(logging.getLogger(name), processors=_PROCESSORS,
                                 wrapper_class=structlog.stdlib.BoundLogger,
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
