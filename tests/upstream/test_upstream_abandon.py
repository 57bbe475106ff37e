"""A transaction that ends upstream without its message: SmtpSession (smtpgate/upstream/client.py)
driven as the relay drives it, against a sink (tests/support/sink.py) on loopback.

Once DATA is sent, only the final dot or a closed connection ends the transaction
(anything else would be read as message content): RSET answers 421 itself and the
connection is closed, never pooled, and the upstream delivers nothing.
"""

from __future__ import annotations

from smtpgate.config import load_config
from smtpgate.upstream.client import UpstreamPool
from tests.conftest import write_config
from tests.support.sink import Sink


def pool_for(tmp_path, port: int) -> UpstreamPool:
    config = load_config(write_config(tmp_path, f"""\
listeners:
  - name: submission
    address: 127.0.0.1:0
upstream:
  url: smtp://127.0.0.1:{port}
internal_domains: [corp.example]
store:
  url: sqlite:smtpgate.db
  auto_upgrade: true
"""))
    return UpstreamPool(config.upstream, local_hostname="gate.test")


async def transaction(pool: UpstreamPool):
    session = await pool.acquire()
    assert (await session.mail("jane@corp.example", [])).code == 250
    assert (await session.rcpt("client@supplier.example", [])).code == 250
    return session


async def test_rset_in_a_streamed_message_closes_the_connection_and_delivers_nothing(tmp_path):
    async with Sink() as sink:
        pool = pool_for(tmp_path, sink.port)
        session = await transaction(pool)
        assert (await session.open_data(b"Subject: half\r\n")).code == 354
        await session.write_data(b"\r\nthe start of the body\r\n")
        verdict = await session.rset()
        assert (verdict.code, verdict.text) == (421, "4.4.2 message abandoned: the connection is closed")
        await session.release(True)
        assert pool.idle == [] and pool.open_connections == 0
        await sink.wait_for(lambda: sink.closed_after_data, what="the connection closed after DATA")
        assert sink.messages == [] and "RSET" not in sink.commands
        await pool.close()


async def test_rset_after_data_was_begun_closes_the_connection(tmp_path):
    async with Sink() as sink:
        pool = pool_for(tmp_path, sink.port)
        session = await transaction(pool)
        session.begin_data()
        verdict = await session.rset()
        assert (verdict.code, verdict.text) == (421, "4.4.2 DATA begun: the connection is closed")
        await session.release(True)
        assert pool.idle == [] and pool.open_connections == 0
        assert sink.messages == [] and "RSET" not in sink.commands
        await pool.close()


async def test_a_connection_made_again_for_mail_is_pooled_and_closed_with_quit(tmp_path):
    """A pooled connection the upstream dropped: MAIL goes out on a new one, which is then
    as good as any (pooled, and said goodbye to when the pool closes)."""
    async with Sink() as sink:
        pool = pool_for(tmp_path, sink.port)
        first = await pool.acquire()
        await first.release(True)
        assert await sink.drop_connections() == 1
        session = await transaction(pool)  # handed out unchecked: MAIL finds the drop
        assert sink.connections == 2
        await session.rset()
        await session.release(True)
        assert pool.idle == [session]
        await pool.close()
        await sink.wait_for_command("QUIT")
