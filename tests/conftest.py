"""Shared test setup: quiet structured logs (warnings and errors still show), and the
usual engine: a scripted channel and a funded customer, on a fresh file per test. A module
that needs another engine defines its own ``engine`` fixture, which overrides this one."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from payengine import Engine
from tests.helpers import ScriptedChannel, fund_customer, open_engine

structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))


@pytest.fixture
def channel() -> ScriptedChannel:
    return ScriptedChannel()


@pytest.fixture
def engine(tmp_path: Path, channel: ScriptedChannel) -> Iterator[Engine]:
    """An engine with alice's voucher accounts funded (``tests.helpers.fund_customer``)."""
    eng = open_engine(tmp_path / "pay.db", channel)
    fund_customer(eng)
    yield eng
    eng.shutdown()
