"""Who may use ``leukotree serve`` when it has a token: the ``Bearer`` header, login
sessions and login throttling.

- A request carries ``Authorization: Bearer <token>`` (the scheme word is required) or
  the cookie of a session opened at ``/login``. Tokens are compared in constant time
  (``hmac.compare_digest`` of their SHA-256 digests, so neither the content nor the
  length leaks through timing).
- A session id is random (``secrets.token_urlsafe``, 256 bits) and lives in the server's
  memory only: it expires :data:`SESSION_IDLE` seconds after its last use and
  :data:`SESSION_MAX` seconds after login, ends at ``/logout``, and a restart ends all.
- Logins are throttled per client address: after :data:`MAX_FAILURES` wrong tokens within
  :data:`FAILURE_WINDOW` seconds, the next attempts are refused (429) until the window
  has passed.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections.abc import Callable

#: The session cookie's name.
COOKIE = "leukotree_session"
#: A session ends after this many seconds without a request...
SESSION_IDLE = 8 * 3600
#: ...and this many seconds after login, whatever its use.
SESSION_MAX = 24 * 3600
#: Wrong tokens allowed per client address within :data:`FAILURE_WINDOW` seconds.
MAX_FAILURES = 5
FAILURE_WINDOW = 300


def token_matches(expected: str, given: str | None) -> bool:
    """Constant-time comparison of ``given`` with ``expected`` (digests of both)."""
    if given is None:
        return False
    return hmac.compare_digest(hashlib.sha256(given.encode("utf-8", "surrogatepass")).digest(),
                               hashlib.sha256(expected.encode("utf-8")).digest())


def bearer(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header (the scheme word in any
    case, as HTTP allows), else ``None``: a bare token is not accepted."""
    scheme, _, value = (header or "").strip().partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


class Sessions:
    """Open login sessions: random id -> (opened, last used), in memory."""

    def __init__(self, idle: float = SESSION_IDLE, maximum: float = SESSION_MAX,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.idle, self.maximum, self.clock = idle, maximum, clock
        self._open: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def open(self) -> str:
        """A new session id."""
        sid = secrets.token_urlsafe(32)
        now = self.clock()
        with self._lock:
            self._drop_expired(now)
            self._open[sid] = (now, now)
        return sid

    def valid(self, sid: str | None) -> bool:
        """Whether ``sid`` is an open, unexpired session (its idle clock restarts)."""
        if not sid:
            return False
        now = self.clock()
        with self._lock:
            times = self._open.get(sid)
            if times is None:
                return False
            opened, used = times
            if now - used > self.idle or now - opened > self.maximum:
                del self._open[sid]
                return False
            self._open[sid] = (opened, now)
            return True

    def close(self, sid: str | None) -> None:
        with self._lock:
            self._open.pop(sid or "", None)

    def _drop_expired(self, now: float) -> None:
        for sid, (opened, used) in list(self._open.items()):
            if now - used > self.idle or now - opened > self.maximum:
                del self._open[sid]


class LoginThrottle:
    """Failed logins per client address within a sliding window."""

    def __init__(self, max_failures: int = MAX_FAILURES, window: float = FAILURE_WINDOW,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_failures, self.window, self.clock = max_failures, window, clock
        self._failures: dict[str, list[float]] = {}
        self._lock = threading.Lock()

    def retry_after(self, client: str) -> int:
        """Seconds until ``client`` may try again (0: now)."""
        now = self.clock()
        with self._lock:
            recent = [t for t in self._failures.pop(client, []) if now - t < self.window]
            if recent:
                self._failures[client] = recent
            if len(recent) < self.max_failures:
                return 0
            return max(1, int(recent[0] + self.window - now + 0.999))

    def failed(self, client: str) -> None:
        with self._lock:
            self._failures.setdefault(client, []).append(self.clock())

    def succeeded(self, client: str) -> None:
        with self._lock:
            self._failures.pop(client, None)
