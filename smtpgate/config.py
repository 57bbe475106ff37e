"""smtpgate's configuration: one YAML file loaded into validated, immutable objects.

The schema lives in this module only: every key, its type, its default and its
validator. Errors name the file, the line and the key path, e.g.
``smtpgate.yaml:14: upstream.timeout: expected a number, got "soon"``.
Relative paths are resolved against the config file's folder.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import os
import re
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from smtpgate.linking.plan import CoreSettings, MailboxInfo
from smtpgate.linking.references import DEFAULT_PATTERN
from smtpgate.mail.addresses import AddressError, check_separator, normalize_domain, parse_mailbox
from smtpgate.redact import REDACTED, is_secret_key, redact_url
from smtpgate.users import Users, UsersError

DEFAULT_CONFIG = "/etc/smtpgate/smtpgate.yaml"


class ConfigError(Exception):
    """One or more problems in a config file; each problem is one line of str()."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


# ---------------------------------------------------------------- value types


@dataclass(frozen=True)
class Listener:
    name: str
    kind: str  # smtp | milter
    host: str
    port: int
    path: Path | None  # unix socket (milter only)
    tls: str  # none | starttls | implicit
    tls_cert: Path | None
    tls_key: Path | None
    auth: str  # none | optional | required
    relay_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    proxy_protocol: bool
    direction: str  # outbound | inbound
    mode: str = "enforce"  # enforce | observe (the top-level mode unless the listener sets one)
    tls_ciphers: str = ""  # OpenSSL cipher string for TLS 1.2; empty: Mozilla "intermediate"
    allow_public_relay_networks: bool = False

    def relays_for(self, ip: str) -> bool:
        """True when a client at ip may relay without authenticating."""
        try:
            addr = ipaddress.ip_address(ip.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
            addr = addr.ipv4_mapped
        return any(addr.version == net.version and addr in net for net in self.relay_networks)


@dataclass(frozen=True)
class OAuth2:
    """The client-credentials grant (RFC 6749 4.4) that yields upstream XOAUTH2 tokens."""

    token_url: str
    client_id: str
    client_secret_file: Path
    scope: str

    def client_secret(self) -> str:
        """The secret, read from its file at each call (so a rotated secret needs no reload)."""
        return self.client_secret_file.read_text(encoding="utf-8").strip()


@dataclass(frozen=True)
class UpstreamTimeouts:
    """Seconds smtpgate waits for the upstream in each phase (docs/upstream.md).

    Each is shorter than what a client waits for the reply it feeds, so a stalled
    upstream gives the client a 4xx instead of a dropped connection.
    """

    connect: float = 10.0  # one host: TCP connect, 220 greeting, EHLO, STARTTLS, AUTH
    command: float = 30.0  # MAIL, RCPT, RSET, NOOP
    data: float = 40.0  # DATA's 354 and the reply to the final dot


@dataclass(frozen=True)
class Upstream:
    url: str
    scheme: str  # smtp | smtp+starttls | smtps | mx | maildir
    host: str | None
    port: int | None
    path: Path | None  # maildir
    mx_domain: str | None
    username: str | None
    password_file: Path | None
    timeout: float  # the longest a client waits on the upstream for one reply; caps `timeouts`
    pool_size: int
    tls: str  # opportunistic | required (mx)
    verify_tls: bool
    ca_file: Path | None
    resolver: str | None
    auth: str = "none"  # none | password | xoauth2
    oauth2: OAuth2 | None = None
    tls_client_cert: Path | None = None
    tls_client_key: Path | None = None
    max_connections: int = 100
    timeouts: UpstreamTimeouts = UpstreamTimeouts()

    @property
    def label(self) -> str:
        """The upstream as logs name it: the URL, which never holds a secret."""
        return self.url

    def password(self) -> str | None:
        if self.password_file is None:
            return None
        return self.password_file.read_text(encoding="utf-8").strip()


def _refuse_passphrase() -> bytes:
    # OpenSSL would otherwise prompt on the terminal, which hangs a service.
    raise ValueError("the private key is encrypted; smtpgate needs an unencrypted key file (mode 0600)")


def load_client_certificate(context: ssl.SSLContext, cert: Path, key: Path) -> None:
    """Load a TLS client certificate and its key into context; raises ValueError or ssl.SSLError."""
    context.load_cert_chain(str(cert), str(key), password=_refuse_passphrase)


@dataclass(frozen=True)
class References:
    pattern: str
    headers: tuple[str, ...]
    subject: bool


@dataclass(frozen=True)
class Allocator:
    kind: str  # local | http
    first_number: int
    url: str | None
    token_file: Path | None
    timeout: float

    def token(self) -> str | None:
        if self.token_file is None:
            return None
        return self.token_file.read_text(encoding="utf-8").strip()


@dataclass(frozen=True)
class Store:
    url: str
    keep_messages_days: int
    auto_upgrade: bool
    timeout: float


@dataclass(frozen=True)
class Inbound:
    unknown_tags: str


@dataclass(frozen=True)
class Limits:
    max_message_size: int
    max_recipients: int
    max_hops: int
    max_connections: int
    max_connections_per_client: int = 20
    idle_timeout: float = 300.0
    max_bad_commands: int = 20
    auth_failure_delay: float = 1.0  # the first failed AUTH's delay; doubles per failure from one address


@dataclass(frozen=True)
class Logging:
    format: str
    level: str


@dataclass(frozen=True)
class AdminToken:
    team: str
    token_file: Path


@dataclass(frozen=True)
class Admin:
    listen: str | None
    tokens: tuple[AdminToken, ...]


@dataclass(frozen=True)
class Config:
    path: Path
    hostname: str
    listeners: tuple[Listener, ...]
    workers: int
    shutdown_grace: float
    auth_backend: str
    users_file: Path | None
    upstream: Upstream
    internal_domains: tuple[str, ...]
    separator: str
    references: References
    mailboxes: tuple[MailboxInfo, ...]
    allocator: Allocator
    store: Store
    inbound: Inbound
    limits: Limits
    logging: Logging
    admin: Admin
    core: CoreSettings = field(repr=False)
    mode: str = "enforce"  # enforce | observe
    # Every key as the loader read it, defaults filled in: what `check-config --show` prints.
    effective: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def base_dir(self) -> Path:
        return self.path.parent

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

    def show(self) -> str:
        """`check-config --show`: the effective configuration as YAML, in the file's
        own keys, every default filled in and every secret redacted."""
        header = f"# {self.path}: the effective configuration (defaults filled in, secrets redacted)\n"
        return header + yaml.safe_dump(_plain(self.effective), sort_keys=False, allow_unicode=True,
                                       default_flow_style=False, width=100)


def _plain(value: Any, key: str = "") -> Any:
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


# ---------------------------------------------------------------- the loader


class _Ctx:
    """Collects problems while walking the YAML node tree."""

    def __init__(self, filename: str, base_dir: Path):
        self.filename = filename
        self.base_dir = base_dir
        self._problems: list[tuple[int, str]] = []
        # Effective values of list items, by key path: the list's entry in --show.
        self.shown: dict[str, Any] = {}

    def error(self, node: yaml.Node | None, key: str, message: str) -> None:
        line = node.start_mark.line + 1 if node is not None else 1
        self._problems.append((line, f"{self.filename}:{line}: {key}: {message}"))

    @property
    def problems(self) -> list[str]:
        """Every problem, in the order of the file's lines."""
        return [text for _, text in sorted(self._problems, key=lambda item: item[0])]


_MISSING = object()


def _show(node: yaml.Node) -> str:
    if _is_null(node):
        return "nothing"
    if isinstance(node, yaml.ScalarNode):
        return f'"{node.value}"'
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    return "a mapping"


def _is_null(node: yaml.Node | None) -> bool:
    """True for an absent value and for `key:`, `key: null` or `key: ~`."""
    return node is None or (isinstance(node, yaml.ScalarNode) and node.tag.endswith(":null"))


def _scalar(node: yaml.Node) -> Any:
    """The Python value of a scalar node, with YAML 1.1 core resolution."""
    return yaml.constructor.SafeConstructor().construct_object(node, deep=True)


class _Mapping:
    """A YAML mapping node whose keys are checked against the schema as they are read.

    Every key the schema asks for (present or not) becomes known; `finish`
    reports the others as unknown, with the nearest known key as a hint.
    The values read, defaults included, are kept in `shown` for --show.
    """

    def __init__(self, ctx: _Ctx, node: yaml.Node | None, path: str, *, section: bool = False):
        self.ctx = ctx
        self.path = path
        self.node = node
        self.items: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        self.known: set[str] = set()
        self.shown: dict[str, Any] = {}
        ctx.shown[path] = self.shown
        if node is None or (section and _is_null(node)):
            return  # `section:` with every key commented out: all defaults
        if not isinstance(node, yaml.MappingNode):
            ctx.error(node, path or "(top level)", f"expected a mapping, got {_show(node)}")
            self.node = None
            return
        for knode, vnode in node.value:
            key = str(knode.value)
            if key in self.items:
                ctx.error(knode, self._key(key), "duplicate key")
            self.items[key] = (knode, vnode)

    def _key(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def raw(self, key: str) -> yaml.Node | None:
        self.known.add(key)
        item = self.items.get(key)
        return item[1] if item else None

    def has(self, key: str) -> bool:
        """True when key is given a value other than null."""
        self.known.add(key)
        return key in self.items and not _is_null(self.items[key][1])

    def record(self, key: str, value: Any) -> None:
        """Show value as key's effective value."""
        self.shown[key] = value

    def get(self, key: str, conv: Callable[[_Ctx, yaml.Node, str], Any], default: Any = _MISSING) -> Any:
        node = self.raw(key)
        if _is_null(node):
            if default is _MISSING:
                self.ctx.error(self.node, self._key(key), "required key is missing")
                return None
            self.shown[key] = default
            return default
        value = conv(self.ctx, node, self._key(key))
        self.shown[key] = self.ctx.shown.pop(self._key(key), value)
        return value

    def sub(self, key: str) -> _Mapping:
        child = _Mapping(self.ctx, self.raw(key), self._key(key), section=True)
        self.shown[key] = child.shown
        return child

    def finish(self) -> None:
        for key, (knode, _) in self.items.items():
            if key not in self.known:
                near = difflib.get_close_matches(key, sorted(self.known), n=1, cutoff=0.6)
                hint = f" (did you mean {near[0]}?)" if near else ""
                self.ctx.error(knode, self._key(key), f"unknown key{hint}")


# --- converters: (ctx, node, keypath) -> value or None after reporting


def _str(ctx: _Ctx, node: yaml.Node, key: str) -> str | None:
    if not isinstance(node, yaml.ScalarNode):
        ctx.error(node, key, f"expected a string, got {_show(node)}")
        return None
    return str(node.value)


def _cipher_string(ctx: _Ctx, node: yaml.Node, key: str) -> str | None:
    """An OpenSSL TLS 1.2 cipher string that selects at least one suite ("" keeps the default)."""
    value = _str(ctx, node, key)
    if value:
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).set_ciphers(value)
        except ssl.SSLError:
            ctx.error(node, key, f"OpenSSL selects no cipher suite from {value!r}")
            return None
    return value


def _int(ctx: _Ctx, node: yaml.Node, key: str, minimum: int = 0) -> int | None:
    value = _scalar(node) if isinstance(node, yaml.ScalarNode) else None
    if not isinstance(value, int) or isinstance(value, bool):
        ctx.error(node, key, f"expected a whole number, got {_show(node)}")
        return None
    if value < minimum:
        ctx.error(node, key, f"must be at least {minimum}, got {value}")
        return None
    return value


def _positive_int(ctx: _Ctx, node: yaml.Node, key: str) -> int | None:
    return _int(ctx, node, key, minimum=1)


def _number(ctx: _Ctx, node: yaml.Node, key: str) -> float | None:
    value = _scalar(node) if isinstance(node, yaml.ScalarNode) else None
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        ctx.error(node, key, f"expected a number, got {_show(node)}")
        return None
    if value < 0:
        ctx.error(node, key, f"must not be negative, got {value}")
        return None
    return float(value)


def _positive_number(ctx: _Ctx, node: yaml.Node, key: str) -> float | None:
    value = _number(ctx, node, key)
    if value == 0:
        ctx.error(node, key, "must be more than 0")
        return None
    return value


def _bool(ctx: _Ctx, node: yaml.Node, key: str) -> bool | None:
    value = _scalar(node) if isinstance(node, yaml.ScalarNode) else None
    if not isinstance(value, bool):
        ctx.error(node, key, f"expected true or false, got {_show(node)}")
        return None
    return value


def _choice(*choices: str) -> Callable[[_Ctx, yaml.Node, str], str | None]:
    def conv(ctx: _Ctx, node: yaml.Node, key: str) -> str | None:
        value = _str(ctx, node, key)
        if value is not None and value not in choices:
            ctx.error(node, key, f"expected one of {' | '.join(choices)}, got \"{value}\"")
            return None
        return value

    return conv


def _list(item: Callable[[_Ctx, yaml.Node, str], Any]) -> Callable[[_Ctx, yaml.Node, str], tuple | None]:
    def conv(ctx: _Ctx, node: yaml.Node, key: str) -> tuple | None:
        if not isinstance(node, yaml.SequenceNode):
            ctx.error(node, key, f"expected a list, got {_show(node)}")
            return None
        values, shown = [], []
        for i, child in enumerate(node.value):
            value = item(ctx, child, f"{key}[{i}]")
            if value is not None:
                values.append(value)
                shown.append(ctx.shown.pop(f"{key}[{i}]", value))
        ctx.shown[key] = shown
        return tuple(values)

    return conv


def _path(ctx: _Ctx, node: yaml.Node, key: str) -> Path | None:
    value = _str(ctx, node, key)
    if value is None:
        return None
    return (ctx.base_dir / os.path.expanduser(value)).resolve()


def _readable_file(ctx: _Ctx, node: yaml.Node, key: str) -> Path | None:
    path = _path(ctx, node, key)
    if path is None:
        return None
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        ctx.error(node, key, f"cannot read {path}: {exc.strerror or exc}")
        return None
    return path


def _users_file(ctx: _Ctx, node: yaml.Node, key: str) -> Path | None:
    """The users file's path; when the file exists, every line must be a user entry."""
    path = _path(ctx, node, key)
    if path is None:
        return None
    try:
        Users.load(path)
    except UsersError as exc:
        ctx.error(node, key, str(exc))
        return None
    return path


def _network(ctx: _Ctx, node: yaml.Node, key: str):
    value = _str(ctx, node, key)
    if value is None:
        return None
    try:
        return ipaddress.ip_network(value, strict=False)
    except ValueError:
        ctx.error(node, key, f"not a network: \"{value}\"")
        return None


def _domain(ctx: _Ctx, node: yaml.Node, key: str) -> str | None:
    value = _str(ctx, node, key)
    if value is None:
        return None
    try:
        return normalize_domain(value)
    except AddressError as exc:
        ctx.error(node, key, f"not a domain: \"{value}\" ({exc})")
        return None


def _separator(ctx: _Ctx, node: yaml.Node, key: str) -> str | None:
    value = _str(ctx, node, key)
    if value is None:
        return None
    try:
        return check_separator(value)
    except AddressError as exc:
        ctx.error(node, key, str(exc))
        return None


def _hostport(ctx: _Ctx, node: yaml.Node, key: str) -> tuple[str, int] | None:
    value = _str(ctx, node, key)
    if value is None:
        return None
    parsed = parse_hostport(value)
    if parsed is None:
        ctx.error(node, key, f"expected host:port (or [v6]:port), got \"{value}\"")
    return parsed


def parse_hostport(value: str) -> tuple[str, int] | None:
    """Split "host:port" or "[v6]:port"; None when it is not that shape."""
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([^\[\]:\s]+):(\d{1,5})", value.strip())
    if not m:
        return None
    host = m.group(1) or m.group(3)
    port = int(m.group(2) or m.group(4))
    if not 0 <= port < 65536:  # 0: any free port (tests)
        return None
    return host, port


def _join_hostport(host: str, port: int) -> str:
    """The inverse of parse_hostport: an IPv6 address keeps its brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _regex(ctx: _Ctx, node: yaml.Node, key: str) -> str | None:
    value = _str(ctx, node, key)
    if value is None:
        return None
    try:
        compiled = re.compile(value)
    except re.error as exc:
        ctx.error(node, key, f"not a regular expression: {exc}")
        return None
    if compiled.match(""):
        ctx.error(node, key, "must not match the empty string")
        return None
    return value


def _template(ctx: _Ctx, node: yaml.Node, key: str) -> str | None:
    value = _str(ctx, node, key)
    if value is None:
        return None
    try:
        value.format(n=1)
    except (KeyError, IndexError, ValueError) as exc:
        ctx.error(node, key, f"expected a template using only {{n}}, got \"{value}\" ({exc})")
        return None
    if "{n" not in value:
        ctx.error(node, key, f"template must contain {{n}}, got \"{value}\"")
        return None
    return value


# --- TLS files


_PEM_CERTIFICATE = re.compile(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", re.S)
_PEM_PRIVATE_KEY = re.compile(r"-----BEGIN ((?:[A-Z]+ )?PRIVATE KEY)-----")


def _pem_certificate_problem(path: Path) -> str | None:
    """Why path is not a PEM certificate (chain), or None when it is one."""
    text = path.read_text(encoding="ascii", errors="replace")
    blocks = _PEM_CERTIFICATE.findall(text)
    if not blocks:
        return f"{path} is not a PEM certificate (no -----BEGIN CERTIFICATE----- block)"
    try:
        ssl.create_default_context().load_verify_locations(cadata="\n".join(blocks))
    except ssl.SSLError:
        return f"{path}: a certificate in it is damaged and does not parse"
    return None


def _pem_key_problem(path: Path, cert: Path) -> str | None:
    """Why path is not the unencrypted PEM private key of cert, or None."""
    text = path.read_text(encoding="ascii", errors="replace")
    found = _PEM_PRIVATE_KEY.search(text)
    if found is None:
        return f"{path} is not a PEM private key (no -----BEGIN PRIVATE KEY----- block)"
    if found.group(1) == "ENCRYPTED PRIVATE KEY" or "Proc-Type: 4,ENCRYPTED" in text:
        return f"{path} is encrypted with a passphrase; smtpgate needs the key unencrypted"
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(str(cert), str(path), password=lambda: b"")
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            return f"{path} does not match the certificate in {cert}"
        return f"{path}: the private key is damaged and does not parse"
    return None


def _check_tls_files(ctx: _Ctx, m: _Mapping, key: str, cert: Path | None, private_key: Path | None) -> None:
    """tls_cert must hold PEM certificates and tls_key the matching unencrypted PEM key."""
    if cert is None:
        return
    problem = _pem_certificate_problem(cert)
    if problem is not None:
        ctx.error(m.raw("tls_cert"), f"{key}.tls_cert", problem)
        return
    if private_key is None:
        return
    problem = _pem_key_problem(private_key, cert)
    if problem is not None:
        ctx.error(m.raw("tls_key"), f"{key}.tls_key", problem)


# --- relay networks

# Ranges no one outside the organisation can send from: RFC 1918, loopback,
# link-local, RFC 6598 shared space, and their IPv6 counterparts (RFC 4193 ULA).
_PRIVATE_NETWORKS = tuple(
    ipaddress.ip_network(n)
    for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "127.0.0.0/8", "169.254.0.0/16",
              "100.64.0.0/10", "::1/128", "fc00::/7", "fe80::/10")
)


def _is_private(network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> bool:
    return any(network.version == p.version and network.subnet_of(p) for p in _PRIVATE_NETWORKS)


def _check_relay_networks(ctx: _Ctx, m: _Mapping, key: str) -> None:
    """A relay network that reaches beyond private ranges makes an open relay for
    its hosts: an error unless the listener says allow_public_relay_networks."""
    node = m.raw("relay_networks")
    if not isinstance(node, yaml.SequenceNode):
        return
    for i, child in enumerate(node.value):
        try:
            network = ipaddress.ip_network(str(child.value), strict=False)
        except ValueError:
            continue  # reported by _network
        if not _is_private(network):
            ctx.error(child, f"{key}.relay_networks[{i}]",
                      f"{network} is not a private network: every host in it could relay through "
                      f"smtpgate without AUTH (set allow_public_relay_networks: true on this listener "
                      f"if that is intended)")


# --- sections


def _listener_address(ctx: _Ctx, m: _Mapping, key: str, kind: str | None) -> tuple[str, int, Path | None]:
    """(host, port, unix socket path) of the listener's address key."""
    node = m.raw("address")
    if node is None:
        ctx.error(m.node, f"{key}.address", "required key is missing")
        return "127.0.0.1", 0, None
    text = _str(ctx, node, f"{key}.address")
    m.record("address", text)
    if text is not None and kind == "milter" and text.startswith("/"):
        return "127.0.0.1", 0, _path(ctx, node, f"{key}.address")
    if text is not None:
        parsed = _hostport(ctx, node, f"{key}.address")
        if parsed:
            return parsed[0], parsed[1], None
    return "127.0.0.1", 0, None


def _listener(ctx: _Ctx, node: yaml.Node, key: str) -> Listener | None:
    m = _Mapping(ctx, node, key)
    if m.node is None:
        return None
    name = m.get("name", _str)
    kind = m.get("kind", _choice("smtp", "milter"), "smtp")
    host, port, path = _listener_address(ctx, m, key, kind)
    tls = m.get("tls", _choice("none", "starttls", "implicit"), "none")
    tls_cert = m.get("tls_cert", _readable_file, None)
    tls_key = m.get("tls_key", _readable_file, None)
    auth = m.get("auth", _choice("none", "optional", "required"), "none")
    networks = m.get("relay_networks", _list(_network), ())
    public = m.get("allow_public_relay_networks", _bool, False)
    proxy = m.get("proxy_protocol", _bool, False)
    direction = m.get("direction", _choice("outbound", "inbound"), "outbound")
    mode = m.get("mode", _choice("enforce", "observe"), None)
    ciphers = m.get("tls_ciphers", _cipher_string, "")
    m.finish()
    if tls in ("starttls", "implicit") and (m.has("tls_cert") is False or m.has("tls_key") is False):
        ctx.error(node, f"{key}.tls", f"tls: {tls} needs tls_cert and tls_key")
    if tls in ("starttls", "implicit"):
        _check_tls_files(ctx, m, key, tls_cert, tls_key)
    if auth == "required" and tls == "none":
        ctx.error(m.raw("auth"), f"{key}.auth",
                  "auth: required needs tls: starttls or implicit: AUTH is offered only over TLS, "
                  "so no client could ever authenticate")
    if not public:
        _check_relay_networks(ctx, m, key)
    if None in (name, kind, tls, auth, proxy, direction):
        return None
    return Listener(
        name=name, kind=kind, host=host, port=port, path=path, tls=tls, tls_cert=tls_cert,
        tls_key=tls_key, auth=auth, relay_networks=networks or (), proxy_protocol=proxy,
        direction=direction, mode=mode or "", tls_ciphers=ciphers or "",
        allow_public_relay_networks=bool(public),
    )


def _listeners(top: _Mapping) -> tuple[Listener, ...] | None:
    """The listeners: at least one, names unique."""
    ctx = top.ctx
    listeners = top.get("listeners", _list(_listener))
    if listeners == ():
        ctx.error(top.raw("listeners"), "listeners", "at least one listener is needed")
    names = [lst.name for lst in listeners or ()]
    for dup in sorted({n for n in names if names.count(n) > 1}):
        ctx.error(top.raw("listeners"), "listeners", f"duplicate listener name \"{dup}\"")
    return listeners


_UPSTREAM_SCHEMES = {"smtp": 25, "smtp+starttls": 587, "smtps": 465}


@dataclass(frozen=True)
class _UpstreamUrl:
    scheme: str
    host: str | None = None
    port: int | None = None
    path: Path | None = None
    mx_domain: str | None = None


def _upstream_url(ctx: _Ctx, node: yaml.Node, url: str) -> _UpstreamUrl | None:
    """The parts of upstream.url: smtp://, smtp+starttls://, smtps://, mx: or maildir:."""
    if url.startswith("maildir:"):
        rest = url[len("maildir:"):]
        if not rest:
            ctx.error(node, "upstream.url", "maildir: needs a folder, e.g. maildir:var/outbox")
            return None
        return _UpstreamUrl("maildir", path=(ctx.base_dir / rest).resolve())
    if url.startswith("mx:"):
        domain, port = _mx_target(url[3:])
        try:
            mx_domain = normalize_domain(domain)
        except AddressError:
            ctx.error(node, "upstream.url", f"mx: needs a domain, e.g. mx:corp.example, got \"{url}\"")
            return None
        if port is None:
            ctx.error(node, "upstream.url", f"bad port in \"{url}\"")
            return None
        return _UpstreamUrl("mx", port=port, mx_domain=mx_domain)
    parts = urlsplit(url)
    if parts.scheme not in _UPSTREAM_SCHEMES or not parts.hostname:
        ctx.error(node, "upstream.url",
                  f"expected smtp://host:port, smtp+starttls://host:port, smtps://host:port, "
                  f"mx:domain or maildir:path, got \"{url}\"")
        return None
    if parts.username or parts.password:
        ctx.error(node, "upstream.url", "credentials go in username and password_file, not the URL")
        return None
    try:
        port = parts.port or _UPSTREAM_SCHEMES[parts.scheme]
    except ValueError:
        ctx.error(node, "upstream.url", f"bad port in \"{url}\"")
        return None
    return _UpstreamUrl(parts.scheme, host=parts.hostname, port=port)


def _upstream(m: _Mapping) -> Upstream | None:
    ctx = m.ctx
    url = m.get("url", _str)
    parsed = _upstream_url(ctx, m.raw("url"), url) if url is not None else None
    username = m.get("username", _str, None)
    password_file = m.get("password_file", _readable_file, None)
    timeout = m.get("timeout", _positive_number, 45.0)
    timeouts = _upstream_timeouts(m.sub("timeouts"), timeout)
    pool_size = m.get("pool_size", _int, 16)
    tls = m.get("tls", _choice("opportunistic", "required"), "opportunistic")
    verify = m.get("verify_tls", _bool, True)
    ca_file = m.get("ca_file", _readable_file, None)
    resolver = m.get("resolver", _resolver, None)
    auth = m.get("auth", _choice("none", "password", "xoauth2"), "password" if username else "none")
    oauth2 = _oauth2(m.sub("oauth2")) if m.has("oauth2") else None
    if oauth2 is None:
        m.record("oauth2", None)
    client_cert = m.get("tls_client_cert", _readable_file, None)
    client_key = m.get("tls_client_key", _readable_file, None)
    max_connections = m.get("max_connections", _positive_int, 100)
    m.finish()
    _upstream_auth(ctx, m, auth, username)
    _upstream_client_certificate(ctx, m, parsed.scheme if parsed else None, client_cert, client_key)
    _upstream_mx_only(ctx, m, parsed.scheme if parsed else None)
    if parsed is None or timeout is None or pool_size is None:
        return None
    return Upstream(
        url=url, scheme=parsed.scheme, host=parsed.host, port=parsed.port, path=parsed.path,
        mx_domain=parsed.mx_domain, username=username, password_file=password_file, timeout=timeout,
        pool_size=pool_size, tls=tls, verify_tls=bool(verify), ca_file=ca_file, resolver=resolver,
        auth=auth or "none", oauth2=oauth2, tls_client_cert=client_cert, tls_client_key=client_key,
        max_connections=max_connections or 100, timeouts=timeouts,
    )


def _mx_target(text: str) -> tuple[str, int | None]:
    """"corp.example" -> (domain, 25); "corp.example:2525" -> (domain, 2525), a port for labs and tests."""
    domain, sep, port = text.rpartition(":")
    if not sep:
        return text, 25
    if port.isdigit() and 0 < int(port) < 65536:
        return domain, int(port)
    return domain, None


def _upstream_timeouts(m: _Mapping, cap: float | None) -> UpstreamTimeouts:
    """upstream.timeouts; each phase is capped by upstream.timeout (docs/upstream.md)."""
    base = UpstreamTimeouts()
    values = {
        name: m.get(name, _positive_number, getattr(base, name))
        for name in ("connect", "command", "data")
    }
    m.finish()
    effective = {
        name: min(value if value is not None else getattr(base, name), cap or getattr(base, name))
        for name, value in values.items()
    }
    for name, value in effective.items():
        m.record(name, value)  # --show prints the wait that applies, after the cap
    return UpstreamTimeouts(**effective)


def _resolver(ctx: _Ctx, node: yaml.Node, key: str) -> str | None:
    """A DNS server as "ip" or "ip:port" ("[v6]:port"); returned as "ip:port"."""
    value = _str(ctx, node, key)
    if value is None:
        return None
    parsed = parse_hostport(value)
    host, port = parsed if parsed is not None else (value.strip(), 53)
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        ctx.error(node, key, f"expected a DNS server's IP address, optionally with :port, got \"{value}\"")
        return None
    if port == 0:
        ctx.error(node, key, f"port 0 is not a DNS server's port, got \"{value}\"")
        return None
    return f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"


def _upstream_mx_only(ctx: _Ctx, m: _Mapping, scheme: str | None) -> None:
    """upstream.tls and upstream.resolver mean something for mx: only; elsewhere they are
    errors, and --show leaves them out (its output must load again)."""
    for key in ("tls", "resolver"):
        if scheme is not None and scheme != "mx":
            m.shown.pop(key, None)
        if m.has(key) and scheme is not None and scheme != "mx":
            ctx.error(m.raw(key), f"upstream.{key}", "applies to mx: upstreams only (for TLS to one server "
                      "use smtp+starttls:// or smtps://)" if key == "tls" else "applies to mx: upstreams only")


def _upstream_auth(ctx: _Ctx, m: _Mapping, auth: str | None, username: str | None) -> None:
    """Check that the keys present match upstream.auth (docs/microsoft-365.md for xoauth2)."""
    if auth == "xoauth2" and not m.has("oauth2"):
        ctx.error(m.node, "upstream.oauth2", "auth: xoauth2 needs oauth2: {token_url, client_id, "
                  "client_secret_file, scope}")
    if auth == "xoauth2" and not username:
        ctx.error(m.node, "upstream.username", "auth: xoauth2 needs username (the mailbox the token acts as)")
    if auth == "password" and not username:
        ctx.error(m.node, "upstream.username", "auth: password needs username and password_file")
    if auth == "password" and username and not m.has("password_file"):
        ctx.error(m.node, "upstream.password_file", "username is set but password_file is missing")
    if auth == "none" and username:
        ctx.error(m.raw("auth"), "upstream.auth",
                  "auth: none but username is set; remove username or choose password | xoauth2")
    if auth in ("none", "password") and m.has("oauth2"):
        ctx.error(m.raw("oauth2"), "upstream.oauth2", f"oauth2 is used only with auth: xoauth2 (auth is {auth})")
    if auth in ("none", "xoauth2") and m.has("password_file"):
        ctx.error(m.raw("password_file"), "upstream.password_file",
                  f"password_file is used only with auth: password (auth is {auth})")


def _upstream_client_certificate(ctx: _Ctx, m: _Mapping, scheme: str | None,
                                 cert: Path | None, key: Path | None) -> None:
    """A client certificate needs its key and an upstream that speaks TLS."""
    if m.has("tls_client_cert") != m.has("tls_client_key"):
        ctx.error(m.node, "upstream.tls_client_cert", "tls_client_cert and tls_client_key go together")
        return
    if not m.has("tls_client_cert"):
        return
    if scheme in ("smtp", "maildir"):
        ctx.error(m.raw("tls_client_cert"), "upstream.tls_client_cert",
                  "a client certificate needs a TLS upstream: smtp+starttls://, smtps:// or mx:")
    if cert is None or key is None:
        return  # unreadable: already reported
    try:
        load_client_certificate(ssl.create_default_context(), cert, key)
    except ssl.SSLError as exc:
        why = {"KEY_VALUES_MISMATCH": "the key does not belong to the certificate"}.get(
            exc.reason or "", "not a PEM certificate and PEM private key")
        ctx.error(m.raw("tls_client_cert"), "upstream.tls_client_cert", f"cannot use {cert} with {key}: {why}")
    except ValueError as exc:
        ctx.error(m.raw("tls_client_key"), "upstream.tls_client_key", f"cannot use {key}: {exc}")


def _oauth2(m: _Mapping) -> OAuth2 | None:
    ctx = m.ctx
    if m.node is None:
        return None  # not a mapping: already reported
    token_url = m.get("token_url", _str)
    client_id = m.get("client_id", _str)
    secret = m.get("client_secret_file", _readable_file)
    scope = m.get("scope", _str, "https://outlook.office365.com/.default")
    m.finish()
    if token_url is not None and urlsplit(token_url).scheme not in ("http", "https"):
        ctx.error(m.raw("token_url"), "upstream.oauth2.token_url", f"expected an http(s) URL, got \"{token_url}\"")
        return None
    if token_url is not None and urlsplit(token_url).scheme == "http" and not _is_loopback(token_url):
        ctx.error(m.raw("token_url"), "upstream.oauth2.token_url",
                  "the client secret is sent to the token endpoint: use https (http only on loopback)")
        return None
    if None in (token_url, client_id, secret, scope):
        return None
    return OAuth2(token_url=token_url, client_id=client_id, client_secret_file=secret, scope=scope)


def _is_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _references(m: _Mapping) -> References | None:
    pattern = m.get("pattern", _regex, DEFAULT_PATTERN)
    headers = m.get("headers", _list(_str), ("X-Enate-Reference",))
    subject = m.get("subject", _bool, True)
    m.finish()
    if None in (pattern, headers, subject):
        return None
    return References(pattern=pattern, headers=tuple(headers), subject=subject)


def _mailbox(ctx: _Ctx, node: yaml.Node, key: str, separator: str) -> MailboxInfo | None:
    m = _Mapping(ctx, node, key)
    if m.node is None:
        return None
    address = None
    text = m.get("address", _str)
    if text is not None:
        try:
            address = parse_mailbox(text, separator)
        except AddressError as exc:
            ctx.error(m.raw("address"), f"{key}.address", f"not a mailbox address: \"{text}\": {exc}")
    team = m.get("team", _str)
    new_links = m.get("new_links", _choice("create", "never"), "create")
    new_reference = m.get("new_reference", _template, "{n}-T")
    m.finish()
    if None in (address, team, new_links, new_reference):
        return None
    m.record("address", address.canonical)
    return MailboxInfo(address=address.canonical, team=team, new_links=new_links, new_reference=new_reference)


def _mailboxes(top: _Mapping, separator: str, internal: tuple[str, ...] | None) -> tuple[MailboxInfo, ...]:
    """The work-management mailboxes: each untagged, once, in an internal domain."""
    ctx = top.ctx
    node = top.raw("mailboxes")
    top.record("mailboxes", [])
    if node is None:
        return ()
    if not isinstance(node, yaml.SequenceNode):
        ctx.error(node, "mailboxes", f"expected a list, got {_show(node)}")
        return ()
    mailboxes: list[MailboxInfo] = []
    for i, child in enumerate(node.value):
        mailbox = _mailbox(ctx, child, f"mailboxes[{i}]", separator)
        shown = ctx.shown.pop(f"mailboxes[{i}]", None)
        if mailbox is None:
            continue
        if any(mb.address == mailbox.address for mb in mailboxes):
            ctx.error(child, f"mailboxes[{i}].address", f"duplicate mailbox {mailbox.address}")
            continue
        domain = mailbox.address.rsplit("@", 1)[1]
        if internal is not None and domain not in internal:
            ctx.error(child, f"mailboxes[{i}].address", f"{mailbox.address} is not in internal_domains")
        mailboxes.append(mailbox)
        top.shown["mailboxes"].append(shown)
    return tuple(mailboxes)


def _allocator(m: _Mapping) -> Allocator | None:
    kind = m.get("kind", _choice("local", "http"), "local")
    first_number = m.get("first_number", _int, 900000)
    url = m.get("url", _str, None)
    token_file = m.get("token_file", _readable_file, None)
    timeout = m.get("timeout", _number, 10.0)
    m.finish()
    if kind == "http" and not url:
        m.ctx.error(m.node, "allocator.url", "kind: http needs url")
    elif kind == "http" and urlsplit(url).scheme not in ("http", "https"):
        m.ctx.error(m.raw("url"), "allocator.url", f"expected an http(s) URL, got \"{url}\"")
    if None in (kind, first_number, timeout):
        return None
    return Allocator(kind=kind, first_number=first_number, url=url, token_file=token_file, timeout=timeout)


def _store(m: _Mapping) -> Store | None:
    url = m.get("url", _str, "sqlite:var/smtpgate.db")
    keep_days = m.get("keep_messages_days", _positive_int, 400)
    auto_upgrade = m.get("auto_upgrade", _bool, False)
    timeout = m.get("timeout", _number, 30.0)
    m.finish()
    if url and not re.match(r"^(sqlite:.+|postgres(ql)?://.*)$", url):
        m.ctx.error(m.raw("url"), "store.url",
                    f"expected sqlite:PATH or postgresql://..., got \"{redact_url(url)}\"")
    if None in (url, keep_days, auto_upgrade, timeout):
        return None
    return Store(url=url, keep_messages_days=keep_days, auto_upgrade=auto_upgrade, timeout=timeout)


def _inbound(m: _Mapping) -> Inbound | None:
    unknown_tags = m.get("unknown_tags", _choice("pass", "strip"), "pass")
    m.finish()
    return None if unknown_tags is None else Inbound(unknown_tags=unknown_tags)


def _limits(m: _Mapping) -> Limits | None:
    values = dict(
        max_message_size=m.get("max_message_size", _positive_int, 36700160),
        max_recipients=m.get("max_recipients", _positive_int, 500),
        max_hops=m.get("max_hops", _positive_int, 50),
        max_connections=m.get("max_connections", _positive_int, 1000),
        max_connections_per_client=m.get("max_connections_per_client", _positive_int, 20),
        idle_timeout=m.get("idle_timeout", _positive_number, 300.0),
        max_bad_commands=m.get("max_bad_commands", _positive_int, 20),
        auth_failure_delay=m.get("auth_failure_delay", _number, 1.0),
    )
    m.finish()
    return None if None in values.values() else Limits(**values)


def _logging(m: _Mapping) -> Logging | None:
    fmt = m.get("format", _choice("json", "console"), "json")
    level = m.get("level", _choice("debug", "info", "warning", "error"), "info")
    m.finish()
    return None if None in (fmt, level) else Logging(format=fmt, level=level)


def _admin_token(teams: set[str]):
    """A converter for one admin.tokens entry: a team of mailboxes: (or admin) and a non-empty file."""

    def convert(ctx: _Ctx, node: yaml.Node, key: str) -> AdminToken | None:
        m = _Mapping(ctx, node, key)
        if m.node is None:
            return None
        team = m.get("team", _str)
        token_file = m.get("token_file", _readable_file)
        m.finish()
        if team and team != "admin" and team not in teams:
            # A misspelt team would silently see no activity in full.
            ctx.error(m.raw("team"), f"{key}.team", f"\"{team}\" is neither a team of mailboxes: nor admin")
        if token_file and not token_file.read_bytes().strip():
            ctx.error(m.raw("token_file"), f"{key}.token_file", f"{token_file} is empty")
        return AdminToken(team=team, token_file=token_file) if team and token_file else None

    return convert


def _admin(m: _Mapping, mailboxes: tuple[MailboxInfo, ...]) -> Admin | None:
    listen = m.get("listen", _hostport, None)
    if listen is not None:
        m.record("listen", _join_hostport(*listen))
    tokens = m.get("tokens", _list(_admin_token({mb.team for mb in mailboxes})), ())
    m.finish()
    if tokens is None:
        return None
    return Admin(listen=_join_hostport(*listen) if listen else None, tokens=tuple(tokens))


# --- the file


# PyYAML's wording of a syntax problem -> the same in plain words.
_SYNTAX_WORDS: tuple[tuple[str, str], ...] = (
    ("found character '\\t'", "a tab character; YAML indents with spaces only"),
    ("tab character", "a tab character; YAML indents with spaces only"),
    ("mapping values are not allowed here",
     "a \": \" where a value was expected: put the value in quotes if it contains \": \", "
     "or check the indentation of this line"),
    ("could not find expected ':'", "expected \"key: value\" (a key is missing its colon)"),
    ("found unexpected end of stream", "the file ends inside a quoted value: a closing quote is missing"),
    ("expected ',' or ']'", "a [list] is not closed with \"]\", or its items lack commas"),
    ("expected ',' or '}'", "a {mapping} is not closed with \"}\", or its items lack commas"),
    ("did not find expected '-' indicator", "a list item must start with \"- \" at the same indentation "
                                            "as the items above it"),
    ("did not find expected key", "this line is not indented like the keys above it"),
    ("expected <block end>, but found '<scalar>'",
     "unexpected text: quote the whole value, or indent this line like the lines above it"),
    ("expected <block end>", "this line is not indented like the lines above it"),
    ("found undefined alias", "*name refers to an anchor &name that is not defined"),
    ("expected a comment or a line break", "unexpected text after a value: quote the whole value"),
    ("cannot start any token", "a value cannot start with this character: put the value in quotes"),
    ("found unknown escape character", "an unknown \\ escape inside a double-quoted value: use single quotes"),
    ("expected the node content", "a value is missing here"),
)


# PyYAML's "while parsing a flow sequence" -> what the reader calls that part.
_SYNTAX_CONTEXTS = {
    "flow sequence": "the [list]", "flow mapping": "the {mapping}", "quoted scalar": "the quoted value",
    "block mapping": "the mapping", "block collection": "the list", "simple key": "the key",
}


def _syntax_problem(filename: str, exc: yaml.YAMLError) -> str:
    """One problem line for a YAML syntax error: file, line, column, plain words."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    words = next((plain for jargon, plain in _SYNTAX_WORDS if jargon in problem), None)
    if words is None:
        words = f"not valid YAML ({problem})"
    if mark is None:
        return f"{filename}:1: {words}"
    context, start = getattr(exc, "context", None) or "", getattr(exc, "context_mark", None)
    part = next((name for jargon, name in _SYNTAX_CONTEXTS.items() if jargon in context), None)
    if part is not None and start is not None and start.line != mark.line:
        words += f" ({part} starts on line {start.line + 1})"
    return f"{filename}:{mark.line + 1}: column {mark.column + 1}: {words}"


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate a config file; raises ConfigError listing every problem."""
    path = Path(path)
    filename = path.name
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: not UTF-8 text: {exc}"]) from None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        raise ConfigError([_syntax_problem(filename, exc)]) from None
    ctx = _Ctx(filename, path.resolve().parent)
    config = _build(ctx, root, path.resolve())
    if ctx.problems:
        raise ConfigError(ctx.problems)
    assert config is not None
    return config


def _build(ctx: _Ctx, root: yaml.Node | None, path: Path) -> Config | None:
    """Every section read and checked; None when any problem was reported."""
    if root is None:
        ctx.error(None, "(top level)", "the file is empty")
        return None
    top = _Mapping(ctx, root, "")
    hostname = top.get("hostname", _str, None) or _default_hostname()
    top.record("hostname", hostname)
    mode = top.get("mode", _choice("enforce", "observe"), "enforce")
    listeners = _listeners(top)
    workers = top.get("workers", _positive_int, 1)
    grace = top.get("shutdown_grace", _number, 30.0)
    auth_backend = top.get("auth_backend", _choice("file", "upstream"), "file")
    users_file = top.get("users_file", _users_file, None)
    upstream = _upstream(top.sub("upstream"))
    internal = top.get("internal_domains", _list(_domain), ())
    separator = top.get("separator", _separator, "+")
    references = _references(top.sub("references"))
    mailboxes = _mailboxes(top, separator or "+", internal)
    allocator = _allocator(top.sub("allocator"))
    store = _store(top.sub("store"))
    inbound = _inbound(top.sub("inbound"))
    limits = _limits(top.sub("limits"))
    logging_ = _logging(top.sub("logging"))
    admin = _admin(top.sub("admin"), mailboxes or ())
    if auth_backend == "upstream" and upstream is not None and upstream.scheme not in ("smtps", "smtp+starttls"):
        # The clients' own passwords go to the upstream: only ever over TLS.
        ctx.error(top.raw("auth_backend"), "auth_backend",
                  f"upstream sends each client's password to the upstream, so upstream.url "
                  f"must be smtps:// or smtp+starttls:// (it is {upstream.scheme}:)")
    top.finish()
    if ctx.problems:
        return None
    # A listener without its own mode takes the top-level one.
    listeners = tuple(dataclasses.replace(lst, mode=lst.mode or mode) for lst in listeners)
    for shown, lst in zip(top.shown["listeners"], listeners):
        shown["mode"] = lst.mode
    core = CoreSettings(
        internal_domains=tuple(internal),
        separator=separator,
        reference_pattern=references.pattern,
        reference_headers=references.headers,
        subject=references.subject,
        mailboxes=mailboxes,
    )
    return Config(
        path=path, hostname=hostname, listeners=listeners, workers=workers, shutdown_grace=grace,
        auth_backend=auth_backend, users_file=users_file, upstream=upstream,
        internal_domains=tuple(internal), separator=separator, references=references,
        mailboxes=mailboxes, allocator=allocator, store=store, inbound=inbound, limits=limits,
        logging=logging_, admin=admin, core=core, mode=mode, effective=top.shown,
    )


def _default_hostname() -> str:
    import socket

    return socket.getfqdn() or "localhost"


def config_path(arg: str | None) -> Path:
    """-c, else $SMTPGATE_CONFIG, else /etc/smtpgate/smtpgate.yaml."""
    return Path(arg or os.environ.get("SMTPGATE_CONFIG") or DEFAULT_CONFIG)
