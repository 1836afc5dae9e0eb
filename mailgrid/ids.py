"""Identifiers.

Email ids are TIMEUUIDs (UUID version 1), as Xu proposes and as ScyllaDB sorts them:
newest first by clustering order. UUID bytes do not sort by time, so stores that order
by bytes use ``time_sort_key``, which puts the 60-bit timestamp first.
"""

from __future__ import annotations

import secrets
import threading
import time
import uuid

# A random node id with the multicast bit set (RFC 4122 4.5): never a real MAC address.
_NODE = secrets.randbits(48) | (1 << 40)
_lock = threading.Lock()
_last_timestamp = 0
# 100-ns intervals between the UUID epoch (1582-10-15) and the Unix epoch.
_UUID_EPOCH_OFFSET = 0x01B21DD213814000


def new_timeuuid(at: float | None = None) -> uuid.UUID:
    """A version-1 UUID for ``at`` (default now); strictly increasing within a process."""
    global _last_timestamp
    stamp = int((time.time() if at is None else at) * 10_000_000) + _UUID_EPOCH_OFFSET
    with _lock:
        if at is None:
            stamp = max(stamp, _last_timestamp + 1)
            _last_timestamp = stamp
    clock_seq = secrets.randbits(14)
    return uuid.UUID(
        fields=(
            stamp & 0xFFFFFFFF,
            (stamp >> 32) & 0xFFFF,
            ((stamp >> 48) & 0x0FFF) | 0x1000,
            ((clock_seq >> 8) & 0x3F) | 0x80,
            clock_seq & 0xFF,
            _NODE,
        )
    )


def parse_timeuuid(text: str) -> uuid.UUID:
    """The TIMEUUID spelled by ``text``; ValueError for anything else."""
    value = uuid.UUID(text)
    if value.version != 1 or str(value) != text.lower():
        raise ValueError(f"not a TIMEUUID: {text!r}")
    return value


def time_sort_key(value: uuid.UUID) -> bytes:
    """16 bytes that sort like ScyllaDB sorts TIMEUUIDs: by time, then by the rest."""
    return value.time.to_bytes(8, "big") + value.bytes[8:]


def unix_time(value: uuid.UUID) -> float:
    """Seconds since the Unix epoch at which a TIMEUUID was made."""
    return (value.time - _UUID_EPOCH_OFFSET) / 10_000_000


def new_queue_id() -> str:
    """A short, time-ordered id for an accepted SMTP transaction (as in ``250 2.0.0 <id>``)."""
    return f"{time.time_ns() // 1000:014X}{secrets.token_hex(5).upper()}"


def new_id() -> str:
    """A random id for users and folders."""
    return str(uuid.uuid4())
