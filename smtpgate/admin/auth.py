"""Who is asking, and what they may see (docs/operations.md, "Permissions" and "Single sign-on").

Three ways in, tried in this order:

- **a trusted proxy** (`admin.trusted_proxy`): a request from one of its
  networks that carries the user header is that person; the groups header
  (comma-separated) maps to teams through `admin.teams`, several teams giving
  the union of what each sees, the `admin` team everything. The same headers
  from any other address are ignored.
- **a bearer token** (`admin.tokens`): the token file holds the token or
  `sha256:<hex>` of it; tokens are kept only as SHA-256 digests and compared
  in constant time; they are never logged.
- **a session cookie** set by the sign-in form: an opaque random id whose
  SHA-256 the store keeps with the token's team (smtpgate/admin/sessions.py).

A team sees everything of the activities its own mailboxes own and the
header information of the others; `admin` sees everything.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from smtpgate.config import Admin, checks
from smtpgate.log import get_logger

ADMIN_TEAM = "admin"
HASH_PREFIX = "sha256:"

log = get_logger()


@dataclass(frozen=True)
class Grant:
    """Who a request is, and as which teams it sees.

    via: "proxy" (a person the trusted proxy named), "token" (a bearer token)
    or "session" (the sign-in cookie). person: the proxy's user, else None.
    token: the hex SHA-256 of the token a token or session grant came from.
    """

    teams: frozenset[str]
    via: str
    person: str | None = None
    token: str | None = None

    @property
    def is_admin(self) -> bool:
        return ADMIN_TEAM in self.teams

    @property
    def team(self) -> str:
        """The teams as one readable name: `Team A (UK)`, `Team A (UK), Team B (Poland)`."""
        return ", ".join(sorted(self.teams))

    @property
    def who(self) -> str:
        """What the page's header says: the person and their teams, or the token's team."""
        return f"{self.person} ({self.team})" if self.person else self.team

    def sees_messages(self, owner_mailbox: str | None, teams: Mapping[str, str]) -> bool:
        """True when this grant may see the message list of an activity owned by owner_mailbox."""
        if self.is_admin:
            return True
        return owner_mailbox is not None and teams.get(owner_mailbox) in self.teams

    def own_mailboxes(self, teams: Mapping[str, str]) -> list[str] | None:
        """The mailboxes whose activities this grant sees in full; None: every one (admin)."""
        if self.is_admin:
            return None
        return sorted(mailbox for mailbox, team in teams.items() if team in self.teams)


def token_digest(token: str) -> bytes:
    # Equal-length digests: compare_digest then leaks nothing about a token's length either.
    return hashlib.sha256(token.encode("utf-8", errors="surrogateescape")).digest()


def _file_digest(text: str) -> bytes:
    """The digest a token file stands for: its `sha256:<hex>`, or the hash of the token in it."""
    if text[: len(HASH_PREFIX)].lower() == HASH_PREFIX:
        return bytes.fromhex(text[len(HASH_PREFIX):])  # 64 hex digits: checked by the config loader
    return token_digest(text)


class Tokens:
    """The token table of one configuration snapshot."""

    def __init__(self, entries: list[tuple[bytes, str]]):
        self._entries = entries

    @classmethod
    def load(cls, admin: Admin) -> Tokens:
        """Read every `admin.tokens` file; an unreadable, empty or malformed one is logged and skipped."""
        entries = []
        for entry in admin.tokens:
            try:
                text = entry.token_file.read_text(encoding="utf-8").strip()
                if not text:
                    raise ValueError("the file is empty")
                digest = _file_digest(text)
                if len(digest) != 32:
                    raise ValueError("sha256: needs 64 hex digits")
            except (OSError, UnicodeDecodeError) as exc:
                log.error("admin.token_unusable", team=entry.team, file=str(entry.token_file),
                          reason=type(exc).__name__)
                continue
            except ValueError as exc:
                log.error("admin.token_unusable", team=entry.team, file=str(entry.token_file), reason=str(exc))
                continue
            entries.append((digest, entry.team))
        return cls(entries)

    def identify(self, presented: str | None) -> Grant | None:
        """The grant of a presented token, None when it is missing or matches no configured token."""
        if not presented:
            return None
        return self.by_digest(token_digest(presented), via="token")

    def by_digest(self, digest: bytes, *, via: str) -> Grant | None:
        """The grant of the token with this SHA-256 digest (a session's), None when none is configured now."""
        found = None
        for known, team in self._entries:
            # Every entry is compared, so the time taken does not tell which one matched.
            if hmac.compare_digest(known, digest) and found is None:
                found = team
        return Grant(frozenset({found}), via=via, token=digest.hex()) if found is not None else None


class ProxyRefusal(Exception):
    """A trusted proxy's request that names nobody usable: 400 (ambiguous headers) or 403 (no team)."""

    def __init__(self, status: int, reason: str, person: str | None = None, groups: tuple[str, ...] = ()):
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.person = person
        self.groups = groups


def _fold(group: str) -> str:
    return " ".join(group.split()).casefold()


class SignOn:
    """`admin.trusted_proxy` and `admin.teams` of one configuration snapshot."""

    def __init__(self, admin: Admin):
        proxy = admin.trusted_proxy
        self.networks = proxy.networks if proxy else ()
        self.user_header = proxy.user_header if proxy else None
        self.groups_header = proxy.groups_header if proxy else None
        self._teams: dict[str, set[str]] = {}
        for entry in admin.teams:
            for group in entry.groups:
                self._teams.setdefault(_fold(group), set()).add(entry.team)

    def trusts(self, peer: str | None) -> bool:
        """True when a request from peer may carry identity headers."""
        return bool(peer) and checks.holds_address(self.networks, peer)

    def names_someone(self, headers) -> bool:
        return self.user_header is not None and self.user_header in headers

    def identify(self, headers) -> Grant:
        """The person a trusted request names; raises ProxyRefusal when the headers are
        ambiguous (given twice, empty) or the person's groups map to no team."""
        assert self.user_header is not None and self.groups_header is not None
        users = headers.getall(self.user_header, [])
        if len(users) != 1:
            raise ProxyRefusal(400, f"{self.user_header} given {len(users)} times")
        person = users[0].strip()
        if not person:
            raise ProxyRefusal(400, f"{self.user_header} is empty")
        values = headers.getall(self.groups_header, [])
        if len(values) > 1:
            raise ProxyRefusal(400, f"{self.groups_header} given {len(values)} times", person)
        groups = tuple(g for g in (" ".join(part.split()) for part in (values[0] if values else "").split(","))
                       if g)
        teams = self.teams_of(groups)
        if not teams:
            raise ProxyRefusal(403, "no team for these groups", person, groups)
        return Grant(frozenset(teams), via="proxy", person=person)

    def teams_of(self, groups: Iterable[str]) -> set[str]:
        """Every team one of groups maps to (ignoring case and spacing)."""
        teams: set[str] = set()
        for group in groups:
            teams |= self._teams.get(_fold(group), set())
        return teams
