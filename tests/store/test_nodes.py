"""Several smtpgate nodes sharing one PostgreSQL store: racing messages make one link."""

from __future__ import annotations

import asyncio
import re

import pytest

from smtpgate.config import load_config
from tests.conftest import write_config
from tests.store_helpers import pg_database, pg_store_url  # noqa: F401  (fixtures)
from tests.support.configs import TEAMS_A_B
from tests.support.smtp import send

pytestmark = pytest.mark.postgres

NODE = """\
hostname: {name}.test.example
listeners:
  - name: submission
    address: 127.0.0.1:0
    relay_networks: [127.0.0.1/32]
upstream:
  url: smtp://127.0.0.1:{sink_port}
""" + TEAMS_A_B + """\
store:
  url: {store}
  auto_upgrade: true
"""


async def test_two_nodes_racing_create_one_link(pg_store_url, sink, start_gate, log_lines, tmp_path):
    ports = []
    for name in ("node-a", "node-b"):
        folder = tmp_path / name
        folder.mkdir()
        config = load_config(write_config(folder, NODE.format(name=name, sink_port=sink.port, store=pg_store_url)))
        ports.append((await start_gate(config))[1])

    async def one(i: int):
        data = (b"From: uk-payroll+424242-C@corp.example\r\nTo: pl-payroll@corp.example\r\n"
                b"Subject: race %d\r\n\r\nbody\r\n" % i)
        return await send("127.0.0.1", ports[i % 2], mail_from="uk-payroll+424242-C@corp.example",
                          rcpt_tos=["pl-payroll@corp.example"], data=data)

    results = await asyncio.gather(*(one(i) for i in range(20)))
    assert all(r.data is not None and r.data[0] == 250 for r in results)
    tags = {rcpt for msg in sink.messages for rcpt in msg.rcpt_tos}
    assert len(sink.messages) == 20
    assert len(tags) == 1
    [tag] = tags
    assert re.fullmatch(r"pl-payroll\+\d+-T@corp\.example", tag)
    created = [e for e in log_lines() if e["event"] == "link.created"]
    assert len(created) == 1
    relayed = [e for e in log_lines() if e["event"] == "message.relayed"]
    assert len(relayed) == 20
    assert sum(len(e["links_created"]) for e in relayed) == 1
    # One session per message, each logged under its own id.
    assert len({e["session"] for e in relayed}) == 20
    # Both nodes relayed: each stamps its own name in the Received field it adds.
    relays = {re.search(rb"\tby (\S+) \(smtpgate\)", m.data).group(1) for m in sink.messages}
    assert relays == {b"node-a.test.example", b"node-b.test.example"}


async def test_mails_refused_upstream_leave_the_lookup_connection_alone(pg_store_url, sink, start_gate, tmp_path):
    """MAIL starts the sender's link look-up beside the upstream's MAIL; a MAIL refused (or a
    client gone) before it is answered leaves it to finish: it is not cancelled midway, which
    would cost PostgreSQL's look-up connection."""
    import asyncpg

    from smtpgate.store.postgres import LOOKUPS_APPLICATION

    config = load_config(write_config(tmp_path, NODE.format(name="node-a", sink_port=sink.port, store=pg_store_url)))
    port = (await start_gate(config))[1]
    admin = await asyncpg.connect(pg_store_url)
    try:
        query = "SELECT pid FROM pg_stat_activity WHERE application_name = $1 AND datname = current_database()"
        before = {r["pid"] for r in await admin.fetch(query, LOOKUPS_APPLICATION)}
        sink.mail_reply = "550 5.7.1 Sender refused"
        for _ in range(20):
            result = await send("127.0.0.1", port, mail_from="uk-payroll+101203-T@corp.example",
                                rcpt_tos=["pl-payroll@corp.example"], data=b"Subject: x\r\n\r\nbody\r\n")
            assert result.mail[0] == 550
        sink.mail_reply = None
        result = await send("127.0.0.1", port, mail_from="uk-payroll+101203-T@corp.example",
                            rcpt_tos=["client@supplier.example"], data=b"Subject: x\r\n\r\nbody\r\n")
        assert result.data is not None and result.data[0] == 250
        assert {r["pid"] for r in await admin.fetch(query, LOOKUPS_APPLICATION)} == before
    finally:
        await admin.close()
