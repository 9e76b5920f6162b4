"""Compare with reference DSM: difference raster and accuracy figures."""

from __future__ import annotations

from qgis.core import (QgsProcessingContext, QgsProcessingFeedback, QgsProcessingOutputNumber,
                       QgsProcessingParameterBand, QgsProcessingParameterFileDestination,
                       QgsProcessingParameterRasterDestination, QgsProcessingParameterRasterLayer)

from .base import HeightAlgorithm

# Output name -> key in the core's overall metrics, with the label shown in QGIS.
METRIC_OUTPUTS = {
    "R2": ("r2", "R² (coefficient of determination)"),
    "RMSE": ("rmse", "RMSE (m)"),
    "MAE": ("mae", "Mean absolute difference (m)"),
    "MEAN_DIFF": ("mean_diff", "Mean difference, predicted − reference (m)"),
    "MEDIAN_DIFF": ("median_diff", "Median difference, predicted − reference (m)"),
    "NMAD": ("nmad", "NMAD (m)"),
}


class CompareHeights(HeightAlgorithm):
    ALG_ID = "compareheights"
    DISPLAY_NAME = "Compare with reference DSM"
    GROUP = "Height"
    HELP = ("Resamples a reference DSM (any CRS and resolution) onto the grid of a predicted height "
            "raster (averaging when the reference is finer, as for a 5 m DSM on the 10 m grid), writes "
            "the difference raster (predicted − reference, m) and the accuracy figures as JSON: overall, "
            "and per reference-height bin to show height-dependent bias.\n"
            "Reference band: needed only when the reference has several bands (say which holds heights).\n\n"
            "The overall R², RMSE, MAE, mean and median difference and NMAD are also returned as "
            "numeric outputs for models and scripts.")

    def initAlgorithm(self, config: dict | None = None) -> None:  # noqa: N802 - QGIS API
        self.add(QgsProcessingParameterRasterLayer("PREDICTED", self.tr("Predicted height")))
        self.add(QgsProcessingParameterRasterLayer("REFERENCE", self.tr("Reference DSM")))
        self.add(QgsProcessingParameterBand("REFERENCE_BAND", self.tr("Reference band (for a reference with several)"),
                                            parentLayerParameterName="REFERENCE", optional=True))
        self.add(QgsProcessingParameterRasterDestination("OUTPUT", self.tr("Difference (predicted − reference)")))
        self.add(QgsProcessingParameterFileDestination("METRICS", self.tr("Accuracy metrics"),
                                                       fileFilter=self.tr("JSON files (*.json)")))
        for name, (_, label) in METRIC_OUTPUTS.items():
            self.addOutput(QgsProcessingOutputNumber(name, self.tr(label)))

    def execute(self, parameters: dict, context: QgsProcessingContext, feedback: QgsProcessingFeedback) -> dict:
        from ..core.compare import compare_heights
        from ..core.metrics import format_metrics_table

        predicted = self.raster_path(parameters, "PREDICTED", context)
        reference = self.raster_path(parameters, "REFERENCE", context)
        out = self.raster_output(parameters, "OUTPUT", context)
        metrics_path = self.parameterAsFileOutput(parameters, "METRICS", context)
        band = self.parameterAsInt(parameters, "REFERENCE_BAND", context) or None
        result = compare_heights(predicted, reference, out, metrics_path, reference_band=band)
        self.style_on_load(context, out, "difference")
        overall = result["overall"]
        feedback.pushInfo(f"reference resampled onto the prediction grid with {result['reference_resampling']}")
        feedback.pushInfo(format_metrics_table({"overall": overall}))
        return {"OUTPUT": out, "METRICS": metrics_path,
                **{name: overall[key] for name, (key, _) in METRIC_OUTPUTS.items()}}
