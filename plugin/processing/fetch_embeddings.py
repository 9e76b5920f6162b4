"""Fetch embeddings: an area's AlphaEarth embeddings from a local raster, the public COGs or
Earth Engine, as one small AEF int8 GeoTIFF (core.fetch, the same code as the CLI and the dock)."""

from __future__ import annotations

from qgis.core import (QgsCoordinateReferenceSystem, QgsProcessingContext, QgsProcessingException,
                       QgsProcessingFeedback, QgsProcessingParameterEnum, QgsProcessingParameterExtent,
                       QgsProcessingParameterFile, QgsProcessingParameterRasterDestination,
                       QgsProcessingParameterRasterLayer, QgsProcessingParameterString)

from ..core.choices import DEFAULT_YEAR, FIRST_YEAR, SOURCE_LABELS, SOURCES, last_year
from .base import HeightAlgorithm, report_progress
from .compat import DOUBLE, FOLDER



class FetchEmbeddings(HeightAlgorithm):
    ALG_ID = "fetchembeddings"
    DISPLAY_NAME = "Fetch embeddings"
    GROUP = "Embeddings"
    CANCELLABLE = True
    HELP = ("Writes the AlphaEarth embeddings under an extent, for one year, to an AEF int8 GeoTIFF "
            "(64 bands A00..A63, nodata -128). The size, tiles and download are reported before "
            "anything is fetched.\n\n"
            "Sources:\n"
            "- Local raster: the part of a 64-band embeddings raster under the extent, on the raster's "
            "own grid and CRS (snapped outwards to whole pixels, no resampling).\n"
            "- AlphaEarth public COGs: the public cloud-optimised GeoTIFFs (Source Cooperative mirror), "
            "no account needed; only the blocks under the extent are downloaded.\n"
            "- Google Earth Engine: needs an Earth Engine account (run earthengine authenticate once) "
            "and a Google Cloud project (here, or $EARTHENGINE_PROJECT).\n"
            "Remote sources write the extent's UTM zone at 10 m; areas across zones are combined with "
            "nearest-neighbour resampling. Downloaded tiles are cached (advanced: cache folder), so a "
            "repeated or cancelled fetch does not download them again.\n\n"
            "The extent may be in any CRS. Cancelling leaves no output file.\n\n"
            "Size limit (advanced): a fetch that would download or write more than this many GB is "
            "refused, with its size, before anything is fetched; empty means $ALPHAEARTH_HEIGHT_MAX_GB or "
            "5 GB, 0 means no limit. Network waits have deadlines ($ALPHAEARTH_HEIGHT_STALL_TIMEOUT, "
            "30 s without data; $ALPHAEARTH_HEIGHT_TILE_DEADLINE, 300 s per tile; "
            "$ALPHAEARTH_HEIGHT_INDEX_DEADLINE, 1800 s for the COG tile index).\n\n"
            "Data: AlphaEarth Foundations Satellite Embedding dataset, produced by Google and "
            "Google DeepMind, CC-BY 4.0.")

    def initAlgorithm(self, config: dict | None = None) -> None:  # noqa: N802 - QGIS API
        self.add(QgsProcessingParameterEnum("SOURCE", self.tr("Embedding source"),
                                            options=[SOURCE_LABELS[key] for key in SOURCES], defaultValue=0))
        self.add(QgsProcessingParameterRasterLayer(
            "INPUT", self.tr("Embeddings raster (64 bands; Local raster only)"), optional=True))
        self.add(QgsProcessingParameterExtent("EXTENT", self.tr("Area of interest")))
        self.add_int("YEAR", "Year", DEFAULT_YEAR, FIRST_YEAR, last_year())
        self.add(QgsProcessingParameterString("PROJECT", self.tr("Google Cloud project (Earth Engine only)"),
                                              optional=True))
        self.add(QgsProcessingParameterString("BASE_URL", self.tr("COG base URL (empty: public mirror)"),
                                              optional=True), advanced=True)
        self.add(QgsProcessingParameterFile("CACHE_DIR", self.tr("Tile cache folder (empty: default)"),
                                            behavior=FOLDER, optional=True), advanced=True)
        self._add_number("MAX_GB", "Size limit in GB downloaded or written (empty: 5 or $ALPHAEARTH_HEIGHT_MAX_GB; "
                         "0: no limit)", DOUBLE, None, 0.0, None, True, True)
        self.add(QgsProcessingParameterRasterDestination("OUTPUT", self.tr("Embeddings")))

    def execute(self, parameters: dict, context: QgsProcessingContext, feedback: QgsProcessingFeedback) -> dict:
        from ..core.fetch import estimate, fetch, format_estimate, size_limit_gb, source_options
        from ..core.cancel import Cancelled

        source = SOURCES[self.parameterAsEnum(parameters, "SOURCE", context)]
        options = source_options(source, raster=self.raster_path(parameters, "INPUT", context)
                                 if self.parameterAsRasterLayer(parameters, "INPUT", context) else None,
                                 project=self.parameterAsString(parameters, "PROJECT", context),
                                 base_url=self.parameterAsString(parameters, "BASE_URL", context))
        out = self.raster_output(parameters, "OUTPUT", context)
        aoi = self._aoi(parameters, context)
        year = self.parameterAsInt(parameters, "YEAR", context)
        cache_dir = self.parameterAsFile(parameters, "CACHE_DIR", context) or None
        limit = None
        if parameters.get("MAX_GB") in (None, ""):
            limit = size_limit_gb(None)
        elif self.parameterAsDouble(parameters, "MAX_GB", context) > 0:
            limit = size_limit_gb(self.parameterAsDouble(parameters, "MAX_GB", context))
        try:
            info = estimate(aoi, year, source, cache_dir=cache_dir, limit_gb=limit, status=feedback.pushInfo,
                            cancel=feedback.isCanceled,
                            allow="Raise the size limit (advanced parameter MAX_GB; 0: no limit) to go ahead",
                            **options)
            feedback.pushInfo(format_estimate(info))
            result = fetch(aoi, year, source, out, cache_dir=cache_dir, progress=report_progress(feedback),
                           cancel=feedback.isCanceled, status=feedback.pushInfo, **options)
        except Cancelled:
            raise QgsProcessingException(self.tr("Fetch cancelled; no output was written "
                                                 "(tiles already downloaded stay cached).")) from None
        damaged = f" ({result.damaged} damaged cached tile(s) fetched again)" if result.damaged else ""
        feedback.pushInfo(f"wrote {result.grid.width} x {result.grid.height} px in {result.grid.crs.to_string()} "
                          f"to {out}: {result.fetched} tiles fetched, {result.from_cache} from cache{damaged}, "
                          f"{result.valid_fraction:.0%} with data, {result.seconds:.1f} s")
        return {"OUTPUT": out}

    def _aoi(self, parameters: dict, context: QgsProcessingContext):
        """The extent as a core AreaOfInterest; an extent given without CRS is in the layer's."""
        from ..core.aoi import AreaOfInterest

        rect = self.parameterAsExtent(parameters, "EXTENT", context)
        crs = self.parameterAsExtentCrs(parameters, "EXTENT", context)
        if not crs.isValid():
            crs = self._layer_crs(parameters, context)
        return AreaOfInterest(rect.xMinimum(), rect.yMinimum(), rect.xMaximum(), rect.yMaximum(), crs_text(crs))

    def _layer_crs(self, parameters: dict, context: QgsProcessingContext) -> QgsCoordinateReferenceSystem:
        layer = self.parameterAsRasterLayer(parameters, "INPUT", context)
        if layer is None:
            raise QgsProcessingException(self.tr("The area of interest has no CRS: give it as "
                                                 "'xmin,xmax,ymin,ymax [EPSG:code]'"))
        return layer.crs()


def crs_text(crs: QgsCoordinateReferenceSystem) -> str:
    """A CRS rasterio understands: the authority id, or WKT for custom CRSs."""
    return crs.authid() or crs.toWkt()
