"""listeners: the SMTP and milter listeners, their TLS, relay networks and connector mode."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import ValidationInfo, field_validator, model_validator

from smtpgate.config import checks
from smtpgate.config.fields import CertName, CipherString, HeaderName, Mode, Network, ReadableFile, Text, parse_hostport
from smtpgate.config.rules import Problem, Section, pem_pair_problems, refuse


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
        return pem_pair_problems(self.tls_cert, self.tls_key)

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
        return checks.holds_address(self.relay_networks, ip)
