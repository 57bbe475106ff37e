"""The declared converters of the configuration schema, each named once.

A converter turns one YAML value into what smtpgate uses, or raises with the
words of the problem: ValueError("...") for a value of the right type that is
wrong, PydanticCustomError("string_type") for a value of the wrong type (the
message then says what was found, see source.py). Relative paths are resolved
against the config file's folder, passed as the validation context's base_dir.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, PlainValidator, ValidationInfo
from pydantic_core import PydanticCustomError

from smtpgate.config import checks
from smtpgate.mail.addresses import AddressError, check_separator, normalize_domain
from smtpgate.redact import redact_url

__all__ = [
    "CipherString", "Count", "Domain", "HostPort", "HttpUrl", "Mode", "Network",
    "PositiveCount", "PositiveSeconds", "ReadableFile", "Resolver", "Seconds",
    "Separator", "SpoolDir", "StoreUrl", "Template", "Text", "UpstreamTarget", "UpstreamUrl", "UsersFile",
    "Pattern", "join_hostport", "parse_hostport", "upstream_target", "CertName", "HeaderName",
]


def _text(value: Any) -> str:
    """A string. (A number, true/false or a date where text is expected is passed
    again as written in the file, by source.py: a team called 2024 or yes.)"""
    if isinstance(value, str):
        return value
    raise PydanticCustomError("string_type", "expected a string")


def _converter(convert, *, with_base_dir: bool = False) -> PlainValidator:
    """A validator that reads a string and passes it to convert(text), or to
    convert(text, base_dir) for a value that holds a relative path."""
    def validate(value: Any, info: ValidationInfo):
        text = _text(value)
        return convert(text, _base_dir(info)) if with_base_dir else convert(text)

    return PlainValidator(validate)


def _base_dir(info: ValidationInfo) -> Path:
    context = info.context or {}
    return Path(context.get("base_dir") or Path.cwd())


Text = Annotated[str, PlainValidator(_text)]
Count = Annotated[int, Field(ge=0)]
PositiveCount = Annotated[int, Field(ge=1)]
Seconds = Annotated[float, Field(ge=0)]
PositiveSeconds = Annotated[float, Field(gt=0)]
Mode = Literal["enforce", "observe"]


# --- paths


def _path(value: Any, info: ValidationInfo) -> Path:
    if isinstance(value, Path):
        return value
    return (_base_dir(info) / os.path.expanduser(_text(value))).resolve()


ReadableFile = Annotated[Path, PlainValidator(lambda v, info: checks.readable(_path(v, info)))]
UsersFile = Annotated[Path, PlainValidator(lambda v, info: checks.users_file(_path(v, info)))]


def _spool_dir(value: Any, info: ValidationInfo) -> Path | None:
    """"" (the system's temporary folder: None) or a folder smtpgate may write to."""
    if _text(value) == "":
        return None
    return checks.writable_dir(_path(value, info))


SpoolDir = Annotated[Path | None, PlainValidator(_spool_dir)]


# --- networks and addresses


def _network(text: str):
    try:
        network = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError(f'not a network: "{text}"') from None
    given = text.split("/", 1)[0]
    if "/" in text and ipaddress.ip_address(given) != network.network_address:
        # 10.1.2.3/8 would silently mean all of 10.0.0.0/8.
        raise ValueError(f'"{text}" has host bits set: write {network} for the whole network, '
                         f'or {given}/{network.max_prefixlen} for that one host')
    return network


def _domain(text: str) -> str:
    try:
        return normalize_domain(text)
    except AddressError as exc:
        raise ValueError(f'not a domain: "{text}" ({exc})') from None


def _separator(text: str) -> str:
    try:
        return check_separator(text)
    except AddressError as exc:
        raise ValueError(str(exc)) from None


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


def join_hostport(host: str, port: int) -> str:
    """The inverse of parse_hostport: an IPv6 address keeps its brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _hostport(text: str) -> str:
    parsed = parse_hostport(text)
    if parsed is None:
        raise ValueError(f'expected host:port (or [v6]:port), got "{text}"')
    return join_hostport(*parsed)


def _resolver(text: str) -> str:
    """A DNS server as "ip" or "ip:port" ("[v6]:port"); returned as "ip:port"."""
    parsed = parse_hostport(text)
    host, port = parsed if parsed is not None else (text.strip(), 53)
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"expected a DNS server's IP address, optionally with :port, got \"{text}\"") from None
    if port == 0:
        raise ValueError(f'port 0 is not a DNS server\'s port, got "{text}"')
    return join_hostport(str(address), port)


# --- connector mode: client certificate names, header field names (docs/connectors.md)

_CERT_NAME = re.compile(r"(\*\.)?[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*")
_FIELD_NAME = re.compile(r"[\x21-\x39\x3b-\x7e]{1,76}")  # RFC 5322 ftext


def _cert_name(text: str) -> str:
    """A DNS name a client certificate may carry, lower case; "*." first stands for one label."""
    name = text.strip().lower().rstrip(".")
    if len(name) > 253 or not _CERT_NAME.fullmatch(name):
        raise ValueError(f'expected a DNS name ("*." may stand for its first label), got "{text}"')
    return name


def _header_name(text: str) -> str:
    if not _FIELD_NAME.fullmatch(text):
        raise ValueError(f'not a header field name: "{text}"')
    return text


Network = Annotated[ipaddress.IPv4Network | ipaddress.IPv6Network, _converter(_network)]
CertName = Annotated[str, _converter(_cert_name)]
HeaderName = Annotated[str, _converter(_header_name)]
Domain = Annotated[str, _converter(_domain)]
Separator = Annotated[str, _converter(_separator)]
HostPort = Annotated[str, _converter(_hostport)]
Resolver = Annotated[str, _converter(_resolver)]


# --- patterns and templates


def _pattern(text: str) -> str:
    try:
        compiled = re.compile(text)
    except re.error as exc:
        raise ValueError(f"not a regular expression: {exc}") from None
    if compiled.match(""):
        raise ValueError("must not match the empty string")
    return text


def _template(text: str) -> str:
    try:
        text.format(n=1)
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(f'expected a template using only {{n}}, got "{text}" ({exc})') from None
    if "{n" not in text:
        raise ValueError(f'template must contain {{n}}, got "{text}"')
    return text


Pattern = Annotated[str, _converter(_pattern)]
Template = Annotated[str, _converter(_template)]
CipherString = Annotated[str, _converter(checks.cipher_string)]


# --- URLs


def _http_url(text: str) -> str:
    """An http(s) URL to send a secret to: https, or http only on loopback."""
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f'expected an http(s) URL, got "{text}"')
    if parts.scheme == "http" and not _is_loopback(parts.hostname or ""):
        raise ValueError("the client secret is sent to the token endpoint: use https (http only on loopback)")
    return text


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _store_url(text: str) -> str:
    if not re.match(r"^(sqlite:.+|postgres(ql)?://.*)$", text):
        raise ValueError(f'expected sqlite:PATH or postgresql://..., got "{redact_url(text)}"')
    return text


_UPSTREAM_PORTS = {"smtp": 25, "smtp+starttls": 587, "smtps": 465}


@dataclass(frozen=True)
class UpstreamTarget:
    """Where upstream.url points."""

    scheme: str  # smtp | smtp+starttls | smtps | mx | maildir
    host: str | None = None
    port: int | None = None
    path: Path | None = None  # maildir
    mx_domain: str | None = None


def upstream_target(url: str, base_dir: Path) -> UpstreamTarget:
    """The parts of upstream.url: smtp://, smtp+starttls://, smtps://, mx: or maildir:."""
    if url.startswith("maildir:"):
        if not url[len("maildir:"):]:
            raise ValueError("maildir: needs a folder, e.g. maildir:var/outbox")
        return UpstreamTarget("maildir", path=(base_dir / url[len("maildir:"):]).resolve())
    if url.startswith("mx:"):
        return _mx_target(url)
    parts = urlsplit(url)
    if parts.scheme not in _UPSTREAM_PORTS or not parts.hostname:
        raise ValueError("expected smtp://host:port, smtp+starttls://host:port, smtps://host:port, "
                         f'mx:domain or maildir:path, got "{url}"')
    if parts.username or parts.password:
        raise ValueError("credentials go in username and password_file, not the URL")
    try:
        port = parts.port or _UPSTREAM_PORTS[parts.scheme]
    except ValueError:
        raise ValueError(f'bad port in "{url}"') from None
    return UpstreamTarget(parts.scheme, host=parts.hostname, port=port)


def _mx_target(url: str) -> UpstreamTarget:
    """mx:corp.example, or mx:corp.example:2525 (a port for labs and tests)."""
    domain, sep, port = url[3:].rpartition(":")
    if not sep:
        domain, port = url[3:], "25"
    try:
        mx_domain = normalize_domain(domain)
    except AddressError:
        raise ValueError(f'mx: needs a domain, e.g. mx:corp.example, got "{url}"') from None
    if not (port.isdigit() and 0 < int(port) < 65536):
        raise ValueError(f'bad port in "{url}"')
    return UpstreamTarget("mx", port=int(port), mx_domain=mx_domain)


HttpUrl = Annotated[str, _converter(_http_url)]
StoreUrl = Annotated[str, _converter(_store_url)]
UpstreamUrl = Annotated[str, _converter(lambda text, base_dir: upstream_target(text, base_dir) and text,
                                        with_base_dir=True)]
