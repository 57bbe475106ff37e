"""The supervisor's restart back-off, its cap and reset, SIGINT, the SIGKILL past the shutdown grace,
reuseport sharing, and a fork that fails.

Real processes, as tests/runtime/test_workers.py runs them, with the supervisor's waits
made short through tests/support/supervised.py; each test asserts the events
(restart_in, worker.killed, shutdown.complete), never how long anything took.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import os
import resource
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from tests.conftest import write_config
from tests.support.wire import free_port
from tests.runtime.test_workers import CONFIG, Supervised, one_session_per_worker

ROOT = Path(__file__).resolve().parents[2]


async def supervise(tmp_path, *, backoff_first=0.05, backoff_max=0.1, stable_after=60.0, stop_margin=0.1,
                    grace: int = 20, ready: bool = True, sharing: str = "shared",
                    preexec_fn: Callable[[], None] | None = None, **environ: str) -> Supervised:
    text = CONFIG.format(port=free_port(), upstream="maildir:outbox", store="sqlite:smtpgate.db", extra="")
    config = write_config(tmp_path, text.replace("shutdown_grace: 20", f"shutdown_grace: {grace}"))
    metrics = tmp_path / "metrics"
    metrics.mkdir()
    path = os.pathsep.join([str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(metrics), PYTHONPATH=path, **environ)
    env.pop("NOTIFY_SOCKET", None)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.support.supervised", str(config),
        *(str(v) for v in (backoff_first, backoff_max, stable_after, stop_margin)), sharing,
        stdout=asyncio.subprocess.PIPE, env=env, cwd=str(tmp_path), preexec_fn=preexec_fn)
    served = Supervised(proc)
    if ready:
        await served.event("smtpgate.ready")
    return served


async def kill_worker_1(served: Supervised, pid: int, seen: set[int]) -> tuple[float, int]:
    """SIGKILL worker 1; (the restart_in it was given, the new worker's pid) once it listens."""
    os.kill(pid, signal.SIGKILL)
    exited = await served.event("worker.exited", pid=pid)
    started = await served.until(lambda: [e for e in served.named("worker.started", worker=1)
                                          if e["pid"] not in seen], "a new worker 1")
    new = started[0]["pid"]
    seen.add(new)
    await served.event("listener.started", pid=new)
    return exited["restart_in"], new


async def restart_delays(served: Supervised, times: int) -> tuple[list[float], int]:
    """Kill worker 1 `times` times: the restart_in each death was given, and the last worker 1's pid."""
    ready = served.named("smtpgate.ready")[0]
    pid, seen = ready["workers"][1], set(ready["workers"])
    delays = []
    for _ in range(times):
        delay, pid = await kill_worker_1(served, pid, seen)
        delays.append(delay)
    return delays, pid


async def test_the_back_off_doubles_up_to_its_cap_and_sigint_drains_every_worker(tmp_path):
    served = await supervise(tmp_path)
    try:
        delays, pid = await restart_delays(served, 3)
        assert delays == [0.05, 0.1, 0.1]
        served.proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(served.proc.wait(), 30) == 0
        assert await served.ended(30)
        live = [served.named("smtpgate.ready")[0]["workers"][0], pid]
        assert sorted(e["pid"] for e in served.named("shutdown.complete") if "pid" in e) == sorted(live)
        assert served.named("shutdown.complete", workers=2)[0]["clean"] is True
        drained = served.named("worker.exited", exit_status=0)
        assert sorted((e["worker"], e["pid"], e["level"]) for e in drained) == [(0, live[0], "info"), (1, pid, "info")]
    finally:
        await served.kill()


async def test_a_stable_worker_restarts_after_the_first_delay_and_a_stuck_one_is_killed(tmp_path):
    served = await supervise(tmp_path, stable_after=0.0, grace=0)
    try:
        delays, pid = await restart_delays(served, 2)
        assert delays == [0.05, 0.05]  # each lived past stable_after: no doubling
        os.kill(pid, signal.SIGSTOP)  # a worker that will not drain
        served.proc.send_signal(signal.SIGTERM)
        killed = await served.event("worker.killed", pid=pid)
        assert killed["reason"] == "still running past shutdown_grace"
        assert (await served.event("worker.exited", pid=pid))["signal"] == "SIGKILL"
        assert await asyncio.wait_for(served.proc.wait(), 30) == 1  # not every worker drained cleanly
        assert served.named("shutdown.complete", workers=2)[0]["clean"] is False
    finally:
        await served.kill()


async def test_a_worker_that_crashes_says_why_and_the_start_fails(tmp_path):
    served = await supervise(tmp_path, ready=False, SMTPGATE_EVENT_LOOP="no-such-loop")
    try:
        crashed = await served.event("worker.crashed")
        assert crashed["error"] == "LoopChoiceError" and "SMTPGATE_EVENT_LOOP" in crashed["reason"]
        exited = await served.event("worker.exited", pid=crashed["pid"])
        assert exited["exit_status"] == 70
        # The first worker to exit names its slot (the one its worker.crashed was logged in).
        first = await served.event("worker.exited", level="error")
        assert first["worker"] == served.named("worker.crashed", pid=first["pid"])[0]["worker"]
        assert await asyncio.wait_for(served.proc.wait(), 30) == 1
        assert served.named("startup.failed") and not served.named("smtpgate.ready")
    finally:
        await served.kill()


async def test_reuseport_sharing_gives_each_worker_its_own_socket_on_the_one_port(tmp_path):
    served = await supervise(tmp_path, sharing="reuseport")
    try:
        ready = served.named("smtpgate.ready")[0]
        [listener] = ready["listeners"]
        port = int(listener.rsplit(":", 1)[1])
        workers = set(ready["workers"])
        assert {e["address"] for e in served.named("listener.started")} == {listener}
        held = await one_session_per_worker(served, port, workers)
        for wire in held.values():
            await wire.cmd("QUIT")
            await wire.close()
        served.proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(served.proc.wait(), 30) == 0
    finally:
        await served.kill()


NOBODY = 65534
_PR_CAPBSET_DROP = 24  # prctl(2)
_CAP_SYS_ADMIN, _CAP_SYS_RESOURCE = 21, 24  # capabilities(7): either lifts RLIMIT_NPROC


def no_fork() -> None:
    """In the supervisor's process before exec: every fork fails with EAGAIN (RLIMIT_NPROC 0).

    Root's processes are exempt from the limit, so as root the process's real user
    becomes nobody (the effective one stays root, which can read the files) and it
    loses the two capabilities that lift the limit.
    """
    if os.getuid() == 0:
        libc = ctypes.CDLL(None, use_errno=True)
        for cap in (_CAP_SYS_ADMIN, _CAP_SYS_RESOURCE):
            if libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
                raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")
        os.setresuid(NOBODY, 0, 0)
    resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))


async def test_a_fork_that_fails_is_logged_with_its_error_and_tried_again(tmp_path):
    served = await supervise(tmp_path, ready=False, preexec_fn=no_fork)
    try:
        failed = await served.until(lambda: len(served.named("worker.fork_failed", worker=0)) >= 2 and
                                    served.named("worker.fork_failed", worker=0), "a second fork of worker 0")
        assert {e["error"] for e in failed} == {f"[Errno {errno.EAGAIN}] {os.strerror(errno.EAGAIN)}"}
        assert {e["level"] for e in failed} == {"error"}
        assert served.named("worker.fork_failed", worker=1)
        assert not served.named("worker.started") and not served.named("smtpgate.ready")
        await served.stop()
    finally:
        await served.kill()
