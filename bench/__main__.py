"""`make bench`: smtpgate side by side with Postfix, over loopback, in one run.

Targets, all ending at one Postfix smtp-sink:
- smtp-sink direct (the floor);
- a private Postfix relaying to the sink (the peer);
- `smtpgate serve` relaying to the sink, per store (SQLite, PostgreSQL) and
  per worker count (1, and 2 when serve runs workers).

Throughput: linking traffic from smtp-source (bench/load.py), each target
`--rounds` times, alternating. Latency: one session, messages back to back.
Memory: peak RSS relaying 25 MB messages. Profile: py-spy on smtpgate under
the throughput load. Numbers are printed and written to bench/RESULTS.md;
nothing is asserted: speed goals are read there, never in tests.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pickle
import secrets
import signal
import smtplib
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import listbench, load, memory, report, storebench  # noqa: E402
from bench.procs import (  # noqa: E402
    BenchError,
    GateSetup,
    PostfixRelay,
    Smtpgate,
    SmtpSink,
    Target,
    children,
    fresh_pg_database,
    pg_checkpoint,
    pg_version,
    wait_until,
)
from bench.profile import Recorder, summarise  # noqa: E402
from tests.support.postfix import postfix_available  # noqa: E402


def cpu_seconds(pids: list[int]) -> float:
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
            total += int(fields[11]) + int(fields[12])
    return total / ticks


def log(text: str) -> None:
    print(text, flush=True)


def warm_up(folder: Path, setup: GateSetup, sink: SmtpSink) -> None:
    """One message, so the reuse stream's link exists before anything is timed."""
    with Smtpgate(folder, setup, sink.port, f"warmup-{setup.store_kind}") as gate:
        with smtplib.SMTP("127.0.0.1", gate.port, timeout=30) as client:
            client.sendmail(load.SENDER, ["client@supplier.example", load.MAILBOX],
                            b"From: <" + load.SENDER.encode() + b">\r\nSubject: warm-up\r\n\r\nhello\r\n")
        if gate.count("link.created") != 1:
            raise BenchError(f"warm-up on {setup.store_kind} created no link: see {gate.log_path}")


def workers_available(folder: Path, setup: GateSetup, sink: SmtpSink) -> str | None:
    """None when `smtpgate serve` runs setup.workers processes, else why not."""
    try:
        with Smtpgate(folder, setup, sink.port, f"probe-workers-{setup.workers}") as gate:
            if not gate.workers_running():
                return "serve runs one process (config.unsupported: workers)"
            return None
    except BenchError as exc:
        return f"serve refused workers: {setup.workers} ({str(exc).splitlines()[0]})"


def run_gate(target: Target, folder: Path, sink: SmtpSink, messages: int, index: int) -> load.Throughput:
    assert target.setup is not None
    with Smtpgate(folder, target.setup, sink.port, f"{target.name.replace(' ', '_')}-{index}") as gate:
        result = load.throughput(gate.port, folder, messages, sink=sink,
                                 cpu_of=lambda: cpu_seconds([gate.pid, *children(gate.pid)]))
        relayed, created = gate.count("message.relayed"), gate.count("link.created")
        problems = {e: gate.count(e) for e in ("message.rejected", "store.error", "upstream.error")}
    expected_created = messages // 100
    if relayed != messages or created != expected_created or any(problems.values()):
        target.checks.append(f"run {index}: relayed {relayed}/{messages}, links created "
                             f"{created}/{expected_created}, {problems} (log {gate.log_path})")
    return result


def throughput(targets: list[Target], folder: Path, sink: SmtpSink, postfix: PostfixRelay,
               messages: int, rounds: int) -> None:
    active = [t for t in targets if t.unavailable is None]
    if not active:
        return
    for round_no in range(rounds):
        # Alternate, and rotate the order too, so no target always runs first or last.
        order = active[round_no % len(active):] + active[:round_no % len(active)]
        for target in order:
            if target.kind == "sink":
                result = load.throughput(sink.port, folder, messages, sink=sink)
            elif target.kind == "postfix":
                result = load.throughput(postfix.port, folder, messages, sink=sink)
                wait_until(postfix.queue_empty, 300, "Postfix's queue to empty", every=0.1)
            else:
                result = run_gate(target, folder, sink, messages, round_no + 1)
            target.runs.append(result)
            log(f"round {round_no + 1}: {target.name}: {result.rate:.0f} msg/s "
                f"({result.messages} in {result.seconds:.2f}s)")


