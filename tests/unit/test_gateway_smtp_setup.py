"""The cheap per-connection setup (gateway.smtp_setup) builds the same protocol object
as aiosmtpd's own ``__init__``: every instance attribute equal, but the per-connection
objects (stream reader, futures). An aiosmtpd whose ``__init__`` looks for more, or
differently, fails here."""

from __future__ import annotations

import asyncio
import ssl
import types
from typing import Any, TypeVar, cast

import pytest
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, Session, auth_mechanism

from gateway.smtp import MxHandler, MxSMTP
from gateway.smtp_setup import QuickSetupSMTP
from gateway.submission import AuthGuard, SubmissionHandler, SubmissionSMTP
from mailgrid.settings import Settings

# Objects each connection gets afresh (asyncio.StreamReaderProtocol's reader and its
# "closed" future): present both ways, never equal.
PER_CONNECTION = {"_stream_reader_wr", "_strong_reader", "_closed"}
SELF = "<the protocol object>"
T = TypeVar("T")
SESSIONS: set[MxSMTP] = set()


def on_data_done() -> None:
    pass


class OldMx(MxSMTP):
    quick_setup = False


class OldSubmission(SubmissionSMTP):
    quick_setup = False


class RichHandler:
    """A handler with everything aiosmtpd's __init__ looks for."""

    async def handle_EHLO(self, server: SMTP, session: Session, envelope: Envelope,
                          hostname: str, responses: list[str]) -> list[str]:
        return responses

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        return "250 OK"

    async def auth_X_TOKEN__V2(self, server: SMTP, args: list[str]) -> AuthResult:
        return AuthResult(success=False)

    @auth_mechanism("FANCY")
    async def auth_fancy(self, server: SMTP, args: list[str]) -> AuthResult:
        return AuthResult(success=False)

    async def auth_PLAIN(self, server: SMTP, args: list[str]) -> AuthResult:
        return AuthResult(success=False)  # replaces the built-in PLAIN


def comparable(value: Any, protocol: SMTP) -> Any:
    """``value`` with methods bound to ``protocol`` made independent of the instance."""
    if isinstance(value, types.MethodType):
        owner = SELF if value.__self__ is protocol else value.__self__
        return ("method", value.__func__, owner)
    if isinstance(value, dict):
        return {k: comparable(v, protocol) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(comparable(v, protocol) for v in value)
    if isinstance(value, list):
        return [comparable(v, protocol) for v in value]
    return value


def assert_same_attributes(old: SMTP, new: SMTP) -> None:
    assert type(new) is not type(old) and isinstance(new, QuickSetupSMTP)
    assert set(vars(old)) == set(vars(new))
    for name in vars(old):
        if name in PER_CONNECTION:
            continue
        assert comparable(vars(old)[name], old) == comparable(vars(new)[name], new), name
        if isinstance(vars(old)[name], dict):  # aiosmtpd's tables: the same order too
            assert list(vars(old)[name]) == list(vars(new)[name]), name
    assert dir(old) == dir(new)  # dir() is the usual one again after __init__


def bare(cls: type[T]) -> T:
    """A handler of ``cls`` without its clients: only its hooks matter here."""
    return cls.__new__(cls)


def mx(cls: type[MxSMTP], handler: Any, settings: Settings) -> MxSMTP:
    return cls(handler, settings, asyncio.get_running_loop(), SESSIONS, on_data_done)


async def test_an_mx_protocol_is_set_up_as_aiosmtpd_sets_it_up(settings: Settings) -> None:
    handler = bare(MxHandler)
    new = mx(MxSMTP, handler, settings)
    assert_same_attributes(mx(OldMx, handler, settings), new)
    assert set(new._handle_hooks) >= {"EHLO", "MAIL", "RCPT", "DATA", "QUIT"}
    assert new._ehlo_hook_ver == "new"
    assert new.event_handler is handler


async def test_a_handlers_auth_mechanisms_and_instance_hooks_are_found(
        settings: Settings) -> None:
    handler = RichHandler()
    assert "NOOP" not in mx(MxSMTP, handler, settings)._handle_hooks

    async def handle_NOOP(server: SMTP, session: Session, envelope: Envelope,
                          arg: str) -> str:
        return "250 OK"

    # A hook on the object, not its class, set after a first connection: the names
    # found for the handler then are not reused.
    vars(handler)["handle_NOOP"] = handle_NOOP
    new = mx(MxSMTP, handler, settings)
    assert_same_attributes(mx(OldMx, handler, settings), new)
    assert list(new._auth_methods) == ["LOGIN", "PLAIN", "X_TOKEN-V2", "FANCY"]
    assert new._auth_methods["PLAIN"].is_builtin is False
    assert new._handle_hooks["NOOP"] is handle_NOOP


class ListedHandler(RichHandler):
    """A handler whose hooks are only what its own ``dir()`` lists."""

    def __dir__(self) -> list[str]:
        return ["handle_DATA", "auth_PLAIN"]


async def test_a_handler_with_a_dir_of_its_own_is_asked_on_every_connection(
        settings: Settings) -> None:
    handler = ListedHandler()
    new = mx(MxSMTP, handler, settings)
    assert_same_attributes(mx(OldMx, handler, settings), new)
    assert list(new._handle_hooks) == ["DATA"]
    assert new._auth_methods["PLAIN"].is_builtin is False


async def test_excluded_auth_mechanisms_stay_excluded(settings: Settings) -> None:
    handler = RichHandler()
    options = {"auth_exclude_mechanism": ["PLAIN", "FANCY"]}
    loop = asyncio.get_running_loop()
    old = OldMx(cast(Any, handler), settings, loop, SESSIONS, on_data_done, **options)
    new = MxSMTP(cast(Any, handler), settings, loop, SESSIONS, on_data_done, **options)
    assert_same_attributes(old, new)
    assert list(new._auth_methods) == ["LOGIN", "X_TOKEN-V2"]


async def test_a_submission_protocol_is_set_up_as_aiosmtpd_sets_it_up(
        settings: Settings) -> None:
    handler = bare(SubmissionHandler)
    handler.metadata = cast(Any, None)  # SubmissionSMTP keeps the handler's client
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    guard = AuthGuard(3, 60.0)
    loop = asyncio.get_running_loop()
    old = OldSubmission(handler, settings, loop, SESSIONS, on_data_done, tls, guard)
    new = SubmissionSMTP(handler, settings, loop, SESSIONS, on_data_done, tls, guard)
    assert_same_attributes(old, new)
    # Its own auth_PLAIN/auth_LOGIN (checked against metadata_svc), found on the class.
    assert {m: cast(Any, a.method).__func__ for m, a in new._auth_methods.items()} == {
        "LOGIN": SubmissionSMTP.auth_LOGIN, "PLAIN": SubmissionSMTP.auth_PLAIN}
    assert new._smtp_methods["AUTH"].__func__ is SubmissionSMTP.smtp_AUTH


async def test_an_old_style_ehlo_hook_is_still_recognised_with_its_warning(
        settings: Settings) -> None:
    class OldEhlo:
        async def handle_EHLO(self, server: SMTP, session: Session, envelope: Envelope,
                              hostname: str) -> str:
            return "250 ok"

    with pytest.warns(DeprecationWarning, match="5-argument handle_EHLO"):
        new = mx(MxSMTP, OldEhlo(), settings)
    assert new._ehlo_hook_ver == "old"
