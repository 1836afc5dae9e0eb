"""The `mailgrid` command: run the suite or one service, manage users, look at queues.

Every failure ends in one line on stderr (``mailgrid: ...``) and exit status 1; usage
errors exit 2 (argparse). Settings come from MAILGRID_* variables, as for the services.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import importlib
import inspect
import logging
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import cast

from pydantic import ValidationError

import mailgrid
from mailgrid import domain_cli, memory, queue_cli, reindex_cli, services
from mailgrid.errors import AlreadyExists, InvalidArgument, MailgridError, Unavailable
from mailgrid.grpcutil import call, channel, wait_healthy
from mailgrid.launcher import Endpoints, Launcher, pid_alive, read_endpoints
from mailgrid.service import Service, configure_logging, run_until_signalled
from mailgrid.settings import Settings
from mailgrid.v1 import common_pb2

log = logging.getLogger(__name__)

# How long the CLI waits for a running suite's metadata_svc to answer health.
PROBE_TIMEOUT = 3.0
# RFC 5321 4.5.3.1: local-part at most 64 octets, a path at most 256 (so 254 for the
# address itself without the angle brackets).
MAX_LOCAL_PART = 64
MAX_ADDRESS = 254


class CliError(MailgridError):
    """A failure the CLI reports in one line."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mailgrid",
        description="mailgrid: a distributed email service. Settings: MAILGRID_* variables.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    commands.add_parser("up", help="run the whole suite on this machine (foreground)")

    serve = commands.add_parser("serve", help="run one service in the foreground")
    serve.add_argument("service", choices=sorted(services.BY_NAME))

    user = commands.add_parser("user", help="manage users")
    user_commands = user.add_subparsers(dest="user_command", required=True, metavar="ACTION")
    add = user_commands.add_parser(
        "add", help="create a user with the RFC 6154 folders",
        description="Creates a user. Uses the running suite if there is one, else opens "
                    "the store in MAILGRID_DATA_DIR directly.")
    add.add_argument("address", help="the user's address, e.g. alice@example.test")
    add.add_argument("--password", help="the password (default: read from stdin)")
    add.add_argument("--quota", type=_non_negative_int, default=0, metavar="BYTES",
                     help="mailbox quota in bytes (default 0: unlimited)")

    queue = commands.add_parser("queue", help="show the mail queues of the running suite")
    queue_cli.add_arguments(queue)
    reindex = commands.add_parser("reindex", help="rebuild the search index from the "
                                  "mailbox store (running suite)")
    reindex_cli.add_arguments(reindex)
    domain_cli.add_dkim_arguments(commands.add_parser("dkim", help="DKIM signing keys"))
    domain_cli.add_domain_arguments(commands.add_parser(
        "domain", help="check a domain's SPF, DKIM and DMARC records"))
    show = commands.add_parser("settings", help="show every setting and its value")
    show.add_argument("--markdown", action="store_true",
                      help="print the documentation table (defaults) instead")
    commands.add_parser("migrate", help="create or update the metadata schema "
                        "(SQLite file or ScyllaDB keyspace of MAILGRID_METADATA_DB_URL)")
    commands.add_parser("version", help="print the version")
    return parser


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of bytes: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError("must be 0 (unlimited) or more")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = Settings()
        command: Callable[[argparse.Namespace, Settings], int] = {
            "up": cmd_up, "serve": cmd_serve, "user": cmd_user_add,
            "queue": cmd_queue, "settings": cmd_settings, "version": cmd_version,
            "reindex": reindex_cli.cmd_reindex, "migrate": cmd_migrate,
            "dkim": domain_cli.cmd_dkim, "domain": domain_cli.cmd_domain,
        }[args.command]
        return command(args, settings)
    except ValidationError as err:
        first = err.errors()[0]
        field = "_".join(str(part) for part in first["loc"]).upper()
        print(f"mailgrid: invalid setting MAILGRID_{field}: {first['msg']}", file=sys.stderr)
    except MailgridError as err:
        print(f"mailgrid: {err.detail}", file=sys.stderr)
    except KeyboardInterrupt:
        print("mailgrid: interrupted", file=sys.stderr)
    return 1


def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    from metadata_svc.backends import migrate

    for statement in asyncio.run(migrate(settings)):
        print(statement)
    return 0


# up / serve ----------------------------------------------------------------------------

def cmd_up(args: argparse.Namespace, settings: Settings) -> int:
    configure_logging(settings, "launcher")
    return asyncio.run(Launcher(settings).run())


