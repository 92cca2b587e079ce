"""The service from Python (README *HTTP service*): `create_app` over an engine you opened,
importing never pulls FastAPI in, and without the extra `create_app` raises ExtraMissing."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from .support import child_env


def test_importing_payengine_and_its_service_module_never_imports_fastapi(tmp_path: Path) -> None:
    script = ("import sys, payengine, payengine.actors.service\n"
              "print(sorted(m for m in ('fastapi', 'uvicorn', 'starlette') if m in sys.modules))\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=child_env(),
                            capture_output=True, text=True, timeout=120)
    assert (result.returncode, result.stdout.strip()) == (0, "[]"), result.stderr


def test_without_fastapi_create_app_raises_extra_missing(tmp_path: Path) -> None:
    shim = tmp_path / "shim" / "fastapi"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('no fastapi here')\n")
    script = '''
from payengine import ExtraMissing
from payengine.actors.service import create_app
try:
    create_app(None)
    print("NO ERROR")
except ExtraMissing as error:
    print(error.code)
'''
    env = child_env()
    env["PYTHONPATH"] = str(shim.parent) + ((":" + env["PYTHONPATH"]) if env.get("PYTHONPATH") else "")
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert (result.returncode, result.stdout.strip()) == (0, "extra_missing"), result.stderr


def test_create_app_serves_an_engine_you_opened_and_leaves_it_open_when_asked(server_extra: None) -> None:
    import httpx

    from payengine import CashPart, Engine, PaymentRequest, ThreadRuntime
    from payengine.actors.service import ServiceConfig, create_app
    from payengine.sim.channel import ChannelFaults, SimulatedChannel
    world = ThreadRuntime()
    wechat = SimulatedChannel("wechat", world, seed=1, faults=ChannelFaults.none())
    engine = Engine.open(Path(tempfile.mkdtemp()) / "app.db", channels=[wechat])
    wechat.attach(engine)
    try:
        app = create_app(engine, config=ServiceConfig(shutdown_engine=False))
        receipt = engine.submit(PaymentRequest("station-1", "P-1", "alice", "CNY", 1_00, "Fuel",
                                               CashPart(1_00, "wechat")))

        async def ask() -> list[Any]:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://app") as http:
                return [await http.get("/healthz"), await http.get(f"/v1/orders/{receipt.order_id}"),
                        await http.get("/v1/orders/ord_nobody")]

        health, order, missing = asyncio.run(ask())
        assert health.json() == {"status": "up"}
        assert order.json()["order_id"] == receipt.order_id
        assert (missing.status_code, missing.json()["error"]["code"]) == (404, "unknown_order")
        assert engine.is_open
    finally:
        engine.shutdown()
        world.shutdown()
