"""The README's own configuration file with its `[routing]` example, and the `channels` bound."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from payengine import ConfigError, load_channels, load_routing

README = Path(__file__).resolve().parents[2] / "README.md"


def toml_blocks() -> list[str]:
    return re.findall(r"```toml\n(.*?)```", README.read_text(), re.S)


def readme_file() -> str:
    channels = next(b for b in toml_blocks() if "[channels.wechat-1]" in b)
    routing = next(b for b in toml_blocks() if "[routing]" in b)
    return channels + "\n" + routing


def test_the_readmes_channel_file_with_its_routing_example_loads() -> None:
    text = readme_file()
    table = load_routing(text)
    assert [(r.method, r.channel, r.priority) for r in table.routes] == [
        ("qr", "wechat-1", 0), ("qr", "wechat-2", 1)]
    assert table.routes[0].amount_max_minor == 15000
    assert table.fallbacks_max == 1
    assert sorted(c.name for c in load_channels(text)) == ["sim-wallet", "wechat-1", "wechat-2"]


def test_a_route_to_a_channel_outside_the_given_channels_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as caught:
        load_routing(readme_file(), channels={"wechat-1"})
    assert caught.value.key == "routing.route[1].channel"


def test_the_routing_example_alone_needs_its_channels_named() -> None:
    routing = next(b for b in toml_blocks() if "[routing]" in b)
    with pytest.raises(ConfigError) as caught:
        load_routing(routing)
    assert caught.value.key == "routing.route[0].channel"
    assert len(load_routing(routing, channels=["wechat-1", "wechat-2"]).routes) == 2
