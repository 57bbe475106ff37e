"""`smtpgate links export --json --messages` then `links import` into an empty store: `links show`
says the same of every activity (mailboxes, teams, links, created_at, messages), on either
backend; a second run adds nothing; an export from a newer schema is refused."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from smtpgate.config import load_config
from smtpgate.store.migrations import SQLITE, latest
from tests.conftest import BASE_CONFIG, write_config
from tests.store_helpers import pg_database, store_url  # noqa: F401  (fixtures)
from tests.support.cli import ROOT, smtpgate
from tests.support.smtp import send

# Several commands in one process, each through smtpgate's own main (a process costs seconds
# on a busy machine): a JSON list of argument lists in, a list of [status, stdout, stderr] out.
RUN = """\
import contextlib, io, json, sys
from smtpgate.cli import main
results = []
for args in json.loads(sys.stdin.read()):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(args)
    results.append([status, out.getvalue(), err.getvalue()])
print(json.dumps(results))
"""


def run(*commands: list[str]) -> list[str]:
    """The standard output of each command, which must all succeed."""
    done = subprocess.run([sys.executable, "-c", RUN], input=json.dumps(commands), capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)
    for command, (status, _, err) in zip(commands, results):
        assert status == 0, (command, err)
    return [out for _, out, _ in results]


MESSAGES = [
    # A new link for Team B, with a message record naming both activities.
    ("uk-payroll+101203-T@corp.example", ["client@supplier.example", "pl-payroll@corp.example"],
     b"From: Team A <uk-payroll+101203-T@corp.example>\r\nTo: client@supplier.example\r\n"
     b"Cc: pl-payroll@corp.example\r\nSubject: Invoice 4411\r\nMessage-ID: <one@corp.example>\r\n\r\nHi\r\n"),
    # An explicit tag: a link to 5512-C, owned by Team B from its tagged address.
    ("uk-payroll+101203-T@corp.example", ["pl-payroll+5512-C@corp.example"],
     b"From: uk-payroll+101203-T@corp.example\r\nTo: pl-payroll+5512-C@corp.example\r\n"
     b"Subject: Case\r\nMessage-ID: <two@corp.example>\r\n\r\nHi\r\n"),
    # From Outlook: the source from the subject; its owner stays unknown (no tagged address).
    ("jane@corp.example", ["pl-payroll@corp.example"],
     b"From: jane@corp.example\r\nTo: pl-payroll@corp.example\r\nSubject: RE: pay [77-A]\r\n"
     b"Message-ID: <three@corp.example>\r\n\r\nHi\r\n"),
]


def views(config: Path, references: list[str]) -> list[list[str]]:
    """`links show --json` of each reference, then `links list --json`."""
    return [*(["links", "show", ref, "--json", "-c", str(config)] for ref in references),
            ["links", "list", "--json", "-c", str(config)]]


def export(config: Path) -> list[str]:
    return ["links", "export", "--json", "--messages", "-c", str(config)]


def without_time(text: str) -> dict:
    """An export without its time; activities by reference (created in the same second, their
    order is the reference's)."""
    data = json.loads(text)
    data.pop("exported_at")
    data["activities"].sort(key=lambda a: a["reference"])
    return data


async def test_export_then_import_shows_the_same_and_a_second_run_adds_nothing(
        tmp_path, sink, start_gate, store_url):  # noqa: F811
    upstream = f"smtp://127.0.0.1:{sink.port}"
    source = write_config(tmp_path, BASE_CONFIG.format(upstream=upstream, store=f"sqlite:{tmp_path}/a.db"), "a.yaml")
    gate, port = await start_gate(load_config(source))
    for mail_from, rcpts, data in MESSAGES:
        assert (await send("127.0.0.1", port, mail_from=mail_from, rcpt_tos=rcpts, data=data)).data[0] == 250
    await gate.store.records.settled()
    add = ["links", "add", "101203-T", "4242-C", "--mailbox", "pl-payroll@corp.example", "-c", str(source)]
    _, text = run(add, export(source))
    backup = tmp_path / "links.json"
    backup.write_text(text)
    before = without_time(text)
    references = sorted(a["reference"] for a in before["activities"])
    assert {"101203-T", "900000-T", "5512-C", "77-A", "4242-C"} <= set(references)
    assert len(before["messages"]) == 3
    source_views = run(*views(source, references))

    target = write_config(tmp_path, BASE_CONFIG.format(upstream=upstream, store=store_url), "b.yaml")
    load = ["links", "import", str(backup), "-c", str(target)]
    # The target store does not exist yet: the first import creates it.
    first, *target_views, after, again, after_again = run(load, *views(target, references), export(target),
                                                         load, export(target))
    assert f"{len(references)} activities" in first and "3 message records" in first
    # Field by field: every activity's view, the list, and the export itself.
    assert [json.loads(v) for v in target_views] == [json.loads(v) for v in source_views]
    assert without_time(after) == before
    shown = json.loads(target_views[references.index("101203-T")])
    assert shown["mailbox"] == "uk-payroll@corp.example" and len(shown["messages"]) == 2
    assert again.startswith(f"imported from {backup}: 0 activities, 0 owner(s) filled in, 0 links, "
                            "0 message records")
    assert without_time(after_again) == before


def test_an_export_from_a_newer_schema_or_a_broken_file_is_refused(tmp_path):
    config = write_config(tmp_path, BASE_CONFIG.format(upstream="maildir:outbox", store="sqlite:s.db"))
    newer = tmp_path / "newer.json"
    newer.write_text(json.dumps({"exported_at": "2026-12-01T00:00:00Z", "schema": 99, "activities": [],
                                 "links": []}))
    refused = smtpgate("links", "import", str(newer), "-c", str(config))
    assert refused.returncode == 2
    assert refused.stderr == (f"smtpgate: links import: {newer}: exported from a store with schema version 99, "
                              f"newer than this smtpgate knows ({latest(SQLITE)}): import it with that smtpgate "
                              "version or a newer one\n")
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"links": [{"source": {"reference": "1-T"}, "target": {"reference": "2-T"},
                                             "created_at": "yesterday"}]}))
    refused = smtpgate("links", "import", str(broken), "-c", str(config))
    assert refused.returncode == 2
    assert refused.stderr == (f"smtpgate: links import: {broken}: links[0].created_at: expected an ISO 8601 "
                              "date-time, got 'yesterday'\n")
