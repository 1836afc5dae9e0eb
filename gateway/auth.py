"""Access tokens of the HTTP API: HS256 JWTs whose subject is the user id.

Every gateway instance must verify every other's tokens, so the secret comes from
settings or, when empty, from one file under data_dir that the first instance creates.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import jwt

from mailgrid.errors import Unauthenticated
from mailgrid.settings import Settings

log = logging.getLogger(__name__)

ALGORITHM = "HS256"
SECRET_BYTES = 48


class TokenMissing(Unauthenticated):
    """No bearer token at all (RFC 6750 3.1: the challenge then names no error)."""


def secret_path(settings: Settings) -> Path:
    return settings.data_dir / "secrets" / "token_secret"


def load_or_create_secret(path: Path) -> str:
    """The secret stored at ``path``; created (mode 0600) when there is none.

    O_EXCL makes concurrent first starts agree: one creates it, the others read it.
    Blocking file I/O: call it from a thread.
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    secret = secrets.token_urlsafe(SECRET_BYTES)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _read_secret(path)
    with os.fdopen(fd, "w") as out:
        out.write(secret)
        out.flush()
        os.fsync(out.fileno())
    log.info("created token secret %s", path)
    return secret


def _read_secret(path: Path) -> str:
    # Another instance may have created the file an instant ago and not yet written it.
    for _ in range(50):
        text = path.read_text().strip()
        if text:
            return text
        time.sleep(0.02)
    raise RuntimeError(f"token secret file {path} is empty")


@dataclass(frozen=True)
class Claims:
    """What a valid token says: whose it is, its id (for logout) and its expiry."""

    user_id: str
    jti: str
    expires_at: float


@dataclass(frozen=True)
class TokenSigner:
    """Issues and verifies access tokens."""

    secret: str
    ttl: int
    # jti → revoked? (gateway.revocation.Revocations.is_revoked); None: nothing revoked.
    revoked: Callable[[str], bool] | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> TokenSigner:
        """Blocking when it reads or creates the secret file: call it from a thread."""
        secret = settings.token_secret or load_or_create_secret(secret_path(settings))
        return cls(secret=secret, ttl=settings.token_ttl)

    def issue(self, user_id: str, now: float | None = None) -> str:
        issued = int(time.time() if now is None else now)
        claims = {"sub": user_id, "iat": issued, "exp": issued + self.ttl,
                  "jti": secrets.token_urlsafe(16)}
        return jwt.encode(claims, self.secret, algorithm=ALGORITHM)

    def verify(self, token: str) -> str:
        """The user id a valid token names; Unauthenticated for anything else."""
        return self.claims(token).user_id

    def claims(self, token: str) -> Claims:
        """The claims of a valid, unrevoked token; Unauthenticated for anything else."""
        try:
            claims = jwt.decode(token, self.secret, algorithms=[ALGORITHM],
                                options={"require": ["sub", "exp"]})
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("the access token has expired") from None
        except jwt.PyJWTError:
            raise Unauthenticated("the access token is not valid") from None
        user_id = claims.get("sub")
        if not isinstance(user_id, str) or not user_id:
            raise Unauthenticated("the access token is not valid")
        jti = claims.get("jti")
        jti = jti if isinstance(jti, str) else ""
        if jti and self.revoked is not None and self.revoked(jti):
            raise Unauthenticated("the access token has been revoked (logged out)")
        return Claims(user_id=user_id, jti=jti, expires_at=float(claims["exp"]))
