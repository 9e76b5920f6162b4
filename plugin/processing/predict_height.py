"""Predict height: run a height model over an embeddings raster, tile by tile."""

from __future__ import annotations

from qgis.core import (QgsProcessingContext, QgsProcessingFeedback, QgsProcessingParameterBoolean,
                       QgsProcessingParameterEnum, QgsProcessingParameterFile,
                       QgsProcessingParameterRasterDestination, QgsProcessingParameterRasterLayer,
                       QgsProcessingParameterString)

from ..core.choices import BACKENDS, DEVICES
from ..core.sizes import DEFAULT_MAX_MPX, MAX_MPX_ENV
from .base import DEVICE_HELP, TERRAIN_HELP, HeightAlgorithm
from .compat import FOLDER


class PredictHeight(HeightAlgorithm):
    ALG_ID = "predictheight"
    DISPLAY_NAME = "Predict height"
    GROUP = "Height"
    CANCELLABLE = True
    HELP = ("Predicts surface height (m) at every pixel of a 64-band AlphaEarth embeddings raster with a "
            "U-Net / U-Net++ model, in overlapping tiles blended without seams; memory does not grow "
            "with the area.\n\n"
            "Model folder: a folder with model.json and model.safetensors (as written by 'Train height "
            "model'); empty uses the bundled demo model, which was trained on a synthetic scene and is "
            "only meant for trying the tools.\n"
            "Coarse terrain: needed only by a model trained with one (its card says so); the height is "
            "the predicted relief plus this terrain, resampled onto the embeddings' grid. " + TERRAIN_HELP + "\n"
            "Tile size: 0 uses the model card's default. Overlap: empty uses the model card's default, "
            "0 means no overlap.\n"
            "Device: " + DEVICE_HELP + "\n"
            "Backend: auto runs ONNX Runtime on the CPU when the model folder has model.onnx, PyTorch on a GPU.\n"
            "The prediction runs in the plugin's own Python environment (a separate process), installed "
            "from the AlphaEarth Height dock.\n\n"
            f"Allow large areas: embeddings above {DEFAULT_MAX_MPX:g} megapixels (100 km x 100 km at 10 m; "
            f"a larger area takes hours) are refused unless this is ticked (${MAX_MPX_ENV} sets another limit).\n"
            "Cancelling stops between tile batches and leaves no output file.\n\n"
            "Dask (advanced): workers > 0 starts a local cluster of that many processes, a scheduler address "
            "uses an existing cluster (paths must be visible to its workers); the area runs in chunks whose "
            "result equals the one-process prediction. Needs Dask in the plugin's environment "
            "(pip install dask distributed). A coarse terrain is added chunk by chunk as in one process; a "
            "Copernicus DEM is fetched once before the chunks start.")

    def initAlgorithm(self, config: dict | None = None) -> None:  # noqa: N802 - QGIS API
        self.add(QgsProcessingParameterRasterLayer("INPUT", self.tr("Embeddings raster (64 bands)")))
        self.add(QgsProcessingParameterFile("MODEL", self.tr("Model folder (empty: bundled model)"),
                                            behavior=FOLDER, optional=True))
        self.add_terrain("Coarse terrain raster (for models trained with one)")
        self.add_int("TILE", "Tile size in pixels (0: model default)", 0, 0, advanced=True)
        self.add_int("OVERLAP", "Tile overlap in pixels (empty: model default)", None, 0, optional=True,
                     advanced=True)
        self.add_int("BATCH_SIZE", "Tiles per batch", 4, 1, advanced=True)
        self.add_device()
        self.add(QgsProcessingParameterEnum("BACKEND", self.tr("Backend"), options=list(BACKENDS),
                                            defaultValue=0), advanced=True)
        self.add(QgsProcessingParameterBoolean("AMP", self.tr("Mixed precision on CUDA GPUs"), defaultValue=True),
                 advanced=True)
        self.add(QgsProcessingParameterBoolean(
            "ALLOW_LARGE", self.tr("Allow large areas (above the size limit, 100 megapixels by default)"),
            defaultValue=False),
            advanced=True)
        self.add_int("DASK_WORKERS", "Dask workers on this machine (0: one process)", 0, 0, advanced=True)
        self.add(QgsProcessingParameterString("DASK_SCHEDULER", self.tr("Dask scheduler (tcp://HOST:PORT)"),
                                              optional=True), advanced=True)
        self.add(QgsProcessingParameterRasterDestination("OUTPUT", self.tr("Predicted height")))

    def execute(self, parameters: dict, context: QgsProcessingContext, feedback: QgsProcessingFeedback) -> dict:
        from ..core.models import bundled_model_dir
        from ..core.sizes import default_max_mpx

        embeddings = self.raster_path(parameters, "INPUT", context)
        out = self.raster_output(parameters, "OUTPUT", context)
        model = self.parameterAsFile(parameters, "MODEL", context) or str(bundled_model_dir())
        terrain = self.terrain_input(parameters, context)
        feedback.pushInfo(f"model: {model}")
        result = self.run_in_worker("predict", {
            "embeddings": embeddings, "model": model, "out": out, "terrain": terrain,
            "tile": self.parameterAsInt(parameters, "TILE", context) or None,
            "overlap": self.optional_int(parameters, "OVERLAP", context),
            "batch_size": self.parameterAsInt(parameters, "BATCH_SIZE", context),
            "device": self.enum_text(parameters, "DEVICE", context, DEVICES),
            "backend": self.enum_text(parameters, "BACKEND", context, BACKENDS),
            "amp": self.parameterAsBoolean(parameters, "AMP", context),
            "max_mpx": None if self.parameterAsBoolean(parameters, "ALLOW_LARGE", context) else default_max_mpx(),
            "workers": self.parameterAsInt(parameters, "DASK_WORKERS", context) or None,
            "scheduler": self.parameterAsString(parameters, "DASK_SCHEDULER", context).strip() or None,
            "too_large_fix": "Tick 'Allow large areas' (advanced parameters) to run it anyway, or clip the "
                             "embeddings to a smaller area first"}, feedback)
        self.style_on_load(context, out, "height")
        feedback.pushInfo(f"{result['width']} x {result['height']} px, {result['tiles']} tiles in "
                          f"{result['seconds']:.1f} s on {result['device']}")
        return {"OUTPUT": out}
