"""The plugin in the real QGIS desktop binary (under Xvfb), installed from the release zip.

One QGIS session (the ``desktop_run`` fixture) is driven by qgis_startup.py through
the dock's widgets: install the plugin's worker environment, load the demo scene, use
the canvas extent as the area of interest, run with the bundled model and the reference
DSM. Its JSON report, logs and screenshots are kept in test-artifacts/desktop/.
"""

from __future__ import annotations

from pathlib import Path

from .desktop_harness import describe_signal


def _context(run) -> str:
    return "\n" + run.describe()


def test_qgis_reports_and_quits_without_crashing(desktop_run, capsys):
    run = desktop_run
    steps = ", ".join(f"{s['step']}@{s['t']}s{'' if s['ok'] else '(FAILED)'}" for s in run.result.get("steps", []))
    with capsys.disabled():
        print(f"\ndesktop: QGIS session {run.seconds:.0f} s, {describe_signal(run.returncode)}; steps: {steps}")
    assert run.reported, "the start-up script did not report before the deadline" + _context(run)
    assert run.returncode == 0, f"QGIS did not quit cleanly: {describe_signal(run.returncode)}" + _context(run)
    assert not run.result.get("python_errors"), "Python errors in QGIS:\n" + "\n".join(run.result["python_errors"])


def test_plugin_runs_from_the_zip_in_the_fresh_profile(desktop_run):
    result = desktop_run.result
    plugin_file = result.get("plugin_file")
    assert plugin_file, "the plugin never loaded" + _context(desktop_run)
    assert Path(plugin_file).is_relative_to(desktop_run.profile / "python" / "plugins" / "alphaearth_height")
    assert Path(result["settings_dir"]).resolve() == desktop_run.profile.resolve()
    assert "alphaearth_height" in result["active_plugins"]
    dock = next((s for s in result["steps"] if s["step"] == "dock_shown"), None)
    assert dock and dock["visible"] and dock["type"] == "HeightDock", _context(desktop_run)


def test_dock_installs_the_worker_environment(desktop_run, capsys):
    env = desktop_run.result.get("env") or {}
    with capsys.disabled():
        print(f"\ndesktop: plugin environment {env.get('mb', 0):.0f} MB in {env.get('dir')} "
              f"(installed in {env.get('seconds')} s, ready={env.get('ready')}, made from "
              f"{(env.get('pyvenv_cfg') or {}).get('home')}, runs use {env.get('worker_python')})")
    assert env.get("widget") == "env_install_button", \
        "the dock has no env_install_button: the plugin does not manage a worker environment yet" + _context(desktop_run)
    assert env.get("ready"), "environmentChanged(True) never came" + _context(desktop_run)
    assert env.get("exists") and Path(env["dir"]) == desktop_run.env_dir, env
    assert env["mb"] > 1, env
    worker = env.get("worker_python")
    if worker and not worker.startswith("unknown"):
        assert Path(worker).is_relative_to(desktop_run.env_dir), f"runs would use {worker}, not the environment"


def test_environment_is_built_on_the_python_qgis_runs_on(desktop_run):
    """A venv of QGIS's own interpreter reuses the system's numpy/GDAL/rasterio/matplotlib
    (here ~110 MB); one of another interpreter (e.g. a pyenv python3 first on PATH, which
    QGIS's embedded Python reports as sys.executable) pulls them all from PyPI (~320 MB)."""
    env = desktop_run.result.get("env") or {}
    cfg = env.get("pyvenv_cfg")
    assert cfg, "no pyvenv.cfg in the environment" + _context(desktop_run)
    assert cfg.get("include-system-site-packages") == "true", cfg
    version = cfg.get("version") or cfg.get("version_info")
    assert version == desktop_run.result["python"], \
        f"environment made from Python {version} in {cfg.get('home')}, QGIS runs Python {desktop_run.result['python']}"


def test_dock_run_adds_styled_height_and_difference_layers(desktop_run):
    result = desktop_run.result
    run = result.get("run")
    assert run is not None, "the run never started" + _context(desktop_run)
    assert run["ok"], "runFinished(False)" + _context(desktop_run)
    assert run["files_exist"] == {"predicted": True, "difference": True}, run
    for key in ("predicted", "difference"):
        layer = run[f"{key}_layer"]
        assert layer is not None, f"no project layer for the {key} raster {run[key]}: {result['layers']}"
        assert layer["valid"] and layer["pseudocolor"], layer
    assert run["metrics"], run


def test_torch_never_loads_in_the_qgis_process(desktop_run):
    result = desktop_run.result
    assert "run" in result, "the run never started, so this proves nothing" + _context(desktop_run)
    modules = result["modules"]
    print("modules in the QGIS process:", modules)
    assert modules["torch"] is False, f"torch was imported in QGIS: {result.get('torch_modules')}"


def test_screenshot_of_the_dock_and_layers(desktop_run):
    assert desktop_run.screenshot is not None and desktop_run.screenshot.is_file(), _context(desktop_run)
    assert desktop_run.screenshot.stat().st_size > 20_000  # a blank screen compresses to a few KB
    assert desktop_run.result.get("screenshot_inside") is True


def test_dock_shows_where_prediction_runs(desktop_run):
    """The "Run prediction on" group (opened for desktop_inside_difference.png): the run stays on this
    computer, and the Dask choices are enabled exactly when the worker's Python has Dask (the managed
    environment has it once 'Add Dask' installed it), with the way to get it as their tooltip otherwise."""
    state = desktop_run.result.get("run_on")
    assert state, "the dock has no run_on_group" + _context(desktop_run)
    assert state["title"] == "Run prediction on: this computer" and state["choice"] == "process", state
    assert not state["collapsed"] and state["buttons"]["process"]["enabled"], state
    dask_choices = [state["buttons"][key] for key in ("workers", "scheduler")]
    assert state["worker_has_dask"] is not None, state
    assert all(choice["enabled"] == state["worker_has_dask"] for choice in dask_choices), state
    if not state["worker_has_dask"]:
        assert all("'Add Dask' under Python environment" in choice["tooltip"] for choice in dask_choices), state
        assert "'Add Dask' under Python environment" in state["hint"], state
    assert "Dask" not in desktop_run.result["run"].get("device", ""), desktop_run.result["run"]
