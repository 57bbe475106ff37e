"""`smtpgate serve` as a child process whose JSON log lines a test can wait for.

Its stdout is read continuously (a full pipe would block the server's logging),
every event kept in `events`. Usage::

    async with ServeProcess(config_path) as served:
        await served.wait_event("smtpgate.ready")
        ...
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

__all__ = ["ServeProcess", "run_cli"]


class ServeProcess:
    def __init__(self, config: Path, *, ready_timeout: float = 30):
        self.config = config
        self.ready_timeout = ready_timeout
        self.proc: asyncio.subprocess.Process | None = None
        self.events: list[dict] = []
        self.ready: dict = {}
        self._changed = asyncio.Event()
        self._reader: asyncio.Task | None = None

    async def __aenter__(self) -> ServeProcess:
        env = dict(os.environ)
        env.pop("NOTIFY_SOCKET", None)
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "smtpgate", "serve", "-c", str(self.config),
            stdout=asyncio.subprocess.PIPE, env=env, cwd=str(self.config.parent))
        self._reader = asyncio.get_running_loop().create_task(self._read())
        self.ready = await self.wait_event("smtpgate.ready", timeout=self.ready_timeout)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def stop(self) -> int | None:
        """SIGTERM, wait for the exit (kill after 30 s); returns the exit status."""
        proc = self.proc
        if proc is None:
            return None
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        if self._reader is not None:
            await asyncio.wait([self._reader], timeout=5)
        return proc.returncode

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        while True:
            line = await self.proc.stdout.readline()
            if not line:
                break
            try:
                self.events.append(json.loads(line))
            except ValueError:
                self.events.append({"event": "(not json)", "line": line.decode("utf-8", "replace")})
            self._changed.set()
            self._changed = asyncio.Event()
        self._changed.set()

    def named(self, name: str) -> list[dict]:
        return [e for e in self.events if e.get("event") == name]

    async def wait_event(self, name: str, where: Callable[[dict], bool] = lambda e: True,
                         timeout: float = 20) -> dict:
        """The first event called name for which where(event) holds; AssertionError after timeout s."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    for event in self.events:
                        if event.get("event") == name and where(event):
                            return event
                    assert self.proc is not None
                    if self._reader is not None and self._reader.done():
                        raise AssertionError(f"serve exited ({self.proc.returncode}) before {name}; "
                                             f"last events {self.events[-10:]}")
                    await self._changed.wait()
        except TimeoutError:
            raise AssertionError(f"no {name} within {timeout}s; last events {self.events[-10:]}") from None


async def run_cli(*args: str, cwd: Path) -> tuple[int, str]:
    """Run `smtpgate ARGS...` and return (exit status, stdout)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "smtpgate", *args, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL, cwd=str(cwd))
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode("utf-8", "replace")
