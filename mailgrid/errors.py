"""One error table for every interface.

Each error knows its gRPC status code, HTTP status and SMTP reply, so a failure deep in a
service reaches an SMTP client, an HTTP client or another service as the same precise
answer. Services raise these; the gRPC layer turns them into status codes and the client
wrappers turn status codes back into these.
"""

from __future__ import annotations

from typing import ClassVar

import grpc


class MailgridError(Exception):
    """Base of every error a client of mailgrid may see."""

    grpc_code: ClassVar[grpc.StatusCode] = grpc.StatusCode.INTERNAL
    http_status: ClassVar[int] = 500
    title: ClassVar[str] = "Internal error"
    # SMTP reply code and enhanced status code (RFC 3463).
    smtp_reply: ClassVar[tuple[int, str]] = (451, "4.3.0")

    def __init__(self, detail: str = "") -> None:
        super().__init__(detail or self.title)
        self.detail = detail or self.title

    def smtp(self, text: str | None = None) -> str:
        code, enhanced = self.smtp_reply
        return f"{code} {enhanced} {text or self.detail}"


class InvalidArgument(MailgridError):
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT
    http_status = 400
    title = "Invalid request"
    smtp_reply = (501, "5.5.4")


class NotFound(MailgridError):
    grpc_code = grpc.StatusCode.NOT_FOUND
    http_status = 404
    title = "Not found"
    smtp_reply = (550, "5.1.1")


class AlreadyExists(MailgridError):
    grpc_code = grpc.StatusCode.ALREADY_EXISTS
    http_status = 409
    title = "Already exists"
    smtp_reply = (550, "5.1.0")


class Unauthenticated(MailgridError):
    grpc_code = grpc.StatusCode.UNAUTHENTICATED
    http_status = 401
    title = "Authentication required"
    smtp_reply = (535, "5.7.8")


class PermissionDenied(MailgridError):
    grpc_code = grpc.StatusCode.PERMISSION_DENIED
    http_status = 403
    title = "Forbidden"
    smtp_reply = (550, "5.7.1")


class TooLarge(MailgridError):
    grpc_code = grpc.StatusCode.OUT_OF_RANGE
    http_status = 413
    title = "Too large"
    smtp_reply = (552, "5.3.4")


class QuotaExceeded(MailgridError):
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    http_status = 507
    title = "Mailbox full"
    smtp_reply = (452, "4.2.2")


class Unavailable(MailgridError):
    """A dependency is down or overloaded: try again later."""

    grpc_code = grpc.StatusCode.UNAVAILABLE
    http_status = 503
    title = "Service unavailable"
    smtp_reply = (451, "4.3.0")


class StorageFull(MailgridError):
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    http_status = 503
    title = "Storage full"
    smtp_reply = (452, "4.3.1")


_BY_GRPC_CODE: dict[grpc.StatusCode, type[MailgridError]] = {
    cls.grpc_code: cls
    for cls in (InvalidArgument, NotFound, AlreadyExists, Unauthenticated,
                PermissionDenied, TooLarge, QuotaExceeded, Unavailable)
}
# RESOURCE_EXHAUSTED carries two errors; the detail prefix tells them apart.
_STORAGE_FULL_PREFIX = "storage full"


def from_grpc(code: grpc.StatusCode, details: str | None) -> MailgridError:
    """The error a failed RPC stands for (DEADLINE_EXCEEDED counts as Unavailable)."""
    detail = details or ""
    storage_full = detail.lower().startswith(_STORAGE_FULL_PREFIX)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and storage_full:
        return StorageFull(detail)
    if code in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
        return Unavailable(detail or "the service did not answer in time")
    cls = _BY_GRPC_CODE.get(code, MailgridError)
    return cls(detail)
