"""A worker process for work the QGIS process must not do itself.

QGIS never imports torch (it brings its own LLVM through triton, which collides with
the LLVM of Mesa's software GL, and it shadows or is shadowed by packages of the
system Python). The plugin starts ``python -m <package>.plugin.core.worker`` from the
Python environment it manages, writes one JSON request on stdin and reads JSON lines
on stdout:

    {"event": "progress", "value": 42.0}           0-100
    {"event": "log", "level": "INFO", "message": "..."}
    {"event": "result", "value": {...}}            the last line of a run that worked
    {"event": "error", "kind": "input"|"cancelled"|"failed", "message": "...", "details": "..."}

SIGTERM cancels: the run stops at its next cancellation check and removes what it
wrote, like a cancelled run anywhere else. ``call_worker`` is the other end: it starts
the process, relays progress and log lines, terminates it on cancel and turns a crash
(a signal, out of memory) into an exception instead of a crash of the caller.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import traceback
from typing import Any, Callable, Optional

from .cancel import Cancelled, CancelFn
from .errors import InputError
from .package_data import package_root

EXIT_OK, EXIT_FAILED, EXIT_INPUT, EXIT_CANCELLED = 0, 1, 2, 3
TERMINATE_GRACE_S = 15.0  # after SIGTERM, time to clean up before SIGKILL

Handler = Callable[[dict, "Channel"], dict]


class WorkerError(RuntimeError):
    """The worker failed: ``message`` is one line for the user, ``details`` the rest."""

    def __init__(self, message: str, details: str = "") -> None:
        super().__init__(message)
        self.details = details


class WorkerInputError(InputError):
    """An ``InputError`` raised in the worker, re-raised on the caller's side as is."""

    def __init__(self, message: str) -> None:  # noqa: D107 - the message is already one line
        ValueError.__init__(self, message)
        self.subject, self.problem, self.fix = "", message, ""


# ---- the worker side -------------------------------------------------------------------------


class Channel:
    """JSON lines on stdout, one writer at a time; cancellation set by SIGTERM."""

    def __init__(self, stream=None) -> None:
        self.stream = stream or sys.stdout
        self.lock = threading.Lock()
        self.cancelled = False

    def send(self, event: str, **fields: Any) -> None:
        line = json.dumps({"event": event, **fields}, default=str)
        with self.lock:
            self.stream.write(line + "\n")
            self.stream.flush()

    def progress(self, value: float) -> None:
        self.send("progress", value=round(float(value), 2))

    def steps(self, done: int, total: int) -> None:
        """A core ``progress(done, total)`` callback."""
        self.progress(100.0 * done / max(total, 1))

    def cancel(self) -> bool:
        return self.cancelled


class _LogToChannel(logging.Handler):
    def __init__(self, channel: Channel) -> None:
        super().__init__(logging.INFO)
        self.channel = channel

    def emit(self, record: logging.LogRecord) -> None:
        self.channel.send("log", level=record.levelname, message=record.getMessage())


def _height_job(params: dict, channel: Channel) -> dict:
    from .job import HeightJob, run_height_job

    result = run_height_job(HeightJob.from_dict(params), progress=channel.progress, cancel=channel.cancel)
    return result.to_dict()


def _predict(params: dict, channel: Channel) -> dict:
    from .terrain import predict_surface

    params = dict(params)
    embeddings, model, out = params.pop("embeddings"), params.pop("model"), params.pop("out")
    workers, scheduler = params.pop("workers", None), params.pop("scheduler", None)
    if workers or scheduler:
        return _predict_on_dask(embeddings, model, out, workers, scheduler, params, channel)
    result = predict_surface(embeddings, model, out, progress=channel.steps, cancel=channel.cancel, **params)
    return {"path": str(result.path), "width": result.grid.width, "height": result.grid.height,
            "tiles": result.tiles, "seconds": result.seconds, "device": result.device, "stats": result.stats}


def _predict_on_dask(embeddings: str, model: str, out: str, workers: Optional[int], scheduler: Optional[str],
                     params: dict, channel: Channel) -> dict:
    """The same prediction in chunks on a Dask cluster (core.distributed), for Processing.

    The terrain (a file or a DEM product, fetched once here) goes with it as on one process.
    """
    from .distributed import open_client, predict_distributed

    options = {k: params[k] for k in ("tile", "overlap", "batch_size", "device", "backend", "amp", "max_mpx",
                                      "terrain", "cache_dir") if k in params}
    with open_client(workers, scheduler) as client:
        result = predict_distributed(embeddings, model, out, client=client, progress=channel.steps, **options)
    return {"path": str(result.path), "width": result.grid.width, "height": result.grid.height,
            "tiles": result.chunks, "seconds": result.seconds, "device": f"Dask ({result.chunks} chunks)",
            "stats": {}}


