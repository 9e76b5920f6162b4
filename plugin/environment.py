"""The Python environment the plugin manages for its worker process.

QGIS's own Python is never changed: torch in the QGIS process crashed it (two LLVMs) and
packages appended to its ``sys.path`` were shadowed by the system's older ones. Instead
the plugin keeps a virtual environment in the QGIS profile, made from the system Python
with ``--system-site-packages``: what the system already has (numpy, GDAL's rasterio,
matplotlib on Debian) is reused, what is missing or too old is installed into the
environment, whose packages come first on its ``sys.path``. numpy is pinned to the
system's version so the system's compiled packages keep working there.

Three sets, made of the package's requirement lists (resources/requirements/, which
pyproject.toml also reads): inference (the core list: ONNX Runtime, rasterio, numpy,
matplotlib, plus the Earth Engine client: a few tens to a few hundred MB), training
(the train and onnx lists: PyTorch and segmentation-models-pytorch, GBs with CUDA) and
dask (predictions on a Dask cluster: a few tens of MB); the last two are installed only
when asked for. Nothing here imports QGIS; the dock runs these steps
in tasks.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Optional

from .core.package_data import import_name, requirements

PackageSet = Literal["inference", "training", "dask"]
PYTHON_OVERRIDE = "ALPHAEARTH_HEIGHT_PYTHON"  # an interpreter to use instead of the managed environment
READY_FILE = "alphaearth_height_ready.json"


def _import_to_requirement(*lists: str) -> dict[str, str]:
    """import name -> requirement, from the package's requirement lists (the ones pyproject.toml reads)."""
    return {import_name(req): req for name in lists for req in requirements(name)}


# One dict per set, read by the installer (which checks the imports) and the status line.
# Inference carries the Earth Engine client: the dock offers that source, and the fetch
# runs in this environment.
INFERENCE: dict[str, str] = _import_to_requirement("core", "earthengine")
TRAINING: dict[str, str] = _import_to_requirement("train", "onnx")
DASK: dict[str, str] = _import_to_requirement("dask")
SETS: dict[str, dict[str, str]] = {"inference": INFERENCE, "training": TRAINING, "dask": DASK}
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
LineFn = Callable[[str], None]


class SetupError(RuntimeError):
    """Setting up the environment failed; the message is one line for the user."""


@dataclass
class InstallPlan:
    """What pip would download: (name, version, bytes or None) per package."""

    packages: list[tuple[str, str, Optional[int]]] = field(default_factory=list)

    @property
    def total_bytes(self) -> Optional[int]:
        sizes = [size for _, _, size in self.packages]
        return None if any(size is None for size in sizes) else sum(sizes)

    def describe(self) -> str:
        if not self.packages:
            return "nothing to download"
        total = self.total_bytes
        names = ", ".join(f"{name} {version}" for name, version, _ in self.packages)
        size = f"{total / 1e6:,.0f} MB" if total is not None else "size unknown"
        return f"download {size}: {names}"


