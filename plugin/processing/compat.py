"""Enum members that moved between QGIS 3.22 and 3.36+ (Qt6 builds drop the old names).

QGIS 3.36 moved the Processing enums into ``Qgis``; QGIS 4 builds only keep the new
ones. Resolving each member here once lets the algorithms use one spelling everywhere.
"""

from __future__ import annotations

from qgis.core import (Qgis, QgsProcessing, QgsProcessingAlgorithm, QgsProcessingParameterDefinition,
                       QgsProcessingParameterFile, QgsProcessingParameterNumber)


def _member(new: tuple[object, str, str], old: tuple[object, str, str]) -> object:
    """The fully scoped enum member, new location first."""
    owner, enum, member = new
    scope = getattr(owner, enum, None)
    if scope is None:
        owner, enum, member = old
        scope = getattr(owner, enum)
    return getattr(scope, member)


FOLDER = _member((Qgis, "ProcessingFileParameterBehavior", "Folder"),
                 (QgsProcessingParameterFile, "Behavior", "Folder"))
INTEGER = _member((Qgis, "ProcessingNumberParameterType", "Integer"),
                  (QgsProcessingParameterNumber, "Type", "Integer"))
DOUBLE = _member((Qgis, "ProcessingNumberParameterType", "Double"),
                 (QgsProcessingParameterNumber, "Type", "Double"))
ADVANCED = _member((Qgis, "ProcessingParameterFlag", "Advanced"),
                   (QgsProcessingParameterDefinition, "Flag", "FlagAdvanced"))
CAN_CANCEL = _member((Qgis, "ProcessingAlgorithmFlag", "CanCancel"),
                     (QgsProcessingAlgorithm, "Flag", "FlagCanCancel"))
VECTOR_POINT = _member((Qgis, "ProcessingSourceType", "VectorPoint"),
                       (QgsProcessing, "SourceType", "TypeVectorPoint"))
