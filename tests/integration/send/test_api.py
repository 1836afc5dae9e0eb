"""POST /v1/messages and the drafts, through the gateway, delivery_svc's SubmitMessage
and the inbound workers, into real mailboxes; remote recipients into OUTBOUND."""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import pytest
from nats.js import JetStreamContext

from delivery_svc.app import DeliveryApp
from mailgrid.clients import DeliveryClient, MetadataClient
from mailgrid.errors import PermissionDenied
from mailgrid.v1 import delivery_pb2
from tests.integration.send.kit import (
    MAX_SIZE,
    Account,
    assert_problem,
    detail,
    messages,
    outbound_jobs,
    raw,
    settle,
    wait_messages,
)

MESSAGE_ID = re.compile(r"^[^<>@\s]+@example\.test$")


async def send(http: httpx.AsyncClient, user: Account, **body: Any) -> httpx.Response:
    return await http.post("/v1/messages", json=body, headers=user.headers)


# ---- local delivery ------------------------------------------------------------------

async def test_a_send_to_a_local_user_lands_once_in_their_inbox_and_once_in_sent(
        http: httpx.AsyncClient, alice: Account, bob: Account, delivery: DeliveryApp,
        js: JetStreamContext) -> None:
    reply = await send(http, alice, to=["Bob <bob@example.test>"], subject="Lunch?",
                       text="Noon at the usual place.\nAlice")
    assert reply.status_code == 202, reply.text
    accepted = reply.json()
    assert MESSAGE_ID.match(accepted["message_id"])

    [sent] = await wait_messages(http, alice, "sent", 1)
    assert sent["id"] == accepted["id"] and sent["is_read"]
    [got] = await wait_messages(http, bob, "inbox", 1)
    assert got["subject"] == "Lunch?" and not got["is_read"]
    assert got["from"] == {"name": "", "email": "alice@example.test"}
    message = await detail(http, bob, got["id"])
    assert message["message_id"] == accepted["message_id"]
    assert message["to"] == [{"name": "Bob", "email": "bob@example.test"}]
    assert message["text"].replace("\r\n", "\n") == "Noon at the usual place.\nAlice\n"
    assert message["date"] is not None
    await settle(delivery, js)
    assert len(await messages(http, bob, "inbox")) == 1
    assert await outbound_jobs(js) == []


async def test_bcc_recipients_get_it_and_no_recipient_copy_reveals_them(
        http: httpx.AsyncClient, alice: Account, bob: Account, carol: Account) -> None:
    reply = await send(http, alice, to=["bob@example.test"], bcc=["carol@example.org"],
                       subject="Surprise party", text="Don't tell.")
    assert reply.status_code == 202, reply.text
    [to_bob] = await wait_messages(http, bob, "inbox", 1)
    [to_carol] = await wait_messages(http, carol, "inbox", 1)
    for user, email in ((bob, to_bob), (carol, to_carol)):
        data = await raw(http, user, email["id"])
        assert b"\r\nBcc:" not in data and not data.startswith(b"Bcc:")
        assert b"carol@example.org" not in data
        assert (await detail(http, user, email["id"]))["bcc"] == []
    [sent] = await wait_messages(http, alice, "sent", 1)
    assert b"\r\nBcc: carol@example.org\r\n" in await raw(http, alice, sent["id"])
    assert (await detail(http, alice, sent["id"]))["bcc"] == [
        {"name": "", "email": "carol@example.org"}]


