"""The `mailgrid` command line: parsing, `user add` with the suite down, the settings doc."""

from __future__ import annotations

import asyncio
import gc
import io
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mailgrid import cli
from mailgrid.errors import InvalidArgument
from mailgrid.launcher import (
    Endpoints,
    ServiceEndpoint,
    child_env,
    endpoints_path,
    free_addr,
    load_or_create_token_secret,
    pump_output,
    token_secret_path,
)
from mailgrid.service import (
    LOG_FD_ENV,
    LOG_PREFIX_ENV,
    SMTP_TRACE_LOGGER,
    configure_logging,
    line_prefix,
    run_until_signalled,
)
from mailgrid.settings import Settings

README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A data dir the CLI reads from MAILGRID_DATA_DIR, as a user's shell would set it."""
    for name in Settings.model_fields:
        monkeypatch.delenv(f"MAILGRID_{name.upper()}", raising=False)
    path = tmp_path / "data"
    monkeypatch.setenv("MAILGRID_DATA_DIR", str(path))
    monkeypatch.setenv("MAILGRID_DOMAINS", "example.test,example.org")
    return path


# parsing

def test_serve_accepts_each_service_name() -> None:
    parser = cli.build_parser()
    for name in ("metadata", "delivery", "gateway"):
        assert parser.parse_args(["serve", name]).service == name


