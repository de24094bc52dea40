"""The admin password check, with the wrong-password pause kept per client for the whole
process: every browser session (and the CLI) of one client shares it, so opening ten
sessions does not buy ten guesses per pause.

    gate = PasswordGate(delay_s=1.0)
    verdict = gate.attempt(client_ip or "local", given, expected)
    verdict.ok / verdict.wait_s (> 0: refused unchecked, try again after that long)
"""

from __future__ import annotations

import hmac
import threading
import time
from dataclasses import dataclass
from typing import Callable

# Clients remembered at most; past this, those whose pause has ended are forgotten first.
MAX_CLIENTS = 10_000


def check_password(given: str, expected: str) -> bool:
    """Constant-time comparison of a password attempt (any text, even unpaired surrogates)."""
    return hmac.compare_digest(given.encode("utf-8", "surrogatepass"),
                               expected.encode("utf-8", "surrogatepass"))


@dataclass(frozen=True)
class Verdict:
    """The outcome of one attempt: ``ok``, or refused with ``wait_s`` left of a pause."""

    ok: bool
    wait_s: float = 0.0

    @property
    def message(self) -> str:
        """What the person is told when the attempt did not sign in."""
        if self.wait_s > 0:
            return (f"Too many password attempts from your address; try again in "
                    f"{max(self.wait_s, 0.1):.1f} s.")
        return "Wrong password."


class PasswordGate:
    """Checks passwords; a wrong one pauses that client for ``delay_s``, and any attempt
    from it during the pause (another tab, another session) is refused without a check."""

    def __init__(self, delay_s: float = 1.0, *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.delay_s = delay_s
        self.clock = clock
        self.sleep = sleep
        self._lock = threading.Lock()
        self._paused_until: dict[str, float] = {}

    def attempt(self, client: str, given: str, expected: str) -> Verdict:
        """Check one attempt from ``client`` (an IP address, or 'local')."""
        with self._lock:
            now = self.clock()
            until = self._paused_until.get(client, now)
            if until > now:
                return Verdict(False, until - now)
            ok = bool(expected) and check_password(given, expected)
            if ok:
                self._paused_until.pop(client, None)
            elif self.delay_s > 0:
                self._forget_old(now)
                # The pause starts before this attempt answers, so parallel ones are refused.
                self._paused_until[client] = now + self.delay_s
        if not ok and self.delay_s > 0:
            self.sleep(self.delay_s)   # the wrong answer itself comes late, as before
        return Verdict(ok)

    def _forget_old(self, now: float) -> None:
        if len(self._paused_until) >= MAX_CLIENTS:
            for client in [c for c, t in self._paused_until.items() if t <= now]:
                del self._paused_until[client]
            if len(self._paused_until) >= MAX_CLIENTS:   # all paused: drop the oldest
                del self._paused_until[next(iter(self._paused_until))]
