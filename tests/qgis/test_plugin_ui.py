"""The QGIS plugin UI with real PyQGIS (offscreen): plugin life cycle, dock, AOI tool,
background runs, styled layers, errors on the message bar, rendered PNGs."""

from __future__ import annotations

import datetime
import json
import logging
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import rasterio

pytest.importorskip("qgis.core")

from qgis.core import (Qgis, QgsApplication, QgsCoordinateReferenceSystem, QgsMapRendererParallelJob,  # noqa: E402
                       QgsMapSettings, QgsProject, QgsRasterLayer, QgsRectangle, QgsSettings,
                       QgsSingleBandPseudoColorRenderer)
from qgis.gui import QgsMapCanvas, QgsMapMouseEvent, QgsMessageBar, QgsRubberBand  # noqa: E402
from qgis.PyQt.QtCore import QEvent, QPoint, QPointF, QSize, Qt  # noqa: E402
from qgis.PyQt.QtGui import QColor, QWheelEvent  # noqa: E402
from qgis.PyQt.QtWidgets import (QAbstractButton, QAbstractSpinBox, QComboBox, QDockWidget, QLabel,  # noqa: E402
                                 QLineEdit, QMainWindow, QPlainTextEdit, QProgressBar, QTextBrowser, QVBoxLayout,
                                 QWidget)

from alphaearth_height.plugin.core.aoi import AreaOfInterest  # noqa: E402
from alphaearth_height.plugin.core.errors import InputError  # noqa: E402
from alphaearth_height.plugin.core.job import FETCH_END  # noqa: E402
from alphaearth_height.plugin.environment import PYTHON_OVERRIDE  # noqa: E402
from alphaearth_height.plugin.log import TAG  # noqa: E402
from alphaearth_height.plugin.ui import dock as dock_module  # noqa: E402

UTM = QgsCoordinateReferenceSystem("EPSG:32630")
RUN_TIMEOUT_S = 240


class Iface:
    """A small real stand-in for QgisInterface: real main window, canvas and message bar."""

    def __init__(self) -> None:
        self.window = QMainWindow()
        central = QWidget()
        layout = QVBoxLayout(central)
        self.bar = QgsMessageBar()
        self.canvas = QgsMapCanvas()
        self.canvas.setDestinationCrs(UTM)
        layout.addWidget(self.bar)
        layout.addWidget(self.canvas)
        self.window.setCentralWidget(central)
        self.toolbar = self.window.addToolBar("Plugins")
        self.menus: dict[str, list] = {}
        self.window.resize(1000, 700)
        self.window.show()
        QgsApplication.processEvents()

    def mainWindow(self) -> QMainWindow:  # noqa: N802 - QgisInterface names
        return self.window

    def mapCanvas(self) -> QgsMapCanvas:  # noqa: N802
        return self.canvas

    def messageBar(self) -> QgsMessageBar:  # noqa: N802
        return self.bar

    def addDockWidget(self, area, dock: QDockWidget) -> None:  # noqa: N802
        self.window.addDockWidget(area, dock)

    def removeDockWidget(self, dock: QDockWidget) -> None:  # noqa: N802
        self.window.removeDockWidget(dock)

    def addToolBarIcon(self, action) -> None:  # noqa: N802
        self.toolbar.addAction(action)

    def removeToolBarIcon(self, action) -> None:  # noqa: N802
        self.toolbar.removeAction(action)

    def addPluginToMenu(self, name: str, action) -> None:  # noqa: N802
        self.menus.setdefault(name, []).append(action)

    def removePluginMenu(self, name: str, action) -> None:  # noqa: N802
        self.menus[name].remove(action)
        if not self.menus[name]:
            del self.menus[name]

    def messages(self) -> list[str]:
        return [item.text() for item in self.bar.items()]

    def close(self) -> None:
        self.window.close()
        self.window.deleteLater()
        flush_deletes()


def flush_deletes() -> None:
    QgsApplication.sendPostedEvents(None, QEvent.Type.DeferredDelete)
    QgsApplication.processEvents()


def start_plugin(iface: Iface):
    import alphaearth_height

    plugin = alphaearth_height.classFactory(iface)
    plugin.initGui()
    return plugin


def open_dock(plugin) -> dock_module.HeightDock:
    plugin.action.trigger()
    QgsApplication.processEvents()
    return plugin.dock


def scene_aoi(scene, inset: float = 200.0) -> AreaOfInterest:
    left, bottom, right, top = scene.grid.bounds
    return AreaOfInterest(left + inset, bottom + inset, right - inset, top - inset, "EPSG:32630")


def add_raster(path: Path, name: str) -> QgsRasterLayer:
    layer = QgsRasterLayer(str(path), name, "gdal")
    assert layer.isValid(), path
    QgsProject.instance().addMapLayer(layer)
    return layer


def configure(dock, scene, model: Path, out_dir: Path, reference: QgsRasterLayer | None = None) -> None:
    """Fill the dock as a user would: embeddings file, model folder, CPU, output, AOI."""
    dock.source_combo.setCurrentIndex(dock.source_combo.findData("file"))
    dock.year_spin.setValue(2020)
    dock.embeddings_file.setFilePath(str(scene.embeddings))
    dock.folder_radio.setChecked(True)
    dock.model_folder.setFilePath(str(model))
    dock.device_combo.setCurrentIndex(dock.device_combo.findData("cpu"))
    dock.output_folder.setFilePath(str(out_dir))
    dock.reference_combo.setLayer(reference)
    dock.set_aoi(scene_aoi(scene))


def run_and_wait(dock) -> bool | None:
    """Click Run; when a task starts, pump events until the dock reports its outcome."""
    outcome: list[bool] = []
    dock.runFinished.connect(outcome.append)
    dock.run()
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while dock.is_running() and not outcome and time.monotonic() < deadline:
        QgsApplication.processEvents()
        time.sleep(0.01)
    dock.runFinished.disconnect(outcome.append)
    assert not dock.is_running(), "run did not finish in time"
    return outcome[0] if outcome else None


def result_layers() -> list[str]:
    return [layer.name() for layer in QgsProject.instance().mapLayers().values()
            if layer.name() in ("height", "difference")]


def fresh_state() -> None:
    """Empty project and no remembered dock choices, so tests do not leak into each other."""
    QgsProject.instance().clear()
    QgsSettings().remove("alphaearth_height")


