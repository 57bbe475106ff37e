"""One message's data relayed as it arrives (docs/architecture.md, "Memory").

The header block is held (up to limits.max_header_block) until it is complete;
then the transaction decides and sends DATA and the rewritten header block
upstream (`Transaction.start_message`) while the body keeps arriving. Body the
upstream cannot take yet (the decision, a replay on a new connection, a slow
354) waits in memory up to SPOOL_MEMORY_OCTETS, the rest in an anonymous spool
file; once the upstream has said 354 the body goes straight through, each piece
checked by the data guard on its way. Whatever ends the message, nothing of it
outlives the transaction: the spool file never has a name that stays (it is
unlinked as it is created, or made without one), and a message that stops short
of its final dot leaves the upstream with its connection closed, no dot sent.
"""

from __future__ import annotations

import asyncio
import glob
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from smtpgate.frontends.smtp.relay import Transaction
from smtpgate.mail import replies
from smtpgate.mail.dataguard import StreamGuard
from smtpgate.mail.headers import HeaderBlock, parse_header_block
from smtpgate.mail.replies import SMTPReply

__all__ = ["SPOOL_MEMORY_OCTETS", "SPOOL_PREFIX", "BodySpool", "MessageStream", "clean_spool_dir"]

# The most of one message's body held in memory while the upstream cannot take it yet.
SPOOL_MEMORY_OCTETS = 256 * 1024
# Spool files are read back in pieces of this size.
SPOOL_READ_OCTETS = 64 * 1024
# Where the system gives a spool file a name for a moment (no O_TMPFILE), it starts so.
SPOOL_PREFIX = "smtpgate-spool-"


def clean_spool_dir(folder: Path | None) -> int:
    """At start: remove spool files a killed process had no time to unlink; returns how many."""
    removed = 0
    for path in glob.glob(os.path.join(folder or tempfile.gettempdir(), SPOOL_PREFIX + "*")):
        try:
            os.unlink(path)
            removed += 1
        except OSError:
            pass
    return removed


class BodySpool:
    """Body waiting for the upstream: up to SPOOL_MEMORY_OCTETS in memory, the rest in an
    anonymous file (mode 0600, no name left in `folder`), read back in order."""

    def __init__(self, folder: Path | None) -> None:
        self.folder = folder
        self.chunks: list[bytes] = []
        self.memory = 0
        self.file: BinaryIO | None = None

    def add(self, piece: bytes | memoryview) -> None:
        if self.file is None and self.memory + len(piece) <= SPOOL_MEMORY_OCTETS:
            self.chunks.append(bytes(piece))
            self.memory += len(piece)
            return
        if self.file is None:
            # TemporaryFile: O_TMPFILE where the file system has it, else created 0600 and
            # unlinked at once; closing it (or the process dying) frees it.
            self.file = tempfile.TemporaryFile(dir=self.folder, prefix=SPOOL_PREFIX)
        self.file.write(piece)

    def drain(self) -> Iterator[bytes]:
        """What waits, in order; the spool is empty (and its file closed) once it is read."""
        chunks, self.chunks, self.memory = self.chunks, [], 0
        yield from chunks
        file, self.file = self.file, None
        if file is None:
            return
        try:
            file.flush()
            file.seek(0)
            while piece := file.read(SPOOL_READ_OCTETS):
                yield piece
        finally:
            file.close()

    def close(self) -> None:
        self.chunks, self.memory = [], 0
        file, self.file = self.file, None
        if file is not None:
            file.close()