class ManagedEnvironment:
    """The environment folder, its interpreter and what is installed in it."""

    def __init__(self, folder: Path, base_python: Optional[str] = None) -> None:
        self.folder = Path(folder)
        self._base_python = base_python

    @property
    def python(self) -> Path:
        return self.folder / ("Scripts/python.exe" if os.name == "nt" else "bin/python")

    @property
    def base_python(self) -> str:
        return self._base_python or system_python()

    def installed_sets(self) -> list[str]:
        """The sets installed with today's requirement lists: a set installed by an older version
        whose list has grown since (e.g. the Earth Engine client) counts as missing, so the dock
        offers Install again, which adds only what is new."""
        try:
            marker = json.loads((self.folder / READY_FILE).read_text())
            sets, recorded = list(marker["sets"]), set(marker.get("requirements", []))
        except (OSError, ValueError, KeyError, TypeError):
            return []
        return [name for name in sets if name in SETS and set(SETS[name].values()) <= recorded]

    def is_ready(self, package_set: PackageSet = "inference") -> bool:
        return self.python.is_file() and package_set in self.installed_sets()

    def size_bytes(self) -> int:
        total = 0
        for folder, _, files in os.walk(self.folder):
            for name in files:
                try:
                    total += os.lstat(os.path.join(folder, name)).st_size
                except OSError:
                    pass
        return total

    def requirements(self, package_set: PackageSet) -> list[str]:
        return list(self._wanted(package_set).values())

    @staticmethod
    def _wanted(package_set: PackageSet) -> dict[str, str]:
        """import name -> requirement of a set, on top of inference (which every run needs)."""
        return dict(INFERENCE, **SETS[package_set])

    # ---- steps ------------------------------------------------------------------------------

    def create(self, log: LineFn) -> None:
        """The virtual environment itself (with pip when the system Python can provide it)."""
        if self.python.is_file():
            return
        self.folder.parent.mkdir(parents=True, exist_ok=True)
        base = [self.base_python, "-m", "venv", "--system-site-packages"]
        try:
            _run(base + [str(self.folder)], log)
        except SetupError:
            shutil.rmtree(self.folder, ignore_errors=True)  # no ensurepip (Debian without python3-venv)
            _run(base + ["--without-pip", str(self.folder)], log)

    def pip(self) -> list[str]:
        """pip for this environment: its own, or the system's aimed at it (``--python``)."""
        probe = subprocess.run([str(self.python), "-c", "import pip"], capture_output=True)
        if probe.returncode == 0:
            return [str(self.python), "-m", "pip"]
        return [self.base_python, "-m", "pip", "--python", str(self.python)]

    def pip_install_args(self, package_set: PackageSet) -> list[str]:
        args = ["install", "--disable-pip-version-check", "--no-input", "--progress-bar", "off"]
        constraints = self._constraints()
        if constraints:
            args += ["-c", str(constraints)]
        if package_set == "training" and not nvidia_gpu_present() and platform.system() != "Darwin":
            args += ["--extra-index-url", TORCH_CPU_INDEX]  # CPU torch: ~0.8 GB instead of ~5 GB of CUDA
        return args + self.requirements(package_set)

    def _constraints(self) -> Optional[Path]:
        """Keep the system's numpy (its compiled packages need it); older numpy keeps older onnx."""
        probe = subprocess.run([str(self.python), "-c", "import numpy; print(numpy.__version__)"],
                               capture_output=True, text=True)
        if probe.returncode != 0:
            return None
        version = probe.stdout.strip()
        lines = [f"numpy=={version}"]
        if int(version.split(".")[0]) < 2:
            lines += requirements("constraints-numpy1")
        path = self.folder / "constraints.txt"
        path.write_text("\n".join(lines) + "\n")
        return path

    def plan(self, package_set: PackageSet, log: LineFn) -> InstallPlan:
        """What installing ``package_set`` would download (pip's dry run), with sizes."""
        self.create(log)
        command = self.pip() + self.pip_install_args(package_set)
        command[command.index("install") + 1:command.index("install") + 1] = ["--dry-run", "--quiet", "--report", "-"]
        output = _run(command, log, quiet=True)
        report = json.loads(output[output.index("{"):])
        plan = InstallPlan()
        for item in report.get("install", []):
            meta = item.get("metadata", {})
            plan.packages.append((meta.get("name", "?"), meta.get("version", "?"),
                                  _download_size(item.get("download_info", {}).get("url", ""))))
        return plan

    def install(self, package_set: PackageSet, log: LineFn) -> None:
        """Install a set; the environment is marked ready only once every package imports."""
        self.create(log)
        _run(self.pip() + self.pip_install_args(package_set), log)
        check = "import " + ", ".join(self._wanted(package_set))
        _run([str(self.python), "-c", check], log)
        sets = sorted(set(self.installed_sets()) | {"inference", package_set})
        recorded = sorted({req for name in sets for req in SETS[name].values()})
        (self.folder / READY_FILE).write_text(json.dumps({"sets": sets, "python": self.base_python,
                                                          "requirements": recorded}) + "\n")

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=False)


