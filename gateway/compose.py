"""The messages users send: built with the standard library, and edited as bytes.

Pure functions, no I/O. The HTTP API composes a message from validated fields
(``Composition`` → ``build``); a draft is sent again with a new Date and Message-ID
(``reissue``); SMTP submission edits the header section of the bytes a client sent
(``header_fields``, ``without_fields``, ``with_fields``) and leaves the body untouched.

Every message is rendered twice when it has a Bcc header: the sender's copy keeps it,
the recipients' copy does not (RFC 5322 3.6.3: Bcc recipients are not disclosed).
"""

from __future__ import annotations

import copy
import email.policy
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from email.headerregistry import Address
from email.message import EmailMessage
from email.parser import BytesHeaderParser, BytesParser
from email.utils import format_datetime

from mailgrid.addresses import has_line_break, parse_address
from mailgrid.crlf import has_bare_cr_or_lf
from mailgrid.errors import InvalidArgument

# CRLF line ends (policy.SMTP); 7bit transfer encodings (quoted-printable or base64 for
# non-ASCII text) so that the message needs no 8BITMIME from any server on its way.
SEND_POLICY = email.policy.SMTP.clone(cte_type="7bit")
CRLF = b"\r\n"
# References kept on a reply: the last ones are the closest (RFC 5322 3.6.4).
MAX_REFERENCES = 50
# A msg-id as we accept it from a user: id-left "@" id-right, printable ASCII, no angle
# brackets or spaces (RFC 5322 3.6.4; the obsolete forms are not accepted).
_MSG_ID = re.compile(r"^<?([\x21-\x3b\x3d\x3f-\x7e]+@[\x21-\x3b\x3d\x3f-\x7e]+)>?$")
_FIELD_NAME = re.compile(rb"^([\x21-\x39\x3b-\x7e]+)[ \t]*:")
_CONTENT_TYPE = re.compile(r"^([a-z0-9][a-z0-9!#$&^_.+-]*)/([a-z0-9][a-z0-9!#$&^_.+-]*)$")


class FieldError(InvalidArgument):
    """A field of a send request is not acceptable; ``field`` names it (e.g. 'to[1]')."""

    def __init__(self, field: str, detail: str) -> None:
        super().__init__(f"{field}: {detail}")
        self.field = field


@dataclass(frozen=True)
class Attachment:
    filename: str
    content_type: str
    data: bytes


@dataclass
class Composition:
    """A message to send, every field validated (``check_*`` below)."""

    sender: Address
    to: list[Address] = field(default_factory=list)
    cc: list[Address] = field(default_factory=list)
    bcc: list[Address] = field(default_factory=list)
    subject: str = ""
    text: str = ""
    html: str | None = None
    # "<id@host>" of the parent, and the References for the reply (each "<id>").
    in_reply_to: str = ""
    references: list[str] = field(default_factory=list)
    attachments: list[Attachment] = field(default_factory=list)

    def recipients(self) -> list[str]:
        return unique_recipients([*self.to, *self.cc, *self.bcc])


@dataclass(frozen=True)
class Rendered:
    """The bytes to store: ``sent`` for the sender (with Bcc), ``outgoing`` for the rest."""

    sent: bytes
    outgoing: bytes
    message_id: str
    recipients: list[str]

    @property
    def same(self) -> bool:
        return self.sent is self.outgoing


# ---- validation ----------------------------------------------------------------------

def check_text(name: str, value: str, *, multiline: bool = False) -> str:
    """``value`` if it may stand in a header (no CR, LF, NUL) or a body (no NUL)."""
    if "\0" in value or (not multiline and has_line_break(value)):
        what = "NUL" if multiline else "a line break (CR or LF) or NUL"
        raise FieldError(name, f"must not contain {what}")
    return value


def check_addresses(name: str, values: Iterable[str]) -> list[Address]:
    """Each entry one RFC 5322 address (display name allowed)."""
    out: list[Address] = []
    for index, value in enumerate(values):
        where = f"{name}[{index}]"
        try:
            out.append(parse_address(value))
        except InvalidArgument as err:
            raise FieldError(where, err.detail) from None
    return out


def check_message_id(name: str, value: str) -> str:
    """A msg-id given as "<id@host>" or "id@host" → "<id@host>"."""
    check_text(name, value)
    found = _MSG_ID.match(value.strip())
    if found is None:
        raise FieldError(name, "is not a message id (<id@host>) or an email id")
    return f"<{found.group(1)}>"


def check_attachment(index: int, filename: str, content_type: str, data: bytes) -> Attachment:
    check_text(f"attachments[{index}].filename", filename)
    check_text(f"attachments[{index}].content_type", content_type)
    name = filename.replace("\\", "/").rsplit("/", 1)[-1].strip() or f"attachment-{index + 1}"
    ctype = content_type.split(";", 1)[0].strip().lower()
    if not _CONTENT_TYPE.match(ctype):
        ctype = "application/octet-stream"
    return Attachment(name, ctype, data)


def reply_references(parent_message_id: str, parent_references: Iterable[str],
                     parent_in_reply_to: str = "") -> tuple[str, list[str]]:
    """In-Reply-To and References of a reply to a stored message (RFC 5322 3.6.4).

    References: the parent's References (or, lacking those, its In-Reply-To), then the
    parent's Message-ID. Stored ids come without angle brackets; odd ones are skipped.
    """
    refs = list(parent_references) or ([parent_in_reply_to] if parent_in_reply_to else [])
    ids = [f"<{m.group(1)}>" for m in (_MSG_ID.match(r.strip()) for r in
                                        [*refs, parent_message_id]) if m]
    if not ids or not _MSG_ID.match(parent_message_id.strip()):
        raise FieldError("in_reply_to", "the message replied to has no usable Message-ID")
    return ids[-1], list(dict.fromkeys(ids))[-MAX_REFERENCES:]


