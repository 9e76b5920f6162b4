"""Python logging -> the QGIS log panel ("AlphaEarth Height" tab).

Core and training log through the standard ``logging`` module so they stay QGIS-free;
inside QGIS this handler makes those records (tracebacks included) visible to users.
"""

from __future__ import annotations

import logging
import re

from qgis.core import Qgis, QgsMessageLog

LOGGER_NAME = "alphaearth_height"
TAG = "AlphaEarth Height"
_MARKER = "_alphaearth_height_qgis_handler"
# Credentials must never reach the log panel (users paste it into bug reports).
_SECRET = re.compile(r"(?i)\b(token|api[_-]?key|secret|password|authorization)(\s*[=:]\s*)(\S+)")


def qgis_level(levelno: int) -> Qgis.MessageLevel:
    """The QGIS message level matching a Python logging level."""
    if levelno >= logging.ERROR:
        return Qgis.MessageLevel.Critical
    if levelno >= logging.WARNING:
        return Qgis.MessageLevel.Warning
    return Qgis.MessageLevel.Info


def redact(text: str) -> str:
    """Mask values that look like credentials (``token=...``, ``password: ...``)."""
    return _SECRET.sub(lambda m: f"{m.group(1)}{m.group(2)}***", text)


class QgsLogHandler(logging.Handler):
    """Forwards records to QgsMessageLog, which is safe to call from task threads."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        setattr(self, _MARKER, True)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = redact(self.format(record))
        except Exception:  # noqa: BLE001 - logging must never raise into the caller
            self.handleError(record)
            return
        QgsMessageLog.logMessage(message, TAG, qgis_level(record.levelno))


def _ours(handler: logging.Handler) -> bool:
    # A marker, not isinstance: after a plugin reload the class object is a new one.
    return bool(getattr(handler, _MARKER, False))


def install_log_handler() -> QgsLogHandler:
    """Attach one handler to the package logger (replacing any left by an earlier load)."""
    uninstall_log_handler()
    logger = logging.getLogger(LOGGER_NAME)
    if logger.level == logging.NOTSET or logger.level > logging.INFO:
        logger.setLevel(logging.INFO)
    handler = QgsLogHandler()
    logger.addHandler(handler)
    return handler


def uninstall_log_handler() -> None:
    """Remove every handler this module installed on the package logger."""
    logger = logging.getLogger(LOGGER_NAME)
    for handler in [h for h in logger.handlers if _ours(h)]:
        logger.removeHandler(handler)
