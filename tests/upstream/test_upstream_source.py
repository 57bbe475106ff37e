"""Where a transaction's upstream session comes from: the shared pool or a client's own login.

Both are `UpstreamSource`s; a session goes back to the one that handed it out.
A connection that cannot be had is an `UpstreamConnectError` (credentials: its
`UpstreamAuthError`), whichever way it was asked for. Real sockets: the upstream
is a sink (tests/support/sink.py).
"""

from __future__ import annotations

import pytest

from smtpgate.config import load_config
from smtpgate.upstream.client import (UpstreamAuthError, UpstreamConnectError, UpstreamPool, UpstreamSession,
                                      UpstreamSource)
from smtpgate.upstream.maildir import MaildirSession
from smtpgate.upstream.passthrough import UserUpstream
from tests.conftest import write_config
from tests.support.sink import Sink, make_test_tls
from tests.support.wire import free_port
from tests.upstream.test_auth_upstream import JANE, config_text


def pool_for(tmp_path, port: int, cafile: str) -> UpstreamPool:
    config = load_config(write_config(tmp_path, config_text(tmp_path, port, cafile)))
    return UpstreamPool(config.upstream, local_hostname="gate.test")


@pytest.fixture
async def upstream(tmp_path):
    context, cafile = make_test_tls(tmp_path / "up")
    async with Sink(starttls_context=context, auth=dict([JANE]), require_auth=True, smtputf8=False) as up:
        up.cafile = cafile
        yield up


async def test_a_users_login_is_a_source_its_sessions_go_back_to(tmp_path, upstream):
    pool = pool_for(tmp_path, upstream.port, upstream.cafile)
    user = UserUpstream(pool, *JANE)
    assert isinstance(pool, UpstreamSource) and isinstance(user, UpstreamSource)
    assert user.label == pool.label == pool.config.label
    await user.login()
    session = await user.acquire()
    assert session.owner is user and session.pool is pool
    assert pool.open_connections == 1
    await session.release(True)
    # Kept for the client's next transaction, never put in the shared pool.
    assert user.session is session and pool.idle == []
    assert await user.acquire() is session
    await session.release(False)
    assert user.session is None and pool.open_connections == 0
    await user.close()
    connections = upstream.connections
    # The client's session has ended: nothing logs in for it any more.
    with pytest.raises(UpstreamConnectError) as ended:
        await user.acquire()
    assert ended.value.reason == "the client's session has ended"
    assert upstream.connections == connections and pool.open_connections == 0
    await pool.close()


async def test_a_connection_that_cannot_be_had_is_a_connect_error(tmp_path, upstream):
    nobody = pool_for(tmp_path / "nobody", free_port(), upstream.cafile)
    with pytest.raises(UpstreamConnectError) as refused:
        await nobody.acquire()
    assert not isinstance(refused.value, UpstreamAuthError)
    await nobody.close()
    pool = pool_for(tmp_path, upstream.port, upstream.cafile)
    user = UserUpstream(pool, JANE[0], "not her password")
    with pytest.raises(UpstreamAuthError) as wrong:
        await user.login()
    assert isinstance(wrong.value, UpstreamConnectError)
    await user.close()
    await pool.close()


async def test_a_session_says_which_envelopes_it_carries(tmp_path, upstream):
    pool = pool_for(tmp_path, upstream.port, upstream.cafile)
    user = UserUpstream(pool, *JANE)
    await user.login()
    session = await user.acquire()
    assert "smtputf8" not in session.extensions
    assert session.carries("jane@corp.example", "b@x.example") and session.carries()
    assert not session.carries("jane@corp.example", "jürgen@x.example")
    await session.release(True)
    await user.close()
    await pool.close()
    assert MaildirSession(root=tmp_path).carries("jürgen@x.example")
    assert not UpstreamSession().carries("jürgen@x.example")


async def test_a_password_file_gone_after_start_is_an_auth_error_that_names_it(tmp_path, upstream):
    secret = tmp_path / "upstream.secret"
    secret.write_text(JANE[1] + "\n")
    text = config_text(tmp_path, upstream.port, upstream.cafile).replace(
        "auth_backend: upstream\n", "").replace("    auth: required\n", "").replace(
        "  ca_file:", f"  username: {JANE[0]}\n  password_file: {secret}\n  ca_file:")
    pool = UpstreamPool(load_config(write_config(tmp_path, text)).upstream, local_hostname="gate.test")
    session = await pool.acquire()  # the password as read now
    await session.release(False)
    secret.unlink()
    with pytest.raises(UpstreamAuthError) as refused:
        await pool.acquire()
    assert refused.value.reason == f"cannot read {secret}: No such file or directory"
    secret.write_bytes(b"\xff\xfe not UTF-8\n")  # an error without strerror: said as it is
    with pytest.raises(UpstreamAuthError) as refused:
        await pool.acquire()
    assert refused.value.reason.startswith(f"cannot read {secret}: 'utf-8' codec can't decode byte 0xff")
    await pool.close()
