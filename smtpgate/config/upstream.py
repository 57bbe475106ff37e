"""upstream: where smtpgate relays to, how it logs in there (password or XOAUTH2) and how long it waits."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, PrivateAttr, ValidationInfo, field_validator, model_validator

from smtpgate.config import checks
from smtpgate.config.fields import (
    Count, HttpUrl, PositiveCount, PositiveSeconds, ReadableFile, Resolver, Text, UpstreamTarget, UpstreamUrl,
    upstream_target,
)
from smtpgate.config.rules import Problem, Section, refuse


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
        return checks.read_secret(self.client_secret_file)


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
        return checks.read_secret(self.password_file)
