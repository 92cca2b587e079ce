"""Shared test setup: quiet structured logs (warnings and errors still show)."""

from __future__ import annotations

import logging

import structlog

structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
