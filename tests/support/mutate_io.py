"""`make mutate`, the I/O layers: each module mutated alone, against the test files that claim it.

mutmut reads one [tool.mutmut] table from the pyproject.toml of the folder it runs in,
so each module gets its own folder under mutants-io/ holding a copy of smtpgate/, tests/
and pyproject.toml whose [tool.mutmut] names only that module and its test files. Each
run is bounded by MUTATE_MODULE_SECONDS; the summary gives the score per module (mutants
judged so far when the budget ran out) and the file mutants-io/<module>/survivors.txt
lists the survivors (`mutmut show NAME` in that folder shows one). With MUTATE_SAMPLE=N
only a uniform random sample of N mutants of each module is judged (the seed is the
module's name and MUTATE_SEED), which estimates the score of a module too large to judge
whole in the budget: the summary gives the sample's score with its 95 % interval. The plugin
tests/support/mutate_children.py lets the mutants run in the `smtpgate serve` children
that tests start, and counts what those children reach.

    python -m tests.support.mutate_io [MODULE ...]      # default: every module of MODULES
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.support.mutation_score import sample_summary, summary

# Module -> the test files that claim it (a mutant is judged by these only).
_SMTP = ["tests/frontends/smtp/test_relay.py", "tests/frontends/smtp/test_relay_edges.py", "tests/frontends/smtp/test_relay_faults.py",
         "tests/frontends/smtp/test_relay_params.py", "tests/frontends/smtp/test_smtp_prototype.py", "tests/frontends/smtp/test_abuse_limits.py"]
_MILTER = ["tests/frontends/milter/test_milter.py", "tests/frontends/milter/test_milter_faults.py",
           "tests/frontends/milter/test_milter_session.py"]
_STORE = ["tests/store/test_store.py", "tests/store/test_store_model.py", "tests/store/test_store_group.py",
          "tests/store/test_store_schema.py", "tests/store/test_store_operator.py", "tests/store/test_store_details.py",
          "tests/store/test_record_durability.py"]
MODULES: dict[str, list[str]] = {
    "smtpgate/metrics.py": ["tests/test_metrics.py", "tests/test_metrics_counters.py"],
    "smtpgate/linking/service.py": ["tests/linking/test_link_service.py", "tests/linking/test_link_edges.py", "tests/test_mission.py", "tests/test_inbound.py",
                                    "tests/frontends/smtp/test_early_tag.py", "tests/test_inbound_share.py",
                                    "tests/frontends/smtp/test_relay_faults.py", "tests/frontends/smtp/test_connector.py",
                                    "tests/frontends/milter/test_milter_faults.py", "tests/runtime/test_outages.py"],
    "smtpgate/frontends/registry.py": ["tests/frontends/test_session_registry.py", "tests/runtime/test_serve.py", "tests/frontends/milter/test_milter.py",
                                       "tests/frontends/smtp/test_abuse_limits.py", "tests/frontends/smtp/test_auth_slowdown.py",
                                       "tests/frontends/smtp/test_client_gone.py"],
    "smtpgate/frontends/milter/codec.py": ["tests/frontends/milter/test_milter_codec.py", "tests/frontends/milter/test_milter.py"],
    "smtpgate/frontends/milter/session.py": _MILTER,
    "smtpgate/frontends/milter/server.py": _MILTER,
    "smtpgate/frontends/smtp/server.py": _SMTP + ["tests/frontends/smtp/test_sender_rights.py", "tests/test_log_fields.py",
                                                  "tests/frontends/smtp/test_tls_auth.py", "tests/frontends/smtp/test_tls_grade.py",
                                                  "tests/frontends/smtp/test_auth_slowdown.py", "tests/test_debug_log.py",
                                                  "tests/frontends/smtp/test_client_gone.py",
                                                  "tests/frontends/smtp/test_command_refusals.py"],
    "smtpgate/frontends/smtp/relay.py": _SMTP + ["tests/frontends/smtp/test_early_tag.py", "tests/test_inbound.py",
                                                 "tests/frontends/smtp/test_client_gone.py",
                                                 "tests/frontends/smtp/test_connector.py",
                                                 "tests/frontends/smtp/test_relay_events.py",
                                                 "tests/frontends/smtp/test_replay.py",
                                                 "tests/frontends/test_policy_events.py", "tests/test_inbound_share.py"],
    "smtpgate/frontends/smtp/auth.py": ["tests/frontends/smtp/test_auth_mechanisms.py", "tests/frontends/smtp/test_auth_slowdown.py",
                                        "tests/frontends/smtp/test_auth_burst.py", "tests/frontends/smtp/test_sender_rights.py",
                                        "tests/upstream/test_auth_upstream.py", "tests/frontends/smtp/test_auth_upstream_outcomes.py"],
    "smtpgate/frontends/smtp/tls.py": ["tests/frontends/smtp/test_server_context.py", "tests/frontends/smtp/test_tls_auth.py", "tests/frontends/smtp/test_tls_grade.py",
                                       "tests/frontends/smtp/test_submission_listeners.py",
                                       "tests/frontends/smtp/test_peer_certificate.py"],
    "smtpgate/frontends/smtp/peercert.py": ["tests/frontends/smtp/test_peer_certificate.py", "tests/frontends/smtp/test_connector.py"],
    "smtpgate/frontends/smtp/aiosmtpd_glue.py": ["tests/frontends/smtp/test_aiosmtpd_glue.py", "tests/frontends/smtp/test_data_reader.py",
                                                 "tests/frontends/smtp/test_smtp_prototype.py",
                                                 "tests/frontends/smtp/test_smtp_state_machine.py",
                                                 "tests/frontends/smtp/test_command_refusals.py",
                                                 "tests/frontends/smtp/test_client_gone.py"],
    "smtpgate/frontends/smtp/stream.py": ["tests/frontends/smtp/test_streaming.py", "tests/frontends/smtp/test_relay.py",
                                          "tests/frontends/smtp/test_relay_edges.py", "tests/frontends/smtp/test_relay_faults.py",
                                          "tests/frontends/smtp/test_client_gone.py",
                                          "tests/frontends/smtp/test_sender_rights.py"],
    "smtpgate/frontends/smtp/data_verdict.py": ["tests/frontends/smtp/test_data_reader.py"],
    "smtpgate/frontends/policy.py": ["tests/frontends/test_policy.py", "tests/frontends/test_policy_events.py",
                                     "tests/frontends/smtp/test_relay.py", "tests/frontends/smtp/test_relay_edges.py",
                                     "tests/frontends/smtp/test_early_tag.py", "tests/frontends/smtp/test_connector.py",
                                     "tests/frontends/milter/test_milter.py", "tests/frontends/milter/test_milter_faults.py",
                                     "tests/test_inbound.py", "tests/test_inbound_share.py", "tests/test_observe.py"],
    "smtpgate/upstream/client.py": ["tests/upstream/test_upstream_faults.py", "tests/upstream/test_upstream_pool.py",
                                    "tests/upstream/test_upstream_limits.py", "tests/frontends/smtp/test_early_tag.py",
                                    "tests/frontends/smtp/test_relay.py", "tests/frontends/smtp/test_relay_edges.py",
                                    "tests/frontends/smtp/test_streaming.py", "tests/frontends/smtp/test_client_gone.py",
                                    "tests/frontends/smtp/test_tls_auth.py", "tests/upstream/test_upstream_xoauth2.py",
                                    "tests/upstream/test_auth_upstream.py", "tests/upstream/test_upstream_client_cert.py",
                                    "tests/upstream/test_upstream_abandon.py",
                                    "tests/upstream/test_upstream_source.py", "tests/upstream/test_mx.py"],
    "smtpgate/upstream/mx.py": ["tests/upstream/test_mx.py", "tests/upstream/test_mx_route.py",
                                "tests/upstream/test_mx_no_route.py"],
    "smtpgate/upstream/oauth2.py": ["tests/upstream/test_oauth2.py", "tests/upstream/test_upstream_oauth2.py", "tests/upstream/test_upstream_xoauth2.py"],
    "smtpgate/upstream/certificates.py": ["tests/upstream/test_certificates.py", "tests/upstream/test_upstream_client_cert.py"],
    "smtpgate/upstream/passthrough.py": ["tests/upstream/test_auth_upstream.py", "tests/upstream/test_upstream_source.py"],
    "smtpgate/upstream/session.py": ["tests/upstream/test_upstream_source.py", "tests/upstream/test_upstream_pool.py",
                                     "tests/upstream/test_auth_upstream.py", "tests/upstream/test_upstream_limits.py"],
    "smtpgate/upstream/wire.py": ["tests/upstream/test_wire.py", "tests/upstream/test_upstream_pool.py", "tests/frontends/smtp/test_streaming.py"],
    "smtpgate/upstream/maildir.py": ["tests/upstream/test_maildir_upstream.py", "tests/upstream/test_upstream_source.py",
                                     "tests/frontends/smtp/test_streaming.py"],
    "smtpgate/runtime/gate.py": ["tests/runtime/test_reload_needs_restart.py", "tests/test_observe.py",
                                 "tests/frontends/smtp/test_submission_listeners.py", "tests/test_debug_log.py",
                                 "tests/frontends/smtp/test_tls_auth.py", "tests/frontends/smtp/test_streaming.py",
                                 "tests/runtime/test_serve.py",
                                 "tests/runtime/test_reload.py", "tests/admin/test_admin.py",
                                 "tests/admin/test_admin_signon.py", "tests/frontends/milter/test_milter.py",
                                 "tests/store/test_allocator_adapter.py"],
    "smtpgate/runtime/loop.py": ["tests/runtime/test_event_loop.py"],
    "smtpgate/runtime/notify.py": ["tests/runtime/test_serve.py"],
    "smtpgate/runtime/supervisor.py": ["tests/runtime/test_workers.py", "tests/runtime/test_supervisor_timings.py"],
    "smtpgate/admin/app.py": ["tests/admin/test_admin.py", "tests/admin/test_admin_faults.py", "tests/admin/test_admin_list.py",
                              "tests/admin/test_admin_signon.py", "tests/admin/test_admin_pages.py", "tests/test_metrics.py"],
    "smtpgate/admin/auth.py": ["tests/admin/test_admin.py", "tests/admin/test_admin_faults.py", "tests/admin/test_admin_list.py",
                               "tests/admin/test_admin_signon.py", "tests/admin/test_admin_pages.py"],
    "smtpgate/admin/identity.py": ["tests/admin/test_identity.py", "tests/admin/test_admin_signon.py", "tests/admin/test_admin.py"],
    "smtpgate/admin/lists.py": ["tests/admin/test_lists.py", "tests/admin/test_admin_list.py"],
    "smtpgate/store/listing.py": ["tests/admin/test_admin_list.py", "tests/store/test_store_schema.py", "tests/store/test_listing.py",
                                  "tests/store/test_sqlite.py", "tests/admin/test_admin_signon.py"],
    "smtpgate/store/base.py": _STORE,
    "smtpgate/store/errors.py": _STORE,
    "smtpgate/store/transfer.py": ["tests/store/test_transfer.py", "tests/store/test_links_import.py", "tests/test_cli_operator.py"],
    "smtpgate/store/sql.py": _STORE,
    "smtpgate/store/sqlite.py": _STORE + ["tests/store/test_sqlite.py", "tests/store/test_listing.py",
                                          "tests/store/test_sqlite_open.py"],
    "smtpgate/store/postgres.py": _STORE + ["tests/store/test_store_concurrency.py", "tests/store/test_postgres_store.py",
                                            "tests/store/test_listing.py"],
    "smtpgate/store/records.py": _STORE + ["tests/store/test_records.py"],
    "smtpgate/store/group.py": ["tests/store/test_store_group.py", "tests/store/test_records.py"],
    "smtpgate/store/allocation.py": ["tests/store/test_allocator_adapter.py", "tests/store/test_allocator_http.py",
                                     "tests/store/test_store.py", "tests/store/test_store_model.py",
                                     "tests/runtime/test_outages.py"],
    "smtpgate/store/migrations.py": ["tests/store/test_store_schema.py"],
}
ROOT = Path(__file__).resolve().parents[2]
WORK = ROOT / "mutants-io"


def _pyproject(module: str, tests: list[str]) -> str:
    """The project's pyproject.toml with a [tool.mutmut] table for this module alone."""
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    table = (f'[tool.mutmut]\nsource_paths = ["smtpgate"]\nonly_mutate = [{json.dumps(module)}]\n'
             'pytest_add_cli_args = ["-p", "no:cacheprovider", "-p", "tests.support.mutate_children", "-x", "-q"]\n'
             f"pytest_add_cli_args_test_selection = {json.dumps(tests)}\n"
             'also_copy = ["config", "docs"]\n'  # the example configuration and adapter some tests run
             "use_git_change_detection = false\n")  # each run starts afresh; and no git in the worktree meanwhile
    return re.sub(r"\[tool\.mutmut\]\n(?:(?!\n\[).)*", table.rstrip("\n"), text, count=1, flags=re.S)


