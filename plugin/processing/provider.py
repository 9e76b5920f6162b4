"""The AlphaEarth Height Processing provider, registered by the plugin's initProcessing()."""

from __future__ import annotations

from qgis.core import QgsProcessingProvider
from qgis.PyQt.QtGui import QIcon

from ... import __version__
from ..core.package_data import resource
from .compare_heights import CompareHeights
from .correct_bias import CorrectBias
from .fetch_embeddings import FetchEmbeddings
from .predict_height import PredictHeight
from .train_model import TrainModel

ICON = resource("icon.png")
ALGORITHMS = (FetchEmbeddings, PredictHeight, CompareHeights, CorrectBias, TrainModel)


class AlphaEarthHeightProvider(QgsProcessingProvider):
    """Fetch, predict, compare, correct and train: the dock's steps (and bias correction) as Processing algorithms."""

    def id(self) -> str:
        return "alphaearth_height"

    def name(self) -> str:
        return "AlphaEarth Height"

    def longName(self) -> str:  # noqa: N802 - QGIS API
        return f"AlphaEarth Height {__version__}"

    def versionInfo(self) -> str:  # noqa: N802 - QGIS API
        return __version__

    def icon(self) -> QIcon:
        return QIcon(str(ICON))

    def loadAlgorithms(self) -> None:  # noqa: N802 - QGIS API
        for algorithm in ALGORITHMS:
            self.addAlgorithm(algorithm())

    def supportedOutputRasterLayerExtensions(self) -> list[str]:  # noqa: N802 - QGIS API
        # Core writes GeoTIFF only; offering other formats would produce misnamed files.
        return ["tif"]
