"""What a reload cannot change (smtpgate/runtime/gate.py `Gate.reload`): the
config.reloaded line names the file and each setting that waits for a restart,
compared with what is serving."""

from __future__ import annotations

from pathlib import Path


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