@pytest.fixture
def iface(qgis_app):
    fresh_state()
    stand_in = Iface()
    yield stand_in
    stand_in.close()
    fresh_state()


@pytest.fixture
def plugin(iface):
    loaded = start_plugin(iface)
    yield loaded
    loaded.unload()
    flush_deletes()


@pytest.fixture
def dock(plugin):
    return open_dock(plugin)


# ---- life cycle -------------------------------------------------------------------------------


def test_plugin_loads_and_unloads_cleanly(iface):
    handlers_before = len(logging.getLogger("alphaearth_height").handlers)
    plugin = start_plugin(iface)
    assert plugin.action in iface.toolbar.actions()
    assert plugin.action in iface.menus["&AlphaEarth Height"]
    assert not [p for p in __import__("sys").path if "alphaearth_height" in p and "dependencies" in p]
    assert plugin.dock is None, "the dock is built lazily"
    dock = open_dock(plugin)
    assert dock is not None and dock.isVisible() and plugin.action.isChecked()
    assert dock.work is plugin.work and not dock._owns_work  # the plugin owns the tasks, the dock asks
    assert iface.window.findChildren(dock_module.HeightDock) == [dock]
    dock.draw_button.click()
    assert iface.canvas.mapTool() is dock.map_tool
    dock.set_aoi(AreaOfInterest(0, 0, 1000, 1000, "EPSG:32630"))
    assert any(isinstance(item, QgsRubberBand) for item in iface.canvas.scene().items())

    plugin.unload()
    flush_deletes()
    assert iface.toolbar.actions() == [] and iface.menus == {}
    assert iface.window.findChildren(dock_module.HeightDock) == []
    assert iface.canvas.mapTool() is None
    assert not any(isinstance(item, QgsRubberBand) for item in iface.canvas.scene().items())
    assert len(logging.getLogger("alphaearth_height").handlers) == handlers_before


def test_action_toggles_dock(plugin):
    dock = open_dock(plugin)
    plugin.action.trigger()
    assert not dock.isVisible()
    plugin.action.trigger()
    assert dock.isVisible()
    dock.close()
    assert not plugin.action.isChecked()


def test_python_logging_reaches_log_panel(plugin):
    received = []

    def collect(message, tag, level):
        received.append((message, tag, level))

    QgsApplication.messageLog().messageReceived.connect(collect)
    logging.getLogger("alphaearth_height.plugin.tasks").error("download failed token=abc123")
    QgsApplication.messageLog().messageReceived.disconnect(collect)
    ours = [(m, level) for m, tag, level in received if tag == TAG]
    assert ours and "failed" in ours[-1][0] and "abc123" not in ours[-1][0]
    assert ours[-1][1] == Qgis.MessageLevel.Critical


def test_runs_use_the_worker_interpreter_never_qgis_python(dock, monkeypatch):
    assert dock.run_button.isEnabled()
    assert PYTHON_OVERRIDE in dock.env_label.text()
    assert not dock.env_install_button.isVisibleTo(dock)


# ---- dock -----------------------------------------------------------------------------------


def test_dock_builds_with_expected_controls(dock, iface):
    combo = dock.source_combo
    labels = [combo.itemText(i) for i in range(combo.count())]
    assert labels == ["Local raster file", "Raster layer", "AlphaEarth public COGs (no account)",
                      "Google Earth Engine (needs an account)"]
    assert all(combo.model().item(i).isEnabled() and combo.itemData(i, Qt.ItemDataRole.ToolTipRole)
               for i in range(combo.count()))
    shown = {}
    for key in ("file", "layer", "cog", "earthengine"):
        combo.setCurrentIndex(combo.findData(key))
        shown[key] = [w.isVisibleTo(dock) for w in (dock.embeddings_file, dock.embeddings_layer, dock.project_edit)]
    assert shown == {"file": [True, False, False], "layer": [False, True, False], "cog": [False, False, False],
                     "earthengine": [False, False, True]}
    assert (dock.year_spin.minimum(), dock.year_spin.maximum()) == (2017, datetime.date.today().year)
    assert [dock.device_combo.itemData(i) for i in range(3)] == ["auto", "cpu", "cuda"]
    assert dock.reference_combo.allowEmptyLayer() and dock.reference_combo.currentLayer() is None
    assert dock.env_group.isVisibleTo(dock) and dock.run_button.isEnabled()


def test_aoi_estimate_shown_before_fetching(dock):
    dock.set_aoi(AreaOfInterest(690_000, 4_970_000, 692_000, 4_971_000, "EPSG:32630"))
    text = dock.aoi_label.text()
    assert "2.00 km²" in text and "200 × 100 px" in text and "EPSG:32630" in text
    # whole 1024² blocks of all 64 bands for the COGs (tens of MB even for a small area)
    from alphaearth_height.plugin.core.fetch.cog import offline_download_bytes

    cog = dock_module.human_bytes(offline_download_bytes(200, 100))
    assert cog.endswith(" MB") and float(cog.split()[0]) > 20
    assert f"{cog} (COG int8 blocks)" in text and "5.1 MB (Earth Engine float32)" in text
    # the grid fetch writes: an area of 995 m is 100 px (snapped outwards), not 99
    dock.set_aoi(AreaOfInterest(690_003, 4_970_000, 690_998, 4_970_995, "EPSG:32630"))
    assert "100 × 100 px" in dock.aoi_label.text()


def test_settings_persist(dock, iface, tiny_model, tmp_path):
    dock.year_spin.setValue(2023)
    dock.folder_radio.setChecked(True)
    dock.model_folder.setFilePath(str(tiny_model))
    dock.device_combo.setCurrentIndex(dock.device_combo.findData("cpu"))
    dock.output_folder.setFilePath(str(tmp_path))
    dock.source_combo.setCurrentIndex(dock.source_combo.findData("earthengine"))
    dock.project_edit.setText(" my-cloud-project ")
    dock.save_settings()
    again = dock_module.HeightDock(iface)
    try:
        assert again.year_spin.value() == 2023
        assert again.folder_radio.isChecked() and again.model_folder.filePath() == str(tiny_model)
        assert again.device_combo.currentData() == "cpu"
        assert again.output_folder.filePath() == str(tmp_path)
        assert again.source_combo.currentData() == "earthengine"
        assert again.project_edit.text() == "my-cloud-project" and again.project_edit.isVisibleTo(again)
        assert again.source_options() == {"project": "my-cloud-project"}
        assert "tiny test U-Net" in again.card_text.toPlainText()
    finally:
        again.shutdown()
        again.deleteLater()


