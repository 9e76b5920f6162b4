"""Deadlines for every network operation of the fetchers, and downloads that say what they wait for.

A fetch must never hang silently. Every network operation has an overall deadline (all
of its retries included) and gives up on a connection that has stalled. Defaults, each
overridable by an environment variable (seconds) or by the sources' options:

======================================  =======  ==================================================
``ALPHAEARTH_HEIGHT_STALL_TIMEOUT``     30 s     a connection that delivers less than 1 KB in this
                                                 long (no answer at all, or a trickle) has stalled
``ALPHAEARTH_HEIGHT_TILE_DEADLINE``     300 s    one tile: its COG range reads, or its Earth Engine
                                                 request, every retry included
``ALPHAEARTH_HEIGHT_INDEX_DEADLINE``    1800 s   the COG tile index download (~800 MB, once)
======================================  =======  ==================================================

Stalls, dropped connections, HTTP 429 and 5xx are retried with backoff while the
deadline allows; other HTTP errors (403, 404) are answers and are not retried.
"""

from __future__ import annotations

import logging
import queue
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import BinaryIO, Callable, Optional

from ..cancel import CancelFn, Cancelled
from ..errors import InputError
from ..sizes import positive_from_env

StatusFn = Callable[[str], None]

STALL_ENV = "ALPHAEARTH_HEIGHT_STALL_TIMEOUT"
TILE_DEADLINE_ENV = "ALPHAEARTH_HEIGHT_TILE_DEADLINE"
INDEX_DEADLINE_ENV = "ALPHAEARTH_HEIGHT_INDEX_DEADLINE"
DEFAULT_STALL, DEFAULT_TILE_DEADLINE, DEFAULT_INDEX_DEADLINE = 30.0, 300.0, 1800.0
STALL_BYTES = 1024          # less than this in a stall window is a stall
STATUS_EVERY = 2.0          # seconds between progress messages of one download
_CHUNK = 1 << 20

log = logging.getLogger("alphaearth_height.fetch")


def log_status(message: str) -> None:
    """The default status sink: the log (the QGIS worker relays it to the log panel)."""
    log.info("%s", message)


def _seconds(env: str, default: float) -> float:
    return positive_from_env(env, default, "seconds")


@dataclass(frozen=True)
class NetworkLimits:
    """Stall timeout and deadlines in seconds (see the module docstring)."""

    stall: float = DEFAULT_STALL
    tile_deadline: float = DEFAULT_TILE_DEADLINE
    index_deadline: float = DEFAULT_INDEX_DEADLINE

    @classmethod
    def from_env(cls, stall: Optional[float] = None, tile_deadline: Optional[float] = None,
                 index_deadline: Optional[float] = None) -> "NetworkLimits":
        """Explicit values first, then the environment, then the defaults."""
        limits = cls(stall if stall is not None else _seconds(STALL_ENV, DEFAULT_STALL),
                     tile_deadline if tile_deadline is not None else _seconds(TILE_DEADLINE_ENV,
                                                                              DEFAULT_TILE_DEADLINE),
                     index_deadline if index_deadline is not None else _seconds(INDEX_DEADLINE_ENV,
                                                                                DEFAULT_INDEX_DEADLINE))
        for name in ("stall", "tile_deadline", "index_deadline"):
            if not getattr(limits, name) > 0:
                raise InputError(f"{name} {getattr(limits, name)}", "is not a positive number of seconds",
                                 "Give seconds greater than 0")
        return limits


class Deadline:
    """The end of one network operation's time, retries included."""

    def __init__(self, seconds: float, what: str) -> None:
        self.seconds, self.what = seconds, what
        self.start = time.monotonic()
        self.end = self.start + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def expired(self) -> bool:
        return self.left() <= 0

    def elapsed(self) -> float:
        return time.monotonic() - self.start


class NetworkError(Exception):
    """A network failure worth retrying, worded for the user (stall, cut, deadline)."""


class Stalled(NetworkError):
    pass


class DeadlineExceeded(NetworkError):
    pass


def host_of(url: str) -> str:
    return urllib.parse.urlsplit(url).netloc or url


