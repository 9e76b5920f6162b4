"""Choosing the area of interest on the map: drawn, canvas extent or a polygon layer.

Whatever the source, the result is a core ``AreaOfInterest`` in the CRS the rectangle
was given in, so core does the reprojection onto the embedding grid exactly once.
"""

from __future__ import annotations

from qgis.core import (QgsCoordinateReferenceSystem, QgsCoordinateTransform, QgsGeometry, QgsProject,
                       QgsRectangle, QgsVectorLayer, QgsWkbTypes)
from qgis.gui import QgsMapCanvas, QgsMapToolExtent, QgsRubberBand
from qgis.PyQt.QtCore import pyqtSignal
from qgis.PyQt.QtGui import QColor

from ..core.aoi import AreaOfInterest
from ..core.errors import InputError


def crs_string(crs: QgsCoordinateReferenceSystem) -> str:
    """``EPSG:xxxx`` when QGIS knows an authority code, else WKT (custom CRSs)."""
    return crs.authid() or crs.toWkt()


def qgs_crs(text: str) -> QgsCoordinateReferenceSystem:
    """The QGIS CRS for an AOI's CRS string (authority code or bare WKT)."""
    crs = QgsCoordinateReferenceSystem(text)
    return crs if crs.isValid() else QgsCoordinateReferenceSystem.fromWkt(text)


def rectangle_aoi(rect: QgsRectangle, crs: QgsCoordinateReferenceSystem) -> AreaOfInterest:
    """A QGIS rectangle as a core AOI (raises InputError when it is empty)."""
    return AreaOfInterest(rect.xMinimum(), rect.yMinimum(), rect.xMaximum(), rect.yMaximum(), crs_string(crs))


def canvas_aoi(canvas: QgsMapCanvas) -> AreaOfInterest:
    """The visible map extent, in the canvas CRS."""
    return rectangle_aoi(canvas.extent(), canvas.mapSettings().destinationCrs())


def layer_aoi(layer: QgsVectorLayer, selected_only: bool = False) -> AreaOfInterest:
    """A polygon layer's extent, or its selected features' extent, in the layer CRS."""
    if layer is None or not layer.isValid():
        raise InputError("area-of-interest layer", "is missing or invalid", "Pick a valid polygon layer")
    if selected_only:
        if layer.selectedFeatureCount() == 0:
            raise InputError(f"layer '{layer.name()}'", "has no selected features",
                             "Select features or untick 'selected features only'")
        return rectangle_aoi(layer.boundingBoxOfSelected(), layer.crs())
    return rectangle_aoi(layer.extent(), layer.crs())


class AoiMapTool(QgsMapToolExtent):
    """Rubber-band rectangle tool; ``aoiDrawn`` fires once per finished, non-empty drag.

    A plain click makes an empty rectangle, which is ignored rather than reported as an
    error, so a stray click does not discard the current AOI.
    """

    aoiDrawn = pyqtSignal(QgsRectangle)

    def __init__(self, canvas: QgsMapCanvas) -> None:
        super().__init__(canvas)
        self.extentChanged.connect(self._on_extent)

    def _on_extent(self, rect: QgsRectangle) -> None:
        self.clearRubberBand()  # the persistent AoiRubberBand shows the result instead
        if rect.width() > 0 and rect.height() > 0:
            self.aoiDrawn.emit(QgsRectangle(rect))


class AoiRubberBand:
    """The current AOI outlined on the canvas, whatever CRS the AOI is in."""

    def __init__(self, canvas: QgsMapCanvas) -> None:
        self.canvas = canvas
        self.band = QgsRubberBand(canvas, QgsWkbTypes.GeometryType.PolygonGeometry)
        self.band.setColor(QColor(255, 120, 0, 220))
        self.band.setFillColor(QColor(255, 120, 0, 40))
        self.band.setWidth(2)

    def show(self, aoi: AreaOfInterest) -> None:
        """Outline ``aoi`` in the canvas CRS (reprojected edges stay curved, hence densify)."""
        geometry = QgsGeometry.fromRect(QgsRectangle(*aoi.bounds)).densifyByCount(20)
        source = qgs_crs(aoi.crs)
        target = self.canvas.mapSettings().destinationCrs()
        if source.isValid() and target.isValid() and source != target:
            geometry.transform(QgsCoordinateTransform(source, target, QgsProject.instance()))
        self.band.setToGeometry(geometry, None)
        self.band.show()

    def reset(self) -> None:
        self.band.reset(QgsWkbTypes.GeometryType.PolygonGeometry)

    def remove(self) -> None:
        """Take the band off the canvas for good (plugin unload)."""
        self.reset()
        self.canvas.scene().removeItem(self.band)
