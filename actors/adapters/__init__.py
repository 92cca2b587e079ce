"""Channel adapters from a configuration: a TOML file (or the same as Python objects)
declares each channel (kind, merchant number, credentials, code tables, schedules, fee,
limits); ``load_channels`` builds them: the generic ``HttpChannel``, or the simulated wallet.
Every message exchanged is recorded (bounded, secrets redacted) and can be replayed
(``RecordedChannel``). See README.md, "Channels from a configuration file"."""

from payengine.actors.adapters.channels import build_channel, configs_of, load_channels
from payengine.actors.adapters.config import (
    ChannelConfig,
    Credentials,
    Fee,
    Limits,
    NotificationMapping,
    Operation,
    Recording,
    ReplyMapping,
    Signing,
    SimulatedOptions,
    load_config,
    parse_config,
)
from payengine.actors.adapters.http import HttpChannel, http_call
from payengine.actors.adapters.mapping import ChannelHttpError, ReplyError
from payengine.actors.adapters.recording import (
    RecordedChannel,
    Recorder,
    read_records,
    replay_mismatches,
)
from payengine.actors.adapters.routes_config import load_routing, parse_routing
from payengine.engine.errors import ConfigError

__all__ = [
    "ChannelConfig", "ChannelHttpError", "ConfigError", "Credentials", "Fee", "HttpChannel",
    "Limits", "NotificationMapping", "Operation", "RecordedChannel", "Recorder", "Recording",
    "ReplyError", "ReplyMapping", "Signing", "SimulatedOptions", "build_channel",
    "configs_of", "http_call", "load_channels", "load_config", "load_routing",
    "parse_config", "parse_routing",
    "read_records", "replay_mismatches",
]