def test_without_an_environment_the_dock_offers_to_install_one(dock, monkeypatch, tmp_path):
    """No worker Python yet: Install is offered with the download size pip's dry run reports."""
    from alphaearth_height.plugin.environment import ManagedEnvironment, InstallPlan

    monkeypatch.delenv(PYTHON_OVERRIDE)
    dock.environment = ManagedEnvironment(tmp_path / "env")
    plans = []
    monkeypatch.setattr(dock, "_start_env_task", lambda action, package_set: plans.append((action, package_set)))
    dock.refresh_environment()
    assert plans == [("plan", "inference")], "the download size is checked as soon as the dock shows"
    assert dock.env_install_button.isVisibleTo(dock) and not dock.run_button.isEnabled()
    dock._plan_text = "Install will " + InstallPlan([("onnxruntime", "1.32.0", 28_000_000)]).describe() + "."
    dock.refresh_environment()
    assert "download 28 MB: onnxruntime 1.32.0" in dock.env_label.text()
    dock.run()
    assert any("Python environment: is not installed" in text for text in dock.iface.messages())


def test_model_card_shown(dock, tiny_model, tmp_path):
    folder = tmp_path / "trained"
    shutil.copytree(tiny_model, folder)
    card = json.loads((folder / "model.json").read_text())
    card["training"] = {"region": "Occitanie", "year": 2020, "crs": "EPSG:32631"}
    card["metrics"] = {"test": {"r2": 0.81, "rmse": 4.25, "mae": 3.1, "nmad": 2.5}}
    (folder / "model.json").write_text(json.dumps(card))
    dock.folder_radio.setChecked(True)
    dock.model_folder.setFilePath(str(folder))
    text = dock.card_text.toPlainText()
    assert "unet / resnet18" in text and "Occitanie (2020)" in text
    assert "R² 0.810" in text and "RMSE 4.25 m" in text


def test_terrain_picker_only_for_terrain_models(dock, iface, small_scene, tiny_model, terrain_model, scene_terrain,
                                               tmp_path):
    configure(dock, small_scene, tiny_model, tmp_path)
    assert not dock.terrain_row.isVisibleTo(dock) and dock.build_job().terrain is None
    dock.model_folder.setFilePath(str(terrain_model))
    assert dock.terrain_row.isVisibleTo(dock) and dock.terrain_combo.allowEmptyLayer()
    with pytest.raises(InputError, match="coarse terrain"):
        dock.build_job()
    dock.terrain_combo.setLayer(add_raster(scene_terrain, "terrain"))
    assert dock.build_job().terrain == str(scene_terrain)
    assert run_and_wait(dock) is True
    with rasterio.open(dock.last_result.predicted) as ds:
        assert ds.tags()["TERRAIN"] == "terrain.tif"
    dock.bundled_radio.setChecked(True)
    assert not dock.terrain_row.isVisibleTo(dock)


def test_copernicus_dem_is_a_terrain_choice(dock, iface, small_scene, terrain_model, scene_terrain, tmp_path,
                                            monkeypatch):
    """A model trained relative to the Copernicus DEM gets it preselected; the run downloads it for the area
    (in the worker, here from the 127.0.0.1 mirror of tests/dem_mirror.py)."""
    from conftest import save_tiny_model
    from dem_mirror import build_dem_mirror
    from range_server import RangeServer

    from alphaearth_height.plugin.core import dem

    model = save_tiny_model(tmp_path / "dem_model", "tiny DEM U-Net",
                            relative_to={"input": "coarse terrain", "product": "copernicus-30",
                                         "file": "Copernicus DEM GLO-30"})
    configure(dock, small_scene, model, tmp_path)
    assert dock.terrain_row.isVisibleTo(dock) and dock.terrain_source.currentData() == "copernicus-30"
    assert not dock.terrain_combo.isVisibleTo(dock)  # no layer needed
    assert [dock.terrain_source.itemData(i) for i in range(dock.terrain_source.count())] == [
        *dem.TERRAIN_PRODUCTS, "layer"]
    assert dock.build_job().terrain == "copernicus-30"
    dock.terrain_source.setCurrentIndex(dock.terrain_source.findData("copernicus-90"))
    assert dock.build_job().terrain == "copernicus-90"
    dock.terrain_source.setCurrentIndex(dock.terrain_source.findData("layer"))
    assert dock.terrain_combo.isVisibleTo(dock)
    dock.terrain_combo.setLayer(add_raster(scene_terrain, "terrain"))
    assert dock.build_job().terrain == str(scene_terrain)
    dock.model_folder.setFilePath(str(terrain_model))  # trained with a file: the layer stays the choice
    assert dock.terrain_source.currentData() == "layer"
    dock.model_folder.setFilePath(str(model))
    assert dock.terrain_source.currentData() == "copernicus-30"
    dock.reference_combo.setLayer(add_raster(small_scene.reference, "dsm"))
    assert not dock.baseline_label.isVisibleTo(dock)
    root = tmp_path / "mirror"
    buckets = build_dem_mirror(root, keys=("copernicus-30",))
    with RangeServer(root) as srv:
        monkeypatch.setenv(dem.PRODUCTS["copernicus-30"].url_env, f"{srv.url}/{buckets['copernicus-30']}")
        monkeypatch.setenv("ALPHAEARTH_HEIGHT_CACHE", str(tmp_path / "cache"))
        assert run_and_wait(dock) is True
    assert any(r[1].endswith("_DEM.tif") for r in srv.log.requests)
    with rasterio.open(dock.last_result.predicted) as ds:
        assert ds.tags()["TERRAIN"] == "copernicus-30" and ds.tags()["TERRAIN_ATTRIBUTION"] == dem.ATTRIBUTION
    # the terrain alone, scored like the model, beside the model's figures
    baseline = dock.last_result.metrics["baselines"]["terrain alone"]["overall"]
    assert dock.baseline_label.isVisibleTo(dock)
    assert dock.baseline_label.text() == (f"Terrain alone (Copernicus DEM GLO-30): R² {baseline['r2']:.3f}, "
                                          f"RMSE {baseline['rmse']:.2f} m, median difference "
                                          f"{baseline['median_diff']:+.2f} m")


