"""The QGIS plugin object: toolbar/menu action, dock, Processing provider, log handler.

Nothing here (nor anywhere in the QGIS process) imports torch: runs happen in a worker
process (core.worker) using the Python environment the plugin manages
(plugin.environment). The dock is built on first use, so enabling the plugin costs
QGIS start-up next to nothing and works before that environment exists.
"""

from __future__ import annotations

import logging
from typing import Optional

from qgis.core import Qgis, QgsApplication
from qgis.PyQt.QtCore import Qt
from qgis.PyQt.QtGui import QIcon

try:
    from qgis.PyQt.QtGui import QAction  # Qt 6 (QGIS 4)
except ImportError:
    from qgis.PyQt.QtWidgets import QAction  # Qt 5

from .core.package_data import resource
from .log import install_log_handler, uninstall_log_handler
from .tasks import BackgroundWork

log = logging.getLogger(__name__)

TITLE = "AlphaEarth Height"
MENU = "&AlphaEarth Height"
ICON = resource("icon.png")
# The dock previews areas and checks inputs with these, from QGIS's own Python (never pip's).
DOCK_IMPORTS = {"numpy": "python3-numpy", "rasterio": "python3-rasterio"}
PROVIDER_MODULES = (f"{__package__}.processing", f"{__package__}.processing.provider")


class AlphaEarthHeightPlugin:
    """Entry object QGIS creates through ``classFactory``."""

    def __init__(self, iface) -> None:
        self.iface = iface
        self.action: Optional[QAction] = None
        self.dock = None
        self.provider = None
        self.work = BackgroundWork()  # the tasks (runs, environment set-up, GPU probe): ours, not the dock's

    def initGui(self) -> None:  # noqa: N802 - QGIS API name
        install_log_handler()
        icon = QIcon(str(ICON)) if ICON.is_file() else QgsApplication.getThemeIcon("/mIconRaster.svg")
        self.action = QAction(icon, TITLE, self.iface.mainWindow())
        self.action.setObjectName("AlphaEarthHeightAction")
        self.action.setCheckable(True)
        self.action.setToolTip("Map surface height from AlphaEarth embeddings")
        self.action.toggled.connect(self.show_dock)
        self.iface.addToolBarIcon(self.action)
        self.iface.addPluginToMenu(MENU, self.action)
        self.initProcessing()

    def initProcessing(self) -> None:  # noqa: N802 - QGIS API name
        """Register the Processing provider once it is part of the plugin."""
        try:
            from .processing.provider import AlphaEarthHeightProvider
        except ImportError as exc:
            absent = isinstance(exc, ModuleNotFoundError) and exc.name in PROVIDER_MODULES
            if not absent:  # present but broken: say why in the log panel
                log.warning("Processing provider unavailable: %s", exc, exc_info=True)
            return
        provider = AlphaEarthHeightProvider()
        # Refused (and deleted by QGIS) when a provider with this id is already registered.
        if QgsApplication.processingRegistry().addProvider(provider):
            self.provider = provider

    def show_dock(self, visible: bool = True) -> None:
        """Show or hide the dock, building it the first time it is shown."""
        if self.dock is None:
            if not visible:
                return
            if not self._create_dock():
                self.action.setChecked(False)
                return
        self.dock.setVisible(visible)
        if visible:
            self.dock.raise_()

    def _create_dock(self) -> bool:
        import importlib.util

        missing = [name for name in DOCK_IMPORTS if importlib.util.find_spec(name) is None]
        if missing:
            packages = " ".join(DOCK_IMPORTS[name] for name in missing)
            text = (f"The dock needs {', '.join(missing)} in QGIS's own Python. Install it with your QGIS: "
                    f"Debian/Ubuntu 'apt install {packages}', OSGeo4W '{packages}'")
            self.iface.messageBar().pushMessage(TITLE, text, Qgis.MessageLevel.Critical, 0)
            log.error("%s", text)
            return False
        from .ui.dock import HeightDock

        self.dock = HeightDock(self.iface, self.iface.mainWindow(), work=self.work)
        self.dock.visibilityChanged.connect(self._sync_action)
        self.iface.addDockWidget(Qt.DockWidgetArea.RightDockWidgetArea, self.dock)
        return True

    def _sync_action(self, visible: bool) -> None:
        if self.action is not None and self.action.isChecked() != visible:
            self.action.blockSignals(True)
            self.action.setChecked(visible)
            self.action.blockSignals(False)

    def unload(self) -> None:
        """Undo everything initGui and the dock added, so a reload starts clean."""
        self.work.cancel_all()
        if self.dock is not None:
            self.dock.shutdown()
            self.iface.removeDockWidget(self.dock)
            self.dock.deleteLater()
            self.dock = None
        if self.action is not None:
            self.iface.removePluginMenu(MENU, self.action)
            self.iface.removeToolBarIcon(self.action)
            self.action.deleteLater()
            self.action = None
        if self.provider is not None:
            QgsApplication.processingRegistry().removeProvider(self.provider)
            self.provider = None
        uninstall_log_handler()
