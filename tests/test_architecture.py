"""The functional core stays pure: ``engine/`` imports only the standard library."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ENGINE = Path(__file__).resolve().parent.parent / "engine"
FORBIDDEN_STDLIB = {"time", "random", "uuid", "threading", "asyncio", "socket", "os", "sqlite3",
                    "subprocess", "datetime"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_engine_imports_only_the_standard_library_and_itself() -> None:
    files = sorted(ENGINE.glob("*.py"))
    assert files
    for path in files:
        outside = _imports(path) - set(sys.stdlib_module_names) - {"engine", "__future__"}
        assert not outside, f"{path.name} imports {sorted(outside)}"


def test_engine_reads_no_clock_randomness_or_io() -> None:
    for path in sorted(ENGINE.glob("*.py")):
        bad = _imports(path) & FORBIDDEN_STDLIB
        assert not bad, f"{path.name} imports {sorted(bad)}: time and ids must be arguments"
