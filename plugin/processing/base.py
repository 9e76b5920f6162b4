"""What every AlphaEarth Height algorithm shares: naming, help, parameter helpers and
turning the core's one-line ``InputError`` into the ``QgsProcessingException`` that the
toolbox, the model builder and ``qgis_process`` all report."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from qgis.core import (QgsMapLayer, QgsProcessingAlgorithm, QgsProcessingContext, QgsProcessingException,
                       QgsProcessingFeedback, QgsProcessingLayerPostProcessorInterface,
                       QgsProcessingParameterDefinition, QgsProcessingParameterEnum, QgsProcessingParameterNumber,
                       QgsProcessingParameterRasterLayer, QgsRasterLayer)
from qgis.PyQt.QtCore import QCoreApplication

from ..core.choices import DEVICES, TERRAIN_PRODUCTS
from ..core.errors import InputError
from ..layers import layer_file
from .compat import ADVANCED, CAN_CANCEL, DOUBLE, INTEGER

RASTER_SUFFIXES = (".tif", ".tiff")
# the Coarse terrain choices: a raster, or one of the DEM products core fetches
TERRAIN_CHOICES = ("raster", *TERRAIN_PRODUCTS)
TERRAIN_LABELS = ("The terrain raster below (none if empty)",
                  "Copernicus DEM 30 m (GLO-30, downloaded for the area, no account)",
                  "Copernicus DEM 90 m (GLO-90, downloaded for the area, no account)")
TERRAIN_HELP = ("Coarse terrain: a raster, or the Copernicus DEM (GLO-30 or GLO-90) downloaded for the "
                "embeddings' area from its public Cloud-Optimized GeoTIFFs (no account; cached; open sea is 0 m; "
                "© DLR e.V. 2010-2014 and © Airbus Defence and Space GmbH 2014-2018 provided under COPERNICUS "
                "by the European Union and ESA; all rights reserved).")
DEVICE_HELP = "auto picks a CUDA GPU, then Apple MPS, then the CPU; naming a missing GPU is an error."


class HeightAlgorithm(QgsProcessingAlgorithm):
    """Base class; subclasses set the class attributes and implement ``execute``."""

    ALG_ID = ""
    DISPLAY_NAME = ""
    GROUP = ""
    HELP = ""
    CANCELLABLE = False  # True only where the core call takes a cancel callback

    def name(self) -> str:
        return self.ALG_ID

    def displayName(self) -> str:  # noqa: N802 - QGIS API
        return self.tr(self.DISPLAY_NAME)

    def group(self) -> str:
        return self.tr(self.GROUP)

    def groupId(self) -> str:  # noqa: N802 - QGIS API
        return self.GROUP.lower()

    def shortHelpString(self) -> str:  # noqa: N802 - QGIS API
        return self.tr(self.HELP)

    def tr(self, text: str) -> str:
        return QCoreApplication.translate("AlphaEarthHeight", text)

    def flags(self):
        """Without a core cancel hook, a Cancel button would do nothing: do not offer one."""
        flags = super().flags()
        if self.CANCELLABLE:
            return flags
        # Inverting the flags type (QFlags on Qt5, IntFlag on Qt6) works on every QGIS;
        # inverting a bare scoped enum member does not.
        return flags & ~type(flags)(CAN_CANCEL)

    def createInstance(self) -> "HeightAlgorithm":  # noqa: N802 - QGIS API
        return type(self)()

    def checkParameterValues(self, parameters: dict, context: QgsProcessingContext):  # noqa: N802 - QGIS API
        """A raster file GDAL cannot open gets the core's one line, not QGIS >= 3.34's "... not found"."""
        from ..core.rasters import open_raster  # rasterio only when an algorithm runs, not when QGIS lists them

        for definition in self.parameterDefinitions():
            value = parameters.get(definition.name())
            if isinstance(definition, QgsProcessingParameterRasterLayer) and isinstance(value, str) \
                    and Path(value).is_file():
                try:
                    open_raster(value).close()
                except InputError as exc:
                    return False, str(exc)
        return super().checkParameterValues(parameters, context)

    def processAlgorithm(self, parameters: dict, context: QgsProcessingContext,  # noqa: N802 - QGIS API
                         feedback: QgsProcessingFeedback) -> dict:
        try:
            return self.execute(parameters, context, feedback)
        except InputError as exc:
            raise QgsProcessingException(str(exc)) from None

    def execute(self, parameters: dict, context: QgsProcessingContext, feedback: QgsProcessingFeedback) -> dict:
        raise NotImplementedError

    # Parameter helpers -------------------------------------------------------------

    def add_int(self, name: str, description: str, default: Optional[int], minimum: int,
                maximum: Optional[int] = None, optional: bool = False, advanced: bool = False) -> None:
        self._add_number(name, description, INTEGER, default, minimum, maximum, optional, advanced)

    def add_double(self, name: str, description: str, default: float, minimum: float, maximum: float) -> None:
        self._add_number(name, description, DOUBLE, default, minimum, maximum, False, False)

    def _add_number(self, name: str, description: str, kind: object, default: Optional[float], minimum: float,
                    maximum: Optional[float], optional: bool, advanced: bool) -> None:
        param = QgsProcessingParameterNumber(name, self.tr(description), kind, default, optional, minimum)
        if maximum is not None:
            param.setMaximum(maximum)
        self.add(param, advanced)

    def add_device(self, name: str = "DEVICE") -> None:
        self.add(QgsProcessingParameterEnum(name, self.tr("Device"), options=list(DEVICES),
                                            defaultValue=0), advanced=True)

    def add_terrain(self, raster_label: str, advanced: bool = False) -> None:
        """TERRAIN_SOURCE (a raster, or the Copernicus DEM fetched for the area) and TERRAIN (the raster)."""
        self.add(QgsProcessingParameterEnum("TERRAIN_SOURCE", self.tr("Coarse terrain"),
                                            options=[self.tr(label) for label in TERRAIN_LABELS], defaultValue=0),
                 advanced)
        self.add(QgsProcessingParameterRasterLayer("TERRAIN", self.tr(raster_label), optional=True), advanced)

    def terrain_input(self, parameters: dict, context: QgsProcessingContext) -> Optional[str]:
        """The terrain input for core: the raster's file, "copernicus-30"/"copernicus-90", or None."""
        choice = self.enum_text(parameters, "TERRAIN_SOURCE", context, TERRAIN_CHOICES)
        raster = self.raster_path(parameters, "TERRAIN", context) if parameters.get("TERRAIN") else None
        if choice == TERRAIN_CHOICES[0]:
            return raster
        if raster:
            raise InputError("Coarse terrain", f"is set both to a raster ({raster}) and to the Copernicus DEM",
                             "Choose one: clear the terrain raster, or set 'Coarse terrain' to the raster")
        return choice

    def add(self, param: QgsProcessingParameterDefinition, advanced: bool = False) -> None:
        if advanced:
            param.setFlags(param.flags() | ADVANCED)
        self.addParameter(param)

    def raster_path(self, parameters: dict, name: str, context: QgsProcessingContext) -> str:
        """The file behind a raster layer input; core reads files with GDAL, not QGIS layers."""
        layer = self.parameterAsRasterLayer(parameters, name, context)
        if layer is None:
            raise QgsProcessingException(self.invalidRasterError(parameters, name))
        return layer_file(layer, self.parameterDefinition(name).description())

    def raster_output(self, parameters: dict, name: str, context: QgsProcessingContext) -> str:
        """The destination path of a raster output; core writes GeoTIFF only."""
        path = self.parameterAsOutputLayer(parameters, name, context)
        if Path(path).suffix.lower() not in RASTER_SUFFIXES:
            raise QgsProcessingException(f"{path}: is not a GeoTIFF name but outputs are written as GeoTIFF. "
                                         "Give a file name ending in .tif")
        return path

    def optional_int(self, parameters: dict, name: str, context: QgsProcessingContext) -> Optional[int]:
        """An optional integer left empty reads as None (let the model card decide), not 0."""
        if parameters.get(name) in (None, ""):
            return None
        return self.parameterAsInt(parameters, name, context)

    def enum_text(self, parameters: dict, name: str, context: QgsProcessingContext, choices: tuple) -> str:
        return choices[self.parameterAsEnum(parameters, name, context)]

    def run_in_worker(self, action: str, params: dict, feedback: QgsProcessingFeedback) -> dict:
        """Run a core action in the worker process (never torch in QGIS); errors as Processing errors."""
        from ..core.cancel import Cancelled
        from ..core.worker import WorkerError, call_worker
        from ..environment import SetupError, require_worker_python

        def relay(level: str, message: str) -> None:
            (feedback.pushInfo if level in ("INFO", "DEBUG") else feedback.pushWarning)(message)

        try:
            return call_worker(action, params, python=require_worker_python(), progress=feedback.setProgress,
                               cancel=feedback.isCanceled, on_log=relay)
        except Cancelled:
            raise QgsProcessingException(self.tr("Cancelled; no output was kept.")) from None
        except (WorkerError, SetupError) as exc:
            details = getattr(exc, "details", "")
            if details:
                feedback.reportError(details, False)
            raise QgsProcessingException(str(exc)) from None

    def style_on_load(self, context: QgsProcessingContext, path: str, style: str) -> None:
        """Style an output as the dock does once Processing loads it ("height" or "difference")."""
        style_on_load(context, path, style)


