"""The HTTP service over the embedded engine (``pip install 'payengine[server]'``).

``create_app(engine, config=ServiceConfig(...))`` is the ASGI application (FastAPI);
``run_server(config_path, db=, host=, port=)`` is ``payengine serve``. Importing this
package needs no extra: ``create_app`` raises ``ExtraMissing`` (code ``extra_missing``)
when FastAPI is not installed, and ``run_server`` returns 2. See README.md, "HTTP service".
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from payengine.actors.service.config import (
    MerchantKey,
    ServerSettings,
    ServiceConfig,
    load_settings,
    parse_settings,
)
from payengine.actors.service.runner import run_server
from payengine.engine.errors import ExtraMissing

if TYPE_CHECKING:
    from fastapi import FastAPI

    from payengine.actors.engine import Engine
    from payengine.actors.metrics import EngineMetrics


def create_app(engine: Engine, *, config: ServiceConfig | None = None,
               notify_formats: Mapping[str, str] | None = None,
               metrics: EngineMetrics | None = None) -> FastAPI:
    """The ASGI app over ``engine`` (see ``payengine.actors.service.app.create_app``)."""
    try:
        from payengine.actors.service.app import create_app as build
    except ImportError as error:
        raise ExtraMissing(f"the HTTP service needs the server extra ({error.name} is not "
                           f"installed): pip install 'payengine[server]'", "server") from None
    return build(engine, config=config, notify_formats=notify_formats, metrics=metrics)


__all__ = ["ExtraMissing", "MerchantKey", "ServerSettings", "ServiceConfig", "create_app",
           "load_settings", "parse_settings", "run_server"]
