"""The services of the suite, in start order: one row each.

The launcher starts them in this order (each healthy before the next), `mailgrid serve
NAME` runs one, and each row names the settings of its listeners; the first listener is
its gRPC address (grpc.health.v1 and reflection).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServiceSpec:
    name: str
    module: str
    app_class: str
    # Settings fields of the listeners it binds; the first is its gRPC address.
    listeners: tuple[str, ...]
    # Settings field of the CPU niceness `mailgrid serve` runs it at (queued work that
    # yields to the SMTP sessions when CPU is short); empty: the launcher's own.
    nice_setting: str = ""

    @property
    def grpc_setting(self) -> str:
        return self.listeners[0]


SERVICES: tuple[ServiceSpec, ...] = (
    ServiceSpec("metadata", "metadata_svc.app", "MetadataApp", ("metadata_addr",)),
    ServiceSpec("delivery", "delivery_svc.app", "DeliveryApp", ("delivery_addr",),
                nice_setting="delivery_nice"),
    ServiceSpec("realtime", "realtime_svc.app", "RealtimeApp", ("realtime_addr",)),
    ServiceSpec("search", "search_svc.app", "SearchApp", ("search_addr",),
                nice_setting="search_nice"),
    ServiceSpec("gateway", "gateway.app", "GatewayApp",
                ("gateway_grpc_addr", "http_addr", "smtp_addr", "submission_addr")),
)

BY_NAME: dict[str, ServiceSpec] = {spec.name: spec for spec in SERVICES}
