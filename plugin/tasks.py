"""Background runs: a QgsTask around core's ``run_height_job``.

``run()`` executes on a worker thread, so it only calls core and records the outcome;
the widgets and the project are touched in ``finished()``, which QGIS calls on the
main thread.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

from qgis.core import QgsTask

from .core.inference import Cancelled
from .core.job import HeightJob, HeightJobResult, remove_outputs, run_height_job

log = logging.getLogger(__name__)


class HeightTask(QgsTask):
    """Predict height (and compare with a reference) for one job; cancellable."""

    def __init__(self, job: HeightJob, on_done: Optional[Callable[["HeightTask"], None]] = None) -> None:
        super().__init__(f"AlphaEarth Height: {job.name}", QgsTask.Flag.CanCancel)
        self.job = job
        self.on_done = on_done
        self.result: Optional[HeightJobResult] = None
        self.error: Optional[BaseException] = None

    def run(self) -> bool:
        try:
            result = run_height_job(self.job, progress=self.setProgress, cancel=self.isCanceled)
        except Cancelled:
            return False
        except Exception as exc:  # noqa: BLE001 - reported to the user in finished()
            log.error("Height job '%s' failed", self.job.name, exc_info=True)
            self.error = exc
            return False
        if self.isCanceled():
            # Cancelled after the prediction was written: a cancelled run leaves nothing.
            remove_outputs(result)
            return False
        self.result = result
        return True

    @property
    def cancelled(self) -> bool:
        """Stopped by the user (as opposed to failed)."""
        return self.isCanceled() and self.error is None

    def finished(self, ok: bool) -> None:
        if self.on_done is None:
            return
        try:
            self.on_done(self)
        except Exception:  # noqa: BLE001 - an exception here would reach QGIS's event loop
            log.error("Handling the end of height job '%s' failed", self.job.name, exc_info=True)
