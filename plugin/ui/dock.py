"""The AlphaEarth Height dock: gathers a job's parameters, runs it as a task, shows results.

Built in code (no .ui file) so it needs no compile step and stays readable in review.
Thin by design: validation and computation live in core; this module only turns
widget state into a ``HeightJob`` and a result into layers, figures and messages.
"""

from __future__ import annotations

import html
import logging
import traceback
from pathlib import Path
from typing import Optional

from qgis.core import Qgis, QgsApplication, QgsMapLayerProxyModel, QgsProject, QgsRasterLayer, QgsRectangle
from qgis.gui import (QgsCollapsibleGroupBoxBasic, QgsDockWidget, QgsFileWidget, QgsMapLayerComboBox, QgsMapTool,
                      QgsMessageBarItem, QgsMessageViewer)
from qgis.PyQt.QtCore import QEvent, QObject, QSize, Qt, pyqtSignal
from qgis.PyQt.QtGui import QPixmap
from qgis.PyQt.QtWidgets import (QAbstractSpinBox, QButtonGroup, QCheckBox, QComboBox, QFormLayout, QFrame,
                                 QGridLayout, QGroupBox, QHBoxLayout, QLabel, QLineEdit, QMainWindow,
                                 QPlainTextEdit, QProgressBar, QPushButton, QRadioButton, QScrollArea, QSizePolicy,
                                 QSpinBox, QTextBrowser, QVBoxLayout, QWidget)

from ..core import choices
from ..core.aef import N_BANDS as EMBEDDING_BANDS
from ..core.aoi import AreaOfInterest, aoi_window
from ..core.dem import ATTRIBUTION as DEM_ATTRIBUTION
from ..core.dem import PRODUCTS as DEM_PRODUCTS
from ..core.errors import InputError
from ..core.fetch import source_options
from ..core.job import HeightJob, HeightJobResult, check_scheduler_address, safe_name
from ..core.models import read_card
from ..core.models import bundled_model_dir
from ..core.rasters import EmbeddingRaster
from ..core.terrain import uses_terrain
from ..core.worker import WorkerError
from ..environment import PYTHON_OVERRIDE, ManagedEnvironment, profile_environment, worker_python
from .. import settings
from ..layers import add_result_layers, existing_file, layer_file
from ..tasks import DASK_MODULES, BackgroundWork, EnvironmentTask, HeightTask, worker_has_dask
from .aoi_tool import AoiMapTool, AoiRubberBand, canvas_aoi, layer_aoi, qgs_crs, rectangle_aoi

log = logging.getLogger(__name__)

TITLE = "AlphaEarth Height"
# (dock key, label, core.fetch source, tooltip): two ways to pick a local raster, two remote sources.
# (dock key, label, core.choices source, tooltip): the local source two ways (a file, or a layer).
SOURCES = (("file", "Local raster file", "local", "A 64-band embeddings raster on disk"),
           ("layer", "Raster layer", "local", "A 64-band embeddings raster loaded in the project"),
           *((key, choices.SOURCE_LABELS[key], key, choices.SOURCE_HELP[key]) for key in choices.SOURCES
             if key != "local"))
FETCH_SOURCES = {key: source for key, _, source, _ in SOURCES}
METRICS = (("r2", "R²", "{:.3f}"), ("rmse", "RMSE", "{:.2f} m"), ("mae", "MAE", "{:.2f} m"),
           ("mean_diff", "Bias", "{:+.2f} m"), ("median_diff", "Median difference", "{:+.2f} m"),
           ("nmad", "NMAD", "{:.2f} m"))
PLOT_WIDTH = 320
COMBO_MIN_CHARS = 12  # combos may shrink to this many characters (long layer names must not widen the dock)


TERRAIN_LAYER = "layer"  # the terrain choice that takes a raster layer
# "Run prediction on" (setting run_on): key -> the radio button's label and the collapsed group's title
RUN_ON = {"process": ("This computer (one process)", "this computer"),
          "workers": ("Local Dask workers", "local Dask workers"),
          "scheduler": ("Dask scheduler", "a Dask scheduler")}
MAX_DASK_WORKERS = 64


def compact(combo: QComboBox) -> QComboBox:
    """A combo whose minimum width is a few characters, not its longest item (a long layer
    name must not widen the dock); set on creation, before Qt caches its minimum size."""
    combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
    combo.setMinimumContentsLength(COMBO_MIN_CHARS)
    return combo


class WheelGuard(QObject):
    """Lets a combo or spin box take a wheel event only when it has focus: scrolling the
    dock over one must scroll the dock, not switch e.g. the device from Auto to CUDA."""

    def __init__(self, scroll: QScrollArea) -> None:
        super().__init__(scroll)
        self.scroll = scroll

    def eventFilter(self, watched: QObject, event: QEvent) -> bool:  # noqa: N802 - Qt API
        if event.type() == QEvent.Type.Wheel and isinstance(watched, QWidget) and not watched.hasFocus():
            # Handed to the scroll area explicitly: Qt propagates only spontaneous wheel events.
            QgsApplication.sendEvent(self.scroll.viewport(), event)
            return True
        return False


class BodyScrollArea(QScrollArea):
    """Vertical scrolling only, and never narrower than the body's own minimum, so no
    control is clipped; the minimum follows the body as rows are shown or hidden."""

    def __init__(self, body: QWidget) -> None:
        super().__init__()
        self.setWidgetResizable(True)
        self.setFrameShape(QFrame.Shape.NoFrame)
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.setWidget(body)  # QScrollArea filters the body's events: see eventFilter

    def minimumSizeHint(self) -> QSize:  # noqa: N802 - Qt API
        body = self.widget()
        width = (body.minimumSizeHint().width() if body is not None else 0)
        width += self.verticalScrollBar().sizeHint().width() + 2 * self.frameWidth()
        return QSize(width, super().minimumSizeHint().height())

    def eventFilter(self, watched: QObject, event: QEvent) -> bool:  # noqa: N802 - Qt API
        if watched is self.widget() and event.type() == QEvent.Type.LayoutRequest:
            self.updateGeometry()
        return super().eventFilter(watched, event)


def human_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1000:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} TB"