def worker_python(environment: ManagedEnvironment) -> Optional[str]:
    """The interpreter that runs the worker: the override, or the managed environment once ready."""
    override = os.environ.get(PYTHON_OVERRIDE, "").strip()
    if override:
        return override
    return str(environment.python) if environment.is_ready() else None


def system_python() -> str:
    """A Python interpreter of the system QGIS runs on (``sys.executable`` is QGIS itself there)."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    prefix = Path(sys.base_exec_prefix)
    # The interpreter of QGIS's own Python installation first: an embedded Python may report
    # whichever python3 is first on PATH as sys.executable (a pyenv one, say), whose venv
    # would not see the system's numpy, GDAL and rasterio and download them all again.
    candidates = [str(prefix / "bin" / f"python{version}"), str(prefix / "bin" / "python3"),
                  str(prefix / "python.exe"), str(prefix / "python3.exe"), getattr(sys, "_base_executable", ""),
                  sys.executable, shutil.which(f"python{version}") or "", shutil.which("python3") or ""]
    for candidate in candidates:
        if candidate and Path(candidate).name.lower().startswith("python") and os.path.isfile(candidate):
            return candidate
    raise SetupError("No Python interpreter was found next to QGIS to create the plugin's environment. "
                            "Install Python 3 (Debian: apt install python3-venv)")


def nvidia_gpu_present() -> bool:
    return shutil.which("nvidia-smi") is not None


def _run(command: list[str], log: LineFn, quiet: bool = False) -> str:
    """Run a set-up command; its output lines go to ``log`` (unless ``quiet``) and its stdout is returned.

    ``log`` may raise to cancel: the command is then killed.
    """
    log("$ " + " ".join(command))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE if quiet else subprocess.STDOUT,
                          text=True, env=env) as proc:
        try:
            if quiet:
                out, err = proc.communicate()
            else:
                lines = []
                for line in proc.stdout:
                    lines.append(line)
                    log(line.rstrip())
                out, err = "".join(lines), ""
                proc.wait()
        except BaseException:
            proc.kill()
            raise
    if proc.returncode != 0:
        text = (err or out).strip().splitlines()
        reason = next((line for line in reversed(text) if re.match(r"\s*(ERROR|error)", line)), text[-1] if text else "")
        raise SetupError(f"{Path(command[0]).name} {' '.join(command[1:3])} failed: {reason.strip()}")
    return out


def _download_size(url: str) -> Optional[int]:
    """Bytes behind a wheel's URL: a local file's size, or the server's Content-Length."""
    if url.startswith("file://"):
        path = urllib.request.url2pathname(url[len("file://"):])
        return os.path.getsize(path) if os.path.isfile(path) else None
    if not url.startswith(("http://", "https://")):
        return None
    request = urllib.request.Request(url, method="HEAD", headers={"User-Agent": "alphaearth-height-plugin"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - the index pip chose
            length = response.headers.get("Content-Length")
            return int(length) if length else None
    except (OSError, ValueError):
        return None


def profile_environment() -> ManagedEnvironment:
    """The environment of the current QGIS profile (``<profile>/alphaearth_height/env``)."""
    from qgis.core import QgsApplication

    return ManagedEnvironment(Path(QgsApplication.qgisSettingsDirPath()) / "alphaearth_height" / "env")


def require_worker_python() -> str:
    """The worker's interpreter, or a one-line error saying how to get it."""
    python = worker_python(profile_environment())
    if python is None:
        raise SetupError("The plugin's Python environment is not installed: open the AlphaEarth Height dock "
                         "and click Install (or set " + PYTHON_OVERRIDE + " to a Python with the packages)")
    return python
