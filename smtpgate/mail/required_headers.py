"""A listener's `required_headers`: the connector tenant guard (docs/connectors.md).

Exchange Online's outbound certificate and addresses are shared by every
tenant, so a certificate name alone cannot tell this organisation's mail from
another tenant's. The field Exchange stamps with the sending tenant
(`X-MS-Exchange-CrossTenant-Id`) can: a message whose header block lacks a
required field, carries another value, or carries the field more than once with
different values is refused before any link is looked up.
"""

from __future__ import annotations

from collections.abc import Mapping

from smtpgate.mail.headers import HeaderBlock

__all__ = ["required_header_problem"]


def required_header_problem(block: HeaderBlock, required: Mapping[str, tuple[str, ...]]) -> str | None:
    """None when every required field is present with an accepted value, else why not.

    Values are compared without surrounding white space and without regard to case
    (tenant IDs are GUIDs, which Microsoft writes in either case).
    """
    for name, accepted in required.items():
        values = {v.strip().lower() for v in block.get_all(name)}
        if not values:
            return f"{name}: missing"
        if len(values) > 1:
            return f"{name}: present {len(block.get_all(name))} times with different values"
        if values.pop() not in {a.strip().lower() for a in accepted}:
            return f"{name}: not an accepted value"
    return None
