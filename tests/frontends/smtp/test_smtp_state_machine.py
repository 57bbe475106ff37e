"""A hypothesis state machine against a live smtpgate whose upstream fails at random stages.

The machine drives one client session at a time with random SMTP commands and
raw byte lines (bare CR and LF, NUL, non-ASCII, over-long lines, commands
pipelined around STARTTLS, messages that try to smuggle a second transaction)
and switches the upstream's faults between steps. After every step it checks:

- no 250 to a final dot without the upstream's 250 for that message, and
  nothing the upstream accepted that the client was not told 250 for;
- nothing relayed for a message smtpgate refused (bare CR/LF/NUL, too long);
- no bare CR or LF in anything the upstream received;
- a fresh client still gets a greeting and a goodbye.

smtpgate and the sink run on their own event loop in a thread; the machine
speaks over blocking sockets, so every byte is exactly what the test wrote.
`make test` runs a few hundred examples; `make fuzz` (SMTPGATE_FUZZ=1) runs
many more, with longer sessions.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import os
import socket
import ssl
import threading
from collections import Counter

import pytest
from hypothesis import HealthCheck, assume, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from smtpgate.config import load_config
from smtpgate.mail.dataguard import scan_data
from smtpgate.runtime.gate import Gate
from smtpgate.users import add_user
from tests.conftest import write_config
from tests.support.configs import TEAMS_A_B
from tests.support.sink import Sink, make_test_cert

FUZZ = bool(os.environ.get("SMTPGATE_FUZZ"))
# make test: a fixed set of examples (derandomize), so a fresh clone without a hypothesis
# database runs the same sessions and the reach assertions below cannot flake; make fuzz
# explores at random.
settings.register_profile("smtp-state", max_examples=150, stateful_step_count=12, deadline=None,
                          derandomize=True, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("smtp-state-fuzz", max_examples=1000, stateful_step_count=30, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
PROFILE = settings.get_profile("smtp-state-fuzz" if FUZZ else "smtp-state")

USER, PASSWORD = "jane", "jane's pass"
TIMEOUT = 15  # seconds a reply may take; the server never should come close

# One line each, answered with exactly one reply (no DATA, STARTTLS, QUIT, bare AUTH).
COMMANDS = [
    "EHLO client.test", "HELO client.test", "EHLO", "MAIL FROM:<a@corp.example>", "MAIL FROM:<>",
    "MAIL FROM:<a@corp.example> SIZE=100 BODY=8BITMIME", "MAIL FROM:a@corp.example", "MAIL FROM:<a@corp.example> X=Y",
    "RCPT TO:<b@x.example>", "RCPT TO:<c@x.example> NOTIFY=NEVER", "RCPT TO:<uk-payroll@corp.example>",
    "RCPT TO:<pl-payroll@corp.example>", "RCPT TO:<>", "RCPT TO:<a@b@c>", "RSET", "NOOP", "VRFY b@x.example",
    "HELP", "XYZZY", "AUTH PLAIN !!!notbase64", "MAIL FROM:<ü@corp.example> SMTPUTF8", "RCPT TO:<\"a b\"@x.example>",
]
# Pieces of a raw line: every one ends with CRLF; a bare LF inside makes two lines.
RAW_HEADS = [b"MAIL FROM:<a@corp.example>", b"RCPT TO:<b@x.example>", b"NOOP", b"", b"EHLO x", b"RSET", b"DAT"]
RAW_JUNK = [b"\r", b"\n", b"\x00", b"\xff\xfe", b"A" * 1200, b" ", b"\t", b".", "ä".encode()]
PIPELINABLE = ["EHLO client.test", "MAIL FROM:<a@corp.example>", "RCPT TO:<b@x.example>", "RSET", "NOOP", "XYZZY"]
# Inside a message: what may appear in the data; the smuggling shapes end a line the wrong way.
BODY_CLEAN = [b"Line of text", b"", b"..leading dot", b"Subject-like: line", b"x" * 200]
BODY_BAD = [b"bare\nLF", b"bare\rCR", b"NUL\x00", b"\n.\nMAIL FROM:<evil@x.example>\r\nRCPT TO:<evil@x.example>",
            b"\r\n.\nRSET", b"\n.\r\nNOOP", b"y" * 1100]
RECIPIENTS = st.lists(st.sampled_from(["b@x.example", "uk-payroll@corp.example", "c@x.example"]),
                      min_size=1, max_size=3)
FAULTS = {
    "healthy": {},
    "mail-451": {"mail_reply": "451 4.3.0 try later"},
    "mail-550": {"mail_reply": "550 5.7.1 no"},
    "rcpt-450": {"rcpt_replies": {"b@x.example": "450 4.2.0 busy"}},
    "rcpt-550": {"rcpt_replies": {"b@x.example": "550 5.1.1 unknown"}},
    "dot-451": {"data_reply": "451 4.3.0 queue full"},
    "dot-554": {"data_reply": "554 5.6.0 refused"},
    "dot-drop": {"drop_after_data": True},
}


class Live:
    """smtpgate relaying to a sink, both on one event loop in a background thread."""

    def __init__(self, folder):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.folder = folder
        self.sink, self.gate, self.port = self.run(self._start())

    def run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(60)

    async def _start(self):
        sink = Sink(data_size_limit=50_000_000)
        await sink.start()
        cert, key = make_test_cert(self.folder / "tls")
        add_user(self.folder / "users", USER, PASSWORD)
        config = load_config(write_config(self.folder, f"""\
