"""Every configuration key, declared once: its type, its default and its rules.

Each section is a strict, frozen pydantic model that refuses unknown keys
(rules.py); the sections live in listeners.py, upstream.py, mailboxes.py,
admin.py and sections.py, and Config here joins them into the file, with the
rules that span sections. docs/reference.md lists the keys;
config/smtpgate.example.yaml explains them.
"""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, PrivateAttr, ValidationInfo, field_validator, model_validator

from smtpgate.config import checks
from smtpgate.config.admin import Admin, AdminTeam, AdminToken, TrustedProxy, token_hash_problem
from smtpgate.config.fields import Domain, Mode, PositiveCount, Seconds, Separator, Text, UsersFile, parse_hostport
from smtpgate.config.listeners import Listener
from smtpgate.config.mailboxes import Mailbox, References, canonical_mailboxes
from smtpgate.config.rules import Problem, Section, refuse
from smtpgate.config.sections import Allocator, Inbound, Limits, Logging, Stamp, Store
from smtpgate.config.upstream import OAuth2, Upstream, UpstreamTimeouts
from smtpgate.linking.plan import CoreSettings, MailboxInfo
from smtpgate.linking.references import ReferenceMatcher
from smtpgate.redact import REDACTED, is_secret_key, redact_url

__all__ = [
    "Admin", "AdminTeam", "AdminToken", "Allocator", "Config", "Inbound", "Limits", "Listener", "Logging", "Mailbox",
    "OAuth2", "References", "Stamp", "Store", "TrustedProxy", "Upstream", "UpstreamTimeouts",
]


def _default_hostname() -> str:
    return socket.getfqdn() or "localhost"