def latency(folder: Path, sink: SmtpSink, postfix: PostfixRelay, setups: list[GateSetup],
            count: int, rounds: int) -> list[tuple[str, list[load.Latency]]]:
    """Each target's latency session once per round, alternating as the throughput runs do
    (the machine's speed drifts within minutes): (name, one Latency per round), sink first."""
    names = ["smtp-sink direct", "Postfix relay"]
    for setup in setups:
        tree = "" if setup.root == ROOT else f" [{setup.root.name}]"
        names.append(f"smtpgate {report.STORE_NAMES[setup.store_kind]}{tree}")
    kinds: list[GateSetup | str] = ["sink", "postfix", *setups]
    out: dict[str, list[load.Latency]] = {name: [] for name in names}
    for round_no in range(rounds):
        turn = round_no % len(kinds)
        for name, kind in zip(names[turn:] + names[:turn], kinds[turn:] + kinds[:turn]):
            if kind == "sink":
                result = load.latency(sink.port, folder, count)
            elif kind == "postfix":
                result = load.latency(postfix.port, folder, count)
                wait_until(postfix.queue_empty, 300, "Postfix's queue to empty", every=0.1)
            else:
                assert isinstance(kind, GateSetup)
                tag = name.removeprefix("smtpgate ").replace(" ", "-").replace("[", "").replace("]", "")
                with Smtpgate(folder, kind, sink.port, f"latency-{tag}-{round_no + 1}") as gate:
                    before = cpu_seconds([gate.pid])
                    result = load.latency(gate.port, folder, count)
                    result.cpu_per_message = (cpu_seconds([gate.pid]) - before) / count
            out[name].append(result)
            log(f"latency round {round_no + 1}: {name}: p50 {result.p50 * 1000:.2f} ms, "
                f"p99 {result.p99 * 1000:.2f} ms")
    return list(out.items())


def store_run(stack: contextlib.ExitStack, folder: Path, store: str, messages: int, root: Path = ROOT):
    """The store alone, on a database of its own, with the smtpgate tree at root."""
    if store == "sqlite":
        url = f"sqlite:{folder / f'store-alone-{secrets.token_hex(3)}.db'}"
    else:
        url = stack.enter_context(fresh_pg_database())
    env = dict(os.environ, PYTHONPATH=str(root))
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "storebench.py"), url, str(folder), str(messages)],
                          capture_output=True, text=True, env=env, timeout=900)
    if done.returncode != 0:
        raise BenchError(f"store alone ({store}, {root}): {done.stderr.strip()[-2000:]}")
    result = storebench.StoreResult(**json.loads(done.stdout.strip().splitlines()[-1]))
    log(f"store alone ({store}{'' if root == ROOT else ', ' + str(root)}): {result.rate:.0f} messages/s, "
        f"look-up p50 {result.lookup_p50 * 1000:.2f} ms, record p50 {result.record_p50 * 1000:.2f} ms, "
        f"record transactions {result.batches}")
    return result


