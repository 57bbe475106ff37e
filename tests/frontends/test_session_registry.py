"""The session registry's own bookkeeping (smtpgate/frontends/registry.py): sessions per
client address, failed logins per address, background tasks a drain waits for."""

from __future__ import annotations

import asyncio

from smtpgate.frontends.registry import AuthFailures, SessionRegistry


class _Session:
    def __init__(self, busy: bool) -> None:
        self.busy = busy

    def say_goodbye(self, line: str) -> None:
        pass


def test_admit_counts_up_to_the_limit_per_address_and_release_forgets_the_address():
    registry = SessionRegistry()
    assert registry.admit("192.0.2.1", 2) and registry.admit("192.0.2.1", 2)
    assert not registry.admit("192.0.2.1", 2)
    assert registry.admit("192.0.2.2", 2)
    assert registry.per_client == {"192.0.2.1": 2, "192.0.2.2": 1}
    registry.release("192.0.2.1")
    assert registry.per_client["192.0.2.1"] == 1
    registry.release("192.0.2.2")
    assert "192.0.2.2" not in registry.per_client
    assert registry.admit("192.0.2.1", 2) and not registry.admit("192.0.2.1", 2)


def test_sessions_length_and_busy():
    registry = SessionRegistry()
    assert len(registry) == 0 and not registry.busy and registry.draining is False
    idle, working = _Session(False), _Session(True)
    registry.add(idle)
    assert len(registry) == 1 and not registry.busy
    registry.add(working)
    assert len(registry) == 2 and registry.busy
    registry.discard(working)
    registry.discard(working)  # twice: no error
    assert len(registry) == 1 and not registry.busy


def test_failed_logins_count_per_address():
    failures = AuthFailures()
    assert (failures.forget, failures.keep) == (900.0, 10_000)  # 15 minutes, 10 000 addresses
    assert [failures.fail("192.0.2.1") for _ in range(3)] == [1, 2, 3]
    assert failures.fail("192.0.2.2") == 1


def test_failed_logins_are_forgotten_after_forget_seconds():
    failures = AuthFailures(forget=-1.0)  # every earlier failure is older than that
    assert [failures.fail("192.0.2.1") for _ in range(3)] == [1, 1, 1]


def test_beyond_keep_addresses_the_one_failing_longest_ago_goes_first():
    failures = AuthFailures(keep=2)
    failures.fail("a")
    failures.fail("b")
    assert failures.fail("a") == 2  # two addresses: both kept; "a" is now the newest
    failures.fail("c")  # "b" goes
    assert failures.fail("a") == 3
    assert failures.fail("b") == 1


async def test_spawned_tasks_are_held_until_they_end():
    registry = SessionRegistry()
    started = asyncio.Event()
    finish = asyncio.Event()

    async def work():
        started.set()
        await finish.wait()
        return "done"

    task = registry.spawn(work())
    await started.wait()
    assert registry.tasks == {task}
    finish.set()
    assert await task == "done"
    assert registry.tasks == set()  # its done callback ran before ours
