"""Retrying remote calls with exponential backoff, interruptible by the caller's cancel()
and bounded by the operation's deadline (core.fetch.network.Deadline)."""

from __future__ import annotations

import random
import time
from typing import Callable, Optional, TypeVar

from ..cancel import CancelFn, Cancelled

T = TypeVar("T")


def sleep_unless_cancelled(seconds: float, cancel: Optional[CancelFn]) -> None:
    """Sleep in short steps so a cancelled QgsTask does not wait out a long backoff."""
    end = time.monotonic() + seconds
    while True:
        if cancel is not None and cancel():
            raise Cancelled()
        left = end - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(left, 0.2))


class GaveUp(Exception):
    """The deadline passed with the call still failing; ``last`` is its last error."""

    def __init__(self, last: BaseException, attempts: int, seconds: float) -> None:
        super().__init__(f"{last} ({attempts} attempt(s) in {seconds:.0f} s)")
        self.last, self.attempts, self.seconds = last, attempts, seconds


def with_retries(call: Callable[[], T], *, transient: Callable[[BaseException], bool], attempts: int,
                 base_delay: float, cancel: Optional[CancelFn] = None, max_delay: float = 60.0,
                 deadline: Optional[object] = None, min_attempt: float = 0.0,
                 on_retry: Optional[Callable[[BaseException, float, int], None]] = None) -> T:
    """Run ``call``; on a transient error wait base_delay * 2**n (with jitter) and try again.

    Jitter keeps parallel workers that were throttled together from retrying in step.
    The last error, or any non-transient one, propagates unchanged, except when the
    ``deadline`` (anything with ``left()``) leaves no time for the wait and
    ``min_attempt`` seconds of the next attempt: then GaveUp(last error) is raised at once. ``on_retry(error, delay, attempt)``
    is told before each wait (to say what is happening).
    """
    attempt = 0
    start = time.monotonic()
    while True:
        if cancel is not None and cancel():
            raise Cancelled()
        try:
            return call()
        except Cancelled:
            raise
        except Exception as exc:  # noqa: BLE001 - the predicate decides
            attempt += 1
            if attempt >= attempts or not transient(exc):
                raise
            delay = min(max_delay, base_delay * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
            if deadline is not None and deadline.left() <= delay + min_attempt:
                raise GaveUp(exc, attempt, time.monotonic() - start) from exc
            if on_retry is not None:
                on_retry(exc, delay, attempt)
            sleep_unless_cancelled(delay, cancel)
