"""Train height model: fit a U-Net / U-Net++ on embeddings and an aligned reference DSM."""

from __future__ import annotations

from qgis.core import (QgsProcessingContext, QgsProcessingFeedback, QgsProcessingOutputNumber,
                       QgsProcessingParameterBoolean, QgsProcessingParameterEnum,
                       QgsProcessingParameterFolderDestination, QgsProcessingParameterRasterLayer,
                       QgsProcessingParameterString)

from ..core.choices import ARCHITECTURES, DEVICES, DIRECTIONS, LOSSES, SCHEDULES, SPLIT_KINDS
from .base import DEVICE_HELP, TERRAIN_HELP, HeightAlgorithm


class TrainModel(HeightAlgorithm):
    ALG_ID = "trainmodel"
    DISPLAY_NAME = "Train height model"
    GROUP = "Training"
    HELP = ("Trains a U-Net or U-Net++ (segmentation-models-pytorch, no pretrained weights) to map "
            "AlphaEarth embeddings to the heights of a reference DSM, following Hamoudzadeh, Belloni and "
            "Ravanelli (2026): masked MSE loss, AdamW, early stopping on a validation strip.\n\n"
            "The reference may be in any CRS and resolution; it is resampled onto the embeddings' grid. "
            "The scene is split into contiguous strips: the test strip ('test fraction' of the scene, on "
            "the side given by 'held-out side') is never trained on, so the test metrics show how the "
            "model does on ground it has not seen; a test fraction of 0 trains on all but the validation strip "
            "when you test on a separate area (no test metrics then). Advanced: random spatial blocks instead of strips, a "
            "buffer (pixels kept out of training around the test and validation areas), the loss, the "
            "learning-rate schedule, gradient accumulation, height-balanced patch sampling, and a coarse "
            "terrain raster (the model then learns height above it, and predicting with it needs a "
            "terrain raster too: 'Coarse terrain' in Predict height and the dock, --terrain in the CLI). "
            + TERRAIN_HELP + "\n\n"
            "Patch size must be a multiple of 2^encoder depth. Device: " + DEVICE_HELP + "\n\n"
            "The output folder (new or empty) receives model.json + model.safetensors, usable by "
            "'Predict height', with config.json, history.csv and an evaluation report (evaluation/). "
            "Training cannot be cancelled once started.")

    def initAlgorithm(self, config: dict | None = None) -> None:  # noqa: N802 - QGIS API
        self.add(QgsProcessingParameterRasterLayer("EMBEDDINGS", self.tr("Embeddings raster (64 bands)")))
        self.add(QgsProcessingParameterRasterLayer("REFERENCE", self.tr("Reference DSM")))
        self.add(QgsProcessingParameterEnum("ARCH", self.tr("Architecture"), options=list(ARCHITECTURES),
                                            defaultValue=ARCHITECTURES.index("unetplusplus")))
        self.add(QgsProcessingParameterString("ENCODER", self.tr("Encoder"), defaultValue="resnet18"))
        self.add_int("ENCODER_DEPTH", "Encoder depth", 5, 3, 5)
        self.add_int("PATCH_SIZE", "Patch size in pixels", 256, 32)
        self.add_int("BATCH_SIZE", "Batch size", 8, 1)
        self.add_int("EPOCHS", "Epochs (maximum)", 30, 1)
        self.add_int("STEPS_PER_EPOCH", "Steps per epoch", 50, 1)
        self.add_double("TEST_FRACTION", "Test fraction (0: no test area, you test elsewhere)", 0.3, 0.0, 0.9)
        self.add(QgsProcessingParameterEnum("DIRECTION", self.tr("Held-out side (test strip)"),
                                            options=list(DIRECTIONS), defaultValue=0), advanced=True)
        self.add_int("SEED", "Random seed", 0, 0, advanced=True)
        self.add(QgsProcessingParameterEnum("SPLIT", self.tr("Split"), options=list(SPLIT_KINDS), defaultValue=0),
                 advanced=True)
        self.add_int("BLOCK_SIZE", "Block size in pixels (blocks split)", 128, 8, advanced=True)
        self.add_int("BUFFER", "Buffer around test and validation areas (pixels)", 0, 0, advanced=True)
        self.add(QgsProcessingParameterEnum("LOSS", self.tr("Loss"), options=list(LOSSES), defaultValue=0),
                 advanced=True)
        self.add(QgsProcessingParameterEnum("SCHEDULE", self.tr("Learning-rate schedule"), options=list(SCHEDULES),
                                            defaultValue=0), advanced=True)
        self.add_int("ACCUMULATE", "Gradient accumulation (batches per step)", 1, 1, advanced=True)
        self.add(QgsProcessingParameterBoolean("BALANCE", self.tr("Balance height ranges when sampling patches"),
                                               defaultValue=False), advanced=True)
        self.add_terrain("Coarse terrain raster (optional)", advanced=True)
        self.add_device()
        self.add(QgsProcessingParameterFolderDestination("OUTPUT", self.tr("Model folder")))
        self.addOutput(QgsProcessingOutputNumber("TEST_R2", self.tr("Test R² (none with a test fraction of 0)")))
        self.addOutput(QgsProcessingOutputNumber("TEST_RMSE", self.tr("Test RMSE (m) (none with a test fraction of 0)")))
        self.addOutput(QgsProcessingOutputNumber("VALIDATION_R2", self.tr("Validation R² (with a test fraction of 0)")))
        self.addOutput(QgsProcessingOutputNumber("VALIDATION_RMSE",
                                                 self.tr("Validation RMSE (m) (with a test fraction of 0)")))

    def execute(self, parameters: dict, context: QgsProcessingContext, feedback: QgsProcessingFeedback) -> dict:
        out = self.parameterAsFileOutput(parameters, "OUTPUT", context)
        result = self.run_in_worker("train", self._config(parameters, context, out), feedback)
        outputs = {"OUTPUT": result["model_dir"]}
        for area in ("test", "validation"):  # the card's: validation figures only where there is no test area
            if area in result["metrics"]:
                metrics = result["metrics"][area]
                outputs.update({f"{area.upper()}_R2": metrics["r2"], f"{area.upper()}_RMSE": metrics["rmse"]})
        return outputs

    def _config(self, parameters: dict, context: QgsProcessingContext, out: str) -> dict:
        """TrainConfig's fields (the split as SplitSpec's), sent to the worker (training imports torch, which QGIS never does)."""
        def number(name: str) -> int:
            return self.parameterAsInt(parameters, name, context)

        return dict(
            embeddings=self.raster_path(parameters, "EMBEDDINGS", context),
            reference=self.raster_path(parameters, "REFERENCE", context), out=out,
            arch=self.enum_text(parameters, "ARCH", context, ARCHITECTURES),
            encoder=self.parameterAsString(parameters, "ENCODER", context).strip() or "resnet18",
            encoder_depth=number("ENCODER_DEPTH"), patch_size=number("PATCH_SIZE"),
            batch_size=number("BATCH_SIZE"), epochs=number("EPOCHS"), steps_per_epoch=number("STEPS_PER_EPOCH"),
            split=dict(kind=self.enum_text(parameters, "SPLIT", context, SPLIT_KINDS),
                       test_fraction=self.parameterAsDouble(parameters, "TEST_FRACTION", context),
                       direction=self.enum_text(parameters, "DIRECTION", context, DIRECTIONS),
                       block_size=number("BLOCK_SIZE"), buffer=number("BUFFER"), seed=number("SEED")),
            seed=number("SEED"), loss=self.enum_text(parameters, "LOSS", context, LOSSES),
            schedule=self.enum_text(parameters, "SCHEDULE", context, SCHEDULES), accumulate=number("ACCUMULATE"),
            balance=self.parameterAsBoolean(parameters, "BALANCE", context),
            terrain=self.terrain_input(parameters, context),
            device=self.enum_text(parameters, "DEVICE", context, DEVICES))
