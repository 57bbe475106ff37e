"""smtpgate's configuration: one YAML file loaded into validated, immutable objects.

schema.py declares every key once (type, default, rules), its sections in
listeners.py, upstream.py, mailboxes.py, admin.py and sections.py and what
they share in rules.py; fields.py the converters it reads values with,
checks.py what a schema cannot say (files, PEM certificates and keys, relay
networks), source.py the reading of the file
and the wording of its problems: `smtpgate.yaml:14: upstream.timeout: expected
a number, got "soon"`. Relative paths are resolved against the config file's
folder. docs/reference.md lists every key with its type and default.
"""

from __future__ import annotations

import os
from pathlib import Path

from smtpgate.config.fields import join_hostport, parse_hostport
from smtpgate.config.schema import (
    Admin, AdminTeam, AdminToken, Allocator, Config, Inbound, Limits, Listener, Logging, Mailbox, OAuth2, References,
    Stamp, Store, TrustedProxy, Upstream, UpstreamTimeouts,
)
from smtpgate.config.source import ConfigError, load_config

__all__ = [
    "DEFAULT_CONFIG", "Admin", "AdminTeam", "AdminToken", "Allocator", "Config", "ConfigError", "Inbound", "Limits",
    "Listener", "Logging", "Mailbox", "OAuth2", "References", "Stamp", "Store", "TrustedProxy", "Upstream", "UpstreamTimeouts",
    "config_path", "join_hostport", "load_config", "parse_hostport",
]

DEFAULT_CONFIG = "/etc/smtpgate/smtpgate.yaml"


def config_path(arg: str | None) -> Path:
    """-c, else $SMTPGATE_CONFIG, else /etc/smtpgate/smtpgate.yaml."""
    return Path(arg or os.environ.get("SMTPGATE_CONFIG") or DEFAULT_CONFIG)