async def test_a_reply_by_email_id_carries_in_reply_to_and_joins_the_thread(
        http: httpx.AsyncClient, alice: Account, bob: Account) -> None:
    first = await send(http, alice, to=["bob@example.test"], subject="Plan", text="v1")
    assert first.status_code == 202, first.text
    [original] = await wait_messages(http, bob, "inbox", 1)

    reply = await send(http, bob, to=["alice@example.test"], subject="Re: Plan",
                       text="Looks good", in_reply_to=original["id"])
    assert reply.status_code == 202, reply.text

    [answer] = await wait_messages(http, alice, "inbox", 1)
    [alice_sent] = await wait_messages(http, alice, "sent", 1)
    assert answer["thread_id"] == alice_sent["thread_id"]
    [bob_sent] = await wait_messages(http, bob, "sent", 1)
    assert bob_sent["thread_id"] == original["thread_id"]
    answer_detail = await detail(http, alice, answer["id"])
    assert answer_detail["in_reply_to"] == first.json()["message_id"]
    assert answer_detail["references"] == [first.json()["message_id"]]


async def test_a_reply_by_message_id_joins_the_thread(
        http: httpx.AsyncClient, alice: Account, bob: Account) -> None:
    first = await send(http, alice, to=["bob@example.test"], subject="Plan", text="v1")
    message_id = first.json()["message_id"]
    [original] = await wait_messages(http, bob, "inbox", 1)
    reply = await send(http, bob, to=["alice@example.test"], subject="Re: Plan", text="ok",
                       in_reply_to=f"<{message_id}>")
    assert reply.status_code == 202, reply.text
    [bob_sent] = await wait_messages(http, bob, "sent", 1)
    assert bob_sent["thread_id"] == original["thread_id"]


async def test_attachments_sent_as_multipart_arrive_byte_exact(
        http: httpx.AsyncClient, alice: Account, bob: Account) -> None:
    pdf = b"%PDF-1.4\x00\xff\r\n binary \x00" * 100
    reply = await http.post(
        "/v1/messages", headers=alice.headers,
        data={"message": json.dumps({"to": ["bob@example.test"], "subject": "Report",
                                     "text": "Attached.", "html": "<p>Attached.</p>"})},
        files=[("attachments", ("Übersicht 2024.pdf", pdf, "application/pdf")),
               ("attachments", ("notes.txt", b"plain notes\n", "text/plain"))])
    assert reply.status_code == 202, reply.text
    [got] = await wait_messages(http, bob, "inbox", 1)
    message = await detail(http, bob, got["id"])
    assert message["html"].strip() == "<p>Attached.</p>"
    attachments = {a["filename"]: a for a in message["attachments"]}
    assert set(attachments) == {"Übersicht 2024.pdf", "notes.txt"}
    pdf_id = attachments["Übersicht 2024.pdf"]["id"]
    download = await http.get(f"/v1/messages/{got['id']}/attachments/{pdf_id}",
                              headers=bob.headers)
    assert download.status_code == 200 and download.content == pdf


# ---- refusals ------------------------------------------------------------------------

INJECTIONS: list[tuple[str, dict[str, Any], str]] = [
    ("subject", {"subject": "Hi\r\nBcc: eve@evil.test"}, "subject"),
    ("subject LF", {"subject": "Hi\nX-Evil: 1"}, "subject"),
    ("subject NUL", {"subject": "Hi\0"}, "subject"),
    ("to address", {"to": ["bob@example.test\r\nBcc: eve@evil.test"]}, "to[0]"),
    ("to name", {"to": ["Bob\r\nBcc: eve@evil.test <bob@example.test>"]}, "to[0]"),
    ("cc", {"cc": ["carol@example.org\nBcc: eve@evil.test"]}, "cc[0]"),
    ("bcc", {"bcc": ["x@example.org", "eve@evil.test\r\n"]}, "bcc[1]"),
    ("in_reply_to", {"in_reply_to": "<a@b>\r\nBcc: eve@evil.test"}, "in_reply_to"),
    ("text NUL", {"text": "body\0"}, "text"),
]


