"""aiosmtpd's idle timeout, re-armed lazily.

aiosmtpd 1.4.6 re-arms a session's idle timer for every command it reads: it cancels the
timer and makes a new one (``loop.call_later``), eight times for a small message, and the
cancelled timers stay in the event loop's heap until they come due or the loop sweeps
them. ``LazyTimeoutSMTP`` keeps one timer per session: re-arming only moves a deadline
forward, and the timer, should it fire before the deadline, sets itself again for the
rest. It is re-made only when a deadline comes earlier than the timer (the DATA deadline
shorter than the idle timeout, say). When the timeout comes, it is aiosmtpd's (or a
subclass's) ``_timeout_cb`` that runs, as before.
"""

from __future__ import annotations

from aiosmtpd.smtp import SMTP

# A timer that fires this close to its deadline counts as on time (the event loop runs
# timers up to its clock resolution early).
_EARLY = 0.001


class LazyTimeoutSMTP(SMTP):
    _deadline = 0.0

    def _reset_timeout(self, duration: float | None = None) -> None:
        deadline = self.loop.time() + (duration or self._timeout_duration)
        self._deadline = deadline
        handle = self._timeout_handle
        if handle is None or handle.cancelled() or handle.when() > deadline:
            if handle is not None:
                handle.cancel()
            self._timeout_handle = self.loop.call_at(deadline, self._timer_fired)

    def _timer_fired(self) -> None:
        if self._deadline - self.loop.time() > _EARLY:  # re-armed since: not yet
            self._timeout_handle = self.loop.call_at(self._deadline, self._timer_fired)
            return
        self._timeout_cb()  # type: ignore[no-untyped-call]  # aiosmtpd's is untyped
