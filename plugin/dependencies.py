"""Python packages the plugin needs, and installing missing ones into a plugin folder.

QGIS ships its own Python without torch; the plugin must still load then, say what is
missing and offer to install it. Checks use ``find_spec`` so QGIS start-up never pays
for importing torch.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable, Optional

from qgis.core import QgsApplication, QgsTask

log = logging.getLogger(__name__)

# import name -> pip requirement
REQUIRED = {
    "torch": "torch",
    "segmentation_models_pytorch": "segmentation-models-pytorch",
    "safetensors": "safetensors",
    "rasterio": "rasterio",
    "matplotlib": "matplotlib",
}


def dependencies_dir() -> Path:
    """Per-profile folder holding packages the plugin installed (no admin rights needed)."""
    return Path(QgsApplication.qgisSettingsDirPath()) / "python" / "dependencies" / "alphaearth_height"


def add_dependencies_dir() -> Path:
    """Put the plugin's package folder on ``sys.path``.

    Appended, not prepended: packages pip pulls in as dependencies (numpy...) must not
    shadow the ones QGIS and GDAL were built against.
    """
    folder = str(dependencies_dir())
    if folder not in sys.path:
        sys.path.append(folder)
    return Path(folder)


def missing_dependencies() -> list[str]:
    """Import names of required packages that cannot be found (nothing is imported)."""
    importlib.invalidate_caches()
    return [name for name in REQUIRED if importlib.util.find_spec(name) is None]


def python_executable() -> str:
    """A Python interpreter able to run pip for this QGIS.

    ``sys.executable`` is the QGIS binary on Windows and macOS, so it is only used when
    it really is a Python; then the base interpreter, the one beside the prefix, PATH.
    """
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    prefix = Path(sys.exec_prefix)
    candidates = [sys.executable, getattr(sys, "_base_executable", ""),
                  str(prefix / "python.exe"), str(prefix / "bin" / f"python{version}"), str(prefix / "bin" / "python3"),
                  shutil.which(f"python{version}") or "", shutil.which("python3") or ""]
    for candidate in candidates:
        if candidate and Path(candidate).name.lower().startswith("python") and os.path.isfile(candidate):
            return candidate
    raise RuntimeError("No Python interpreter found to run pip; install the packages by hand: "
                       + " ".join(REQUIRED.values()))


def pip_command(packages: list[str], target: Path) -> list[str]:
    """``python -m pip install --target <folder> <packages>``."""
    return [python_executable(), "-m", "pip", "install", "--disable-pip-version-check", "--no-input",
            "--target", str(target), *packages]


class InstallTask(QgsTask):
    """Runs pip in the background; ``finished`` reports back on the main thread."""

    def __init__(self, modules: list[str], on_done: Callable[["InstallTask"], None]) -> None:
        super().__init__("AlphaEarth Height: installing " + ", ".join(modules), QgsTask.Flag.CanCancel)
        self.packages = [REQUIRED[m] for m in modules]
        self.on_done: Optional[Callable[[InstallTask], None]] = on_done
        self.output: list[str] = []
        self.error = ""

    def run(self) -> bool:
        target = dependencies_dir()
        try:
            target.mkdir(parents=True, exist_ok=True)
            command = pip_command(self.packages, target)
        except (OSError, RuntimeError) as exc:
            self.error = str(exc)
            return False
        log.info("Running %s", " ".join(command))
        with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
            steps = 0
            for line in proc.stdout:
                self.output.append(line.rstrip())
                if line.startswith(("Collecting", "Downloading", "Installing")):
                    steps += 1  # pip gives no total: approach 95 % as steps accumulate
                    self.setProgress(95.0 * (1.0 - 0.85 ** steps))
                if self.isCanceled():
                    proc.terminate()
                    return False
        if proc.returncode != 0:
            self.error = "pip failed:\n" + "\n".join(self.output[-20:])
            log.error(self.error)
            return False
        return True

    def finished(self, ok: bool) -> None:
        if self.on_done:
            self.on_done(self)
