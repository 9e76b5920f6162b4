"""AlphaEarth Height QGIS plugin: surface height from AlphaEarth satellite embeddings."""

from .plugin.core.package_data import version as _version

__version__ = _version()  # metadata.txt's, the one copy QGIS, pyproject and the code share


def classFactory(iface):  # noqa: N802 - QGIS entry point name
    """Load the plugin class lazily so QGIS start-up imports nothing heavy."""
    from .plugin.qgis_plugin import AlphaEarthHeightPlugin

    return AlphaEarthHeightPlugin(iface)