def test_large_fetch_asks_before_starting(dock, iface, small_scene, tiny_model, tmp_path, monkeypatch):
    """Over the size limit (here lowered to 0.1 MB) the dock asks; No starts nothing, Yes runs."""
    configure(dock, small_scene, tiny_model, tmp_path / "out")
    QgsSettings().setValue("alphaearth_height/max_fetch_gb", 0.0001)
    asked = []
    monkeypatch.setattr(dock, "confirm_large_fetch", lambda question: asked.append(question) or False)
    assert run_and_wait(dock) is None and dock.work.height is None
    assert len(asked) == 1 and "write ~" in asked[0] and "over the 0.0001 GB limit" in asked[0]
    assert "Run not started" in iface.messages()[-1]
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []
    monkeypatch.setattr(dock, "confirm_large_fetch", lambda question: asked.append(question) or True)
    assert run_and_wait(dock) is True and len(asked) == 2
    QgsSettings().setValue("alphaearth_height/max_fetch_gb", 5)

    def never(question):
        raise AssertionError(f"asked under the limit: {question}")

    monkeypatch.setattr(dock, "confirm_large_fetch", never)
    assert dock.fetch_size_question(dock.build_job()) is None
    dock.source_combo.setCurrentIndex(dock.source_combo.findData("earthengine"))
    dock.set_aoi(AreaOfInterest(-5, 42, 8, 51, "EPSG:4326"))  # France
    question = dock.fetch_size_question(dock.build_job())
    assert "TB" in question and "requests" in question and "over the 5 GB limit" in question
    QgsSettings().setValue("alphaearth_height/max_fetch_gb", "lots")
    with pytest.raises(InputError, match="max_fetch_gb"):
        dock.fetch_size_question(dock.build_job())


def test_device_detection_runs_in_background(dock):
    assert "not checked" in dock.device_label.text(), "no torch import while building the dock"
    dock.detect_button.click()
    deadline = time.monotonic() + 60
    while dock.work.probe is not None and time.monotonic() < deadline:
        QgsApplication.processEvents()
        time.sleep(0.01)
    assert dock.device_label.text().startswith("Auto uses: ")
    assert "cpu" in dock.device_label.text() or "cuda" in dock.device_label.text()


def test_progress_starts_at_zero(dock):
    assert (dock.progress.minimum(), dock.progress.maximum(), dock.progress.value()) == (0, 100, 0)
    assert dock.progress.text() == "0%"


def visible_controls(body: QWidget) -> list[QWidget]:
    kinds = (QAbstractButton, QComboBox, QAbstractSpinBox, QLineEdit, QLabel, QProgressBar, QPlainTextEdit)
    return [w for w in body.findChildren(QWidget) if isinstance(w, kinds) and w.isVisibleTo(body)]


def test_dock_at_its_narrowest_clips_no_control(dock, iface, tmp_path):
    scroll = dock.widget()
    assert scroll.horizontalScrollBarPolicy() == Qt.ScrollBarPolicy.ScrollBarAlwaysOff
    long_name = add_raster(three_band_raster(tmp_path / "rgb.tif"), "a raster layer with a very long name " * 4)
    dock.reference_combo.setLayer(long_name)
    dock.source_combo.setCurrentIndex(dock.source_combo.findData("earthengine"))
    iface.window.resizeDocks([dock], [10], Qt.Orientation.Horizontal)  # as narrow as it will go
    QgsApplication.processEvents()
    body, viewport = scroll.widget(), scroll.viewport()
    assert dock.width() < 500, "a long layer name must not widen the dock"
    assert body.width() <= viewport.width()
    for widget in visible_controls(body):
        left = widget.mapTo(body, QPoint(0, 0)).x()
        assert left >= 0 and left + widget.width() <= viewport.width(), (widget, widget.width(), viewport.width())
    # showing a row makes room for it too
    dock.source_combo.setCurrentIndex(dock.source_combo.findData("file"))
    dock.terrain_row.setVisible(True)
    QgsApplication.processEvents()
    for widget in visible_controls(body):
        left = widget.mapTo(body, QPoint(0, 0)).x()
        assert left >= 0 and left + widget.width() <= viewport.width(), (widget, widget.width(), viewport.width())
    assert body.width() <= viewport.width() and body.width() >= body.minimumSizeHint().width()
    assert dock.minimumSizeHint().height() < 400, "the dock scrolls: it never needs a tall screen"


def test_dock_size_remembered_across_sessions(iface):
    QgsSettings().setValue("alphaearth_height/dock_size", QSize(430, 500))
    plugin = start_plugin(iface)
    try:
        dock = open_dock(plugin)
        QgsApplication.processEvents()
        assert dock.width() == 430
        iface.window.resizeDocks([dock], [470], Qt.Orientation.Horizontal)
        QgsApplication.processEvents()
    finally:
        plugin.unload()
        flush_deletes()
    assert QgsSettings().value("alphaearth_height/dock_size").width() == 470


def wheel(widget: QWidget, steps: int = -1) -> None:
    """A real wheel event over the middle of ``widget`` (negative: scroll down)."""
    centre = QPointF(widget.width() / 2, widget.height() / 2)
    event = QWheelEvent(centre, QPointF(widget.mapToGlobal(centre.toPoint())), QPoint(0, 0), QPoint(0, 120 * steps),
                        Qt.MouseButton.NoButton, Qt.KeyboardModifier.NoModifier, Qt.ScrollPhase.NoScrollPhase, False)
    QgsApplication.sendEvent(widget, event)


def test_wheel_scrolls_the_dock_not_an_unfocused_combo(dock, iface):
    iface.window.resize(1000, 300)  # much shorter than the dock's body: it scrolls
    QgsApplication.processEvents()
    scroll = dock.widget()
    bar = scroll.verticalScrollBar()
    combo, spin = dock.device_combo, dock.year_spin
    assert combo.currentData() == "auto" and not combo.hasFocus()
    for widget in (combo, spin):
        bar.setValue(widget.mapTo(scroll.widget(), QPoint(0, 0)).y() - 10)  # the widget at the top of the view
        QgsApplication.processEvents()
        before = bar.value()
        assert 0 < before < bar.maximum()
        wheel(widget)
        assert bar.value() > before, "the wheel scrolls the dock"
    assert combo.currentData() == "auto" and spin.value() == 2020, "unfocused widgets keep their value"
    assert combo.focusPolicy() == Qt.FocusPolicy.StrongFocus
    iface.window.activateWindow()
    combo.setFocus()
    QgsApplication.processEvents()
    assert combo.hasFocus()
    wheel(combo)  # a focused combo takes the wheel as usual
    assert combo.currentData() == "cpu"


