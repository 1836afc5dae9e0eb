"""Runs the whole suite (`mailgrid up`) in a subprocess on free ports, for benchmarks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from mailgrid.natsd import free_port


@dataclass
class Suite:
    data_dir: Path
    domains: str = "example.test"
    http_addr: str = field(default_factory=lambda: f"127.0.0.1:{free_port()}")
    smtp_addr: str = field(default_factory=lambda: f"127.0.0.1:{free_port()}")
    process: subprocess.Popen[bytes] | None = None
    # More MAILGRID_* settings for the suite (e.g. {"MAILGRID_INBOUND_AUTH_CHECKS": "false"}).
    extra_env: dict[str, str] = field(default_factory=dict)

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MAILGRID_")}
        env.update(
            MAILGRID_DATA_DIR=str(self.data_dir),
            MAILGRID_HTTP_ADDR=self.http_addr,
            MAILGRID_SMTP_ADDR=self.smtp_addr,
            MAILGRID_SUBMISSION_ADDR=f"127.0.0.1:{free_port()}",
            MAILGRID_DOMAINS=self.domains,
            # The default level (INFO, a few lines per message), as an operator runs
            # it: Postfix logs every message too, and that CPU counts for both.
        )
        env.update(self.extra_env)
        return env

    def mailgrid(self, *args: str, stdin: str | None = None) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "mailgrid", *args], env=self.env(), input=stdin,
            capture_output=True, text=True, check=True,
        )
        return done.stdout

    def start(self, timeout: float = 60.0) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = (self.data_dir / "suite.log").open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mailgrid", "up"], env=self.env(),
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mailgrid up exited; see {self.data_dir / 'suite.log'}")
            if self.endpoints_file.exists():
                try:
                    if httpx.get(f"http://{self.http_addr}/readyz", timeout=2).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
            time.sleep(0.2)
        raise RuntimeError("mailgrid up did not become ready")

    @property
    def endpoints_file(self) -> Path:
        return self.data_dir / "run" / "endpoints.json"

    def endpoints(self) -> dict[str, Any]:
        loaded: dict[str, Any] = json.loads(self.endpoints_file.read_text())
        return loaded

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def __enter__(self) -> Suite:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
