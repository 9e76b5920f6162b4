"""Helpers for the desktop tests: release zip, fresh QGIS profile, Xvfb, the real qgis binary.

Everything started here is stopped by its own process id (QGIS in its own process
group, so workers it started go with it), never by name.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[2]
PLUGIN = "alphaearth_height"
STARTUP_SCRIPT = Path(__file__).resolve().parent / "qgis_startup.py"
SCREEN = (1600, 1000)
# Binaries the desktop tests need (Debian packages: qgis, xvfb, imagemagick).
TOOLS = {"qgis": "qgis", "Xvfb": "xvfb", "import": "imagemagick"}


def missing_tools() -> list[str]:
    return [f"{tool} (Debian package {package})" for tool, package in TOOLS.items() if shutil.which(tool) is None]


def qgis_process_command() -> list[str]:
    """The qgis_process executable.

    Debian 12's /usr/bin/qgis_process is a wrapper that passes $QGIS_OPTS from
    /etc/default/qgis ("--noversioncheck", meant for the desktop) to qgis_process.bin,
    which refuses it ("Command --noversioncheck not known!"). Use the binary then.
    """
    wrapper = shutil.which("qgis_process")
    if wrapper is None:
        return []
    binary = Path(wrapper).with_name("qgis_process.bin")
    if binary.is_file() and "QGIS_OPTS" in Path(wrapper).read_text(errors="replace"):
        return [str(binary)]
    return [wrapper]


def build_zip(out_dir: Path) -> Path:
    """The release zip, built by the project's own packaging script."""
    subprocess.run([sys.executable, str(ROOT / "scripts" / "package.py"), "--out", str(out_dir)],
                   check=True, capture_output=True, text=True)
    return out_dir / f"{PLUGIN}.zip"


def make_profile(profiles_path: Path, zip_path: Path) -> Path:
    """A fresh profile folder with the plugin unzipped and enabled, as a user's install leaves it.

    Returns the 'default' profile folder (QgsApplication.qgisSettingsDirPath() in QGIS).
    """
    profile = profiles_path / "profiles" / "default"
    plugins = profile / "python" / "plugins"
    plugins.mkdir(parents=True)
    with zipfile.ZipFile(zip_path) as archive:
        archive.extractall(plugins)
    if not (plugins / PLUGIN / "metadata.txt").is_file():
        raise RuntimeError(f"{zip_path} did not unpack to {PLUGIN}/metadata.txt")
    (profile / "QGIS").mkdir()
    (profile / "QGIS" / "QGIS3.ini").write_text(f"[PythonPlugins]\n{PLUGIN}=true\n", encoding="utf-8")
    return profile


def clean_environment(**extra: str) -> dict:
    """The environment of a user's session: no venv, no test-only Qt platform, no PYTHONPATH,
    none of the plugin's own overrides (tests/conftest.py points ALPHAEARTH_HEIGHT_PYTHON at
    the test venv; here runs must use the environment the plugin installs)."""
    env = {k: v for k, v in os.environ.items()
           if k not in {"QT_QPA_PLATFORM", "VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP"}
           and not k.startswith(("PYTEST_", "ALPHAEARTH_HEIGHT_"))}
    venv_bin = str(Path(sys.prefix) / "bin")
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "/usr/bin:/bin").split(os.pathsep) if p != venv_bin)
    env.update(extra)
    return env


class Xvfb:
    """A virtual X display on a free number (Xvfb picks it: -displayfd)."""

    def __init__(self, log_path: Path, size: tuple[int, int] = SCREEN) -> None:
        self.log_path = log_path
        self.size = size
        self.proc: Optional[subprocess.Popen] = None
        self.display = ""

    def __enter__(self) -> "Xvfb":
        read_fd, write_fd = os.pipe()
        log = open(self.log_path, "wb")
        try:
            self.proc = subprocess.Popen(
                ["Xvfb", "-displayfd", str(write_fd), "-screen", "0", f"{self.size[0]}x{self.size[1]}x24",
                 "-nolisten", "tcp", "-noreset"],
                stdout=log, stderr=subprocess.STDOUT, pass_fds=(write_fd,), start_new_session=True)
        finally:
            os.close(write_fd)
            log.close()
        number = b""
        deadline = time.monotonic() + 30
        os.set_blocking(read_fd, False)
        while not number.endswith(b"\n") and time.monotonic() < deadline and self.proc.poll() is None:
            try:
                chunk = os.read(read_fd, 16)
            except BlockingIOError:
                time.sleep(0.05)
                continue
            if not chunk:
                break
            number += chunk
        os.close(read_fd)
        if not number.strip().isdigit():
            self.stop()
            raise RuntimeError(f"Xvfb did not start (see {self.log_path})")
        self.display = f":{number.strip().decode()}"
        return self

    def screenshot(self, path: Path) -> bool:
        """The whole screen as PNG (ImageMagick's import)."""
        try:
            done = subprocess.run(["import", "-window", "root", str(path)], env={**os.environ, "DISPLAY": self.display},
                                  capture_output=True, timeout=60)
        except subprocess.TimeoutExpired:
            return False
        return done.returncode == 0 and path.is_file()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def __exit__(self, *exc) -> None:
        self.stop()


