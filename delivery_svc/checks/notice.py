"""The notice a recipient gets in the inbox when a message to them was quarantined."""

from __future__ import annotations

from datetime import UTC, datetime
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime, make_msgid

from mailgrid.settings import Settings
from mailgrid.v1 import metadata_pb2


def virus_notice(settings: Settings, rcpt: str, mail_from: str,
                 original: metadata_pb2.ParsedMessage, virus: str) -> bytes:
    msg = EmailMessage()
    msg["From"] = f"Mail Delivery System <postmaster@{settings.domains[0]}>"
    msg["To"] = rcpt
    msg["Subject"] = "Quarantined: a message to you contained a virus"
    msg["Date"] = format_datetime(datetime.now(UTC))
    msg["Message-ID"] = make_msgid(domain=settings.server_name)
    msg["Auto-Submitted"] = "auto-generated"  # RFC 3834: no automatic replies to this
    msg.set_content(
        f"A message to {rcpt} was found to carry the virus {virus}.\n"
        "It was not put in your inbox: it is quarantined in your Spam folder.\n\n"
        f"Envelope sender: {mail_from or '<>'}\n"
        f"From: {getattr(original, 'from').email or '(none)'}\n"
        f"Subject: {original.subject or '(none)'}\n")
    return msg.as_bytes(policy=SMTP)
