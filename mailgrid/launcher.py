"""`mailgrid up`: the whole suite on one machine, supervised.

The launcher starts a nats-server (unless MAILGRID_NATS_URL names one), creates the
streams, then runs metadata_svc, delivery_svc and the gateway, each as its own process
(`python -m mailgrid serve NAME`), in that order and each healthy before the next. It
restarts a child that dies, stops everything in reverse order on SIGINT/SIGTERM, and
publishes where everything listens in DATA_DIR/run/endpoints.json while it runs.

Children's output goes to the launcher's stderr, each line prefixed with the service name:
their logging writes there directly (the descriptor is handed down), anything else they
print is copied from a pipe; the launcher's own banner (the endpoints) goes to stdout.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import json
import logging
import os
import secrets
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, TextIO

from pydantic_settings import NoDecode

from mailgrid import bus, services
from mailgrid.errors import MailgridError, Unavailable
from mailgrid.grpcutil import wait_healthy
from mailgrid.natsd import NatsServer, free_port
from mailgrid.service import LOG_FD_ENV, LOG_PREFIX_ENV, line_prefix
from mailgrid.settings import Settings, split_host_port

log = logging.getLogger(__name__)

# Start order; stop order is the reverse. Each name is also `mailgrid serve NAME`.
SERVICES = tuple(spec.name for spec in services.SERVICES)
HEALTH_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0
# Restart delays double from the first to the last; a child that ran for longer than
# BACKOFF_RESET seconds is restarted after the first delay again.
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 30.0
BACKOFF_RESET = 60.0
NATS_POLL = 0.5

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class LauncherError(MailgridError):
    """The suite could not be started (a one-line reason for the operator)."""


# Files in the data dir -----------------------------------------------------------------

def run_dir(data_dir: Path) -> Path:
    return data_dir / "run"


def endpoints_path(data_dir: Path) -> Path:
    return run_dir(data_dir) / "endpoints.json"


def token_secret_path(data_dir: Path) -> Path:
    """Where the shared token secret lives; the gateway run alone reads the same file."""
    return data_dir / "secrets" / "token_secret"


def load_or_create_token_secret(data_dir: Path) -> str:
    """The persistent secret that signs access tokens, created (mode 0600) on first use.

    Created with O_EXCL, so two processes racing to create it agree on one secret.
    """
    path = token_secret_path(data_dir)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_urlsafe(48) + "\n")
            out.flush()
            os.fsync(out.fileno())
    for _ in range(50):  # a racing creator may not have written it yet
        secret = path.read_text().strip()
        if secret:
            return secret
        time.sleep(0.02)
    raise LauncherError(f"{path} is empty: delete it and start again")


@dataclass
class ServiceEndpoint:
    grpc_addr: str
    pid: int = 0
    restarts: int = 0


@dataclass
class Endpoints:
    """What endpoints.json holds: where the running suite listens, and its pids."""

    launcher_pid: int
    data_dir: str
    http_addr: str
    smtp_addr: str
    submission_addr: str
    submission_served: bool
    nats_url: str
    nats_pid: int  # 0 when NATS is not ours (MAILGRID_NATS_URL was given)
    domains: list[str]
    services: dict[str, ServiceEndpoint] = field(default_factory=dict)

    @property
    def http_url(self) -> str:
        host, port = split_host_port(self.http_addr)
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port}/v1"

    def to_json(self) -> str:
        data = asdict(self)
        data["http_url"] = self.http_url
        return json.dumps(data, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Endpoints:
        data: dict[str, Any] = json.loads(text)
        data.pop("http_url", None)
        services = {name: ServiceEndpoint(**svc) for name, svc in data.pop("services").items()}
        return cls(**data, services=services)

    def write(self, path: Path) -> None:
        """Replaces the file atomically, so a reader never sees half of it."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(self.to_json())
        tmp.replace(path)