def list_run(stack: contextlib.ExitStack, folder: Path, store: str, messages: int):
    """bench/listbench.py on a database of its own: the admin list and search latency."""
    if store == "sqlite":
        url = f"sqlite:{folder / f'lists-{secrets.token_hex(3)}.db'}"
    else:
        url = stack.enter_context(fresh_pg_database())
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "listbench.py"), url, str(folder),
                           "--messages", str(messages), "--links", str(max(1, messages // 10))],
                          capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=3600)
    if done.returncode != 0:
        raise BenchError(f"lists ({store}): {done.stderr.strip()[-2000:]}")
    result = listbench.ListResult(**json.loads(done.stdout.strip().splitlines()[-1]))
    log(f"lists ({store}, {result.messages} messages, {result.links} links): p50 {result.p50 * 1000:.1f} ms, "
        f"p99 {result.p99 * 1000:.1f} ms")
    return result


def memory_run(folder: Path, sink: SmtpSink, setup: GateSetup) -> memory.MemoryResult:
    cases = []
    for kind in ("plain", "linking"):
        with Smtpgate(folder, setup, sink.port, f"memory-one-{kind}") as gate:
            idle, peak_one = memory.one_large(gate, folder, kind)
        with Smtpgate(folder, setup, sink.port, f"memory-ten-{kind}") as gate:
            idle_ten, peak_ten, small, during = memory.ten_large(gate, folder, kind)
        case = memory.MemoryCase(kind, idle, peak_one, idle_ten, peak_ten, small, len(during), during)
        cases.append(case)
        log(f"memory ({kind}): idle {idle / 1e6:.0f} MB, one 25 MB message peak {peak_one / 1e6:.0f} MB, "
            f"ten peak {peak_ten / 1e6:.0f} MB over idle {idle_ten / 1e6:.0f} MB, small message p50 "
            f"{case.small_p50 * 1000:.0f} ms; {len(during)} of {len(small)} while the ten were in flight, "
            f"their p50 {case.small_during_p50 * 1000:.0f} ms")
    with Smtpgate(folder, setup, sink.port, "memory-idle-sessions") as gate:
        sessions = memory.idle_sessions(gate)
    log(f"memory: {sessions.sessions} idle sessions after EHLO: {sessions.per_session / 1024:.1f} KiB each")
    return memory.MemoryResult(cases, sessions)


def profile_run(folder: Path, sink: SmtpSink, setup: GateSetup, messages: int, out_dir: Path):
    out_dir.mkdir(parents=True, exist_ok=True)
    tree = "" if setup.root == ROOT else f"-{setup.root.name}"
    raw = out_dir / f"profile-{setup.store_kind}-{setup.workers}w{tree}.txt"
    with Smtpgate(folder, setup, sink.port, f"profile-{setup.store_kind}{tree}") as gate:
        recorder = Recorder(gate.pid, raw, subprocesses=setup.workers > 1)
        try:
            result = load.throughput(gate.port, folder, messages, sink=sink)
        finally:
            recorder.stop()
    summary = summarise(raw, snapshots=round(recorder.seconds * recorder.rate))
    log(f"profile ({setup.store_kind}{tree}): {summary.samples} samples, {result.rate:.0f} msg/s under py-spy; "
        f"raw stacks in {raw}")
    return summary, result


def uvloop_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("uvloop") is not None


def uvloop_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("uvloop")
    except PackageNotFoundError:
        return None


def git_commit() -> str | None:
    """The commit of the tree that runs, `+changes` when it has uncommitted ones."""
    done = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty=+changes"],
                          capture_output=True, text=True)
    return done.stdout.strip() or None


def _interrupted(signum, frame) -> None:
    raise SystemExit(128 + signum)


