"""Reading an export file (smtpgate/store/transfer.py `read_backup`): what each
malformed part is refused with, and what a well-formed one gives; the store's side:
the message records an export takes, and an owner an import does not change."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest

from smtpgate.store import MessageRecord, open_store
from smtpgate.store.base import ActivityRow
from smtpgate.store.transfer import Backup, BackupError, read_backup
from tests.store_helpers import pg_database, store_url  # noqa: F401  (fixtures)

NAME = "backup.json"
MESSAGE = {"message_id": "<m1@corp.example>", "mapping": {"pl-payroll@corp.example": "2-T"},
           "recipients": ["client@supplier.example"], "relayed_at": "2026-01-15T09:30:05Z"}


def refusal(data: object) -> str:
    with pytest.raises(BackupError) as refused:
        read_backup(json.dumps(data), NAME, latest_schema=5)
    return str(refused.value)


@pytest.mark.parametrize(("data", "message"), [
    ("[1]", "not an export of `smtpgate links export --json`"),
    ({"links": {}}, "not an export of `smtpgate links export --json`"),
    ({"links": [], "schema": "2"}, "schema: expected a whole number, got '2'"),
    ({"links": [], "schema": True}, "schema: expected a whole number, got True"),
    ({"links": [], "activities": {}}, "activities: expected a list, got {}"),
    ({"links": [], "activities": [7]}, "activities[0]: expected an object"),
    ({"links": [], "activities": [{"reference": 5}]}, "activities[0].reference: expected a string, got 5"),
    ({"links": [{"target": {}}]}, "links[0].source: expected an object, got None"),
    ({"links": [{"source": {"reference": "1-T"}, "target": {"reference": ["2-T"]}}]},
     "links[0].target.reference: expected a string, got ['2-T']"),
    ({"links": [], "messages": "none"}, "messages: expected a list, got 'none'"),
    ({"links": [], "messages": [dict(MESSAGE, mapping={"a": 1})]}, "messages[0].mapping: expected an object of strings"),
    ({"links": [], "messages": [MESSAGE, dict(MESSAGE, subject=["Invoice"])]},
     "messages[1].subject: expected a string, got ['Invoice']"),
    ({"links": [], "messages": [dict(MESSAGE, recipients=None)]}, "messages[0].recipients: expected a list, got None"),
    ({"links": [], "messages": [dict(MESSAGE, recipients=["a@b", 3])]},
     "messages[0].recipients: expected a list of strings"),
    ({"links": [], "messages": [dict(MESSAGE, shared=[None])]}, "messages[0].shared: expected a list of strings"),
    ({"links": [], "messages": [dict(MESSAGE, relayed_at="soon")]},
     "messages[0].relayed_at: expected an ISO 8601 date-time, got 'soon'"),
])
def test_a_malformed_part_is_refused_with_where_and_what(data, message):
    assert refusal(json.loads(data) if isinstance(data, str) else data) == f"{NAME}: {message}"


def test_a_file_that_is_not_json_is_refused():
    with pytest.raises(BackupError, match=r"^backup\.json: not JSON: "):
        read_backup("{", NAME, latest_schema=5)


def test_a_well_formed_export_is_read_whole():
    backup = read_backup(json.dumps({
        "links": [{"source": {"reference": "1-T", "mailbox": "uk@corp.example"}, "target": {"reference": "2-T"},
                   "created_at": "2026-01-15T09:30:05z", "message_id": "<m1@corp.example>"}],
        "activities": [{"reference": "1-T", "created_at": "2026-01-15T10:30:05+01:00"}],
        "messages": [dict(MESSAGE, shared=["x@corp.example"])],
    }), NAME, latest_schema=5)
    when = datetime(2026, 1, 15, 9, 30, 5, tzinfo=timezone.utc)
    assert backup.schema == 1  # exports older than the "schema" key
    assert [(a.reference, a.mailbox, a.created_at) for a in backup.activities] == [("1-T", None, when)]
    link = backup.links[0]
    assert (link.source_reference, link.source_mailbox, link.target_reference, link.target_mailbox,
            link.created_at, link.message_id) == ("1-T", "uk@corp.example", "2-T", None, when, "<m1@corp.example>")
    message = backup.messages[0]
    assert (message.message_id, message.recipients, message.shared, message.relayed_at, message.date) == (
        "<m1@corp.example>", ["client@supplier.example"], ["x@corp.example"], when, None)
    assert read_backup(json.dumps({"links": []}), NAME, latest_schema=5).messages is None


async def test_an_export_takes_every_field_of_a_message_record(store_url, tmp_path):  # noqa: F811
    store = await open_store(store_url, base_dir=tmp_path)
    try:
        record = MessageRecord(message_id="<m1@corp.example>", date="Fri, 27 Nov 2026 17:00:00 +0000",
                               from_="anna@corp.example", subject="Invoice 4411", source_reference="1-T",
                               recipients=["client@supplier.example"], mapping={"pl-payroll@corp.example": "2-T"},
                               relayed_at=datetime(2026, 11, 27, 17, 0, 5, tzinfo=timezone.utc),
                               shared=["pl-payroll+2-T@corp.example"])
        await store.record_message(record)
        assert await store.export_messages() == [record]
    finally:
        await store.close()


async def test_an_import_keeps_the_owner_the_store_knows_and_says_so(store_url, tmp_path):  # noqa: F811
    store = await open_store(store_url, base_dir=tmp_path)
    try:
        await store.record_activity("1-T", "uk-payroll@corp.example")
        when = datetime(2026, 1, 15, 9, 30, 5, tzinfo=timezone.utc)
        backup = Backup(schema=1, links=[], messages=None, activities=[
            ActivityRow(reference="1-T", mailbox="pl-payroll@corp.example", created_at=when)])
        counts = await store.import_backup(backup)
        assert counts.conflicts == ["1-T: the store says uk-payroll@corp.example, the file pl-payroll@corp.example; "
                                    "kept uk-payroll@corp.example"]
        assert (counts.activities, counts.owners) == (0, 0)
        assert await store.activity_mailbox("1-T") == "uk-payroll@corp.example"
    finally:
        await store.close()
