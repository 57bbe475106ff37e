"""Mail addresses: RFC 5321 paths, RFC 5322 address lists, plus tags.

One tokenizer serves both the envelope and the header side, so an address is
located the same way wherever it appears. Parsing never decodes RFC 2047
encoded words: an encoded display name is an opaque atom, which is what keeps
an encoded comma or CR/LF from being read as syntax.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Callable, NamedTuple

import idna

__all__ = [
    "Address",
    "AddressError",
    "HeaderMailbox",
    "SEPARATORS",
    "check_separator",
    "join_tag",
    "locate_addresses",
    "normalize_domain",
    "parse_address_list",
    "parse_mailbox",
    "parse_path",
    "split_tag",
]

MAX_LOCAL_OCTETS = 64  # RFC 5321 4.5.3.1.1
MAX_DOMAIN_OCTETS = 253  # 255 on the wire, minus the root label's length octets
MAX_PATH_OCTETS = 254  # RFC 5321 4.5.3.1.3: 256 for the path including < and >

# Local parts the relay must never split, whatever the separator (RFC 5321 4.5.1).
UNSPLITTABLE = frozenset({"postmaster", "mailer-daemon"})

_ATEXT_CLASS = r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~\x80-\U0010ffff]"
_DOT_ATOM = re.compile(rf"{_ATEXT_CLASS}+(?:\.{_ATEXT_CLASS}+)*")
_LDH_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")
_WSP = frozenset(" \t\r\n")
# The tokens one regular expression finds: a run of white space (group 1), a run
# of atext (RFC 5322 3.2.3, 8-bit included) or "." (group 2), one special character (3).
_SIMPLE_TOKEN = re.compile(r"([ \t\r\n]+)|([A-Za-z0-9!#$%&'*+\-/=?^_`{|}~.\x80-\U0010ffff]+)|([<>@,;:])")
# Bound on the hops followed inside one local part (each hop shortens it anyway).
_HOPS_LIMIT = 32


class AddressError(ValueError):
    """An address, path or address list that smtpgate refuses to interpret."""


def _is_control(ch: str) -> bool:
    return ch < " " and ch not in _WSP or ch == "\x7f"


class _Token(NamedTuple):
    kind: str  # "atom", "qstr", "lit", "comment", "ws", or the special character itself
    text: str
    start: int
    end: int


def _tokenize(s: str) -> list[_Token]:
    """Split ``s`` into RFC 5322 lexical tokens with their offsets.

    Raises AddressError on an unterminated quoted string, comment or domain
    literal, a stray ``)``, ``]`` or backslash, or a control character.
    """
    tokens: list[_Token] = []
    i, n = 0, len(s)
    simple = _SIMPLE_TOKEN.match
    while i < n:
        found = simple(s, i)
        if found is not None:
            text, end = found.group(), found.end()
            kind = found.lastindex
            tokens.append(_Token("ws" if kind == 1 else "atom" if kind == 2 else text, text, i, end))
            i = end
            continue
        ch = s[i]
        start = i
        if ch == '"':
            i = _scan_quoted(s, i + 1, '"')
            tokens.append(_Token("qstr", s[start:i], start, i))
        elif ch == "(":
            i = _scan_comment(s, i + 1)
            tokens.append(_Token("comment", s[start:i], start, i))
        elif ch == "[":
            i += 1
            while i < n and s[i] != "]":
                if s[i] in "[\\" or _is_control(s[i]):
                    raise AddressError(f"invalid character in domain literal at offset {i}")
                i += 1
            if i == n:
                raise AddressError("unterminated domain literal")
            i += 1
            tokens.append(_Token("lit", s[start:i], start, i))
        else:
            raise AddressError(f"unexpected {ch!r} at offset {i}")
    return tokens


def _scan_quoted(s: str, i: int, close: str) -> int:
    n = len(s)
    while i < n:
        ch = s[i]
        if ch == close:
            return i + 1
        if ch == "\\":
            i += 1
            if i == n:
                break
            ch = s[i]
        if _is_control(ch):
            raise AddressError(f"control character in quoted string at offset {i}")
        i += 1
    raise AddressError("unterminated quoted string")


def _scan_comment(s: str, i: int) -> int:
    depth, n = 1, len(s)
    while i < n:
        ch = s[i]
        if ch == "\\":
            i += 1
            if i == n:
                break
            ch = s[i]
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth == 0:
                return i + 1
        if _is_control(ch):
            raise AddressError(f"control character in comment at offset {i}")
        i += 1
    raise AddressError("unterminated comment")


def _unquote(qstr: str) -> str:
    """The content of a quoted string: quotes removed, quoted pairs resolved."""
    inner = qstr[1:-1]
    return re.sub(r"\\(.)", r"\1", inner, flags=re.DOTALL)


def _addr_spec(local: str, domain: str) -> str:
    """The addr-spec of an unquoted local part and a domain (none for ``postmaster``)."""
    local = _format_local(local)
    return f"{local}@{domain}" if domain else local


def _format_local(local: str) -> str:
    if local and _DOT_ATOM.fullmatch(local):
        return local
    return '"' + local.replace("\\", "\\\\").replace('"', '\\"') + '"'


@lru_cache(maxsize=4096)
def normalize_domain(domain: str) -> str:
    """The lowercase IDNA A-label form of ``domain`` (or the normalised address literal).

    U-labels and A-labels of one domain give the same result. Raises
    AddressError for an empty, over-long or invalid domain.
    """
    if domain.startswith("["):
        return _normalize_literal(domain)
    if not domain or len(domain.encode("utf-8", "surrogatepass")) > 4 * MAX_DOMAIN_OCTETS:
        raise AddressError("empty or over-long domain")
    if not domain.isascii():
        try:
            a_label = idna.encode(domain, uts46=True).decode("ascii")
            # UTS 46 also drops invisible characters and folds look-alikes: refuse those.
            if idna.decode(a_label) != domain.lower():
                raise AddressError(f"domain {domain!r} is not in its normal form")
        except (idna.IDNAError, UnicodeError) as exc:
            raise AddressError(f"invalid internationalised domain: {exc}") from None
        domain = a_label
    domain = domain.lower()
    if len(domain) > MAX_DOMAIN_OCTETS:
        raise AddressError("domain longer than 253 octets")
    for label in domain.split("."):
        if not _LDH_LABEL.fullmatch(label):
            raise AddressError(f"invalid domain label {label!r}")
        if label.startswith("xn--"):
            try:
                idna.decode(label)  # checks the Punycode and the IDNA 2008 rules of its U-label
            except (idna.IDNAError, UnicodeError) as exc:
                raise AddressError(f"invalid A-label {label!r}: {exc}") from None
    return domain


def _normalize_literal(literal: str) -> str:
    body = literal[1:-1] if literal.endswith("]") else ""
    try:
        if body[:5].lower() == "ipv6:":
            return f"[ipv6:{ipaddress.IPv6Address(body[5:]).compressed}]"
        return f"[{ipaddress.IPv4Address(body)}]"
    except ValueError:
        raise AddressError(f"invalid address literal {literal!r}") from None


def _route_hop(local: str) -> tuple[str, str] | None:
    """The (remaining local part, next domain) a source-routing MTA would use, or None."""
    if "@" in local:
        rest, _, hop = local.rpartition("@")
        return rest, hop
    if "!" in local:
        hop, _, rest = local.partition("!")
        return rest, hop
    if "%" in local:
        rest, _, hop = local.rpartition("%")
        return rest, hop
    return None


def _lenient_domain(domain: str) -> str:
    try:
        return normalize_domain(domain)
    except AddressError:
        # Still a value to judge: never equal to a configured domain, so never internal.
        return domain.lower()


@dataclass(frozen=True)
class Address:
    """A mailbox address: ``local`` is the unquoted local part, ``domain`` as written.

    ``domain`` is empty only for the bare ``postmaster`` path of RFC 5321 4.5.1.
    """

    local: str
    domain: str

    def __str__(self) -> str:
        """The addr-spec, with the local part quoted when it is not a dot-atom."""
        # Kept in the instance once made, as cached_property does, without its lock.
        text = self.__dict__.get("_addr_spec")
        if text is None:
            text = self.__dict__["_addr_spec"] = _addr_spec(self.local, self.domain)
        return text

    @cached_property
    def canonical(self) -> str:
        """The comparison key: lowercased local part, lowercase A-label domain."""
        domain = normalize_domain(self.domain) if self.domain else ""
        return _addr_spec(self.local.lower(), domain)

    @cached_property
    def route_domains(self) -> tuple[str, ...]:
        """Every domain the address routes through: its own, then each hop hidden in
        the local part by a quoted ``@``, a bang path (``host!user``) or the ``%``-hack,
        in the order a downstream MTA that honours them would follow."""
        domains = [_lenient_domain(self.domain) if self.domain else ""]
        local = self.local
        for _ in range(_HOPS_LIMIT):
            hop = _route_hop(local)
            if hop is None:
                break
            local, domain = hop
            domains.append(_lenient_domain(domain))
        return tuple(domains)

    @cached_property
    def relay_domain(self) -> str:
        """The domain the relay must judge for open-relay checks.

        The A-label domain for an ordinary address; when the local part hides
        a route (``a%evil@ok``, ``evil!a@ok``, ``"a@evil"@ok``) the first hop
        that leaves the address's own domain. An empty string for ``postmaster``.
        """
        own = self.route_domains[0]
        for domain in self.route_domains[1:]:
            if domain != own:
                return domain
        return own


class HeaderMailbox(NamedTuple):
    """One addr-spec located in a header field value: the address and where it sits."""

    address: Address
    start: int
    end: int


class _Found(NamedTuple):
    local: _Token
    domain: _Token


class _Syntax(Exception):
    """A list element that is not a mailbox or group."""


class _ListParser:
    """Recursive descent over the significant tokens of an RFC 5322 address list."""

    def __init__(self, tokens: list[_Token], lenient: bool) -> None:
        self.toks = [t for t in tokens if t.kind not in ("ws", "comment")]
        self.lenient = lenient
        self.found: list[_Found] = []

    def kind(self, i: int) -> str:
        return self.toks[i].kind if i < len(self.toks) else ""

    def addr_spec(self, i: int) -> int:
        """Parse local "@" domain at ``i`` with no CFWS inside; the index after it, or -1."""
        toks = self.toks
        if i + 2 >= len(toks):
            return -1
        local, at, domain = toks[i], toks[i + 1], toks[i + 2]
        if local.kind not in ("atom", "qstr") or at.kind != "@" or domain.kind not in ("atom", "lit"):
            return -1
        if local.end != at.start or at.end != domain.start:
            return -1
        if local.kind == "atom" and not _DOT_ATOM.fullmatch(local.text):
            return -1
        if domain.kind == "atom" and not _DOT_ATOM.fullmatch(domain.text):
            return -1
        self.found.append(_Found(local, domain))
        return i + 3

    def parse(self) -> None:
        i = 0
        while i < len(self.toks):
            if self.kind(i) == ",":
                i += 1  # obs-addr-list allows empty elements
                continue
            i = self.guarded(i, self.element, ",")

    def guarded(self, i: int, parse: Callable[[int], int], stops: str) -> int:
        mark = len(self.found)
        try:
            return parse(i)
        except _Syntax:
            if not self.lenient:
                raise AddressError("malformed address list") from None
            del self.found[mark:]
            return self.skip(i, stops)

    def skip(self, i: int, stops: str) -> int:
        depth = 0
        while i < len(self.toks):
            kind = self.kind(i)
            if kind == "<":
                depth += 1
            elif kind == ">":
                depth = max(0, depth - 1)
            elif depth == 0 and kind in stops:
                return i
            i += 1
        return i

    def element(self, i: int) -> int:
        end = self.mailbox(i, ",")
        if end >= 0:
            return end
        j = self.phrase(i)
        if self.kind(j) == ":" and j > i:
            return self.group(j + 1)
        raise _Syntax

    def phrase(self, i: int) -> int:
        while self.kind(i) in ("atom", "qstr"):
            i += 1
        return i

    def mailbox(self, i: int, stops: str) -> int:
        """A mailbox (addr-spec or name-addr) ending before one of ``stops``; -1 if none."""
        end = self.addr_spec(i)
        if end >= 0:
            if self.kind(end) in (*stops, ""):
                return end
            self.found.pop()
        j = self.phrase(i)
        if self.kind(j) != "<":
            return -1
        j = self.route(j + 1)
        end = self.addr_spec(j)
        if end < 0 or self.kind(end) != ">":
            raise _Syntax
        if self.kind(end + 1) not in (*stops, ""):
            raise _Syntax
        return end + 1

    def route(self, i: int) -> int:
        """Skip an obs-route (``@a,@b:``) and return the index after it."""
        if self.kind(i) != "@":
            return i
        while self.kind(i) == "@" and self.kind(i + 1) in ("atom", "lit"):
            i += 2
            while self.kind(i) == ",":
                i += 1
        if self.kind(i) != ":":
            raise _Syntax
        return i + 1

    def group(self, i: int) -> int:
        while True:
            kind = self.kind(i)
            if kind == ";" and self.kind(i + 1) in (",", ""):
                return i + 1
            if kind in (";", ""):
                raise _Syntax
            if kind == ",":
                i += 1
                continue
            i = self.guarded(i, self.member, ",;")

    def member(self, i: int) -> int:
        end = self.mailbox(i, ",;")
        if end < 0:
            raise _Syntax
        return end


def _make_address(found: _Found, decode: Callable[[str], str]) -> Address:
    """Validate one located addr-spec; ``decode`` turns token text into characters."""
    local_text = decode(found.local.text)
    if "\r" in local_text or "\n" in local_text:
        # A folded addr-spec is legal but never rewritten: a splice must not touch a line end.
        raise AddressError("line break in local part")
    local = _unquote(local_text) if found.local.kind == "qstr" else local_text
    domain = decode(found.domain.text)
    normalize_domain(domain)
    return Address(local, domain)


def _identity(text: str) -> str:
    return text


def locate_addresses(value: str, decode: Callable[[str], str] = _identity) -> list[HeaderMailbox]:
    """Every valid addr-spec in a header field value, with its offsets in ``value``.

    Lenient: an element that is not a valid mailbox or group is skipped, and a
    value that does not even tokenize yields nothing. ``decode`` maps token
    text to the real characters (the rewriter passes Latin-1 text of raw bytes
    and decodes it as UTF-8 here, so offsets stay byte offsets); it must be a
    pure function, since the result for a (value, decode) pair is kept.
    """
    if len(value) > _KEPT_TEXT_CHARS:
        return list(_locate(value, decode))
    return list(_locate_kept(value, decode))


def _locate(value: str, decode: Callable[[str], str]) -> tuple[HeaderMailbox, ...]:
    try:
        parser = _ListParser(_tokenize(value), lenient=True)
    except AddressError:
        return ()
    parser.parse()
    located = []
    for found in parser.found:
        try:
            address = _make_address(found, decode)
        except (AddressError, UnicodeError):
            continue
        located.append(HeaderMailbox(address, found.local.start, found.domain.end))
    return tuple(located)


def parse_address_list(value: str, *, strict: bool = True) -> list[Address]:
    """The mailboxes of an RFC 5322 address-list (To, Cc, From, Reply-To ...).

    Display names, comments, groups (their members are returned, in order) and
    obsolete routes are understood; RFC 2047 encoded words are never decoded.
    With ``strict`` any malformed element raises AddressError (CVE-2023-27043
    shapes such as ``alice@example.org)<bob@example.com>`` included); without
    it malformed elements are skipped.
    """
    if not strict:
        return [m.address for m in locate_addresses(value)]
    parser = _ListParser(_tokenize(value), lenient=False)
    parser.parse()
    return [_make_address(found, _identity) for found in parser.found]


def parse_path(text: str) -> Address | None:
    """The address of a MAIL FROM or RCPT TO argument (RFC 5321 4.1.2).

    Angle brackets are optional; a source route (``<@a,@b:user@c>``) is
    validated and dropped; ``<>`` (or an empty argument) is the null path and
    gives None; ``<postmaster>`` gives a domainless address. Raises
    AddressError for anything else: comments, white space, control
    characters, a local part over 64 octets, a path over 254 octets.
    """
    if len(text) > _KEPT_TEXT_CHARS:
        return _parse_path(text)
    return _parse_path_kept(text)


def _parse_path(text: str) -> Address | None:
    inner = text
    if text.startswith("<") or text.endswith(">"):
        if not (text.startswith("<") and text.endswith(">") and len(text) >= 2):
            raise AddressError("unbalanced angle brackets")
        inner = text[1:-1]
    if not inner:
        return None
    tokens = _tokenize(inner)
    if any(t.kind in ("ws", "comment", "<", ">") for t in tokens):
        raise AddressError("white space, comment or bracket in path")
    parser = _ListParser(tokens, lenient=False)
    try:
        i = parser.route(0)
    except _Syntax:
        raise AddressError(f"malformed source route: {text!r}") from None
    for token in tokens[:i]:
        if token.kind in ("atom", "lit"):
            normalize_domain(token.text)
    if i == len(tokens) - 1 and tokens[i].kind == "atom" and tokens[i].text.lower() == "postmaster":
        return Address(tokens[i].text, "")
    if parser.addr_spec(i) != len(tokens):
        raise AddressError(f"not a mailbox: {text!r}")
    address = _make_address(parser.found[0], _identity)
    if len(address.local.encode("utf-8", "surrogatepass")) > MAX_LOCAL_OCTETS:
        raise AddressError("local part longer than 64 octets")
    if len(str(address).encode("utf-8", "surrogatepass")) > MAX_PATH_OCTETS:
        raise AddressError("address longer than 254 octets")
    return address


# Header field values and envelope paths recur (a team's mailboxes, the same
# correspondents): their parses are kept, a bounded number of them and only for
# short texts. What is kept is immutable (frozen Address, tuples); an
# AddressError is never kept, so a refused text is parsed again each time.
_KEPT_PARSES = 4096
_KEPT_TEXT_CHARS = 1024
_locate_kept = lru_cache(maxsize=_KEPT_PARSES)(_locate)
_parse_path_kept = lru_cache(maxsize=_KEPT_PARSES)(_parse_path)


def split_tag(local: str, separator: str) -> tuple[str, str | None]:
    """Split an unquoted local part into (base, tag) at the first ``separator``.

    ``a+b+c`` gives ``("a", "b+c")``. The tag is None when there is no
    separator, when the base would be empty, and for ``postmaster`` and
    ``mailer-daemon``. Pass ``Address.local`` (already unquoted), so the
    separator inside ``"a+b"@x`` splits like the one in ``a+b@x``.
    """
    if local.lower() in UNSPLITTABLE:
        return local, None
    base, sep, tag = local.partition(separator)
    if not sep or not base:
        return local, None
    return base, tag


def join_tag(base: str, tag: str, separator: str) -> str | None:
    """``base + separator + tag``, or None when that local part would exceed 64 octets."""
    local = f"{base}{separator}{tag}"
    if len(local.encode("utf-8", "surrogatepass")) > MAX_LOCAL_OCTETS:
        return None
    return local


def envelope_key(address: Address, mailbox: bool = False) -> tuple[str, str]:
    """The key under which two envelope recipients are one (such duplicates are sent once).

    Domains compare case-insensitively and in either IDNA form; local parts are
    case-sensitive (RFC 5321 2.4) except a work-management mailbox's (``mailbox``).
    """
    try:
        domain = normalize_domain(address.domain) if address.domain else ""
    except AddressError:
        domain = address.domain
    return (address.local.lower() if mailbox else address.local, domain)


# The separator must fit in a dot-atom (RFC 5322 3.2.3 atext) and be no letter
# or digit, so it cannot be part of a mailbox name or of a reference.
SEPARATORS = "!#$%&'*+-/=?^_`{|}~"


def check_separator(separator: str) -> str:
    """``separator`` when it is one character of SEPARATORS; AddressError otherwise."""
    if len(separator) != 1 or separator not in SEPARATORS:
        raise AddressError(f"expected one of the characters {' '.join(SEPARATORS)}, got \"{separator}\"")
    return separator


def parse_mailbox(text: str, separator: str) -> Address:
    """A work-management mailbox address as configured: a path with a domain whose
    local part does not contain ``separator`` (a tagged address is a mailbox plus a
    tag, never a mailbox). Raises AddressError saying what is wrong."""
    address = parse_path(text)
    if address is None:
        raise AddressError("the null path is not a mailbox")
    if not address.domain:
        raise AddressError("a mailbox needs a domain")
    if separator in address.local:
        raise AddressError(f"a mailbox address must be untagged (it contains the separator \"{separator}\")")
    return address
