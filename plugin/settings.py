"""Every setting the plugin keeps in QgsSettings, with its default, in one place.

Keys live under ``alphaearth_height/``. Some have widgets in the dock (remembered between
sessions); the others have none and are for those who need them: ``cog_base_url`` (a
copy of the public COGs behind a firewall) and ``max_fetch_gb`` (the size limit; empty
means $ALPHAEARTH_HEIGHT_MAX_GB, else 5 GB). Set them in Settings > Options > Advanced.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qgis.core import QgsSettings

from .core.choices import DEFAULT_YEAR

PREFIX = "alphaearth_height/"


def default_output_folder() -> str:
    """~/AlphaEarth Height: a temporary folder would lose the results at the next reboot."""
    return str(Path.home() / "AlphaEarth Height")


# key -> default (a callable is called when the default is needed)
DEFAULTS: dict[str, Any] = {
    "source": "file",            # the dock's source key (core.choices.SOURCES, local as file or layer)
    "year": DEFAULT_YEAR,
    "embeddings_file": "",
    "ee_project": "",            # Google Cloud project for Earth Engine
    "model": "bundled",          # "bundled" or "folder"
    "model_folder": "",
    "device": "auto",            # core.choices.DEVICES
    "run_on": "process",         # where prediction runs: "process" (one), "workers" (local Dask), "scheduler"
    "dask_workers": 2,           # local Dask worker processes when run_on is "workers"
    "dask_scheduler": "",        # tcp://HOST:PORT when run_on is "scheduler"
    "output_folder": default_output_folder,
    "dock_size": None,           # QSize of the dock when last closed
    "cog_base_url": "",          # no widget: a mirror of the public COGs
    "max_fetch_gb": "",          # no widget: the fetch size limit in GB
}


def read(key: str) -> Any:
    """The stored value of ``key``, else its default."""
    default = DEFAULTS[key]
    value = QgsSettings().value(PREFIX + key, None)
    if value is None or value == "" and default != "":
        return default() if callable(default) else default
    return value


def read_text(key: str) -> str:
    """``read`` as stripped text (settings edited by hand may hold numbers or spaces)."""
    value = read(key)
    return "" if value is None else str(value).strip()


def write(**values: Any) -> None:
    """Store each ``key=value`` (keys must be declared in DEFAULTS)."""
    settings = QgsSettings()
    for key, value in values.items():
        if key not in DEFAULTS:
            raise KeyError(f"undeclared setting {key!r}")
        settings.setValue(PREFIX + key, value)
