"""references and mailboxes: what the linking core reads references by, and the work-management mailboxes."""

from __future__ import annotations

from typing import Literal

from smtpgate.config.fields import Pattern, Template, Text
from smtpgate.config.rules import Problem, Section, refuse
from smtpgate.linking.references import DEFAULT_PATTERN
from smtpgate.mail.addresses import AddressError, parse_mailbox


class References(Section):
    pattern: Pattern = DEFAULT_PATTERN
    headers: tuple[Text, ...] = ("X-Enate-Reference",)
    subject: bool = True


class Mailbox(Section):
    """A work-management mailbox; `address` is its canonical base address once loaded."""

    address: Text
    team: Text
    new_links: Literal["create", "never"] = "create"
    new_reference: Template = "{n}-T"


def canonical_mailboxes(mailboxes: tuple[Mailbox, ...], separator: str,
                         internal: tuple[str, ...] | None) -> tuple[Mailbox, ...]:
    """Each untagged, once, in an internal domain; addresses canonical."""
    found, problems = [], []
    for i, mailbox in enumerate(mailboxes):
        try:
            address = parse_mailbox(mailbox.address, separator).canonical
        except AddressError as exc:
            problems.append(Problem((i, "address"), f'not a mailbox address: "{mailbox.address}": {exc}'))
            continue
        if any(other.address == address for other in found):
            problems.append(Problem((i, "address"), f"duplicate mailbox {address}"))
            continue
        if internal is not None and address.rsplit("@", 1)[1] not in internal:
            problems.append(Problem((i, "address"), f"{address} is not in internal_domains"))
        found.append(mailbox.model_copy(update={"address": address}))
    refuse(problems)
    return tuple(found)