def load_app(name: str) -> Callable[[Settings], Service]:
    spec = services.BY_NAME[name]
    module_name, class_name = spec.module, spec.app_class
    module = importlib.import_module(module_name)
    return cast(Callable[[Settings], Service], getattr(module, class_name))


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    configure_logging(settings, args.service)
    spec = services.BY_NAME[args.service]
    if spec.nice_setting and (nice := getattr(settings, spec.nice_setting)):
        os.nice(nice)  # before any thread starts: every thread of the process inherits it
        log.info("%s runs at CPU niceness %d (%s)", args.service, os.nice(0),
                 spec.nice_setting)
    kept = memory.keep_freed_memory(settings.malloc_keep_bytes)
    app = load_app(args.service)(settings)
    try:
        asyncio.run(_serve(app, settings.malloc_return_interval if kept else 0.0))
    except MailgridError as err:
        # A service that cannot start (port taken, NATS down) says why in one line.
        log.error("%s", err.detail)
        return 1
    except OSError as err:
        listeners = ", ".join(f"MAILGRID_{name.upper()}={getattr(settings, name)}"
                              for name in services.BY_NAME[args.service].listeners)
        log.error("%s could not start: %s (listeners: %s)",
                  args.service, err.strerror or err, listeners)
        return 1
    return 0


async def _serve(app: Service, return_interval: float) -> None:
    returner = asyncio.create_task(memory.return_freed_memory(return_interval))
    try:
        await run_until_signalled(app)
    finally:
        returner.cancel()


# user add ------------------------------------------------------------------------------

def validate_address(address: str) -> str:
    """A plain addr-spec (local@domain), lower-cased; InvalidArgument otherwise."""
    address = address.strip()
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain:
        raise InvalidArgument(f"{address!r} is not an address (expected local@domain)")
    if len(local.encode()) > MAX_LOCAL_PART or len(address.encode()) > MAX_ADDRESS:
        raise InvalidArgument(f"{address!r} is too long (RFC 5321 4.5.3.1)")
    if any(ch.isspace() or ch in '<>()[],;:\\"' for ch in address) or "@" in local:
        raise InvalidArgument(f"{address!r} is not a plain address (local@domain)")
    if ".." in domain or domain.startswith(".") or domain.endswith("."):
        raise InvalidArgument(f"{address!r} has an invalid domain")
    return address.lower()


def read_password(args: argparse.Namespace) -> str:
    if args.password is not None:
        password = str(args.password)
    elif sys.stdin.isatty():
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            raise InvalidArgument("the passwords differ")
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        raise InvalidArgument("the password is empty")
    return password


def cmd_user_add(args: argparse.Namespace, settings: Settings) -> int:
    address = validate_address(args.address)
    running = read_endpoints(settings.data_dir)
    domains = running.domains if running else settings.domains
    domain = address.rpartition("@")[2]
    if domain not in domains:
        raise InvalidArgument(
            f"{domain} is not a local domain (local domains: {', '.join(domains)}; "
            "set MAILGRID_DOMAINS)")
    password = read_password(args)
    try:
        user, how = asyncio.run(create_user(settings, running, address, password, args.quota))
    except AlreadyExists:
        raise CliError(f"user {address} already exists") from None
    print(f"created {user.address} (id {user.user_id}) {how}")
    return 0


async def create_user(settings: Settings, running: Endpoints | None, address: str,
                      password: str, quota: int) -> tuple[common_pb2.User, str]:
    """Through the running suite's metadata_svc if there is one, else directly in the
    store; never directly while a live launcher owns the store (one writer)."""
    # endpoints.json of a launcher that is gone (killed with SIGKILL) is stale.
    if running is not None and pid_alive(running.launcher_pid):
        metadata = running.services.get("metadata")
        if metadata is not None and await _answers(metadata.grpc_addr):
            from mailgrid.clients import MetadataClient
            async with MetadataClient(metadata.grpc_addr) as client:
                user = await client.create_user(address, password, quota)
            return user, f"via metadata_svc at {metadata.grpc_addr}"
        raise Unavailable(
            f"the suite on {settings.data_dir} is running but metadata_svc does not "
            "answer; try again in a moment")
    from metadata_svc.app import open_store  # the service's own way to open its store
    store = await open_store(settings)
    try:
        user = await store.create_user(address, password, quota)
    finally:
        await store.close()
    return user, f"in {settings.data_dir}"


async def _answers(addr: str) -> bool:
    try:
        await wait_healthy(addr, timeout=PROBE_TIMEOUT)
    except Unavailable:
        return False
    return True


# queue / version -----------------------------------------------------------------------

