"""The linked-activities views of `smtpgate links show|list|export` (docs/reference.md)
and of the admin API (docs/operations.md), which serve the same objects.

Pure formatting: the store supplies ActivityView, LinkRow and ActivityRow
values, the config supplies the mailbox -> team mapping. `show_object` is
the one builder of the `links show --json` object, for every front end that
shows an activity.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime

from smtpgate.store.base import ActivityView, LinkRow, from_iso, iso_utc
from smtpgate.store.transfer import Backup, export_object

__all__ = ["format_export", "format_list", "format_show", "iso_utc", "parse_since", "show_object"]


def parse_since(text: str) -> datetime:
    """`--since DATE`: `YYYY-MM-DD` (midnight UTC) or an ISO 8601 date-time
    (UTC when it has no offset). Raises ValueError for anything else."""
    return from_iso(text)


def _team(teams: Mapping[str, str], mailbox: str | None) -> str | None:
    return teams.get(mailbox) if mailbox else None


def show_object(view: ActivityView, teams: Mapping[str, str], *, messages: bool = True) -> dict:
    """The `links show --json` object; without messages, the
    header information only (no "messages" key), as another team may see it."""
    shown = {
        "reference": view.reference,
        "mailbox": view.mailbox,
        "team": _team(teams, view.mailbox),
        "links": [
            {
                "reference": link.reference,
                "mailbox": link.mailbox,
                "team": _team(teams, link.mailbox),
                "created_at": iso_utc(link.created_at),
            }
            for link in view.links
        ],
    }
    if messages:
        shown["messages"] = [
            {
                "message_id": message.message_id,
                "date": message.date,
                "from": message.from_,
                "subject": message.subject,
                "recipients": list(message.recipients),
            }
            # inbound sharing: the recipients smtpgate added to the envelope (README "Inbound sharing")
            | ({"shared": list(message.shared)} if message.shared else {})
            for message in view.messages
        ]
    return shown


def _list_object(row: LinkRow, teams: Mapping[str, str]) -> dict:
    return {
        "source": {
            "reference": row.source_reference,
            "mailbox": row.source_mailbox,
            "team": _team(teams, row.source_mailbox),
        },
        "target": {
            "reference": row.target_reference,
            "mailbox": row.target_mailbox,
            "team": _team(teams, row.target_mailbox),
        },
        "created_at": iso_utc(row.created_at),
        "message_id": row.message_id,
    }


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], indent: str = "") -> list[str]:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    lines = []
    for row in (header, *rows):
        cells = [str(cell).ljust(width) for cell, width in zip(row, widths)]
        lines.append((indent + "  ".join(cells)).rstrip())
    return lines


def _or_dash(value: str | None) -> str:
    return value if value else "-"


def format_show(view: ActivityView, teams: Mapping[str, str], as_json: bool) -> str:
    """`links show`: one JSON object, or a readable report."""
    if as_json:
        return json.dumps(show_object(view, teams), ensure_ascii=False)
    team = _team(teams, view.mailbox)
    owner = _or_dash(view.mailbox) + (f" ({team})" if team else "")
    lines = [f"{view.reference}  {owner}", ""]
    if view.links:
        lines.append("Linked activities:")
        lines += _table(
            ("REFERENCE", "MAILBOX", "TEAM", "CREATED"),
            [
                (
                    link.reference,
                    _or_dash(link.mailbox),
                    _or_dash(_team(teams, link.mailbox)),
                    iso_utc(link.created_at),
                )
                for link in view.links
            ],
            indent="  ",
        )
    else:
        lines.append("Linked activities: none")
    lines.append("")
    if view.messages:
        lines.append("Messages:")
        for message in view.messages:
            lines.append(f"  {_or_dash(message.date)}  {_or_dash(message.message_id)}")
            lines.append(f"    From:    {_or_dash(message.from_)}")
            lines.append(f"    Subject: {_or_dash(message.subject)}")
            lines.append(f"    To:      {', '.join(message.recipients) or '-'}")
            if message.shared:
                lines.append(f"    Shared:  {', '.join(message.shared)} (added by inbound sharing)")
    else:
        lines.append("Messages: none")
    return "\n".join(lines)


def format_list(rows: Sequence[LinkRow], teams: Mapping[str, str], as_json: bool) -> str:
    """`links list`: a JSON array of links (source and target sides each with
    reference, mailbox, team; created_at; message_id), or a table."""
    if as_json:
        return json.dumps([_list_object(row, teams) for row in rows], ensure_ascii=False)
    if not rows:
        return "No links."
    return "\n".join(
        _table(
            ("CREATED", "SOURCE", "MAILBOX", "TARGET", "MAILBOX", "TEAM"),
            [
                (
                    iso_utc(row.created_at),
                    row.source_reference,
                    _or_dash(row.source_mailbox),
                    row.target_reference,
                    _or_dash(row.target_mailbox),
                    _or_dash(_team(teams, row.target_mailbox)),
                )
                for row in rows
            ],
        )
    )


def format_export(backup: Backup, teams: Mapping[str, str], exported_at: datetime) -> str:
    """`links export --json`: one JSON object with the store's schema version, every activity
    (reference, mailbox, team, created_at), every link (as `links list --json` gives it) and,
    when exported with them, the message records (smtpgate.store.transfer)."""
    return json.dumps(export_object(backup, teams, exported_at), ensure_ascii=False, indent=1)
