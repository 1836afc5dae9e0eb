"""A private Postfix instance on loopback, the reference peer of ``python -m bench postfix``.

Postfix comes from Debian's packages (installed when missing, never configured as the
system's MTA: debconf "No configuration", services not started). The instance here has its
own config_directory, queue_directory and data_directory under a temp dir; the system's
/etc/postfix is never read or written. It accepts for one domain and delivers with
virtual(8) into a Maildir, which is what the benchmark counts.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from mailgrid.launcher import pid_alive

POSTFIX = Path("/usr/sbin/postfix")
SMTP_SOURCE = Path("/usr/sbin/smtp-source")
POSTCONF = Path("/usr/sbin/postconf")
POLICY_RC = Path("/usr/sbin/policy-rc.d")
# invoke-rc.d asks policy-rc.d before starting a service; 101 means "action forbidden".
POLICY_RC_DENY = "#!/bin/sh\n# bench/postfix.py: no service starts during this install\nexit 101\n"


def install_postfix() -> None:
    """Installs Debian's postfix (with smtp-source) unless present; the system instance is
    left unconfigured and not running."""
    if POSTFIX.exists() and SMTP_SOURCE.exists():
        return
    if os.geteuid() != 0:
        raise RuntimeError("Postfix is not installed and installing it needs root "
                           "(apt-get install postfix)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["debconf-set-selections"], input=(
        "postfix postfix/main_mailer_type select No configuration\n"), text=True,
        check=True, env=env)
    own_policy = not POLICY_RC.exists()
    if own_policy:
        POLICY_RC.write_text(POLICY_RC_DENY)
        POLICY_RC.chmod(0o755)
    try:
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends",
                        "postfix"], check=True, env=env)
    finally:
        if own_policy:
            POLICY_RC.unlink(missing_ok=True)
    # Belt and braces: whatever the policy, no system Postfix stays up on port 25.
    subprocess.run([str(POSTFIX), "stop"], capture_output=True, check=False)
    if not SMTP_SOURCE.exists():
        raise RuntimeError(f"{SMTP_SOURCE} is missing after installing postfix")


def postfix_version() -> str:
    done = subprocess.run([str(POSTCONF), "-d", "-h", "mail_version"], capture_output=True,
                          text=True, check=False)
    return done.stdout.strip() or "unknown"


def main_cf(*, config_dir: Path, queue_dir: Path, data_dir: Path, maildir_base: Path,
            domain: str, mailbox_map: Path, uid: int, gid: int,
            mail_owner: str, myhostname: str = "postfix.bench.test") -> str:
    """main.cf of the private instance: loopback only, virtual(8) Maildir delivery for
    ``domain``; everything else Postfix's defaults (fsync included)."""
    settings: dict[str, str] = {
        "compatibility_level": "3.6",
        "config_directory": str(config_dir),
        "queue_directory": str(queue_dir),
        "data_directory": str(data_dir),
        "mail_owner": mail_owner,
        "myhostname": myhostname,
        "mydomain": "bench.test",
        "myorigin": myhostname,
        "mydestination": "",
        "inet_interfaces": "loopback-only",
        "inet_protocols": "ipv4",
        "mynetworks": "127.0.0.0/8",
        # Mail for virtual_mailbox_domains only; nothing is relayed.
        "relay_domains": "",
        "local_recipient_maps": "",
        "local_transport": "error:5.1.1 no local delivery in this instance",
        "virtual_mailbox_domains": domain,
        "virtual_mailbox_base": str(maildir_base),
        "virtual_mailbox_maps": f"texthash:{mailbox_map}",
        "virtual_uid_maps": f"static:{uid}",
        "virtual_gid_maps": f"static:{gid}",
        "virtual_minimum_uid": str(min(uid, 100)),
        "virtual_mailbox_limit": "0",
        "message_size_limit": str(25 * 1024 * 1024),
        # Client limits stay Postfix's defaults: 20 sessions from 127.0.0.1 are within
        # smtpd_client_connection_count_limit (50), and mynetworks is exempt from anvil
        # (smtpd_client_event_limit_exceptions). The client's reverse DNS lookup stays on,
        # as in mailgrid's SMTP edge (both resolve 127.0.0.1 through /etc/hosts).
        "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
        "smtpd_recipient_restrictions": "",
        "alias_maps": "",
        "alias_database": "",
        "biff": "no",
        # No syslog here: postlogd writes the log into the instance's own directory.
        "maillog_file": str(data_dir / "maillog"),
        "maillog_file_prefixes": str(data_dir),
        "smtpd_banner": "$myhostname ESMTP",
    }
    return "".join(f"{key} = {value}\n" for key, value in settings.items())


