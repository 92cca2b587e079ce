"""The functional core stays pure: ``engine/`` imports only the standard library."""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ENGINE = ROOT / "engine"
FORBIDDEN_STDLIB = {"time", "random", "uuid", "threading", "asyncio", "socket", "os", "sqlite3",
                    "subprocess", "datetime"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {_top(alias.name) for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(_top(node.module))
    return names


def _top(module: str) -> str:
    """The top-level name, except that the core's own modules count as ``payengine.engine``."""
    return "payengine.engine" if module.startswith("payengine.engine") else module.split(".")[0]


def test_engine_imports_only_the_standard_library_and_itself() -> None:
    files = sorted(ENGINE.glob("*.py"))
    assert files
    for path in files:
        outside = _imports(path) - set(sys.stdlib_module_names) - {"payengine.engine", "__future__"}
        assert not outside, f"{path.name} imports {sorted(outside)}"


def test_engine_reads_no_clock_randomness_or_io() -> None:
    for path in sorted(ENGINE.glob("*.py")):
        bad = _imports(path) & FORBIDDEN_STDLIB
        assert not bad, f"{path.name} imports {sorted(bad)}: time and ids must be arguments"


def test_the_package_installs_as_one_name_with_its_layers_beneath(tmp_path: Path) -> None:
    """``pip install .`` puts ``payengine`` (and its dist-info) in site-packages, nothing
    else: the layers are ``payengine.engine``, ``payengine.actors``... and ``py.typed`` ships."""
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",
         "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    (wheel,) = tmp_path.glob("payengine-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names} == {"payengine", wheel.name.split("-")[0]
                                                      + "-" + wheel.name.split("-")[1]
                                                      + ".dist-info"}
    layers = {name.split("/")[1] for name in names if name.count("/") >= 2}
    assert layers == {"engine", "actors", "persistence", "sim"}
    assert "payengine/py.typed" in names
    assert "payengine/engine/order.py" in names


def test_the_public_face_is_the_top_of_the_package() -> None:
    import payengine

    for name in payengine.__all__:
        assert getattr(payengine, name) is not None
    assert payengine.Engine.__module__ == "payengine.actors.engine"


def test_the_engine_is_quiet_by_default_and_builds_nothing_for_a_level_nobody_reads(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import logging

    import structlog

    from payengine.actors.logs import get_logger

    log = get_logger("payengine.test").bind(order_id="o1")
    engine_logger = logging.getLogger("payengine")
    assert any(isinstance(h, logging.NullHandler) for h in engine_logger.handlers)

    def processed(*args: object, **kwargs: object) -> None:
        raise AssertionError("an event below the level reached the processors")

    monkeypatch.setattr(structlog.stdlib.BoundLogger, "_proxy_to_logger", processed)
    monkeypatch.setattr(logging.getLogger("payengine.test"), "level", logging.WARNING)
    log.info("transition", part="order")
    log.debug("event")
    assert not log.is_enabled_for(logging.INFO)
    assert capsys.readouterr() == ("", "")