async def test_a_line_break_in_any_field_is_400_naming_it_and_nothing_is_sent(
        http: httpx.AsyncClient, alice: Account, bob: Account, js: JetStreamContext) -> None:
    # One setup for every case (each starts the services): the cases run in turn.
    for case, fields, field in INJECTIONS:
        body: dict[str, Any] = {"to": ["bob@example.test"], "subject": "ok", "text": "ok",
                                **fields}
        problem = assert_problem(await send(http, alice, **body), 400)
        assert problem["field"] == field, case
        assert problem["detail"].startswith(f"{field}:"), case
    assert await messages(http, alice, "sent") == []
    assert (await js.stream_info("INBOUND")).state.messages == 0
    assert await messages(http, bob, "inbox") == []


def multipart_with_filename(filename: bytes) -> tuple[bytes, str]:
    """A multipart body written by hand: httpx would escape what these tests send."""
    boundary = "b0undary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"message\"\r\n\r\n"
            '{"to": ["bob@example.test"], "subject": "x"}\r\n'
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"attachments\"; "
            ).encode() + b'filename="' + filename + (
            '"\r\nContent-Type: text/plain\r\n\r\nhello\r\n'
            f"--{boundary}--\r\n").encode()
    return body, f"multipart/form-data; boundary={boundary}"


async def test_a_control_character_in_an_attachment_filename_is_400(
        http: httpx.AsyncClient, alice: Account) -> None:
    for filename in (b"evil\0.txt", b"evil\rBcc: eve@evil.test.txt",
                     b"evil\r\nBcc: eve@evil.test.txt"):
        body, content_type = multipart_with_filename(filename)
        reply = await http.post("/v1/messages", content=body,
                                headers={**alice.headers, "Content-Type": content_type})
        problem = assert_problem(reply, 400)
        if b"\0" in filename:  # CR and LF already break the multipart framing (also 400)
            assert problem["field"] == "attachments[0].filename"
    assert await messages(http, alice, "sent") == []


INVALID_ADDRESSES = ["bob", "bob@", "bob@@example.test", "a@example.test, b@example.test",
                     "undisclosed-recipients:;", "bob@-bad-.example", "bob@[127.0.0.1]",
                     '"quoted local"@example.test', "bøb@example.test"]


async def test_an_invalid_address_is_400_naming_the_field(
        http: httpx.AsyncClient, alice: Account) -> None:
    for address in INVALID_ADDRESSES:
        reply = await send(http, alice, to=["bob@example.test"], cc=[address], text="x")
        assert assert_problem(reply, 400)["field"] == "cc[0]", address
    assert await messages(http, alice, "sent") == []


async def test_no_recipient_at_all_is_400(http: httpx.AsyncClient, alice: Account) -> None:
    problem = assert_problem(await send(http, alice, subject="to nobody", text="x"), 400)
    assert problem["field"] == "to"


async def test_an_unknown_local_recipient_refuses_the_whole_send_naming_it(
        http: httpx.AsyncClient, alice: Account, bob: Account, delivery: DeliveryApp,
        js: JetStreamContext) -> None:
    reply = await send(http, alice, to=["bob@example.test", "nobody@example.test"], text="x")
    problem = assert_problem(reply, 400)
    assert "<nobody@example.test>" in problem["detail"]
    assert await messages(http, alice, "sent") == []
    await settle(delivery, js)
    assert await messages(http, bob, "inbox") == []


async def test_unknown_or_mistyped_fields_are_422(http: httpx.AsyncClient,
                                                  alice: Account) -> None:
    assert_problem(await send(http, alice, to=["bob@example.test"], sender="x@y.z"), 422)
    assert_problem(await send(http, alice, to="bob@example.test"), 422)
    bad_json = await http.post("/v1/messages", content=b"{nope",
                               headers={**alice.headers, "Content-Type": "application/json"})
    assert_problem(bad_json, 400)


async def test_a_body_that_is_neither_json_nor_multipart_is_415(
        http: httpx.AsyncClient, alice: Account) -> None:
    reply = await http.post("/v1/messages", content=b"to=bob", headers={
        **alice.headers, "Content-Type": "application/x-www-form-urlencoded"})
    assert_problem(reply, 415)