def test_error_shown_in_full_with_details(dock, iface):
    reason = ("embeddings file /a/very/long/folder/name/that/goes/on/and/on/embeddings_2020.tif: has 3 band(s) "
              "but embeddings need 64. Give an AlphaEarth embeddings raster")
    try:
        raise RuntimeError(reason + "\nsecond line of a worker's message")
    except RuntimeError as exc:
        dock.report_error(exc, details="worker log line 1\nworker log line 2")
    item = iface.bar.currentItem()
    assert item.text() == f"RuntimeError: {reason}" and item.level() == Qgis.MessageLevel.Critical
    QgsApplication.processEvents()
    label = next(w for w in item.findChildren(QLabel) if reason[:40] in w.text())
    assert label.wordWrap() and reason in label.text().replace("&amp;", "&") and label.isVisibleTo(item)
    assert label.height() >= label.heightForWidth(label.width()), "the whole text fits, wrapped"
    button = item.findChild(QAbstractButton, "details")
    assert button is not None and button.text() == "Details"
    button.click()
    QgsApplication.processEvents()
    viewer = dock.details_viewer
    shown = viewer.findChild(QTextBrowser).toPlainText()
    assert reason in shown and "worker log line 2" in shown
    viewer.close()
    # without details, the traceback is shown
    try:
        {}["missing"]
    except KeyError as exc:
        dock.report_error(exc)
    iface.bar.currentItem().findChild(QAbstractButton, "details").click()
    assert "Traceback" in dock.details_viewer.findChild(QTextBrowser).toPlainText()
    dock.details_viewer.close()


def three_band_raster(path: Path) -> Path:
    import numpy as np
    from affine import Affine

    with rasterio.open(path, "w", driver="GTiff", width=8, height=8, count=3, dtype="uint8", crs="EPSG:32630",
                       transform=Affine(10.0, 0, 690_000.0, 0, -10.0, 4_975_000.0)) as dst:
        dst.write(np.zeros((3, 8, 8), dtype=np.uint8))
    return path


def combo_layers(combo) -> list[str]:
    return [combo.itemText(i) for i in range(combo.count()) if combo.itemText(i)]


def test_embeddings_picker_offers_only_64_band_rasters(dock, small_scene, tmp_path):
    dsm = add_raster(small_scene.reference, "dsm")
    embeddings = add_raster(small_scene.embeddings, "embeddings")
    QgsApplication.processEvents()
    assert combo_layers(dock.embeddings_layer) == ["embeddings"]
    assert combo_layers(dock.reference_combo) == combo_layers(dock.terrain_combo) == ["dsm"]
    rgb = add_raster(three_band_raster(tmp_path / "rgb.tif"), "rgb")  # added later: filtered too
    assert combo_layers(dock.embeddings_layer) == ["embeddings"]
    assert sorted(combo_layers(dock.reference_combo)) == ["dsm", "rgb"]
    QgsProject.instance().removeMapLayers([dsm.id(), rgb.id()])
    assert combo_layers(dock.reference_combo) == []
    assert dock.embeddings_layer.currentLayer() is embeddings


def test_min_max_statistics_flags_work_on_this_qgis(small_scene):
    from alphaearth_height.plugin import layers

    layer = QgsRasterLayer(str(small_scene.reference), "dsm", "gdal")
    stats = layer.dataProvider().bandStatistics(1, layers.min_max_statistics())
    assert stats.maximumValue > stats.minimumValue
    if Qgis.QGIS_VERSION_INT >= 34000:
        assert isinstance(layers.min_max_statistics(), type(Qgis.RasterBandStatistic.Min | Qgis.RasterBandStatistic.Max))


# ---- AOI tool ---------------------------------------------------------------------------------


def press(tool, canvas, kind, point: QPoint) -> None:
    buttons = Qt.MouseButton.NoButton if kind == QEvent.Type.MouseButtonRelease else Qt.MouseButton.LeftButton
    event = QgsMapMouseEvent(canvas, kind, point, Qt.MouseButton.LeftButton, buttons, Qt.KeyboardModifier.NoModifier)
    {QEvent.Type.MouseButtonPress: tool.canvasPressEvent, QEvent.Type.MouseMove: tool.canvasMoveEvent,
     QEvent.Type.MouseButtonRelease: tool.canvasReleaseEvent}[kind](event)


def test_aoi_map_tool_draws_expected_rectangle(dock, iface):
    canvas = iface.canvas
    canvas.setExtent(QgsRectangle(690_000, 4_972_000, 693_000, 4_975_000))
    canvas.refresh()
    QgsApplication.processEvents()
    dock.draw_button.click()
    tool = dock.map_tool
    assert canvas.mapTool() is tool
    drawn = []
    tool.aoiDrawn.connect(drawn.append)
    start, end = QPoint(40, 50), QPoint(210, 160)
    press(tool, canvas, QEvent.Type.MouseButtonPress, start)
    press(tool, canvas, QEvent.Type.MouseMove, QPoint(120, 100))
    press(tool, canvas, QEvent.Type.MouseMove, end)
    press(tool, canvas, QEvent.Type.MouseButtonRelease, end)
    to_map = canvas.getCoordinateTransform()
    a, b = to_map.toMapCoordinates(start), to_map.toMapCoordinates(end)
    expected = (min(a.x(), b.x()), min(a.y(), b.y()), max(a.x(), b.x()), max(a.y(), b.y()))
    assert len(drawn) == 1
    assert dock.aoi.crs == "EPSG:32630"
    assert dock.aoi.bounds == pytest.approx(expected, abs=1e-6)
    assert "km²" in dock.aoi_label.text()
    # A plain click (empty rectangle) keeps the current AOI.
    press(tool, canvas, QEvent.Type.MouseButtonPress, end)
    press(tool, canvas, QEvent.Type.MouseButtonRelease, end)
    assert len(drawn) == 1 and dock.aoi.bounds == pytest.approx(expected, abs=1e-6)


