"""Processing provider: the dock's steps as algorithms for the toolbox, models and qgis_process."""
