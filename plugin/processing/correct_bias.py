"""Correct bias: remove a prediction's regional shift with a few reference heights."""

from __future__ import annotations

from typing import Optional

from qgis.core import (QgsFeatureRequest, QgsProcessingContext, QgsProcessingException,
                       QgsProcessingFeedback, QgsProcessingOutputString, QgsProcessingParameterEnum,
                       QgsProcessingParameterFeatureSource, QgsProcessingParameterField,
                       QgsProcessingParameterRasterDestination, QgsProcessingParameterRasterLayer,
                       QgsProcessingParameterString)

from ..core.choices import BIAS_METHODS
from ..core.errors import InputError
from .base import HeightAlgorithm
from .compat import VECTOR_POINT


class CorrectBias(HeightAlgorithm):
    ALG_ID = "correctbias"
    DISPLAY_NAME = "Correct bias"
    GROUP = "Height"
    HELP = ("Removes the regional shift of a predicted height raster (a model applied away from its "
            "training area is often biased) using a few reference heights on the area: a point layer "
            "with a height field (in any CRS), or a reference DSM, sampled only within the pixel window "
            "'col row width height' when one is given. An offset, a linear map or a quantile mapping is "
            "fitted; 'auto' picks the one with the lowest cross-validated RMSE on the samples (the offset "
            "unless another is clearly better). The corrected raster records the correction in its tags.\n"
            "Give either the points or the reference DSM, not both.")

    def initAlgorithm(self, config: dict | None = None) -> None:  # noqa: N802 - QGIS API
        self.add(QgsProcessingParameterRasterLayer("PREDICTED", self.tr("Predicted height")))
        self.add(QgsProcessingParameterFeatureSource("POINTS", self.tr("Reference points"),
                                                     [VECTOR_POINT], optional=True))
        self.add(QgsProcessingParameterField("HEIGHT_FIELD", self.tr("Height field of the points (m)"),
                                             parentLayerParameterName="POINTS", optional=True))
        self.add(QgsProcessingParameterRasterLayer("REFERENCE", self.tr("Reference DSM"), optional=True))
        self.add(QgsProcessingParameterString("WINDOW", self.tr("Window of the reference to use "
                                                                "(col row width height, pixels)"), optional=True))
        self.add(QgsProcessingParameterEnum("METHOD", self.tr("Method"), options=list(BIAS_METHODS), defaultValue=0))
        self.add(QgsProcessingParameterRasterDestination("OUTPUT", self.tr("Corrected height")))
        self.addOutput(QgsProcessingOutputString("METHOD_USED", self.tr("Correction applied")))

    def execute(self, parameters: dict, context: QgsProcessingContext, feedback: QgsProcessingFeedback) -> dict:
        from ..core.bias import correct_bias

        predicted = self.raster_path(parameters, "PREDICTED", context)
        reference = self.raster_path(parameters, "REFERENCE", context) if parameters.get("REFERENCE") else None
        points = self._points(parameters, context)
        if (points is None) == (reference is None):
            raise InputError("Correct bias", "needs exactly one source of reference heights",
                             "Give the reference points or the reference DSM")
        out = self.raster_output(parameters, "OUTPUT", context)
        result = correct_bias(predicted, out, points=points, reference=reference,
                              window=self._window(parameters, context),
                              method=self.enum_text(parameters, "METHOD", context, BIAS_METHODS))
        self.style_on_load(context, out, "height")
        feedback.pushInfo(result.summary())
        return {"OUTPUT": out, "METHOD_USED": result.correction.method}

    def _points(self, parameters: dict, context: QgsProcessingContext):
        """The point layer's x, y (its own CRS) and heights, or None when no layer is given."""
        import numpy as np

        from ..core.bias import PointHeights

        source = self.parameterAsSource(parameters, "POINTS", context)
        if source is None:
            return None
        field = self.parameterAsString(parameters, "HEIGHT_FIELD", context)
        if not field:
            raise InputError("Height field", "is empty but the points need one", "Choose the field holding heights")
        xs, ys, heights = [], [], []
        for feature in source.getFeatures(QgsFeatureRequest().setSubsetOfAttributes([field], source.fields())):
            value = feature[field]
            if feature.hasGeometry() and isinstance(value, (int, float)):
                point = feature.geometry().asPoint()
                xs.append(point.x())
                ys.append(point.y())
                heights.append(float(value))
        if not heights:
            raise InputError(source.sourceName(), f"has no point with a numeric '{field}'",
                             "Give a point layer with heights in that field")
        return PointHeights(np.array(xs), np.array(ys), np.array(heights), source.sourceCrs().toWkt(),
                            source.sourceName(), f"the layer's CRS ({source.sourceCrs().authid()})",
                            "Give points inside the predicted area")

    def _window(self, parameters: dict, context: QgsProcessingContext) -> Optional[list[int]]:
        text = self.parameterAsString(parameters, "WINDOW", context).replace(",", " ").split()
        if not text:
            return None
        try:
            window = [int(v) for v in text]
        except ValueError:
            window = []
        if len(window) != 4:
            raise QgsProcessingException(f"Window '{' '.join(text)}': needs 4 whole numbers. "
                                         "Give col row width height in pixels of the prediction, e.g. 100 50 40 40")
        return window
