"""bench/SOAK.md: what `make soak` ran, the faults it injected, and each invariant's result."""

from __future__ import annotations

import platform
import time
from collections import Counter
from pathlib import Path

from bench.procs import pg_version


def write(path: Path, soak, started: float, minutes: float, counts: dict) -> None:
    out = soak.outcomes
    results: Counter = out.results
    told = Counter(out.by_message.values())
    delivery = soak.delivery_figures or {}
    checks = soak.checks
    lines = [
        "# Soak: clients that vanish, faults that strike",
        "",
        f"`make soak` (bench/soak.py), {minutes:g} minutes from "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(started))}: `smtpgate serve` with 2 workers on "
        f"PostgreSQL {pg_version()} (a database created for the run and dropped after it), Python "
        f"{platform.python_version()}, {platform.machine()}, on a machine shared with other work.",
        "",
        f"**Result: {'every invariant held' if not soak.breaches else f'{len(soak.breaches)} breaches'}.**",
        "",
        "## Traffic",
        "",
        "| what | count |",
        "|---|---|",
        f"| probes (connect, then FIN or reset before the greeting, every 100 ms) | "
        f"{out.probes['fin']} FIN, {out.probes['reset']} reset, {out.probes['refused']} refused |",
        f"| smtp-source linking batches (4 sessions, 40 messages each) | {soak.source_runs} |",
        f"| messages from smtp-source the upstream accepted | {delivery.get('source_delivered', 0)} |",
    ]
    for scenario, n in sorted(out.scenarios.items()):
        outcomes = ", ".join(f"{r}: {c}" for (s, r), c in sorted(results.items()) if s == scenario)
        lines.append(f"| client sessions `{scenario}` | {n} ({outcomes}) |")
    lines += [
        f"| soak clients' messages whose dot was sent | {len(out.by_message)} "
        f"({', '.join(f'{k}: {v}' for k, v in sorted(told.items()))}) |",
        f"| upstream deliveries in all | {delivery.get('deliveries', 0)} |",
    ]
    lines += [f"| smtpgate log: `{event}` | {n} |" for event, n in counts.items()]
    f = soak.faults
    lines += [
        "",
        "## Faults injected",
        "",
        f"- upstream killed (SIGKILL) and restarted: {len(f.upstream_restarts)} times, refusing 5 % of "
        f"transactions at {', '.join(f.upstream_restarts) or '-'}",
        f"- pg_terminate_backend on every connection to the run's database: {len(f.pg_terminations)} times, "
        f"{sum(f.pg_terminations)} backends ({', '.join(map(str, f.pg_terminations)) or '-'})",
        f"- kill -9 of a worker: {len(f.worker_kills)} times (pids {', '.join(map(str, f.worker_kills)) or '-'})",
        "",
        "## Invariants",
        "",
        "| invariant | result |",
        "|---|---|",
    ]
    for name, words in _INVARIANTS:
        hits = [b for b in soak.breaches if any(w in b for w in words)]
        lines.append(f"| {name} | {'held' if not hits else f'**breached** ({len(hits)})'} |")
    after = delivery.get("after_the_dot", Counter())
    lines += [
        "",
        f"Delivered without a 250 to the client, all after the final dot (allowed: smtpgate relays a "
        f"message whose dot is in to its end; a connection lost after the dot may have delivered): "
        f"{', '.join(f'{k}: {v}' for k, v in sorted(after.items())) or 'none'}. "
        f"Tagged (source, linked activity) pairs delivered: {soak.tag_figures.get('tagged_pairs', 0)}, "
        f"without their link in the store: {soak.tag_figures.get('missing', 0)}.",
        "",
        "smtp-source reports no per-message replies, so its messages are held only to \"delivered at "
        "most once\" and to the tag check; the soak's own clients (a Message-ID each) to all of them.",
        "",
        "## Checks (every 30 s, traffic paused)",
        "",
        "Descriptors: sockets to the upstream (u) and to PostgreSQL (pg) apart; the rest is held "
        f"within {int(soak_growth() * 100)} % (or 2) of its level after a process's warm-up, as is RSS. "
        "Workers are replaced after each kill -9, so a new pid starts its own warm-up.",
        "",
        "| at | sessions open | upstream in use | processes: RSS MiB / descriptors |",
        "|---|---|---|---|",
    ]
    for check in checks:
        procs = "; ".join(f"{pid}: {p['rss'] >> 20} / {p['other_fds']}+{p['upstream']}u+{p['pg']}pg"
                          for pid, p in check.processes.items())
        lines.append(f"| {check.at} s | {_n(check.sessions_open)} | {_n(check.upstream_in_use)} | {procs} |")
    if soak.breaches:
        lines += ["", "## Breaches", ""] + [f"- {b}" for b in soak.breaches[:100]]
    path.write_text("\n".join(lines) + "\n")


def soak_growth() -> float:
    from bench.soak import GROWTH

    return GROWTH


def _n(value) -> str:
    return "?" if value is None else f"{value:g}"


_INVARIANTS = [
    ("open sessions return to 0 when traffic stops", ("sessions_open",)),
    ("upstream connections in use return to 0", ("connections_in_use",)),
    ("descriptors and RSS within 10 % of their level after warm-up", ("descriptors", "RSS")),
    ("every client 250 matches exactly one upstream delivery of its Message-ID", ("client told 250",)),
    ("no delivery for a message the client was not told 250 (after-the-dot cases counted)",
     ("client told '", "never sent the final dot", "smtp-source message")),
    ("every tag in a delivered message has its link in the store", ("does not hold",)),
    ("PostgreSQL connections per process within the configured pools", ("PostgreSQL connections",)),
    ("no client left waiting", ("still waiting",)),
]