def main() -> int:
    parser = argparse.ArgumentParser(prog="make bench", description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=5000, help="messages per throughput run (default 5000)")
    parser.add_argument("--rounds", type=int, default=3, help="runs of every target, alternating (default 3)")
    parser.add_argument("--latency-messages", type=int, default=1000)
    parser.add_argument("--stores", default="sqlite,postgresql")
    parser.add_argument("--no-store", action="store_true", help="skip the store-alone run")
    parser.add_argument("--no-lists", action="store_true", help="skip the activities list and search run")
    parser.add_argument("--list-messages", type=int, default=1_000_000,
                        help="message records of the list and search run (default 1000000)")
    parser.add_argument("--baseline", type=Path, action="append", default=[],
                        help="another smtpgate source tree (e.g. `git archive` of an older commit) "
                             "to run as extra 1-worker rows and store-alone runs, for before/after")
    parser.add_argument("--no-latency", action="store_true")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--memory-only", action="store_true",
                        help="only the memory section (first store, 1 worker); the other sections are left out")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "RESULTS.md")
    parser.add_argument("--profile-dir", type=Path, default=ROOT / "var" / "bench")
    parser.add_argument("--render-only", type=Path, metavar="SAVED_RUN",
                        help="write --output from a run saved before (var/bench/last-run.pickle)")
    args = parser.parse_args()
    args.command = sys.argv[1:]
    if args.render_only:
        return render_only(args.render_only, args.output)
    # Stopped by SIGTERM, or by SIGINT even when started in the background
    # (which ignores it): unwind, so Postfix, the sink and smtpgate are stopped.
    signal.signal(signal.SIGTERM, _interrupted)
    signal.signal(signal.SIGINT, _interrupted)
    reason = postfix_available()
    if reason:
        print(f"make bench needs Postfix's smtp-source, smtp-sink and a private Postfix: {reason}",
              file=sys.stderr)
        return 2
    stores = [s.strip() for s in args.stores.split(",") if s.strip()]
    started = time.time()
    folder = Path(tempfile.mkdtemp(prefix="smtpgate-bench-"))
    folder.chmod(0o755)  # Postfix's daemons run as other users
    try:
        with contextlib.ExitStack() as stack:
            sink = stack.enter_context(SmtpSink(folder))
            postfix = stack.enter_context(PostfixRelay(folder, sink.port))
            urls = {}
            for store in stores:
                if store == "sqlite":
                    urls[store] = f"sqlite:{folder / 'bench.db'}"
                elif store == "postgresql":
                    urls[store] = stack.enter_context(fresh_pg_database())
                else:
                    raise BenchError(f"--stores: unknown store {store!r}")
            targets = [Target("smtp-sink direct", "sink"), Target("Postfix relay", "postfix")]
            for store in stores:
                for workers in (1, 2):
                    setup = GateSetup(store, urls[store], workers)
                    targets.append(Target(f"smtpgate {report.STORE_NAMES[store]} {workers} worker"
                                          + ("s" if workers > 1 else ""), "smtpgate", setup))
            if uvloop_installed() and "sqlite" in stores:
                # The rows above run on asyncio's own loop (serve's default): one on uvloop.
                targets.append(Target("smtpgate SQLite 1 worker, uvloop", "smtpgate",
                                      GateSetup("sqlite", urls["sqlite"], 1,
                                                env={"SMTPGATE_EVENT_LOOP": "uvloop"})))
            # A baseline gets stores of its own: an older tree refuses a store a newer schema upgraded.
            base_urls = {(base, store): (f"sqlite:{folder / f'bench-{base.name}.db'}" if store == "sqlite"
                                         else stack.enter_context(fresh_pg_database()))
                         for base in args.baseline for store in stores}
            for base in args.baseline:
                for store in stores:
                    targets.append(Target(f"smtpgate {report.STORE_NAMES[store]} 1 worker "
                                          f"[{base.name}]", "smtpgate",
                                          GateSetup(store, base_urls[base, store], 1, root=base.resolve())))
            if args.memory_only:
                targets, args.no_store, args.no_latency, args.no_profile, args.no_lists = [], True, True, True, True
            for store in stores:
                warm_up(folder, GateSetup(store, urls[store], 1), sink)
            for (base, store), url in base_urls.items():
                warm_up(folder, GateSetup(store, url, 1, root=base.resolve()), sink)
            for target in targets:
                if target.setup is not None and target.setup.workers > 1:
                    target.unavailable = workers_available(folder, target.setup, sink)
                    if target.unavailable:
                        log(f"{target.name}: not available: {target.unavailable}")
            throughput(targets, folder, sink, postfix, args.messages, args.rounds)
            store_alone = [] if args.no_store else [
                (f"{report.STORE_NAMES[store]}{'' if root == ROOT else f' [{root.name}]'}",
                 store_run(stack, folder, store, args.messages, root))
                for root in [ROOT, *(b.resolve() for b in args.baseline)] for store in stores]
            lists = [] if args.no_lists else [
                (report.STORE_NAMES[store], list_run(stack, folder, store, args.list_messages)) for store in stores]
            one_worker = [GateSetup(s, urls[s], 1) for s in stores]
            baselines = [GateSetup(s, base_urls[b, s], 1, root=b.resolve()) for b in args.baseline for s in stores]
            if "postgresql" in stores:
                pg_checkpoint()  # the runs above wrote much WAL: its checkpoint is not the latency's
            lat = None if args.no_latency else latency(folder, sink, postfix, one_worker + baselines,
                                                       args.latency_messages, args.rounds)
            mem = None if args.no_memory else memory_run(folder, sink, one_worker[0])
            profiled = one_worker + baselines
            profiles = [] if args.no_profile else [
                (setup, *profile_run(folder, sink, setup, args.messages, args.profile_dir))
                for setup in profiled]
            run = dict(
                args=args, started=started, finished=time.time(), targets=targets,
                store_alone=store_alone, lists=lists, latency=lat, memory=mem, profiles=profiles,
                postfix_version=postfix.version(), stores=stores, commit=git_commit(),
                uvloop=uvloop_version(),
                pg_version=pg_version() if "postgresql" in stores else None)
    except BenchError as exc:
        print(f"make bench: {exc}", file=sys.stderr)
        return 1
    finally:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
    args.profile_dir.mkdir(parents=True, exist_ok=True)
    saved = args.profile_dir / "last-run.pickle"
    saved.write_bytes(pickle.dumps(run))
    args.output.write_text(report.render(**run))
    print(f"results written to {args.output} (and {saved}, for --render-only)")
    return 0


def render_only(saved: Path, output: Path) -> int:
    """RESULTS.md again from a saved run, with the current bench/FINDINGS.md."""
    run = pickle.loads(saved.read_bytes())
    output.write_text(report.render(**run))
    print(f"results written to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
