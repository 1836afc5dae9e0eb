"""Crash safety: kill -9 of delivery_svc and metadata_svc while mail flows loses nothing
and duplicates nothing: every message that got a 250 is in its mailbox exactly once."""

from __future__ import annotations

import os
import signal
import smtplib
import threading
import time
from collections import Counter
from email import policy
from email.message import EmailMessage

import httpx
import pytest

from tests.e2e.conftest import Suite, process_gone
from tests.e2e.mail import add_user, all_messages, folder, token

pytestmark = pytest.mark.e2e

TOTAL = 150


class Sender(threading.Thread):
    """Sends TOTAL messages one by one, retrying a 4xx like a real MTA's queue would."""

    def __init__(self, suite: Suite, rcpt: str) -> None:
        super().__init__(daemon=True)
        self.suite, self.rcpt = suite, rcpt
        self.accepted: list[str] = []
        self.deferrals = 0
        self.failure: BaseException | None = None

    def run(self) -> None:
        try:
            for n in range(TOTAL):
                self.send_until_accepted(f"crash test {n:03d}")
        except BaseException as err:  # reported by the test
            self.failure = err

    def send_until_accepted(self, subject: str) -> None:
        msg = EmailMessage()
        msg["From"], msg["To"], msg["Subject"] = "peer@remote.test", self.rcpt, subject
        msg.set_content(f"{subject}\n")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            host, port = self.suite.smtp_host_port
            try:
                with smtplib.SMTP(host, port, timeout=30) as client:
                    client.sendmail("peer@remote.test", [self.rcpt],
                                    msg.as_bytes(policy=policy.SMTP))
            except smtplib.SMTPResponseException as err:
                assert 400 <= err.smtp_code < 500, f"{subject}: {err}"
                self.deferrals += 1
                time.sleep(0.2)
                continue
            except smtplib.SMTPRecipientsRefused as err:
                codes = [code for code, _ in err.recipients.values()]
                assert all(400 <= code < 500 for code in codes), f"{subject}: {err}"
                self.deferrals += 1
                time.sleep(0.2)
                continue
            self.accepted.append(subject)
            return
        raise AssertionError(f"{subject} was never accepted")


def wait_accepted(suite: Suite, sender: Sender, count: int) -> None:
    def reached() -> bool:
        assert sender.failure is None, sender.failure
        return len(sender.accepted) >= count

    suite.wait_until(reached, f"{count} messages accepted")


def kill_and_wait_for_restart(suite: Suite, service: str) -> None:
    pid = suite.service_pid(service)
    os.kill(pid, signal.SIGKILL)
    suite.wait_until(lambda: process_gone(pid), f"{service} ({pid}) to die")
    suite.wait_until(lambda: suite.service_pid(service) != pid, f"{service} restarted",
                     timeout=60)


def test_kill_9_of_workers_and_store_loses_and_duplicates_nothing(suite: Suite) -> None:
    rcpt = "crash@example.test"
    add_user(suite, rcpt)
    sender = Sender(suite, rcpt)
    sender.start()
    wait_accepted(suite, sender, 30)
    kill_and_wait_for_restart(suite, "delivery")
    wait_accepted(suite, sender, 70)
    kill_and_wait_for_restart(suite, "metadata")
    wait_accepted(suite, sender, 100)
    kill_and_wait_for_restart(suite, "delivery")
    kill_and_wait_for_restart(suite, "metadata")
    sender.join(300)
    assert sender.failure is None, sender.failure
    assert len(sender.accepted) == TOTAL

    with httpx.Client(base_url=suite.http_url, timeout=30) as http:
        auth = None

        def delivered() -> bool:
            nonlocal auth
            try:
                auth = auth or token(http, rcpt)
                return folder(http, auth, "inbox")["total"] >= TOTAL
            except (AssertionError, httpx.HTTPError):
                return False

        suite.wait_until(delivered, "every accepted message in the inbox", timeout=180)
        assert auth is not None
        subjects = Counter(m["subject"] for m in all_messages(http, auth))
    assert subjects == Counter(sender.accepted), "each accepted message exactly once"
