"""Background work for the dock: height runs in the worker process, environment set-up.

``run()`` executes on a QGIS worker thread, so it only starts processes and records the
outcome; the widgets and the project are touched in ``finished()``, which QGIS calls on
the main thread. The computation itself happens in another process (core.worker), so
nothing it loads (torch, ONNX Runtime, a second GDAL) can crash QGIS.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import time
from pathlib import Path
from typing import Callable, Literal, Optional

from qgis.core import QgsApplication, QgsTask

from .core.cancel import Cancelled
from .core.job import HeightJob, HeightJobResult, remove_outputs, safe_name
from .core.worker import call_worker, worker_environment
from .environment import InstallPlan, ManagedEnvironment, PackageSet, SetupError

log = logging.getLogger(__name__)
Outcome = Literal["success", "failed", "cancelled"]  # what a finished task reports
worker_log = logging.getLogger(__name__.rsplit(".", 1)[0] + ".worker")


def relay_worker_log(level: str, message: str) -> None:
    """Worker log and stderr lines into the plugin's log panel."""
    worker_log.log(logging.getLevelName(level) if isinstance(logging.getLevelName(level), int) else logging.INFO,
                   "%s", message)


class HeightTask(QgsTask):
    """Predict height (and compare with a reference) for one job, in the worker process; cancellable."""

    def __init__(self, job: HeightJob, python: str,
                 on_done: Optional[Callable[["HeightTask"], None]] = None) -> None:
        super().__init__(f"AlphaEarth Height: {job.name}", QgsTask.Flag.CanCancel)
        self.job = job
        self.python = python
        self.on_done = on_done
        self.result: Optional[HeightJobResult] = None
        self.error: Optional[BaseException] = None

    def run(self) -> bool:
        started = time.time()
        try:
            value = call_worker("height_job", self.job.to_dict(), python=self.python, progress=self.setProgress,
                                cancel=self.isCanceled, on_log=relay_worker_log)
            self.result = HeightJobResult.from_dict(value)
        except Cancelled:
            self._clean_up(started)
            return False
        except Exception as exc:  # noqa: BLE001 - reported in finished(); raising here would abort QGIS
            log.error("Height job '%s' failed: %s", self.job.name, exc)
            self.error = exc
            self._clean_up(started)
            return False
        if self.isCanceled():
            remove_outputs(self.result)  # cancelled after the worker finished: a cancelled run leaves nothing
            self.result = None
            return False
        return True

    def _clean_up(self, started: float) -> None:
        """A worker killed hard (crash, SIGKILL, Windows) cannot clean up: remove what this run wrote."""
        stem = safe_name(self.job.name)
        folder = Path(self.job.out_dir)
        for path in [*folder.glob(f"{stem}_*"), *folder.glob(f".{stem}*")]:
            try:
                if path.stat().st_mtime >= started - 1.0:
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
            except OSError as exc:
                log.warning("Could not remove %s: %s", path, exc)

    @property
    def outcome(self) -> Outcome:
        """success (``result`` holds the outputs), failed (``error`` says why) or cancelled by the user."""
        if self.result is not None:
            return "success"
        return "cancelled" if self.isCanceled() and self.error is None else "failed"

    def finished(self, ok: bool) -> None:
        if self.on_done is None:
            return
        try:
            self.on_done(self)
        except Exception:  # noqa: BLE001 - an exception here would reach QGIS's event loop
            log.error("Handling the end of height job '%s' failed", self.job.name, exc_info=True)


class EnvironmentTask(QgsTask):
    """Plan, install or remove the managed environment; ``lines`` keeps pip's output for the log."""

    def __init__(self, environment: ManagedEnvironment, action: str, package_set: PackageSet = "inference",
                 on_done: Optional[Callable[["EnvironmentTask"], None]] = None) -> None:
        title = {"plan": "checking what to download", "install": f"installing the {package_set} packages",
                 "remove": "removing its Python environment"}[action]
        super().__init__(f"AlphaEarth Height: {title}", QgsTask.Flag.CanCancel)
        self.environment, self.action, self.package_set = environment, action, package_set
        self.on_done = on_done
        self.plan: Optional[InstallPlan] = None
        self.error = ""
        self.lines: list[str] = []
        self._steps = 0

    def run(self) -> bool:
        try:
            if self.action == "plan":
                self.plan = self.environment.plan(self.package_set, self._line)
            elif self.action == "install":
                self.environment.install(self.package_set, self._line)
            else:
                self.environment.remove()
        except (SetupError, OSError) as exc:
            self.error = str(exc)
            log.error("%s", self.error)
            return False
        return True

    @property
    def outcome(self) -> Outcome:
        """success, failed (``error`` says why, ``lines`` holds pip's output) or cancelled by the user."""
        if not self.error:
            return "success"
        return "cancelled" if self.isCanceled() else "failed"

    def _line(self, line: str) -> None:
        if self.isCanceled():
            raise SetupError("cancelled by the user")
        self.lines.append(line)
        log.info("%s", line)
        if line.startswith(("Collecting", "Downloading", "Processing", "Installing", "Successfully")):
            self._steps += 1  # pip gives no total: approach 95 % as steps accumulate
            self.setProgress(95.0 * (1.0 - 0.85 ** self._steps))

    def finished(self, ok: bool) -> None:
        if self.on_done is not None:
            try:
                self.on_done(self)
            except Exception:  # noqa: BLE001 - never into QGIS's event loop
                log.error("Handling the end of the environment task failed", exc_info=True)


