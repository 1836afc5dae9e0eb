"""The whole suite as a user runs it: `mailgrid up` in a subprocess.

``launch_suite()`` starts one suite on a fresh data dir with every listener on a free
loopback port, waits until it prints "mailgrid is up", and returns a ``Suite`` (its
addresses, data dir, process, output, and helpers to read endpoints.json and run the
CLI against it). At teardown each suite still running gets SIGTERM and must exit 0; if it
does not, or never came up, its whole process group is killed and its output shown.

Usage::

    def test_something(suite: Suite) -> None:          # a suite of its own
        ...
    def test_reader(shared_suite: Suite) -> None:      # one suite per module
    def test_two(launch_suite: LaunchSuite) -> None:   # several, or custom settings
        a = launch_suite()
        b = launch_suite(env={"MAILGRID_INBOUND_MAX_DELIVER": "2"})

The launcher's stdout (the banner) and stderr (its log and every service's output,
prefixed with the service name) go to files in the suite's directory; ``suite.log()``
returns the latter, and it is printed when a suite fails.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mailgrid.launcher import Endpoints, endpoints_path, read_endpoints
from mailgrid.natsd import free_port

SERVING = int(health_pb2.HealthCheckResponse.SERVING)

ROOT = Path(__file__).resolve().parents[2]
READY_LINE = "mailgrid is up"
START_TIMEOUT = 120.0
STOP_TIMEOUT = 40.0


@dataclass
class Suite:
    """One running `mailgrid up`."""

    base_dir: Path
    env: dict[str, str]
    process: subprocess.Popen[bytes]
    stdout_path: Path
    stderr_path: Path
    stopped: bool = field(default=False)

    # where it listens (fixed before start: every listener gets a free port)

    @property
    def data_dir(self) -> Path:
        return Path(self.env["MAILGRID_DATA_DIR"])

    @property
    def http_addr(self) -> str:
        return self.env["MAILGRID_HTTP_ADDR"]

    @property
    def http_url(self) -> str:
        """Base URL without the /v1 prefix: f"{suite.http_url}/v1/folders"."""
        return f"http://{self.http_addr}"

    @property
    def smtp_addr(self) -> str:
        return self.env["MAILGRID_SMTP_ADDR"]

    @property
    def smtp_host_port(self) -> tuple[str, int]:
        host, _, port = self.smtp_addr.rpartition(":")
        return host, int(port)

    @property
    def submission_addr(self) -> str:
        return self.env["MAILGRID_SUBMISSION_ADDR"]

    @property
    def pid(self) -> int:
        return self.process.pid

    def endpoints(self) -> Endpoints:
        """endpoints.json as the launcher last wrote it (child pids, gRPC addresses)."""
        found = read_endpoints(self.data_dir)
        assert found is not None, f"no {endpoints_path(self.data_dir)}"
        return found

    def grpc_addr(self, service: str) -> str:
        return self.endpoints().services[service].grpc_addr

    def service_pid(self, service: str) -> int:
        return self.endpoints().services[service].pid

    # output

    def output(self) -> str:
        """What the launcher printed on stdout (the banner)."""
        return self.stdout_path.read_text(errors="replace")

    def log(self) -> str:
        """The launcher's stderr: its own log and every service's output."""
        return self.stderr_path.read_text(errors="replace")

    # acting on it

    def cli(self, *args: str, input: str | None = None,
            timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Runs `mailgrid ARGS` with this suite's settings (as a user in its shell would)."""
        return subprocess.run(
            [sys.executable, "-m", "mailgrid", *args], env=self.env, cwd=ROOT,
            input=input if input is not None else "", capture_output=True, text=True,
            timeout=timeout, check=False,
        )

    def wait_until(self, predicate: Callable[[], bool], what: str,
                   timeout: float = 60.0) -> None:
        """Polls ``predicate`` until it is true; fails (with the log) after ``timeout``."""
        def still_running() -> bool:
            if self.process.poll() is not None:
                pytest.fail(f"mailgrid up exited with {self.process.returncode} while "
                            f"waiting for {what}\n{self.log()[-6000:]}")
            return predicate()

        wait_for(still_running, what, timeout, details=self.log)

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM, as Ctrl-C/systemd would; returns the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout)
        finally:
            self.stopped = True
        return code

    def kill_group(self) -> None:
        """Last resort: SIGKILL the launcher's process group (it and every child)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        self.stopped = True


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 60.0,
             details: Callable[[], str] = str) -> None:
    """Polls ``predicate`` until it is true; fails after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}\n{details()[-6000:]}")
        time.sleep(0.1)


