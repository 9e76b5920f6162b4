"""AlphaEarth Height QGIS plugin: surface height from AlphaEarth satellite embeddings."""

__version__ = "0.1.0"


def classFactory(iface):  # noqa: N802 - QGIS entry point name
    """Load the plugin class lazily so QGIS start-up imports nothing heavy."""
    from .plugin.qgis_plugin import AlphaEarthHeightPlugin

    return AlphaEarthHeightPlugin(iface)
