"""Login throttling and logout for the HTTP API.

- ``LoginThrottle``: failed logins are counted per client IP and per address within a
  sliding window; once either reaches the limit, POST /v1/auth/token answers 429 with
  Retry-After *before* looking at the password, so guessing stops paying. The counts
  live in each gateway's memory: with N instances behind a balancer, an attacker gets
  at most N times the budget (documented in docs/SECURITY.md).
- POST /v1/auth/logout revokes the request's token (gateway.revocation): every gateway
  refuses it from then on, and its WebSocket closes.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException

from gateway.auth import TokenMissing, TokenSigner
from gateway.revocation import Revocations

# Most keys (IPs and addresses) whose failures are remembered; the oldest go first.
MAX_TRACKED = 100_000


class LoginThrottle:
    """Failed logins per client IP and per address (lower case), in a sliding window."""

    def __init__(self, max_failures: int, window: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_failures = max_failures
        self.window = window
        self.clock = clock
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def check(self, ip: str, address: str) -> None:
        """Raises 429 (with Retry-After) while the IP or the address is blocked."""
        wait = max(self._wait(f"ip:{ip}"), self._wait(f"to:{address.lower()}"))
        if wait > 0:
            raise HTTPException(429, "Too many failed logins; try again later.",
                                headers={"Retry-After": str(math.ceil(wait))})

    def failed(self, ip: str, address: str) -> None:
        for key in (f"ip:{ip}", f"to:{address.lower()}"):
            self._recent(key).append(self.clock())
            self._failures.move_to_end(key)
        while len(self._failures) > MAX_TRACKED:
            self._failures.popitem(last=False)

    def succeeded(self, address: str) -> None:
        # Only the address's count: a valid login of one account must not buy an IP
        # more guesses at others.
        self._failures.pop(f"to:{address.lower()}", None)

    def _wait(self, key: str) -> float:
        """Seconds until ``key`` may try again; 0 when it may now."""
        if self.max_failures <= 0:
            return 0.0
        times = self._recent(key)
        if len(times) < self.max_failures:
            return 0.0
        return times[-self.max_failures] + self.window - self.clock()

    def _recent(self, key: str) -> deque[float]:
        times = self._failures.setdefault(key, deque())
        horizon = self.clock() - self.window
        while times and times[0] < horizon:
            times.popleft()
        return times


def client_ip(request: Request) -> str:
    return request.client.host if request.client is not None else ""


_BEARER = HTTPBearer(auto_error=False, description="A token from POST /v1/auth/token")


def logout_router(signer: TokenSigner, revocations: Revocations) -> APIRouter:
    router = APIRouter(tags=["auth"])

    @router.post("/auth/logout", status_code=204, responses={
        401: {"description": "Missing, invalid, expired or already revoked token"},
        503: {"description": "The revocation could not be recorded; retry"}})
    async def logout(credentials: Annotated[HTTPAuthorizationCredentials | None,
                                            Depends(_BEARER)]) -> Response:
        """Revokes the request's token on every gateway; its WebSocket closes."""
        if credentials is None:
            raise TokenMissing("an Authorization: Bearer token is required")
        claims = signer.claims(credentials.credentials)
        if claims.jti:
            await revocations.revoke(claims.jti, claims.expires_at)
        return Response(status_code=204)

    return router
