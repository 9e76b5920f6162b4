"""Fetch embeddings: the part of an embeddings source under an extent, as a small GeoTIFF."""

from __future__ import annotations

from qgis.core import (QgsCoordinateReferenceSystem, QgsProcessingContext, QgsProcessingFeedback,
                       QgsProcessingParameterEnum, QgsProcessingParameterExtent,
                       QgsProcessingParameterRasterDestination, QgsProcessingParameterRasterLayer)

from .base import HeightAlgorithm

# Earth Engine and the public cloud-optimised GeoTIFFs join this list in a later release;
# the parameter already exists so scripts and models written now keep working then.
SOURCES = ("Local raster",)


class FetchEmbeddings(HeightAlgorithm):
    ALG_ID = "fetchembeddings"
    DISPLAY_NAME = "Fetch embeddings (local raster)"
    GROUP = "Embeddings"
    HELP = ("Copies the part of a 64-band AlphaEarth embeddings raster (AEF int8 tiles or float "
            "exports) under an extent to a north-up GeoTIFF, snapped outwards to whole pixels of the "
            "source grid. The extent may be in any CRS; the output keeps the embeddings' CRS, grid and "
            "data type (int8 stays int8, no resampling). The area, pixel count and download size are "
            "reported before copying.\n\n"
            "Source: only 'Local raster' for now; Earth Engine and the public AlphaEarth "
            "cloud-optimised GeoTIFFs will be added as further choices.\n\n"
            "Data: AlphaEarth Foundations Satellite Embedding dataset, produced by Google and "
            "Google DeepMind, CC-BY 4.0.")

    def initAlgorithm(self, config: dict | None = None) -> None:  # noqa: N802 - QGIS API
        self.add(QgsProcessingParameterEnum("SOURCE", self.tr("Embedding source"), options=list(SOURCES),
                                            defaultValue=0))
        self.add(QgsProcessingParameterRasterLayer("INPUT", self.tr("Embeddings raster (64 bands)")))
        self.add(QgsProcessingParameterExtent("EXTENT", self.tr("Area of interest")))
        self.add(QgsProcessingParameterRasterDestination("OUTPUT", self.tr("Embeddings (clipped)")))

    def execute(self, parameters: dict, context: QgsProcessingContext, feedback: QgsProcessingFeedback) -> dict:
        from ..core.aoi import clip_embeddings, size_estimate

        source = self.raster_path(parameters, "INPUT", context)
        out = self.raster_output(parameters, "OUTPUT", context)
        aoi = self._aoi(parameters, context)
        feedback.pushInfo(describe_size(size_estimate(aoi)))
        grid = clip_embeddings(source, aoi, out)
        feedback.pushInfo(f"wrote {grid.width} x {grid.height} px in {grid.crs.to_string()} to {out}")
        return {"OUTPUT": out}

    def _aoi(self, parameters: dict, context: QgsProcessingContext):
        """The extent as a core AreaOfInterest; an extent given without CRS is in the layer's."""
        from ..core.aoi import AreaOfInterest

        rect = self.parameterAsExtent(parameters, "EXTENT", context)
        crs = self.parameterAsExtentCrs(parameters, "EXTENT", context)
        if not crs.isValid():
            crs = self.parameterAsRasterLayer(parameters, "INPUT", context).crs()
        return AreaOfInterest(rect.xMinimum(), rect.yMinimum(), rect.xMaximum(), rect.yMaximum(), crs_text(crs))


def crs_text(crs: QgsCoordinateReferenceSystem) -> str:
    """A CRS rasterio understands: the authority id, or WKT for custom CRSs."""
    return crs.authid() or crs.toWkt()


def describe_size(estimate: dict) -> str:
    return (f"area {estimate['area_km2']:.2f} km², {estimate['width']} x {estimate['height']} px at 10 m "
            f"({estimate['pixels']:,} px) in {estimate['crs']}: about {estimate['bytes_int8'] / 1e6:.1f} MB "
            f"as AEF int8, {estimate['bytes_float32'] / 1e6:.1f} MB as float32")