hostname: relay.test.example
listeners:
  - name: submission
    address: 127.0.0.1:0
    tls: starttls
    tls_cert: {cert}
    tls_key: {key}
    auth: optional
    relay_networks: [127.0.0.1/32]
users_file: users
upstream:
  url: smtp://127.0.0.1:{sink.port}
  timeout: 10
{TEAMS_A_B}\
store:
  url: sqlite:smtpgate.db
  auto_upgrade: true
logging:
  level: warning
limits:
  max_message_size: 100000
  max_connections_per_client: 1000
"""))
        gate = Gate(config)
        await gate.start()
        return sink, gate, gate.bound[0][1]

    def set_fault(self, name: str) -> None:
        def apply():
            sink = self.sink
            sink.mail_reply, sink.rcpt_replies, sink.data_reply, sink.drop_after_data = None, {}, None, False
            for key, value in FAULTS[name].items():
                setattr(sink, key, value)

        self.loop.call_soon_threadsafe(apply)

    def close(self) -> None:
        async def stop():
            await self.gate.drain(0)
            await self.sink.stop()

        self.run(stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class Client:
    """A blocking SMTP client that sends bytes as given and reads whole replies."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        self.buffer = b""
        self.closed = False

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError:
            self.closed = True

    def reply(self) -> str:
        """One reply, its lines joined by newlines; "" when the server closed the connection."""
        lines = []
        while True:
            while b"\n" not in self.buffer:
                try:
                    chunk = self.sock.recv(65536)
                except (ConnectionResetError, ssl.SSLError):
                    chunk = b""
                except TimeoutError:
                    raise AssertionError(f"no reply within {TIMEOUT}s; so far {lines}") from None
                if not chunk:
                    self.closed = True
                    return "\n".join(lines)
                self.buffer += chunk
            line, _, self.buffer = self.buffer.partition(b"\n")
            text = line.decode("utf-8", "replace").rstrip("\r")
            lines.append(text)
            if len(text) < 4 or text[3] != "-":
                if text.startswith("421"):
                    self.closed = True
                return "\n".join(lines)

    def starttls(self) -> bool:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        try:
            self.sock = context.wrap_socket(self.sock, server_hostname="localhost")
        except (OSError, ssl.SSLError):
            self.closed = True
            return False
        return True

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def code(reply: str) -> int:
    return int(reply[:3]) if reply[:3].isdigit() else 0


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    server = Live(tmp_path_factory.mktemp("state-machine"))
    yield server
    server.close()


_tokens = itertools.count(1)


