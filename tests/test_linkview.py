"""`smtpgate links show|list` output."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest

from smtpgate.views import format_list, format_show, iso_utc, parse_since
from smtpgate.store import ActivityView, LinkedActivity, LinkRow, MessageView

TEAMS = {"uk-payroll@corp.example": "Team A (UK)", "pl-payroll@corp.example": "Team B (Poland)"}
WHEN = datetime(2026, 11, 27, 17, 0, 0, 123456, tzinfo=timezone.utc)

VIEW = ActivityView(
    reference="101203-T",
    mailbox="uk-payroll@corp.example",
    links=[LinkedActivity("900001-T", "pl-payroll@corp.example", WHEN, "<m@corp.example>")],
    messages=[
        MessageView(
            message_id="<m@corp.example>",
            date="Fri, 27 Nov 2026 17:00:00 +0000",
            from_="anna@corp.example",
            subject="Payroll 101203-T",
            recipients=["client@supplier.example", "pl-payroll+900001-T@corp.example"],
            source_reference="101203-T",
            relayed_at=WHEN,
        )
    ],
)


def test_show_json_has_exactly_the_contract_shape():
    assert json.loads(format_show(VIEW, TEAMS, as_json=True)) == {
        "reference": "101203-T",
        "mailbox": "uk-payroll@corp.example",
        "team": "Team A (UK)",
        "links": [
            {
                "reference": "900001-T",
                "mailbox": "pl-payroll@corp.example",
                "team": "Team B (Poland)",
                "created_at": "2026-11-27T17:00:00Z",
            }
        ],
        "messages": [
            {
                "message_id": "<m@corp.example>",
                "date": "Fri, 27 Nov 2026 17:00:00 +0000",
                "from": "anna@corp.example",
                "subject": "Payroll 101203-T",
                "recipients": ["client@supplier.example", "pl-payroll+900001-T@corp.example"],
            }
        ],
    }


def test_show_json_with_unknown_owner_and_team_uses_null():
    view = ActivityView("5-T", None, [LinkedActivity("6-T", "x@corp.example", WHEN)], [])
    out = json.loads(format_show(view, TEAMS, as_json=True))
    assert (out["mailbox"], out["team"]) == (None, None)
    assert out["links"][0]["team"] is None
    assert out["messages"] == []


def test_show_table_names_everything():
    text = format_show(VIEW, TEAMS, as_json=False)
    for expected in (
        "101203-T", "Team A (UK)", "900001-T", "pl-payroll@corp.example", "Team B (Poland)",
        "2026-11-27T17:00:00Z", "<m@corp.example>", "Payroll 101203-T",
        "pl-payroll+900001-T@corp.example",
    ):
        assert expected in text
    empty = format_show(ActivityView("5-T", None), TEAMS, as_json=False)
    assert "none" in empty


ROWS = [
    LinkRow("101203-T", "uk-payroll@corp.example", "900001-T", "pl-payroll@corp.example", WHEN, "<m@x>"),
    LinkRow("5-T", None, "6-T", None, WHEN + timedelta(hours=1), None),
]


def test_list_json():
    out = json.loads(format_list(ROWS, TEAMS, as_json=True))
    assert out[0] == {
        "source": {"reference": "101203-T", "mailbox": "uk-payroll@corp.example", "team": "Team A (UK)"},
        "target": {"reference": "900001-T", "mailbox": "pl-payroll@corp.example", "team": "Team B (Poland)"},
        "created_at": "2026-11-27T17:00:00Z",
        "message_id": "<m@x>",
    }
    assert out[1]["created_at"] == "2026-11-27T18:00:00Z"
    assert out[1]["source"]["mailbox"] is None
    assert json.loads(format_list([], TEAMS, as_json=True)) == []


def test_list_table():
    lines = format_list(ROWS, TEAMS, as_json=False).splitlines()
    assert lines[0].split() == ["CREATED", "SOURCE", "MAILBOX", "TARGET", "MAILBOX", "TEAM"]
    assert lines[1].split()[:5] == [
        "2026-11-27T17:00:00Z", "101203-T", "uk-payroll@corp.example", "900001-T", "pl-payroll@corp.example",
    ]
    assert format_list([], TEAMS, as_json=False) == "No links."


def test_iso_utc_converts_to_utc():
    plus_one = timezone(timedelta(hours=1))
    assert iso_utc(datetime(2026, 1, 1, 1, 0, tzinfo=plus_one)) == "2026-01-01T00:00:00Z"
    assert iso_utc(datetime(2026, 1, 1)) == "2026-01-01T00:00:00Z"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-27", datetime(2026, 11, 27, tzinfo=timezone.utc)),
        ("2026-11-27T17:00:00Z", datetime(2026, 11, 27, 17, tzinfo=timezone.utc)),
        ("2026-11-27T18:00:00+01:00", datetime(2026, 11, 27, 17, tzinfo=timezone.utc)),
        ("2026-11-27 17:00", datetime(2026, 11, 27, 17, tzinfo=timezone.utc)),
    ],
)
def test_parse_since(text, expected):
    assert parse_since(text) == expected


@pytest.mark.parametrize("text", ["yesterday", "", "27/11/2026"])
def test_parse_since_refuses_other_forms(text):
    with pytest.raises(ValueError):
        parse_since(text)


def test_a_shared_message_names_the_recipients_sharing_added():
    import dataclasses

    shared = dataclasses.replace(VIEW.messages[0], shared=["pl-payroll+900001-T@corp.example"])
    view = dataclasses.replace(VIEW, messages=[VIEW.messages[0], shared])
    plain, marked = json.loads(format_show(view, TEAMS, as_json=True))["messages"]
    assert "shared" not in plain and marked["shared"] == ["pl-payroll+900001-T@corp.example"]
    text = format_show(view, TEAMS, as_json=False)
    assert text.count("Shared:") == 1
    assert "    Shared:  pl-payroll+900001-T@corp.example (added by inbound sharing)" in text
