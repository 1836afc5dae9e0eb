"""Virus scanning through a pluggable scanner; ClamAV's clamd over its socket.

clamd protocol (clamd(8), "INSTREAM"): send ``zINSTREAM\\0``, then the data as chunks
each prefixed with its length as a 4-byte big-endian integer, then a zero length; the
reply is ``stream: OK`` or ``stream: <signature> FOUND`` (NUL-terminated with the z
prefix). A scanner that cannot be reached raises Unavailable, so the inbound job is
retried rather than delivered unscanned.
"""

from __future__ import annotations

import asyncio
import struct
from typing import Protocol

from mailgrid.errors import Unavailable
from mailgrid.settings import split_host_port

CHUNK = 64 * 1024
# Seconds one scan may take (connect, send, verdict).
SCAN_TIMEOUT = 60.0


class VirusScanner(Protocol):
    async def scan(self, data: bytes) -> str:
        """The name of the virus found, '' if the data is clean; Unavailable if the
        scanner cannot say."""
        ...


class NoScanner:
    """No scanner configured: everything is clean."""

    async def scan(self, data: bytes) -> str:
        return ""


class ClamdScanner:
    """clamd at a unix socket path or HOST:PORT."""

    def __init__(self, address: str, timeout: float = SCAN_TIMEOUT) -> None:
        self.address = address
        self.timeout = timeout

    async def scan(self, data: bytes) -> str:
        try:
            reply = await asyncio.wait_for(self._instream(data), self.timeout)
        except (OSError, TimeoutError, asyncio.IncompleteReadError) as err:
            raise Unavailable(f"clamd at {self.address} cannot scan: {err!r}") from None
        text = reply.rstrip(b"\0\r\n").decode("utf-8", "replace")
        _, _, verdict = text.partition(": ")
        if verdict == "OK":
            return ""
        if verdict.endswith(" FOUND"):
            return verdict.removesuffix(" FOUND").strip() or "unknown virus"
        # e.g. "INSTREAM size limit exceeded. ERROR": the scanner could not say.
        raise Unavailable(f"clamd at {self.address}: {text}")

    async def _instream(self, data: bytes) -> bytes:
        if self.address.startswith("/"):
            reader, writer = await asyncio.open_unix_connection(self.address)
        else:
            host, port = split_host_port(self.address)
            reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(b"zINSTREAM\0")
            for start in range(0, len(data), CHUNK):
                chunk = data[start:start + CHUNK]
                writer.write(struct.pack("!L", len(chunk)) + chunk)
                await writer.drain()
            writer.write(struct.pack("!L", 0))
            await writer.drain()
            return await reader.readuntil(b"\0")
        finally:
            writer.close()


def make_scanner(address: str) -> VirusScanner:
    return ClamdScanner(address) if address else NoScanner()
