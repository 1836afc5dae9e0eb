"""mailgrid.v1.DeliveryService: what the queues hold, for operators and the CLI."""

from __future__ import annotations

from typing import Any

import grpc
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from delivery_svc.queue_ops import QueueOpsServicer
from delivery_svc.submit import Submitter
from mailgrid import bus
from mailgrid.errors import Unavailable
from mailgrid.grpcutil import rpc
from mailgrid.v1 import delivery_pb2, delivery_pb2_grpc

Context = grpc.aio.ServicerContext[Any, Any]


class DeliveryServicer(QueueOpsServicer, delivery_pb2_grpc.DeliveryServiceServicer):
    def __init__(self, js: JetStreamContext, submitter: Submitter | None = None) -> None:
        self.js = js
        self.submitter = submitter

    @rpc
    async def SubmitMessage(self, request: delivery_pb2.SubmitMessageRequest,
                            context: Context) -> delivery_pb2.SubmitMessageResponse:
        if self.submitter is None:
            raise Unavailable("this delivery_svc does not accept submissions")
        return await self.submitter.submit(request)

    @rpc
    async def GetQueueStats(self, request: delivery_pb2.GetQueueStatsRequest,
                            context: Context) -> delivery_pb2.GetQueueStatsResponse:
        reply = delivery_pb2.GetQueueStatsResponse()
        for spec in bus.STREAMS:
            reply.queues.append(await queue_stats(self.js, spec.name))
        return reply


async def queue_stats(js: JetStreamContext, stream: str) -> delivery_pb2.QueueStats:
    """Counts of one stream and its consumers.

    pending is the backlog of the furthest-behind consumer (the whole stream when none
    reads it); pending_ack and redelivered add up over the consumers.
    """
    try:
        info = await js.stream_info(stream)
        consumers = await js.consumers_info(stream)
    except NotFoundError:
        return delivery_pb2.QueueStats(stream=stream)
    except Exception as err:  # timeouts, no responders, connection loss
        raise Unavailable(f"cannot read stream {stream}: {err}") from err
    messages = int(info.state.messages)
    pending = max((int(c.num_pending or 0) for c in consumers), default=messages)
    return delivery_pb2.QueueStats(
        stream=stream,
        messages=messages,
        bytes=int(info.state.bytes),
        pending=pending,
        pending_ack=sum(int(c.num_ack_pending or 0) for c in consumers),
        redelivered=sum(int(c.num_redelivered or 0) for c in consumers),
    )