def _fetch(params: dict, channel: Channel) -> dict:
    from .aoi import AreaOfInterest
    from .fetch import fetch

    params = dict(params)
    aoi = AreaOfInterest(**params.pop("aoi"))
    result = fetch(aoi, params.pop("year"), params.pop("source"), params.pop("out"),
                   cache_dir=params.pop("cache_dir", None), progress=channel.steps, cancel=channel.cancel,
                   **params.pop("options", {}))
    return {"path": str(result.path), "width": result.grid.width, "height": result.grid.height,
            "tiles": result.tiles, "fetched": result.fetched, "from_cache": result.from_cache,
            "valid_fraction": result.valid_fraction, "seconds": result.seconds}


def _compare(params: dict, channel: Channel) -> dict:
    from .compare import compare_heights
    from .metrics import json_safe

    return json_safe(compare_heights(params["predicted"], params["reference"], params.get("out"),
                                     params.get("metrics")))


def _train(params: dict, channel: Channel) -> dict:
    from ...training.train import TrainConfig, train_model

    def progress(done: int, total: int) -> None:
        channel.steps(done, total)

    result = train_model(TrainConfig.from_dict(params), log=logging.getLogger("training").info, progress=progress)
    return {"model_dir": str(result.model_dir), "metrics": result.metrics}


def _environment(params: dict, channel: Channel) -> dict:
    """What this environment can run: ONNX Runtime, torch, and the GPU torch sees."""
    import importlib.util

    found = {name: importlib.util.find_spec(name) is not None
             for name in ("onnxruntime", "torch", "segmentation_models_pytorch", "rasterio", "matplotlib")}
    info: dict[str, Any] = {"python": sys.version.split()[0], "packages": found, "gpu": None}
    if found["onnxruntime"]:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    if found["torch"] and params.get("probe_gpu", True):
        from .device import describe_device, select_device

        device = select_device("auto")
        info["torch_device"] = describe_device(device)
        info["gpu"] = info["torch_device"] if device.type != "cpu" else None
    return info


HANDLERS: dict[str, Handler] = {"height_job": _height_job, "predict": _predict, "fetch": _fetch,
                                "compare": _compare, "train": _train, "environment": _environment}


def serve(stdin=None, stdout=None) -> int:
    """Run one request read from stdin; the exit code says how it ended."""
    channel = Channel(stdout)
    logging.basicConfig(level=logging.WARNING, handlers=[_LogToChannel(channel)], force=True)
    logging.getLogger().setLevel(logging.INFO)

    def on_term(_signum, _frame) -> None:
        channel.cancelled = True

    signal.signal(signal.SIGTERM, on_term)
    try:
        request = json.loads((stdin or sys.stdin).read())
        handler = HANDLERS.get(request.get("action", ""))
        if handler is None:
            raise InputError(f"worker action {request.get('action')!r}", "is unknown",
                             f"Use one of: {', '.join(HANDLERS)}")
        channel.send("result", value=handler(request.get("params", {}), channel))
        return EXIT_OK
    except Cancelled:
        channel.send("error", kind="cancelled", message="cancelled; nothing was kept")
        return EXIT_CANCELLED
    except InputError as exc:
        channel.send("error", kind="input", message=str(exc))
        return EXIT_INPUT
    except Exception as exc:  # noqa: BLE001 - reported to the caller, which shows it
        channel.send("error", kind="failed", message=f"{type(exc).__name__}: {exc}", details=traceback.format_exc())
        return EXIT_FAILED


# ---- the caller's side -----------------------------------------------------------------------


def worker_command(python: str) -> list[str]:
    """The command line starting this module under ``python``, whatever the package is called here."""
    package = __name__.rsplit(".plugin.core.worker", 1)[0]
    root = package_root()  # unresolved: a plugin folder that links to a checkout keeps its name
    boot = ("import sys, importlib; sys.path.insert(0, sys.argv[1]) if sys.argv[1] else None; "
            "sys.exit(importlib.import_module(sys.argv[2] + '.plugin.core.worker').serve())")
    parent = str(root.parent) if root.name == package else ""
    return [python, "-c", boot, parent, package]