def unique_recipients(addresses: Iterable[Address]) -> list[str]:
    """The envelope recipients: each address once, compared without case."""
    seen: dict[str, str] = {}
    for addr in addresses:
        seen.setdefault(addr.addr_spec.lower(), addr.addr_spec)
    return list(seen.values())


# ---- building ------------------------------------------------------------------------

def build(c: Composition, *, now: datetime, message_id: str) -> EmailMessage:
    """The message, as the standard library writes it (RFC 5322 + MIME)."""
    msg = EmailMessage(policy=SEND_POLICY)
    msg["From"] = c.sender
    if c.to:
        msg["To"] = c.to
    if c.cc:
        msg["Cc"] = c.cc
    if c.bcc:
        msg["Bcc"] = c.bcc
    msg["Subject"] = c.subject
    msg["Date"] = format_datetime(now)
    msg["Message-ID"] = message_id
    if c.in_reply_to:
        msg["In-Reply-To"] = c.in_reply_to
        msg["References"] = " ".join(c.references or [c.in_reply_to])
    msg.set_content(c.text)  # also adds MIME-Version
    if c.html is not None:
        msg.add_alternative(c.html, subtype="html")
    for att in c.attachments:
        maintype, subtype = att.content_type.split("/", 1)
        msg.add_attachment(att.data, maintype=maintype, subtype=subtype,
                           filename=att.filename)
    return msg


def reissue(raw: bytes, sender: Address, *, now: datetime, message_id: str) -> EmailMessage:
    """A stored draft, ready to send: our From, a new Date and Message-ID."""
    msg = BytesParser(policy=SEND_POLICY).parsebytes(raw)
    for name, value in (("From", str(sender)), ("Date", format_datetime(now)),
                        ("Message-ID", message_id)):
        if len(msg.get_all(name, [])) == 1:
            msg.replace_header(name, value)  # keeps its place in the header
        else:
            del msg[name]
            msg[name] = value
    del msg["Sender"]
    return msg


def header_recipients(msg: EmailMessage) -> list[str]:
    """The recipients a message's To, Cc and Bcc name (validated)."""
    found: list[Address] = []
    for name in ("To", "Cc", "Bcc"):
        for value in msg.get_all(name, []):
            for index, addr in enumerate(getattr(value, "addresses", ())):
                found.extend(check_addresses(f"{name.lower()}[{index}]", [str(addr)]))
    return unique_recipients(found)


def render(msg: EmailMessage, message_id: str) -> Rendered:
    """The sender's bytes (with Bcc) and the recipients' bytes (without)."""
    recipients = header_recipients(msg)
    sent = _bytes(msg)
    if "Bcc" not in msg:
        return Rendered(sent, sent, message_id, recipients)
    outgoing = copy.deepcopy(msg)
    del outgoing["Bcc"]
    return Rendered(sent, _bytes(outgoing), message_id, recipients)


def _bytes(msg: EmailMessage) -> bytes:
    data = msg.as_bytes(policy=SEND_POLICY)
    if has_bare_cr_or_lf(data):  # the generator writes CRLF only; make sure
        raise InvalidArgument("the message could not be written with CRLF line ends")
    return data


# ---- editing raw bytes (SMTP submission) ---------------------------------------------

def split_message(raw: bytes) -> tuple[bytes, bytes]:
    """(header section with its final CRLF, the rest from the empty line on)."""
    if raw.startswith(CRLF):
        return b"", raw
    end = raw.find(b"\r\n\r\n")
    if end < 0:
        return raw if raw.endswith(CRLF) or not raw else raw + CRLF, b""
    return raw[:end + 2], raw[end + 2:]


def header_fields(head: bytes) -> list[bytes]:
    """The header fields, each with its folded continuation lines and CRLFs."""
    fields: list[bytes] = []
    for line in head.split(CRLF)[:-1] if head else []:
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line + CRLF
        else:
            fields.append(line + CRLF)
    return fields


def field_name(field_bytes: bytes) -> str:
    found = _FIELD_NAME.match(field_bytes)
    return found.group(1).decode("ascii").lower() if found else ""


def has_field(raw: bytes, name: str) -> bool:
    head, _ = split_message(raw)
    return any(field_name(f) == name.lower() for f in header_fields(head))


def without_fields(raw: bytes, names: Iterable[str]) -> bytes:
    """``raw`` without the header fields named (any case), body unchanged."""
    drop = {n.lower() for n in names}
    head, rest = split_message(raw)
    kept = [f for f in header_fields(head) if field_name(f) not in drop]
    return b"".join(kept) + rest


def with_fields(raw: bytes, fields: Iterable[bytes]) -> bytes:
    """``raw`` with header fields (each ending CRLF) added at the end of its header."""
    head, rest = split_message(raw)
    return head + b"".join(fields) + (rest or CRLF)


def from_addresses(raw: bytes) -> list[str] | None:
    """The addr-specs of every From field; None when there is no From field at all.

    A From field that cannot be read yields '' among them, which matches no user.
    """
    head, _ = split_message(raw)
    try:
        parsed = BytesHeaderParser(policy=email.policy.default).parsebytes(head + CRLF)
        values = parsed.get_all("From")
    except Exception:
        return [""]
    if values is None:
        return None
    found: list[str] = []
    for value in values:
        addresses = getattr(value, "addresses", ())
        if not addresses or list(getattr(value, "defects", [])):
            found.append("")
        found.extend(a.addr_spec for a in addresses)
    return found


def header_line(name: str, value: str) -> bytes:
    """One header field in wire form, folded by the standard library."""
    return SEND_POLICY.fold_binary(name, SEND_POLICY.header_factory(name, value))
