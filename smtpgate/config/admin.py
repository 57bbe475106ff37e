"""admin: the admin listener, its tokens, HTTPS (tls_cert / tls_key), and single sign-on through a
trusted proxy with its teams (docs/operations.md, "Single sign-on")."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import field_validator, model_validator

from smtpgate.config.fields import HeaderName, HostPort, Network, ReadableFile, Text
from smtpgate.config.rules import Problem, Section, pem_pair_problems, refuse


class AdminToken(Section):
    team: Text  # a team of mailboxes:, or admin
    token_file: ReadableFile  # not empty: checked with the team, by Config



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
            problems += pem_pair_problems(self.tls_cert, self.tls_key)
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