class Config(Section):
    hostname: Text = Field(default_factory=_default_hostname)
    mode: Mode = "enforce"
    listeners: tuple[Listener, ...]
    workers: PositiveCount = 1
    shutdown_grace: Seconds = 30.0
    auth_backend: Literal["file", "upstream"] = "file"
    users_file: UsersFile | None = None
    upstream: Upstream
    internal_domains: tuple[Domain, ...] = ()
    separator: Separator = "+"
    references: References = Field(default_factory=References)
    mailboxes: tuple[Mailbox, ...] = ()
    allocator: Allocator = Field(default_factory=Allocator)
    store: Store = Field(default_factory=Store)
    inbound: Inbound = Field(default_factory=Inbound)
    limits: Limits = Field(default_factory=Limits)
    logging: Logging = Field(default_factory=Logging)
    admin: Admin = Field(default_factory=Admin)
    stamp: Stamp = Field(default_factory=Stamp)
    _path: Path = PrivateAttr(default=Path("smtpgate.yaml"))
    _warning_lines: tuple[str, ...] = PrivateAttr(default=())

    @field_validator("hostname")
    @classmethod
    def _hostname(cls, value: str) -> str:
        return checks.hostname(value)

    @field_validator("listeners")
    @classmethod
    def _listeners(cls, value: tuple[Listener, ...], info: ValidationInfo) -> tuple[Listener, ...]:
        """At least one, names unique; a listener without a mode takes the top-level one."""
        if not value:
            raise ValueError("at least one listener is needed")
        names = [lst.name for lst in value]
        refuse([Problem((), f'duplicate listener name "{dup}"')
                for dup in sorted({n for n in names if names.count(n) > 1})])
        refuse([Problem((i, "address"), problem) for i, lst in enumerate(value) for earlier in value[:i]
                if (problem := checks.same_address_problem(
                    earlier.address, lst.address, earlier.name,
                    None if earlier.path else parse_hostport(earlier.address),
                    None if lst.path else parse_hostport(lst.address)))])
        mode = info.data.get("mode", "enforce")
        return tuple(lst if lst.mode else lst.model_copy(update={"mode": mode}) for lst in value)

    @field_validator("mailboxes")
    @classmethod
    def _mailboxes(cls, value: tuple[Mailbox, ...], info: ValidationInfo) -> tuple[Mailbox, ...]:
        return canonical_mailboxes(value, info.data.get("separator", "+"), info.data.get("internal_domains"))

    @field_validator("admin")
    @classmethod
    def _admin_teams(cls, value: Admin, info: ValidationInfo) -> Admin:
        """A token's team is one of mailboxes: or admin (a misspelt team would see no activity
        in full), and its file holds a token."""
        teams = {mb.team for mb in info.data.get("mailboxes", ())} | {"admin"}
        problems = []
        for i, token in enumerate(value.tokens):
            if "mailboxes" in info.data and token.team not in teams:  # else: mailboxes already reported
                problems.append(Problem(("tokens", i, "team"),
                                        f'"{token.team}" is neither a team of mailboxes: nor admin'))
            if not checks.holds_text(token.token_file):
                problems.append(Problem(("tokens", i, "token_file"), f"{token.token_file} is empty"))
            elif (hashed := token_hash_problem(token.token_file)) is not None:
                problems.append(Problem(("tokens", i, "token_file"), hashed))
        for i, entry in enumerate(value.teams):
            if "mailboxes" in info.data and entry.team not in teams:
                problems.append(Problem(("teams", i, "team"),
                                        f'"{entry.team}" is neither a team of mailboxes: nor admin'))
        refuse(problems)
        return value

    @model_validator(mode="after")
    def _rules(self) -> Config:
        problems = []
        if self.auth_backend == "upstream" and self.upstream.scheme not in ("smtps", "smtp+starttls"):
            # The clients' own passwords go to the upstream: only ever over TLS.
            problems.append(Problem(("auth_backend",), "upstream sends each client's password to the upstream, "
                                    "so upstream.url must be smtps:// or smtp+starttls:// "
                                    f"(it is {self.upstream.scheme}:)"))
        if self.allocator.kind == "local":
            matches = ReferenceMatcher(self.references.pattern).fullmatch
            problems += [Problem(("mailboxes", i, "new_reference"), problem) for i, mb in enumerate(self.mailboxes)
                         if mb.new_links == "create"
                         and (problem := checks.template_problem(mb.new_reference, self.allocator.first_number,
                                                                 matches))]
        if self.auth_backend == "file" and (self.users_file is None or not self.users_file.exists()):
            where = "users_file is not set" if self.users_file is None else f"{self.users_file} does not exist"
            problems += [Problem(("listeners", i, "auth"), f"required, but {where}: no client could log in; "
                                 "`smtpgate users add NAME` creates it")
                         for i, lst in enumerate(self.listeners) if lst.auth == "required"]
        refuse(problems)
        return self

    def warning_problems(self) -> list[Problem]:
        """What may be intended but is usually a mistake: check-config prints each, serve logs it."""
        found = [Problem(("listeners", i, "relay_client_cert_names"), warning)
                 for i, lst in enumerate(self.listeners) if (warning := lst.connector_warning())]
        up = self.upstream
        if up.auth == "password" and up.scheme == "smtp" and not checks.is_loopback_host(up.host):
            found.append(Problem(("upstream", "auth"), f"password over plain {up.url} sends the password in "
                                 "clear: use smtp+starttls:// or smtps://"))
        if self.store.url.startswith("postgres") and checks.url_has_password(self.store.url):
            found.append(Problem(("store", "url"), "holds the password, in a file others may read: "
                                 "put it in store.password_file (mode 0640, group smtpgate)"))
        listen = parse_hostport(self.admin.listen) if self.admin.listen else None
        if listen is not None and not checks.is_loopback_host(listen[0]) and self.admin.tls_cert is None:
            found.append(Problem(("admin", "listen"), f"{self.admin.listen} is reachable from other hosts over "
                                 "plain HTTP: tokens and sign-ins cross the network in clear; listen on 127.0.0.1 "
                                 "behind a TLS proxy, or give it TLS"))
        return found + self._sign_on_warnings()

    def _sign_on_warnings(self) -> list[Problem]:
        """A loopback network among admin.trusted_proxy.networks: every local user may claim any identity."""
        proxy = self.admin.trusted_proxy
        loopback = [ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")]
        return [Problem(("admin", "trusted_proxy", "networks", i),
                        f"{net} is this host's loopback: every local user and process may claim any identity "
                        "(admin included) with identity headers; give the proxy an address of its own and let "
                        "only it reach admin.listen (docs/operations.md, \"Single sign-on\")")
                for i, net in enumerate(proxy.networks if proxy else ())
                if any(net.version == lo.version and net.subnet_of(lo) for lo in loopback)]

    @property
    def path(self) -> Path:
        """The file this configuration was read from."""
        return self._path

    @property
    def base_dir(self) -> Path:
        return self._path.parent

    @property
    def core(self) -> CoreSettings:
        """The part of the configuration the linking core needs."""
        return CoreSettings(
            internal_domains=self.internal_domains, separator=self.separator,
            reference_pattern=self.references.pattern, reference_headers=self.references.headers,
            subject=self.references.subject,
            mailboxes=tuple(MailboxInfo(m.address, m.team, m.new_links, m.new_reference) for m in self.mailboxes),
        )

    @property
    def warnings(self) -> tuple[str, ...]:
        """`file:line: key: warning` for each of warning_problems(), as loaded: what check-config
        prints as `warning:` (the file is usable as it stands); serve logs each as config.warning."""
        return self._warning_lines

    def teams(self) -> dict[str, str]:
        """Mailbox canonical address -> team name."""
        return {m.address: m.team for m in self.mailboxes}

    def summary(self) -> str:
        """The one line `check-config` prints."""
        listeners = ", ".join(
            (f"{lst.name}={lst.host}:{lst.port}" if lst.path is None else f"{lst.name}={lst.path}")
            + (f" ({lst.mode})" if lst.mode != self.mode else "")
            for lst in self.listeners
        )
        return (
            f"{self.path}: ok: mode {self.mode}, {len(self.listeners)} listener(s) [{listeners}], "
            f"upstream {self.upstream.label}, store {redact_url(self.store.url)}, "
            f"{len(self.mailboxes)} mailbox(es), {len(self.internal_domains)} internal domain(s)"
        )

    @property
    def effective(self) -> dict:
        """Every key with its value, defaults filled in and secrets redacted: what --show prints.
        upstream.tls and upstream.resolver appear for mx: only (elsewhere they are errors)."""
        shown = _plain(self.model_dump())
        if self.upstream.scheme != "mx":
            del shown["upstream"]["tls"], shown["upstream"]["resolver"]
        return shown

    def show(self) -> str:
        """`check-config --show`: the effective configuration as YAML that loads as a config."""
        header = (f"# {self.path}: the effective configuration (defaults filled in, secrets redacted)\n"
                  f"# sqlite: and maildir: paths in it are relative to {self.base_dir}\n")
        return header + yaml.safe_dump(self.effective, sort_keys=False, allow_unicode=True,
                                       default_flow_style=False, width=100)


def _plain(value, key: str = ""):
    """value as YAML-safe data with secrets redacted."""
    if is_secret_key(key) and value is not None:
        return REDACTED
    if isinstance(value, dict):
        return {k: _plain(v, k) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, str):
        return redact_url(value) if "://" in value else value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if value is None or isinstance(value, (bool, int, float)):
        return value
    return str(value)  # Path, ip_network
