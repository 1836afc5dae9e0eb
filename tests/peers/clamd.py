"""A real ClamAV daemon for tests, on a signature database the test writes itself.

The official databases cannot be downloaded here, so ``Clamd.start()`` writes one MD5
hash signature (.hdb, "md5:size:name") of the EICAR test file and starts
``clamd`` (Debian package clamav-daemon, installed by ``make test`` when missing) in the
foreground on a unix socket. ClamAV unpacks MIME, so the signature matches EICAR sent as
an attachment; clamd reports it as ``Mailgrid.Test.EICAR.UNOFFICIAL``.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

CLAMD = shutil.which("clamd") or "/usr/sbin/clamd"
EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
SIGNATURE = "Mailgrid.Test.EICAR"
START_TIMEOUT = 60.0


@dataclass
class Clamd:
    process: subprocess.Popen[bytes]
    socket: Path
    workdir: Path

    @classmethod
    def start(cls) -> Clamd:
        if not Path(CLAMD).exists():
            pytest.skip("clamd is not installed (apt-get install clamav-daemon)")
        # A unix socket path must stay under 108 bytes: pytest's tmp_path may not.
        workdir = Path(tempfile.mkdtemp(prefix="mg-clamd-", dir="/tmp"))
        (workdir / "db").mkdir()
        (workdir / "db" / "mailgrid-test.hdb").write_text(
            f"{hashlib.md5(EICAR).hexdigest()}:{len(EICAR)}:{SIGNATURE}\n")
        socket = workdir / "clamd.sock"
        (workdir / "clamd.conf").write_text(
            f"Foreground yes\nLocalSocket {socket}\nDatabaseDirectory {workdir / 'db'}\n"
            f"LogFile {workdir / 'clamd.log'}\n")
        with (workdir / "stderr.log").open("wb") as err:
            process = subprocess.Popen([CLAMD, "-c", str(workdir / "clamd.conf")],
                                       stdout=err, stderr=err)
        deadline = time.monotonic() + START_TIMEOUT
        while not socket.exists():
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                log = (workdir / "stderr.log").read_text(errors="replace")
                pytest.skip(f"clamd could not start here: {log[-500:]}")
            time.sleep(0.05)
        return cls(process, socket, workdir)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)


@pytest.fixture
def clamd() -> Iterator[Clamd]:
    daemon = Clamd.start()
    yield daemon
    daemon.stop()