def test_aoi_from_canvas_and_layer(dock, iface):
    from qgis.core import QgsFeature, QgsGeometry, QgsVectorLayer

    canvas = iface.canvas
    canvas.setExtent(QgsRectangle(690_000, 4_972_000, 693_000, 4_975_000))
    dock.canvas_button.click()
    extent = canvas.extent()
    assert dock.aoi.bounds == pytest.approx((extent.xMinimum(), extent.yMinimum(), extent.xMaximum(),
                                             extent.yMaximum()))
    layer = QgsVectorLayer("Polygon?crs=EPSG:4326", "fields", "memory")
    features = []
    for x0 in (-1.0, 1.0):
        feature = QgsFeature()
        feature.setGeometry(QgsGeometry.fromRect(QgsRectangle(x0, 44.0, x0 + 0.5, 44.5)))
        features.append(feature)
    layer.dataProvider().addFeatures(features)
    layer.updateExtents()
    QgsProject.instance().addMapLayer(layer)
    dock.aoi_layer_combo.setLayer(layer)
    dock.layer_button.click()
    assert dock.aoi.crs == "EPSG:4326" and dock.aoi.bounds == pytest.approx((-1.0, 44.0, 1.5, 44.5))
    dock.selected_only.setChecked(True)
    dock.layer_button.click()  # nothing selected: a warning, the AOI is kept
    assert "no selected features" in iface.messages()[-1]
    layer.selectByExpression("x_min($geometry) > 0")
    dock.layer_button.click()
    assert dock.aoi.bounds == pytest.approx((1.0, 44.0, 1.5, 44.5))


# ---- Run prediction on: this computer or Dask ------------------------------------------------------


def test_run_on_choice_exists_and_persists(dock, iface, monkeypatch):
    """An advanced group, collapsed on this computer; a Dask choice is remembered and opens it."""
    group, buttons = dock.run_on_group, dock.run_on_buttons
    assert group.isCollapsed() and group.title() == "Run prediction on: this computer"
    assert [b.text() for b in buttons.values()] == ["This computer (one process)", "Local Dask workers",
                                                    "Dask scheduler"]
    assert all(b.isEnabled() for b in buttons.values()), "this venv's Python has Dask"
    assert not dock.dask_workers_spin.isEnabled() and dock.dask_choice() == (0, "")
    buttons["workers"].setChecked(True)
    dock.dask_workers_spin.setValue(3)
    assert dock.dask_workers_spin.isEnabled() and dock.dask_choice() == (3, "")
    assert group.title() == "Run prediction on: 3 local Dask workers"
    dock.dask_scheduler_edit.setText(" tcp://10.0.0.5:8786 ")
    dock.save_settings()
    again = dock_module.HeightDock(iface)
    try:
        assert again.run_on() == "workers" and again.dask_workers_spin.value() == 3
        assert not again.run_on_group.isCollapsed() and again.run_on_group.title().endswith("3 local Dask workers")
        assert again.dask_scheduler_edit.text() == "tcp://10.0.0.5:8786"
        again.run_on_buttons["scheduler"].setChecked(True)
        assert again.dask_choice() == (0, "tcp://10.0.0.5:8786")
        again.save_settings()
    finally:
        again.shutdown()
        again.deleteLater()
    assert QgsSettings().value("alphaearth_height/run_on") == "scheduler"
    # a worker Python without Dask (the system's, here): disabled, with the reason as tooltip
    monkeypatch.setenv(PYTHON_OVERRIDE, "/usr/bin/python3")
    dock.refresh_environment()
    assert not buttons["workers"].isEnabled() and not buttons["scheduler"].isEnabled()
    assert buttons["process"].isChecked() and dock.dask_choice() == (0, "")
    assert "pip install dask distributed" in buttons["workers"].toolTip()
    assert "/usr/bin/python3" in dock.dask_hint.text()


def test_a_managed_environment_without_dask_offers_add_dask(dock, monkeypatch, tmp_path):
    """The plugin's own environment (a real venv from the system Python, inference set only) has no Dask:
    the Dask choices point at 'Add Dask', which installs the dask set; once installed the button goes."""
    from alphaearth_height.plugin.environment import DASK, INFERENCE, ManagedEnvironment, system_python

    monkeypatch.delenv(PYTHON_OVERRIDE)
    env = ManagedEnvironment(tmp_path / "env", base_python=system_python())
    env.create(lambda line: None)
    marker = env.folder / "alphaearth_height_ready.json"
    marker.write_text(json.dumps({"sets": ["inference"], "requirements": sorted(INFERENCE.values())}))
    dock.environment, dock._dask_checked = env, None
    started = []
    monkeypatch.setattr(dock, "_start_env_task", lambda action, package_set: started.append((action, package_set)))
    dock.refresh_environment()
    assert dock.env_dask_button.isVisibleTo(dock) and not dock.run_on_buttons["workers"].isEnabled()
    assert "'Add Dask'" in dock.dask_hint.text() and "'Add Dask'" in dock.run_on_buttons["scheduler"].toolTip()
    dock.env_dask_button.click()
    assert started == [("install", "dask")]
    marker.write_text(json.dumps({"sets": ["dask", "inference"],
                                  "requirements": sorted({**INFERENCE, **DASK}.values())}))
    dock.refresh_environment()
    assert not dock.env_dask_button.isVisibleTo(dock)


def test_dock_run_on_two_local_dask_workers(dock, iface, small_scene, tiny_model, tmp_path):
    """The same height layer as a run in one process (within 0.01 m), predicted in chunks by 2 workers."""
    from dataclasses import replace

    from alphaearth_height.plugin.core.job import run_height_job

    configure(dock, small_scene, tiny_model, tmp_path / "dask")
    dock.run_on_buttons["workers"].setChecked(True)
    dock.dask_workers_spin.setValue(2)
    assert run_and_wait(dock) is True, iface.messages()
    job = dock.work.height.job
    assert (job.dask_workers, job.dask_scheduler) == (2, "")
    assert result_layers() == ["height"]
    assert dock.device_label.text().startswith("Last run on: 2 local Dask workers")
    layer = QgsProject.instance().mapLayersByName("height")[0]
    (tmp_path / "one").mkdir()
    single = run_height_job(replace(job, dask_workers=0, out_dir=str(tmp_path / "one")))
    with rasterio.open(layer.source()) as a, rasterio.open(single.predicted) as b:
        assert (a.transform, a.shape) == (b.transform, b.shape)
        many, one = a.read(1, masked=True), b.read(1, masked=True)
    assert (many.mask == one.mask).all() and (~one.mask).sum() > 1000
    assert float(abs(many - one).max()) <= 0.01
    assert sorted(p.name.split("_")[-1] for p in (tmp_path / "dask").iterdir()) == ["embeddings.tif", "height.tif"]


