"""YAML pieces the tests' configs share."""

# The two teams of the mission's first step (DESIGN.md): Team A's mailbox sends, Team B's is linked.
TEAMS_A_B = """\
internal_domains: [corp.example]
mailboxes:
  - address: uk-payroll@corp.example
    team: Team A (UK)
  - address: pl-payroll@corp.example
    team: Team B (Poland)
"""
