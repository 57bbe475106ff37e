"""Shared fixtures: a real smtpgate on a loopback port, relaying to a sink the test controls."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from hypothesis import settings

from smtpgate.config import load_config
from smtpgate.runtime.gate import Gate
from smtpgate.log import setup_logging
from tests.support.ci import needs
from tests.support.configs import TEAMS_A_B
from tests.support.sink import Sink

# `make mutate` runs the core's tests once per mutant on a loaded machine: the same examples
# every time (a mutant is judged on one input set), no deadline, fewer of them.
settings.register_profile("mutate", deadline=None, derandomize=True, max_examples=50)

# Properties are about correctness, not speed: a busy 2-core machine must not fail them.
settings.register_profile("smtpgate", deadline=None)
settings.load_profile("smtpgate")

BASE_CONFIG = """\
hostname: relay.test.example
listeners:
  - name: submission
    address: 127.0.0.1:0
    relay_networks: [127.0.0.1/32]
upstream:
  url: {upstream}
  timeout: 10
""" + TEAMS_A_B + """\
store:
  url: {store}
  auto_upgrade: true
"""


def write_config(folder: Path, text: str, name: str = "smtpgate.yaml") -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


@pytest.fixture
def log_lines(capsys):
    """JSON log lines smtpgate wrote so far (structlog prints to stdout)."""
    import json

    setup_logging("json", "debug")

    def read() -> list[dict]:
        out = capsys.readouterr().out
        read.seen.extend(json.loads(line) for line in out.splitlines() if line.startswith("{"))
        return read.seen

    read.seen = []
    return read


@pytest.fixture
async def sink():
    async with Sink(data_size_limit=50_000_000) as s:
        yield s


@pytest.fixture
def config_for(tmp_path):
    """Build a config for a sink port (or any upstream URL) plus extra YAML appended."""

    def build(upstream: str, extra: str = "", store: str | None = None):
        text = BASE_CONFIG.format(upstream=upstream, store=store or f"sqlite:{tmp_path}/smtpgate.db")
        return load_config(write_config(tmp_path, text + textwrap.dedent(extra)))

    return build


@pytest.fixture
async def start_gate():
    """Start a Gate on the test's loop; returns (gate, port). Stopped at teardown."""
    gates: list[Gate] = []

    async def start(config) -> tuple[Gate, int]:
        gate = Gate(config)
        await gate.start()
        gates.append(gate)
        return gate, gate.bound[0][1]

    yield start
    for gate in gates:
        await gate.drain(0)


@pytest.fixture
async def relay(sink, config_for, start_gate, log_lines):
    """smtpgate relaying to the sink: (gate, port)."""
    return await start_gate(config_for(f"smtp://127.0.0.1:{sink.port}"))


def pytest_runtest_setup(item: pytest.Item) -> None:
    """A test marked `postfix` runs only where private Postfix instances can (fails under CI)."""
    if item.get_closest_marker("postfix") is not None:
        from tests.support.postfix import postfix_available

        why = postfix_available()
        if why:
            needs("Postfix", why)


@pytest.fixture
async def corp_postfix(request, tmp_path):
    """A private Postfix for corp.example with plus addressing and Maildirs for both mailboxes."""
    import asyncio

    from tests.support.postfix import PostfixInstance

    if request.node.get_closest_marker("postfix") is None:
        pytest.fail("a test that runs Postfix is marked @pytest.mark.postfix (so -m selects it)")
    instance = PostfixInstance(tmp_path)
    await asyncio.to_thread(instance.start)
    yield instance
    await asyncio.to_thread(instance.stop)
