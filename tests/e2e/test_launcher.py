"""`mailgrid up` as a user runs it: endpoints, health, users, crashes, shutdown."""

from __future__ import annotations

import functools
import json
import os
import re
import signal
import smtplib
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import psutil
import pytest

from mailgrid import services
from mailgrid.launcher import SERVICES, endpoints_path, token_secret_path
from mailgrid.settings import Settings
from tests.e2e.conftest import (
    ROOT,
    SERVING,
    LaunchSuite,
    Suite,
    grpc_health,
    is_serving,
    process_gone,
    suite_env,
    wait_for,
)

pytestmark = pytest.mark.e2e


def smtp_banner(suite: Suite) -> tuple[int, bytes]:
    host, port = suite.smtp_host_port
    client = smtplib.SMTP(timeout=10)
    try:
        return client.connect(host, port)
    finally:
        client.close()


def token(suite: Suite, address: str, password: str) -> httpx.Response:
    return httpx.post(f"{suite.http_url}/v1/auth/token",
                      json={"address": address, "password": password}, timeout=10)


def test_up_prints_endpoints_and_everything_answers(shared_suite: Suite) -> None:
    banner = shared_suite.output()
    assert banner.count("mailgrid is up") == 1
    assert f"HTTP API   http://{shared_suite.http_addr}/v1" in banner
    assert f"SMTP (MX)  {shared_suite.smtp_addr}" in banner
    assert f"Submission {shared_suite.submission_addr}" in banner
    assert "NATS       nats://127.0.0.1:" in banner
    assert f"data dir   {shared_suite.data_dir}" in banner

    endpoints = shared_suite.endpoints()
    assert endpoints.launcher_pid == shared_suite.pid
    assert endpoints.http_addr == shared_suite.http_addr
    assert endpoints.smtp_addr == shared_suite.smtp_addr
    assert endpoints.domains == ["example.test", "example.org"]
    assert set(endpoints.services) == set(SERVICES)
    for name in SERVICES:
        assert grpc_health(shared_suite.grpc_addr(name)) == SERVING, name

    assert httpx.get(f"{shared_suite.http_url}/healthz", timeout=10).status_code == 200
    code, _ = smtp_banner(shared_suite)
    assert code == 220


def test_up_creates_the_shared_token_secret_private(shared_suite: Suite) -> None:
    path = token_secret_path(shared_suite.data_dir)
    assert path.read_text().strip()
    assert path.stat().st_mode & 0o777 == 0o600


def test_user_add_while_running_goes_through_metadata_svc(shared_suite: Suite) -> None:
    added = shared_suite.cli("user", "add", "Alice@Example.test", "--password", "s3cret-pw")
    assert added.returncode == 0, added.stderr
    assert "alice@example.test" in added.stdout
    assert "via metadata_svc" in added.stdout

    again = shared_suite.cli("user", "add", "alice@example.test", input="other-pw\n")
    assert again.returncode == 1
    assert again.stderr.strip() == "mailgrid: user alice@example.test already exists"

    assert token(shared_suite, "alice@example.test", "s3cret-pw").status_code == 200


def test_filing_and_indexing_run_at_lower_cpu_priorities_than_the_smtp_sessions(
        shared_suite: Suite) -> None:
    # When CPU is short, filing yields to accepting mail (delivery_nice) and indexing
    # to both (search_nice).
    niceness = {name: os.getpriority(os.PRIO_PROCESS, shared_suite.endpoints().services[name].pid)
                for name in SERVICES}
    base = os.getpriority(os.PRIO_PROCESS, 0)
    assert niceness["delivery"] == min(base + 5, 19)
    assert niceness["search"] == min(base + 10, 19)
    assert all(niceness[name] == base for name in SERVICES
               if name not in ("delivery", "search"))


def test_the_embedded_nats_server_runs_under_the_memory_limit(shared_suite: Suite) -> None:
    (nats_server,) = [child for child in psutil.Process(shared_suite.process.pid).children()
                      if "nats-server" in child.name()]
    limit = Settings().nats_memory_limit
    assert limit > 0
    assert nats_server.environ()["GOMEMLIMIT"] == f"{limit}B"


def test_a_killed_child_is_restarted_on_the_same_address(suite: Suite) -> None:
    for name in SERVICES:
        before = suite.endpoints().services[name]
        os.kill(before.pid, signal.SIGKILL)

        def restarted(name: str = name, old_pid: int = before.pid) -> bool:
            now = suite.endpoints().services[name]
            return now.pid != old_pid and now.restarts == 1

        suite.wait_until(restarted, f"{name} to be restarted")
        after = suite.endpoints().services[name]
        assert after.grpc_addr == before.grpc_addr
        assert process_gone(before.pid)
        suite.wait_until(functools.partial(is_serving, after.grpc_addr), f"{name} healthy")
        assert f"{name} (pid {before.pid}) exited" in suite.log()

    # The suite still works end to end after every service was replaced.
    assert smtp_banner(suite)[0] == 220
    assert suite.cli("user", "add", "bob@example.test", "--password", "pw").returncode == 0
    assert token(suite, "bob@example.test", "pw").status_code == 200


