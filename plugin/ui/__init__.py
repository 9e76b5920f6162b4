"""Dock panel and map tools of the QGIS plugin."""
