"""Every configuration key, declared once: its type, its default and its rules.

Each section is a strict, frozen pydantic model that refuses unknown keys.
Values are read by the converters of fields.py; rules that join several keys
are model validators (or, when a key depends on keys above it, validators of
that key), and report through `refuse`, naming the key each problem is about.
docs/reference.md lists the keys; config/smtpgate.example.yaml explains them.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from pathlib import Path
from typing import Literal, NamedTuple

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from smtpgate.config import checks
from smtpgate.config.fields import (
    CertName, CipherString, Count, Domain, HeaderName, HostPort, HttpUrl, Mode, Network, Pattern, PositiveCount,
    PositiveSeconds, ReadableFile, Resolver, Seconds, Separator, SpoolDir, StoreUrl, Template, Text, UpstreamTarget,
    UpstreamUrl, UsersFile, parse_hostport, upstream_target,
)
from smtpgate.linking.plan import CoreSettings, MailboxInfo
from smtpgate.linking.references import DEFAULT_PATTERN, ReferenceMatcher
from smtpgate.mail.addresses import AddressError, parse_mailbox
from smtpgate.mail.stamp import DEFAULT_HEADER, MIN_SECRET_OCTETS, Stamper
from smtpgate.redact import REDACTED, is_secret_key, redact_url


class Problem(NamedTuple):
    """One broken rule: the key it is about, relative to the model or key that checks it."""

    key: tuple[str | int, ...]
    message: str
    at: tuple[str | int, ...] | None = None  # the key whose line to name, when not `key`


def refuse(problems: list[Problem]) -> None:
    """Raise the problems of one rule check, all at once; source.py words each one."""
    if problems:
        raise PydanticCustomError("rules", "{summary}", {
            "summary": "; ".join(p.message for p in problems), "problems": tuple(problems)})


class Section(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


# ---------------------------------------------------------------- listeners


class Listener(Section):
    name: Text
    kind: Literal["smtp", "milter"] = "smtp"
    address: Text  # host:port, [v6]:port, or a unix socket path for a milter
    tls: Literal["none", "starttls", "implicit"] = "none"
    tls_cert: ReadableFile | None = None
    tls_key: ReadableFile | None = None
    auth: Literal["none", "optional", "required"] = "none"
    relay_networks: tuple[Network, ...] = ()
    allow_public_relay_networks: bool = False
    proxy_protocol: bool = False
    direction: Literal["outbound", "inbound"] = "outbound"
    mode: Mode | None = None  # None: the top-level mode, filled in by Config
    tls_ciphers: CipherString = ""  # OpenSSL cipher string for TLS 1.2; empty: Mozilla "intermediate"
    # connector mode (docs/connectors.md): peers admitted by client certificate, the tenant guard
    tls_client_ca: ReadableFile | None = None  # PEM bundle: ask for a client certificate, verify against it
    relay_client_cert_names: tuple[CertName, ...] = ()  # a verified certificate of such a name may relay
    required_headers: dict[HeaderName, tuple[Text, ...]] = {}  # field -> accepted values; else 550 5.7.1

    @field_validator("address")
    @classmethod
    def _address(cls, value: str, info: ValidationInfo) -> str:
        if info.data.get("kind") == "milter" and value.startswith("/"):
            return value
        if parse_hostport(value) is None:
            raise ValueError(f'expected host:port (or [v6]:port), got "{value}"')
        return value

    @model_validator(mode="after")
    def _rules(self) -> Listener:
        problems: list[Problem] = []
        if self.tls != "none":
            problems += self._tls_files()
        if self.auth == "required" and self.tls == "none":
            problems.append(Problem(("auth",), "auth: required needs tls: starttls or implicit: AUTH is "
                                    "offered only over TLS, so no client could ever authenticate"))
        if not self.allow_public_relay_networks:
            problems += [Problem(("relay_networks", i), checks.public_network_problem(net))
                         for i, net in enumerate(self.relay_networks) if not checks.is_private(net)]
        refuse(problems + self._connector_problems())
        return self

    def _connector_problems(self) -> list[Problem]:
        """tls_client_ca, relay_client_cert_names and required_headers fit together."""
        found = []
        if self.tls_client_ca is not None:
            problem = checks.pem_certificate_problem(self.tls_client_ca)
            if problem is not None:
                found.append(Problem(("tls_client_ca",), problem))
        found += [Problem(("required_headers", name), "give at least one accepted value")
                  for name, values in self.required_headers.items() if not any(v.strip() for v in values)]
        names = [name.lower() for name in self.required_headers]
        found += [Problem(("required_headers", n), "duplicate field name") for n in sorted(set(names))
                  if names.count(n) > 1]
        if self.kind == "milter":
            return found + [Problem((key,), "a milter listener has no TLS of its own: set it on the Postfix "
                                    "smtpd in front") for key in ("tls_client_ca", "relay_client_cert_names")
                            if key in self.model_fields_set]
        if self.tls_client_ca is not None and self.tls == "none":
            found.append(Problem(("tls_client_ca",), "needs tls: starttls or implicit (a client certificate "
                                 "is asked for in the TLS handshake)"))
        if self.relay_client_cert_names and self.tls_client_ca is None:
            found.append(Problem(("relay_client_cert_names",), "needs tls_client_ca: only a certificate "
                                 "verified against those CAs may relay"))
        elif self.relay_client_cert_names and self.tls == "none":
            found.append(Problem(("relay_client_cert_names",), "needs tls: starttls or implicit"))
        return found

    def connector_warning(self) -> str | None:
        """A Microsoft 365 certificate name without required_headers: every tenant has that certificate."""
        microsoft = [n for n in self.relay_client_cert_names if checks.is_microsoft_cert_name(n)]
        if not microsoft or self.required_headers:
            return None
        return (f"{microsoft[0]} is the certificate of every Microsoft 365 tenant: without required_headers "
                "(X-MS-Exchange-CrossTenant-Id: [your tenant ID]) any tenant's connector may relay here")

    def _tls_files(self) -> list[Problem]:
        """tls_cert must hold PEM certificates and tls_key the matching unencrypted PEM key."""
        if self.tls_cert is None or self.tls_key is None:
            return [Problem(("tls",), f"tls: {self.tls} needs tls_cert and tls_key", at=())]
        problem = checks.pem_certificate_problem(self.tls_cert)
        if problem is not None:
            return [Problem(("tls_cert",), problem)]
        problem = checks.pem_key_problem(self.tls_key, self.tls_cert)
        return [] if problem is None else [Problem(("tls_key",), problem)]

    @property
    def path(self) -> Path | None:
        """The unix socket of a milter listener."""
        return Path(self.address) if self.kind == "milter" and self.address.startswith("/") else None

    @property
    def host(self) -> str:
        return "127.0.0.1" if self.path else parse_hostport(self.address)[0]

    @property
    def port(self) -> int:
        return 0 if self.path else parse_hostport(self.address)[1]

    def relays_for(self, ip: str) -> bool:
        """True when a client at ip may relay without authenticating."""
        try:
            addr = ipaddress.ip_address(ip.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
            addr = addr.ipv4_mapped
        return any(addr.version == net.version and addr in net for net in self.relay_networks)


# ---------------------------------------------------------------- upstream


class OAuth2(Section):
    """The client-credentials grant (RFC 6749 4.4) that yields upstream XOAUTH2 tokens."""

    token_url: HttpUrl
    client_id: Text
    client_secret_file: ReadableFile
    scope: Text = "https://outlook.office365.com/.default"

    @model_validator(mode="after")
    def _rules(self) -> OAuth2:
        refuse([Problem(("client_secret_file",), problem)
                for problem in [checks.empty_secret_problem(self.client_secret_file)] if problem])
        return self

    def client_secret(self) -> str:
        """The secret, read from its file at each call (so a rotated secret needs no reload)."""
        return self.client_secret_file.read_text(encoding="utf-8").strip()


class UpstreamTimeouts(Section):
    """Seconds smtpgate waits for the upstream in each phase (docs/upstream.md).

    Each is shorter than what a client waits for the reply it feeds, so a stalled
    upstream gives the client a 4xx instead of a dropped connection.
    """

    connect: PositiveSeconds = 10.0  # one host: TCP connect, 220 greeting, EHLO, STARTTLS, AUTH
    command: PositiveSeconds = 30.0  # MAIL, RCPT, RSET, NOOP
    data: PositiveSeconds = 40.0  # DATA's 354 and the reply to the final dot


class Upstream(Section):
    url: UpstreamUrl
    username: Text | None = None
    password_file: ReadableFile | None = None
    timeout: PositiveSeconds = 45.0  # the longest a client waits on the upstream for one reply
    timeouts: UpstreamTimeouts = Field(default_factory=UpstreamTimeouts, validate_default=True)
    pool_size: Count = 16
    tls: Literal["opportunistic", "required"] = "opportunistic"  # mx: only
    verify_tls: bool = True
    ca_file: ReadableFile | None = None
    resolver: Resolver | None = None  # mx: only
    auth: Literal["none", "password", "xoauth2"] | None = Field(None, validate_default=True)
    oauth2: OAuth2 | None = None
    tls_client_cert: ReadableFile | None = None
    tls_client_key: ReadableFile | None = None
    max_connections: PositiveCount = 100
    _target: UpstreamTarget = PrivateAttr()

    @field_validator("timeouts")
    @classmethod
    def _capped(cls, value: UpstreamTimeouts, info: ValidationInfo) -> UpstreamTimeouts:
        """Each phase waits at most upstream.timeout (docs/upstream.md)."""
        cap = info.data.get("timeout")
        if cap is None:
            return value
        return value.model_copy(update={n: min(getattr(value, n), cap) for n in ("connect", "command", "data")})

    @field_validator("auth")
    @classmethod
    def _auth_default(cls, value: str | None, info: ValidationInfo) -> str | None:
        """Without auth: password when a username is given, else none."""
        if value is None:
            return "password" if info.data.get("username") else "none"
        return value

    @model_validator(mode="after")
    def _rules(self, info: ValidationInfo) -> Upstream:
        self._target = upstream_target(self.url, Path((info.context or {}).get("base_dir") or Path.cwd()))
        refuse(self._auth_problems() + self._certificate_problems() + self._mx_only_problems())
        return self

    def _auth_problems(self) -> list[Problem]:
        """The keys present match upstream.auth (docs/microsoft-365.md for xoauth2)."""
        auth, has = self.auth, self.model_fields_set
        found = []
        if auth == "xoauth2" and self.oauth2 is None:
            found.append(Problem(("oauth2",), "auth: xoauth2 needs oauth2: {token_url, client_id, "
                                 "client_secret_file, scope}"))
        if auth == "xoauth2" and not self.username:
            found.append(Problem(("username",), "auth: xoauth2 needs username (the mailbox the token acts as)"))
        if auth == "password" and not self.username:
            found.append(Problem(("username",), "auth: password needs username and password_file"))
        if auth == "password" and self.username and self.password_file is None:
            found.append(Problem(("password_file",), "username is set but password_file is missing"))
        if auth == "none" and self.username and "auth" in has:
            found.append(Problem(("auth",), "auth: none but username is set; remove username or choose "
                                 "password | xoauth2"))
        if auth in ("none", "password") and self.oauth2 is not None:
            found.append(Problem(("oauth2",), f"oauth2 is used only with auth: xoauth2 (auth is {auth})"))
        if auth in ("none", "xoauth2") and self.password_file is not None:
            found.append(Problem(("password_file",),
                                 f"password_file is used only with auth: password (auth is {auth})"))
        if (problem := checks.empty_secret_problem(self.password_file)) is not None:
            found.append(Problem(("password_file",), problem))
        return found

    def _certificate_problems(self) -> list[Problem]:
        """A client certificate needs its key and an upstream that speaks TLS."""
        cert, key = self.tls_client_cert, self.tls_client_key
        if (cert is None) != (key is None):
            return [Problem(("tls_client_cert",), "tls_client_cert and tls_client_key go together", at=())]
        if cert is None or key is None:
            return []
        found = []
        if self.scheme in ("smtp", "maildir"):
            found.append(Problem(("tls_client_cert",), "a client certificate needs a TLS upstream: "
                                 "smtp+starttls://, smtps:// or mx:"))
        problem = checks.client_certificate_problem(cert, key)
        if problem is not None:
            found.append(Problem((problem[0],), problem[1]))
        return found

    def _mx_only_problems(self) -> list[Problem]:
        """upstream.tls and upstream.resolver mean something for mx: only."""
        if self.scheme == "mx":
            return []
        found = []
        if "tls" in self.model_fields_set:
            found.append(Problem(("tls",), "applies to mx: upstreams only (for TLS to one server use "
                                 "smtp+starttls:// or smtps://)"))
        if self.resolver is not None:
            found.append(Problem(("resolver",), "applies to mx: upstreams only"))
        return found

    @property
    def scheme(self) -> str:  # smtp | smtp+starttls | smtps | mx | maildir
        return self._target.scheme

    @property
    def host(self) -> str | None:
        return self._target.host

    @property
    def port(self) -> int | None:
        return self._target.port

    @property
    def path(self) -> Path | None:  # maildir
        return self._target.path

    @property
    def mx_domain(self) -> str | None:
        return self._target.mx_domain

    @property
    def label(self) -> str:
        """The upstream as logs name it: the URL, which never holds a secret."""
        return self.url

    def password(self) -> str | None:
        if self.password_file is None:
            return None
        return self.password_file.read_text(encoding="utf-8").strip()


# ---------------------------------------------------------------- linking


class References(Section):
    pattern: Pattern = DEFAULT_PATTERN
    headers: tuple[Text, ...] = ("X-Enate-Reference",)
    subject: bool = True


class Mailbox(Section):
    """A work-management mailbox; `address` is its canonical base address once loaded."""

    address: Text
    team: Text
    new_links: Literal["create", "never"] = "create"
    new_reference: Template = "{n}-T"


def _canonical_mailboxes(mailboxes: tuple[Mailbox, ...], separator: str,
                         internal: tuple[str, ...] | None) -> tuple[Mailbox, ...]:
    """Each untagged, once, in an internal domain; addresses canonical."""
    found, problems = [], []
    for i, mailbox in enumerate(mailboxes):
        try:
            address = parse_mailbox(mailbox.address, separator).canonical
        except AddressError as exc:
            problems.append(Problem((i, "address"), f'not a mailbox address: "{mailbox.address}": {exc}'))
            continue
        if any(other.address == address for other in found):
            problems.append(Problem((i, "address"), f"duplicate mailbox {address}"))
            continue
        if internal is not None and address.rsplit("@", 1)[1] not in internal:
            problems.append(Problem((i, "address"), f"{address} is not in internal_domains"))
        found.append(mailbox.model_copy(update={"address": address}))
    refuse(problems)
    return tuple(found)


# ---------------------------------------------------------------- the other sections


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
        if self.token_file is None:
            return None
        return self.token_file.read_text(encoding="utf-8").strip()


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
        """store.password_file's first line, read at each call (a rotated password needs no reload)."""
        if self.password_file is None:
            return None
        return self.password_file.read_text(encoding="utf-8").strip()


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
        if self.level == "debug":
            return True
        try:
            addr = ipaddress.ip_address(ip.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
            addr = addr.ipv4_mapped
        return any(addr.version == net.version and addr in net for net in self.debug_peers)


class AdminToken(Section):
    team: Text  # a team of mailboxes:, or admin
    token_file: ReadableFile  # not empty: checked with the team, by Config


# ---------------------------------------------------------------- admin: single sign-on, teams, HTTPS
# admin.trusted_proxy, admin.teams, admin.tls_cert / tls_key (docs/operations.md, "Single sign-on").


class TrustedProxy(Section):
    """A proxy (oauth2-proxy and the like) whose identity headers are believed."""

    networks: tuple[Network, ...]  # only requests from these may carry identity headers
    user_header: HeaderName = "X-Forwarded-Email"
    groups_header: HeaderName = "X-Forwarded-Groups"  # comma-separated

    @model_validator(mode="after")
    def _rules(self) -> TrustedProxy:
        problems = []
        if not self.networks:
            problems.append(Problem(("networks",), "name at least one network of the proxy"))
        if self.user_header.lower() == self.groups_header.lower():
            problems.append(Problem(("groups_header",), "must differ from user_header"))
        refuse(problems)
        return self


class AdminTeam(Section):
    """The groups a signed-in person is seen as team by; matched ignoring case and spacing."""

    team: Text  # a team of mailboxes:, or admin: checked by Config
    groups: tuple[Text, ...]

    @field_validator("groups")
    @classmethod
    def _groups(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("name at least one group")
        refuse([Problem((i,), f'a group name is not empty and has no comma: "{group}"')
                for i, group in enumerate(value) if not group.strip() or "," in group])
        return tuple(group.strip() for group in value)


class Admin(Section):
    listen: HostPort | None = None
    tokens: tuple[AdminToken, ...] = ()
    tls_cert: ReadableFile | None = None  # both or neither: the listener speaks HTTPS only
    tls_key: ReadableFile | None = None
    trusted_proxy: TrustedProxy | None = None
    teams: tuple[AdminTeam, ...] = ()

    @model_validator(mode="after")
    def _rules(self) -> Admin:
        problems = []
        if (self.tls_cert is None) != (self.tls_key is None):
            problems.append(Problem(("tls_cert",), "admin.tls_cert and admin.tls_key go together", at=()))
        elif self.tls_cert is not None and self.tls_key is not None:
            problem = checks.pem_certificate_problem(self.tls_cert)
            if problem is None:
                key_problem = checks.pem_key_problem(self.tls_key, self.tls_cert)
                problems += [] if key_problem is None else [Problem(("tls_key",), key_problem)]
            else:
                problems.append(Problem(("tls_cert",), problem))
        if self.teams and self.trusted_proxy is None:
            problems.append(Problem(("teams",), "teams map the groups a trusted proxy names: "
                                    "set admin.trusted_proxy too"))
        refuse(problems)
        return self


def token_hash_problem(path: Path) -> str | None:
    """A token file holding `sha256:` must hold exactly 64 hex digits after it."""
    text = path.read_bytes().strip()
    if text.lower().startswith(b"sha256:") and not re.fullmatch(rb"[0-9a-fA-F]{64}", text[7:]):
        return f"{path}: after \"sha256:\" a token file holds the 64 hex digits of the token's SHA-256 hash"
    return None


# ---------------------------------------------------------------- end of admin: single sign-on


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


# ---------------------------------------------------------------- the file


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
        return _canonical_mailboxes(value, info.data.get("separator", "+"), info.data.get("internal_domains"))

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
