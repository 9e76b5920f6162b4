"""Install the release zip into a QGIS profile's plugins folder, replacing an older copy.

The zip is unpacked beside the target first and swapped in with renames, so QGIS never
sees a half-copied plugin and a failed install leaves the previous copy in place.
Restart QGIS (or use the Plugin Reloader) afterwards.

Usage: python scripts/install_plugin.py [--zip dist/alphaearth_height.zip] [--profile-dir DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLUGIN_NAME = "alphaearth_height"


def default_profile_dir() -> Path:
    """The 'default' QGIS 3 user profile on this platform."""
    if sys.platform.startswith("win"):
        base = Path(os.environ.get("APPDATA", Path.home() / "AppData" / "Roaming"))
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Application Support"
    else:
        base = Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share"))
    return base / "QGIS" / "QGIS3" / "profiles" / "default"


def _extract(zip_path: Path, staging: Path) -> Path:
    """Unpack the zip into staging, refusing anything but one alphaearth_height/ folder."""
    with zipfile.ZipFile(zip_path) as archive:
        names = archive.namelist()
        tops = {name.split("/", 1)[0] for name in names}
        if tops != {PLUGIN_NAME}:
            raise SystemExit(f"install_plugin.py: {zip_path} must hold one top folder {PLUGIN_NAME}/, "
                             f"found {sorted(tops)}; build it with scripts/package.py")
        for name in names:
            if not (staging / name).resolve().is_relative_to(staging.resolve()):
                raise SystemExit(f"install_plugin.py: {zip_path} has an unsafe path {name!r}")
        archive.extractall(staging)
    return staging / PLUGIN_NAME


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def install(zip_path: Path, plugins_dir: Path) -> Path:
    """Install into plugins_dir/alphaearth_height, swapping out any older copy (or link)."""
    plugins_dir.mkdir(parents=True, exist_ok=True)
    target = plugins_dir / PLUGIN_NAME
    staging = Path(tempfile.mkdtemp(prefix=f".{PLUGIN_NAME}.new-", dir=plugins_dir))
    retired = plugins_dir / f".{PLUGIN_NAME}.old-{os.getpid()}"
    try:
        fresh = _extract(zip_path, staging)
        if target.exists() or target.is_symlink():
            os.replace(target, retired)
        try:
            os.replace(fresh, target)
        except OSError:
            if retired.exists() or retired.is_symlink():
                os.replace(retired, target)
            raise
    finally:
        _remove(staging)
        _remove(retired)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zip", type=Path, default=ROOT / "dist" / f"{PLUGIN_NAME}.zip",
                        help="release zip (default: dist/alphaearth_height.zip)")
    parser.add_argument("--profile-dir", type=Path, default=default_profile_dir(),
                        help="QGIS profile folder; the plugin goes to <profile>/python/plugins/ "
                             "(default: %(default)s)")
    args = parser.parse_args(argv)
    if not args.zip.is_file():
        parser.error(f"{args.zip} does not exist; run 'make package' first")
    target = install(args.zip, args.profile_dir / "python" / "plugins")
    print(f"installed {target}; restart QGIS and enable 'AlphaEarth Height' in Plugins > Manage and Install")
    return 0


if __name__ == "__main__":
    sys.exit(main())
