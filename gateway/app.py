"""The gateway process: SMTP MX and submission listeners, HTTP API, gRPC health.

Stateless: everything it knows comes from metadata_svc (gRPC) and NATS, so any number
of gateways may run side by side behind one MX record and one load balancer.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import socket
from collections.abc import Iterator

import grpc
import uvicorn
from grpc_health.v1 import health_pb2, health_pb2_grpc
from nats.aio.client import Client as NATS

from gateway.auth import TokenSigner
from gateway.http_api import ApiDeps, build_app
from gateway.http_search import SearchDeps, search_routes
from gateway.http_send import SendDeps, body_limit, send_routes
from gateway.http_senders import senders_router
from gateway.http_session import LoginThrottle, logout_router
from gateway.revocation import Revocations
from gateway.smtp import MxListener
from gateway.submission import SubmissionListener
from gateway.tls import server_context
from gateway.webmail import html_router, pages_router
from gateway.ws import EventsDeps, RealtimeClient, events_router
from mailgrid import bus
from mailgrid.clients import DeliveryClient, MetadataClient
from mailgrid.grpcutil import GrpcServer, channel
from mailgrid.search_client import SearchClient
from mailgrid.service import configure_logging, run_until_signalled
from mailgrid.settings import Settings, split_host_port

log = logging.getLogger(__name__)

# Seconds in-flight work (an SMTP DATA, an HTTP response) may take to finish at stop.
STOP_GRACE = 10.0
# Seconds /readyz waits for metadata_svc's health answer.
READY_TIMEOUT = 2.0


class _Uvicorn(uvicorn.Server):
    """uvicorn without its signal handlers (mailgrid.service owns signals)."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = asyncio.Event()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        self.ready.set()


