"""Channels built from a configuration: ``load_channels(path_or_text)``.

``kind = "http"`` builds an ``HttpChannel``; ``kind = "simulated"`` the simulated wallet of
``payengine.sim.channel`` on the same configuration (reached only then: the simulated
wallet is the outside world, the one thing in ``payengine.sim`` a configuration may name).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from payengine.actors.adapters.config import (
    CHANNELS_MAX,
    ChannelConfig,
    load_config,
    parse_config,
)
from payengine.actors.adapters.http import HttpChannel, Transport
from payengine.actors.channel import Channel
from payengine.engine.checks import shown
from payengine.engine.errors import ConfigError

ConfigSource = str | Path | Mapping[str, Any] | Iterable[ChannelConfig]


def configs_of(source: ConfigSource, *, planted_bugs: frozenset[str] = frozenset()
               ) -> tuple[list[ChannelConfig], Path | None]:
    """The channel configs of ``source`` (a TOML path or text, a parsed dict, or
    ``ChannelConfig`` objects), and the folder relative paths are read from."""
    if isinstance(source, (Path, str)):
        base = None
        if isinstance(source, Path) or ("\n" not in source and "=" not in source):
            base = Path(source).parent
        return load_config(source, planted_bugs=planted_bugs), base
    if isinstance(source, Mapping):
        return parse_config(source, planted_bugs=planted_bugs), None
    if isinstance(source, bytes) or not isinstance(source, Iterable):
        raise ConfigError("", f"channels come from a TOML path or text, a dict or "
                              f"ChannelConfig objects, not {shown(source)}")
    configs = []
    names: set[str] = set()
    for config in source:
        if not isinstance(config, ChannelConfig):
            raise ConfigError("channels", f"must be ChannelConfig objects, not {shown(config)}")
        if config.name in names:
            raise ConfigError(f"channels.{config.name}", "two channels have this name")
        names.add(config.name)
        configs.append(config)
        if len(configs) > CHANNELS_MAX:
            raise ConfigError("channels", f"at most {CHANNELS_MAX} channels")
    if not configs:
        raise ConfigError("channels", "no channel configured")
    return configs, None


def build_channel(config: ChannelConfig, *, world: Any = None,
                  base_dir: str | Path | None = None,
                  transport: Transport | None = None) -> Channel:
    """One channel. ``world``: the runtime a simulated wallet schedules on (its clock, timers
    and I/O lanes; if not given, the runtime of the engine it is given to: a
    ``BorrowedWorld``, which starts no thread of its own); ``base_dir``: where a
    relative ``recording.file`` goes; ``transport``: the HTTP exchange (tests)."""
    if not isinstance(config, ChannelConfig):
        raise ConfigError("channels", f"must be a ChannelConfig, not {shown(config)}")
    if config.kind == "http":
        return HttpChannel(config, transport=transport, base_dir=base_dir)
    from payengine.sim.channel import BorrowedWorld, SimulatedChannel

    return SimulatedChannel.from_config(config, world if world is not None else BorrowedWorld())


def load_channels(source: ConfigSource, *, world: Any = None,
                  transport: Transport | None = None) -> list[Channel]:
    """The channels a configuration declares, ready for ``Engine.open(channels=...)``.

    ``source``: a TOML file (a ``Path``, or a ``str`` that names a file), TOML text, the
    parsed dict, or ``ChannelConfig`` objects. Every mistake is a ``ConfigError`` naming
    the key; nothing is built unless everything is right. Disabled channels are built too
    (the orders that used them still need queries and refunds); see ``ChannelConfig.enabled``.
    """
    configs, base = configs_of(source)
    return [build_channel(c, world=world, base_dir=base, transport=transport)
            for c in configs]
