"""Every message of ../shared/corpus goes in over SMTP and comes back byte-identical."""

from __future__ import annotations

import hashlib
import smtplib
from collections import Counter

import httpx
import pytest

from mailgrid.mime import split_mbox
from tests.conftest import CORPUS
from tests.e2e.conftest import Suite
from tests.e2e.mail import add_user, all_messages, folder, smtp_wire_form, strip_received, token

pytestmark = pytest.mark.e2e


def corpus_messages() -> list[tuple[str, bytes]]:
    """(name, bytes) of every single message and of every message inside the mbox files."""
    found: list[tuple[str, bytes]] = []
    for path in sorted(CORPUS.rglob("*")):
        if not path.is_file() or path.name in ("README.md", "MANIFEST.tsv"):
            continue
        name = str(path.relative_to(CORPUS))
        data = path.read_bytes()
        if "/mbox/" in f"/{name}" or name.endswith(".mbox"):
            found.extend((f"{name}#{n}", msg) for n, msg in enumerate(split_mbox(data)))
        else:
            found.append((name, data))
    return found


def test_corpus_round_trips_byte_identical_over_smtp_and_http(suite: Suite) -> None:
    messages = corpus_messages()
    assert len(messages) > 200  # 200 files, and the mbox files hold several messages each
    add_user(suite, "corpus@example.test")
    expected = Counter(hashlib.sha256(smtp_wire_form(data)).hexdigest() for _, data in messages)

    host, port = suite.smtp_host_port
    with smtplib.SMTP(host, port, timeout=60) as client:
        for name, data in messages:
            client.ehlo("peer.remote.test")
            client.mail("peer@remote.test")
            client.rcpt("corpus@example.test")
            code, reply = client.data(smtp_wire_form(data))
            assert code == 250, f"{name}: {code} {reply!r}"
            assert reply.startswith(b"2.0.0 "), reply

    with httpx.Client(base_url=suite.http_url, timeout=30) as http:
        auth = token(http, "corpus@example.test")
        suite.wait_until(lambda: folder(http, auth, "inbox")["total"] >= len(messages),
                         "every corpus message in the inbox", timeout=180)
        listed = all_messages(http, auth)
        assert len(listed) == len(messages)
        returned: Counter[str] = Counter()
        for summary in listed:
            raw = http.get(f"/v1/messages/{summary['id']}/raw", headers=auth)
            assert raw.status_code == 200
            assert raw.headers["content-type"].startswith("message/rfc822")
            returned[hashlib.sha256(strip_received(raw.content)).hexdigest()] += 1
            detail = http.get(f"/v1/messages/{summary['id']}", headers=auth)
            assert detail.status_code == 200, detail.text
            assert detail.json()["id"] == summary["id"]
    assert returned == expected

