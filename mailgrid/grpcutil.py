"""What every gRPC service and client shares: bootstrap, error mapping, channels."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ParamSpec, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from mailgrid.errors import MailgridError, Unavailable, from_grpc

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

# Bodies travel in 1 MiB chunks, well under gRPC's 4 MiB message limit.
CHUNK_SIZE = 1024 * 1024
GRACE_SECONDS = 5.0


def rpc(method: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """Turns MailgridError into its gRPC status; anything else into INTERNAL, logged.

    The client never sees a stack trace, only a status code and a one-line detail.
    """

    @functools.wraps(method)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        context: grpc.aio.ServicerContext[Any, Any] = args[2]  # type: ignore[assignment]
        try:
            return await method(*args, **kwargs)
        except MailgridError as err:
            await context.abort(err.grpc_code, err.detail)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception:
            log.exception("unhandled error in %s", method.__qualname__)
            await context.abort(grpc.StatusCode.INTERNAL, "internal error")
        raise AssertionError("unreachable: abort raises")

    return wrapper


class _HandlerRecorder:
    """Stands in for the server while a generated ``add_*_to_server`` runs, to keep the
    method handlers it builds."""

    def __init__(self) -> None:
        self.service = ""
        self.handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}

    def add_generic_rpc_handlers(self, handlers: object) -> None:
        pass

    def add_registered_method_handlers(
            self, service: str, handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]) -> None:
        self.service, self.handlers = service, dict(handlers)


def with_prebuilt_replies(register: Callable[[Any, Any], None], methods: set[str]
                          ) -> Callable[[Any, grpc.aio.Server], None]:
    """``register`` (a generated ``add_*_to_server``) for a servicer whose unary
    ``methods`` may return their reply already serialized, as bytes joined on the wire
    (mailgrid.wire): such bytes are sent as they are, a message is serialized as usual."""

    def add(servicer: Any, server: grpc.aio.Server) -> None:
        recorder = _HandlerRecorder()
        register(servicer, recorder)
        for name in methods:
            handler = recorder.handlers[name]
            assert handler.unary_unary is not None, f"{name} is not a unary method"
            recorder.handlers[name] = grpc.unary_unary_rpc_method_handler(
                handler.unary_unary, request_deserializer=handler.request_deserializer,
                response_serializer=_bytes_or(handler.response_serializer))
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(recorder.service, recorder.handlers),))
        server.add_registered_method_handlers(recorder.service, recorder.handlers)

    return add


def _bytes_or(serialize: Callable[[Any], bytes] | None) -> Callable[[Any], bytes]:
    assert serialize is not None, "a generated handler always has a serializer"

    def serializer(reply: Any) -> bytes:
        return reply if isinstance(reply, bytes) else serialize(reply)

    return serializer


def rpc_stream(
    method: Callable[P, AsyncIterator[R]],
) -> Callable[P, AsyncIterator[R]]:
    """``rpc`` for server-streaming methods (async generators)."""

    @functools.wraps(method)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> AsyncIterator[R]:
        context: grpc.aio.ServicerContext[Any, Any] = args[2]  # type: ignore[assignment]
        try:
            async for item in method(*args, **kwargs):
                yield item
        except MailgridError as err:
            await context.abort(err.grpc_code, err.detail)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception:
            log.exception("unhandled error in %s", method.__qualname__)
            await context.abort(grpc.StatusCode.INTERNAL, "internal error")

    return wrapper


async def call(coro: Awaitable[R]) -> R:
    """Awaits an RPC and raises the MailgridError its status stands for."""
    try:
        return await coro
    except grpc.aio.AioRpcError as err:
        raise from_grpc(err.code(), err.details()) from None


async def stream(responses: Any) -> AsyncIterator[Any]:
    """Iterates a server-streaming RPC, raising MailgridError on failure."""
    try:
        async for item in responses:
            yield item
    except grpc.aio.AioRpcError as err:
        raise from_grpc(err.code(), err.details()) from None


def channel(target: str) -> grpc.aio.Channel:
    """A client channel to another mailgrid service (plaintext on the internal network)."""
    return grpc.aio.insecure_channel(
        target,
        options=[
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.enable_retries", 1),
            ("grpc.max_receive_message_length", 16 * CHUNK_SIZE),
        ],
    )


@dataclass
class GrpcServer:
    """A grpc.aio server with health and reflection, started and stopped gracefully.

    ``add`` registers a servicer; ``start`` binds and returns the bound address;
    ``stop`` flips health to NOT_SERVING first, so balancers drain, then stops.
    """

    addr: str
    service_names: list[str] = field(default_factory=list)
    server: grpc.aio.Server = field(init=False)
    health: health.aio.HealthServicer = field(init=False)
    bound_addr: str = field(init=False, default="")

    def __post_init__(self) -> None:
        self.server = grpc.aio.server(
            options=[("grpc.max_receive_message_length", 16 * CHUNK_SIZE)]
        )
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)

    def add(self, register: Callable[[Any, grpc.aio.Server], None], servicer: Any,
            full_name: str) -> None:
        register(servicer, self.server)
        self.service_names.append(full_name)

    async def start(self) -> str:
        names: Iterable[str] = (
            *self.service_names,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        )
        reflection.enable_server_reflection(tuple(names), self.server)
        host = self.addr.rpartition(":")[0]
        port = self.server.add_insecure_port(self.addr)
        if port == 0:
            raise Unavailable(f"cannot listen on {self.addr}")
        self.bound_addr = f"{host}:{port}"
        await self.server.start()
        for name in ("", *self.service_names):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("gRPC listening on %s", self.bound_addr)
        return self.bound_addr

    async def stop(self, grace: float = GRACE_SECONDS) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)


async def wait_healthy(target: str, timeout: float = 30.0, service: str = "") -> None:
    """Polls grpc.health.v1 at ``target`` until it answers SERVING."""
    deadline = asyncio.get_running_loop().time() + timeout
    async with channel(target) as chan:
        stub = health_pb2_grpc.HealthStub(chan)
        while True:
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=service),
                                         timeout=2.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            if asyncio.get_running_loop().time() > deadline:
                raise Unavailable(f"{target} did not become healthy in {timeout:.0f}s")
            await asyncio.sleep(0.1)
