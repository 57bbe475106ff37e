"""upstream.url maildir:: each message a file in new/, its envelope a JSON file in
envelopes/ under the same name, and the replies an SMTP upstream would give
(smtpgate/upstream/maildir.py). Real files in a temporary folder."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from smtpgate.upstream.maildir import MaildirSession
from smtpgate.upstream.session import UpstreamError, Verdict

HEAD = b"From: a@corp.example\r\nTo: b@x.example\r\nSubject: kept\r\n\r\n"


async def test_a_message_and_its_envelope_are_delivered_with_smtps_replies(tmp_path):
    session = MaildirSession(root=tmp_path)
    assert await session.mail("a@corp.example", ["BODY=8BITMIME"]) == Verdict(250, "2.1.0 Sender OK")
    assert await session.rcpt("b@x.example", ["NOTIFY=NEVER"]) == Verdict(250, "2.1.5 Recipient OK")
    assert await session.rcpt("c@x.example", []) == Verdict(250, "2.1.5 Recipient OK")
    assert await session.open_data(HEAD) == Verdict(354, "End data with <CR><LF>.<CR><LF>")
    await session.write_data(b"..stuffed\r\n")
    done = await session.end_data(b"last line\r\n")  # what waited in memory goes with the dot
    [name] = [p.name for p in (tmp_path / "new").iterdir()]
    assert done == Verdict(250, f"2.0.0 Ok: queued as {name}")
    assert (tmp_path / "new" / name).read_bytes() == HEAD + b".stuffed\r\nlast line\r\n"
    assert json.loads((tmp_path / "envelopes" / f"{name}.json").read_text(encoding="utf-8")) == {
        "mail_from": "a@corp.example", "mail_options": ["BODY=8BITMIME"],
        "rcpt_tos": ["b@x.example", "c@x.example"], "rcpt_options": [["NOTIFY=NEVER"], []]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cur", "envelopes", "new", "tmp"]  # a whole Maildir
    assert list((tmp_path / "tmp").iterdir()) == []
    assert await session.rset() == Verdict(250, "2.0.0 OK")


async def test_a_maildir_that_cannot_be_made_is_an_upstream_error_that_says_so(tmp_path):
    root = tmp_path / "outbox"
    root.write_text("not a folder\n")
    session = MaildirSession(root=root)
    await session.mail("a@corp.example", [])
    await session.rcpt("b@x.example", [])
    with pytest.raises(UpstreamError) as info:
        await session.open_data(HEAD)
    assert info.value.reason.startswith("maildir write failed: [Errno ")
    assert str(root) in info.value.reason


async def test_an_envelope_that_cannot_be_written_leaves_no_message(tmp_path):
    session = MaildirSession(root=tmp_path)
    await session.mail("a@corp.example", [])
    await session.rcpt("b@x.example", [])
    await session.open_data(HEAD)
    (tmp_path / "envelopes").rmdir()
    (tmp_path / "envelopes").write_text("in the way\n")
    with pytest.raises(UpstreamError) as info:
        await session.end_data(b"body\r\n")
    assert info.value.reason.startswith("maildir write failed: [Errno ")
    assert list((tmp_path / "new").iterdir()) == []
    assert list((tmp_path / "tmp").iterdir()) == []  # nothing of it left behind



async def test_a_message_that_cannot_be_moved_into_new_leaves_no_envelope(tmp_path):
    session = MaildirSession(root=tmp_path)
    await session.mail("a@corp.example", [])
    await session.rcpt("b@x.example", [])
    await session.open_data(HEAD)
    (tmp_path / "new").rmdir()
    (tmp_path / "new").write_text("in the way\n")
    with pytest.raises(UpstreamError) as info:
        await session.end_data(b"body\r\n")
    assert info.value.reason.startswith("maildir write failed: [Errno ")
    assert list((tmp_path / "envelopes").iterdir()) == []  # its envelope was written, and is gone again
    assert list((tmp_path / "tmp").iterdir()) == []

# A process whose files may not grow past 64 KiB (RLIMIT_FSIZE), as on a disk that fills up
# under a message: the write fails with EFBIG rather than the signal that would end the process.
FULL_DISK = """\
import asyncio, resource, signal, sys
from pathlib import Path
from smtpgate.upstream.maildir import MaildirSession
from smtpgate.upstream.session import UpstreamError

async def main(root):
    session = MaildirSession(root=root)
    await session.mail("a@corp.example", [])
    await session.rcpt("b@x.example", [])
    await session.open_data(b"Subject: big\\r\\n\\r\\n")
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (65536, resource.RLIM_INFINITY))
    try:
        await session.write_data((b"x" * 998 + b"\\r\\n") * 1000)
    except UpstreamError as exc:
        print(exc.reason)

asyncio.run(main(Path(sys.argv[1])))
"""


def test_a_body_write_that_fails_is_an_upstream_error_that_says_why_and_leaves_no_file(tmp_path):
    done = subprocess.run([sys.executable, "-c", FULL_DISK, str(tmp_path / "outbox")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout == "maildir write failed: [Errno 27] File too large\n"
    assert list((tmp_path / "outbox" / "tmp").iterdir()) == []
    assert list((tmp_path / "outbox" / "new").iterdir()) == []