def cmd_queue(args: argparse.Namespace, settings: Settings) -> int:
    running = read_endpoints(settings.data_dir)
    if running is None or "delivery" not in running.services:
        raise Unavailable(f"no suite is running on {settings.data_dir} (start `mailgrid up`)")
    addr = running.services["delivery"].grpc_addr
    action = getattr(args, "queue_command", None)
    if action in ("retry", "drop"):
        print(asyncio.run(queue_cli.job_action(addr, action, args.job_id)))
        return 0
    rows = asyncio.run(queue_stats(addr))
    print(format_table(
        ["STREAM", "MESSAGES", "BYTES", "PENDING", "UNACKED", "REDELIVERED"], rows))
    jobs, truncated = asyncio.run(queue_cli.list_jobs(addr))
    print()
    print(format_table(queue_cli.JOB_HEADER, jobs) if jobs else "no outbound jobs")
    if truncated:
        print(f"(first {len(jobs)} jobs shown)")
    return 0


async def queue_stats(addr: str) -> list[list[str]]:
    from mailgrid.v1 import delivery_pb2, delivery_pb2_grpc
    async with channel(addr) as chan:
        stub = delivery_pb2_grpc.DeliveryServiceStub(chan)
        reply = await call(stub.GetQueueStats(delivery_pb2.GetQueueStatsRequest(),
                                              timeout=10.0))
    return [[q.stream, str(q.messages), str(q.bytes), str(q.pending), str(q.pending_ack),
             str(q.redelivered)] for q in reply.queues]


def format_table(header: list[str], rows: list[list[str]]) -> str:
    """Columns padded to their widest cell; numeric columns aligned right."""
    columns = range(len(header))
    widths = [max(len(row[i]) for row in [header, *rows]) for i in columns]
    numeric = [bool(rows) and all(row[i].isdigit() for row in rows) for i in columns]
    lines = ["  ".join(cell.rjust(widths[i]) if numeric[i] else cell.ljust(widths[i])
                       for i, cell in enumerate(row))
             for row in [header, *rows]]
    return "\n".join(line.rstrip() for line in lines)


# settings ------------------------------------------------------------------------------

README_BEGIN = "<!-- settings-table: generated by `make readme` from mailgrid/settings.py -->"
README_END = "<!-- settings-table end -->"


def setting_comments() -> dict[str, str]:
    """Each field's one-line comment from mailgrid/settings.py (the comment lines right
    above it; a field without one shares the comment of the field before it)."""
    from mailgrid import settings as module
    lines = inspect.getsource(module.Settings).splitlines()
    comments: dict[str, str] = {}
    previous = ""
    for index, line in enumerate(lines):
        match = re.match(r"    (\w+):", line)
        if not match or match.group(1) not in Settings.model_fields:
            continue
        above: list[str] = []
        for earlier in reversed(lines[:index]):
            if not earlier.strip().startswith("#"):
                break
            above.insert(0, earlier.strip().lstrip("#").strip())
        previous = " ".join(above) or previous
        comments[match.group(1)] = previous
    return comments


def show_value(value: object) -> str:
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value)


def settings_markdown() -> str:
    """The README's settings table: every MAILGRID_* variable, default, meaning."""
    comments = setting_comments()
    rows = ["| variable | default | meaning |", "| --- | --- | --- |"]
    for name, info in Settings.model_fields.items():
        default = show_value(info.get_default(call_default_factory=True))
        shown = f"`{default}`" if default else "(empty)"
        meaning = comments.get(name, "").replace("|", "\\|")
        rows.append(f"| `MAILGRID_{name.upper()}` | {shown} | {meaning} |")
    return "\n".join(rows) + "\n"


def splice_settings_table(readme: str) -> str:
    """``readme`` with the text between the settings-table markers regenerated."""
    begin, end = readme.index(README_BEGIN), readme.index(README_END)
    return readme[:begin] + README_BEGIN + "\n" + settings_markdown() + readme[end:]


def update_readme(path: str = "README.md") -> None:
    readme = Path(path)
    readme.write_text(splice_settings_table(readme.read_text()))


def cmd_settings(args: argparse.Namespace, settings: Settings) -> int:
    if args.markdown:
        print(settings_markdown(), end="")
        return 0
    rows = [[f"MAILGRID_{name.upper()}",
             "(set)" if name == "token_secret" and settings.token_secret
             else show_value(getattr(settings, name))]
            for name in Settings.model_fields]
    print(format_table(["VARIABLE", "VALUE"], rows))
    return 0


def cmd_version(args: argparse.Namespace, settings: Settings) -> int:
    print(f"mailgrid {mailgrid.__version__}")
    return 0