def describe_estimate(aoi: AreaOfInterest) -> str:
    """One line on size, shown before anything is fetched so huge areas are noticed early.

    Offline and instant: the grid ``fetch`` will write (core.fetch.output_grid), the COG
    download as whole blocks of all bands at the published block size, Earth Engine's as
    float32 pixels.
    """
    from ..core.fetch import output_grid
    from ..core.fetch.cog import offline_download_bytes
    from ..core.fetch.earthengine import BYTES_PER_PIXEL

    grid = output_grid(aoi)
    (res_x, res_y), pixels = grid.resolution, grid.width * grid.height
    return (f"{pixels * res_x * res_y / 1e6:,.2f} km² · {grid.width:,} × {grid.height:,} px at 10 m "
            f"({pixels / 1e6:,.2f} Mpx, {grid.crs.to_string()})\n"
            f"Download ≈ {human_bytes(offline_download_bytes(grid.width, grid.height))} (COG int8 blocks) / "
            f"{human_bytes(pixels * BYTES_PER_PIXEL)} (Earth Engine float32)")


def aoi_stem(aoi: AreaOfInterest, year: int) -> str:
    """File/layer stem from the year and the AOI centre, e.g. ``aeh_2020_x690640_y4973720``."""
    cx, cy = (aoi.xmin + aoi.xmax) / 2, (aoi.ymin + aoi.ymax) / 2
    digits = 4 if qgs_crs(aoi.crs).isGeographic() else 0
    return safe_name(f"aeh_{year}_x{cx:.{digits}f}_y{cy:.{digits}f}")


def unique_stem(folder: Path, stem: str) -> str:
    """Never overwrite an earlier run's rasters (they may still be loaded as layers)."""
    candidate, n = stem, 1
    while (folder / f"{candidate}_height.tif").exists():
        n += 1
        candidate = f"{stem}_{n}"
    return candidate


def card_summary(card: dict) -> str:
    """What a user needs to judge a model: architecture, where/when trained, test accuracy."""
    model, training = card.get("model", {}), card.get("training", {})
    lines = [f"Name: {card.get('name', '?')}",
             f"Architecture: {model.get('architecture', '?')} / {model.get('encoder', '?')} "
             f"(depth {model.get('encoder_depth', '?')})"]
    if training:
        lines.append(f"Trained on: {training.get('region') or training.get('embeddings', '?')} "
                     f"({training.get('year', '?')}), {training.get('crs', '?')}")
    else:
        lines.append("Trained on: not recorded")
    test = card.get("metrics", {}).get("test")
    if test:
        lines.append(f"Test: R² {test.get('r2', float('nan')):.3f} · RMSE {test.get('rmse', float('nan')):.2f} m"
                     f" · MAE {test.get('mae', float('nan')):.2f} m · NMAD {test.get('nmad', float('nan')):.2f} m")
    else:
        lines.append("Test metrics: not recorded")
    return "\n".join(lines)


