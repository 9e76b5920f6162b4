"""Files shipped inside the package: the QGIS metadata (the version), resources, requirement lists.

Found with ``importlib.resources`` from the package itself, never by climbing folders, so
the same code works from a wheel in site-packages, an editable install and the QGIS
plugins folder (where the plugin folder is the package). The package is always a folder
on disk there (pip unpacks wheels; QGIS unpacks the zip), and ONNX Runtime, GDAL and Qt
take file names, so ``resource`` returns a ``Path`` and refuses a zipped package loudly
rather than handing out a name nothing can open.

Nothing here imports more than the standard library: ``__init__`` reads the version
through this module while QGIS starts.
"""

from __future__ import annotations

import configparser
import re
from importlib.resources import files
from pathlib import Path

# The top package ("alphaearth_height"), whatever this copy is called.
PACKAGE = __name__.rsplit(".plugin.core.", 1)[0]
REQUIREMENTS_DIR = ("resources", "requirements")
# Distribution names whose import name is not the name with '-' -> '_' (the installer checks imports).
IMPORT_NAMES = {"earthengine-api": "ee"}


def package_root() -> Path:
    """The folder the package is imported from (site-packages/alphaearth_height, the plugin folder…)."""
    root = files(PACKAGE)
    if not isinstance(root, Path):
        raise RuntimeError(f"{PACKAGE} is imported from {root}, not a folder; install it unpacked "
                           "(pip install, or the QGIS plugin zip extracted into the plugins folder)")
    return root


def resource(*parts: str) -> Path:
    """A file or folder under the package's ``resources/`` (the icon, the bundled model…)."""
    return package_root().joinpath("resources", *parts)


def metadata(key: str) -> str:
    """A key of ``metadata.txt``, the plugin metadata QGIS reads (it holds the one version number)."""
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str  # QGIS keys are case-sensitive (qgisMinimumVersion)
    parser.read_string(package_root().joinpath("metadata.txt").read_text(encoding="utf-8"))
    return parser["general"][key].strip()


def version() -> str:
    """The package version: ``version=`` of metadata.txt (pyproject and ``__version__`` read it too)."""
    return metadata("version")


def requirements(extra: str) -> list[str]:
    """The PEP 508 requirements of ``core`` (the wheel's dependencies) or an extra (train, onnx, earthengine).

    One file per list under resources/requirements/: pyproject.toml reads them for the
    wheel's metadata, scripts/install_python.sh and the plugin's installer for pip.
    """
    path = package_root().joinpath(*REQUIREMENTS_DIR, f"{extra}.txt")
    if not path.is_file():
        raise ValueError(f"no requirement list {extra!r} in {path.parent}")
    lines = (line.split("#", 1)[0].strip() for line in path.read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line]


def import_name(requirement: str) -> str:
    """The module a requirement provides: ``segmentation-models-pytorch>=0.3`` -> ``segmentation_models_pytorch``."""
    match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement)
    if match is None:
        raise ValueError(f"not a requirement: {requirement!r}")
    name = match.group(0).lower()
    return IMPORT_NAMES.get(name, name.replace("-", "_").replace(".", "_"))
