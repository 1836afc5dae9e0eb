"""Running one service process: logging, signals, graceful stop.

A service is any object with ``async start()`` and ``async stop()``; ``start`` returns once
it is serving (its gRPC health says SERVING), ``stop`` drains and closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
from typing import IO, Protocol

from mailgrid.settings import Settings


class Service(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...


# aiosmtpd's logger: at INFO it traces every connection and every SMTP command, a dozen
# lines per message (Postfix logs about six, one per event of the message's life).
SMTP_TRACE_LOGGER = "mail.log"

# Set by `mailgrid up` for its children: the descriptor of the launcher's own log output
# and the prefix each line gets there. A child logs straight into it instead of through
# its output pipe, which the launcher would have to read and copy line by line (about
# 0.07 ms of its CPU per received message); the pipe stays for anything else a child
# prints.
LOG_FD_ENV = "MAILGRID_LOG_FD"
LOG_PREFIX_ENV = "MAILGRID_LOG_PREFIX"


def line_prefix(name: str) -> str:
    """What starts every line of ``name``'s output under `mailgrid up`."""
    return f"{name:<9}| "


class PrefixedFormatter(logging.Formatter):
    """Puts ``prefix`` before every line of a record, a traceback's included."""

    def __init__(self, fmt: str, prefix: str) -> None:
        super().__init__(fmt)
        self.prefix = prefix

    def format(self, record: logging.LogRecord) -> str:
        return self.prefix + super().format(record).replace("\n", "\n" + self.prefix)


def _launcher_log() -> IO[str] | None:
    """The launcher's log output handed down to this process, if any. The variable is
    not passed on: in a process this one starts, that number may be another file."""
    fd = os.environ.pop(LOG_FD_ENV, "")
    if not fd.isdigit():
        return None
    with contextlib.suppress(OSError):
        return os.fdopen(int(fd), "w", buffering=1, encoding="utf-8",
                         errors="backslashreplace", closefd=False)
    return None


def configure_logging(settings: Settings, name: str) -> None:
    level = settings.log_level.upper()
    fmt = f"%(asctime)s {name}[%(process)d] %(levelname)s %(name)s: %(message)s"
    stream, prefix = _launcher_log(), os.environ.pop(LOG_PREFIX_ENV, "")
    if stream is None:
        logging.basicConfig(level=level, format=fmt)
    else:
        handler = logging.StreamHandler(stream)
        handler.setFormatter(PrefixedFormatter(fmt, prefix))
        logging.basicConfig(level=level, handlers=[handler])
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
    # What starting made (modules, clients, caches: some 80,000 objects in the gateway)
    # lives as long as the process. Frozen, the cycle collector no longer walks it at
    # every full collection (40 ms each in the gateway, one every few thousand
    # messages under load).
    gc.collect()
    gc.freeze()
    try:
        await stop.wait()
    finally:
        await service.stop()