def worker_environment() -> dict[str, str]:
    """The caller's environment minus what would make the worker's Python load another one's packages."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONIOENCODING"] = "utf-8"
    return env


def call_worker(action: str, params: dict, *, python: str, progress: Optional[Callable[[float], None]] = None,
                cancel: Optional[CancelFn] = None, on_log: Optional[Callable[[str, str], None]] = None,
                poll_s: float = 0.1) -> dict:
    """Run one request in a worker process and return its result.

    Raises ``WorkerInputError`` (bad input, one line), ``Cancelled`` (``cancel()`` turned
    true: the worker was terminated and cleaned up) or ``WorkerError`` (anything else,
    a crash included). ``on_log(level, message)`` gets the worker's log and stderr lines.
    """
    log = on_log or (lambda level, message: None)
    try:
        proc = subprocess.Popen(worker_command(python), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, encoding="utf-8", errors="replace",
                                env=worker_environment(), start_new_session=True)
    except OSError as exc:
        raise WorkerError(f"The worker's Python ({python}) cannot be started: {exc.strerror or exc}. "
                          "Reinstall the plugin's Python environment") from None
    lines: queue.Queue = queue.Queue()
    stderr_tail: list[str] = []
    readers = [threading.Thread(target=_pump, args=(proc.stdout, lines.put), daemon=True),
               threading.Thread(target=_pump, args=(proc.stderr, lambda line: _stderr(line, stderr_tail, log)),
                                daemon=True)]
    for reader in readers:
        reader.start()
    try:
        proc.stdin.write(json.dumps({"action": action, "params": params}))
        proc.stdin.close()
    except OSError:
        pass  # it died before reading its request: its exit code tells why
    outcome: Optional[dict] = None
    cancel_sent = False
    while True:
        try:
            line = lines.get(timeout=poll_s)
        except queue.Empty:
            line = None
        if line is not None:
            outcome = _handle(line, outcome, progress, log)
        elif proc.poll() is not None and not readers[0].is_alive():
            break
        if cancel and cancel() and not cancel_sent:
            cancel_sent = True
            _stop(proc)
    readers[1].join(timeout=5)
    return _outcome(outcome, proc.returncode, cancel_sent, stderr_tail)


def _pump(stream, put: Callable[[str], None]) -> None:
    for line in stream:
        put(line.rstrip("\n"))
    stream.close()


def _stderr(line: str, tail: list[str], log: Callable[[str, str], None]) -> None:
    tail.append(line)
    del tail[:-40]
    if line.strip():
        log("WARNING", line)


def _handle(line: str, outcome: Optional[dict], progress, log) -> Optional[dict]:
    try:
        message = json.loads(line)
    except json.JSONDecodeError:
        log("INFO", line)  # a library printing to stdout
        return outcome
    event = message.get("event") if isinstance(message, dict) else None
    if event == "progress" and progress:
        progress(float(message["value"]))
    elif event == "log":
        log(message.get("level", "INFO"), message.get("message", ""))
    elif event in ("result", "error"):
        return message
    return outcome


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM (the worker cleans up), then SIGKILL if it does not end in time."""
    try:
        proc.terminate()
        proc.wait(TERMINATE_GRACE_S)
    except subprocess.TimeoutExpired:
        proc.kill()
    except OSError:
        pass


def _outcome(outcome: Optional[dict], code: int, cancel_sent: bool, stderr_tail: list[str]) -> dict:
    if outcome is not None and outcome["event"] == "result" and code == EXIT_OK:
        return outcome["value"]
    if cancel_sent:
        raise Cancelled("cancelled")
    if outcome is not None and outcome["event"] == "error":
        if outcome.get("kind") == "input":
            raise WorkerInputError(outcome["message"])
        if outcome.get("kind") == "cancelled":
            raise Cancelled(outcome["message"])
        raise WorkerError(outcome["message"], outcome.get("details", ""))
    details = "\n".join(stderr_tail)
    if code < 0:
        name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else str(-code)
        hint = " (out of memory?)" if -code == signal.SIGKILL else ""
        raise WorkerError(f"The worker process crashed: killed by {name}{hint}. QGIS is unaffected; "
                          "see the log panel for its last output", details)
    last = next((line for line in reversed(stderr_tail) if line.strip()), "no output")
    raise WorkerError(f"The worker process ended with exit code {code} without a result: {last}", details)


if __name__ == "__main__":
    sys.exit(serve())