def test_services_log_into_the_launchers_output_without_passing_through_it(
        suite: Suite) -> None:
    """A service's log lines reach the launcher's stderr while the launcher itself is
    stopped: the services write them there directly, prefixed as the launcher would."""
    assert suite.cli("user", "add", "logs@example.test", "--password", "pw").returncode == 0
    gateway_pid = suite.service_pid("gateway")
    os.kill(suite.pid, signal.SIGSTOP)
    try:
        host, port = suite.smtp_host_port
        with smtplib.SMTP(host, port, timeout=30) as client:
            client.sendmail("someone@example.org", ["logs@example.test"],
                            b"Subject: logged\r\n\r\nhello\r\n")
        queued = re.compile(rf"^gateway  \| \S+ \S+ gateway\[{gateway_pid}\] INFO "
                            r"gateway\.smtp: queued \S+ from=<someone@example\.org>",
                            re.MULTILINE)
        wait_for(lambda: bool(queued.search(suite.log())),
                 "the gateway's queued line with the launcher stopped", 30, suite.log)
    finally:
        os.kill(suite.pid, signal.SIGCONT)


def test_two_suites_run_side_by_side(shared_suite: Suite, launch_suite: LaunchSuite) -> None:
    first, second = shared_suite, launch_suite()
    ours, theirs = first.endpoints(), second.endpoints()
    assert ours.nats_url != theirs.nats_url
    assert {s.grpc_addr for s in ours.services.values()}.isdisjoint(
        s.grpc_addr for s in theirs.services.values())

    assert first.cli("user", "add", "carol@example.test", "--password", "pw").returncode == 0
    assert token(first, "carol@example.test", "pw").status_code == 200
    # Separate data dirs: the other suite has never heard of carol.
    assert token(second, "carol@example.test", "pw").status_code == 401
    assert smtp_banner(first)[0] == smtp_banner(second)[0] == 220


def test_a_second_up_on_the_same_data_dir_is_refused(shared_suite: Suite) -> None:
    other = shared_suite.cli("up", timeout=60)
    assert other.returncode == 1
    assert "another `mailgrid up` is running on" in other.stderr
    assert is_serving(shared_suite.grpc_addr("metadata"))


def test_sigterm_stops_everything_and_removes_endpoints(suite: Suite) -> None:
    endpoints = suite.endpoints()
    pids = [svc.pid for svc in endpoints.services.values()] + [endpoints.nats_pid]
    assert all(pids)

    assert suite.stop() == 0

    assert [pid for pid in pids if not process_gone(pid)] == []
    assert not endpoints_path(suite.data_dir).exists()
    log = suite.log()
    assert log.index("stopping gateway") < log.index("stopping delivery") \
        < log.index("stopping metadata")


def test_services_and_nats_die_with_a_killed_launcher(suite: Suite) -> None:
    endpoints = suite.endpoints()
    pids = [svc.pid for svc in endpoints.services.values()] + [endpoints.nats_pid]

    os.kill(suite.pid, signal.SIGKILL)
    suite.process.wait()
    suite.stopped = True

    wait_for(lambda: all(process_gone(pid) for pid in pids), "the children to die",
             details=suite.log)
    # The endpoints file it left behind is stale: `user add` sees that and opens the
    # store directly instead of waiting for a metadata_svc that will never answer.
    added = suite.cli("user", "add", "dave@example.test", "--password", "pw")
    assert added.returncode == 0, added.stderr
    assert f"in {suite.data_dir}" in added.stdout


def test_endpoints_json_is_plain_json_for_other_tools(shared_suite: Suite) -> None:
    data = json.loads(endpoints_path(shared_suite.data_dir).read_text())
    assert data["http_url"] == f"http://{shared_suite.http_addr}/v1"
    assert data["services"]["gateway"]["pid"] > 0


def test_queue_shows_every_stream_of_the_running_suite(shared_suite: Suite) -> None:
    shown = shared_suite.cli("queue")
    assert shown.returncode == 0, shown.stderr
    streams_table = shown.stdout.split("\n\n")[0]  # then the outbound jobs table
    header, *rows = streams_table.splitlines()
    assert header.split() == ["STREAM", "MESSAGES", "BYTES", "PENDING", "UNACKED",
                              "REDELIVERED"]
    assert {"INBOUND", "DEAD"} <= {row.split()[0] for row in rows}


def test_up_with_its_http_port_taken_fails_in_one_line_and_leaves_nothing(
        tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env = suite_env(tmp_path / "data",
                        {"MAILGRID_HTTP_ADDR": f"127.0.0.1:{taken.getsockname()[1]}"})
        result = subprocess.run([sys.executable, "-m", "mailgrid", "up"], env=env, cwd=ROOT,
                                capture_output=True, text=True, timeout=120, check=False)

    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert re.fullmatch(r"mailgrid: gateway exited with code \d+ while starting; "
                        r"see its output above", last), last
    assert "mailgrid is up" not in result.stdout
    started = [int(pid) for pid in re.findall(r"started \w+ \(pid (\d+)", result.stderr)]
    assert len(started) == len(services.SERVICES)  # every one, the gateway last
    assert all(process_gone(pid) for pid in started)
    assert not endpoints_path(tmp_path / "data").exists()
