"""Build the QGIS plugin release zip: dist/alphaearth_height.zip, one top folder alphaearth_height/.

Only what QGIS needs at run time goes in (an allow-list of top-level entries, so new
developer folders stay out by default); caches and hidden files (.git*, training
staging folders) are skipped at every depth. The zip is reproducible (sorted entries,
fixed timestamps) and refused above the plugin repository's 25 MB limit.

Usage: python scripts/package.py [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[1]
PLUGIN_NAME = "alphaearth_height"
INCLUDE = ("__init__.py", "metadata.txt", "cli.py", "README.md", "LICENSE", "LICENSE.txt", "LICENSE.md",
           "plugin", "training", "resources")
SKIP_DIRS = {"__pycache__"}
SKIP_SUFFIXES = {".pyc", ".pyo"}
MAX_BYTES = 25 * 1000 * 1000
FIXED_TIME = (1980, 1, 1, 0, 0, 0)


def _skipped(name: str) -> bool:
    return name.startswith(".") or name in SKIP_DIRS or Path(name).suffix in SKIP_SUFFIXES


def plugin_files(root: Path = ROOT) -> Iterator[Path]:
    """Files of the release, relative to the repository root, in a stable order."""
    for entry in INCLUDE:
        path = root / entry
        if path.is_file():
            yield Path(entry)
        elif path.is_dir():
            for folder, dirs, files in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not _skipped(d))
                for name in sorted(files):
                    if not _skipped(name):
                        yield (Path(folder) / name).relative_to(root)


def _add(archive: zipfile.ZipFile, source: Path, arcname: str) -> None:
    """Add one file with a fixed timestamp, keeping its permission bits."""
    info = zipfile.ZipInfo(arcname, FIXED_TIME)
    info.external_attr = (source.stat().st_mode & 0o777 | 0o100000) << 16
    info.compress_type = zipfile.ZIP_DEFLATED
    with open(source, "rb") as fh:
        archive.writestr(info, fh.read())


def build(out_dir: Path, root: Path = ROOT) -> Path:
    """Write <out_dir>/alphaearth_height.zip atomically; raise if it exceeds MAX_BYTES."""
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{PLUGIN_NAME}.zip"
    fd, tmp = tempfile.mkstemp(prefix=f".{PLUGIN_NAME}.", suffix=".zip", dir=out_dir)
    os.close(fd)
    try:
        with zipfile.ZipFile(tmp, "w", compresslevel=9) as archive:
            for relative in plugin_files(root):
                _add(archive, root / relative, f"{PLUGIN_NAME}/{relative.as_posix()}")
        size = os.path.getsize(tmp)
        if size > MAX_BYTES:
            raise SystemExit(f"package.py: {size / 1e6:.1f} MB is over the plugin repository's "
                             f"{MAX_BYTES / 1e6:.0f} MB limit; shrink resources/ (e.g. the bundled model)")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "dist", help="output folder (default: dist/)")
    args = parser.parse_args(argv)
    target = build(args.out)
    print(f"wrote {target} ({target.stat().st_size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
