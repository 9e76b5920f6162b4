"""Fixtures for the desktop tests: one fresh QGIS profile with the release zip installed,
the demo scene, and one real QGIS desktop session driven by qgis_startup.py.

The tests skip where the desktop tools are missing, unless AEH_REQUIRE_DESKTOP=1
(``make test`` sets it after installing them), where they fail instead.
AEH_SKIP_DESKTOP=1 skips them outright; AEH_DESKTOP_ZIP=path tests that zip instead of
one built from this checkout.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .desktop_harness import (ROOT, build_zip, clean_environment, make_profile, missing_tools,
                              qgis_process_command, run_qgis_desktop)

# Time limits for the start-up script (seconds): pip fetches ~100 MB for the environment.
ENV_TIMEOUT_S = 480
RUN_TIMEOUT_S = 240
DEADLINE_S = 780
QUIT_WAIT_S = 30


def _require_desktop() -> None:
    if sys.platform != "linux":
        pytest.skip("desktop tests need Linux (Xvfb)")
    if os.environ.get("AEH_SKIP_DESKTOP") == "1":
        pytest.skip("AEH_SKIP_DESKTOP=1")
    missing = missing_tools()
    if not qgis_process_command():
        missing.append("qgis_process (Debian package qgis)")
    if missing:
        message = "desktop tools missing: " + ", ".join(missing)
        if os.environ.get("AEH_REQUIRE_DESKTOP") == "1":
            pytest.fail(message + " (make test installs them)")
        pytest.skip(message)


@pytest.fixture(scope="session")
def desktop_artifacts(artifacts_dir) -> Path:
    folder = artifacts_dir / "desktop"
    folder.mkdir(exist_ok=True)
    return folder


@pytest.fixture(scope="session")
def release_zip(tmp_path_factory) -> Path:
    _require_desktop()
    if os.environ.get("AEH_DESKTOP_ZIP"):
        return Path(os.environ["AEH_DESKTOP_ZIP"])
    return build_zip(tmp_path_factory.mktemp("dist"))


@pytest.fixture(scope="session")
def desktop_profiles(release_zip, tmp_path_factory) -> Path:
    """A fresh --profiles-path folder; its profiles/default holds the unzipped, enabled plugin."""
    root = tmp_path_factory.mktemp("qgis-profiles")
    make_profile(root, release_zip)
    return root


@pytest.fixture(scope="session")
def demo_scene(tmp_path_factory) -> Path:
    """embeddings.tif (64-band int8, EPSG:32630) and reference_dsm.tif (EPSG:2154), from the CLI."""
    _require_desktop()
    out = tmp_path_factory.mktemp("demo-scene")
    cli = Path(sys.executable).with_name("alphaearth-height")
    command = [str(cli)] if cli.is_file() else [sys.executable, "-m", "alphaearth_height.cli"]
    subprocess.run([*command, "demo", "--scene-only", "--out", str(out)], check=True, capture_output=True,
                   text=True, cwd=ROOT)
    assert (out / "embeddings.tif").is_file() and (out / "reference_dsm.tif").is_file()
    return out


@pytest.fixture(scope="session")
def desktop_run(desktop_profiles, demo_scene, desktop_artifacts, tmp_path_factory):
    """One QGIS desktop session: install the environment, run the dock on the demo scene, quit."""
    output = tmp_path_factory.mktemp("desktop-output")
    config = {"embeddings": str(demo_scene / "embeddings.tif"), "reference": str(demo_scene / "reference_dsm.tif"),
              "output_folder": str(output), "deadline_s": DEADLINE_S, "env_timeout_s": ENV_TIMEOUT_S,
              "run_timeout_s": RUN_TIMEOUT_S, "quit_wait_s": QUIT_WAIT_S,
              "legacy_install": os.environ.get("AEH_DESKTOP_LEGACY_INSTALL") == "1"}
    run = run_qgis_desktop(desktop_profiles, config, desktop_artifacts, hard_deadline_s=DEADLINE_S + 90)
    env_dir = run.profile / "alphaearth_height" / "env"
    run.env_dir = env_dir
    return run


@pytest.fixture(scope="session")
def qgis_process(desktop_profiles):
    """Run qgis_process with the test profile (QGIS_CUSTOM_CONFIG_PATH) and the plugin enabled there."""
    command = qgis_process_command()
    env = clean_environment(QT_QPA_PLATFORM="offscreen", QGIS_CUSTOM_CONFIG_PATH=str(desktop_profiles))

    def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([*command, *args], env=env, capture_output=True, text=True, timeout=timeout)

    run.command = command
    return run
