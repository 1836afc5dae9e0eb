"""Cheap per-connection setup and teardown of aiosmtpd's SMTP protocol object.

aiosmtpd 1.4.6 builds one SMTP object per connection, and its ``__init__`` introspects
the object and the handler every time: ``inspect.getmembers`` of both for ``auth_*``
methods, ``dir`` of both for ``handle_*`` hooks and ``smtp_*`` commands,
``inspect.signature`` of ``handle_EHLO`` -- about a millisecond of CPU per connection,
more than the rest of a small message's session. ``QuickSetupSMTP`` still runs
aiosmtpd's ``__init__`` (every attribute it sets stays its business) but:

- while it runs, ``dir(self)`` lists only the ``auth_*`` names of the class, computed
  once per class, so its ``inspect.getmembers`` of ``self`` binds only those; the
  ``smtp_*`` command table is built afterwards from the names also found once per class;
- it is given a stand-in handler with nothing on it, and the handler's part is done
  afterwards as aiosmtpd does it, from the names ``dir(handler)`` would list, found once
  per handler class and set of instance attributes (so hooks set on the handler object
  are seen as before), and the EHLO hook's signature looked at once per function.

Once a connection is over, the object lets go of what refers back to it (``_release``),
so that it is freed at once instead of by the cycle collector.

tests/unit/test_gateway_smtp_setup.py builds each protocol class both ways and asserts
the same instance attributes, so an aiosmtpd whose ``__init__`` changes fails there
(aiosmtpd is pinned in pyproject.toml).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import Iterable
from typing import Any, ClassVar
from warnings import warn

from aiosmtpd.smtp import SMTP, _AuthMechAttr

# What aiosmtpd's __init__ looks for on the protocol object.
_PROTOCOL_PREFIXES = ("auth_", "smtp_")


class _NoHooks:
    """A handler aiosmtpd's introspection finds nothing on, at no cost."""

    def __dir__(self) -> list[str]:
        return []


_NO_HOOKS = _NoHooks()


@functools.cache
def _protocol_names(cls: type, prefix: str) -> tuple[str, ...]:
    """The names with ``prefix`` aiosmtpd's ``__init__`` would pick out of ``dir(obj)``
    for an object of class ``cls``."""
    return tuple(n for n in dir(cls) if n.startswith(prefix))


@functools.cache
def _ehlo_params(func: Any, bound: bool) -> int:
    """How many parameters aiosmtpd's ``inspect.signature`` sees on a handle_EHLO."""
    return len(inspect.signature(func).parameters) - (1 if bound else 0)


def _auth_and_hooks(names: Iterable[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The ``auth_*`` and the ``handle_*`` names among ``names``, in their order."""
    listed = list(names)
    return (tuple(n for n in listed if n.startswith("auth_")),
            tuple(n for n in listed if n.startswith("handle_")))


@functools.cache
def _hook_names(cls: type, own: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``_auth_and_hooks`` of ``dir(handler)`` for a handler of class ``cls`` whose
    instance attributes are ``own``."""
    return _auth_and_hooks(sorted({*dir(cls), *own}))


def _handler_names(handler: Any) -> tuple[tuple[str, ...], tuple[str, ...]]:
    cls: Any = type(handler)
    if cls.__dir__ is not object.__dir__:  # a dir() of its own: ask it every time
        return _auth_and_hooks(dir(handler))
    return _hook_names(cls, tuple(getattr(handler, "__dict__", ())))


def ehlo_hook_version(hook: Any) -> str:
    """aiosmtpd's ``_ehlo_hook_ver`` for ``hook``: "new" (5 parameters) or "old" (4)."""
    func = getattr(hook, "__func__", None)
    count = _ehlo_params(func, True) if func is not None else len(
        inspect.signature(hook).parameters)
    if count == 4:
        warn("Use the 5-argument handle_EHLO() hook instead of the 4-argument "
             "handle_EHLO() hook; support for the 4-argument handle_EHLO() hook will be "
             "removed in version 2.0", DeprecationWarning, stacklevel=3)
        return "old"
    if count == 5:
        return "new"
    raise RuntimeError("Unsupported EHLO Hook")


def _mechanism(name: str, method: Any) -> str:
    default = name.replace("auth_", "").replace("__", "-")
    return str(getattr(method, "__auth_mechanism_name__", default))


class QuickSetupSMTP(SMTP):
    """aiosmtpd's SMTP whose construction reuses the introspection of its class."""

    # False: aiosmtpd's own __init__, untouched (the tests compare both ways).
    quick_setup: ClassVar[bool] = True

    def __init__(self, handler: Any, **options: Any) -> None:
        if not self.quick_setup:
            super().__init__(handler, **options)
            return
        cls: type = type(self)
        own = [n for n in vars(self) if n.startswith(_PROTOCOL_PREFIXES)]
        self.__dict__["_quick_dir"] = [*_protocol_names(cls, "auth_"),
                                       *(n for n in own if n.startswith("auth_"))]
        try:
            super().__init__(_NO_HOOKS, **options)
        finally:
            del self.__dict__["_quick_dir"]
        commands = sorted([*_protocol_names(cls, "smtp_"),
                           *(n for n in own if n.startswith("smtp_"))])
        self._smtp_methods = {n.replace("smtp_", ""): getattr(self, n) for n in commands}
        self.event_handler = handler
        self._add_handler(handler, options.get("auth_exclude_mechanism"))

    def connection_lost(self, error: Exception | None) -> None:
        super().connection_lost(error)
        task = self._handler_coroutine
        if task is not None:  # aiosmtpd has just cancelled it; it ends on the next turn
            task.add_done_callback(self._release)

    def _release(self, task: asyncio.Task[None]) -> None:
        """Drops what refers back to this object once its session is over, so that
        reference counting frees it then and there.

        Its command and AUTH tables hold methods bound to it, the stream writer and the
        connection callback point back at it, and its session task (with the
        cancellation's traceback through the task's frames) does too: every connection
        left some 55 objects in reference cycles that only the cycle collector could
        free. With a session every few milliseconds that collector ran constantly,
        walking each session's garbage and every other live object: 0.34 s of the
        gateway's CPU per 5,000 messages (0.03 s after this).
        """
        self._handler_coroutine = None
        self._smtp_methods = {}
        self._auth_methods = {}
        self._client_connected_cb = None
        self._writer = None  # type: ignore[assignment]  # the session is over

    def __dir__(self) -> Iterable[str]:
        names: list[str] | None = self.__dict__.get("_quick_dir")
        return names if names is not None else super().__dir__()

    def _add_handler(self, handler: Any, exclude: Iterable[str] | None) -> None:
        """What aiosmtpd's ``__init__`` takes from the handler, done as it does it."""
        auth_names, hook_names = _handler_names(handler)
        # A handler's AUTH mechanism replaces a built-in one of the same name.
        for name in auth_names:
            try:
                method = getattr(handler, name)
            except AttributeError:  # as inspect.getmembers skips it
                continue
            self._auth_methods[_mechanism(name, method)] = _AuthMechAttr(
                method, handler is self)
        for mechanism in exclude or ():
            self._auth_methods.pop(mechanism, None)
        self._handle_hooks = {n.replace("handle_", ""): getattr(handler, n)
                              for n in hook_names}
        ehlo_hook = self._handle_hooks.get("EHLO")
        self._ehlo_hook_ver = None if ehlo_hook is None else ehlo_hook_version(ehlo_hook)