def test_serve_rejects_an_unknown_service_with_usage_error(
        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.build_parser().parse_args(["serve", "smtp"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'smtp'" in capsys.readouterr().err


def test_user_add_parses_password_and_quota() -> None:
    args = cli.build_parser().parse_args(
        ["user", "add", "a@example.test", "--password", "pw", "--quota", "1000"])
    assert (args.command, args.user_command, args.address) == ("user", "add", "a@example.test")
    assert (args.password, args.quota) == ("pw", 1000)


def test_user_add_without_password_reads_it_later() -> None:
    args = cli.build_parser().parse_args(["user", "add", "a@example.test"])
    assert args.password is None
    assert args.quota == 0


def test_negative_quota_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.build_parser().parse_args(["user", "add", "a@example.test", "--quota", "-1"])
    assert exit_info.value.code == 2
    assert "must be 0 (unlimited) or more" in capsys.readouterr().err


def test_a_command_is_required(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.build_parser().parse_args([])
    assert exit_info.value.code == 2


def test_version_prints_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["version"]) == 0
    assert capsys.readouterr().out == "mailgrid 0.1.0\n"


# addresses

@pytest.mark.parametrize("address", ["Alice@Example.TEST", " alice@example.test "])
def test_addresses_are_lower_cased_and_trimmed(address: str) -> None:
    assert cli.validate_address(address) == "alice@example.test"


@pytest.mark.parametrize("address", [
    "alice", "@example.test", "alice@", "a b@example.test", "<alice@example.test>",
    "alice@example..test", "alice@.example.test", "a@b@example.test",
    "x" * 65 + "@example.test",
])
def test_malformed_addresses_are_refused(address: str) -> None:
    with pytest.raises(InvalidArgument):
        cli.validate_address(address)


# user add with the suite down: the store in the data dir, directly

def test_user_add_twice_with_the_suite_down_fails_the_second_time(
        data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["user", "add", "Alice@example.test", "--password", "pw-1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("created alice@example.test (id ")
    assert f"in {data_dir}" in out

    assert cli.main(["user", "add", "alice@example.test", "--password", "pw-2"]) == 1
    captured = capsys.readouterr()
    assert captured.err == "mailgrid: user alice@example.test already exists\n"
    assert captured.out == ""


def test_user_add_reads_the_password_from_stdin(
        data_dir: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("from-stdin\n"))
    assert cli.main(["user", "add", "bob@example.org"]) == 0
    assert "created bob@example.org" in capsys.readouterr().out


def test_user_add_refuses_an_empty_password(
        data_dir: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert cli.main(["user", "add", "bob@example.org"]) == 1
    assert capsys.readouterr().err == "mailgrid: the password is empty\n"


def test_user_add_refuses_a_foreign_domain(
        data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["user", "add", "eve@elsewhere.example", "--password", "pw"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("mailgrid: elsewhere.example is not a local domain")
    assert "example.test, example.org" in err


def test_user_add_refuses_a_malformed_address_in_one_line(
        data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["user", "add", "not-an-address", "--password", "pw"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "is not an address" in err


def test_user_add_with_a_stale_endpoints_file_uses_the_store(
        data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A launcher killed with SIGKILL leaves endpoints.json behind; its pid is gone.
    stale = Endpoints(
        launcher_pid=2**22 + 1, data_dir=str(data_dir), http_addr="127.0.0.1:1",
        smtp_addr="127.0.0.1:1", submission_addr="127.0.0.1:1", submission_served=False,
        nats_url="nats://127.0.0.1:1", nats_pid=0, domains=["example.test"],
        services={"metadata": ServiceEndpoint("127.0.0.1:1", pid=2**22 + 2)})
    stale.write(endpoints_path(data_dir))
    assert cli.main(["user", "add", "carol@example.test", "--password", "pw"]) == 0
    assert f"in {data_dir}" in capsys.readouterr().out


def test_invalid_setting_is_named_in_one_line(
        data_dir: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("MAILGRID_TOKEN_TTL", "soon")
    assert cli.main(["version"]) == 1
    assert capsys.readouterr().err.startswith("mailgrid: invalid setting MAILGRID_TOKEN_TTL:")


def test_queue_without_a_running_suite_says_so(
        data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["queue"]) == 1
    assert capsys.readouterr().err == (
        f"mailgrid: no suite is running on {data_dir} (start `mailgrid up`)\n")


# launcher helpers the CLI relies on

def test_endpoints_survive_a_json_round_trip(tmp_path: Path) -> None:
    endpoints = Endpoints(
        launcher_pid=1, data_dir=str(tmp_path), http_addr="127.0.0.1:8025",
        smtp_addr="127.0.0.1:2525", submission_addr="127.0.0.1:2587",
        submission_served=True, nats_url="nats://127.0.0.1:4222", nats_pid=2,
        domains=["example.test"],
        services={"gateway": ServiceEndpoint("127.0.0.1:5000", pid=3, restarts=1)})
    path = endpoints_path(tmp_path)
    endpoints.write(path)
    assert json.loads(path.read_text())["http_url"] == "http://127.0.0.1:8025/v1"
    assert Endpoints.from_json(path.read_text()) == endpoints


def test_token_secret_is_created_once_and_private(tmp_path: Path) -> None:
    first = load_or_create_token_secret(tmp_path)
    assert load_or_create_token_secret(tmp_path) == first
    assert len(first) >= 32
    assert token_secret_path(tmp_path).stat().st_mode & 0o777 == 0o600


def test_port_zero_becomes_a_fixed_port_and_others_stay() -> None:
    assert free_addr("127.0.0.1:2525") == "127.0.0.1:2525"
    host, _, port = free_addr("127.0.0.1:0").rpartition(":")
    assert host == "127.0.0.1" and int(port) > 0


def test_a_chosen_port_is_none_another_listener_is_set_to(monkeypatch: pytest.MonkeyPatch,
                                                          ) -> None:
    # The kernel may hand out a port again once its probe socket is closed: one a
    # listener that binds later (the gateway's SMTP port, say) is configured for.
    offered = iter([2525, 2525, 40001, 40001, 40002])
    monkeypatch.setattr("mailgrid.launcher.free_port", lambda host: next(offered))
    taken = {2525}
    assert free_addr("127.0.0.1:0", taken) == "127.0.0.1:40001"
    assert free_addr("127.0.0.1:0", taken) == "127.0.0.1:40002"
    assert taken == {2525, 40001, 40002}


def test_children_get_every_setting_in_a_form_settings_reads_back(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, domains=["example.test", "example.org"],
                        token_secret="s" * 40, max_recipients=7)
    env = child_env(settings)
    assert env["MAILGRID_DOMAINS"] == "example.test,example.org"
    assert env["MAILGRID_TOKEN_SECRET"] == "s" * 40
    mailgrid_env = {k: v for k, v in env.items() if k.startswith("MAILGRID_")}
    with pytest.MonkeyPatch.context() as patch:
        for key, value in mailgrid_env.items():
            patch.setenv(key, value)
        assert Settings() == settings


# the README's settings table

def test_readme_settings_table_matches_settings_py() -> None:
    readme = README.read_text()
    assert cli.README_BEGIN in readme and cli.README_END in readme
    assert cli.splice_settings_table(readme) == readme, (
        "README.md's settings table is out of date: run `make readme`")
    for name in Settings.model_fields:
        assert f"`MAILGRID_{name.upper()}`" in readme


def test_every_setting_has_a_comment() -> None:
    comments = cli.setting_comments()
    assert set(comments) == set(Settings.model_fields)
    assert all(comments.values())


@pytest.mark.parametrize(("level", "trace_info", "trace_warning"), [
    ("INFO", False, True), ("DEBUG", True, True), ("ERROR", False, False)])
def test_the_smtp_protocol_trace_is_logged_only_at_debug(
        level: str, trace_info: bool, trace_warning: bool) -> None:
    trace = logging.getLogger(SMTP_TRACE_LOGGER)
    before = trace.level
    try:
        configure_logging(Settings(log_level=level), "gateway")
        assert trace.isEnabledFor(logging.INFO) is trace_info
        assert trace.isEnabledFor(logging.WARNING) is trace_warning
    finally:
        trace.setLevel(before)


async def test_child_output_is_copied_in_whole_prefixed_lines() -> None:
    stream = asyncio.StreamReader()
    long_line = "x" * 200_000  # longer than a StreamReader line may be
    data = f"first\nsecond é\n{long_line}\nno newline at the end".encode()
    for start in range(0, len(data), 7001):  # pieces that cut lines (and é) in two
        stream.feed_data(data[start:start + 7001])
    stream.feed_eof()
    sink = io.StringIO()
    await pump_output("gateway", stream, sink)
    assert sink.getvalue().splitlines() == [
        "gateway  | first", "gateway  | second é", f"gateway  | {long_line}",
        "gateway  | no newline at the end"]


# A service process as `mailgrid up` starts it: an info line, then an error with its
# traceback, so that every line of a multi-line record is seen.
CHILD_LOGS = textwrap.dedent("""
    import logging
    from mailgrid.service import configure_logging
    from mailgrid.settings import Settings
    configure_logging(Settings(log_level="INFO"), "gateway")
    log = logging.getLogger("mailgrid.test")
    log.info("one line")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("with a traceback")
    import os  # neither setting is passed on to what this process starts
    assert "MAILGRID_LOG_FD" not in os.environ and "MAILGRID_LOG_PREFIX" not in os.environ
""")


def run_child(fd: str, pass_fds: tuple[int, ...] = ()) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", CHILD_LOGS], capture_output=True, text=True, timeout=60,
        env={**os.environ, LOG_FD_ENV: fd, LOG_PREFIX_ENV: line_prefix("gateway")},
        pass_fds=pass_fds, check=False)


def test_a_child_of_the_launcher_logs_straight_into_the_output_handed_down(
        tmp_path: Path) -> None:
    out = tmp_path / "launcher-stderr"
    with out.open("w") as sink:
        done = run_child(str(sink.fileno()), (sink.fileno(),))
    assert done.returncode == 0, done.stderr
    assert (done.stdout, done.stderr) == ("", "")  # nothing left for the pipe to copy
    lines = out.read_text().splitlines()
    assert all(line.startswith("gateway  | ") for line in lines), lines
    assert lines[0].endswith(" INFO mailgrid.test: one line")
    assert " gateway[" in lines[0]
    assert lines[1].endswith(" ERROR mailgrid.test: with a traceback")
    assert lines[2] == "gateway  | Traceback (most recent call last):"
    assert lines[-1] == "gateway  | ValueError: boom"


@pytest.mark.parametrize("fd", ["", "stderr", "987"])  # unset, not a number, not open
def test_without_a_usable_handed_down_output_a_service_logs_to_its_stderr(fd: str) -> None:
    done = run_child(fd)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert lines[0].endswith(" INFO mailgrid.test: one line")
    assert not lines[0].startswith("gateway  |")  # the launcher's pump adds it there
    assert lines[-1] == "ValueError: boom"


# `mailgrid up` forks its services (with a preexec_fn) while its own gRPC channels run.
FORK_WHILE_GRPC_RUNS = textwrap.dedent("""
    import asyncio, os
    import mailgrid
    import grpc
    from mailgrid.launcher import die_with_parent

    async def main():
        channel = grpc.aio.insecure_channel("127.0.0.1:9")  # gRPC's threads now run
        try:
            await asyncio.wait_for(channel.channel_ready(), 0.2)
        except (asyncio.TimeoutError, grpc.RpcError):
            pass
        read, write = os.pipe()
        stay_with_parent = die_with_parent()

        def in_the_child_before_exec():
            stay_with_parent()
            os.write(write, str(len(os.listdir("/proc/self/task"))).encode())

        child = await asyncio.create_subprocess_exec(
            "/bin/true", preexec_fn=in_the_child_before_exec, pass_fds=(write,))
        await child.wait()
        os.close(write)
        print(os.read(read, 16).decode(), child.returncode)
        await channel.close()

    asyncio.run(main())
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/task")
def test_a_service_forked_while_grpc_runs_gets_no_grpc_threads_before_its_exec() -> None:
    # gRPC's fork handlers would restart its pollers in the child, and subprocess closes
    # their epoll descriptors before exec: about one child in a hundred then aborted.
    env = {k: v for k, v in os.environ.items() if k != "GRPC_ENABLE_FORK_SUPPORT"}
    done = subprocess.run([sys.executable, "-c", FORK_WHILE_GRPC_RUNS], env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1", "0"], done.stderr


async def test_what_a_service_made_while_starting_is_frozen_out_of_the_collector() -> None:
    """run_until_signalled freezes the objects that exist once the service has started
    (gc.freeze), so full collections under load do not walk them again."""
    seen: dict[str, int] = {}

    class Probe:
        async def start(self) -> None:
            self.kept = [object() for _ in range(10)]  # made while starting
            seen["at start"] = gc.get_freeze_count()
            asyncio.get_running_loop().call_soon(os.kill, os.getpid(), signal.SIGTERM)

        async def stop(self) -> None:
            seen["while serving"] = gc.get_freeze_count()

    gc.unfreeze()
    try:
        await asyncio.wait_for(run_until_signalled(Probe()), 10)
    finally:
        gc.unfreeze()
    assert seen["at start"] == 0
    assert seen["while serving"] > 1000