def test_bad_scheduler_address_is_one_line_and_leaves_nothing(dock, iface, small_scene, tiny_model, tmp_path):
    """Malformed: refused before a task starts. Well formed but no scheduler there: the worker says so."""
    import socket
    import threading

    configure(dock, small_scene, tiny_model, tmp_path / "out")
    dock.run_on_buttons["scheduler"].setChecked(True)
    dock.dask_scheduler_edit.setText("tcp://scheduler-without-port")
    assert run_and_wait(dock) is None and dock.work.height is None
    assert iface.messages()[-1] == ("Dask scheduler 'tcp://scheduler-without-port': is not an address like "
                                    "tcp://HOST:PORT. Give the address dask-scheduler printed, e.g. "
                                    "tcp://192.168.1.20:8786")
    iface.bar.clearWidgets()
    # something listens there, but not a Dask scheduler: it hangs up at once
    server = socket.create_server(("127.0.0.1", 0))
    threading.Thread(target=lambda: [server.accept()[0].close() for _ in iter(int, 1)], daemon=True).start()
    dock.dask_scheduler_edit.setText(f"tcp://127.0.0.1:{server.getsockname()[1]}")
    try:
        assert run_and_wait(dock) is False
    finally:
        server.close()
    [message] = iface.messages()
    assert "could not be reached" in message and "\n" not in message, message
    assert iface.bar.items()[-1].level() == Qgis.MessageLevel.Critical
    assert result_layers() == [] and list((tmp_path / "out").iterdir()) == []


# ---- cancellation and errors ---------------------------------------------------------------------


def test_cancel_mid_run_leaves_no_output(dock, iface, small_scene, tiny_model, tmp_path):
    reference = add_raster(small_scene.reference, "reference DSM")
    configure(dock, small_scene, tiny_model, tmp_path, reference)
    manager = QgsApplication.taskManager()

    def cancel_once_predicting(_task_id) -> None:
        task = dock.work.height  # set before addTask, which announces it before starting it
        task.progressChanged.connect(lambda value: value > FETCH_END and task.cancel(),
                                     Qt.ConnectionType.DirectConnection)

    manager.taskAdded.connect(cancel_once_predicting)
    try:
        ok = run_and_wait(dock)
    finally:
        manager.taskAdded.disconnect(cancel_once_predicting)
    assert ok is False
    assert any("cancelled" in m for m in iface.messages())
    leftovers = [p.name for p in tmp_path.iterdir()
                 if p.name.endswith(("_embeddings.tif", "_height.tif", "_difference.tif", "_metrics.json", ".png"))
                 or ".partial" in p.name]
    assert leftovers == []
    assert result_layers() == []


@pytest.mark.parametrize("source", ["cog", "earthengine"])
def test_remote_source_without_aoi_is_refused(source, dock, iface, tiny_model, tmp_path):
    dock.source_combo.setCurrentIndex(dock.source_combo.findData(source))
    dock.output_folder.setFilePath(str(tmp_path))
    assert dock.aoi is None
    assert run_and_wait(dock) is None and dock.work.height is None
    assert "area of interest: is not chosen" in iface.messages()[-1]
    assert iface.bar.items()[-1].level() == Qgis.MessageLevel.Critical
    assert list(tmp_path.iterdir()) == []


def test_run_from_the_public_cogs(dock, iface, tiny_model, tmp_path, monkeypatch, tmp_path_factory):
    """COG source end to end through the task, the mirror served on 127.0.0.1."""
    from range_server import PREFIX, RangeServer, build_mirror

    root = tmp_path_factory.mktemp("mirror")
    west = build_mirror(root)["w"]
    monkeypatch.setenv("ALPHAEARTH_HEIGHT_CACHE", str(tmp_path / "cache"))
    dock.source_combo.setCurrentIndex(dock.source_combo.findData("cog"))
    dock.folder_radio.setChecked(True)
    dock.model_folder.setFilePath(str(tiny_model))
    dock.device_combo.setCurrentIndex(dock.device_combo.findData("cpu"))
    dock.output_folder.setFilePath(str(tmp_path / "out"))
    dock.set_aoi(AreaOfInterest(west.left + 1000, west.bottom + 1000, west.left + 2200, west.bottom + 2000,
                                "EPSG:32630"))
    with RangeServer(root) as server:
        QgsSettings().setValue("alphaearth_height/cog_base_url", f"{server.url}/{PREFIX}")
        assert run_and_wait(dock) is True, iface.messages()
        assert any(path.endswith(".tiff") for _, path, _, _ in server.log.requests)
    assert dock.work.height.job.source == "cog" and dock.work.height.job.source_options == {"base_url": f"{server.url}/{PREFIX}"}
    outputs = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert [name.split("_")[-1] for name in outputs] == ["embeddings.tif", "height.tif"]
    assert len(result_layers()) == 1