def read_endpoints(data_dir: Path) -> Endpoints | None:
    """The endpoints of the suite running on ``data_dir``, if its file is there."""
    try:
        return Endpoints.from_json(endpoints_path(data_dir).read_text())
    except FileNotFoundError:
        return None
    except (ValueError, TypeError, KeyError) as err:
        raise LauncherError(f"{endpoints_path(data_dir)} is unreadable: {err}") from err


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# Child processes -----------------------------------------------------------------------

def free_addr(addr: str, taken: set[int] | None = None) -> str:
    """``addr`` itself, or with port 0 replaced by a free port, chosen once so that a
    restarted child listens where the others already look for it.

    A free port is only free now: ``taken`` holds the ports other listeners are set to
    but have not bound yet (the gateway binds last), which it must not be; the chosen
    one is added to it.
    """
    host, port = split_host_port(addr)
    if port:
        return addr
    chosen = free_port(host)
    while taken is not None and chosen in taken:
        chosen = free_port(host)
    if taken is not None:
        taken.add(chosen)
    bracketed = f"[{host}]" if ":" in host else host
    return f"{bracketed}:{chosen}"


def child_env(settings: Settings) -> dict[str, str]:
    """The caller's environment plus every setting as MAILGRID_*, so children see exactly
    the launcher's settings (including the resolved ports and the shared secret)."""
    env = dict(os.environ)
    for name, info in Settings.model_fields.items():
        value = getattr(settings, name)
        if isinstance(value, list):
            value = ",".join(map(str, value)) if NoDecode in info.metadata else json.dumps(value)
        elif isinstance(value, dict):
            value = json.dumps(value)
        env[f"MAILGRID_{name.upper()}"] = str(value)
    # Child log lines reach the launcher as they are written.
    env["PYTHONUNBUFFERED"] = "1"
    return env


def die_with_parent(own_group: bool = False) -> Callable[[], None] | None:
    """A preexec_fn that makes the child receive SIGTERM when the launcher dies (even by
    SIGKILL), so no service outlives it. Linux only; elsewhere children are stopped by
    the launcher's own shutdown.

    ``own_group`` puts the child in a process group of its own, out of reach of the
    terminal's Ctrl-C: nats-server must outlive the services, which drain through it.
    """
    if not sys.platform.startswith("linux"):
        return os.setpgrp if own_group else None
    # Looked up before fork: the child runs only the prctl call itself.
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()
    sigterm = int(signal.SIGTERM)

    def preexec() -> None:
        if own_group:
            os.setpgrp()
        prctl(PR_SET_PDEATHSIG, sigterm, 0, 0, 0)
        if os.getppid() != parent:  # the launcher died before prctl took effect
            os._exit(1)

    return preexec


@dataclass
class Child:
    """One supervised service process."""

    name: str
    grpc_addr: str
    process: asyncio.subprocess.Process | None = None
    started_at: float = 0.0
    restarts: int = 0
    pump: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int:
        return self.process.pid if self.process else 0

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None


async def pump_output(name: str, stream: asyncio.StreamReader, sink: IO[str]) -> None:
    """Copies a child's output to ``sink``, each line prefixed with its name.

    Whatever has arrived is copied at once, in whole lines (one write for many lines
    under load, not one per line; a line of any length is fine); a last line without
    its newline is copied when the child closes its output.
    """
    prefix = line_prefix(name)
    pending = b""
    while chunk := await stream.read(PUMP_CHUNK):
        *lines, pending = (pending + chunk).split(b"\n")
        if lines:
            sink.write("".join(f"{prefix}{line.decode(errors='replace')}\n"
                               for line in lines))
            sink.flush()
    if pending:
        sink.write(f"{prefix}{pending.decode(errors='replace')}\n")
        sink.flush()


PUMP_CHUNK = 64 * 1024


# The launcher --------------------------------------------------------------------------

