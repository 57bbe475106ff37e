"""smtpgate as a submission server: a STARTTLS listener and an implicit-TLS listener,
both requiring AUTH, relaying to a sink (tests/support/pki.py issues the certificate)."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import pytest

from smtpgate.config import load_config
from smtpgate.users import add_user
from tests.support.configs import TEAMS_A_B
from tests.support.pki import TestCA
from tests.support.sink import Sink

__all__ = ["PASSWORD", "USER", "Submission", "strict_sink", "submission", "submission_config"]

USER = "jane"
PASSWORD = "s3cret pass"


@dataclass(frozen=True)
class Submission:
    """Where the two listeners are once the gate runs, and the CA that clients trust."""

    cafile: str
    starttls_port: int
    implicit_port: int

    def port(self, security: str) -> int:
        return self.starttls_port if security == "starttls" else self.implicit_port

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.cafile)


def submission_config(folder: Path, sink_port: int, *, hostname: str = "relay.test.example"):
    """(config, cafile): listeners `submission` (STARTTLS) and `smtps` (implicit TLS), each with
    `auth: required` and no relay_networks; one user, USER with PASSWORD; no AUTH slow-down,
    so wrong passwords cost no time; Team A and Team B's mailboxes for linking."""
    ca = TestCA(folder / "pki")
    cert, key = ca.server("localhost")
    add_user(folder / "users", USER, PASSWORD)
    listener = """\
  - name: {name}
    address: 127.0.0.1:0
    tls: {tls}
    tls_cert: {cert}
    tls_key: {key}
    auth: required
    relay_networks: []
"""
    text = (
        f"hostname: {hostname}\nlisteners:\n"
        + listener.format(name="submission", tls="starttls", cert=cert, key=key)
        + listener.format(name="smtps", tls="implicit", cert=cert, key=key)
        + "users_file: users\nlimits:\n  auth_failure_delay: 0\n"
        + f"upstream:\n  url: smtp://127.0.0.1:{sink_port}\n  timeout: 10\n"
        + TEAMS_A_B
        + f"store:\n  url: sqlite:{folder}/smtpgate.db\n  auto_upgrade: true\n"
    )
    path = folder / "smtpgate.yaml"
    path.write_text(text, encoding="utf-8")
    return load_config(path), str(ca.cert)


@pytest.fixture
async def strict_sink():
    """An upstream that refuses a message longer than its declared SIZE."""
    async with Sink(data_size_limit=50_000_000, strict_size=True) as s:
        yield s


@pytest.fixture
async def submission(tmp_path, strict_sink, start_gate) -> Submission:
    """submission_config's gate, started, relaying to strict_sink."""
    config, cafile = submission_config(tmp_path, strict_sink.port)
    gate, _ = await start_gate(config)
    (_, starttls_port), (_, implicit_port) = gate.bound
    return Submission(cafile, starttls_port, implicit_port)