def broken_weights(tiny_model: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "corrupt-model"
    shutil.copytree(tiny_model, folder)
    with open(folder / "model.safetensors", "ab") as fh:
        fh.write(b"\0" * 16)
    return folder


@pytest.mark.parametrize("case, expected", [
    ("missing reference", "does not exist"),
    ("aoi outside", "does not overlap"),
    ("not embeddings", "band(s) but embeddings need 64"),
    ("broken model card", "is not valid JSON"),
    ("broken model weights", "does not match the hash"),
])
def test_bad_input_reported_on_message_bar(case, expected, dock, iface, small_scene, tiny_model, tmp_path):
    reference = None
    model = tiny_model
    if case == "missing reference":
        copy = tmp_path / "gone_dsm.tif"
        shutil.copy(small_scene.reference, copy)
        reference = add_raster(copy, "reference DSM")
        copy.unlink()
    configure(dock, small_scene, model, tmp_path / "out", reference)
    if case == "aoi outside":
        dock.set_aoi(AreaOfInterest(100_000, 100_000, 101_000, 101_000, "EPSG:32630"))
    elif case == "not embeddings":
        dock.embeddings_file.setFilePath(str(small_scene.reference))
    elif case == "broken model card":
        folder = tmp_path / "bad-model"
        folder.mkdir()
        (folder / "model.json").write_text("{not json")
        dock.model_folder.setFilePath(str(folder))
    elif case == "broken model weights":
        dock.model_folder.setFilePath(str(broken_weights(tiny_model, tmp_path)))
    ok = run_and_wait(dock)
    assert ok in (None, False)
    messages = iface.messages()
    assert messages and expected in messages[-1], messages
    assert iface.bar.items()[-1].level() == Qgis.MessageLevel.Critical
    assert result_layers() == []
    assert not list((tmp_path / "out").glob("*_height.tif"))


# ---- a full run (last: its plugin stays loaded for these tests) ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def completed_run(qgis_app, small_scene, tiny_model, tmp_path_factory):
    """One run through the dock's task on the small demo scene, with a reference DSM."""
    fresh_state()
    stand_in = Iface()
    plugin = start_plugin(stand_in)
    dock = open_dock(plugin)
    reference = add_raster(small_scene.reference, "reference DSM")
    out_dir = tmp_path_factory.mktemp("run")
    configure(dock, small_scene, tiny_model, out_dir, reference)
    ok = run_and_wait(dock)
    layers = {layer.name(): layer for layer in QgsProject.instance().mapLayers().values()}
    yield SimpleNamespace(iface=stand_in, plugin=plugin, dock=dock, ok=ok, out_dir=out_dir, layers=layers,
                          height=layers["height"], difference=layers["difference"])
    plugin.unload()
    stand_in.close()
    fresh_state()


def ramp_colours(layer) -> list[tuple[float, QColor]]:
    items = layer.renderer().shader().rasterShaderFunction().colorRampItemList()
    return [(item.value, item.color) for item in items]


def test_run_adds_styled_layers(completed_run):
    run = completed_run
    assert run.ok is True
    assert any("Height layers added" in m for m in run.iface.messages())
    group = QgsProject.instance().layerTreeRoot().children()[0]
    assert group.name().startswith("aeh_2020_x") and group.name() == run.dock.work.height.job.name
    assert [child.name() for child in group.children()] == ["difference", "height"]
    assert [child.layer() for child in group.children()] == [run.difference, run.height]
    for layer in (run.height, run.difference):
        assert isinstance(layer.renderer(), QgsSingleBandPseudoColorRenderer)
        assert layer.crs().authid() == "EPSG:32630"
    stats = run.height.dataProvider().bandStatistics(1)
    assert run.height.renderer().classificationMin() == pytest.approx(stats.minimumValue, abs=0.01)
    assert run.height.renderer().classificationMax() == pytest.approx(stats.maximumValue, abs=0.01)
    low, high = run.difference.renderer().classificationMin(), run.difference.renderer().classificationMax()
    assert low == pytest.approx(-high) and high > 0
    colours = ramp_colours(run.difference)
    first, last = colours[0][1], colours[-1][1]
    assert first.blue() > first.red() and last.red() > last.blue(), "blue negative, red positive"
    assert colours[0][0] == pytest.approx(low) and colours[-1][0] == pytest.approx(high)


def test_run_shows_metrics_and_plots(completed_run):
    dock, result = completed_run.dock, completed_run.dock.last_result
    overall = result.metrics["overall"]
    assert dock.metric_labels["r2"].text() == f"{overall['r2']:.3f}"
    assert dock.metric_labels["rmse"].text() == f"{overall['rmse']:.2f} m"
    assert dock.metric_labels["mean_diff"].text() == f"{overall['mean_diff']:+.2f} m"
    assert dock.metric_labels["nmad"].text() == f"{overall['nmad']:.2f} m"
    assert not dock.scatter_image.pixmap().isNull() and not dock.histogram_image.pixmap().isNull()
    assert dock.progress.value() == 100


def test_render_result_layers_to_png(completed_run, artifacts_dir):
    run = completed_run
    settings = QgsMapSettings()
    settings.setLayers([run.difference, run.height])
    settings.setDestinationCrs(UTM)
    settings.setExtent(run.height.extent())
    settings.setOutputSize(QSize(512, 512))
    settings.setBackgroundColor(QColor("white"))
    job = QgsMapRendererParallelJob(settings)
    job.start()
    job.waitForFinished()
    image = job.renderedImage()
    path = artifacts_dir / "plugin_result_layers.png"
    assert image.save(str(path))
    pixels = [QColor(image.pixel(x, y)) for x in range(0, 512, 8) for y in range(0, 512, 8)]
    blue = sum(c.blue() > c.red() + 40 for c in pixels)
    red = sum(c.red() > c.blue() + 40 for c in pixels)
    assert len({c.rgb() for c in pixels}) > 20, "not blank"
    assert blue > 50 and red > 50, (blue, red)


def test_dock_grab_to_png(completed_run, artifacts_dir):
    body = completed_run.dock.widget().widget()
    body.resize(420, body.sizeHint().height())
    path = artifacts_dir / "plugin_dock.png"
    assert body.grab().save(str(path))
    assert path.stat().st_size > 10_000


def test_settings_are_declared_once_with_their_defaults(dock):
    from alphaearth_height.plugin import settings

    QgsSettings().remove("alphaearth_height/output_folder")
    assert settings.read("output_folder") == settings.default_output_folder()  # the default when unset
    QgsSettings().setValue("alphaearth_height/output_folder", "")
    assert settings.read("output_folder") == settings.default_output_folder()  # and when blank
    settings.write(year=2019)
    assert int(QgsSettings().value("alphaearth_height/year")) == 2019
    with pytest.raises(KeyError, match="undeclared setting 'colour'"):
        settings.write(colour="red")
    dock.save_settings()  # every key the dock stores is declared
    stored = {key.split("/", 1)[1] for key in QgsSettings().allKeys() if key.startswith("alphaearth_height/")}
    assert stored <= set(settings.DEFAULTS)
