"""Filing a raw message into a mailbox: what the inbound and the send paths share.

Both parse the raw bytes under the configured limits and put each attachment's bytes
in the blob store before StoreDelivery names them; these two steps live here once.
"""

from __future__ import annotations

import asyncio
import hashlib

from mailgrid.clients import MetadataClient
from mailgrid.mime import ParsedEmail, iter_attachments, parse_message
from mailgrid.settings import Settings
from mailgrid.v1 import common_pb2


def parse_limited(settings: Settings, raw: bytes) -> ParsedEmail:
    """``raw`` parsed under the settings' MIME limits (never raises).

    Every parse of a stored message goes through here (filing, and the bodies derived
    from the raw message when read), so a message reads back as it was filed.
    """
    return parse_message(raw, max_depth=settings.mime_max_depth,
                         max_parts=settings.mime_max_parts,
                         max_body_bytes=settings.mime_max_body_bytes)


def fill_bodies(settings: Settings, message: common_pb2.Message, raw: bytes) -> None:
    """Sets ``message``'s text and html from its raw message, parsed as at filing: for a
    message filed with ParsedMessage.bodies_from_raw."""
    parsed = parse_limited(settings, raw).message
    message.text, message.html = parsed.text, parsed.html


# Messages up to this size are parsed on the event loop: a thread hop costs more than
# their parse (well under a millisecond), and the GIL lets no other parse run meanwhile
# anyway. Larger ones go to a thread, so that the loop keeps serving its connections.
INLINE_PARSE_MAX = 256 * 1024


async def parse_raw(settings: Settings, raw: bytes) -> ParsedEmail:
    """``parse_limited``, off the event loop for a large message."""
    if len(raw) <= INLINE_PARSE_MAX:
        return parse_limited(settings, raw)
    return await asyncio.to_thread(parse_limited, settings, raw)


async def store_attachments(metadata: MetadataClient, parsed: ParsedEmail) -> None:
    """Puts each attachment's bytes in the blob store and records its content address.

    Identical attachments of one message are uploaded once (the store is
    content-addressed, so across messages they are stored once anyway).
    """
    keys: dict[bytes, str] = {}
    for att, data in iter_attachments(parsed):
        digest = hashlib.sha256(data).digest()
        if digest not in keys:
            keys[digest] = (await metadata.put_blob(data)).blob_key
        att.blob_key = keys[digest]
