"""The hostile-input tests run under asyncio and, when installed, under uvloop: `gateway
serve` uses uvloop when it can, and STARTTLS goes through the running loop's own TLS."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping

import pytest

LOOPS_FOR = {"test_smtp_input.py"}


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    factories: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
        "asyncio": asyncio.new_event_loop
    }
    if item.path.name not in LOOPS_FOR:
        return factories
    try:
        import uvloop
    except ImportError:  # only the `fast` extra installs it
        return factories
    factories["uvloop"] = uvloop.new_event_loop
    return factories