class SmtpSession(RuleBasedStateMachine):
    live: Live  # set by the test below

    def __init__(self):
        super().__init__()
        self.client: Client | None = None
        self.tls = self.greeted = self.in_tx = self.has_rcpt = False
        self.told_250: set[str] = set()  # tokens the client got 250 for at its final dot

    # ------------------------------------------------------------ helpers

    def connect(self) -> None:
        self.client = Client(self.live.port)
        assert code(self.client.reply()) == 220
        self.tls = self.greeted = self.in_tx = self.has_rcpt = False

    def command(self, line: str | bytes) -> str:
        assert self.client is not None
        self.client.send(line.encode() + b"\r\n" if isinstance(line, str) else line)
        reply = self.client.reply()
        self.track(line, reply)
        return reply

    def track(self, line, reply: str) -> None:
        verb = (line.decode("utf-8", "replace") if isinstance(line, bytes) else line).split(" ", 1)[0].upper()
        ok = code(reply) // 100 == 2
        if verb in ("EHLO", "HELO", "RSET") and ok:
            self.greeted = self.greeted or verb != "RSET"
            self.in_tx = self.has_rcpt = False
        elif verb == "MAIL" and ok:
            self.in_tx, self.has_rcpt = True, False
        elif verb == "RCPT" and ok:
            self.has_rcpt = True

    def resync(self) -> None:
        """After raw or pipelined input the state is unknown: RSET makes it known again."""
        if self.client is not None and not self.client.closed:
            reply = self.command("RSET")
            assert reply == "" or code(reply) in (250, 421), reply
        self.settle()

    def settle(self) -> None:
        if self.client is not None and self.client.closed:
            self.client.close()
            self.client = None

    def sink_tokens(self, messages) -> set[str]:
        out = set()
        for m in list(messages):
            for line in m.data.split(b"\r\n"):
                if line.startswith(b"X-Token: "):
                    out.add(line[9:].decode())
        return out

    # ------------------------------------------------------------ rules

    @initialize()
    def start(self):
        self.live.set_fault("healthy")
        self.connect()

    @precondition(lambda self: self.client is None)
    @rule()
    def reconnect(self):
        self.connect()

    @precondition(lambda self: self.client is not None)
    @rule(line=st.sampled_from(COMMANDS))
    def one_command(self, line):
        reply = self.command(line)
        assert reply == "" or 200 <= code(reply) < 600, reply
        self.settle()

    @precondition(lambda self: self.client is not None)
    @rule(head=st.sampled_from(RAW_HEADS), junk=st.lists(st.sampled_from(RAW_JUNK), min_size=1, max_size=3),
          tail=st.sampled_from([b"", b" x", b"<b@x.example>"]))
    def raw_line(self, head, junk, tail):
        data = head + b"".join(junk) + tail + b"\r\n"
        self.client.send(data)
        for _ in range(data.count(b"\n")):  # aiosmtpd ends a command line at LF
            reply = self.client.reply()
            if self.client.closed:
                break
            assert 200 <= code(reply) < 600, reply
        self.resync()

    @precondition(lambda self: self.client is not None)
    @rule(lines=st.lists(st.sampled_from(PIPELINABLE), min_size=1, max_size=4),
          starttls_at=st.none() | st.integers(0, 4))
    def pipelined(self, lines, starttls_at):
        if starttls_at is not None and not self.tls:
            lines = lines[:starttls_at] + ["STARTTLS"] + lines[starttls_at:]
        self.client.send("".join(line + "\r\n" for line in lines).encode())
        for i, line in enumerate(lines):
            reply = self.client.reply()
            if self.client.closed:
                break
            self.track(line, reply)
            if line == "STARTTLS" and code(reply) == 220:
                injected = lines[i + 1:]
                if self.client.starttls():
                    self.tls, self.greeted, self.in_tx, self.has_rcpt = True, False, False, False
                    if injected:
                        # RFC 3207 4.2: what was sent before the handshake is forgotten, not run.
                        assert code(self.command("EHLO client.test")) == 250
                        assert code(self.command("RCPT TO:<b@x.example>")) == 503
                break
        self.resync()

    @precondition(lambda self: self.client is not None and not self.tls)
    @rule()
    def starttls(self):
        reply = self.command("STARTTLS")
        if code(reply) == 220:
            if self.client.starttls():
                self.tls, self.greeted, self.in_tx, self.has_rcpt = True, False, False, False
        self.settle()

    @precondition(lambda self: self.client is not None and self.tls and self.greeted)
    @rule()
    def auth(self):
        reply = self.command("AUTH PLAIN " + base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode())
        # 503: already authenticated; 500: the session said HELO, not EHLO (no ESMTP, no AUTH).
        assert code(reply) in (235, 503, 500, 421, 0), reply
        self.settle()

    @precondition(lambda self: self.client is not None and not self.in_tx)
    @rule(recipients=RECIPIENTS)
    def begin_transaction(self, recipients):
        """EHLO when needed, MAIL and RCPTs."""
        if not self.greeted:
            self.command("EHLO client.test")
        for line in ["MAIL FROM:<a@corp.example>"] + [f"RCPT TO:<{r}>" for r in recipients]:
            if self.client.closed:
                break
            self.command(line)
        if self.client.closed:
            self.settle()

    @precondition(lambda self: self.client is not None)
    @rule(fault=st.sampled_from(sorted(FAULTS)))
    def upstream_fault(self, fault):
        self.live.set_fault(fault)

    @precondition(lambda self: self.client is not None)
    @rule(lines=st.lists(st.sampled_from(BODY_CLEAN), max_size=4),
          bad=st.lists(st.sampled_from(BODY_BAD), max_size=2), subject=st.sampled_from(["hello", "Re: 101203-T"]),
          recipients=RECIPIENTS, dot_fault=st.none() | st.sampled_from(["dot-451", "dot-554", "dot-drop"]))
    def message(self, lines, bad, subject, recipients, dot_fault):
        """DATA and a message (a transaction is begun first when none is open)."""
        if dot_fault is not None:
            self.live.set_fault(dot_fault)
        if not (self.in_tx and self.has_rcpt):
            if self.in_tx:
                self.command("RSET")
            self.begin_transaction(recipients)
            if not (self.in_tx and self.has_rcpt):
                return
        token = f"t{next(_tokens)}"
        head = [b"From: a@corp.example", b"To: b@x.example", f"Subject: {subject}".encode(),
                f"X-Token: {token}".encode(), b""]
        # Clean lines are dot-stuffed as a client would; the bad pieces go out exactly as written.
        clean = [b"." + line if line.startswith(b".") else line for line in head + lines]
        body = b"\r\n".join(clean + bad) + b"\r\n"
        assume(b"\r\n.\r\n" not in b"\r\n" + body)  # the message ends only where the test ends it
        data_reply = self.command("DATA")
        if code(data_reply) != 354:
            self.in_tx = self.has_rcpt = False
            self.settle()
            return
        self.client.send(body + b".\r\n")
        reply = self.client.reply()
        self.in_tx = self.has_rcpt = False
        outcome = f"dot answered {code(reply)}" + (" (bad data)" if bad else "")
        event(outcome)
        SmtpSession.outcomes[outcome] += 1
        relayed = token in self.sink_tokens(self.live.sink.messages)
        if code(reply) == 250:
            self.told_250.add(token)
            assert relayed, f"250 to the dot of {token} without the upstream's 250"
            assert not bad, f"{token} had bare CR/LF/NUL or an over-long line and still got 250"
        else:
            assert not relayed, f"{token} was relayed but the client heard {reply!r}"
        if bad:
            assert 500 <= code(reply) < 600 or self.client.closed, reply
            assert token not in self.sink_tokens(self.live.sink.received), f"{token} reached the upstream"
        self.settle()

    @precondition(lambda self: self.client is not None)
    @rule()
    def quit(self):
        reply = self.command("QUIT")
        assert code(reply) in (221, 0), reply
        self.client.close()
        self.client = None

    # ------------------------------------------------------------ invariants

    @invariant()
    def upstream_got_only_what_the_client_was_told(self):
        extra = self.sink_tokens(self.live.sink.messages) - self.told_250 - SmtpSession.earlier
        assert not extra, f"the upstream accepted {extra} but the client never heard 250 for them"

    @invariant()
    def no_bare_cr_or_lf_forwarded(self):
        received = list(self.live.sink.received)
        for m in received[SmtpSession.seen:]:
            assert scan_data(m.data) is None, m.data[:200]
        SmtpSession.seen = len(received)

    @invariant()
    def a_fresh_client_is_answered(self):
        fresh = Client(self.live.port)
        try:
            assert code(fresh.reply()) == 220
            fresh.send(b"QUIT\r\n")
            assert code(fresh.reply()) == 221
        finally:
            fresh.close()

    def teardown(self):
        if self.client is not None:
            self.client.close()
        SmtpSession.earlier |= self.told_250

    earlier: set[str] = set()  # tokens told 250 in earlier examples (the sink keeps them)
    seen = 0  # messages the upstream received that were checked for bare CR/LF already
    outcomes: Counter[str] = Counter()  # how final dots were answered, over the whole run


def test_smtp_state_machine(live):
    SmtpSession.live = live
    SmtpSession.earlier = set()
    SmtpSession.seen = 0
    SmtpSession.outcomes = Counter()
    machine = SmtpSession.TestCase
    machine.settings = PROFILE
    machine().runTest()
    # The run reached the interesting places: messages relayed, refused for their data, and
    # refused by the failing upstream (a machine that never got past MAIL would pass vacuously).
    outcomes = SmtpSession.outcomes
    assert outcomes["dot answered 250"] >= 3, outcomes
    assert sum(n for k, n in outcomes.items() if "bad data" in k) >= 10, outcomes
    assert sum(n for k, n in outcomes.items() if k[13] in "45" and "bad" not in k) >= 5, outcomes