class StyleOnLoad(QgsProcessingLayerPostProcessorInterface):
    """Applies ``layers.style_<style>`` to an output layer after Processing has loaded it."""

    def __init__(self, style: str) -> None:
        super().__init__()
        self.style = style

    def postProcessLayer(self, layer: QgsMapLayer, context: QgsProcessingContext,  # noqa: N802 - QGIS API
                         feedback: QgsProcessingFeedback) -> None:
        from .. import layers  # QGIS styling only; no torch

        if isinstance(layer, QgsRasterLayer) and layer.isValid():
            getattr(layers, STYLES[self.style])(layer)
            layer.triggerRepaint()


STYLES = {"height": "style_height", "difference": "style_difference"}  # functions in plugin/layers.py
# Processing calls a post-processor after the algorithm has returned, and PyQGIS
# garbage-collects one that only C++ refers to: keep every one we hand out alive here.
# The context deletes the C++ side when it is done; those are dropped on the next call.
_POST_PROCESSORS: list[StyleOnLoad] = []


def style_on_load(context: QgsProcessingContext, path: str, style: str) -> None:
    """If ``path`` is an output QGIS loads on completion, style it like the dock's layers."""
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}")
    if not context.willLoadLayerOnCompletion(path):
        return
    from qgis.PyQt import sip

    _POST_PROCESSORS[:] = [p for p in _POST_PROCESSORS if not sip.isdeleted(p)]
    processor = StyleOnLoad(style)
    _POST_PROCESSORS.append(processor)
    context.layerToLoadOnCompletionDetails(path).setPostProcessor(processor)


def report_progress(feedback: QgsProcessingFeedback) -> Callable[[int, int], None]:
    """A core ``progress(done, total)`` callback driving the Processing progress bar."""
    def progress(done: int, total: int) -> None:
        feedback.setProgress(100.0 * done / max(total, 1))
    return progress