async def test_a_message_over_the_size_limit_is_413(
        http: httpx.AsyncClient, alice: Account, bob: Account) -> None:
    reply = await send(http, alice, to=["bob@example.test"], text="x" * MAX_SIZE)
    assert_problem(reply, 413)
    assert await messages(http, alice, "sent") == []


async def test_sending_needs_a_token(http: httpx.AsyncClient) -> None:
    reply = await http.post("/v1/messages", json={"to": ["bob@example.test"]})
    assert_problem(reply, 401)


# ---- remote recipients ---------------------------------------------------------------

async def test_remote_recipients_become_one_outbound_job_per_domain(
        http: httpx.AsyncClient, alice: Account, bob: Account, js: JetStreamContext,
        metadata_client: MetadataClient) -> None:
    reply = await send(http, alice, subject="Hello world", text="hi",
                       to=["x@remote.example", "Bob <bob@example.test>"],
                       cc=["y@Remote.Example", "z@other.example"],
                       bcc=["w@other.example"])
    assert reply.status_code == 202, reply.text
    jobs = await outbound_jobs(js)
    by_subject = {subject: (headers, job) for subject, headers, job in jobs}
    assert sorted(by_subject) == ["mail.outbound.other.example",
                                  "mail.outbound.remote.example"]
    assert len(jobs) == 2
    headers, remote = by_subject["mail.outbound.remote.example"]
    assert list(remote.rcpt_to) == ["x@remote.example", "y@remote.example"]
    assert remote.domain == "remote.example"
    assert headers["Nats-Msg-Id"] == remote.job_id
    assert remote.mail_from == "alice@example.test"
    assert remote.sender_user_id == alice.user_id
    assert remote.previous_attempts == 0 and remote.HasField("queued_at")
    assert remote.message_id == reply.json()["message_id"]
    _, other = by_subject["mail.outbound.other.example"]
    assert list(other.rcpt_to) == ["z@other.example", "w@other.example"]
    # The raw message travels as a blob reference, and it is the copy without Bcc.
    assert other.blob_key == remote.blob_key
    data = await metadata_client.get_blob(remote.blob_key)
    assert len(data) == remote.size
    assert b"Subject: Hello world\r\n" in data and b"w@other.example" not in data
    await wait_messages(http, bob, "inbox", 1)
    await wait_messages(http, alice, "sent", 1)


# ---- drafts --------------------------------------------------------------------------

async def test_a_draft_is_kept_replaced_and_sent(
        http: httpx.AsyncClient, alice: Account, bob: Account) -> None:
    created = await http.post("/v1/drafts", json={"subject": "Idea", "text": "first"},
                              headers=alice.headers)
    assert created.status_code == 201, created.text
    first_id = created.json()["id"]
    [draft] = await messages(http, alice, "drafts")
    assert draft["id"] == first_id and draft["subject"] == "Idea" and draft["is_read"]

    updated = await http.put(f"/v1/drafts/{first_id}", headers=alice.headers, json={
        "to": ["bob@example.test"], "subject": "Idea v2", "text": "second"})
    assert updated.status_code == 200, updated.text
    second_id = updated.json()["id"]
    assert second_id != first_id
    assert [d["id"] for d in await messages(http, alice, "drafts")] == [second_id]
    assert (await http.get(f"/v1/messages/{first_id}", headers=alice.headers)
            ).status_code == 404

    sent = await http.post(f"/v1/drafts/{second_id}/send", headers=alice.headers)
    assert sent.status_code == 202, sent.text
    [got] = await wait_messages(http, bob, "inbox", 1)
    assert got["subject"] == "Idea v2"
    [in_sent] = await wait_messages(http, alice, "sent", 1)
    assert in_sent["id"] == sent.json()["id"]
    assert await messages(http, alice, "drafts") == []
    assert (await detail(http, bob, got["id"]))["message_id"] == sent.json()["message_id"]