def grpc_health(addr: str, timeout: float = 5.0) -> int:
    """The grpc.health.v1 status of ``addr`` (health_pb2.HealthCheckResponse.SERVING...)."""
    with grpc.insecure_channel(addr) as chan:
        reply = health_pb2_grpc.HealthStub(chan).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=timeout,
            wait_for_ready=True)
    return int(reply.status)


def is_serving(addr: str) -> bool:
    try:
        return grpc_health(addr, timeout=2.0) == SERVING
    except grpc.RpcError:
        return False


def process_gone(pid: int) -> bool:
    """True if ``pid`` no longer runs (a zombie counts as gone: it runs no code)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    state = next((line for line in status.splitlines() if line.startswith("State:")), "")
    return " Z " in f"{state} " or "zombie" in state


def suite_env(data_dir: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The caller's environment without its MAILGRID_* (tests are hermetic), a data dir,
    free ports for every public listener, and the test domains."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILGRID_")}
    env.update({
        "MAILGRID_DATA_DIR": str(data_dir),
        "MAILGRID_HTTP_ADDR": f"127.0.0.1:{free_port()}",
        "MAILGRID_SMTP_ADDR": f"127.0.0.1:{free_port()}",
        "MAILGRID_SUBMISSION_ADDR": f"127.0.0.1:{free_port()}",
        "MAILGRID_DOMAINS": "example.test,example.org",
        "MAILGRID_HOSTNAME": "mx.example.test",
        "MAILGRID_LOG_LEVEL": "INFO",
        # No DNS lookups of real domains from tests: the inbound-check tests turn the
        # checks on with their own DNS server.
        "MAILGRID_INBOUND_AUTH_CHECKS": "false",
    })
    env.update(extra or {})
    return env


@contextlib.contextmanager
def running_suite(base_dir: Path, env: Mapping[str, str] | None = None) -> Iterator[Suite]:
    """`mailgrid up` on ``base_dir``/data, up and announced, stopped cleanly afterwards.

    Usable from a fixture of any scope (give it a tmp_path_factory directory).
    """
    base_dir.mkdir(parents=True, exist_ok=True)
    suite_environ = suite_env(base_dir / "data", env)
    stdout_path, stderr_path = base_dir / "stdout.log", base_dir / "stderr.log"
    with stdout_path.open("wb") as out, stderr_path.open("wb") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "mailgrid", "up"], env=suite_environ, cwd=ROOT,
            stdin=subprocess.DEVNULL, stdout=out, stderr=err,
            # Its own process group, so a failed test can kill it and all its children.
            start_new_session=True,
        )
    suite = Suite(base_dir, suite_environ, process, stdout_path, stderr_path)
    try:
        suite.wait_until(lambda: READY_LINE in suite.output(), "the ready line",
                         timeout=START_TIMEOUT)
        yield suite
        if not suite.stopped:
            code = suite.stop()
            assert code == 0, f"mailgrid up exited with {code}\n{suite.log()[-6000:]}"
    except BaseException:
        if not suite.stopped or process.poll() is None:
            suite.kill_group()
        sys.stderr.write(f"--- mailgrid up stderr ({stderr_path}) ---\n{suite.log()[-6000:]}")
        raise
    finally:
        if process.poll() is None:
            suite.kill_group()


LaunchSuite = Callable[..., Suite]


@pytest.fixture
def launch_suite(tmp_path: Path) -> Iterator[LaunchSuite]:
    """A factory: ``launch_suite(env={...})`` starts one more suite (own data dir, own
    ports); every suite started is stopped (SIGTERM, exit 0 asserted) after the test."""
    with contextlib.ExitStack() as stack:
        count = 0

        def launch(env: Mapping[str, str] | None = None) -> Suite:
            nonlocal count
            count += 1
            return stack.enter_context(running_suite(tmp_path / f"suite{count}", env))

        yield launch


@pytest.fixture
def suite(launch_suite: LaunchSuite) -> Suite:
    """One running suite with default test settings, for this test alone (kill its
    children, stop it: nothing leaks into another test)."""
    return launch_suite()


@pytest.fixture(scope="module")
def shared_suite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Suite]:
    """One suite for every test of a module that leaves it running and healthy (use
    distinct addresses per test); saves a start per test."""
    with running_suite(tmp_path_factory.mktemp("shared-suite")) as running:
        yield running
