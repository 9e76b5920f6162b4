"""Retrying remote calls with exponential backoff, interruptible by the caller's cancel()."""

from __future__ import annotations

import random
import time
from typing import Callable, Optional, TypeVar

from ..inference import CancelFn, Cancelled

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


def with_retries(call: Callable[[], T], *, transient: Callable[[BaseException], bool], attempts: int,
                 base_delay: float, cancel: Optional[CancelFn] = None, max_delay: float = 60.0) -> T:
    """Run ``call``; on a transient error wait base_delay * 2**n (with jitter) and try again.

    Jitter keeps parallel workers that were throttled together from retrying in step.
    The last error, or any non-transient one, propagates unchanged.
    """
    attempt = 0
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
            sleep_unless_cancelled(delay, cancel)
