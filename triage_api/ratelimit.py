"""Per-clinic upload rate limits: one clinic's burst cannot starve the others.

A token bucket per clinic, in the API process (with several API processes each enforces
its own share). Refusals are 429 with ``Retry-After``; nothing is stored for them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from triage_api.errors import TriageError


class TooManyRequests(TriageError):
    status, code = 429, "rate_limited"

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ClinicRateLimiter:
    """``per_minute`` uploads per clinic on average, with bursts up to ``burst``."""

    def __init__(self, per_minute: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = per_minute / 60.0
        self.burst = float(burst)
        self.clock = clock
        self._buckets: dict[int, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, clinic_id: int) -> None:
        """Spend one token of ``clinic_id``'s bucket.

        Raises:
            TooManyRequests: the bucket is empty; ``retry_after`` says when a token returns.
        """
        with self._lock:
            now = self.clock()
            tokens, last = self._buckets.get(clinic_id, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            if tokens < 1.0:
                self._buckets[clinic_id] = (tokens, now)
                wait = (1.0 - tokens) / self.rate
                raise TooManyRequests("upload rate limit reached for this clinic", retry_after=wait)
            self._buckets[clinic_id] = (tokens - 1.0, now)