def _probe_device(_task: QgsTask, python: str) -> str:
    """What runs would use, asked of the worker environment (torch is imported there, never in QGIS)."""
    info = call_worker("environment", {}, python=python, on_log=relay_worker_log)
    if info.get("gpu"):
        return info["gpu"]
    onnx = f"ONNX Runtime {info['onnxruntime']}" if info.get("onnxruntime") else "no ONNX Runtime"
    return f"cpu ({onnx}; {'PyTorch' if info.get('torch_device') else 'no PyTorch, so no GPU'})"


DASK_MODULES = ("dask", "distributed")  # what core.distributed imports (requirements/dask.txt)
_HAS_MODULES = "import importlib.util as u, sys; sys.exit(0 if all(map(u.find_spec, sys.argv[1:])) else 1)"


def worker_has_dask(python: str) -> bool:
    """Whether the worker's Python can import Dask, for the dock's "Run prediction on" choices.

    Asked of that interpreter, not of QGIS's Python (the managed environment has Dask
    once the dock's 'Add Dask' installed it; a system or $ALPHAEARTH_HEIGHT_PYTHON
    interpreter may have it).
    ``find_spec`` imports nothing: one interpreter start, ~30 ms, cheap enough for the
    main thread once per environment change.
    """
    try:
        done = subprocess.run([python, "-c", _HAS_MODULES, *DASK_MODULES], capture_output=True, timeout=20,
                              env=worker_environment())
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("Could not ask %s whether it has Dask: %s", python, exc)
        return False
    return done.returncode == 0


class BackgroundWork:
    """The plugin's tasks: at most one height run, one environment step and one GPU probe at a time.

    The plugin object owns this (the dock only asks for work and shows outcomes), keeps
    each task referenced while QGIS runs it, and cancels what is left when it unloads.
    """

    def __init__(self) -> None:
        self.height: Optional[HeightTask] = None
        self.environment: Optional[EnvironmentTask] = None
        self.probe: Optional[QgsTask] = None

    def height_running(self) -> bool:
        return self.height is not None and self.height.on_done is not None

    def start_height(self, job: HeightJob, python: str, on_done: Callable[[HeightTask], None],
                     on_progress: Callable[[float], None]) -> Optional[HeightTask]:
        """Start a run unless one is running; ``on_done`` gets the task (its ``outcome``) on the main thread."""
        if self.height_running():
            return None

        def done(task: HeightTask) -> None:
            task.on_done = None
            on_done(task)

        self.height = HeightTask(job, python, done)
        self.height.progressChanged.connect(on_progress)
        log.info("Starting height job %s (%s %d)", job.name, job.source, job.year)
        QgsApplication.taskManager().addTask(self.height)
        return self.height

    def start_environment(self, environment: ManagedEnvironment, action: str, package_set: PackageSet,
                          on_done: Callable[[EnvironmentTask], None],
                          on_progress: Optional[Callable[[float], None]] = None) -> Optional[EnvironmentTask]:
        """Plan, install or remove the environment unless a step is under way."""
        if self.environment is not None:
            return None

        def done(task: EnvironmentTask) -> None:
            self.environment = None
            on_done(task)

        self.environment = EnvironmentTask(environment, action, package_set, done)
        if on_progress is not None:
            self.environment.progressChanged.connect(on_progress)
        QgsApplication.taskManager().addTask(self.environment)
        return self.environment

    def start_probe(self, python: str, on_done: Callable[[Optional[BaseException], str], None]) -> bool:
        """Ask the worker environment which device runs would use; False when a probe is under way."""
        if self.probe is not None:
            return False

        def done(exception: Optional[BaseException], description: str = "") -> None:
            self.probe = None
            on_done(exception, description)

        self.probe = QgsTask.fromFunction("AlphaEarth Height: detecting GPU", _probe_device, python,
                                          on_finished=done)
        QgsApplication.taskManager().addTask(self.probe)
        return True

    def cancel_all(self) -> None:
        """Unload: no callback into a dock that is going away; cancel what still runs."""
        for task in (self.height, self.environment):
            if task is not None and task.on_done is not None:
                task.on_done = None
                task.cancel()
