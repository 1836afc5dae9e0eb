"""Access tokens and the shared token secret."""

from __future__ import annotations

import stat
import time
from pathlib import Path

import jwt
import pytest

from gateway.auth import TokenSigner, load_or_create_secret, secret_path
from mailgrid.errors import Unauthenticated
from mailgrid.settings import Settings


def test_a_token_names_its_user() -> None:
    signer = TokenSigner(secret="s" * 40, ttl=60)
    assert signer.verify(signer.issue("user-1")) == "user-1"


def test_an_expired_token_is_refused() -> None:
    signer = TokenSigner(secret="s" * 40, ttl=60)
    token = signer.issue("user-1", now=time.time() - 3600)
    with pytest.raises(Unauthenticated, match="expired"):
        signer.verify(token)


def test_a_token_signed_with_another_secret_is_refused() -> None:
    token = TokenSigner(secret="a" * 40, ttl=60).issue("user-1")
    with pytest.raises(Unauthenticated):
        TokenSigner(secret="b" * 40, ttl=60).verify(token)


@pytest.mark.parametrize("token", [
    "",
    "not.a.jwt",
    jwt.encode({"sub": "u"}, "s" * 40, algorithm="HS256"),              # no exp
    jwt.encode({"exp": time.time() + 60}, "s" * 40, algorithm="HS256"),  # no sub
    jwt.encode({"sub": "u", "exp": time.time() + 60}, None, algorithm="none"),
])
def test_malformed_or_unsigned_tokens_are_refused(token: str) -> None:
    with pytest.raises(Unauthenticated):
        TokenSigner(secret="s" * 40, ttl=60).verify(token)


def test_the_secret_file_is_created_once_private_and_then_reused(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, token_secret="")
    first = TokenSigner.from_settings(settings)
    second = TokenSigner.from_settings(settings)
    assert first.secret == second.secret
    assert len(first.secret) >= 32
    mode = stat.S_IMODE(secret_path(settings).stat().st_mode)
    assert mode == 0o600


def test_a_configured_secret_wins_over_the_file(tmp_path: Path) -> None:
    load_or_create_secret(tmp_path / "secrets" / "token_secret")
    settings = Settings(data_dir=tmp_path, token_secret="configured-" + "x" * 30)
    assert TokenSigner.from_settings(settings).secret == settings.token_secret