def megabytes(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


def _is_timeout(exc: BaseException) -> bool:
    if isinstance(exc, urllib.error.URLError) and not isinstance(exc, urllib.error.HTTPError):
        exc = exc.reason if isinstance(exc.reason, BaseException) else exc
    return isinstance(exc, (socket.timeout, TimeoutError))


class _Reader(threading.Thread):
    """Reads one HTTP response into a queue; the caller's thread watches the clock.

    The socket timeout is only a backstop (the caller gives up first), so a thread left
    behind by a stalled or cancelled download ends by itself shortly after.
    """

    def __init__(self, request: urllib.request.Request, socket_timeout: float) -> None:
        super().__init__(daemon=True, name="aeh-download")
        self.request, self.socket_timeout = request, socket_timeout
        self.items: "queue.Queue[Optional[bytes]]" = queue.Queue(maxsize=32)
        self.stop = threading.Event()
        self.answered = threading.Event()
        self.error: Optional[BaseException] = None
        self.total: Optional[int] = None
        self.content_type = ""
        self.status = 0
        self.headers: dict[str, str] = {}

    def run(self) -> None:
        try:
            with urllib.request.urlopen(self.request, timeout=self.socket_timeout) as response:
                length = response.headers.get("Content-Length", "")
                self.total = int(length) if length.strip().isdigit() else None
                self.content_type = response.headers.get_content_type()
                self.status = response.status
                self.headers = {k.lower(): v for k, v in response.headers.items()}
                self.answered.set()
                while not self.stop.is_set():
                    chunk = response.read1(_CHUNK)
                    if not chunk:
                        break
                    self._put(chunk)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            self.error = exc
        self._put(None)

    def _put(self, item: Optional[bytes]) -> None:
        while not self.stop.is_set():
            try:
                self.items.put(item, timeout=0.2)
                return
            except queue.Full:
                continue


def download(url: str, out: BinaryIO, *, what: str, stall: float, deadline: Deadline,
             cancel: Optional[CancelFn] = None, status: Optional[StatusFn] = None,
             headers: Optional[dict] = None,
             on_answer: Optional[Callable[[int, dict], None]] = None) -> tuple[int, str]:
    """One GET of ``url`` into ``out``; returns (bytes, content type).

    ``on_answer(status, headers)`` (lower-case header names) runs in the caller's thread
    once the server has answered, before any of the body is written: range readers check
    there that a 206 came back for the range asked (and may raise to stop).

    Raises Stalled when less than 1 KB arrives in ``stall`` seconds (waiting for the
    answer included), DeadlineExceeded at the deadline, NetworkError when the body is
    shorter than its Content-Length, urllib's HTTPError for an error status, Cancelled.
    Says what it waits for through ``status`` at once, then every couple of seconds.
    """
    say = status or log_status
    host = host_of(url)
    reader = _Reader(urllib.request.Request(url, headers=headers or {}), socket_timeout=stall + 5.0)
    received = 0
    told = on_answer is None
    window_start, window_bytes = time.monotonic(), 0
    last_said = time.monotonic()
    say(f"{what}: waiting for {host} to answer (gives up after {stall:g} s without data)")
    reader.start()
    try:
        while True:
            if cancel is not None and cancel():
                raise Cancelled()
            if deadline.expired():
                got = f"{megabytes(received)} received" + (f" of {megabytes(reader.total)}" if reader.total else "")
                raise DeadlineExceeded(f"{what} did not finish within its {deadline.seconds:g} s deadline "
                                       f"({got})")
            try:
                item = reader.items.get(timeout=min(0.25, max(0.01, deadline.left())))
            except queue.Empty:
                item = b""
            if not told and reader.answered.is_set():
                told = True
                on_answer(reader.status, reader.headers)
            if item is None:
                break
            if item:
                out.write(item)
                received += len(item)
            now = time.monotonic()
            if now - window_start >= stall:
                if received - window_bytes < STALL_BYTES:
                    raise Stalled(_stall_text(what, host, stall, received, reader.answered.is_set()))
                window_start, window_bytes = now, received
            if now - last_said >= STATUS_EVERY:
                last_said = now
                if reader.answered.is_set():
                    total = f" of {megabytes(reader.total)}" if reader.total else ""
                    say(f"{what}: {megabytes(received)}{total} received from {host} "
                        f"({deadline.elapsed():.0f} s; deadline {deadline.seconds:g} s)")
                else:
                    say(f"{what}: still waiting for {host} to answer ({deadline.elapsed():.0f} s)")
        if reader.error is not None:
            if _is_timeout(reader.error):
                raise Stalled(_stall_text(what, host, stall, received, reader.answered.is_set()))
            raise reader.error
        if reader.total is not None and received != reader.total:
            raise NetworkError(f"{what} was cut off: {received:,} of {reader.total:,} bytes arrived")
        return received, reader.content_type
    finally:
        reader.stop.set()


def _stall_text(what: str, host: str, stall: float, received: int, answered: bool) -> str:
    if not answered:
        return f"{host} accepted the connection but did not answer {what} within {stall:g} s"
    return f"{what} stalled: less than 1 KB arrived from {host} in {stall:g} s ({received:,} bytes in all)"
