"""The `smtpgate` command (DESIGN.md section 9).

Exit codes: 0 success, 1 a runtime failure (store, listener), 2 bad usage or
a bad config file (one line per problem on stderr).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from datetime import datetime, timezone
from pathlib import Path

from smtpgate import __version__
from smtpgate.config import ConfigError, config_path, load_config
from smtpgate.log import setup_logging


def _add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", metavar="CONFIG",
                        help="config file (default: $SMTPGATE_CONFIG, else /etc/smtpgate/smtpgate.yaml)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smtpgate", description="SMTP relay that links activities across team mailboxes")
    parser.add_argument("--version", action="version", version=f"smtpgate {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="run the relay in the foreground")
    _add_config(p)
    p = sub.add_parser("check-config", help="validate the config file")
    _add_config(p)

    links = sub.add_parser("links", help="show linked activities").add_subparsers(
        dest="links_command", required=True, metavar="SUBCOMMAND")
    p = links.add_parser("show", help="one activity, its links and its messages")
    p.add_argument("reference")
    p.add_argument("--json", action="store_true")
    _add_config(p)
    p = links.add_parser("list", help="all links")
    p.add_argument("--json", action="store_true")
    p.add_argument("--mailbox", metavar="M")
    p.add_argument("--since", metavar="DATE", help="ISO date or date-time (UTC when no zone)")
    _add_config(p)

    users = sub.add_parser("users", help="AUTH users").add_subparsers(
        dest="users_command", required=True, metavar="SUBCOMMAND")
    p = users.add_parser("add", help="add or replace a user; the password is read from stdin")
    p.add_argument("name")
    _add_config(p)

    db = sub.add_parser("db", help="the store").add_subparsers(dest="db_command", required=True, metavar="SUBCOMMAND")
    p = db.add_parser("upgrade", help="apply schema migrations")
    _add_config(p)
    p = db.add_parser("prune", help="delete message records older than store.keep_messages_days (links are kept)")
    _add_config(p)
    return parser


def _load(args) -> tuple[object | None, int]:
    path = config_path(args.config)
    try:
        return load_config(path), 0
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return None, 2


def _since(text: str | None) -> datetime | None:
    if text is None:
        return None
    value = datetime.fromisoformat(text)
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


async def _with_store(config, action, **open_args):
    from smtpgate.runtime.gate import open_configured_store
    from smtpgate.store import StoreError

    try:
        store = await open_configured_store(config, **open_args)
    except StoreError as exc:
        print(f"smtpgate: store {config.store.url}: {exc}", file=sys.stderr)
        return 1
    try:
        return await action(store)
    except StoreError as exc:
        print(f"smtpgate: store: {exc}", file=sys.stderr)
        return 1
    finally:
        await store.close()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        from smtpgate.runtime import loop
        from smtpgate.runtime.gate import serve

        try:
            factory = loop.loop_factory()
        except loop.LoopChoiceError as exc:
            print(f"smtpgate: {exc}", file=sys.stderr)
            return 2
        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(serve(config_path(args.config)))

    config, status = _load(args)
    if config is None:
        return status
    # Commands print their results on stdout; their log events go to stderr.
    setup_logging(config.logging.format, config.logging.level, stream=sys.stderr)

    if args.command == "check-config":
        print(config.summary())
        return 0

    if args.command == "links":
        from smtpgate.views import format_list, format_show

        teams = config.teams()
        if args.links_command == "show":
            async def show(store):
                view = await store.show(args.reference)
                if view is None:
                    print(f"smtpgate: no activity {args.reference} in the store", file=sys.stderr)
                    return 1
                print(format_show(view, teams, args.json))
                return 0
            return asyncio.run(_with_store(config, show))
        try:
            since = _since(args.since)
        except ValueError:
            print(f"smtpgate: --since: expected an ISO date such as 2026-11-27, got {args.since!r}", file=sys.stderr)
            return 2

        async def listing(store):
            rows = await store.list_links(mailbox=args.mailbox.lower() if args.mailbox else None, since=since)
            print(format_list(rows, teams, args.json))
            return 0
        return asyncio.run(_with_store(config, listing))

    if args.command == "users":
        from smtpgate.users import UsersError, add_user

        if config.users_file is None:
            print(f"smtpgate: {config.path.name}: users_file is not set", file=sys.stderr)
            return 2
        password = sys.stdin.readline().rstrip("\r\n")
        try:
            new = add_user(Path(config.users_file), args.name, password)
        except UsersError as exc:
            print(f"smtpgate: {exc}", file=sys.stderr)
            return 2
        print(f"{'added' if new else 'replaced'} {args.name} in {config.users_file}")
        return 0

    if args.command == "db":
        if args.db_command == "upgrade":
            async def upgrade(store):
                before, after = await store.upgrade()
                print(f"schema version {before} -> {after}" if before != after else f"schema is current (version {after})")
                return 0
            # An old schema must open to be upgraded: no schema check here.
            return asyncio.run(_with_store(config, upgrade, check_schema=False))

        async def prune(store):
            count = await store.prune_messages(config.store.keep_messages_days)
            print(f"pruned {count} message record(s) older than {config.store.keep_messages_days} days")
            return 0
        return asyncio.run(_with_store(config, prune))
    return 2

