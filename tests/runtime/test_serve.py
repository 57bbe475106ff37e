"""`smtpgate serve` as a process: systemd readiness, SIGHUP reload, SIGTERM drain, the demo config."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sqlite3
import sys
from pathlib import Path

import pytest

from tests.conftest import write_config
from tests.support.wire import Wire, code, free_port

ROOT = Path(__file__).resolve().parents[2]


def config_text(port: int, extra: str = "") -> str:
    return f"""\
listeners:
  - name: submission
    address: 127.0.0.1:{port}
    relay_networks: [127.0.0.0/8]
upstream:
  url: maildir:outbox
internal_domains: [corp.example]
store:
  url: sqlite:smtpgate.db
  auto_upgrade: true
shutdown_grace: 20
{extra}"""


class Served:
    """A running `smtpgate serve` whose stdout is read line by line as JSON events."""

    def __init__(self, proc: asyncio.subprocess.Process):
        self.proc = proc
        self.events: list[dict] = []

    async def wait_event(self, name: str, timeout: float = 20) -> dict:
        for event in self.events:
            if event.get("event") == name:
                return event
        async with asyncio.timeout(timeout):
            while True:
                line = await self.proc.stdout.readline()
                if not line:
                    raise AssertionError(f"serve exited before {name}; events: {self.events}")
                event = json.loads(line)
                self.events.append(event)
                if event.get("event") == name:
                    return event


async def start_serve(config: Path, notify_path: str | None = None) -> Served:
    env = dict(os.environ)
    env.pop("NOTIFY_SOCKET", None)
    if notify_path:
        env["NOTIFY_SOCKET"] = notify_path
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "smtpgate", "serve", "-c", str(config),
        stdout=asyncio.subprocess.PIPE, env=env, cwd=str(config.parent))
    return Served(proc)


async def test_ready_reload_and_drain(tmp_path):
    port = free_port()
    config = write_config(tmp_path, config_text(port))
    notify_path = str(tmp_path / "notify.sock")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(notify_path)
    notify.setblocking(False)
    served = await start_serve(config, notify_path)
    loop = asyncio.get_running_loop()
    try:
        ready = await asyncio.wait_for(loop.sock_recv(notify, 256), 20)
        assert ready == b"READY=1"
        await served.wait_event("smtpgate.ready")

        # A broken file on SIGHUP is refused and the old config kept.
        config.write_text(config_text(port, "upstream_typo: 1\n"))
        served.proc.send_signal(signal.SIGHUP)
        rejected = await served.wait_event("config.rejected")
        assert any("upstream_typo: unknown key" in e for e in rejected["errors"])

        wire, greeting = await Wire.open(port)
        assert code(greeting) == 220
        await wire.cmd("EHLO client.test")
        assert code(await wire.cmd("MAIL FROM:<a@corp.example>")) == 250
        assert code(await wire.cmd("RCPT TO:<b@x.example>")) == 250

        # SIGTERM with a transaction in flight: smtpgate stops accepting, and the
        # transaction may finish.
        served.proc.send_signal(signal.SIGTERM)
        started = await served.wait_event("shutdown.started")
        assert started["grace"] == 20  # the file's shutdown_grace
        # Handled after the drain began: the listeners were closed in the same step as that event.
        assert code(await wire.cmd("NOOP")) == 250
        with pytest.raises(ConnectionRefusedError):
            await Wire.open(port)
        assert code(await wire.cmd("DATA")) == 354
        await wire.send(b"Subject: in flight\r\n\r\nbody\r\n.\r\n")
        assert code(await wire.reply()) == 250
        assert await asyncio.wait_for(served.proc.wait(), 30) == 0
        # systemd heard of the refused reload (RELOADING, then READY again) and of the stop.
        heard = [await asyncio.wait_for(loop.sock_recv(notify, 256), 5) for _ in range(3)]
        assert heard == [b"RELOADING=1", b"READY=1", b"STOPPING=1"]
        delivered = list((tmp_path / "outbox" / "new").iterdir())
        assert len(delivered) == 1
        envelope = json.loads((tmp_path / "outbox" / "envelopes" / f"{delivered[0].name}.json").read_text())
        assert envelope["mail_from"] == "a@corp.example" and envelope["rcpt_tos"] == ["b@x.example"]
    finally:
        notify.close()
        if served.proc.returncode is None:
            served.proc.kill()
            await served.proc.wait()


async def test_a_store_locked_past_its_timeout_fails_the_start_and_the_process_exits(tmp_path):
    config = write_config(tmp_path, config_text(free_port()).replace("  auto_upgrade: true\n",
                                                                     "  auto_upgrade: true\n  timeout: 0.5\n"))
    blocker = sqlite3.connect(tmp_path / "smtpgate.db", isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")  # say, an operator's sqlite3 shell in the middle of a change
    served = await start_serve(config)
    try:
        failed = await served.wait_event("startup.failed")
        assert failed["reason"] == f"sqlite {tmp_path / 'smtpgate.db'}: database is locked"
        # What had started is wound down in order before the exit, although nothing was served.
        complete = await served.wait_event("shutdown.complete")
        assert complete["sessions_closed"] == 0
        assert await asyncio.wait_for(served.proc.wait(), 20) == 1
    finally:
        blocker.close()
        if served.proc.returncode is None:
            served.proc.kill()
            await served.proc.wait()


async def test_grace_expiry_says_421_to_every_session_still_open(tmp_path):
    """A transaction that outlasts shutdown_grace is cut with 421 4.3.2, idle sessions too;
    nothing half-sent is delivered."""
    port = free_port()
    config = write_config(tmp_path, config_text(port).replace("shutdown_grace: 20", "shutdown_grace: 1"))
    served = await start_serve(config)
    try:
        await served.wait_event("smtpgate.ready")
        idle, _ = await Wire.open(port)
        assert code(await idle.cmd("EHLO idle.test")) == 250
        busy, _ = await Wire.open(port)
        assert code(await busy.cmd("EHLO busy.test")) == 250
        assert code(await busy.cmd("MAIL FROM:<a@corp.example>")) == 250
        assert code(await busy.cmd("RCPT TO:<b@x.example>")) == 250
        served.proc.send_signal(signal.SIGTERM)
        await served.wait_event("shutdown.started")
        # Unprompted, once the grace is over: the goodbye, then the end of the connection.
        for wire in (busy, idle):
            assert (await wire.reply(timeout=20)).startswith("421 4.3.2 "), wire
            assert await wire.reply() == ""
        complete = await served.wait_event("shutdown.complete")
        assert complete["sessions_closed"] == 2
        assert await asyncio.wait_for(served.proc.wait(), 30) == 0
        assert not (tmp_path / "outbox" / "new").exists() or not list((tmp_path / "outbox" / "new").iterdir())
    finally:
        if served.proc.returncode is None:
            served.proc.kill()
            await served.proc.wait()


async def test_good_reload_applies_to_new_sessions(tmp_path):
    port = free_port()
    config = write_config(tmp_path, config_text(port))
    served = await start_serve(config)
    try:
        await served.wait_event("smtpgate.ready")
        config.write_text(config_text(port, "limits:\n  max_message_size: 1000\n"))
        served.proc.send_signal(signal.SIGHUP)
        await served.wait_event("config.reloaded")
        wire, _ = await Wire.open(port)
        ehlo = await wire.cmd("EHLO client.test")
        assert "250-SIZE 1000" in ehlo.split("\n")
        await wire.cmd("QUIT")
    finally:
        served.proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(served.proc.wait(), 30) == 0


async def test_a_reload_naming_a_certificate_that_does_not_load_is_refused_naming_the_file(tmp_path):
    """The listener serves STARTTLS; the file now names, for it, a certificate and key that do not load
    (the file's own checks read them only for tls: starttls or implicit, and this file says none).
    SIGHUP refuses the reload: config.rejected names the file and why; the listener serves on as before."""
    from tests.support.sink import make_test_cert

    port = free_port()
    cert, key = make_test_cert(tmp_path / "tls")
    broken = tmp_path / "tls" / "broken.pem"
    broken.write_text("not a certificate\n")
    listener = "    relay_networks: [127.0.0.0/8]\n"
    text = config_text(port)
    assert listener in text
    config = write_config(tmp_path, text.replace(
        listener, listener + f"    tls: starttls\n    tls_cert: {cert}\n    tls_key: {key}\n"))
    served = await start_serve(config)
    try:
        await served.wait_event("smtpgate.ready")
        config.write_text(text.replace(listener, listener + f"    tls_cert: {broken}\n    tls_key: {broken}\n"))
        served.proc.send_signal(signal.SIGHUP)
        rejected = await served.wait_event("config.rejected")
        assert rejected["path"] == str(config)
        [error] = rejected["errors"]
        assert error.startswith(f"listener submission: tls_cert/tls_key {broken}: ")
        wire, _ = await Wire.open(port)
        assert "250-STARTTLS" in (await wire.cmd("EHLO client.test")).split("\n")
        await wire.cmd("QUIT")
    finally:
        served.proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(served.proc.wait(), 30) == 0


async def test_serve_refuses_bad_config(tmp_path):
    config = write_config(tmp_path, config_text(free_port(), "workers: lots\n"))
    served = await start_serve(config)
    rejected = await served.wait_event("config.rejected")
    assert "workers: expected a whole number" in rejected["error"]
    assert await asyncio.wait_for(served.proc.wait(), 30) == 2


async def test_serve_reports_port_in_use(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        config = write_config(tmp_path, config_text(busy.getsockname()[1]))
        served = await start_serve(config)
        failed = await served.wait_event("startup.failed")
        assert "cannot listen on" in failed["reason"]
        assert await asyncio.wait_for(served.proc.wait(), 30) == 1


async def test_demo_config_serves_into_var(tmp_path):
    """The shipped demo works as `make serve` runs it (copied so the tree's var/ is not touched)."""
    demo = (ROOT / "config" / "smtpgate.yaml").read_text()
    port = free_port()
    folder = tmp_path / "config"
    folder.mkdir()
    config = write_config(folder, demo.replace("127.0.0.1:2525", f"127.0.0.1:{port}"))
    served = await start_serve(config)
    try:
        await served.wait_event("smtpgate.ready")
        wire, _ = await Wire.open(port)
        await wire.cmd("EHLO client.test")
        await wire.cmd("MAIL FROM:<jane@corp.example>")
        await wire.cmd("RCPT TO:<client@supplier.example>")
        await wire.cmd("DATA")
        await wire.send(b"Subject: demo\r\n\r\nhello\r\n.\r\n")
        assert code(await wire.reply()) == 250
        relayed = await served.wait_event("message.relayed")
        assert relayed["recipients"] == [{"original": "client@supplier.example",
                                          "relayed": "client@supplier.example"}]
        assert len(list((tmp_path / "var" / "outbox" / "new").iterdir())) == 1
    finally:
        served.proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(served.proc.wait(), 30) == 0
