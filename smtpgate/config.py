"""smtpgate's configuration: one YAML file loaded into validated, immutable objects.

The schema lives in this module only: every key, its type, its default and its
validator. Errors name the file, the line and the key path, e.g.
``smtpgate.yaml:14: upstream.timeout: expected a number, got "soon"``.
Relative paths are resolved against the config file's folder.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from smtpgate.mail.addresses import AddressError, normalize_domain, parse_path
from smtpgate.linking.plan import CoreSettings, MailboxInfo

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
    token_url: str
    client_id: str
    client_secret_file: Path
    scope: str

    def client_secret(self) -> str:
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
        store = re.sub(r"//[^@/]*@", "//", self.store.url)  # no credentials in output
        return (
            f"{self.path}: ok: mode {self.mode}, {len(self.listeners)} listener(s) [{listeners}], "
            f"upstream {self.upstream.label}, store {store}, "
            f"{len(self.mailboxes)} mailbox(es), {len(self.internal_domains)} internal domain(s)"
        )


# ---------------------------------------------------------------- the loader


class _Ctx:
    """Collects problems while walking the YAML node tree."""

    def __init__(self, filename: str, base_dir: Path):
        self.filename = filename
        self.base_dir = base_dir
        self.problems: list[str] = []

    def error(self, node: yaml.Node | None, key: str, message: str) -> None:
        line = node.start_mark.line + 1 if node is not None else 1
        self.problems.append(f"{self.filename}:{line}: {key}: {message}")


_MISSING = object()


def _show(node: yaml.Node) -> str:
    if isinstance(node, yaml.ScalarNode):
        return f'"{node.value}"'
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    return "a mapping"


def _scalar(node: yaml.Node) -> Any:
    """The Python value of a scalar node, with YAML 1.1 core resolution."""
    return yaml.constructor.SafeConstructor().construct_object(node, deep=True)


class _Mapping:
    """A YAML mapping node whose keys are checked against the schema as they are read."""

    def __init__(self, ctx: _Ctx, node: yaml.Node | None, path: str):
        self.ctx = ctx
        self.path = path
        self.node = node
        self.items: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        self.used: set[str] = set()
        if node is None:
            return
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
        self.used.add(key)
        item = self.items.get(key)
        return item[1] if item else None

    def has(self, key: str) -> bool:
        return key in self.items

    def get(self, key: str, conv: Callable[[_Ctx, yaml.Node, str], Any], default: Any = _MISSING) -> Any:
        node = self.raw(key)
        if node is None or (isinstance(node, yaml.ScalarNode) and node.tag.endswith(":null")):
            if default is _MISSING:
                self.ctx.error(self.node, self._key(key), "required key is missing")
                return None
            return default
        return conv(self.ctx, node, self._key(key))

    def sub(self, key: str) -> _Mapping:
        return _Mapping(self.ctx, self.raw(key), self._key(key))

    def finish(self) -> None:
        for key, (knode, _) in self.items.items():
            if key not in self.used:
                self.ctx.error(knode, self._key(key), "unknown key")


# --- converters: (ctx, node, keypath) -> value or None after reporting


def _str(ctx: _Ctx, node: yaml.Node, key: str) -> str | None:
    if not isinstance(node, yaml.ScalarNode):
        ctx.error(node, key, f"expected a string, got {_show(node)}")
        return None
    return str(node.value)


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
        values = [item(ctx, child, f"{key}[{i}]") for i, child in enumerate(node.value)]
        return tuple(v for v in values if v is not None)

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


def _mailbox_address(ctx: _Ctx, node: yaml.Node, key: str):
    value = _str(ctx, node, key)
    if value is None:
        return None
    try:
        address = parse_path(value)
    except AddressError as exc:
        ctx.error(node, key, f"not an address: \"{value}\" ({exc})")
        return None
    if address is None:
        ctx.error(node, key, "not an address: the null path")
        return None
    return address


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


# --- sections


def _listener(ctx: _Ctx, node: yaml.Node, key: str) -> Listener | None:
    m = _Mapping(ctx, node, key)
    if m.node is None:
        return None
    name = m.get("name", _str)
    kind = m.get("kind", _choice("smtp", "milter"), "smtp")
    address_node = m.raw("address")
    host, port, path = "127.0.0.1", 0, None
    if address_node is None:
        ctx.error(node, f"{key}.address", "required key is missing")
    else:
        text = _str(ctx, address_node, f"{key}.address")
        if text is not None and kind == "milter" and text.startswith("/"):
            path = _path(ctx, address_node, f"{key}.address")
        elif text is not None:
            hp = _hostport(ctx, address_node, f"{key}.address")
            if hp:
                host, port = hp
    tls = m.get("tls", _choice("none", "starttls", "implicit"), "none")
    tls_cert = m.get("tls_cert", _readable_file, None)
    tls_key = m.get("tls_key", _readable_file, None)
    auth = m.get("auth", _choice("none", "optional", "required"), "none")
    networks = m.get("relay_networks", _list(_network), ())
    proxy = m.get("proxy_protocol", _bool, False)
    direction = m.get("direction", _choice("outbound", "inbound"), "outbound")
    mode = m.get("mode", _choice("enforce", "observe"), None)
    ciphers = m.get("tls_ciphers", _str, "")
    public = m.get("allow_public_relay_networks", _bool, False)
    m.finish()
    if tls in ("starttls", "implicit") and (m.has("tls_cert") is False or m.has("tls_key") is False):
        ctx.error(node, f"{key}.tls", f"tls: {tls} needs tls_cert and tls_key")
    if None in (name, kind, tls, auth, proxy, direction):
        return None
    return Listener(
        name=name, kind=kind, host=host, port=port, path=path, tls=tls, tls_cert=tls_cert,
        tls_key=tls_key, auth=auth, relay_networks=networks or (), proxy_protocol=proxy,
        direction=direction, mode=mode or "", tls_ciphers=ciphers or "",
        allow_public_relay_networks=bool(public),
    )


_UPSTREAM_SCHEMES = {"smtp": 25, "smtp+starttls": 587, "smtps": 465}


def _upstream(ctx: _Ctx, m: _Mapping) -> Upstream | None:
    url_node = m.raw("url")
    url = _str(ctx, url_node, "upstream.url") if url_node is not None else None
    if url_node is None:
        ctx.error(m.node, "upstream.url", "required key is missing")
    scheme = host = port = path = mx_domain = None
    if url is not None:
        if url.startswith("maildir:"):
            scheme = "maildir"
            rest = url[len("maildir:"):]
            if not rest:
                ctx.error(url_node, "upstream.url", "maildir: needs a folder, e.g. maildir:var/outbox")
            else:
                path = (ctx.base_dir / rest).resolve()
        elif url.startswith("mx:"):
            scheme = "mx"
            domain, port = _mx_target(url[3:])
            try:
                mx_domain = normalize_domain(domain)
            except AddressError:
                ctx.error(url_node, "upstream.url", f"mx: needs a domain, e.g. mx:corp.example, got \"{url}\"")
            if port is None:
                ctx.error(url_node, "upstream.url", f"bad port in \"{url}\"")
        else:
            parts = urlsplit(url)
            if parts.scheme not in _UPSTREAM_SCHEMES or not parts.hostname:
                ctx.error(
                    url_node, "upstream.url",
                    f"expected smtp://host:port, smtp+starttls://host:port, smtps://host:port, "
                    f"mx:domain or maildir:path, got \"{url}\"",
                )
            elif parts.username or parts.password:
                ctx.error(url_node, "upstream.url", "credentials go in username and password_file, not the URL")
            else:
                scheme = parts.scheme
                host = parts.hostname
                try:
                    port = parts.port or _UPSTREAM_SCHEMES[scheme]
                except ValueError:
                    ctx.error(url_node, "upstream.url", f"bad port in \"{url}\"")
    username = m.get("username", _str, None)
    password_file = m.get("password_file", _readable_file, None)
    timeout = m.get("timeout", _positive_number, 45.0)
    timeouts = _upstream_timeouts(ctx, m.sub("timeouts"), timeout)
    pool_size = m.get("pool_size", _int, 16)
    tls = m.get("tls", _choice("opportunistic", "required"), "opportunistic")
    verify = m.get("verify_tls", _bool, True)
    ca_file = m.get("ca_file", _readable_file, None)
    resolver = m.get("resolver", _resolver, None)
    auth = m.get("auth", _choice("none", "password", "xoauth2"), "password" if username else "none")
    oauth2 = _oauth2(ctx, m.sub("oauth2")) if m.has("oauth2") else None
    client_cert = m.get("tls_client_cert", _readable_file, None)
    client_key = m.get("tls_client_key", _readable_file, None)
    max_connections = m.get("max_connections", _positive_int, 100)
    m.finish()
    if auth == "xoauth2" and m.has("oauth2") is False:
        ctx.error(m.node, "upstream.oauth2", "auth: xoauth2 needs oauth2: {token_url, client_id, "
                  "client_secret_file, scope}")
    if auth == "xoauth2" and not username:
        ctx.error(m.node, "upstream.username", "auth: xoauth2 needs username (the mailbox the token acts as)")
    for key in ("tls", "resolver"):
        if m.has(key) and scheme is not None and scheme != "mx":
            ctx.error(m.raw(key), f"upstream.{key}", "applies to mx: upstreams only (for TLS to one server "
                      "use smtp+starttls:// or smtps://)" if key == "tls" else "applies to mx: upstreams only")
    if m.has("tls_client_cert") != m.has("tls_client_key"):
        ctx.error(m.node, "upstream.tls_client_cert", "tls_client_cert and tls_client_key go together")
    if auth == "password" and username and password_file is None and m.has("password_file") is False:
        ctx.error(m.node, "upstream.password_file", "username is set but password_file is missing")
    if url is None or scheme is None or timeout is None or pool_size is None:
        return None
    return Upstream(
        url=url, scheme=scheme, host=host, port=port, path=path, mx_domain=mx_domain,
        username=username, password_file=password_file, timeout=timeout, pool_size=pool_size,
        tls=tls, verify_tls=bool(verify), ca_file=ca_file, resolver=resolver,
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


def _upstream_timeouts(ctx: _Ctx, m: _Mapping, cap: float | None) -> UpstreamTimeouts:
    """upstream.timeouts; each phase is capped by upstream.timeout (docs/upstream.md)."""
    base = UpstreamTimeouts()
    values = {
        name: m.get(name, _positive_number, getattr(base, name))
        for name in ("connect", "command", "data")
    }
    m.finish()
    return UpstreamTimeouts(**{
        name: min(value if value is not None else getattr(base, name), cap or getattr(base, name))
        for name, value in values.items()
    })


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


def _oauth2(ctx: _Ctx, m: _Mapping) -> OAuth2 | None:
    token_url = m.get("token_url", _str)
    client_id = m.get("client_id", _str)
    secret = m.get("client_secret_file", _readable_file)
    scope = m.get("scope", _str, "https://outlook.office365.com/.default")
    m.finish()
    if token_url is not None and urlsplit(token_url).scheme not in ("http", "https"):
        ctx.error(m.raw("token_url"), "upstream.oauth2.token_url", f"expected an http(s) URL, got \"{token_url}\"")
        return None
    if None in (token_url, client_id, secret, scope):
        return None
    return OAuth2(token_url=token_url, client_id=client_id, client_secret_file=secret, scope=scope)


def _mailbox(ctx: _Ctx, node: yaml.Node, key: str, separator: str) -> MailboxInfo | None:
    m = _Mapping(ctx, node, key)
    if m.node is None:
        return None
    address = m.get("address", _mailbox_address)
    team = m.get("team", _str)
    new_links = m.get("new_links", _choice("create", "never"), "create")
    new_reference = m.get("new_reference", _template, "{n}-T")
    m.finish()
    if address is not None and separator and separator in address.local:
        ctx.error(m.raw("address"), f"{key}.address",
                  f"a mailbox address must be untagged (it contains the separator \"{separator}\")")
        return None
    if None in (address, team, new_links, new_reference):
        return None
    return MailboxInfo(address=address.canonical, team=team, new_links=new_links, new_reference=new_reference)


def _separator(ctx: _Ctx, node: yaml.Node, key: str) -> str | None:
    value = _str(ctx, node, key)
    if value is not None and (len(value) != 1 or value in '@"\\ ()<>[]:;,.' or not value.isprintable()):
        ctx.error(node, key, f"expected one character that may appear in a local part, got \"{value}\"")
        return None
    return value


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
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark else 1
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([f"{filename}:{line}: (syntax): {problem}"]) from None
    ctx = _Ctx(filename, path.resolve().parent)
    config = _build(ctx, root, path.resolve())
    if ctx.problems:
        raise ConfigError(ctx.problems)
    assert config is not None
    return config


def _build(ctx: _Ctx, root: yaml.Node | None, path: Path) -> Config | None:
    top = _Mapping(ctx, root, "")
    if root is None:
        ctx.error(None, "(top level)", "the file is empty")
        return None
    hostname = top.get("hostname", _str, None) or _default_hostname()
    listeners = top.get("listeners", _list(_listener))
    if listeners == ():
        ctx.error(top.raw("listeners"), "listeners", "at least one listener is needed")
    names = [lst.name for lst in listeners or ()]
    for dup in {n for n in names if names.count(n) > 1}:
        ctx.error(top.raw("listeners"), "listeners", f"duplicate listener name \"{dup}\"")
    workers = top.get("workers", _positive_int, 1)
    grace = top.get("shutdown_grace", _number, 30.0)
    mode = top.get("mode", _choice("enforce", "observe"), "enforce")
    auth_backend = top.get("auth_backend", _choice("file", "upstream"), "file")
    users_file = top.get("users_file", _path, None)
    upstream = _upstream(ctx, top.sub("upstream"))
    internal = top.get("internal_domains", _list(_domain), ())
    separator = top.get("separator", _separator, "+")

    refs = top.sub("references")
    pattern = refs.get("pattern", _regex, "[0-9]{1,12}-[TCA]")
    headers = refs.get("headers", _list(_str), ("X-Enate-Reference",))
    subject = refs.get("subject", _bool, True)
    refs.finish()

    mailboxes_node = top.raw("mailboxes")
    mailboxes: list[MailboxInfo] = []
    if mailboxes_node is not None:
        if not isinstance(mailboxes_node, yaml.SequenceNode):
            ctx.error(mailboxes_node, "mailboxes", f"expected a list, got {_show(mailboxes_node)}")
        else:
            seen: set[str] = set()
            for i, child in enumerate(mailboxes_node.value):
                mb = _mailbox(ctx, child, f"mailboxes[{i}]", separator or "+")
                if mb is None:
                    continue
                if mb.address in seen:
                    ctx.error(child, f"mailboxes[{i}].address", f"duplicate mailbox {mb.address}")
                    continue
                seen.add(mb.address)
                mailboxes.append(mb)
                domain = mb.address.rsplit("@", 1)[1]
                if internal is not None and domain not in internal:
                    ctx.error(child, f"mailboxes[{i}].address",
                              f"{mb.address} is not in internal_domains")

    alloc = top.sub("allocator")
    alloc_kind = alloc.get("kind", _choice("local", "http"), "local")
    first_number = alloc.get("first_number", _int, 900000)
    alloc_url = alloc.get("url", _str, None)
    token_file = alloc.get("token_file", _readable_file, None)
    alloc_timeout = alloc.get("timeout", _number, 10.0)
    alloc.finish()
    if alloc_kind == "http":
        if not alloc_url:
            ctx.error(alloc.node, "allocator.url", "kind: http needs url")
        elif urlsplit(alloc_url).scheme not in ("http", "https"):
            ctx.error(alloc.raw("url"), "allocator.url", f"expected an http(s) URL, got \"{alloc_url}\"")

    st = top.sub("store")
    store_url = st.get("url", _str, "sqlite:var/smtpgate.db")
    keep_days = st.get("keep_messages_days", _positive_int, 400)
    auto_upgrade = st.get("auto_upgrade", _bool, False)
    store_timeout = st.get("timeout", _number, 30.0)
    st.finish()
    if store_url and not re.match(r"^(sqlite:.+|postgres(ql)?://.*)$", store_url):
        ctx.error(st.raw("url"), "store.url", f"expected sqlite:PATH or postgresql://..., got \"{store_url}\"")

    inb = top.sub("inbound")
    unknown_tags = inb.get("unknown_tags", _choice("pass", "strip"), "pass")
    inb.finish()

    lim = top.sub("limits")
    max_size = lim.get("max_message_size", _positive_int, 36700160)
    max_rcpt = lim.get("max_recipients", _positive_int, 500)
    max_hops = lim.get("max_hops", _positive_int, 50)
    max_conn = lim.get("max_connections", _positive_int, 1000)
    per_client = lim.get("max_connections_per_client", _positive_int, 20)
    idle_timeout = lim.get("idle_timeout", _number, 300.0)
    bad_commands = lim.get("max_bad_commands", _positive_int, 20)
    lim.finish()

    lg = top.sub("logging")
    log_format = lg.get("format", _choice("json", "console"), "json")
    log_level = lg.get("level", _choice("debug", "info", "warning", "error"), "info")
    lg.finish()

    adm = top.sub("admin")
    admin_listen = adm.get("listen", _hostport, None)
    tokens_node = adm.raw("tokens")
    tokens: list[AdminToken] = []
    if tokens_node is not None:
        if not isinstance(tokens_node, yaml.SequenceNode):
            ctx.error(tokens_node, "admin.tokens", f"expected a list, got {_show(tokens_node)}")
        else:
            for i, child in enumerate(tokens_node.value):
                tm = _Mapping(ctx, child, f"admin.tokens[{i}]")
                if tm.node is None:
                    continue
                team = tm.get("team", _str)
                tfile = tm.get("token_file", _readable_file)
                tm.finish()
                if team and tfile:
                    tokens.append(AdminToken(team=team, token_file=tfile))
    adm.finish()
    top.finish()

    if ctx.problems:
        return None
    listeners = tuple(
        dataclasses.replace(lst, mode=lst.mode or mode) for lst in listeners
    )
    core = CoreSettings(
        internal_domains=tuple(internal),
        separator=separator,
        reference_pattern=pattern,
        reference_headers=tuple(headers),
        subject=subject,
        mailboxes=tuple(mailboxes),
    )
    return Config(
        path=path,
        hostname=hostname,
        listeners=tuple(listeners),
        workers=workers,
        shutdown_grace=grace,
        auth_backend=auth_backend,
        users_file=users_file,
        upstream=upstream,
        internal_domains=tuple(internal),
        separator=separator,
        references=References(pattern=pattern, headers=tuple(headers), subject=subject),
        mailboxes=tuple(mailboxes),
        allocator=Allocator(kind=alloc_kind, first_number=first_number, url=alloc_url,
                            token_file=token_file, timeout=alloc_timeout),
        store=Store(url=store_url, keep_messages_days=keep_days, auto_upgrade=auto_upgrade,
                    timeout=store_timeout),
        inbound=Inbound(unknown_tags=unknown_tags),
        limits=Limits(max_message_size=max_size, max_recipients=max_rcpt, max_hops=max_hops,
                      max_connections=max_conn, max_connections_per_client=per_client,
                      idle_timeout=idle_timeout, max_bad_commands=bad_commands),
        logging=Logging(format=log_format, level=log_level),
        admin=Admin(listen=f"{admin_listen[0]}:{admin_listen[1]}" if admin_listen else None,
                    tokens=tuple(tokens)),
        core=core,
        mode=mode,
    )


def _default_hostname() -> str:
    import socket

    return socket.getfqdn() or "localhost"


def config_path(arg: str | None) -> Path:
    """-c, else $SMTPGATE_CONFIG, else /etc/smtpgate/smtpgate.yaml."""
    return Path(arg or os.environ.get("SMTPGATE_CONFIG") or DEFAULT_CONFIG)