class Launcher:
    """Runs the suite until ``stop()`` (or SIGINT/SIGTERM, when run by ``run``)."""

    def __init__(self, settings: Settings, out: TextIO | None = None,
                 child_output: IO[str] | None = None) -> None:
        self.settings = settings.model_copy(update={"data_dir": settings.data_dir.resolve()})
        self.out = out or sys.stdout
        self.child_output = child_output or sys.stderr
        self.children = [Child(name, "") for name in SERVICES]
        self.nats: NatsServer | None = None
        self.endpoints: Endpoints | None = None
        self._stopping = asyncio.Event()
        self._lock_fd: int | None = None
        self._log_fd: int | None = None
        self._env: dict[str, str] = {}

    @property
    def data_dir(self) -> Path:
        return self.settings.data_dir

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> int:
        """Starts everything, supervises until asked to stop, stops everything; 0 on a
        clean stop. LauncherError (after cleaning up) when the suite cannot start."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        supervisors: list[asyncio.Task[None]] = []
        try:
            self._lock()
            starting = asyncio.create_task(self._start_all())
            stopping = asyncio.create_task(self._stopping.wait())
            await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if self._stopping.is_set():
                # Asked to stop while starting up (Ctrl-C also reaches the children, so
                # a child that exits now is no failure).
                starting.cancel()
                with contextlib.suppress(asyncio.CancelledError, MailgridError):
                    await starting
                return 0
            stopping.cancel()
            starting.result()  # raises what went wrong
            supervisors = [asyncio.create_task(self._supervise(child))
                           for child in self.children]
            if self.nats is not None:
                supervisors.append(asyncio.create_task(self._supervise_nats()))
            await self._announce()
            await self._stopping.wait()
            log.info("stopping")
            return 0
        finally:
            self._stopping.set()
            for task in supervisors:
                task.cancel()
            await asyncio.gather(*supervisors, return_exceptions=True)
            await self._stop_all()
            if self._log_fd is not None:
                os.close(self._log_fd)
                self._log_fd = None
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)

    # starting

    def _lock(self) -> None:
        """One launcher per data dir: a second would fight over SQLite and NATS files."""
        path = run_dir(self.data_dir) / "launcher.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LauncherError(
                f"another `mailgrid up` is running on {self.data_dir}") from None
        self._lock_fd = fd

    def _resolve_settings(self, nats_url: str, secret: str) -> None:
        s = self.settings
        addrs = {name: getattr(s, name)
                 for spec in services.SERVICES for name in spec.listeners}
        taken = {split_host_port(addr)[1] for addr in addrs.values()} - {0}
        listeners = {name: free_addr(addr, taken) for name, addr in addrs.items()}
        self.settings = s.model_copy(update={
            "nats_url": nats_url, "token_secret": secret, **listeners})
        for child in self.children:
            child.grpc_addr = self._grpc_addr(child.name)
        self._env = child_env(self.settings)

    def _grpc_addr(self, name: str) -> str:
        addr: str = getattr(self.settings, services.BY_NAME[name].grpc_setting)
        return addr

    async def _start_all(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        secret = self.settings.token_secret or await asyncio.to_thread(
            load_or_create_token_secret, self.data_dir)
        nats_url = self.settings.nats_url or await self._start_nats()
        await self._ensure_streams(nats_url)
        self._resolve_settings(nats_url, secret)
        for child in self.children:
            await self._spawn(child)
            await self._await_healthy(child, starting=True)
        await self._await_listening(self.settings.http_addr, "HTTP")
        await self._await_listening(self.settings.smtp_addr, "SMTP")

    async def _start_nats(self) -> str:
        self.nats = NatsServer(store_dir=self.settings.nats_dir,
                               preexec_fn=die_with_parent(own_group=True),
                               memory_limit=self.settings.nats_memory_limit)
        try:
            url = await self.nats.start()
        except MailgridError as err:
            raise LauncherError(str(err)) from err
        log.info("nats-server listening on %s (store %s)", url, self.settings.nats_dir)
        return url

    async def _ensure_streams(self, url: str) -> None:
        try:
            nc = await bus.connect(url, "mailgrid-launcher")
        except Unavailable as err:
            raise LauncherError(err.detail) from err
        try:
            await bus.ensure_streams(nc.jetstream(), self.settings.nats_replicas)
        finally:
            await nc.close()

    async def _spawn(self, child: Child) -> None:
        loop = asyncio.get_running_loop()
        # A restarted child's old pipe is drained before the new one starts.
        if child.pump is not None:
            await child.pump
        log_fd = self._child_log_fd()
        env = self._env if log_fd is None else {
            **self._env, LOG_FD_ENV: str(log_fd), LOG_PREFIX_ENV: line_prefix(child.name)}
        child.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "mailgrid", "serve", child.name,
            env=env,
            pass_fds=() if log_fd is None else (log_fd,),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            preexec_fn=die_with_parent(),
        )
        child.started_at = loop.time()
        assert child.process.stdout is not None
        child.pump = asyncio.create_task(
            pump_output(child.name, child.process.stdout, self.child_output))
        log.info("started %s (pid %d, gRPC %s)", child.name, child.pid, child.grpc_addr)

    def _child_log_fd(self) -> int | None:
        """The children's log output as a descriptor to hand down, or None when it is
        not a file (a test's StringIO). A duplicate: in a child, fds 1 and 2 are its
        pipe to the launcher."""
        if self._log_fd is None:
            try:
                fd = self.child_output.fileno()
            except (AttributeError, OSError, ValueError):
                return None
            self._log_fd = os.dup(fd)
        return self._log_fd

    async def _await_healthy(self, child: Child, starting: bool) -> bool:
        """True once the child answers SERVING; False if it exits first (during startup
        that is fatal: LauncherError). A child that hangs unhealthy is killed."""
        assert child.process is not None
        healthy = asyncio.create_task(_healthy(child.grpc_addr))
        exited = asyncio.create_task(child.process.wait())
        try:
            await asyncio.wait({healthy, exited}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            healthy.cancel()
            exited.cancel()
        if healthy.done() and not healthy.cancelled() and healthy.exception() is None:
            return True
        if child.running:  # health timed out: the process is stuck
            await self._terminate(child)
            reason = f"did not become healthy on {child.grpc_addr} in {HEALTH_TIMEOUT:.0f}s"
        else:
            reason = f"exited with code {child.process.returncode}"
        if starting:
            raise LauncherError(f"{child.name} {reason} while starting; see its output above")
        log.warning("%s %s", child.name, reason)
        return False

    async def _await_listening(self, addr: str, what: str) -> None:
        """The gateway's health may turn SERVING before its listeners accept; the banner
        is printed only once they do."""
        host, port = split_host_port(addr)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + HEALTH_TIMEOUT
        while not await _accepts(host, port):
            if loop.time() > deadline:
                raise LauncherError(f"the gateway's {what} listener is not up on {addr}")
            await asyncio.sleep(0.05)

    async def _announce(self) -> None:
        s = self.settings
        host, port = split_host_port(s.submission_addr)
        self.endpoints = Endpoints(
            launcher_pid=os.getpid(),
            data_dir=str(self.data_dir),
            http_addr=s.http_addr,
            smtp_addr=s.smtp_addr,
            submission_addr=s.submission_addr,
            submission_served=False,
            nats_url=s.nats_url,
            nats_pid=self.nats.process.pid if self.nats and self.nats.process else 0,
            domains=list(s.domains),
            services={c.name: ServiceEndpoint(c.grpc_addr, c.pid, c.restarts)
                      for c in self.children},
        )
        self.endpoints.submission_served = await _accepts(host, port)
        self.endpoints.write(endpoints_path(self.data_dir))
        self.out.write(banner(self.endpoints, embedded_nats=self.nats is not None))
        self.out.flush()

    def _update_endpoints(self) -> None:
        if self.endpoints is None or self._stopping.is_set():
            return
        for child in self.children:
            self.endpoints.services[child.name] = ServiceEndpoint(
                child.grpc_addr, child.pid, child.restarts)
        if self.nats is not None and self.nats.process is not None:
            self.endpoints.nats_pid = self.nats.process.pid
        self.endpoints.write(endpoints_path(self.data_dir))

    # supervising

    async def _supervise(self, child: Child) -> None:
        """Restarts ``child`` whenever it exits, with a growing delay while it keeps
        failing soon after starting."""
        loop = asyncio.get_running_loop()
        delay = BACKOFF_FIRST
        while True:
            assert child.process is not None
            code = await child.process.wait()
            if self._stopping.is_set():
                return
            if loop.time() - child.started_at > BACKOFF_RESET:
                delay = BACKOFF_FIRST
            log.warning("%s (pid %d) exited with code %d; restarting in %.1fs",
                        child.name, child.pid, code, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX)
            child.restarts += 1
            try:
                await self._spawn(child)
            except OSError as err:  # e.g. out of processes; try again after the delay
                log.error("cannot start %s: %s", child.name, err)
                continue
            if await self._await_healthy(child, starting=False):
                log.info("%s restarted (pid %d, restart %d)",
                         child.name, child.pid, child.restarts)
            self._update_endpoints()

    async def _supervise_nats(self) -> None:
        """Restarts our nats-server on the same port and store if it dies; the services
        reconnect by themselves (mailgrid.bus.connect retries forever)."""
        assert self.nats is not None
        delay = BACKOFF_FIRST
        while True:
            await asyncio.sleep(NATS_POLL)
            process = self.nats.process
            if process is None or process.poll() is None:
                continue
            log.warning("nats-server exited with code %s; restarting in %.1fs",
                        process.returncode, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX)
            try:
                await self.nats.start()
            except MailgridError as err:
                log.error("nats-server did not restart: %s", err)
                continue
            delay = BACKOFF_FIRST
            log.info("nats-server restarted on %s", self.nats.url)
            self._update_endpoints()

    # stopping

    async def _stop_all(self) -> None:
        for child in reversed(self.children):
            await self._terminate(child)
        for child in self.children:
            if child.pump is not None:
                await child.pump
        if self.nats is not None:
            await asyncio.to_thread(self.nats.stop)
        if self._lock_fd is not None:  # else the files belong to another launcher
            with contextlib.suppress(FileNotFoundError):
                endpoints_path(self.data_dir).unlink()
            os.close(self._lock_fd)
            self._lock_fd = None

    async def _terminate(self, child: Child) -> None:
        """SIGTERM (the service drains), then SIGKILL if it takes too long."""
        if not child.running:
            return
        assert child.process is not None
        log.info("stopping %s (pid %d)", child.name, child.pid)
        child.process.terminate()
        try:
            await asyncio.wait_for(child.process.wait(), STOP_TIMEOUT)
        except TimeoutError:
            log.warning("%s did not stop in %.0fs; killing it", child.name, STOP_TIMEOUT)
            child.process.kill()
            await child.process.wait()


def banner(ep: Endpoints, embedded_nats: bool) -> str:
    submission = ep.submission_addr + ("" if ep.submission_served else " (not yet served)")
    nats = ep.nats_url + (" (embedded)" if embedded_nats else "")
    grpc = ", ".join(f"{name} {svc.grpc_addr}" for name, svc in ep.services.items())
    return (
        "mailgrid is up\n"
        f"  HTTP API   {ep.http_url}\n"
        f"  SMTP (MX)  {ep.smtp_addr}\n"
        f"  Submission {submission}\n"
        f"  NATS       {nats}\n"
        f"  gRPC       {grpc}\n"
        f"  domains    {', '.join(ep.domains)}\n"
        f"  data dir   {ep.data_dir}\n"
        "Press Ctrl-C to stop.\n"
    )


async def _healthy(addr: str) -> None:
    """wait_healthy, after the port accepts: a gRPC channel that failed to connect backs
    off for a second, which would slow every start by that much."""
    host, port = split_host_port(addr)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + HEALTH_TIMEOUT
    while loop.time() < deadline:
        if await _accepts(host, port):
            break
        await asyncio.sleep(0.05)
    await wait_healthy(addr, timeout=max(deadline - loop.time(), 1.0))


async def _accepts(host: str, port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection(host, port)
    except OSError:
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True
