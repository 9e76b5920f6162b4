"""Result layers: height and difference GeoTIFFs loaded, styled and grouped.

Styling follows the CLI's PNG maps (terrain-like ramp for height, blue-white-red for
differences symmetric about 0), so a map looks the same whichever front end made it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from qgis.core import (QgsColorRamp, QgsMapLayer, QgsProviderRegistry, QgsColorRampShader, QgsGradientColorRamp, QgsGradientStop, QgsProject,
                       QgsRasterBandStats, QgsRasterLayer, QgsRasterShader, QgsSingleBandPseudoColorRenderer,
                       QgsStyle)
from qgis.PyQt.QtGui import QColor

from .core.errors import InputError
from .core.job import HeightJobResult

# matplotlib's "terrain" colour map, as used by core's PNG maps.
TERRAIN_STOPS = ((0.15, "#0099ff"), (0.25, "#00cc66"), (0.5, "#ffff99"), (0.75, "#805c54"))
DIFFERENCE_CUT = (2.0, 98.0)  # percent; a few outliers must not wash out the colours
# Short, distinct layer names; the run's name is on the group holding them.
HEIGHT_LAYER, DIFFERENCE_LAYER = "height", "difference"


def layer_file(layer: Optional[QgsMapLayer], subject: str) -> str:
    """The file behind a raster layer: core reads files with GDAL, not QGIS layers.

    The one way a layer becomes a path (dock and Processing): the GDAL provider's URI
    decoded to its file, which must still exist; other providers (WMS, PostGIS, memory)
    have no file and are refused with the way out.
    """
    if layer is None:
        raise InputError(subject, "is not chosen", f"Pick a raster layer for the {subject}")
    if layer.providerType() != "gdal":
        raise InputError(f"{subject} layer '{layer.name()}'", f"is a '{layer.providerType()}' layer, not a raster "
                         "file", "Save it as a GeoTIFF first (Export > Save As)")
    path = QgsProviderRegistry.instance().decodeUri(layer.providerType(), layer.source()).get("path") or layer.source()
    return existing_file(path, f"{subject} layer '{layer.name()}' ({path})")


def existing_file(path: str, subject: str) -> str:
    """``path`` when it is a file; else the one-line error naming ``subject``."""
    if not path:
        raise InputError(subject, "is not set", "Choose a file")
    if not os.path.isfile(path):
        raise InputError(subject, "does not exist (moved or deleted?)", "Choose an existing file or re-link the layer")
    return path


def _interpolated() -> int:
    """Continuous interpolation (``Qgis.ShaderInterpolationMethod`` only exists from QGIS 3.30)."""
    try:
        from qgis.core import Qgis

        return Qgis.ShaderInterpolationMethod.Linear
    except AttributeError:
        return QgsColorRampShader.Type.Interpolated


def min_max_statistics():
    """The Min | Max statistics flags: ``Qgis.RasterBandStatistic`` from QGIS 3.40, where
    ``QgsRasterBandStats.Stats`` is deprecated; the old enum on earlier versions."""
    try:
        from qgis.core import Qgis

        statistic = Qgis.RasterBandStatistic
    except AttributeError:
        statistic = QgsRasterBandStats.Stats
    return statistic.Min | statistic.Max


def terrain_ramp() -> QgsColorRamp:
    stops = [QgsGradientStop(position, QColor(colour)) for position, colour in TERRAIN_STOPS]
    return QgsGradientColorRamp(QColor("#333399"), QColor("#ffffff"), False, stops)


def diverging_ramp() -> QgsColorRamp:
    """RdBu reversed: blue below zero (prediction too low), red above."""
    ramp = QgsStyle.defaultStyle().colorRamp("RdBu")
    if ramp is None:  # a user may have deleted it from their style
        ramp = QgsGradientColorRamp(QColor("#2166ac"), QColor("#b2182b"), False,
                                    [QgsGradientStop(0.5, QColor("#f7f7f7"))])
    else:
        ramp.invert()
    return ramp


def apply_pseudocolor(layer: QgsRasterLayer, ramp: QgsColorRamp, vmin: float, vmax: float) -> None:
    """Single-band pseudocolour renderer, continuous ramp stretched over [vmin, vmax]."""
    function = QgsColorRampShader(vmin, vmax, ramp)
    function.setColorRampType(_interpolated())
    function.classifyColorRamp(0, -1)
    shader = QgsRasterShader(vmin, vmax)
    shader.setRasterShaderFunction(function)
    renderer = QgsSingleBandPseudoColorRenderer(layer.dataProvider(), 1, shader)
    renderer.setClassificationMin(vmin)
    renderer.setClassificationMax(vmax)
    layer.setRenderer(renderer)


def style_height(layer: QgsRasterLayer) -> None:
    stats = layer.dataProvider().bandStatistics(1, min_max_statistics())
    vmin, vmax = stats.minimumValue, stats.maximumValue
    apply_pseudocolor(layer, terrain_ramp(), vmin, vmax if vmax > vmin else vmin + 1.0)


def difference_bound(layer: QgsRasterLayer) -> float:
    """Half-width of the symmetric range: the larger |value| of the 2 % / 98 % cut."""
    lower, upper = layer.dataProvider().cumulativeCut(1, DIFFERENCE_CUT[0] / 100, DIFFERENCE_CUT[1] / 100)
    return max(abs(lower), abs(upper)) or 1.0


def style_difference(layer: QgsRasterLayer) -> None:
    bound = difference_bound(layer)
    apply_pseudocolor(layer, diverging_ramp(), -bound, bound)


def load_raster(path: Path, name: str) -> QgsRasterLayer:
    layer = QgsRasterLayer(str(path), name, "gdal")
    if not layer.isValid():
        raise InputError(path, "cannot be loaded as a QGIS raster layer", "Check the file and the output folder")
    return layer


def add_result_layers(result: HeightJobResult, group_name: str,
                      project: Optional[QgsProject] = None) -> tuple[QgsRasterLayer, Optional[QgsRasterLayer]]:
    """Add the styled "height" (and "difference") layers in a new group, named ``group_name``
    (the run's name), at the top of the tree.

    Both layers are loaded and styled before anything enters the project, so a failure
    leaves the project unchanged.
    """
    project = project or QgsProject.instance()
    height = load_raster(result.predicted, HEIGHT_LAYER)
    style_height(height)
    difference = None
    if result.difference:
        difference = load_raster(result.difference, DIFFERENCE_LAYER)
        style_difference(difference)
    group = project.layerTreeRoot().insertGroup(0, group_name)
    for layer in (difference, height):  # difference drawn above height
        if layer is not None:
            project.addMapLayer(layer, False)
            group.addLayer(layer)
    return height, difference
