"""YAML pieces the tests' configs share."""

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
