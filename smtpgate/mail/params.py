"""MAIL and RCPT command arguments: the path and the ESMTP parameters, case kept.

aiosmtpd uppercases parameters and refuses the DSN ones; smtpgate parses them
itself so that `ORCPT=rfc822;b@x.example` and `ENVID=` reach the upstream
exactly as the client wrote them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from smtpgate.mail import replies
from smtpgate.mail.replies import SMTPReply

# RFC 5321 4.1.2 esmtp-keyword and esmtp-value (printable ASCII except "=" and SP;
# UTF-8 allowed under SMTPUTF8, RFC 6531 3.3).
_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
_VALUE = re.compile(r"[^\x00-\x20=\x7f]+")
_XTEXT = re.compile(r"(?:[!-*,-<>-~]|\+[0-9A-F]{2})+")
_NOTIFY = {"SUCCESS", "FAILURE", "DELAY"}

# What smtpgate may add to a message beyond the client's declared SIZE (RFC 1870): its
# Received field (at most about 700 octets with the longest HELO and host names), a
# Message-ID, the stamp field, and the tags it puts into header addresses (with a
# 14-octet tag, some 480 of them).
SIZE_MARGIN = 8192


@dataclass(frozen=True)
class Param:
    keyword: str  # uppercased
    value: str | None  # as written

    def __str__(self) -> str:
        return self.keyword if self.value is None else f"{self.keyword}={self.value}"


def split_argument(arg: str | None, keyword: str) -> tuple[str, list[str]] | None:
    """Split "FROM:<path> P1 P2" into ("<path>", ["P1", "P2"]); None when malformed.

    The closing angle bracket is searched for outside quoted strings, so a
    quoted local part holding ">" or a space stays in the path.
    """
    if arg is None or arg[: len(keyword)].upper() != keyword:
        return None
    rest = arg[len(keyword):].lstrip(" ")
    if not rest:
        return None
    if rest.startswith("<"):
        i, quoted = 1, False
        while i < len(rest):
            c = rest[i]
            if quoted and c == "\\":
                i += 2
                continue
            if c == '"':
                quoted = not quoted
            elif c == ">" and not quoted:
                break
            i += 1
        else:
            return None
        path, tail = rest[: i + 1], rest[i + 1:]
        if tail and not tail.startswith(" "):
            return None
        return path, tail.split()
    path, _, tail = rest.partition(" ")
    return path, tail.split()


def parse_params(words: list[str], allowed: set[str]) -> dict[str, Param]:
    """Parse esmtp parameters; SMTPReply for bad syntax or a keyword not in allowed."""
    result: dict[str, Param] = {}
    for word in words:
        key, eq, value = word.partition("=")
        if not _KEYWORD.fullmatch(key) or (eq and not _VALUE.fullmatch(value)):
            raise SMTPReply(replies.BAD_SYNTAX, f"bad parameter {word!r}")
        keyword = key.upper()
        if keyword not in allowed:
            raise SMTPReply(replies.BAD_PARAMETER, f"parameter {keyword} not recognised")
        if keyword in result:
            raise SMTPReply(replies.BAD_SYNTAX, f"parameter {keyword} given twice")
        result[keyword] = Param(keyword, value if eq else None)
    _check_values(result)
    return result


def _check_values(params: dict[str, Param]) -> None:
    def bad(why: str) -> SMTPReply:
        return SMTPReply(replies.BAD_SYNTAX, why)

    for p in params.values():
        v = p.value
        if p.keyword == "SIZE" and not (v and v.isdigit() and len(v) <= 20):
            raise bad("SIZE needs a number")
        if p.keyword == "BODY" and (v or "").upper() not in ("7BIT", "8BITMIME", "BINARYMIME"):
            raise bad("BODY must be 7BIT or 8BITMIME")
        if p.keyword == "BODY" and (v or "").upper() == "BINARYMIME":
            raise SMTPReply(replies.BAD_PARAMETER, "BINARYMIME needs CHUNKING, which smtpgate does not offer")
        if p.keyword == "SMTPUTF8" and v is not None:
            raise bad("SMTPUTF8 takes no value")
        if p.keyword == "RET" and (v or "").upper() not in ("FULL", "HDRS"):
            raise bad("RET must be FULL or HDRS")
        if p.keyword == "ENVID" and not (v and _XTEXT.fullmatch(v) and len(v) <= 100):
            raise bad("ENVID must be xtext of at most 100 characters")
        if p.keyword == "AUTH" and not v:
            raise bad("AUTH needs a value")
        if p.keyword == "NOTIFY":
            items = (v or "").upper().split(",")
            if items != ["NEVER"] and not (set(items) <= _NOTIFY and len(set(items)) == len(items)):
                raise bad("NOTIFY must be NEVER or a list of SUCCESS, FAILURE, DELAY")
        if p.keyword == "ORCPT":
            addr_type, semi, addr = (v or "").partition(";")
            if not semi or not _KEYWORD.fullmatch(addr_type) or not addr:
                raise bad("ORCPT must be addr-type;xtext")


def upstream_size(declared: int, limit: int | None) -> int:
    """The SIZE to declare upstream for a message the client declared `declared` octets:
    with room for what smtpgate adds, so a strict upstream takes the longer message;
    never more than the upstream's `limit` (its EHLO SIZE) when the client's figure fits
    under it, so the room alone never turns a message away at MAIL."""
    padded = declared + SIZE_MARGIN
    if limit and declared <= limit < padded:
        return limit
    return padded


def xtext(text: str) -> str:
    """RFC 3461 4 xtext encoding, for an ORCPT smtpgate adds itself."""
    out = []
    for ch in text:
        if "!" <= ch <= "~" and ch not in "+=":
            out.append(ch)
        else:
            out.extend(f"+{b:02X}" for b in ch.encode("utf-8"))
    return "".join(out)
