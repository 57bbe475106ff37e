"""The soak's upstream: an SMTP server that records every message it accepts.

Run as its own process (`python -m bench.soak_upstream`), so the soak can kill and
restart it. Each message it answers 250 is appended to the deliveries file as one
JSON line (Message-ID, envelope sender, recipients), written and flushed before the
250 goes out: a delivery the file lacks was never accepted. It also plays an
upstream that is slow at a chosen stage (a sender whose local part starts with
`slow-mail` waits `--delay` seconds for its MAIL reply, `slow-rcpt` for each RCPT
reply) and one that refuses at a stage: `--refuse-stage` (MAIL, RCPT, DATA or
dot) gets `451 4.3.2` for a share (`--refuse-share`) of the transactions.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal

from aiosmtpd.smtp import SMTP, Envelope, Session

_MESSAGE_ID = re.compile(rb"^Message-I[Dd]:\s*(<[^>\r\n]*>)", re.MULTILINE | re.IGNORECASE)
REFUSAL = "451 4.3.2 soak upstream: refused at this stage"


class Recorder:
    """aiosmtpd handler hooks: slow and refusing stages, and the deliveries file."""

    def __init__(self, path: str, delay: float, stage: str, share: float) -> None:
        self.out = open(path, "a", encoding="utf-8")
        self.delay = delay
        self.stage = stage
        self.share = share

    def _refuse(self, stage: str) -> bool:
        return stage == self.stage and random.random() < self.share

    async def handle_MAIL(self, server, session: Session, envelope: Envelope, address: str, options) -> str:
        if address.startswith("slow-mail"):
            await asyncio.sleep(self.delay)
        if self._refuse("MAIL"):
            return REFUSAL
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 OK"

    async def handle_RCPT(self, server, session: Session, envelope: Envelope, address: str, options) -> str:
        if (envelope.mail_from or "").startswith("slow-rcpt"):
            await asyncio.sleep(self.delay)
        if self._refuse("RCPT"):
            return REFUSAL
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session: Session, envelope: Envelope) -> str:
        if self._refuse("dot"):
            return REFUSAL
        found = _MESSAGE_ID.search(envelope.original_content or b"")
        record = {"message_id": found.group(1).decode("ascii", "replace") if found else None,
                  "mail_from": envelope.mail_from, "rcpt_tos": list(envelope.rcpt_tos)}
        self.out.write(json.dumps(record) + "\n")
        self.out.flush()
        return "250 2.0.0 Ok: queued"


class RefusingSMTP(SMTP):
    """DATA itself refused for a share of the transactions when the stage is DATA."""

    async def smtp_DATA(self, arg: str) -> None:
        handler = self.event_handler
        if self.envelope.rcpt_tos and handler._refuse("DATA"):
            await self.push(REFUSAL)
            return
        await super().smtp_DATA(arg)


async def serve(args: argparse.Namespace) -> None:
    recorder = Recorder(args.deliveries, args.delay, args.refuse_stage, args.refuse_share)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: RefusingSMTP(recorder, hostname="upstream.soak", data_size_limit=50_000_000,
                             enable_SMTPUTF8=True, timeout=120),
        "127.0.0.1", args.port, reuse_address=True)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    print(json.dumps({"event": "upstream.ready", "pid": os.getpid(), "stage": args.refuse_stage}), flush=True)
    async with server:
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--deliveries", required=True)
    parser.add_argument("--delay", type=float, default=1.5)
    parser.add_argument("--refuse-stage", default="none")
    parser.add_argument("--refuse-share", type=float, default=0.05)
    asyncio.run(serve(parser.parse_args()))


if __name__ == "__main__":
    main()
