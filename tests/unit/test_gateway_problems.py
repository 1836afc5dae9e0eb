"""Problem+json for failures the integration tests cannot provoke on purpose."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from gateway.auth import TokenSigner
from gateway.http_api import ApiDeps, build_app
from gateway.problems import from_error
from mailgrid.clients import MetadataClient
from mailgrid.errors import MailgridError, NotFound, StorageFull, Unavailable

SIGNER = TokenSigner(secret="s" * 40, ttl=60)


async def broken_readiness() -> dict[str, bool]:
    raise RuntimeError("secret internals /etc/passwd")


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    # The channel is never used by these requests: no connection is made.
    metadata = MetadataClient("127.0.0.1:9")
    app = build_app(ApiDeps(metadata, SIGNER, broken_readiness), max_body=1000)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
        yield client
    await metadata.close()


async def test_an_unexpected_exception_is_a_500_problem_without_details(
        http: httpx.AsyncClient) -> None:
    reply = await http.get("/readyz")
    assert reply.status_code == 500
    assert reply.headers["content-type"] == "application/problem+json"
    assert reply.json() == {"type": "about:blank", "title": "Internal Server Error",
                            "status": 500, "detail": "Internal error."}


async def test_a_streamed_body_over_the_limit_is_413(http: httpx.AsyncClient) -> None:
    async def body() -> AsyncIterator[bytes]:
        for _ in range(5):
            yield b'{"address": "' + b"a" * 400

    reply = await http.post("/v1/auth/token", content=body(),
                            headers={"Content-Type": "application/json"})
    assert reply.status_code == 413
    assert reply.headers["content-type"] == "application/problem+json"
    assert reply.json()["type"] == "urn:mailgrid:problem:too-large"


def test_not_found_says_nothing_about_the_resource() -> None:
    reply = from_error(NotFound("message 123 belongs to user 456"))
    assert reply.status_code == 404
    assert b"456" not in reply.body


@pytest.mark.parametrize("err", [Unavailable("nats down"), StorageFull("disk full")])
def test_503s_carry_retry_after(err: MailgridError) -> None:
    reply = from_error(err)
    assert reply.status_code == 503
    assert reply.headers["retry-after"] == "5"


def test_internal_errors_hide_their_detail() -> None:
    reply = from_error(MailgridError("sqlite said something private"))
    assert reply.status_code == 500
    assert b"private" not in reply.body
