"""Fixtures of the black-box suite of issue 13: servers started as the README says.

Run against the installed package (see README.md in this folder for the command). Every
server is a `payengine serve` child process on a free loopback port; fixtures run on the
test thread and stop their servers with SIGINT (the README's Ctrl-C) at the end.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import pytest

SERVER_EXTRA = ("fastapi", "uvicorn", "httpx")

# Every probability named: a partial faults table is not documented to start from zero.
NEVER_PAYS = ("{ sync_failure = 0.0, sync_timeout = 0.0, sync_unknown_code = 0.0, "
              "user_never_pays = 1.0, user_pays_late = 0.0, callback_lost = 0.0, "
              "callback_duplicated = 0.0, query_no_answer = 0.0, query_says_processing = 0.0, "
              "double_charge = 0.0, refund_callback_lost = 0.0, refund_callback_duplicated = 0.0 }")

S1_TOML = """
[service]
max_body_bytes = 2048

[engine.policy]
pay_window_ms = 120000

[channels.wechat]
kind = "simulated"
wallet = "wechat"
merchant_no = "sim-0001"
credentials = { key = "bb-wechat-key-000001" }
simulated = { seed = 1, faults = "none" }

[channels.slow]
kind = "simulated"
wallet = "wechat"
merchant_no = "sim-0002"
credentials = { key = "bb-slow-key-00000002" }
simulated = { seed = 2, faults = NEVER_PAYS }

[channels.ali]
kind = "simulated"
wallet = "alipay"
merchant_no = "sim-0003"
credentials = { key = "bb-ali-key-000000003" }
simulated = { seed = 3, faults = NEVER_PAYS }
"""

KEYS = {"wechat": "bb-wechat-key-000001", "slow": "bb-slow-key-00000002",
        "ali": "bb-ali-key-000000003"}


def has_modules(*names: str) -> bool:
    return all(importlib.util.find_spec(name) is not None for name in names)


def pytest_report_header() -> str:
    try:
        import payengine
        return f"payengine under test: {payengine.__file__}"
    except ImportError:
        return "payengine under test: not importable"


@pytest.fixture(scope="session")
def server_extra() -> None:
    if not has_modules(*SERVER_EXTRA):
        pytest.skip("the server extra (payengine[server]) or httpx is not installed")


@pytest.fixture(scope="session")
def main_server(server_extra: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """S1: three simulated channels with known notification keys; `slow` and `ali` users
    never pay (orders wait in `paying`), `wechat` users pay at once; bodies up to 2 KiB."""
    from .support import Server
    folder = tmp_path_factory.mktemp("s1")
    config = folder / "payengine.toml"
    config.write_text(S1_TOML.replace("NEVER_PAYS", NEVER_PAYS))
    server = Server(folder, config=config, db=folder / "s1.db").start()
    yield server
    server.stop()


@pytest.fixture()
def client(main_server: object) -> Iterator[object]:
    import httpx
    with httpx.Client(base_url=main_server.url, timeout=30) as http:  # type: ignore[attr-defined]
        yield http


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    return tmp_path
