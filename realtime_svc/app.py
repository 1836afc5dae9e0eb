"""realtime_svc as a process: RealtimeService over gRPC, fed by the EVENTS stream.

Stateless: a subscription is a cursor into the stream, so any number of instances may
run side by side and a client may resume on any of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from nats.aio.client import Client as NATS

from mailgrid import bus
from mailgrid.errors import InvalidArgument
from mailgrid.grpcutil import GrpcServer
from mailgrid.service import configure_logging, run_until_signalled
from mailgrid.settings import Settings
from mailgrid.v1 import realtime_pb2_grpc
from realtime_svc.hub import Hub
from realtime_svc.service import RealtimeServicer
from realtime_svc.stream import EventStream

log = logging.getLogger(__name__)

REALTIME_SERVICE = "mailgrid.v1.RealtimeService"
# Seconds open streams get to end when the service stops (clients then resume elsewhere).
STOP_GRACE = 1.0


class RealtimeApp:
    """``start`` returns once gRPC is SERVING; ``stop`` ends every stream and drains."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.grpc_addr = ""
        self.hub: Hub | None = None
        self._nc: NATS | None = None
        self._server: GrpcServer | None = None
        self._rechecks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        settings = self.settings
        if not settings.nats_url:
            raise InvalidArgument("realtime_svc needs MAILGRID_NATS_URL")
        self._nc = await bus.connect(settings.nats_url, "realtime_svc",
                                     reconnected_cb=self._reconnected)
        js = self._nc.jetstream()
        # Also turns on the EVENTS stream's republishing on a store made by an older version.
        await bus.ensure_streams(js, settings.nats_replicas)
        self.hub = Hub(self._nc, EventStream(js), settings.realtime_session_buffer)
        server = GrpcServer(settings.realtime_addr)
        server.add(realtime_pb2_grpc.add_RealtimeServiceServicer_to_server,
                   RealtimeServicer(self.hub, settings.events_heartbeat), REALTIME_SERVICE)
        self._server = server
        self.grpc_addr = await server.start()
        log.info("realtime_svc serving on %s", self.grpc_addr)

    async def _reconnected(self) -> None:
        if self.hub is not None:
            # Not awaited here: nats-py waits for this callback before it reads again.
            task = asyncio.get_running_loop().create_task(self.hub.recheck_all())
            self._rechecks.add(task)
            task.add_done_callback(self._rechecks.discard)

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.health.enter_graceful_shutdown()
        if self.hub is not None:
            await self.hub.close()
        if self._server is not None:
            await self._server.stop(grace=STOP_GRACE)
            self._server = None
        self.hub = None
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.drain()
            self._nc = None


async def main(settings: Settings | None = None) -> None:
    settings = settings or Settings()
    configure_logging(settings, "realtime_svc")
    await run_until_signalled(RealtimeApp(settings))


if __name__ == "__main__":
    asyncio.run(main())