def _folder(module: str) -> Path:
    return WORK / module.removeprefix("smtpgate/").removesuffix(".py").replace("/", ".")


def _mutmut(folder: Path, args: list[str], deadline: float, log: str) -> bool:
    """Run mutmut in ``folder`` until ``deadline``; False when the deadline stopped it.

    mutmut has finished once it has printed its rate ("... mutations/second"): a thread a
    test left behind in mutmut's own process (a store connection's worker) can keep that
    process from exiting, so it is stopped then rather than waited for.
    """
    mutmut = str(Path(sys.executable).with_name("mutmut"))
    with open(folder / log, "w", encoding="utf-8") as out:
        process = subprocess.Popen([mutmut, *args], cwd=folder, stdout=out, stderr=subprocess.STDOUT)
    done_since: float | None = None
    while process.poll() is None:
        now = time.monotonic()
        if now >= deadline:
            process.kill()
            process.wait()
            return False
        if done_since is None and "mutations/second" in (folder / log).read_text(encoding="utf-8", errors="replace"):
            done_since = now
        if done_since is not None and now - done_since > 30:  # its results are written by then
            process.kill()
            process.wait()
            return True
        time.sleep(1)
    return True


def _kill_leftovers(folder: Path) -> None:
    """Kill what the module's tests started and left running: a test mutmut stopped (its time
    limit) leaves its `smtpgate serve` children behind, holding their ports. They are the
    processes started with the mutated tree on their PYTHONPATH (tests/support/mutate_children.py)."""
    mark = str(folder / "mutants").encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if mark in (entry / "environ").read_bytes():
                os.kill(int(entry.name), signal.SIGKILL)
        except OSError:  # gone meanwhile, or not ours to read
            continue