def _listen(addr: str) -> socket.socket:
    """A listening TCP socket on ``addr`` (port 0 picks a free one)."""
    host, port = split_host_port(addr)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto must be IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that
    # say TCP, and without it Nagle and delayed ACKs add 40 ms to keep-alive requests.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(1024)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def _addr(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class GatewayApp:
    """``start`` returns once SMTP, HTTP and gRPC listen; ``stop`` drains them."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.smtp_addr = ""
        self.http_addr = ""
        self.grpc_addr = ""
        self.nc: NATS | None = None
        self.metadata: MetadataClient | None = None
        self.delivery: DeliveryClient | None = None
        self.submission_addr = ""
        self._submission: SubmissionListener | None = None
        self.realtime: RealtimeClient | None = None
        self.search: SearchClient | None = None
        self._health_channel: grpc.aio.Channel | None = None
        self._smtp: MxListener | None = None
        self._http: _Uvicorn | None = None
        self._http_task: asyncio.Task[None] | None = None
        self._grpc: GrpcServer | None = None
        self.revocations: Revocations | None = None

    async def start(self) -> None:
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        signer = await asyncio.to_thread(TokenSigner.from_settings, self.settings)
        self.nc = await bus.connect(self.settings.nats_url, "mailgrid-gateway")
        self.revocations = Revocations(self.settings.token_ttl)
        await self.revocations.start(self.nc.jetstream())
        signer = dataclasses.replace(signer, revoked=self.revocations.is_revoked)
        self.metadata = MetadataClient(self.settings.metadata_addr)
        self._health_channel = channel(self.settings.metadata_addr)

        self._smtp = MxListener(self.settings, self.metadata, self.nc)
        self.smtp_addr = await self._smtp.start()
        self.delivery = DeliveryClient(self.settings.delivery_addr)
        tls = await asyncio.to_thread(server_context, self.settings)
        self._submission = SubmissionListener(self.settings, self.metadata, self.nc,
                                              self.delivery, tls)
        self.submission_addr = await self._submission.start()
        send = send_routes(SendDeps(self.metadata, self.delivery, self.settings))
        self.search = SearchClient(self.settings.search_addr)
        search = search_routes(SearchDeps(self.search))
        self.realtime = RealtimeClient(self.settings.realtime_addr)
        events = events_router(EventsDeps(self.realtime, signer,
                                          tuple(self.settings.events_allowed_origins),
                                          revocations=self.revocations))
        logout = logout_router(signer, self.revocations)
        throttle = LoginThrottle(self.settings.login_max_failures,
                                 self.settings.login_failure_window)
        await self._start_http(ApiDeps(self.metadata, signer, self.readiness,
                                       login_throttle=throttle,
                                       routers=(logout, events, send, search,
                                                html_router(self.metadata),
                                                senders_router(self.metadata)),
                                       pages=(pages_router(),),
                                       body_limit=body_limit(self.settings)))
        # Last: health says SERVING only once SMTP and HTTP listen.
        self._grpc = GrpcServer(self.settings.gateway_grpc_addr)
        self.grpc_addr = await self._grpc.start()
        log.info("gateway ready: smtp %s, submission %s, http %s, grpc %s",
                 self.smtp_addr, self.submission_addr, self.http_addr, self.grpc_addr)

    async def _start_http(self, deps: ApiDeps) -> None:
        sock = _listen(self.settings.http_addr)
        self.http_addr = _addr(sock)
        config = uvicorn.Config(
            build_app(deps),
            log_config=None,  # the process configures logging (mailgrid.service)
            lifespan="off",
            timeout_graceful_shutdown=int(STOP_GRACE),
            server_header=False,
            # Events are small JSON: compressing them saves little, and a deflate context
            # per connection costs hundreds of KiB for each idle WebSocket.
            ws_per_message_deflate=False,
        )
        self._http = _Uvicorn(config)
        self._http_task = asyncio.create_task(self._http.serve(sockets=[sock]))
        ready = asyncio.create_task(self._http.ready.wait())
        await asyncio.wait([self._http_task, ready], return_when=asyncio.FIRST_COMPLETED)
        if not ready.done():
            ready.cancel()
            sock.close()
            await self._http_task  # raises what stopped uvicorn
            raise RuntimeError(f"HTTP server on {self.http_addr} stopped while starting")
        log.info("HTTP API listening on %s", self.http_addr)

    async def readiness(self) -> dict[str, bool]:
        """What /readyz reports: metadata_svc answers its health check, NATS is connected."""
        return {
            "metadata": await self._metadata_serving(),
            "nats": self.nc is not None and self.nc.is_connected,
        }

    async def _metadata_serving(self) -> bool:
        if self._health_channel is None:
            return False
        stub = health_pb2_grpc.HealthStub(self._health_channel)
        try:
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=""),
                                     timeout=READY_TIMEOUT)
        except grpc.aio.AioRpcError:
            return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    async def stop(self) -> None:
        if self._grpc is not None:
            await self._grpc.health.enter_graceful_shutdown()
        if self._smtp is not None:
            await self._smtp.stop(STOP_GRACE)
            self._smtp = None
        if self._submission is not None:
            await self._submission.stop(STOP_GRACE)
            self._submission = None
        await self._stop_http()
        if self._grpc is not None:
            await self._grpc.stop(grace=1.0)
            self._grpc = None
        if self.revocations is not None:
            await self.revocations.stop()
            self.revocations = None
        if self.nc is not None:
            with contextlib.suppress(Exception):  # already closed or never connected
                await self.nc.drain()
            self.nc = None
        if self.metadata is not None:
            await self.metadata.close()
            self.metadata = None
        if self.delivery is not None:
            await self.delivery.close()
            self.delivery = None
        if self.realtime is not None:
            await self.realtime.close()
            self.realtime = None
        if self.search is not None:
            await self.search.close()
            self.search = None
        if self._health_channel is not None:
            await self._health_channel.close()
            self._health_channel = None

    async def _stop_http(self) -> None:
        if self._http is None or self._http_task is None:
            return
        self._http.should_exit = True
        try:
            await self._http_task
        except Exception:
            log.exception("HTTP server stopped with an error")
        self._http = None
        self._http_task = None


async def main(settings: Settings | None = None) -> None:
    settings = settings or Settings()
    configure_logging(settings, "gateway")
    await run_until_signalled(GatewayApp(settings))


if __name__ == "__main__":
    asyncio.run(main())