@dataclass
class DesktopRun:
    """What one QGIS desktop session left behind."""

    result: dict = field(default_factory=dict)  # the start-up script's JSON ({} when it never wrote one)
    returncode: Optional[int] = None            # None: QGIS had to be killed
    reported: bool = False                      # the script reported done/failed before the deadline
    exited_cleanly: bool = False                # QGIS quit by itself after the report, exit status 0
    seconds: float = 0.0
    screenshot: Optional[Path] = None
    log: Optional[Path] = None
    messages: Optional[Path] = None
    profile: Optional[Path] = None
    notes: list = field(default_factory=list)

    def describe(self) -> str:
        errors = "\n".join(self.result.get("errors", [])) or "(none)"
        tail = ""
        if self.messages and self.messages.is_file():
            tail = "\n".join(self.messages.read_text(errors="replace").splitlines()[-40:])
        return (f"returncode={self.returncode} reported={self.reported} phase={self.result.get('phase')} "
                f"notes={self.notes}\nscript errors:\n{errors}\nlast messages ({self.messages}):\n{tail}")


def run_qgis_desktop(profiles_path: Path, config: dict, artifacts: Path, *, hard_deadline_s: float,
                     exit_wait_s: float = 60, script: Path = STARTUP_SCRIPT) -> DesktopRun:
    """Start Xvfb and qgis with the start-up script; wait for its report; screenshot; let it quit.

    Paths for the result JSON, message log and inside screenshot are added to ``config``.
    """
    artifacts.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="aeh-desktop-"))
    runtime = work / "xdg-runtime"
    runtime.mkdir(mode=0o700)
    run = DesktopRun(log=artifacts / "qgis_stdout.log", messages=artifacts / "qgis_messages.log",
                     profile=profiles_path / "profiles" / "default")
    for stale in ("result.json", "qgis_stdout.log", "qgis_messages.log", "desktop_inside.png", "desktop_inside_difference.png", "desktop.png",
                  "desktop_timeout.png", "desktop_no_quit.png"):
        (artifacts / stale).unlink(missing_ok=True)
    config = dict(config, result=str(artifacts / "result.json"), messages=str(run.messages),
                  screenshot=str(artifacts / "desktop_inside.png"), quit_file=str(work / "quit-now"),
                  width=SCREEN[0], height=SCREEN[1])
    config_path = work / "config.json"
    config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")
    result_path = Path(config["result"])
    start = time.monotonic()
    with Xvfb(artifacts / "xvfb.log") as xvfb:
        env = clean_environment(DISPLAY=xvfb.display, XDG_RUNTIME_DIR=str(runtime),
                                AEH_DESKTOP_CONFIG=str(config_path))
        command = ["qgis", "--profiles-path", str(profiles_path), "--nologo", "--noversioncheck",
                   "--code", str(script)]
        with open(run.log, "wb") as log:
            proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=work,
                                    start_new_session=True)
        try:
            while time.monotonic() - start < hard_deadline_s and proc.poll() is None:
                result = _read_json(result_path)
                if result.get("phase") in ("done", "failed"):
                    run.reported = True
                    break
                time.sleep(0.5)
            run.result = _read_json(result_path)
            if run.reported:
                shot = artifacts / "desktop.png"
                if xvfb.screenshot(shot):
                    run.screenshot = shot
                Path(config["quit_file"]).touch()
                try:
                    run.returncode = proc.wait(exit_wait_s)
                    run.exited_cleanly = run.returncode == 0
                except subprocess.TimeoutExpired:
                    run.notes.append(f"QGIS did not quit within {exit_wait_s:.0f} s of the report")
                    xvfb.screenshot(artifacts / "desktop_no_quit.png")
            elif proc.poll() is None:
                run.notes.append(f"no report within {hard_deadline_s:.0f} s")
                shot = artifacts / "desktop_timeout.png"
                if xvfb.screenshot(shot):
                    run.screenshot = shot
            else:
                run.returncode = proc.returncode
                run.notes.append("QGIS exited before the script reported")
        finally:
            if proc.poll() is None:
                _stop_group(proc)  # run.returncode stays None: QGIS had to be killed
    run.seconds = round(time.monotonic() - start, 1)
    run.result = _read_json(result_path)
    shutil.rmtree(work, ignore_errors=True)
    return run


def _stop_group(proc: subprocess.Popen) -> None:
    """QGIS and whatever it started (pip, workers): its own process group, by id."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def describe_signal(returncode: Optional[int]) -> str:
    if returncode is None:
        return "killed by the test (did not quit)"
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit status {returncode}"