def master_cf(port: int) -> str:
    """master.cf: Debian's stock services, with smtpd on 127.0.0.1:``port``.

    Postfix's defaults (default_process_limit 100) apply; maillog via postlogd because
    there is no syslog here.
    """
    rows = [
        (f"127.0.0.1:{port}", "inet", "n", "-", "n", "-", "-", "smtpd"),
        ("pickup", "unix", "n", "-", "n", "60", "1", "pickup"),
        ("cleanup", "unix", "n", "-", "n", "-", "0", "cleanup"),
        ("qmgr", "unix", "n", "-", "n", "300", "1", "qmgr"),
        ("tlsmgr", "unix", "-", "-", "n", "1000?", "1", "tlsmgr"),
        ("rewrite", "unix", "-", "-", "n", "-", "-", "trivial-rewrite"),
        ("bounce", "unix", "-", "-", "n", "-", "0", "bounce"),
        ("defer", "unix", "-", "-", "n", "-", "0", "bounce"),
        ("trace", "unix", "-", "-", "n", "-", "0", "bounce"),
        ("verify", "unix", "-", "-", "n", "-", "1", "verify"),
        ("flush", "unix", "n", "-", "n", "1000?", "0", "flush"),
        ("proxymap", "unix", "-", "-", "n", "-", "-", "proxymap"),
        ("proxywrite", "unix", "-", "-", "n", "-", "1", "proxymap"),
        ("smtp", "unix", "-", "-", "n", "-", "-", "smtp"),
        ("relay", "unix", "-", "-", "n", "-", "-", "smtp"),
        ("showq", "unix", "n", "-", "n", "-", "-", "showq"),
        ("error", "unix", "-", "-", "n", "-", "-", "error"),
        ("retry", "unix", "-", "-", "n", "-", "-", "error"),
        ("discard", "unix", "-", "-", "n", "-", "-", "discard"),
        ("local", "unix", "-", "n", "n", "-", "-", "local"),
        ("virtual", "unix", "-", "n", "n", "-", "-", "virtual"),
        ("lmtp", "unix", "-", "-", "n", "-", "-", "lmtp"),
        ("anvil", "unix", "-", "-", "n", "-", "1", "anvil"),
        ("scache", "unix", "-", "-", "n", "-", "1", "scache"),
        ("postlog", "unix-dgram", "n", "-", "n", "-", "1", "postlogd"),
    ]
    return "".join(" ".join(row) + "\n" for row in rows)


@dataclass
class PostfixInstance:
    """One private Postfix under ``root``; ``start()`` / ``stop()``, or a ``with`` block."""

    root: Path
    port: int
    domain: str
    user: str
    uid: int = 0
    gid: int = 0

    @property
    def config_dir(self) -> Path:
        return self.root / "etc"

    @property
    def queue_dir(self) -> Path:
        return self.root / "spool"

    @property
    def data_dir(self) -> Path:
        return self.root / "lib"

    @property
    def maildir_base(self) -> Path:
        return self.root / "vmail"

    @property
    def maildir_new(self) -> Path:
        return self.maildir_base / self.domain / self.user / "new"

    @property
    def address(self) -> str:
        return f"{self.user}@{self.domain}"

    def env(self) -> Mapping[str, str]:
        return {**os.environ, "MAIL_CONFIG": str(self.config_dir)}

    def configure(self) -> None:
        owner = pwd.getpwnam("postfix")
        vmail_uid, vmail_gid = self._vmail_ids()
        for path in (self.config_dir, self.queue_dir, self.data_dir, self.maildir_base):
            path.mkdir(parents=True, exist_ok=True)
        # Postfix refuses a data_directory it does not own; virtual(8) writes as vmail.
        os.chown(self.data_dir, owner.pw_uid, owner.pw_gid)
        os.chown(self.maildir_base, vmail_uid, vmail_gid)
        self.root.chmod(0o755)
        mailbox_map = self.config_dir / "vmailbox"
        mailbox_map.write_text(f"{self.address} {self.domain}/{self.user}/\n")
        (self.config_dir / "main.cf").write_text(main_cf(
            config_dir=self.config_dir, queue_dir=self.queue_dir, data_dir=self.data_dir,
            maildir_base=self.maildir_base, domain=self.domain,
            mailbox_map=mailbox_map, uid=vmail_uid, gid=vmail_gid, mail_owner="postfix"))
        (self.config_dir / "master.cf").write_text(master_cf(self.port))
        self.uid, self.gid = vmail_uid, vmail_gid

    def _vmail_ids(self) -> tuple[int, int]:
        # virtual(8) refuses to deliver as root; "nobody" is an unprivileged owner that
        # exists on every Debian system.
        nobody = pwd.getpwnam("nobody")
        return nobody.pw_uid, nobody.pw_gid

    def postfix(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(POSTFIX), "-c", str(self.config_dir), *args],
                              env=dict(self.env()), capture_output=True, text=True,
                              check=False)

    def start(self, timeout: float = 30.0) -> None:
        self.configure()
        # set-permissions creates the queue's subdirectories with the right owners.
        for args in (("check",), ("start",)):
            done = self.postfix(*args)
            if done.returncode != 0:
                raise RuntimeError(f"postfix {' '.join(args)} failed: "
                                   f"{(done.stdout + done.stderr).strip()} {self.log_tail()}")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.master_pid() is not None and _listening(self.port):
                return
            time.sleep(0.1)
        raise RuntimeError(f"private postfix did not start: {self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = (self.data_dir / "maillog").read_text(errors="replace")
        except OSError:
            return "(no maillog)"
        return "\n".join(text.splitlines()[-lines:])

    def master_pid(self) -> int | None:
        try:
            return int((self.queue_dir / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def stop(self) -> None:
        pid = self.master_pid()
        if pid is None:
            return
        self.postfix("stop")
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and pid_alive(pid):
            time.sleep(0.1)
        if pid_alive(pid):
            # `postfix abort` is the documented hard stop; then make sure.
            self.postfix("abort")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)

    def delivered(self) -> int:
        try:
            return sum(1 for _ in os.scandir(self.maildir_new))
        except FileNotFoundError:
            return 0

    def cleanup(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PostfixInstance:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0
