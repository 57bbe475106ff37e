"""The event loop `smtpgate serve` runs on (smtpgate.runtime.loop, SMTPGATE_EVENT_LOOP)."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

from smtpgate.runtime.loop import LoopChoiceError, loop_factory
from tests.support.wire import Wire, code, free_port
from tests.runtime.test_serve import config_text, write_config


def installed_uvloop():
    """uvloop, for the tests that run it (they skip where it is not installed)."""
    return pytest.importorskip("uvloop")


def test_uvloop_only_when_asked_for_and_asyncio_by_default():
    uvloop = installed_uvloop()
    for choice in ("uvloop", "UVLOOP", " uvloop "):
        factory = loop_factory(choice)
        loop = factory()
        try:
            assert isinstance(loop, uvloop.Loop)
        finally:
            loop.close()
    for choice in ("auto", "asyncio", "AUTO", " ", ""):
        assert loop_factory(choice) is None, choice


def test_the_default_is_asyncio_even_with_uvloop_installed(monkeypatch):
    installed_uvloop()
    monkeypatch.delenv("SMTPGATE_EVENT_LOOP", raising=False)
    assert loop_factory() is None


def test_uvloop_asked_for_where_it_is_not_installed_is_an_error_saying_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "uvloop", None)  # `import uvloop` fails, as where it is not installed
    with pytest.raises(LoopChoiceError) as caught:
        loop_factory("uvloop")
    assert str(caught.value) == ("SMTPGATE_EVENT_LOOP=uvloop, but uvloop is not installed "
                                 "(pip install 'smtpgate[uvloop]')")


def test_an_unknown_choice_is_an_error_naming_the_variable():
    with pytest.raises(LoopChoiceError, match="SMTPGATE_EVENT_LOOP: expected one of auto, asyncio, uvloop"):
        loop_factory("trio")


async def serve(tmp_path, choice: str) -> tuple[asyncio.subprocess.Process, int]:
    port = free_port()
    config = write_config(tmp_path, config_text(port))
    env = dict(os.environ, SMTPGATE_EVENT_LOOP=choice)
    env.pop("NOTIFY_SOCKET", None)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "smtpgate", "serve", "-c", str(config),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env, cwd=str(config.parent))
    return proc, port


async def test_serve_refuses_an_unknown_loop(tmp_path):
    proc, _ = await serve(tmp_path, "trio")
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 2
    assert "SMTPGATE_EVENT_LOOP" in err.decode()


@pytest.mark.parametrize("choice", ["asyncio", "uvloop"])
async def test_serve_relays_on_either_loop(tmp_path, choice):
    if choice == "uvloop":
        installed_uvloop()
    proc, port = await serve(tmp_path, choice)
    try:
        async with asyncio.timeout(30):
            while b"smtpgate.ready" not in (line := await proc.stdout.readline()):
                # at EOF readline returns at once, and the timeout would never fire
                assert line, "smtpgate serve exited before it was ready"
        wire, greeting = await Wire.open(port)
        assert code(greeting) == 220
        assert code(await wire.cmd("EHLO client.test")) == 250
        assert code(await wire.cmd("MAIL FROM:<a@corp.example>")) == 250
        assert code(await wire.cmd("RCPT TO:<b@supplier.example>")) == 250
        assert code(await wire.cmd("DATA")) == 354
        assert code(await wire.cmd("Subject: loop\r\n\r\nbody\r\n.")) == 250
        await wire.close()
        assert len(list((tmp_path / "outbox" / "new").iterdir())) == 1
        assert uses_uvloop(proc.pid) == (choice == "uvloop")
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 30)


def uses_uvloop(pid: int) -> bool:
    """True when the process has uvloop's extension module mapped (it imported uvloop)."""
    return "uvloop" in Path(f"/proc/{pid}/maps").read_text()


def workers_of(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(child) for child in children]


@pytest.mark.parametrize("choice", ["asyncio", "uvloop"])
async def test_workers_run_on_the_chosen_loop_too(tmp_path, choice):
    if choice == "uvloop":
        installed_uvloop()
    port = free_port()
    config = write_config(tmp_path, config_text(port, "workers: 2\n"))
    env = dict(os.environ, SMTPGATE_EVENT_LOOP=choice)
    env.pop("NOTIFY_SOCKET", None)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "smtpgate", "serve", "-c", str(config),
        stdout=asyncio.subprocess.PIPE, env=env, cwd=str(config.parent))
    try:
        async with asyncio.timeout(60):
            while b"smtpgate.ready" not in (line := await proc.stdout.readline()):
                # at EOF readline returns at once, and the timeout would never fire
                assert line, "smtpgate serve exited before it was ready"
        for n in range(4):  # connections spread over both workers
            wire, greeting = await Wire.open(port)
            assert code(greeting) == 220
            assert code(await wire.cmd("EHLO client.test")) == 250
            assert code(await wire.cmd("MAIL FROM:<a@corp.example>")) == 250
            assert code(await wire.cmd("RCPT TO:<b@supplier.example>")) == 250
            assert code(await wire.cmd("DATA")) == 354
            assert code(await wire.cmd(f"Subject: loop {n}\r\n\r\nbody\r\n.")) == 250
            await wire.close()
        assert len(list((tmp_path / "outbox" / "new").iterdir())) == 4
        workers = workers_of(proc.pid)
        assert len(workers) == 2
        assert [uses_uvloop(pid) for pid in workers] == [choice == "uvloop"] * 2
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 60)
