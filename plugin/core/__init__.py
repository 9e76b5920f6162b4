"""Core: rasters, models, inference and metrics. Never imports Qt or QGIS."""
