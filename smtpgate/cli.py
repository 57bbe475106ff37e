"""The `smtpgate` command (every command and option: docs/reference.md).

Exit codes: 0 success, 1 a runtime failure (store, listener, a link that is
not there), 2 bad usage, a bad config file (one line per problem on stderr)
or a store that does not exist.

Commands print their results on stdout. Their log events (`link.added`,
`link.deleted`, `store.upgraded`, ...) are JSON lines on stderr and, so that
the record outlives the terminal, in syslog (facility mail, ident smtpgate).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pwd
import sys
import syslog
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from pathlib import Path

from smtpgate import __version__
from smtpgate.config import Config, ConfigError, config_path, load_config
from smtpgate.log import setup_logging

_CONFIG_HELP = "config file (default: $SMTPGATE_CONFIG, else /etc/smtpgate/smtpgate.yaml)"


def build_parser() -> argparse.ArgumentParser:
    """The parser; `-c CONFIG` is accepted before or after any (sub)command."""
    # SUPPRESS: a -c given after the subcommand sets the value, one not given
    # there leaves the value of a -c given before it.
    config_option = argparse.ArgumentParser(add_help=False)
    config_option.add_argument("-c", "--config", metavar="CONFIG", default=argparse.SUPPRESS, help=_CONFIG_HELP)

    parser = argparse.ArgumentParser(prog="smtpgate",
                                     description="SMTP relay that links activities across team mailboxes")
    parser.add_argument("--version", action="version", version=f"smtpgate {__version__}")
    parser.add_argument("-c", "--config", metavar="CONFIG", default=None, help=_CONFIG_HELP)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(group, name: str, run, help: str, *, needs_config: bool = True) -> argparse.ArgumentParser:
        p = group.add_parser(name, help=help, parents=[config_option])
        p.set_defaults(run=run, needs_config=needs_config)
        return p

    def group(name: str, help: str):
        p = commands.add_parser(name, help=help, parents=[config_option])
        return p.add_subparsers(dest=f"{name}_command", required=True, metavar="SUBCOMMAND")

    command(commands, "serve", _serve, "run the relay in the foreground", needs_config=False)
    p = command(commands, "check-config", _check_config, "validate the config file")
    p.add_argument("--show", action="store_true",
                   help="print the effective configuration, defaults filled in, secrets redacted")

    _links_commands(group("links", "linked activities"), command)
    _explain_options(command(commands, "explain", _explain,
                             "the link decision for one message, step by step, read-only"))
    _users_commands(group("users", "AUTH users"), command)

    db = group("db", "the store")
    command(db, "upgrade", _db_upgrade, "apply schema migrations")
    command(db, "prune", _db_prune, "delete message records older than store.keep_messages_days (links are kept)")
    return parser


def _links_commands(links, command) -> None:
    """links show | list | add | delete | export | import."""
    p = command(links, "show", _links_show, "one activity, its links and its messages")
    p.add_argument("reference", help="matched case-insensitively")
    p.add_argument("--json", action="store_true")
    p = command(links, "list", _links_list, "all links")
    p.add_argument("--json", action="store_true")
    p.add_argument("--mailbox", metavar="M")
    p.add_argument("--since", metavar="DATE", help="ISO date or date-time (UTC when no zone)")
    p = command(links, "add", _links_add, "link two activities by hand")
    p.add_argument("source", metavar="SOURCE")
    p.add_argument("target", metavar="TARGET")
    p.add_argument("--mailbox", metavar="M", required=True, help="the mailbox that owns TARGET")
    p = command(links, "delete", _links_delete, "remove the link between two activities")
    p.add_argument("source", metavar="SOURCE")
    p.add_argument("target", metavar="TARGET")
    p = command(links, "export", _links_export, "every activity and link as one JSON object")
    p.add_argument("--json", action="store_true", help="the only format, accepted for clarity")
    p.add_argument("--messages", action="store_true", help="with the message records (a full backup)")
    p = command(links, "import", _links_import,
                "load an export into the store (creating it when there is none); a second run adds nothing")
    p.add_argument("file", metavar="FILE", help="a `links export --json` file, or - for standard input")


def _explain_options(p: argparse.ArgumentParser) -> None:
    """explain [FILE | --message-id ID], and the envelope it assumes."""
    p.add_argument("file", nargs="?", metavar="FILE", help="an .eml file, or - for standard input")
    p.add_argument("--message-id", metavar="ID", help="a message smtpgate relayed: what was done with it")
    p.add_argument("--mail-from", metavar="ADDR", help="envelope sender (default: the From: address)")
    p.add_argument("--rcpt", metavar="ADDR", action="append", default=[],
                   help="an envelope recipient, repeatable (default: To, Cc and Bcc)")
    p.add_argument("--inbound", action="store_true",
                   help="as an inbound listener would: tags put back, and what inbound sharing would add")
    p.add_argument("--json", action="store_true")


def _users_commands(users, command) -> None:
    """users add | list | delete."""
    p = command(users, "add", _users_add, "add or replace a user; the password is read from stdin")
    p.add_argument("name")
    rights = p.add_mutually_exclusive_group()
    rights.add_argument("--sender", metavar="PATTERN", nargs="+", action="extend", dest="senders",
                        help="an envelope sender or From: address the user may use: ADDRESS, *@DOMAIN "
                             "or MAILBOX+*@DOMAIN (any tag); repeatable; replaces the user's list "
                             "(default: keep it; a new user without one may send as anyone)")
    rights.add_argument("--any-sender", action="store_true",
                        help="remove the user's sender list: it may send as anyone")

    command(users, "list", _users_list, "the users and what each may send as")
    p = command(users, "delete", _users_delete, "remove a user")
    p.add_argument("name")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.needs_config:
        return args.run(args)
    try:
        config = load_config(config_path(args.config))
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 2
    setup_logging(config.logging.format, config.logging.level, stream=_StderrAndSyslog())
    return args.run(args, config)


def _fail(message: str, status: int) -> int:
    print(f"smtpgate: {message}", file=sys.stderr)
    return status


class _StderrAndSyslog:
    """The stream CLI log events go to: stderr, and each line to syslog."""

    def write(self, text: str) -> None:
        sys.stderr.write(text)
        for line in text.splitlines():
            if line:
                syslog.openlog("smtpgate", syslog.LOG_PID, syslog.LOG_MAIL)
                syslog.syslog(syslog.LOG_NOTICE, line)

    def flush(self) -> None:
        sys.stderr.flush()


def operator_name() -> str:
    """Who runs this command, as far as the process can tell: the OS account, and the
    account that ran sudo when $SUDO_USER names another (`alice (sudo)`, `alice (sudo as
    smtpgate)`). $SUDO_USER is the environment's word, not proof: syslog's record of the
    command carries the real uid."""
    try:
        name = pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        name = str(os.getuid())
    sudo_user = os.environ.get("SUDO_USER")
    if sudo_user and sudo_user != name:
        return f"{sudo_user} (sudo)" if os.getuid() == 0 else f"{sudo_user} (sudo as {name})"
    return name


def _with_store(config: Config, action: Callable[[object], Awaitable[int]], **open_args) -> int:
    """Run action(store) on the configured store; store failures become one line on stderr."""
    from smtpgate.runtime.gate import open_configured_store
    from smtpgate.store import StoreError, StoreMissing

    async def run() -> int:
        store = await open_configured_store(config, **open_args)
        try:
            return await action(store)
        finally:
            await store.close()

    try:
        return asyncio.run(run())
    except StoreMissing as exc:
        return _fail(f"store: {exc}", 2)
    except StoreError as exc:
        return _fail(f"store: {exc}", 1)


def _reference(config: Config, text: str) -> str | None:
    """text as a reference of references.pattern (upper-cased when only that matches)."""
    from smtpgate.linking.references import ReferenceMatcher

    return ReferenceMatcher(config.references.pattern).normalize(text.strip())


# ---------------------------------------------------------------- commands


def _serve(args) -> int:
    from smtpgate.runtime import loop
    from smtpgate.runtime.supervisor import serve_main

    try:
        loop.loop_factory()  # a bad SMTPGATE_EVENT_LOOP is refused before anything starts
    except loop.LoopChoiceError as exc:
        return _fail(str(exc), 2)
    return serve_main(config_path(args.config))


def _check_config(args, config: Config) -> int:
    print(config.show() if args.show else config.summary(), end="" if args.show else "\n")
    for warning in config.warnings:  # not errors (exit 0): the file is usable as it stands
        print(f"warning: {warning}", file=sys.stderr)
    return 0


def _links_show(args, config: Config) -> int:
    from smtpgate.views import format_show

    async def show(store) -> int:
        view = await store.show(args.reference.strip())
        if view is None:
            return _fail(f"no activity {args.reference} in the store", 1)
        _print(format_show(view, config.teams(), args.json))
        return 0

    return _with_store(config, show, read_only=True)


def _explain(args, config: Config) -> int:
    import json

    from smtpgate.explain import (MalformedMessage, explain_inbound, explain_message, explain_recorded, read_message,
                                  render_text)
    from smtpgate.linking.plan import Directory
    from smtpgate.linking.service import LinkService, LinkUnavailable

    if (args.file is None) == (args.message_id is None):
        return _fail("explain: give FILE (or - for standard input), or --message-id ID", 2)
    raw = None
    if args.file is not None:
        try:
            data = sys.stdin.buffer.read() if args.file == "-" else Path(args.file).read_bytes()
            raw = read_message(data)
        except OSError as exc:
            return _fail(f"explain: cannot read {args.file}: {exc.strerror or exc}", 2)
        except MalformedMessage as exc:
            return _fail(f"explain: {args.file}: {exc}", 2)

    async def explain(store) -> int:
        if raw is None:
            report = await explain_recorded(args.message_id.strip(), store)
            if report is None:
                return _fail(f"explain: smtpgate relayed no message {args.message_id} with a source activity "
                             "(or its record was pruned)", 1)
        else:
            links = LinkService(store, Directory(config.core), hostname=config.hostname, stamp=config.stamp.stamper)
            try:
                if args.inbound:
                    report = await explain_inbound(raw, links, mail_from=args.mail_from, rcpts=args.rcpt,
                                                   unknown_tags=config.inbound.unknown_tags,
                                                   share_with_thread=config.inbound.share_with_thread)
                else:
                    report = await explain_message(raw, links, mail_from=args.mail_from, rcpts=args.rcpt,
                                                   stamp=config.stamp.stamper)
            except MalformedMessage as exc:
                return _fail(f"explain: {args.file}: {exc}", 2)
            except LinkUnavailable as exc:
                return _fail(f"explain: {exc}", 1)
        print(json.dumps(report, indent=1, ensure_ascii=False) if args.json else render_text(report), end=""
              if not args.json else "\n")
        return 0

    return _with_store(config, explain, read_only=True)


def _links_list(args, config: Config) -> int:
    from smtpgate.views import format_list, parse_since

    try:
        since = parse_since(args.since) if args.since is not None else None
    except ValueError:
        return _fail(f"--since: expected an ISO date such as 2026-11-27, got {args.since!r}", 2)
    mailbox = _mailbox(config, args.mailbox) if args.mailbox else None

    async def listing(store) -> int:
        rows = await store.list_links(mailbox=mailbox, since=since)
        _print(format_list(rows, config.teams(), args.json))
        return 0

    return _with_store(config, listing, read_only=True)


def _mailbox(config: Config, text: str) -> str:
    """The canonical form of a mailbox address given on the command line."""
    from smtpgate.mail.addresses import AddressError, parse_path

    try:
        address = parse_path(text.strip())
    except AddressError:
        return text.strip().lower()
    return address.canonical if address is not None else text.strip().lower()


def _links_add(args, config: Config) -> int:
    from smtpgate.store import LinkConflict

    mailbox = _mailbox(config, args.mailbox)
    if mailbox not in config.teams():
        return _fail(f"--mailbox: {args.mailbox} is not one of the mailboxes in {config.path.name}", 2)
    source, target = _reference(config, args.source), _reference(config, args.target)
    for given, found in ((args.source, source), (args.target, target)):
        if found is None:
            return _fail(f"{given} is not a reference (references.pattern: {config.references.pattern})", 2)

    async def add(store) -> int:
        try:
            created = await store.add_link(source, target, mailbox, by=operator_name())
        except LinkConflict as exc:
            return _fail(str(exc), 1)
        print(f"linked {source} and {target} ({mailbox})" if created
              else f"{source} and {target} were already linked")
        return 0

    return _with_store(config, add)


def _links_delete(args, config: Config) -> int:
    # A reference that no longer matches a changed pattern can still be unlinked.
    source = _reference(config, args.source) or args.source.strip()
    target = _reference(config, args.target) or args.target.strip()

    async def delete(store) -> int:
        if not await store.delete_link(source, target, by=operator_name()):
            return _fail(f"no link between {source} and {target}", 1)
        print(f"unlinked {source} and {target}")
        return 0

    return _with_store(config, delete)


def _links_export(args, config: Config) -> int:
    from smtpgate.store.transfer import Backup
    from smtpgate.views import format_export

    async def export(store) -> int:
        activities, links = await store.export()
        messages = await store.export_messages() if args.messages else None
        backup = Backup(schema=store.latest_version(), activities=activities, links=links, messages=messages)
        _print(format_export(backup, config.teams(), datetime.now(timezone.utc)))
        return 0

    return _with_store(config, export, read_only=True)


def _links_import(args, config: Config) -> int:
    from smtpgate.store.migrations import SQLITE, latest  # the same versions for every backend
    from smtpgate.store.transfer import BackupError, read_backup

    name = "standard input" if args.file == "-" else args.file
    try:
        text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return _fail(f"links import: cannot read {name}: {getattr(exc, 'strerror', None) or exc}", 2)

    try:  # before the store is opened, let alone created
        backup = read_backup(text, name, latest(SQLITE))
    except BackupError as exc:
        return _fail(f"links import: {exc}", 2)

    async def load(store) -> int:
        counts = await store.import_backup(backup)
        for conflict in counts.conflicts:
            print(f"smtpgate: links import: owner kept: {conflict}", file=sys.stderr)
        # Local numbers the file holds are never issued again (as at every start).
        await store.raise_sequence([m.new_reference for m in config.mailboxes], config.allocator.first_number)
        from smtpgate.log import get_logger

        get_logger().info("links.imported", file=name, activities=counts.activities, owners=counts.owners,
                          links=counts.links, messages=counts.messages, conflicts=len(counts.conflicts),
                          by=operator_name())
        print(f"imported from {name}: {counts.activities} activities, {counts.owners} owner(s) filled in, "
              f"{counts.links} links, {counts.messages} message records"
              + ("" if backup.messages is not None else " (the file has none)"))
        return 0

    return _with_store(config, load)


def _print(text: str) -> None:
    """Output for a pipe that may close early (`| head`): no traceback, exit quietly."""
    try:
        print(text)
        sys.stdout.flush()
    except BrokenPipeError:
        # Python flushes stdout again at exit; point it at /dev/null so that does not fail too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _users_add(args, config: Config) -> int:
    from smtpgate.users import Users, UsersError, add_user

    if config.users_file is None:
        return _fail(f"{config.path.name}: users_file is not set", 2)
    password = sys.stdin.readline().rstrip("\r\n")
    try:
        senders = [] if args.any_sender else args.senders
        new = add_user(Path(config.users_file), args.name, password, senders=senders)
    except UsersError as exc:
        return _fail(str(exc), 2)
    rights = Users.load(Path(config.users_file)).senders.get(args.name)
    may = ", ".join(p.text for p in rights) if rights else "any address"
    if config.auth_backend == "upstream":
        may += " (not used: auth_backend is upstream, where the upstream decides)"
    print(f"{'added' if new else 'replaced'} {args.name} in {config.users_file}, sending as {may}; "
          f"`systemctl reload smtpgate` makes serve use it")
    return 0


def _users_list(args, config: Config) -> int:
    from smtpgate.users import Users, UsersError

    if config.users_file is None:
        return _fail(f"{config.path.name}: users_file is not set", 2)
    try:
        users = Users.load(Path(config.users_file))
    except UsersError as exc:
        return _fail(str(exc), 2)
    if not users.entries:
        _print(f"no users in {config.users_file}")
        return 0
    rows = []
    for name in users.entries:
        rights = users.senders.get(name)
        rows.append(f"{name}\t{', '.join(p.text for p in rights) if rights else 'any sender'}")
    _print("\n".join(rows))
    return 0


def _users_delete(args, config: Config) -> int:
    from smtpgate.users import UsersError, delete_user

    if config.users_file is None:
        return _fail(f"{config.path.name}: users_file is not set", 2)
    try:
        deleted = delete_user(Path(config.users_file), args.name)
    except UsersError as exc:
        return _fail(str(exc), 2)
    if not deleted:
        return _fail(f"no user {args.name} in {config.users_file}", 1)
    from smtpgate.log import get_logger

    get_logger().info("user.deleted", user=args.name, by=operator_name())
    print(f"deleted {args.name} from {config.users_file}; `systemctl reload smtpgate` makes serve forget it")
    return 0


def _db_upgrade(args, config: Config) -> int:
    async def upgrade(store) -> int:
        before, after = await store.upgrade()
        print(f"schema version {before} -> {after}" if before != after else f"schema is current (version {after})")
        return 0

    # An old schema must open to be upgraded: no schema check here.
    return _with_store(config, upgrade, check_schema=False)


def _db_prune(args, config: Config) -> int:
    async def prune(store) -> int:
        count = await store.prune_messages(config.store.keep_messages_days)
        print(f"pruned {count} message record(s) older than {config.store.keep_messages_days} days")
        return 0

    return _with_store(config, prune)
