"""A real smtpgate with its admin listener, team tokens and one linked activity pair.

`admin_relay` starts smtpgate relaying to the sink with `admin.listen` on a
free loopback port and three token files (Team A, Team B, admin), then sends
the mission's first message through SMTP so the store holds 101203-T (Team A)
linked to a new Team B activity, with one message record on each.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass

import pytest

from tests.support.sink import Sink
from tests.support.smtp import send

TEAM_A = "Team A (UK)"
TEAM_B = "Team B (Poland)"
SOURCE = "101203-T"

ADMIN_YAML = """\
admin:
  listen: 127.0.0.1:0
  tokens:
    - team: Team A (UK)
      token_file: team-a.token
    - team: Team B (Poland)
      token_file: team-b.token
    - team: admin
      token_file: admin.token
"""

FIRST = (
    b"From: Team A <uk-payroll+101203-T@corp.example>\r\n"
    b"To: Client Ltd <client@supplier.example>\r\n"
    b"Cc: \"Payroll, Poland\" <pl-payroll@corp.example>\r\n"
    b"Subject: Invoice 4411 <b>&amp; co</b>\r\n"
    b"Message-ID: <admin.first@corp.example>\r\n"
    b"Date: Fri, 27 Nov 2026 10:00:00 +0000\r\n"
    b"\r\n"
    b"Dear client,\r\nplease find the invoice.\r\n"
)

_TAGGED_B = re.compile(r"pl-payroll\+(\d+-T)@corp\.example")


@dataclass
class AdminRelay:
    gate: object
    smtp_port: int
    admin_url: str
    sink: Sink
    tokens: dict[str, str]  # team (or "admin") -> token
    linked: str  # Team B's reference linked to SOURCE

    async def send(self, mail_from: str, rcpts: list[str], data: bytes):
        return await send("127.0.0.1", self.smtp_port, mail_from=mail_from, rcpt_tos=rcpts, data=data)


def write_tokens(folder) -> dict[str, str]:
    tokens = {TEAM_A: "a-" + secrets.token_urlsafe(24), TEAM_B: "b-" + secrets.token_urlsafe(24),
              "admin": "adm-" + secrets.token_urlsafe(24)}
    for team, name in ((TEAM_A, "team-a.token"), (TEAM_B, "team-b.token"), ("admin", "admin.token")):
        (folder / name).write_text(tokens[team] + "\n", encoding="utf-8")
    return tokens


# Single sign-on: the proxy is 127.0.0.2 (tests bind their client there), Team B's token file
# holds the token's SHA-256 rather than the token.
SIGN_ON_YAML = ADMIN_YAML + """\
  trusted_proxy:
    networks: [127.0.0.2/32]
  teams:
    - team: Team A (UK)
      groups: [uk-payroll-agents]
    - team: Team B (Poland)
      groups: [pl-payroll-agents, Payroll Leads]
    - team: admin
      groups: [mail-admins]
"""


def hash_token_file(path) -> None:
    """Replace the token in a token file by `sha256:<hex>` of it."""
    token = path.read_text(encoding="utf-8").strip()
    path.write_text("sha256:" + hashlib.sha256(token.encode()).hexdigest() + "\n", encoding="utf-8")


async def start_admin_relay(sink, config_for, start_gate, tmp_path, extra: str = ADMIN_YAML,
                            store: str | None = None, scheme: str = "http") -> AdminRelay:
    """smtpgate with an admin listener (extra: the admin YAML), filled by the first message."""
    tokens = write_tokens(tmp_path)
    if "trusted_proxy" in extra:
        hash_token_file(tmp_path / "team-b.token")
    gate, port = await start_gate(config_for(f"smtp://127.0.0.1:{sink.port}", extra, store=store))
    host, admin_port = gate.admin.bound[0]
    result = await send("127.0.0.1", port, mail_from=f"uk-payroll+{SOURCE}@corp.example",
                        rcpt_tos=["client@supplier.example", "pl-payroll@corp.example"], data=FIRST)
    assert result.data is not None and result.data[0] == 250, result
    [linked] = [m.group(1) for r in sink.messages[-1].rcpt_tos if (m := _TAGGED_B.fullmatch(r))]
    return AdminRelay(gate=gate, smtp_port=port, admin_url=f"{scheme}://{host}:{admin_port}", sink=sink,
                      tokens=tokens, linked=linked)


@pytest.fixture
async def admin_relay(sink, config_for, start_gate, log_lines, tmp_path) -> AdminRelay:
    return await start_admin_relay(sink, config_for, start_gate, tmp_path)


@pytest.fixture
async def sign_on_relay(sink, config_for, start_gate, log_lines, tmp_path) -> AdminRelay:
    """admin_relay with single sign-on from 127.0.0.2 and Team B's token file hashed."""
    return await start_admin_relay(sink, config_for, start_gate, tmp_path, SIGN_ON_YAML)
