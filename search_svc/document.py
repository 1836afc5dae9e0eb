"""From a stored message to what the index holds of it."""

from __future__ import annotations

from mailgrid.mime import html_to_text
from mailgrid.v1 import common_pb2
from search_svc.ports import IndexedMessage

# Longest body text indexed per message; the rest is not searchable (the metadata store
# keeps at most mime_max_body_bytes anyway).
MAX_BODY_CHARS = 256 * 1024


def address_text(addr: common_pb2.EmailAddress) -> str:
    return f"{addr.name} <{addr.email}>" if addr.name else addr.email


def summary_of(message: common_pb2.Message) -> common_pb2.MessageSummary:
    """The folder-listing summary of a whole message."""
    summary = common_pb2.MessageSummary(
        email_id=message.email_id, folder_id=message.folder_id, subject=message.subject,
        preview=message.preview, date=message.date, is_read=message.is_read,
        is_starred=message.is_starred, has_attachments=bool(message.attachments),
        size=message.size, thread_id=message.thread_id)
    getattr(summary, "from").CopyFrom(getattr(message, "from"))
    return summary


def indexed_message(user_id: str, message: common_pb2.Message,
                    summary: common_pb2.MessageSummary | None = None) -> IndexedMessage:
    """The searchable record of ``message`` (HTML-only bodies reduced to text).

    ``summary``, when given (the one an event carried), is kept as the listing shows it.
    """
    text = message.text  # each read of a string field decodes it anew
    body = text if text and not text.isspace() else html_to_text(message.html)
    return IndexedMessage(
        user_id=user_id,
        summary=summary if summary is not None else summary_of(message),
        to=tuple(address_text(a) for a in message.to),
        cc=tuple(address_text(a) for a in message.cc),
        bcc=tuple(address_text(a) for a in message.bcc),
        body=body[:MAX_BODY_CHARS],
        filenames=tuple(a.filename for a in message.attachments if a.filename),
    )