async def test_a_draft_keeps_bcc_and_sending_it_hides_bcc_from_recipients(
        http: httpx.AsyncClient, alice: Account, bob: Account, carol: Account) -> None:
    created = await http.post("/v1/drafts", headers=alice.headers, json={
        "to": ["bob@example.test"], "bcc": ["carol@example.org"], "text": "psst"})
    draft_id = created.json()["id"]
    assert (await detail(http, alice, draft_id))["bcc"] == [
        {"name": "", "email": "carol@example.org"}]
    sent = await http.post(f"/v1/drafts/{draft_id}/send", headers=alice.headers)
    assert sent.status_code == 202, sent.text
    [got] = await wait_messages(http, carol, "inbox", 1)
    assert b"carol@example.org" not in await raw(http, carol, got["id"])
    [to_bob] = await wait_messages(http, bob, "inbox", 1)
    assert b"carol@example.org" not in await raw(http, bob, to_bob["id"])


async def test_a_draft_without_recipients_cannot_be_sent(
        http: httpx.AsyncClient, alice: Account) -> None:
    draft_id = (await http.post("/v1/drafts", json={"text": "later"},
                                headers=alice.headers)).json()["id"]
    problem = assert_problem(await http.post(f"/v1/drafts/{draft_id}/send",
                                             headers=alice.headers), 400)
    assert problem["field"] == "to"
    assert len(await messages(http, alice, "drafts")) == 1


async def test_a_message_that_is_not_a_draft_of_yours_is_404(
        http: httpx.AsyncClient, alice: Account, bob: Account) -> None:
    await send(http, alice, to=["bob@example.test"], text="hi")
    [sent] = await wait_messages(http, alice, "sent", 1)
    bobs_draft = (await http.post("/v1/drafts", json={"text": "mine"},
                                  headers=bob.headers)).json()["id"]
    for draft_id in (sent["id"], bobs_draft, "not-an-id"):
        assert_problem(await http.post(f"/v1/drafts/{draft_id}/send",
                                       headers=alice.headers), 404)
        assert_problem(await http.put(f"/v1/drafts/{draft_id}", json={"text": "x"},
                                      headers=alice.headers), 404)
    assert len(await messages(http, alice, "sent")) == 1


async def test_a_draft_with_a_line_break_in_the_subject_is_400(
        http: httpx.AsyncClient, alice: Account) -> None:
    reply = await http.post("/v1/drafts", json={"subject": "a\r\nb"}, headers=alice.headers)
    assert assert_problem(reply, 400)["field"] == "subject"
    assert await messages(http, alice, "drafts") == []


# ---- SubmitMessage itself ------------------------------------------------------------

async def test_a_repeated_submission_changes_nothing_more(
        http: httpx.AsyncClient, alice: Account, bob: Account, delivery: DeliveryApp,
        js: JetStreamContext, metadata_client: MetadataClient) -> None:
    data = (b"From: alice@example.test\r\nTo: bob@example.test, x@remote.example\r\n"
            b"Subject: once\r\nMessage-ID: <once@example.test>\r\n\r\nbody\r\n")
    put = await metadata_client.put_blob(data)
    req = delivery_pb2.SubmitMessageRequest(
        submission_id="0123456789ABCDEF01234567", sender_user_id=alice.user_id,
        mail_from="alice@example.test", recipients=["bob@example.test", "x@remote.example"],
        blob_key=put.blob_key, size=len(data))
    async with DeliveryClient(delivery.grpc_addr) as client:
        first = await client.submit_message(req)
        again = await client.submit_message(req)
        assert first == again and first.message_id == "once@example.test"
        wrong_sender = delivery_pb2.SubmitMessageRequest()
        wrong_sender.CopyFrom(req)
        wrong_sender.mail_from = "bob@example.test"
        with pytest.raises(PermissionDenied):
            await client.submit_message(wrong_sender)
    await settle(delivery, js)
    assert len(await messages(http, bob, "inbox")) == 1
    assert [s["id"] for s in await messages(http, alice, "sent")] == [first.sent_email_id]
    assert len(await outbound_jobs(js)) == 1
