"""What a reload cannot change (smtpgate/runtime/gate.py `Gate.reload`): the
config.reloaded line names the file and each setting that waits for a restart,
compared with what is serving (a listener the file turns to TLS included); and what it keeps:
the pool of an upstream it leaves unchanged."""

from __future__ import annotations

from pathlib import Path

from smtpgate.config import load_config
from smtpgate.runtime.gate import Gate
from smtpgate.runtime.supervisor import bind_listener
from tests.conftest import BASE_CONFIG, write_config
from tests.frontends.smtp.test_tls_auth import relay_one
from tests.runtime.test_reload import ehlo_keywords
from tests.support.sink import make_test_cert


def reloaded(log_lines) -> dict:
    return [e for e in log_lines() if e.get("event") == "config.reloaded"][-1]


async def test_needs_restart_names_each_setting_a_reload_cannot_change(sink, config_for, start_gate, log_lines,
                                                                       tmp_path: Path):
    upstream = f"smtp://127.0.0.1:{sink.port}"
    gate, _ = await start_gate(config_for(upstream))
    same = config_for(upstream)
    gate.reload(same)
    line = reloaded(log_lines)
    assert line["path"] == str(same.path) and line["needs_restart"] is None
    changed = config_for(upstream, "workers: 2\nadmin:\n  listen: 127.0.0.1:0\n", store=f"sqlite:{tmp_path}/other.db")
    gate.reload(changed)
    assert reloaded(log_lines)["needs_restart"] == ["store", "workers", "admin.listen"]
    gate.reload(config_for(upstream))  # reverted before a restart: nothing waits
    assert reloaded(log_lines)["needs_restart"] is None


async def test_needs_restart_names_a_listener_address_and_the_admin_certificate(sink, config_for, start_gate,
                                                                                log_lines, tmp_path: Path):
    upstream = f"smtp://127.0.0.1:{sink.port}"
    gate, _ = await start_gate(config_for(upstream))
    cert, key = make_test_cert(tmp_path / "admin")
    text = BASE_CONFIG.format(upstream=upstream, store=f"sqlite:{tmp_path}/smtpgate.db")
    moved = text.replace("address: 127.0.0.1:0", "address: 127.0.0.1:2587")
    assert moved != text
    changed = load_config(write_config(tmp_path, moved + f"admin:\n  tls_cert: {cert}\n  tls_key: {key}\n",
                                       name="changed.yaml"))
    gate.reload(changed)
    assert reloaded(log_lines)["needs_restart"] == ["listeners", "admin.tls_cert"]
    gate.reload(config_for(upstream, "mode: observe\n"))  # mode applies to new sessions
    assert reloaded(log_lines)["needs_restart"] is None


async def test_a_gate_on_sockets_bound_for_an_earlier_file_compares_a_reload_with_those(
        sink, config_for, log_lines, tmp_path: Path):
    """A worker forked after a reload starts with the newer file but serves the sockets the supervisor
    bound for its first one (runtime/supervisor.py): a reload is compared with those listeners."""
    upstream = f"smtp://127.0.0.1:{sink.port}"
    first = config_for(upstream)
    text = BASE_CONFIG.format(upstream=upstream, store=f"sqlite:{tmp_path}/smtpgate.db")
    moved = load_config(write_config(tmp_path, text.replace("address: 127.0.0.1:0", "address: 127.0.0.1:2587"),
                                     name="moved.yaml"))
    [listener] = first.listeners
    gate = Gate(moved)
    try:
        await gate.start([(listener, bind_listener(listener))], prune=False, admin=False)
        assert "PIPELINING" in await ehlo_keywords(gate.bound[0][1])
        gate.reload(moved)
        assert reloaded(log_lines)["needs_restart"] == ["listeners"]
        gate.reload(first)
        assert reloaded(log_lines)["needs_restart"] is None
    finally:
        await gate.drain(0)


async def test_a_listener_the_file_turns_to_tls_waits_for_a_restart_and_the_reload_applies(
        sink, config_for, start_gate, log_lines, tmp_path: Path):
    upstream = f"smtp://127.0.0.1:{sink.port}"
    gate, port = await start_gate(config_for(upstream))
    cert, key = make_test_cert(tmp_path / "tls")
    text = BASE_CONFIG.format(upstream=upstream, store=f"sqlite:{tmp_path}/smtpgate.db")
    plain = "    relay_networks: [127.0.0.1/32]\n"
    assert plain in text
    tls = text.replace(plain, plain + f"    tls: starttls\n    tls_cert: {cert}\n    tls_key: {key}\n")
    changed = load_config(write_config(tmp_path, tls, name="tls.yaml"))
    gate.reload(changed)
    line = reloaded(log_lines)
    assert line["path"] == str(changed.path) and line["needs_restart"] == ["listeners"]
    assert "STARTTLS" not in await ehlo_keywords(port)  # the listener serves as it was opened


async def test_a_reload_that_keeps_the_upstream_keeps_its_pooled_connection(sink, config_for, start_gate, log_lines):
    """Only a changed upstream gets a new pool: with the same one, the connection pooled
    before the reload carries the next message, and nothing says goodbye to it."""
    upstream = f"smtp://127.0.0.1:{sink.port}"
    gate, port = await start_gate(config_for(upstream))
    assert (await relay_one(port))[0] == 250
    assert sink.connections == 1
    gate.reload(config_for(upstream, "mode: observe\n"))
    assert reloaded(log_lines)["needs_restart"] is None
    assert (await relay_one(port))[0] == 250
    assert len(sink.messages) == 2 and sink.connections == 1
    assert "QUIT" not in sink.commands
