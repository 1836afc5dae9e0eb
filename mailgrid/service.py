"""Running one service process: logging, signals, graceful stop.

A service is any object with ``async start()`` and ``async stop()``; ``start`` returns once
it is serving (its gRPC health says SERVING), ``stop`` drains and closes.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Protocol

from mailgrid.settings import Settings


class Service(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...


# aiosmtpd's logger: at INFO it traces every connection and every SMTP command, a dozen
# lines per message (Postfix logs about six, one per event of the message's life).
SMTP_TRACE_LOGGER = "mail.log"


def configure_logging(settings: Settings, name: str) -> None:
    level = settings.log_level.upper()
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s {name}[%(process)d] %(levelname)s %(name)s: %(message)s",
    )
    # The gateway logs one line per accepted message itself; the protocol trace comes
    # back with MAILGRID_LOG_LEVEL=DEBUG.
    wanted: int = logging.getLevelName(level)  # a level name's number
    logging.getLogger(SMTP_TRACE_LOGGER).setLevel(
        wanted if wanted <= logging.DEBUG else max(wanted, logging.WARNING))


async def run_until_signalled(service: Service) -> None:
    """Starts ``service``, waits for SIGTERM or SIGINT, then stops it gracefully."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await service.start()
    try:
        await stop.wait()
    finally:
        await service.stop()
