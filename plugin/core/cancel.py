"""Cancellation and progress callbacks, shared by fetching, prediction, training and the plugin."""

from __future__ import annotations

from typing import Callable

ProgressFn = Callable[[int, int], None]
CancelFn = Callable[[], bool]


class Cancelled(Exception):
    """The caller asked to stop; no output was kept."""
