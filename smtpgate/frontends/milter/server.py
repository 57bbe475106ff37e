"""The milter listener: an asyncio server on host:port or a unix socket, one session per MTA connection.

Postfix opens one milter connection per SMTP session (and one per message
for non_smtpd_milters) and closes it at the end. Each connection reads
packets through the codec and hands the events to a MilterSession, which
sees one configuration snapshot from start to end. A protocol violation
(no negotiation, commands out of order, a packet over the size limit,
garbage, a truncated packet) is answered with TEMPFAIL and closes that
connection only; the listener keeps serving.

No read timeout applies: between RCPT and the header events lies the
client's whole DATA transfer, which Postfix bounds itself (smtpd_timeout,
milter_*_timeout). A dead Postfix closes its end of the socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import stat
import uuid
from collections.abc import Callable
from typing import Protocol

from smtpgate.config import Listener
from smtpgate.frontends.milter import codec
from smtpgate.frontends.milter.codec import Decoder, ProtocolError
from smtpgate.frontends.milter.session import MilterSession, MilterSettings
from smtpgate.log import get_logger

_READ_SIZE = 1 << 16
# The socket is for the MTA's user: owner and group (docs/milter.md, "Unix socket").
SOCKET_MODE = 0o660


class Registry(Protocol):
    """Where the runtime keeps every front end's sessions for a drain."""

    draining: bool

    def add(self, session) -> None: ...

    def discard(self, session) -> None: ...


class MilterConnection:
    """One MTA connection: read, decode, let the session answer, write; log its life."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, settings: MilterSettings,
                 listener: Listener, max_packet: int = codec.MAX_PACKET) -> None:
        self.reader, self.writer = reader, writer
        self.session_id = uuid.uuid4().hex[:16]
        self.log = get_logger(session=self.session_id, listener=listener.name)
        self.session = MilterSession(settings, session_id=self.session_id, log=self.log)
        self.decoder = Decoder(max_packet)
        self.goodbye: str | None = None

    @property
    def busy(self) -> bool:
        return self.session.busy

    def say_goodbye(self, line: str) -> None:
        """Shutting down: close at once; Postfix applies milter_default_action to a message in flight."""
        self.goodbye = line
        self.writer.close()

    async def run(self) -> None:
        peer = self.writer.get_extra_info("peername")
        self.log.info("milter.session.opened", peer=_peer(peer))
        reason = "closed by the MTA"
        try:
            reason = await self._serve()
        except ProtocolError as exc:
            reason = f"protocol violation: {exc}"
            self.session.log.warning("milter.protocol_error", reason=str(exc), in_message=self.session.busy)
            with contextlib.suppress(ConnectionError, OSError):
                self.writer.write(codec.TEMPFAIL)
                await self.writer.drain()
        except (ConnectionError, OSError) as exc:
            reason = "shutting down" if self.goodbye else f"connection lost: {type(exc).__name__}"
        except Exception:  # noqa: BLE001 - an internal fault tempfails this connection, never the listener
            reason = "internal error"
            self.session.log.exception("milter.session.error")
            with contextlib.suppress(ConnectionError, OSError):
                self.writer.write(codec.TEMPFAIL)
                await self.writer.drain()
        finally:
            if self.session.busy and not reason.startswith("protocol violation"):
                reason += " (in the middle of a message)"
            # Logged before the close, so the MTA seeing the close implies the line is written; the
            # session's logger, which names the client once CONNECT said who it is.
            self.session.log.info("milter.session.closed", reason=reason, messages=self.session.messages)
            self.writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await self.writer.wait_closed()

    async def _serve(self) -> str:
        while not self.session.finished:
            data = await self.reader.read(_READ_SIZE)
            if not data:
                if self.goodbye:
                    return "shutting down"
                if self.decoder.pending:
                    raise ProtocolError(f"connection closed inside a packet ({self.decoder.pending} octets)")
                return "closed by the MTA"
            for event in self.decoder.feed(data):
                answer = await self.session.handle(event)
                if answer:
                    self.writer.write(b"".join(answer))
                    await self.writer.drain()
                if self.session.finished:
                    break
        return "quit"


async def start_milter_listener(listener: Listener, settings: Callable[[], MilterSettings], registry: Registry,
                                *, max_connections: int | None = None,
                                sock: socket.socket | None = None) -> asyncio.AbstractServer:
    """Listen on the listener's host:port or unix socket; each connection takes ``settings()`` once.

    sock: a listening socket bound already (by the worker supervisor), served instead.
    Raises OSError when the address cannot be bound (a unix socket path taken by
    something that is not a socket included).
    """
    active: set[MilterConnection] = set()
    log = get_logger(listener=listener.name)

    async def connected(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if registry.draining or (max_connections is not None and len(active) >= max_connections):
            # Postfix applies milter_default_action (tempfail): the mail waits, nothing is lost.
            log.warning("milter.session.refused", reason="draining" if registry.draining
                        else "limits.max_connections reached")
            writer.close()
            return
        connection = MilterConnection(reader, writer, settings(), listener)
        active.add(connection)
        registry.add(connection)
        try:
            await connection.run()
        finally:
            active.discard(connection)
            registry.discard(connection)

    if sock is not None:
        return await asyncio.start_server(connected, sock=sock)
    if listener.path is None:
        return await asyncio.start_server(connected, listener.host, listener.port, reuse_address=True)
    path = str(listener.path)
    _remove_stale_socket(path)
    server = await asyncio.start_unix_server(connected, path=path)
    os.chmod(path, SOCKET_MODE)
    return server


def _remove_stale_socket(path: str) -> None:
    """A socket left by an earlier run is removed; any other file there is refused."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(f"{path} exists and is not a socket")
    os.unlink(path)


def _peer(peer) -> str:
    if isinstance(peer, tuple) and peer:
        return f"{peer[0]}:{peer[1]}" if len(peer) > 1 else str(peer[0])
    return str(peer or "unix")
