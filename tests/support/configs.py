"""YAML pieces the tests' configs share."""

from pathlib import Path

from smtpgate.users import add_user
from tests.support.sink import make_test_cert

# The two teams of the mission's first step: Team A's mailbox sends, Team B's is linked.
TEAMS_A_B = """\
internal_domains: [corp.example]
mailboxes:
  - address: uk-payroll@corp.example
    team: Team A (UK)
  - address: pl-payroll@corp.example
    team: Team B (Poland)
"""

# One submission listener on 127.0.0.1:{port}, relaying for loopback clients.
SUBMISSION = """\
listeners:
  - name: submission
    address: 127.0.0.1:{port}
    relay_networks: [127.0.0.0/8]
"""


# A config with its upstream section open: HEAD + the upstream's keys (indented) + TAIL.
# Line numbers: 1 listeners, 2 name, 3 address, 4 relay_networks, 5 upstream, 6 the first key.
UPSTREAM_HEAD = """\
listeners:
  - name: submission
    address: 127.0.0.1:2525
    relay_networks: [127.0.0.0/8]
upstream:
"""
UPSTREAM_TAIL = "internal_domains: [corp.example]\n"

# The upstream keys of Microsoft 365 with OAuth2 (the client secret in oauth.secret).
XOAUTH2 = """\
  url: smtp+starttls://smtp.office365.com:587
  auth: xoauth2
  username: relay@corp.example
  oauth2:
    token_url: https://login.microsoftonline.com/0f1e2d3c/oauth2/v2.0/token
    client_id: 6a1b2c3d
    client_secret_file: oauth.secret
"""


def tls_auth_yaml(folder: Path, sink_port: int, auth: str, networks: str = "[127.0.0.1/32]", port: int = 0) -> str:
    """A config: a STARTTLS listener on 127.0.0.1:port with `auth` and `relay_networks: networks`, the user
    jane with "s3cret pass" in folder/users, an upstream at sink_port, a SQLite store. The listener's
    certificate, its own CA, is folder/tls/test-cert.pem."""
    cert, key = make_test_cert(folder / "tls")
    add_user(folder / "users", "jane", "s3cret pass")
    return f"""\
hostname: relay.test.example
listeners:
  - name: submission
    address: 127.0.0.1:{port}
    tls: starttls
    tls_cert: {cert}
    tls_key: {key}
    auth: {auth}
    relay_networks: {networks}
users_file: users
upstream:
  url: smtp://127.0.0.1:{sink_port}
internal_domains: [corp.example]
store:
  url: sqlite:smtpgate.db
  auto_upgrade: true
"""