def _statuses(folder: Path) -> dict[str, str]:
    """Every mutant of the folder's module and mutmut's word for it ("killed", "not checked", ...)."""
    mutmut = str(Path(sys.executable).with_name("mutmut"))
    out = subprocess.run([mutmut, "results", "--all", "true"], cwd=folder, capture_output=True, text=True).stdout
    return dict(line.strip().rsplit(": ", 1) for line in out.splitlines() if ": " in line)


def sampled(names: list[str], size: int, seed: str) -> list[str]:
    """A uniform random choice of ``size`` names (all of them when there are fewer), the same for the same seed."""
    return sorted(random.Random(seed).sample(sorted(names), min(size, len(names))))


def run(module: str, seconds: float, children: int, sample: int = 0) -> str:
    """Mutate one module for at most ``seconds`` (a random ``sample`` of its mutants if given); its summary line."""
    folder = _folder(module)
    for part in ("smtpgate", "tests", "config", "docs", "mutants"):  # a fresh copy, judged afresh
        shutil.rmtree(folder / part, ignore_errors=True)
    for part in ("smtpgate", "tests", "config", "docs"):
        shutil.copytree(ROOT / part, folder / part, ignore=shutil.ignore_patterns("__pycache__", "corpus"))
    (folder / "pyproject.toml").write_text(_pyproject(module, MODULES[module]), encoding="utf-8")
    deadline = time.monotonic() + seconds
    chosen: list[str] = []
    if sample:
        # mutmut makes the mutants and runs its stats, then finds no mutant of this name and stops.
        _mutmut(folder, ["run", "--max-children", str(children), "smtpgate.no-such-mutant"], deadline, "mutants-stats.log")
        _kill_leftovers(folder)
        chosen = sampled(list(_statuses(folder)), sample, seed=f"{module}:{os.environ.get('MUTATE_SEED', '')}")
        if not chosen:
            return f"{module}: no mutant made (mutants-io/{folder.name}/mutants-stats.log says why)"
    finished = _mutmut(folder, ["run", "--max-children", str(children), *chosen], deadline, "mutants.log")
    _kill_leftovers(folder)
    note = "" if finished else f" (stopped after {seconds:g}s)"
    statuses = _statuses(folder)
    (folder / "survivors.txt").write_text("".join(f"{name}: {status}\n" for name, status in statuses.items()
                                                  if status in ("survived", "suspicious", "no tests")))
    if chosen:
        return f"{module}: {sample_summary([statuses[name] for name in chosen], len(statuses))}{note}"
    subprocess.run([str(Path(sys.executable).with_name("mutmut")), "export-cicd-stats"], cwd=folder, check=True,
                   capture_output=True)
    exported = folder / "mutants" / "mutmut-cicd-stats.json"
    if not exported.exists():  # mutmut stopped before judging any mutant (a module with none, or a failed run)
        return f"{module}: no mutant judged (mutants-io/{folder.name}/mutants.log says why)"
    return f"{module}: {summary(json.loads(exported.read_text()))}{note}"


def main(argv: list[str]) -> int:
    modules = argv or list(MODULES)
    unknown = [m for m in modules if m not in MODULES]
    if unknown:
        print(f"not an I/O module of tests/support/mutate_io.py: {' '.join(unknown)}", file=sys.stderr)
        return 2
    seconds = float(os.environ.get("MUTATE_MODULE_SECONDS", "600"))
    children = int(os.environ.get("MUTATE_CHILDREN", "2"))
    sample = int(os.environ.get("MUTATE_SAMPLE", "0"))
    for module in modules:
        print(run(module, seconds, children, sample), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