class HeightDock(QgsDockWidget):
    """Dock panel; ``runFinished(ok)`` fires after each run's outcome has been shown."""

    runFinished = pyqtSignal(bool)
    environmentChanged = pyqtSignal(bool)  # after an install or removal: whether runs can start

    def __init__(self, iface, parent: Optional[QWidget] = None, work: Optional[BackgroundWork] = None) -> None:
        super().__init__(TITLE, parent)
        self.setObjectName("AlphaEarthHeightDock")
        self.iface = iface
        self.canvas = iface.mapCanvas()
        self.aoi: Optional[AreaOfInterest] = None
        self._owns_work = work is None  # a dock on its own (tests) owns its tasks; in QGIS the plugin does
        self.work = work or BackgroundWork()
        self.environment: ManagedEnvironment = profile_environment()
        self._plan_text: Optional[str] = None
        self._env_size: Optional[int] = None  # bytes on disk of the environment, measured once
        self.last_result: Optional[HeightJobResult] = None
        self.details_viewer: Optional[QgsMessageViewer] = None  # the last error's Details window
        self.saved_size: Optional[QSize] = None  # applied on first show, once the dock is placed
        self.size_restored = False
        self.map_tool = AoiMapTool(self.canvas)
        self.map_tool.aoiDrawn.connect(self._on_drawn)
        self.rubber_band = AoiRubberBand(self.canvas)
        self.canvas.mapToolSet.connect(self._on_map_tool_set)
        self._build()
        self._restore_settings()
        self.refresh_environment()
        self._filter_layer_pickers()
        QgsProject.instance().layersAdded.connect(self._filter_layer_pickers)
        QgsProject.instance().layersRemoved.connect(self._filter_layer_pickers)

    # ---- layout -------------------------------------------------------------------------

    def _build(self) -> None:
        body = QWidget()
        layout = QVBoxLayout(body)
        for group in (self._environment_group(), self._aoi_group(), self._embeddings_group(), self._model_group(),
                      self._run_on_group(), self._reference_group(), self._output_group()):
            layout.addWidget(group)
        layout.addLayout(self._run_row())
        layout.addWidget(self._results_group())
        layout.addStretch(1)
        scroll = BodyScrollArea(body)
        self.wheel_guard = WheelGuard(scroll)
        for widget in body.findChildren(QComboBox) + body.findChildren(QAbstractSpinBox):
            widget.setFocusPolicy(Qt.FocusPolicy.StrongFocus)  # not WheelFocus: the wheel must not focus it
            widget.installEventFilter(self.wheel_guard)
        self.setWidget(scroll)

    def _environment_group(self) -> QGroupBox:
        self.env_group = QGroupBox("Python environment")
        layout = QVBoxLayout(self.env_group)
        self.env_label = QLabel()
        self.env_label.setWordWrap(True)
        self.env_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        buttons = QHBoxLayout()
        self.env_install_button = QPushButton("Install")
        self.env_install_button.clicked.connect(lambda: self.install_environment("inference"))
        self.env_training_button = QPushButton("Add training (PyTorch)")
        self.env_training_button.setToolTip("Training and GPU inference need PyTorch: ~0.8 GB (CPU build), "
                                            "~5 GB with CUDA (chosen when an NVIDIA GPU is found)")
        self.env_training_button.clicked.connect(lambda: self.install_environment("training"))
        self.env_dask_button = QPushButton("Add Dask")
        self.env_dask_button.setToolTip("Running predictions on Dask workers or a Dask cluster needs dask and "
                                        "distributed: a few tens of MB")
        self.env_dask_button.clicked.connect(lambda: self.install_environment("dask"))
        self.env_remove_button = QPushButton("Remove")
        self.env_remove_button.setToolTip("Delete the plugin's Python environment (QGIS itself is not touched)")
        self.env_remove_button.clicked.connect(self.remove_environment)
        for button in (self.env_install_button, self.env_training_button, self.env_dask_button,
                       self.env_remove_button):
            buttons.addWidget(button)
        buttons.addStretch(1)
        layout.addWidget(self.env_label)
        layout.addLayout(buttons)
        return self.env_group

    def _aoi_group(self) -> QGroupBox:
        group = QGroupBox("Area of interest")
        layout = QVBoxLayout(group)
        buttons = QHBoxLayout()
        self.draw_button = QPushButton("Draw")
        self.draw_button.setCheckable(True)
        self.draw_button.setToolTip("Drag a rectangle on the map")
        self.draw_button.toggled.connect(self._on_draw_toggled)
        self.canvas_button = QPushButton("Canvas extent")
        self.canvas_button.clicked.connect(self.use_canvas_extent)
        self.layer_button = QPushButton("From layer")
        self.layer_button.clicked.connect(self.use_layer_extent)
        for button in (self.draw_button, self.canvas_button, self.layer_button):
            buttons.addWidget(button)
        layout.addLayout(buttons)
        self.aoi_layer_combo = compact(QgsMapLayerComboBox())
        self.aoi_layer_combo.setFilters(QgsMapLayerProxyModel.Filter.PolygonLayer)
        self.selected_only = QCheckBox("Selected features only")
        layout.addWidget(self.aoi_layer_combo)
        layout.addWidget(self.selected_only)
        self.aoi_label = QLabel("No area chosen yet")
        self.aoi_label.setWordWrap(True)
        layout.addWidget(self.aoi_label)
        return group

    def _embeddings_group(self) -> QGroupBox:
        group = QGroupBox("Embeddings")
        form = QFormLayout(group)
        self.source_combo = compact(QComboBox())
        for index, (key, label, _, tooltip) in enumerate(SOURCES):
            self.source_combo.addItem(label, key)
            self.source_combo.setItemData(index, tooltip, Qt.ItemDataRole.ToolTipRole)
        self.source_combo.currentIndexChanged.connect(self._on_source_changed)
        self.embeddings_file = QgsFileWidget()
        self.embeddings_file.setFilter("GeoTIFF (*.tif *.tiff);;All files (*)")
        self.embeddings_file.setDialogTitle("AlphaEarth embeddings raster (64 bands)")
        self.embeddings_layer = compact(QgsMapLayerComboBox())
        self.embeddings_layer.setFilters(QgsMapLayerProxyModel.Filter.RasterLayer)
        self.project_edit = QLineEdit()
        self.project_edit.setPlaceholderText("Cloud project id (empty: $EARTHENGINE_PROJECT)")
        self.year_spin = QSpinBox()
        self.year_spin.setRange(choices.FIRST_YEAR, choices.last_year())
        self.year_spin.setValue(choices.DEFAULT_YEAR)
        self.year_spin.valueChanged.connect(self._update_output_hint)
        form.addRow("Source", self.source_combo)
        form.addRow("File", self.embeddings_file)
        form.addRow("Layer", self.embeddings_layer)
        form.addRow("Cloud project", self.project_edit)
        form.addRow("Year", self.year_spin)
        self.embeddings_form = form
        return group

    def _model_group(self) -> QGroupBox:
        group = QGroupBox("Model")
        layout = QVBoxLayout(group)
        self.bundled_radio = QRadioButton("Bundled model")
        self.folder_radio = QRadioButton("Model folder")
        self.model_choice = QButtonGroup(group)
        for button in (self.bundled_radio, self.folder_radio):
            self.model_choice.addButton(button)
            layout.addWidget(button)
        self.bundled_radio.setChecked(True)
        self.model_folder = QgsFileWidget()
        self.model_folder.setStorageMode(QgsFileWidget.StorageMode.GetDirectory)
        self.model_folder.setDialogTitle("Model folder (model.json + model.safetensors)")
        layout.addWidget(self.model_folder)
        self.terrain_row = QWidget()  # shown only for models trained relative to a coarse terrain
        terrain_layout = QFormLayout(self.terrain_row)
        terrain_layout.setContentsMargins(0, 0, 0, 0)
        self.terrain_source = compact(QComboBox())  # a DEM fetched for the area, or a raster layer
        for key in choices.TERRAIN_PRODUCTS:
            self.terrain_source.addItem(DEM_PRODUCTS[key].label, key)
        self.terrain_source.addItem("A raster layer", TERRAIN_LAYER)
        self.terrain_source.setToolTip(
            "The model predicts height above a coarse terrain (DEM), which is added back. The Copernicus DEM is "
            f"downloaded for the area (public COGs, no account, cached; open sea is 0 m). {DEM_ATTRIBUTION}")
        self.terrain_source.currentIndexChanged.connect(self._update_terrain_row)
        self.terrain_combo = compact(QgsMapLayerComboBox())
        self.terrain_combo.setFilters(QgsMapLayerProxyModel.Filter.RasterLayer)
        self.terrain_combo.setAllowEmptyLayer(True)
        self.terrain_combo.setLayer(None)
        self.terrain_combo.setToolTip("The model predicts height above this coarse terrain (DEM), which is added back")
        terrain_layout.addRow("Coarse terrain", self.terrain_source)
        terrain_layout.addRow("Layer", self.terrain_combo)
        self.terrain_row.setVisible(False)
        layout.addWidget(self.terrain_row)
        self.card_text = QPlainTextEdit()
        self.card_text.setReadOnly(True)
        self.card_text.setMaximumHeight(96)
        layout.addWidget(self.card_text)
        device_row = QHBoxLayout()
        self.device_combo = compact(QComboBox())
        for key, label in ((key, "Auto" if key == "auto" else key.upper()) for key in choices.DEVICES):
            self.device_combo.addItem(label, key)
        self.detect_button = QPushButton("Detect GPU")
        self.detect_button.clicked.connect(self.detect_device)
        device_row.addWidget(QLabel("Device"))
        device_row.addWidget(self.device_combo, 1)
        device_row.addWidget(self.detect_button)
        layout.addLayout(device_row)
        self.device_label = QLabel("GPU: not checked yet (PyTorch loads only when needed)")
        self.device_label.setWordWrap(True)
        layout.addWidget(self.device_label)
        self.bundled_radio.toggled.connect(self.refresh_model_card)
        self.model_folder.fileChanged.connect(self.refresh_model_card)
        self.device_combo.currentIndexChanged.connect(self._on_device_changed)
        return group

    def _run_on_group(self) -> QGroupBox:
        """Where the prediction runs: an advanced choice, collapsed while it is this computer.

        Local Dask workers cut the area into chunks predicted by N processes (core.distributed);
        a scheduler sends them to a cluster. Enabled only when the worker environment has Dask.
        """
        self.run_on_group = QgsCollapsibleGroupBoxBasic()
        self.run_on_group.setObjectName("RunPredictionOn")
        grid = QGridLayout(self.run_on_group)
        self.run_on_choice = QButtonGroup(self.run_on_group)
        self.run_on_buttons: dict[str, QRadioButton] = {}
        for row, (key, (label, _)) in enumerate(RUN_ON.items()):
            button = QRadioButton(label)
            self.run_on_choice.addButton(button)
            self.run_on_buttons[key] = button
            grid.addWidget(button, row, 0, 1, 2 if key == "process" else 1)
        self.run_on_buttons["process"].setChecked(True)
        self.dask_workers_spin = QSpinBox()
        self.dask_workers_spin.setRange(1, MAX_DASK_WORKERS)
        self.dask_workers_spin.setValue(int(settings.DEFAULTS["dask_workers"]))
        self.dask_workers_spin.setSuffix(" workers")
        self.dask_scheduler_edit = QLineEdit()
        self.dask_scheduler_edit.setPlaceholderText("tcp://host:8786")
        grid.addWidget(self.dask_workers_spin, 1, 1)
        grid.addWidget(self.dask_scheduler_edit, 2, 1)
        grid.setColumnStretch(1, 1)
        self.dask_hint = QLabel()
        self.dask_hint.setWordWrap(True)
        self.dask_hint.setVisible(False)
        grid.addWidget(self.dask_hint, 3, 0, 1, 2)
        self._dask_checked: Optional[tuple[str, bool]] = None  # (worker Python, has Dask), asked once per change
        self.run_on_choice.buttonToggled.connect(self._update_run_on)
        self.dask_workers_spin.valueChanged.connect(self._update_run_on)
        self._update_run_on()
        return self.run_on_group

    def run_on(self) -> str:
        """The checked "Run prediction on" key (RUN_ON)."""
        return next(key for key, button in self.run_on_buttons.items() if button.isChecked())

    def _update_run_on(self, *_changed) -> None:
        """Only the chosen way's field is editable; the title says the choice even when collapsed."""
        key = self.run_on()
        self.dask_workers_spin.setEnabled(key == "workers" and self.run_on_buttons["workers"].isEnabled())
        self.dask_scheduler_edit.setEnabled(key == "scheduler" and self.run_on_buttons["scheduler"].isEnabled())
        count = self.dask_workers_spin.value()
        where = f"{count} local Dask worker{'s' if count != 1 else ''}" if key == "workers" else RUN_ON[key][1]
        self.run_on_group.setTitle(f"Run prediction on: {where}")

    def _update_dask_availability(self, python: Optional[str]) -> None:
        """Enable the Dask choices only when the worker's Python has Dask (asked once per environment)."""
        if python is not None and (self._dask_checked is None or self._dask_checked[0] != python):
            self._dask_checked = (python, worker_has_dask(python))
        available = python is not None and self._dask_checked is not None and self._dask_checked[1]
        managed = python is not None and self.environment.is_ready() and Path(python) == self.environment.python
        why = ("" if available else
               "Needs Dask in the worker environment: no Python environment yet" if python is None else
               "Needs Dask in the worker environment: 'Add Dask' under Python environment" if managed else
               f"Needs Dask in the worker environment ({python}): pip install {' '.join(DASK_MODULES)}")
        tips = {"workers": "Cut the area into chunks predicted by this many processes on this computer (Dask)",
                "scheduler": "Send the chunks to a running Dask cluster (its scheduler's address). Its workers "
                             "must see the output folder, the model and the embeddings at the same paths"}
        for key in ("workers", "scheduler"):
            self.run_on_buttons[key].setEnabled(available)
            self.run_on_buttons[key].setToolTip(why or tips[key])
        self.dask_workers_spin.setToolTip(why or tips["workers"])
        self.dask_scheduler_edit.setToolTip(why or tips["scheduler"])
        if not available:
            self.run_on_buttons["process"].setChecked(True)
        self.dask_hint.setText(why)
        self.dask_hint.setVisible(bool(why) and python is not None)
        self._update_run_on()

    def dask_choice(self) -> tuple[int, str]:
        """(workers, scheduler) for the job: (0, "") runs in one process; a bad address is one InputError."""
        key = self.run_on()
        if key == "workers":
            return self.dask_workers_spin.value(), ""
        if key == "scheduler":
            return 0, check_scheduler_address(self.dask_scheduler_edit.text())
        return 0, ""

    def _reference_group(self) -> QGroupBox:
        group = QGroupBox("Reference DSM (optional)")
        layout = QVBoxLayout(group)
        self.reference_combo = compact(QgsMapLayerComboBox())
        self.reference_combo.setFilters(QgsMapLayerProxyModel.Filter.RasterLayer)
        self.reference_combo.setAllowEmptyLayer(True)
        self.reference_combo.setLayer(None)
        self.reference_combo.setToolTip("A DSM to compare with: adds a difference layer, metrics and plots")
        layout.addWidget(self.reference_combo)
        return group

    def _output_group(self) -> QGroupBox:
        group = QGroupBox("Output")
        layout = QVBoxLayout(group)
        self.output_folder = QgsFileWidget()
        self.output_folder.setStorageMode(QgsFileWidget.StorageMode.GetDirectory)
        self.output_folder.setFilePath(settings.default_output_folder())
        self.output_hint = QLabel()
        self.output_hint.setWordWrap(True)
        layout.addWidget(self.output_folder)
        layout.addWidget(self.output_hint)
        return group

    def _run_row(self) -> QVBoxLayout:
        layout = QVBoxLayout()
        buttons = QHBoxLayout()
        self.run_button = QPushButton("Run")
        self.run_button.clicked.connect(self.run)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        self.progress = QProgressBar()
        self.progress.setRange(0, 100)
        self.progress.setValue(0)  # 0 % until a run reports progress
        layout.addLayout(buttons)
        layout.addWidget(self.progress)
        return layout

    def _results_group(self) -> QGroupBox:
        group = QGroupBox("Results")
        layout = QVBoxLayout(group)
        grid = QGridLayout()
        grid.setHorizontalSpacing(18)
        self.metric_labels: dict[str, QLabel] = {}
        for index, (key, label, _) in enumerate(METRICS):
            value = QLabel("–")
            value.setAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
            grid.addWidget(QLabel(label), index // 2, (index % 2) * 2)
            grid.addWidget(value, index // 2, (index % 2) * 2 + 1)
            self.metric_labels[key] = value
        layout.addLayout(grid)
        self.baseline_label = QLabel()  # the terrain-alone baseline, for terrain-relative models
        self.baseline_label.setWordWrap(True)
        self.baseline_label.setVisible(False)
        layout.addWidget(self.baseline_label)
        self.result_label = QLabel("No run yet")
        self.result_label.setWordWrap(True)
        layout.addWidget(self.result_label)
        self.scatter_image, self.histogram_image = QLabel(), QLabel()
        for image in (self.scatter_image, self.histogram_image):
            image.setAlignment(Qt.AlignmentFlag.AlignHCenter)
            image.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Preferred)
            layout.addWidget(image)
        return group

    # ---- settings -----------------------------------------------------------------------

    def _restore_settings(self) -> None:
        self.source_combo.setCurrentIndex(max(0, self.source_combo.findData(settings.read("source"))))
        self.year_spin.setValue(int(settings.read("year")))
        self.embeddings_file.setFilePath(settings.read_text("embeddings_file"))
        self.project_edit.setText(settings.read_text("ee_project"))
        self.folder_radio.setChecked(settings.read("model") == "folder")
        self.model_folder.setFilePath(settings.read_text("model_folder"))
        self.device_combo.setCurrentIndex(max(0, self.device_combo.findData(settings.read("device"))))
        self._restore_run_on()
        self.output_folder.setFilePath(settings.read_text("output_folder"))
        size = settings.read("dock_size")
        if isinstance(size, QSize) and size.isValid():
            self.saved_size = size
            self.resize(size)
        self._on_source_changed()
        self.refresh_model_card()
        self._update_output_hint()

    def _restore_run_on(self) -> None:
        """The remembered "Run prediction on" choice; the group opens when it is not this computer."""
        key = settings.read_text("run_on")
        self.run_on_buttons[key if key in RUN_ON else "process"].setChecked(True)
        try:
            self.dask_workers_spin.setValue(int(settings.read("dask_workers")))
        except (TypeError, ValueError):  # edited by hand: keep the default
            pass
        self.dask_scheduler_edit.setText(settings.read_text("dask_scheduler"))
        self.run_on_group.setCollapsed(self.run_on() == "process")

    def save_settings(self) -> None:
        settings.write(source=self.source_combo.currentData(), year=self.year_spin.value(),
                       embeddings_file=self.embeddings_file.filePath(), ee_project=self.project_edit.text().strip(),
                       model="folder" if self.folder_radio.isChecked() else "bundled",
                       model_folder=self.model_folder.filePath(), device=self.device_combo.currentData(),
                       run_on=self.run_on(), dask_workers=self.dask_workers_spin.value(),
                       dask_scheduler=self.dask_scheduler_edit.text().strip(),
                       output_folder=self.output_folder.filePath())
        if self.size_restored:  # a dock never shown has no size of its own yet
            settings.write(dock_size=self.size())

    def showEvent(self, event) -> None:  # noqa: N802 - Qt API
        """On first show, give the dock the size it had last session (QGIS only restores its own docks)."""
        super().showEvent(event)
        if self.size_restored:
            return
        self.size_restored = True
        size, window = self.saved_size, self.parentWidget()
        if size is None:
            return
        if self.isFloating() or not isinstance(window, QMainWindow):
            screen = self.screen().availableGeometry().size() if self.screen() is not None else size
            self.resize(size.boundedTo(screen))  # never taller or wider than the screen
        elif window.dockWidgetArea(self) in (Qt.DockWidgetArea.TopDockWidgetArea,
                                             Qt.DockWidgetArea.BottomDockWidgetArea):
            window.resizeDocks([self], [size.height()], Qt.Orientation.Vertical)
        else:
            window.resizeDocks([self], [size.width()], Qt.Orientation.Horizontal)

    # ---- area of interest ---------------------------------------------------------------

    def set_aoi(self, aoi: AreaOfInterest) -> None:
        """Make ``aoi`` current: outline it and show its size before anything runs."""
        self.aoi = aoi
        self.rubber_band.show(aoi)
        self.aoi_label.setText(describe_estimate(aoi))
        self._update_output_hint()

    def _on_draw_toggled(self, checked: bool) -> None:
        if checked:
            self.canvas.setMapTool(self.map_tool)
        elif self.canvas.mapTool() is self.map_tool:
            self.canvas.unsetMapTool(self.map_tool)

    def _on_map_tool_set(self, new_tool: Optional[QgsMapTool], _old: Optional[QgsMapTool] = None) -> None:
        self.draw_button.setChecked(new_tool is self.map_tool)

    def _on_drawn(self, rect: QgsRectangle) -> None:
        self._try(lambda: self.set_aoi(rectangle_aoi(rect, self.canvas.mapSettings().destinationCrs())))

    def use_canvas_extent(self) -> None:
        self._try(lambda: self.set_aoi(canvas_aoi(self.canvas)))

    def use_layer_extent(self) -> None:
        self._try(lambda: self.set_aoi(layer_aoi(self.aoi_layer_combo.currentLayer(), self.selected_only.isChecked())))

    def _try(self, action) -> None:
        try:
            action()
        except InputError as exc:
            self.report_error(exc, level=Qgis.MessageLevel.Warning)

    # ---- embeddings, model, output --------------------------------------------------------

    def _filter_layer_pickers(self, *_changed) -> None:
        """Embeddings pickers list only 64-band rasters; reference and terrain pickers never do."""
        rasters = [layer for layer in QgsProject.instance().mapLayers().values() if isinstance(layer, QgsRasterLayer)]
        embeddings = [layer for layer in rasters if layer.bandCount() == EMBEDDING_BANDS]
        self.embeddings_layer.setExceptedLayerList([layer for layer in rasters if layer not in embeddings])
        for combo in (self.reference_combo, self.terrain_combo):
            combo.setExceptedLayerList(embeddings)

    def _on_source_changed(self) -> None:
        """Show only the chosen source's own field: a file, a layer or an Earth Engine project."""
        key = self.source_combo.currentData()
        for widget, shown_for in ((self.embeddings_file, "file"), (self.embeddings_layer, "layer"),
                                  (self.project_edit, "earthengine")):
            widget.setVisible(key == shown_for)
            self.embeddings_form.labelForField(widget).setVisible(key == shown_for)

    def embeddings_path(self) -> str:
        if self.source_combo.currentData() == "file":
            return existing_file(self.embeddings_file.filePath(), "embeddings file")
        return layer_file(self.embeddings_layer.currentLayer(), "embeddings")

    def source_options(self) -> dict:
        """Options for the remote sources: the Earth Engine project, a COG mirror.

        The mirror has no widget: ``alphaearth_height/cog_base_url`` in QgsSettings, for
        those who must go through their own copy of the public COGs.
        """
        source = FETCH_SOURCES[self.source_combo.currentData()]
        if source == "local":  # the job carries the raster itself (HeightJob.embeddings)
            return {}
        return source_options(source, project=self.project_edit.text(),
                              base_url=settings.read_text("cog_base_url"))

    def reference_path(self) -> Optional[str]:
        layer = self.reference_combo.currentLayer()
        return None if layer is None else layer_file(layer, "reference DSM")

    def model_path(self) -> Optional[str]:
        """The chosen model folder, or None for the bundled model."""
        if self.bundled_radio.isChecked():
            return None
        folder = self.model_folder.filePath()
        if not folder:
            raise InputError("model folder", "is not set", "Choose a model folder or use the bundled model")
        return folder

    def refresh_model_card(self) -> None:
        """Show the model card (JSON only: the weights and torch load in the task)."""
        self.model_folder.setEnabled(self.folder_radio.isChecked())
        try:
            card = read_card(Path(self.model_path() or bundled_model_dir()))
            self.card_text.setPlainText(card_summary(card))
            self.terrain_row.setVisible(uses_terrain(card))
            if uses_terrain(card):  # the terrain the model was trained with, when it is a DEM product
                trained = card["target"]["relative_to"].get("product")
                self.terrain_source.setCurrentIndex(self.terrain_source.findData(
                    trained if trained in choices.TERRAIN_PRODUCTS else TERRAIN_LAYER))
                self._update_terrain_row()
        except InputError as exc:
            self.card_text.setPlainText(str(exc))
            self.terrain_row.setVisible(False)

    def _update_terrain_row(self) -> None:
        """The layer picker only when the terrain is a layer (a DEM product needs no file)."""
        layout = self.terrain_row.layout()
        shown = self.terrain_source.currentData() == TERRAIN_LAYER
        self.terrain_combo.setVisible(shown)
        label = layout.labelForField(self.terrain_combo)
        if label is not None:
            label.setVisible(shown)

    def terrain_path(self, card: dict) -> Optional[str]:
        """The coarse terrain a model trained relative to one needs: "copernicus-30"/"copernicus-90"
        (downloaded for the area in the worker) or a layer's file, checked before the task starts."""
        if not uses_terrain(card):
            return None
        choice = self.terrain_source.currentData()
        if choice in choices.TERRAIN_PRODUCTS:
            return choice
        return layer_file(self.terrain_combo.currentLayer(), "coarse terrain")

    def _on_device_changed(self) -> None:
        if self.device_combo.currentData() == "cuda":
            self.detect_device()

    def detect_device(self) -> None:
        """Ask the worker environment what it runs on (torch is imported there, never in QGIS)."""
        python = worker_python(self.environment)
        if self.work.probe is not None or python is None:
            return
        self.device_label.setText("GPU: detecting…")
        self.work.start_probe(python, self._on_probe_done)

    def _on_probe_done(self, exception: Optional[BaseException], description: str = "") -> None:
        self.device_label.setText(f"Auto uses: {description}" if exception is None
                                  else f"GPU detection failed: {exception}")

    def _update_output_hint(self) -> None:
        if self.aoi is None:
            self.output_hint.setText("Layers 'height' and 'difference' go in a group named after the AOI and year")
            return
        self.output_hint.setText(f"Layers 'height', 'difference' in group {aoi_stem(self.aoi, self.year_spin.value())}")

    def output_path(self) -> Path:
        folder = Path(self.output_folder.filePath() or settings.default_output_folder())
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(f"output folder {folder}", f"cannot be created ({exc.strerror})",
                             "Choose a folder you can write to") from None
        return folder

    # ---- running --------------------------------------------------------------------------

    def build_job(self) -> HeightJob:
        """Everything cheap to check is checked here, before a task is started."""
        if self.aoi is None:
            raise InputError("area of interest", "is not chosen", "Draw it, use the canvas extent or a polygon layer")
        source = FETCH_SOURCES[self.source_combo.currentData()]
        embeddings = ""
        if source == "local":  # remote sources are checked in the task: no network on the UI thread
            embeddings = self.embeddings_path()
            with EmbeddingRaster(embeddings) as raster:
                aoi_window(raster.grid, self.aoi, embeddings)
        reference = self.reference_path()
        model = self.model_path()
        terrain = self.terrain_path(read_card(Path(model or bundled_model_dir())))
        dask_workers, dask_scheduler = self.dask_choice()
        out_dir = self.output_path()
        name = unique_stem(out_dir, aoi_stem(self.aoi, self.year_spin.value()))
        return HeightJob(embeddings=embeddings, out_dir=str(out_dir), model=model, aoi=self.aoi,
                         reference=reference, name=name, device=self.device_combo.currentData(), source=source,
                         year=self.year_spin.value(), source_options=self.source_options(), terrain=terrain,
                         dask_workers=dask_workers, dask_scheduler=dask_scheduler)

    def run(self) -> None:
        if self.is_running():
            return
        python = worker_python(self.environment)
        try:
            if python is None:
                raise InputError("Python environment", "is not installed",
                                 "Click Install in the dock's 'Python environment' group first")
            job = self.build_job()
            question = self.fetch_size_question(job)
        except InputError as exc:
            self.report_error(exc)
            return
        if question is not None and not self.confirm_large_fetch(question):
            self.iface.messageBar().pushMessage(TITLE, f"Run not started: it would {question}",
                                                Qgis.MessageLevel.Info, 8)
            return
        self.save_settings()
        self._show_metrics({})
        self._set_running(True)
        self.work.start_height(job, python, self._on_task_done, self._on_progress)

    def fetch_size_question(self, job: HeightJob) -> Optional[str]:
        """What the run's fetch would cost when that is over the size limit; None when it is not.

        Offline (core.fetch.estimate, online=False): the grid the run fetches (the AOI with
        the context around it), written as int8, downloaded as COG blocks or Earth Engine
        float32. The limit is the setting ``alphaearth_height/max_fetch_gb``, else
        $ALPHAEARTH_HEIGHT_MAX_GB, else 5 GB.
        """
        if job.aoi is None:
            return None
        from ..core.fetch import check_size, context_grids, estimate, size_limit_gb
        from ..core.job import DEFAULT_CONTEXT

        raw = settings.read_text("max_fetch_gb")
        try:
            value = float(raw) if raw else None
        except ValueError:
            raise InputError(f"setting {settings.PREFIX}max_fetch_gb={raw!r}", "is not a number of gigabytes",
                             "Give a number such as 5 in the QGIS settings, or remove it") from None
        limit = size_limit_gb(value)
        options = source_options(job.source, raster=job.embeddings, **job.source_options)
        context = DEFAULT_CONTEXT if job.context is None else int(job.context)
        _, grown = context_grids(job.aoi, job.source, context, **options)
        info = estimate(job.aoi, job.year, job.source, grid=grown, cache_dir=job.cache_dir, online=False, **options)
        try:
            check_size(info, limit, "")
        except InputError as exc:
            return exc.problem
        return None

    def confirm_large_fetch(self, question: str) -> bool:
        """Ask before starting a run whose fetch is over the size limit (tests replace this)."""
        from qgis.PyQt.QtWidgets import QMessageBox

        answer = QMessageBox.question(self, TITLE, f"This run would {question}.\n\nStart it anyway?",
                                      QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No,
                                      QMessageBox.StandardButton.No)
        return answer == QMessageBox.StandardButton.Yes

    def is_running(self) -> bool:
        return self.work.height_running()

    def cancel(self) -> None:
        if self.is_running():
            self.work.height.cancel()

    def _on_progress(self, value: float) -> None:
        self.progress.setValue(int(value))

    def _set_running(self, running: bool) -> None:
        self.run_button.setEnabled(not running and worker_python(self.environment) is not None)
        self.cancel_button.setEnabled(running)
        if running:
            self.progress.setValue(0)

    def _on_task_done(self, task: HeightTask) -> None:
        self._set_running(False)
        ok = task.outcome == "success"
        if ok:
            ok = self._show_result(task.result, task.job.name)
        elif task.outcome == "cancelled":
            self.progress.setValue(0)
            self.iface.messageBar().pushMessage(TITLE, "Run cancelled; nothing was written",
                                                Qgis.MessageLevel.Info, 5)
        else:
            self.report_error(task.error or RuntimeError("the run failed"), logged=True,
                              details=getattr(task.error, "details", ""))
        self.runFinished.emit(ok)

    def _show_result(self, result: HeightJobResult, name: str) -> bool:
        try:
            add_result_layers(result, name)
        except InputError as exc:
            self.report_error(exc)
            return False
        self.last_result = result
        self._show_metrics(result.metrics.get("overall", {}))
        self._show_baseline(result.metrics.get("baselines", {}).get("terrain alone"))
        self._show_plots(result.plots)
        self.device_label.setText(f"Last run on: {result.device}")
        self.result_label.setText(f"{result.model_name} on {result.device} → {result.predicted.parent}")
        self.iface.messageBar().pushMessage(TITLE, f"Height layers added: {name}", Qgis.MessageLevel.Success, 5)
        return True

    def _show_metrics(self, overall: dict) -> None:
        for key, _, fmt in METRICS:
            value = overall.get(key)
            self.metric_labels[key].setText("–" if value is None else fmt.format(value))
        if not overall:
            for image in (self.scatter_image, self.histogram_image):
                image.clear()
            self._show_baseline(None)

    def _show_baseline(self, baseline: Optional[dict]) -> None:
        """The coarse terrain alone scored like the prediction: what a terrain-relative model must beat."""
        overall = (baseline or {}).get("overall", {})
        if not overall.get("n"):
            self.baseline_label.setVisible(False)
            self.baseline_label.clear()
            return
        self.baseline_label.setText(
            f"Terrain alone ({baseline.get('name') or 'coarse terrain'}): R² {overall['r2']:.3f}, "
            f"RMSE {overall['rmse']:.2f} m, median difference {overall['median_diff']:+.2f} m")
        self.baseline_label.setVisible(True)

    def _show_plots(self, plots: list[str]) -> None:
        for image, suffix in ((self.scatter_image, "_scatter.png"), (self.histogram_image, "_histogram.png")):
            path = next((p for p in plots if p.endswith(suffix)), None)
            pixmap = QPixmap(path) if path else QPixmap()
            if pixmap.isNull():
                image.clear()
            else:
                image.setPixmap(pixmap.scaledToWidth(PLOT_WIDTH, Qt.TransformationMode.SmoothTransformation))

    def report_error(self, exc: BaseException, level: Qgis.MessageLevel = Qgis.MessageLevel.Critical,
                     logged: bool = False, details: str = "") -> None:
        """The one-line reason, in full, on the message bar; its Details button shows ``details``
        (e.g. a log) or the traceback. The traceback also goes to the log panel."""
        reason = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
        plain = isinstance(exc, (InputError, WorkerError))  # already worded for the user
        text = reason if plain else f"{type(exc).__name__}: {reason or 'no message'}"
        if level == Qgis.MessageLevel.Warning:
            log.warning("%s", text)
        elif not logged:
            log.error("%s", text, exc_info=exc)
        if not details:
            details = str(exc) if isinstance(exc, InputError) or exc.__traceback__ is None else "".join(
                traceback.format_exception(type(exc), exc, exc.__traceback__))
        duration = 0 if level == Qgis.MessageLevel.Critical else 8
        self.iface.messageBar().pushItem(self._message_item(text, details, level, duration))

    def _message_item(self, text: str, details: str, level: Qgis.MessageLevel, duration: int) -> QgsMessageBarItem:
        """A bar item with the whole text word-wrapped (the stock one clips it to one line) and Details."""
        content = QWidget(self.iface.messageBar())  # owned by Qt (the item takes it), not by Python's GC
        row = QHBoxLayout(content)
        row.setContentsMargins(0, 0, 0, 0)
        label = QLabel(f"<b>{html.escape(TITLE)}</b>: {html.escape(text)}")
        label.setTextFormat(Qt.TextFormat.RichText)
        label.setWordWrap(True)
        label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        label.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Preferred)
        button = QPushButton("Details")
        button.setObjectName("details")
        button.clicked.connect(lambda: self.show_details(text, details))
        row.addWidget(label, 1)
        row.addWidget(button, 0, Qt.AlignmentFlag.AlignTop)
        item = QgsMessageBarItem(TITLE, text, content, level, duration)  # title and text kept for the log
        for browser in item.findChildren(QTextBrowser):  # the stock text, superseded by the label
            browser.hide()
        return item

    def show_details(self, text: str, details: str) -> None:
        """The full error text (traceback or log) in a window that does not block QGIS."""
        viewer = QgsMessageViewer(self.iface.mainWindow())
        viewer.setTitle(f"{TITLE}: error details")
        viewer.setMessageAsPlainText(f"{text}\n\n{details}" if details and details != text else text)
        self.details_viewer = viewer
        viewer.showMessage(False)

    # ---- Python environment -----------------------------------------------------------------

    def refresh_environment(self) -> None:
        """Say where runs happen and what installing would add; Run needs the environment."""
        env, python = self.environment, worker_python(self.environment)
        busy = self.work.environment is not None
        if python is not None and not env.is_ready():
            text = f"Runs use the Python set by ${PYTHON_OVERRIDE}: {python}"
        elif python is not None:
            torch = "training" in env.installed_sets()
            if self._env_size is None:  # walking the folder takes a while: once per install or removal
                self._env_size = env.size_bytes()
            text = (f"Ready: {env.folder} ({self._env_size / 1e6:,.0f} MB). " +
                    ("Training and GPU inference available (PyTorch)." if torch else
                     "CPU inference with ONNX Runtime. Training and GPU inference need PyTorch "
                     "(~0.8 GB CPU build, ~5 GB with CUDA): 'Add training'."))
        else:
            text = ("Runs happen in a separate Python environment the plugin manages (ONNX Runtime, rasterio, "
                    "numpy, matplotlib; what the system already has is reused), never in QGIS's own Python. "
                    + (self._plan_text or "Checking what it needs to download…"))
        self.env_label.setText(text)
        self.env_install_button.setVisible(python is None)
        self.env_install_button.setEnabled(not busy)
        self.env_training_button.setVisible(env.is_ready() and "training" not in env.installed_sets())
        self.env_training_button.setEnabled(not busy)
        self.env_dask_button.setVisible(env.is_ready() and "dask" not in env.installed_sets())
        self.env_dask_button.setEnabled(not busy)
        self.env_remove_button.setVisible(env.python.is_file())
        self.env_remove_button.setEnabled(not busy)
        self.run_button.setEnabled(python is not None and not self.is_running())
        self._update_dask_availability(python)
        if python is None and self._plan_text is None and not busy:
            self._start_env_task("plan", "inference")

    def install_environment(self, package_set: str = "inference") -> None:
        self._start_env_task("install", package_set)

    def remove_environment(self) -> None:
        self._start_env_task("remove", "inference")

    def _start_env_task(self, action: str, package_set: str) -> None:
        started = self.work.start_environment(self.environment, action, package_set, self._on_env_task_done,
                                              self._on_progress if action == "install" else None)
        if started is None:
            return
        self.refresh_environment()
        if action == "install":
            self.env_label.setText(f"Installing the {package_set} packages… (pip's output is in the log panel)")

    def _on_env_task_done(self, task: EnvironmentTask) -> None:
        self._env_size = None
        self._dask_checked = None  # an install may have brought Dask (or a removal taken it)
        if task.action == "plan":
            self._plan_text = ("Install will " + task.plan.describe() + "." if task.plan is not None
                               else f"Could not check the download size ({task.error}).")
        self.refresh_environment()
        if task.action != "plan":
            self.progress.setValue(0)
            if task.outcome == "cancelled":
                self.iface.messageBar().pushMessage(TITLE, "Python environment set-up cancelled",
                                                    Qgis.MessageLevel.Info, 5)
            elif task.outcome == "failed":
                self.report_error(RuntimeError(task.error), details="\n".join(task.lines[-60:]))
            else:
                done = "installed" if task.action == "install" else "removed"
                self.iface.messageBar().pushMessage(TITLE, f"Python environment {done}", Qgis.MessageLevel.Success, 5)
            self.environmentChanged.emit(worker_python(self.environment) is not None)

    # ---- teardown -----------------------------------------------------------------------

    def shutdown(self) -> None:
        """Remember choices, stop background work, take our items off the canvas (unload)."""
        self.save_settings()
        if self._owns_work:
            self.work.cancel_all()
        self.canvas.mapToolSet.disconnect(self._on_map_tool_set)
        QgsProject.instance().layersAdded.disconnect(self._filter_layer_pickers)
        QgsProject.instance().layersRemoved.disconnect(self._filter_layer_pickers)
        if self.canvas.mapTool() is self.map_tool:
            self.canvas.unsetMapTool(self.map_tool)
        self.map_tool.deleteLater()  # the tool owns its own drawing band on the canvas
        self.rubber_band.remove()
