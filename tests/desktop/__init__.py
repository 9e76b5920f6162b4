"""Desktop tests: the plugin in the real QGIS binary (a package, so its conftest never shadows tests/conftest.py)."""