class MessageStream:
    """A GlueSMTP message consumer: one transaction's message data, relayed as it arrives.

    `spawn` runs a coroutine to its end whatever happens to the client (the session
    registry's), so a decision under way when the client goes finishes on its own and
    the upstream transaction is abandoned after it. `reject` is the session's one
    error path (GateSMTP.refused): it logs the message's refusal, once, and gives its
    reply line; `internal=True` for a fault.
    """

    def __init__(self, tx: Transaction, *, max_header_block: int, spool_dir: Path | None,
                 reject: Callable[..., str], check_head=None, spawn=None) -> None:
        self.tx = tx
        self.max_header_block = max_header_block
        self.head: bytearray | None = bytearray()  # the header block as sent, until it is complete
        self.guard = StreamGuard()
        self.spool = BodySpool(spool_dir)
        self.start: asyncio.Future[str | None] | None = None  # start_message under way
        self.refusal: SMTPReply | None = None  # the message's refusal (smtpgate's or the upstream's)
        self.refusal_line: str | None = None  # the refusal's reply, once logged
        self.abandoned = False
        self.finishing = False  # the final dot is in, the reply not yet known
        self._reject = reject
        self._ending = False  # the upstream transaction is being ended without a dot
        self._sending = asyncio.Lock()  # one writer upstream at a time: the reader, or the flush
        self._check_head = check_head  # the session's own check of the header block (sender rights)
        self._spawn = spawn or asyncio.ensure_future

    # ------------------------------------------------------------ as it arrives

    async def feed(self, piece: bytes | memoryview) -> None:
        if self._done:
            return
        problem = self.guard.add(piece if isinstance(piece, bytes) else bytes(piece))
        if problem is not None:
            self._refuse(SMTPReply(replies.BAD_LINE_ENDINGS, f"{problem.kind} at octet {problem.offset}"))
            return
        if self.head is None:
            await self._body(piece)
            return
        self.head += piece
        end, headers = _header_end(self.head)
        if end is None:
            if len(self.head) > self.max_header_block:
                self._refuse(SMTPReply(replies.HEADER_TOO_BIG,
                                       f"header block over limits.max_header_block ({self.max_header_block})"))
            return
        if end > self.max_header_block:
            self._refuse(SMTPReply(replies.HEADER_TOO_BIG,
                                   f"header block of {end} octets, over limits.max_header_block"))
            return
        head, self.head = self.head, None
        self._begin(bytes(memoryview(head)[:end]), headers)
        if end < len(head):
            await self._body(memoryview(head)[end:])

    @property
    def _done(self) -> bool:
        return self.abandoned or self.refusal is not None

    def _begin(self, head_wire: bytes, headers: HeaderBlock | None = None) -> None:
        """The header block is complete: decide and open the upstream's DATA, beside the reading.
        ``headers``: head_wire parsed (it holds for the head only when no line was dot-stuffed)."""
        head = _unstuff(head_wire)
        self.start = self._spawn(self._start(head, headers if head is head_wire else None))
        # What waits goes upstream as soon as it may, not only when the client sends more.
        self.start.add_done_callback(self._started_soon)

    def _started_soon(self, _: asyncio.Future) -> None:
        # Only when something waits and no final dot will take it anyway.
        if not (self._done or self.finishing) and (self.spool.chunks or self.spool.file is not None):
            self._spawn(self._flush())

    async def _flush(self) -> None:
        async with self._sending:
            if self.start is not None and not self._done:
                await self._started()

    async def _start(self, head: bytes, headers: HeaderBlock | None) -> None:
        if self._check_head is not None:
            self._check_head(head)
        return await self.tx.start_message(head, headers)

    async def _body(self, piece: bytes | memoryview) -> None:
        async with self._sending:
            await self._send(piece)

    async def _send(self, piece: bytes | memoryview) -> None:
        if self.start is not None:
            if not self.start.done():
                self.spool.add(piece)
                return
            if not await self._started():
                return
        try:
            await self.tx.write_body(piece)
        except SMTPReply as exc:
            self._refuse(exc)

    async def _started(self, *, flush: bool = True) -> bool:
        """The decision's outcome, once: True when the body may go upstream (what waited is
        sent, unless not `flush`)."""
        start, self.start = self.start, None
        assert start is not None
        if not start.done():
            await asyncio.wait([start])  # never cancelled from here: see _end_upstream
        try:
            start.result()
        except SMTPReply as exc:  # smtpgate's, or the upstream's refusal of DATA
            self._refuse(exc)
            return False
        except Exception:
            fault = SMTPReply(replies.TEMPORARY_FAILURE, "internal error")
            self._refuse(fault)
            if self.refusal is fault:
                self.refusal_line = self._reject(fault, internal=True)
            return False
        if not flush:
            return True
        try:
            for waiting in self.spool.drain():
                if self._done:  # refused meanwhile (the data guard on a later piece)
                    break
                await self.tx.write_body(waiting)
        except SMTPReply as exc:
            self._refuse(exc)
            return False
        return True

    # ------------------------------------------------------------ the end

    async def finish(self) -> str:
        """The final dot is in: the client's reply (the upstream's own verdict when it got the dot).

        It runs to its end even if the client hangs up now, so the upstream's verdict is
        logged and recorded and the upstream released."""
        self.finishing = True
        task = self._spawn(self._finish_all())
        try:
            return await asyncio.shield(task)
        finally:
            self.finishing = False

    async def _finish_all(self) -> str:
        try:
            return await self._finish()
        except asyncio.CancelledError:  # the loop is stopping under it: nothing may stay held
            self.tx.drop()
            raise
        except Exception:
            line = self._reject(SMTPReply(replies.TEMPORARY_FAILURE, "internal error"), internal=True)
            await self.tx.abort()
            return line
        finally:
            self.spool.close()

    async def _finish(self) -> str:
        problem = self.guard.finish()
        if problem is not None and self.refusal is None:
            self._refuse(SMTPReply(replies.BAD_LINE_ENDINGS, f"{problem.kind} at the end of the data"))
        if self.head is not None and not self._done:
            # No empty line: the whole data is the header block (limits checked as it came).
            head, self.head = self.head, None
            self._begin(bytes(head))
        last = b""
        async with self._sending:
            if self.start is not None and await self._started(flush=self.spool.file is not None):
                # What waited in memory goes with the final dot: a small message is one write.
                last = b"".join(self.spool.drain())
        if self.refusal is not None:
            return self._refused_line()
        try:
            return await self.tx.end_message(last)
        except SMTPReply as exc:
            self._refuse(exc)
            return self._refused_line()

    def _refused_line(self) -> str:
        """The refusal's reply, logged (once) as the message's message.rejected."""
        if self.refusal_line is None:
            assert self.refusal is not None
            self.refusal_line = self._reject(self.refusal)
        return self.refusal_line

    def _refuse(self, error: SMTPReply) -> None:
        """The message is refused: the upstream gets no final dot (its connection closed
        when the body had begun); the client's reply waits for its final dot."""
        if self.refusal is None:
            self.refusal = error
        self.head = None
        self.spool.close()
        self._end_upstream()

    def abandon(self) -> None:
        """The message ends short of its final dot (the client gone, aiosmtpd's own refusal)."""
        if self.abandoned:
            return
        self.abandoned = True
        self.head = None
        self.spool.close()
        self._end_upstream()

    def _end_upstream(self) -> None:
        """Abort the upstream transaction once the decision under way (if any) is done:
        links it commits stay, and a retry reuses them."""
        if self._ending:
            return
        self._ending = True
        start, self.start = self.start, None
        self._spawn(_abort_after(self.tx, start))


async def _abort_after(tx: Transaction, start: asyncio.Future | None) -> None:
    try:
        if start is not None:
            await asyncio.wait([start])
            if not start.cancelled():
                start.exception()  # retrieved: its refusal is the message's, logged by the stream
        await tx.abort()
    except asyncio.CancelledError:  # the loop is stopping under it: nothing may stay held
        tx.drop()
        raise


def _header_end(head: bytearray) -> tuple[int | None, HeaderBlock | None]:
    """Where the header block of the data so far ends (the body's first octet) and the
    block, (None, None) while it may go on: decided over the complete lines as
    parse_header_block decides it (on the data as sent, which it decides alike: a stuffed
    line starts with a period either way)."""
    cut = head.rfind(b"\n") + 1
    if cut == 0:
        return None, None
    block = parse_header_block(bytes(memoryview(head)[:cut]))
    return (block.header_end, block) if block.header_end < cut else (None, None)


def _unstuff(wire: bytes) -> bytes:
    """RFC 5321 4.5.2: the leading period of each line goes (wire ends at a line's end);
    wire itself when no line had one."""
    if b"\r\n." in wire:
        wire = wire.replace(b"\r\n.", b"\r\n")
    return wire[1:] if wire[:1] == b"." else wire
