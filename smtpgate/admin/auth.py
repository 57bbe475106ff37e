"""Team permissions of the admin API and pages (docs/operations.md, "Permissions").

`admin.tokens` maps bearer tokens, each read from its own file, to a team
name as written in `mailboxes:` or to `admin`. A team sees everything of the
activities its own mailboxes own and the header information of the others;
`admin` sees everything. Tokens are kept only as SHA-256 digests and
compared in constant time; they are never logged.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass

from smtpgate.config import Admin
from smtpgate.log import get_logger

ADMIN_TEAM = "admin"

log = get_logger()


@dataclass(frozen=True)
class Grant:
    """Who a presented token belongs to: a team name, or `admin`."""

    team: str

    @property
    def is_admin(self) -> bool:
        return self.team == ADMIN_TEAM

    def sees_messages(self, owner_mailbox: str | None, teams: Mapping[str, str]) -> bool:
        """True when this grant may see the message list of an activity owned by owner_mailbox."""
        if self.is_admin:
            return True
        return owner_mailbox is not None and teams.get(owner_mailbox) == self.team


def _digest(token: str) -> bytes:
    # Equal-length digests: compare_digest then leaks nothing about a token's length either.
    return hashlib.sha256(token.encode("utf-8", errors="surrogateescape")).digest()


class Tokens:
    """The token table of one configuration snapshot."""

    def __init__(self, entries: list[tuple[bytes, str]]):
        self._entries = entries

    @classmethod
    def load(cls, admin: Admin) -> Tokens:
        """Read every `admin.tokens` file; an unreadable or empty one is logged and skipped."""
        entries = []
        for entry in admin.tokens:
            try:
                token = entry.token_file.read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as exc:
                log.error("admin.token_unusable", team=entry.team, file=str(entry.token_file),
                          reason=type(exc).__name__)
                continue
            if not token:
                log.error("admin.token_unusable", team=entry.team, file=str(entry.token_file),
                          reason="the file is empty")
                continue
            entries.append((_digest(token), entry.team))
        return cls(entries)

    def identify(self, presented: str | None) -> Grant | None:
        """The grant of a presented token, None when it is missing or matches no configured token."""
        if not presented:
            return None
        digest = _digest(presented)
        found = None
        for known, team in self._entries:
            # Every entry is compared, so the time taken does not tell which one matched.
            if hmac.compare_digest(known, digest) and found is None:
                found = team
        return Grant(found) if found is not None else None
