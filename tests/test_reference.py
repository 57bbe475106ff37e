"""docs/reference.md against the code: every configuration key with its default,
every reply of the catalogue, every event the code logs with the fields it names,
every command and option; and nothing there that the code does not have."""

from __future__ import annotations

import argparse
import ast
import re
from pathlib import Path

import pytest
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from smtpgate.cli import build_parser
from smtpgate.config.schema import Config
from smtpgate.config.source import _section_of
from smtpgate.mail import replies

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = (ROOT / "docs" / "reference.md").read_text(encoding="utf-8")
LEVELS = {"debug", "info", "warning", "error", "exception", "critical"}
EVENT = re.compile(r"[a-z_]+(\.[a-z_]+)+")


def rows(section: str) -> dict[str, list[str]]:
    """The table rows of one `## section`, by their first cell without backticks."""
    body = REFERENCE.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    found = {}
    for line in body.splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        if cells and cells[0].startswith("`"):
            found[cells[0].strip("`")] = cells[1:]
    return found


# --- configuration


def schema_keys(model: type[BaseModel] = Config, prefix: str = ""):
    """(key path, field) for every key a file may set."""
    for name, field in model.model_fields.items():
        inner, many = _section_of(field.annotation)
        if inner is not None:
            yield from schema_keys(inner, f"{prefix}{name}{'[].' if many else '.'}")
        else:
            yield prefix + name, field


def as_written(value) -> str:
    """A default as the reference writes it."""
    if value is None:
        return "not set"
    if value is PydanticUndefined:
        return "required"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, tuple):
        return f"`[{', '.join(map(str, value))}]`"
    return f'`{value}`' if value != "" else '`""`'


def test_every_configuration_key_is_documented_with_its_default():
    documented = rows("Configuration")
    for key, field in schema_keys():
        assert key in documented, f"docs/reference.md lacks the key {key}"
        if field.default_factory is None:
            assert as_written(field.default) in documented[key][1], (key, documented[key][1])


def test_the_reference_names_no_key_the_schema_lacks():
    assert set(rows("Configuration")) - {key for key, _ in schema_keys()} == set()


# --- replies


def catalogue() -> list[replies.Reply]:
    return [value for value in vars(replies).values() if isinstance(value, replies.Reply)]


def test_every_reply_of_the_catalogue_is_documented():
    documented = rows("Replies smtpgate makes itself")
    missing = [reply.line() for reply in catalogue() if reply.line() not in documented]
    assert missing == []
    assert set(documented) == {reply.line() for reply in catalogue()}


# --- log events


def logged_events() -> dict[str, set[str]]:
    """Every event name smtpgate's code logs, with the keyword fields each call names.

    A call is `<logger>.<level>(event, field=...)`; the event is a string, either of
    two strings (`a if observe else b`), or a name assigned strings in that module.
    """
    events: dict[str, set[str]] = {}
    for path in sorted((ROOT / "smtpgate").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        assigned: dict[str, list[ast.AST]] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign):
                for target in node.targets:
                    if isinstance(target, ast.Name):
                        assigned.setdefault(target.id, []).append(node.value)
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in LEVELS and node.args):
                continue
            first = node.args[0]
            sources = assigned.get(first.id, []) if isinstance(first, ast.Name) else [first]
            names = {c.value for s in sources for c in ast.walk(s)
                     if isinstance(c, ast.Constant) and isinstance(c.value, str) and EVENT.fullmatch(c.value)}
            for name in names:
                events.setdefault(name, set()).update(k.arg for k in node.keywords if k.arg)
    return events


def test_the_event_scan_finds_what_it_should():
    """The scan itself: events logged in each of its three shapes are found."""
    events = logged_events()
    assert {"message.relayed", "message.retagged", "upstream.auth_failed", "worker.started"} <= set(events)
    assert {"code", "reason", "stage"} <= events["message.rejected"]


def test_every_logged_event_is_documented_with_its_fields():
    documented = rows("Log events")
    for event, fields in sorted(logged_events().items()):
        assert event in documented, f"docs/reference.md lacks the event {event}"
        text = documented[event][1]
        missing = sorted(f for f in fields if not re.search(rf"\b{f}\b", text))
        assert missing == [], f"{event}: fields not in docs/reference.md: {missing}"


def test_the_reference_names_no_event_the_code_never_logs():
    assert set(rows("Log events")) - set(logged_events()) == set()


# --- commands


def commands(parser: argparse.ArgumentParser, prefix: str = "smtpgate"):
    """(command line, its options) for every command that runs something."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                if any(isinstance(a, argparse._SubParsersAction) for a in sub._actions):
                    yield from commands(sub, f"{prefix} {name}")
                else:
                    yield f"{prefix} {name}", [o for a in sub._actions for o in a.option_strings
                                               if o.startswith("--") and o not in ("--help", "--config")]


@pytest.mark.parametrize("command,options", list(commands(build_parser())))
def test_every_command_and_option_is_documented(command, options):
    documented = rows("Commands")
    assert command in documented
    assert [o for o in options if f"`{o}`" not in documented[command][0]] == []


def test_the_reference_names_no_command_the_cli_lacks():
    assert set(rows("Commands")) == {command for command, _ in commands(build_parser())}
