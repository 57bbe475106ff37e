"""The smaller sections: allocator, store, inbound, limits, logging and stamp."""

from __future__ import annotations

from typing import Literal

from pydantic import PrivateAttr, model_validator

from smtpgate.config import checks
from smtpgate.config.fields import (
    Count, HeaderName, Network, PositiveCount, PositiveSeconds, ReadableFile, Seconds, SpoolDir, StoreUrl, Text,
)
from smtpgate.config.rules import Problem, Section, refuse
from smtpgate.mail.stamp import DEFAULT_HEADER, MIN_SECRET_OCTETS, Stamper


class Allocator(Section):
    kind: Literal["local", "http"] = "local"
    first_number: Count = 900000
    url: Text | None = None
    token_file: ReadableFile | None = None
    timeout: Seconds = 10.0

    @model_validator(mode="after")
    def _rules(self) -> Allocator:
        if self.kind == "http" and not self.url:
            refuse([Problem(("url",), "kind: http needs url")])
        if self.kind == "http" and not self.url.startswith(("http://", "https://")):
            refuse([Problem(("url",), f'expected an http(s) URL, got "{self.url}"')])
        refuse([Problem(("token_file",), problem)
                for problem in [checks.empty_secret_problem(self.token_file)] if problem])
        return self

    def token(self) -> str | None:
        return checks.read_secret(self.token_file)


class Store(Section):
    url: StoreUrl = "sqlite:var/smtpgate.db"
    password_file: ReadableFile | None = None  # PostgreSQL's password, kept out of a readable config
    keep_messages_days: PositiveCount = 400
    auto_upgrade: bool = False
    timeout: Seconds = 30.0

    @model_validator(mode="after")
    def _rules(self) -> Store:
        if self.password_file is None:
            return self
        problems = []
        if not self.url.startswith("postgres"):
            problems.append(Problem(("password_file",), "is used only with a postgresql:// store.url"))
        elif checks.url_has_password(self.url):
            problems.append(Problem(("url",), "holds a password and store.password_file is set too: "
                                    "remove the password from the URL"))
        if (problem := checks.empty_secret_problem(self.password_file)) is not None:
            problems.append(Problem(("password_file",), problem))
        refuse(problems)
        return self

    def password(self) -> str | None:
        """store.password_file's text, read at each call (a rotated password needs no reload)."""
        return checks.read_secret(self.password_file)


class Inbound(Section):
    unknown_tags: Literal["pass", "strip"] = "pass"
    share_with_thread: bool = False  # a reply missing some of its thread's team mailboxes also goes to them


class Limits(Section):
    max_message_size: PositiveCount = 36700160
    max_recipients: PositiveCount = 500
    max_hops: PositiveCount = 50
    max_connections: PositiveCount = 1000
    max_connections_per_client: PositiveCount = 20
    idle_timeout: PositiveSeconds = 300.0
    max_bad_commands: PositiveCount = 20
    auth_failure_delay: Seconds = 1.0  # the first failed AUTH's delay; doubles per failure from one address
    max_header_block: PositiveCount = 1048576  # octets of the header block held to decide; more: 552 5.3.4
    spool_dir: SpoolDir = None  # "" (None): the system's temporary folder; bodies the upstream cannot take yet


class Logging(Section):
    format: Literal["json", "console"] = "json"
    level: Literal["debug", "info", "warning", "error"] = "info"
    # Client addresses whose SMTP sessions log at debug level whatever `level` says (debug_peer_list).
    debug_peers: tuple[Network, ...] = ()

    def debug_for(self, ip: str) -> bool:
        """True when the session of a client at ip logs its commands and replies."""
        return self.level == "debug" or checks.holds_address(self.debug_peers, ip)



class Stamp(Section):
    """The processing stamp (docs/connectors.md): no stamp without secret_file."""

    header: HeaderName = DEFAULT_HEADER
    secret_file: ReadableFile | None = None  # shared by every node
    _secret: bytes = PrivateAttr(default=b"")

    @model_validator(mode="after")
    def _rules(self) -> Stamp:
        problems = []
        if self.header.lower() in checks.FIELDS_SMTPGATE_READS:
            problems.append(Problem(("header",), f"{self.header} is a field smtpgate reads or rewrites; "
                                    f"give a field of its own (default {DEFAULT_HEADER})"))
        if self.secret_file is not None:
            self._secret = self.secret_file.read_bytes().strip()
            if len(self._secret) < MIN_SECRET_OCTETS:
                problems.append(Problem(("secret_file",), f"{self.secret_file} holds {len(self._secret)} octets; "
                                        f"a stamp secret needs at least {MIN_SECRET_OCTETS} (e.g. head -c 32 "
                                        f"/dev/urandom | base64 > {self.secret_file})"))
        refuse(problems)
        return self

    @property
    def stamper(self) -> Stamper | None:
        """The stamp made and checked with the secret read at load; None without secret_file."""
        return None if self.secret_file is None else Stamper(header=self.header, secret=self._secret)
