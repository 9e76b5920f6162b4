"""Start-up script for the real QGIS desktop (``qgis --code qgis_startup.py``).

Drives the AlphaEarth Height dock through its widgets as a user would: install the
plugin's worker environment, load the demo scene, take the canvas extent as the area
of interest, run, and check the styled result layers. Every step is a QTimer callback
or a signal handler, so the Qt event loop (and the QgsTasks the plugin starts) keeps
running. The outcome goes to a JSON file; the pytest side (tests/desktop) asserts on it.

QGIS runs this with ``exec`` in its own ``__main__``: no ``__file__``, and everything
this script needs comes from the JSON file named by ``$AEH_DESKTOP_CONFIG``:

  result, messages, screenshot, quit_file: paths this script writes / waits for
  embeddings, reference, output_folder: the demo scene's rasters, the run's output
  deadline_s, env_timeout_s, run_timeout_s, quit_wait_s: time limits (seconds)
  legacy_install: click the old ``install_button`` when there is no ``env_install_button``
"""

import json
import os
import sys
import time
import traceback


class DesktopDriver:
    """A small state machine: each step does its work, then schedules the next one."""

    def __init__(self, config_path):
        from qgis.PyQt.QtCore import QTimer

        with open(config_path, encoding="utf-8") as fh:
            self.cfg = json.load(fh)
        self.t0 = time.monotonic()
        self.result = {"phase": "started", "ok": False, "steps": [], "errors": [], "python_errors": []}
        self.plugin = None
        self.iface = None
        self.dock = None
        self.layers = {}
        self.finished = False
        self.pending = None  # (name, timer) of the signal being waited for
        self.messages = open(self.cfg["messages"], "a", encoding="utf-8")
        self._hook_logs()
        self.deadline = QTimer()
        self.deadline.setSingleShot(True)
        self.deadline.timeout.connect(self._deadline_passed)
        self.deadline.start(int(self.cfg["deadline_s"] * 1000))
        self.later(500, self.wait_for_plugin)

    # ---- plumbing --------------------------------------------------------------------

    def elapsed(self):
        return round(time.monotonic() - self.t0, 2)

    def later(self, ms, step):
        from qgis.PyQt.QtCore import QTimer

        QTimer.singleShot(ms, lambda: self.guarded(step))

    def guarded(self, step, *args):
        """Run one step; any exception ends the session with its traceback in the JSON."""
        if self.finished:
            return
        try:
            step(*args)
        except Exception as exc:  # noqa: BLE001 - reported, then the session ends
            self.fail(f"{step.__name__}: {type(exc).__name__}: {exc}", traceback.format_exc())

    def record(self, name, ok=True, **detail):
        entry = {"step": name, "t": self.elapsed(), "ok": ok}
        entry.update(detail)
        self.result["steps"].append(entry)
        self.log(f"step {name} ok={ok} {json.dumps(detail, default=str)}")
        self.write()

    def log(self, text):
        self.messages.write(f"[{self.elapsed():8.2f}] {text}\n")
        self.messages.flush()

    def write(self):
        tmp = self.cfg["result"] + ".tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(self.result, fh, indent=2, default=str)
        os.replace(tmp, self.cfg["result"])

    def _hook_logs(self):
        """Everything QGIS logs (the plugin logs under its own tag) and every Python error."""
        from qgis.core import QgsApplication

        def on_message(message, tag, level):
            self.log(f"log [{tag}] level={int(level)}: {message}")

        self._on_message = on_message  # keep a reference: the connection holds a weak one
        QgsApplication.messageLog().messageReceived.connect(self._on_message)
        previous = sys.excepthook

        def excepthook(kind, value, tb):
            text = "".join(traceback.format_exception(kind, value, tb))
            self.result["python_errors"].append(text)
            self.log("python error:\n" + text)
            self.write()
            previous(kind, value, tb)

        sys.excepthook = excepthook

    def wait_signal(self, name, signal, timeout_s, on_emit, on_timeout=None):
        """Call ``on_emit(*args)`` when ``signal`` fires, or fail (or ``on_timeout``) after timeout_s."""
        from qgis.PyQt.QtCore import QTimer

        timer = QTimer()
        timer.setSingleShot(True)

        def fired(*args):
            if self.pending is None or self.pending[0] != name:
                return
            timer.stop()
            self.pending = None
            try:
                signal.disconnect(fired)
            except (TypeError, RuntimeError):
                pass
            self.guarded(on_emit, *args)

        def expired():
            if self.pending is None or self.pending[0] != name:
                return
            self.pending = None
            try:
                signal.disconnect(fired)
            except (TypeError, RuntimeError):
                pass
            if on_timeout is not None:
                self.guarded(on_timeout)
            else:
                self.fail(f"{name}: no signal within {timeout_s:.0f} s")

        self.pending = (name, timer, fired)
        signal.connect(fired)
        timer.timeout.connect(expired)
        timer.start(int(timeout_s * 1000))

    def _deadline_passed(self):
        self.fail(f"overall deadline of {self.cfg['deadline_s']} s passed "
                  f"(waiting for: {self.pending[0] if self.pending else 'nothing'})")

    def fail(self, message, tb=""):
        if self.finished:
            return
        self.result["errors"].append(message + ("\n" + tb if tb else ""))
        self.log("FAILED: " + message + ("\n" + tb if tb else ""))
        self.result["ok"] = False
        self.finish("failed")

    # ---- the steps -------------------------------------------------------------------

    def wait_for_plugin(self):
        import qgis.utils
        from qgis.core import Qgis, QgsApplication

        iface = qgis.utils.iface
        plugin = qgis.utils.plugins.get("alphaearth_height")
        if iface is None or iface.mainWindow() is None or not iface.mainWindow().isVisible() or plugin is None:
            if self.elapsed() > 60:
                self.fail("main window or plugin not there after 60 s; plugins: "
                          + ", ".join(sorted(qgis.utils.plugins)))
            else:
                self.later(500, self.wait_for_plugin)
            return
        self.plugin = plugin
        self.iface = iface
        import alphaearth_height

        self.result.update(qgis_version=Qgis.QGIS_VERSION, python=sys.version.split()[0],
                           python_executable=sys.executable,
                           settings_dir=QgsApplication.qgisSettingsDirPath(),
                           plugin_file=alphaearth_height.__file__,
                           active_plugins=sorted(qgis.utils.active_plugins),
                           modules_at_start={m: m in sys.modules for m in ("torch", "onnxruntime", "rasterio")})
        window = iface.mainWindow()
        window.setGeometry(0, 0, int(self.cfg.get("width", 1600)), int(self.cfg.get("height", 1000)))
        self.record("plugin_loaded", plugin_file=alphaearth_height.__file__)
        self.later(200, self.show_dock)

    def show_dock(self):
        from qgis.PyQt.QtCore import Qt

        self.plugin.show_dock(True)
        self.dock = self.plugin.dock
        if self.dock is None:
            self.fail("plugin.show_dock(True) left plugin.dock None (see the message bar / log)")
            return
        self.iface.mainWindow().resizeDocks([self.dock], [430], Qt.Orientation.Horizontal)
        widgets = [name for name in ("env_install_button", "env_remove_button", "env_label", "install_button",
                                     "source_combo", "embeddings_file", "canvas_button", "bundled_radio",
                                     "reference_combo", "output_folder", "run_button", "cancel_button", "progress")
                   if getattr(self.dock, name, None) is not None]
        self.result["dock_widgets"] = widgets
        self.progress_seen = []
        self.dock.progress.valueChanged.connect(self._on_progress)
        self.record("dock_shown", visible=self.dock.isVisible(), type=type(self.dock).__name__, widgets=widgets)
        self.later(300, self.install_environment)

    def _on_progress(self, value):
        self.progress_seen.append(int(value))

    def env_dir(self):
        from qgis.core import QgsApplication

        return os.path.join(QgsApplication.qgisSettingsDirPath(), "alphaearth_height", "env")

    def install_environment(self):
        dock = self.dock
        button = getattr(dock, "env_install_button", None)
        signal = getattr(dock, "environmentChanged", None)
        env = {"widget": None, "dir": self.env_dir(), "ready": False}
        self.result["env"] = env
        if button is None:
            legacy = getattr(dock, "install_button", None)
            if legacy is not None and self.cfg.get("legacy_install") and legacy.isVisible():
                env["widget"] = "install_button"
                legacy.click()
                self.record("env_install_clicked", widget="install_button (legacy, in-process packages)")
                self.env_started = time.monotonic()
                self.later(1000, self._poll_legacy_install)
                return
            self.record("env_install_clicked", ok=False,
                        detail="the dock has no env_install_button (plugin without the worker environment)")
            self.later(100, self.load_layers)
            return
        env["widget"] = "env_install_button"
        env["button_enabled"] = button.isEnabled()
        env["button_visible"] = button.isVisible()
        label = getattr(dock, "env_label", None)
        env["label_before"] = label.text() if label is not None else None
        if signal is None:
            self.fail("the dock has env_install_button but no environmentChanged signal")
            return
        if not button.isVisible():
            self.record("env_install_clicked", ok=False, detail="env_install_button hidden (already installed?)")
            self.later(100, self.environment_done_without_click)
            return
        self.env_button_wait = time.monotonic()
        self.later(0, self.click_env_install)

    def click_env_install(self):
        """Click Install once the dock lets us (it is disabled while it checks what to download)."""
        dock = self.dock
        button = dock.env_install_button
        env = self.result["env"]
        waited = time.monotonic() - self.env_button_wait
        if not button.isEnabled():
            if waited > self.cfg["env_timeout_s"]:
                self.fail(f"env_install_button still disabled after {waited:.0f} s")
            else:
                self.later(250, self.click_env_install)
            return
        env["button_wait_s"] = round(waited, 1)
        label = getattr(dock, "env_label", None)
        env["label_before_click"] = label.text() if label is not None else None
        self.env_started = time.monotonic()
        self.wait_signal("environmentChanged", dock.environmentChanged, self.cfg["env_timeout_s"],
                         self.environment_changed)
        button.click()
        self.record("env_install_clicked", widget="env_install_button", waited_s=env["button_wait_s"])

    def environment_done_without_click(self):
        self.environment_changed(os.path.isdir(self.env_dir()), clicked=False)

    def _poll_legacy_install(self):
        if getattr(self.dock, "install_task", None) is None:
            self.environment_changed(True)
        elif time.monotonic() - self.env_started > self.cfg["env_timeout_s"]:
            self.fail("legacy install did not finish in time")
        else:
            self.later(1000, self._poll_legacy_install)

    def environment_changed(self, ready, clicked=True):
        env = self.result["env"]
        env["ready"] = bool(ready)
        if clicked:
            env["seconds"] = round(time.monotonic() - self.env_started, 1)
        label = getattr(self.dock, "env_label", None)
        env["label_after"] = label.text() if label is not None else None
        env["exists"] = os.path.isdir(env["dir"])
        env["bytes"] = folder_bytes(env["dir"]) if env["exists"] else 0
        env["mb"] = round(env["bytes"] / 1e6, 1)
        env["progress_max"] = max(self.progress_seen, default=None)
        env["pyvenv_cfg"] = read_pyvenv_cfg(env["dir"])
        env["worker_python"] = plugin_worker_python()
        self.record("environment_changed", ok=bool(ready), ready=bool(ready), mb=env["mb"],
                    seconds=env.get("seconds"))
        if not ready:
            self.fail("environmentChanged(False): the environment install failed (see messages log)")
            return
        self.later(200, self.load_layers)

    def load_layers(self):
        emb = self.iface.addRasterLayer(self.cfg["embeddings"], "demo embeddings")
        ref = self.iface.addRasterLayer(self.cfg["reference"], "demo reference DSM")
        if emb is None or not emb.isValid() or ref is None or not ref.isValid():
            self.fail("could not load the demo scene's rasters as layers")
            return
        self.layers.update(embeddings=emb, reference=ref)
        # QGIS zooms to the first layer and may take its CRS a moment later: zoom after that.
        self.later(1500, self.zoom_to_part)

    def zoom_to_part(self):
        """Show a part of the embeddings in the middle of the scene, in their CRS (EPSG:32630).

        The dock takes the canvas extent (the part plus the margin the canvas' aspect
        ratio adds) as the area of interest.
        """
        from qgis.core import QgsProject, QgsRectangle

        emb = self.layers["embeddings"]
        QgsProject.instance().setCrs(emb.crs())
        canvas = self.iface.mapCanvas()
        full = emb.extent()
        frac = float(self.cfg.get("aoi_fraction", 0.22))
        cx, cy = full.center().x(), full.center().y()
        half_w, half_h = full.width() * frac / 2, full.height() * frac / 2
        canvas.setExtent(QgsRectangle(cx - half_w, cy - half_h, cx + half_w, cy + half_h))
        canvas.refresh()
        self.record("layers_loaded", embeddings_bands=emb.bandCount(),
                    reference_crs=self.layers["reference"].crs().authid(),
                    project_crs=QgsProject.instance().crs().authid(),
                    canvas_crs=canvas.mapSettings().destinationCrs().authid(),
                    canvas_extent=canvas.extent().toString(0))
        self.wait_signal("canvas_rendered", canvas.mapCanvasRefreshed, 30, lambda *a: self.choose_inputs(),
                         on_timeout=self.choose_inputs)

    def choose_inputs(self):
        dock = self.dock
        canvas = self.iface.mapCanvas()
        dock.canvas_button.click()
        if dock.aoi is None:
            self.fail("canvas_button did not set an area of interest (see the message bar / log)")
            return
        aoi = dock.aoi
        self.result["aoi"] = {"xmin": aoi.xmin, "ymin": aoi.ymin, "xmax": aoi.xmax, "ymax": aoi.ymax,
                              "crs": str(aoi.crs), "canvas_extent": canvas.extent().toString(2),
                              "label": dock.aoi_label.text()}
        index = dock.source_combo.findData("file")
        dock.source_combo.setCurrentIndex(index)
        dock.embeddings_file.setFilePath(self.cfg["embeddings"])
        dock.bundled_radio.setChecked(True)
        dock.reference_combo.setLayer(self.layers["reference"])
        dock.output_folder.setFilePath(self.cfg["output_folder"])
        self.result["run_on"] = self.run_on_state()
        self.record("inputs_chosen", aoi=self.result["aoi"], source=dock.source_combo.currentData(),
                    reference=dock.reference_combo.currentLayer().name() if dock.reference_combo.currentLayer()
                    else None, run_enabled=dock.run_button.isEnabled())
        self.later(300, self.run)

    def run_on_state(self):
        """The dock's "Run prediction on" group, opened so the screenshots show it (the run
        itself stays on this computer), and whether the worker's Python has Dask, asked
        here with a plain import rather than through the plugin's own check."""
        import subprocess

        dock = self.dock
        group = getattr(dock, "run_on_group", None)
        if group is None:
            return None
        group.setCollapsed(False)
        python = plugin_worker_python()
        has_dask = None
        if python and not python.startswith("unknown"):
            has_dask = subprocess.run([python, "-c", "import dask, distributed"], capture_output=True,
                                      timeout=60).returncode == 0
        buttons = {key: {"text": button.text(), "enabled": button.isEnabled(), "checked": button.isChecked(),
                         "tooltip": button.toolTip()} for key, button in dock.run_on_buttons.items()}
        return {"title": group.title(), "collapsed": group.isCollapsed(), "choice": dock.run_on(),
                "buttons": buttons, "hint": dock.dask_hint.text(), "worker_has_dask": has_dask}

    def run(self):
        dock = self.dock
        if not dock.run_button.isEnabled():
            tip = dock.run_button.toolTip()
            self.fail("run_button is disabled" + (f" ({tip})" if tip else "")
                      + (" - environment not ready" if not self.result.get("env", {}).get("ready") else ""))
            return
        self.progress_seen = []
        self.run_started = time.monotonic()
        self.wait_signal("runFinished", dock.runFinished, self.cfg["run_timeout_s"], self.run_finished)
        dock.run_button.click()
        self.record("run_clicked", cancel_enabled=dock.cancel_button.isEnabled(),
                    run_enabled=dock.run_button.isEnabled())

    def run_finished(self, ok):
        from qgis.core import QgsProject, QgsSingleBandPseudoColorRenderer

        dock = self.dock
        run = {"ok": bool(ok), "seconds": round(time.monotonic() - self.run_started, 1),
               "progress_max": max(self.progress_seen, default=None)}
        self.result["run"] = run
        result = getattr(dock, "last_result", None)
        if result is not None:
            run["predicted"] = str(result.predicted)
            run["difference"] = str(result.difference) if result.difference else None
            run["metrics"] = result.metrics.get("overall", result.metrics) if result.metrics else {}
            run["device"] = getattr(result, "device", "")
            run["model_name"] = getattr(result, "model_name", "")
            run["files_exist"] = {key: bool(run[key]) and os.path.isfile(run[key])
                                  for key in ("predicted", "difference")}
        layers = []
        for layer in QgsProject.instance().mapLayers().values():
            renderer = layer.renderer() if hasattr(layer, "renderer") else None
            layers.append({"name": layer.name(), "source": layer.source(), "valid": layer.isValid(),
                           "renderer": type(renderer).__name__ if renderer is not None else None,
                           "pseudocolor": isinstance(renderer, QgsSingleBandPseudoColorRenderer)})
        self.result["layers"] = layers
        for key in ("predicted", "difference"):
            path = run.get(key)
            match = [entry for entry in layers if path and os.path.normpath(entry["source"]) == os.path.normpath(path)]
            run[f"{key}_layer"] = match[0] if match else None
        self.record("run_finished", ok=bool(ok), seconds=run["seconds"])
        if not ok:
            self.fail("runFinished(False): the run failed (see the messages log)")
            return
        layer = next((l for l in QgsProject.instance().mapLayers().values()
                      if run.get("predicted") and os.path.normpath(l.source()) == os.path.normpath(run["predicted"])),
                     None)
        canvas = self.iface.mapCanvas()
        if layer is not None:
            extent = layer.extent()
            extent.scale(1.15)
            canvas.setExtent(extent)
        canvas.refresh()
        self.wait_signal("result_rendered", canvas.mapCanvasRefreshed, 30,
                         lambda *a: self.later(1000, self.show_height), on_timeout=self.show_height)

    def show_height(self):
        """Screenshot the difference layer (on top), then hide it and scroll the dock to the results."""
        from qgis.core import QgsProject

        group = getattr(self.dock, "run_on_group", None)
        if group is not None:  # the "Run prediction on" choices in this screenshot
            self.dock.widget().ensureWidgetVisible(group)
        self.grab(self.cfg["screenshot"].replace(".png", "_difference.png"))
        run = self.result["run"]
        project = QgsProject.instance()
        for layer in project.mapLayers().values():
            if run.get("difference") and os.path.normpath(layer.source()) == os.path.normpath(run["difference"]):
                node = project.layerTreeRoot().findLayer(layer.id())
                if node is not None:
                    node.setItemVisibilityChecked(False)
        scroll = self.dock.widget()
        if hasattr(scroll, "verticalScrollBar"):
            scroll.verticalScrollBar().setValue(scroll.verticalScrollBar().maximum())
        canvas = self.iface.mapCanvas()
        canvas.refresh()
        self.wait_signal("height_rendered", canvas.mapCanvasRefreshed, 30, lambda *a: self.later(1000, self.succeed),
                         on_timeout=self.succeed)

    def grab(self, path):
        """The whole X screen as PNG, from inside QGIS."""
        from qgis.core import QgsApplication

        QgsApplication.processEvents()
        return bool(QgsApplication.primaryScreen().grabWindow(0).save(path))

    def succeed(self):
        self.result["ok"] = True
        self.finish("done")

    # ---- the end ---------------------------------------------------------------------

    def finish(self, phase):
        """Record modules and a screenshot, report, then wait for the test's go before quitting."""
        if self.finished:
            return
        self.finished = True
        self.deadline.stop()
        self.result["modules"] = {m: m in sys.modules for m in ("torch", "onnxruntime", "rasterio")}
        self.result["torch_modules"] = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))[:10]
        try:
            self.result["screenshot_inside"] = self.grab(self.cfg["screenshot"])
        except Exception as exc:  # noqa: BLE001
            self.result["screenshot_inside"] = f"failed: {exc}"
        self.result["phase"] = phase
        self.result["t_total"] = self.elapsed()
        self.write()
        self.log(f"finished: {phase}")
        self.quit_waited = time.monotonic()
        self._wait_quit_file()

    def _wait_quit_file(self):
        from qgis.PyQt.QtCore import QTimer

        if os.path.exists(self.cfg["quit_file"]) or time.monotonic() - self.quit_waited > self.cfg["quit_wait_s"]:
            self.quit()
        else:
            QTimer.singleShot(200, self._wait_quit_file)

    def quit(self):
        """File > Exit, as a user would; questions QGIS asks on the way are answered Yes."""
        from qgis.core import QgsApplication, QgsProject
        from qgis.PyQt.QtCore import QTimer

        self.log("quitting QGIS")
        self.result["exit_dialogs"] = []
        self.dialog_timer = QTimer()
        self.dialog_timer.timeout.connect(self._answer_exit_dialog)
        self.dialog_timer.start(300)  # modal dialogs run their own event loop: timers still fire
        try:
            for task in QgsApplication.taskManager().activeTasks():
                task.cancel()
            QgsProject.instance().setDirty(False)  # no "save the project?" question
            self.iface.actionExit().trigger()
        except Exception:  # noqa: BLE001 - no main window (the plugin never loaded)
            QgsApplication.exit(0)

    def _answer_exit_dialog(self):
        """E.g. 'This project includes one or more temporary layers' (layers under /tmp)."""
        from qgis.PyQt.QtWidgets import QApplication, QMessageBox

        dialog = QApplication.activeModalWidget()
        if dialog is None:
            return
        text = dialog.text() if isinstance(dialog, QMessageBox) else dialog.windowTitle()
        self.result["exit_dialogs"].append(f"{type(dialog).__name__}: {text}")
        self.log(f"exit dialog answered: {type(dialog).__name__}: {text}")
        self.write()
        if isinstance(dialog, QMessageBox):
            for standard in (QMessageBox.StandardButton.Yes, QMessageBox.StandardButton.Discard,
                             QMessageBox.StandardButton.Ok):
                button = dialog.button(standard)
                if button is not None:
                    button.click()
                    return
        dialog.close()


def read_pyvenv_cfg(folder):
    """home/version/include-system-site-packages of a venv: which Python it was made from."""
    values = {}
    try:
        with open(os.path.join(folder, "pyvenv.cfg"), encoding="utf-8") as fh:
            for line in fh:
                key, _, value = line.partition("=")
                if key.strip() in ("home", "version", "version_info", "include-system-site-packages", "executable"):
                    values[key.strip()] = value.strip()
    except OSError:
        return None
    return values


def plugin_worker_python():
    """The interpreter the plugin's runs use (plugin internals; None where they differ)."""
    try:
        from alphaearth_height.plugin.environment import profile_environment, worker_python

        return worker_python(profile_environment())
    except Exception as exc:  # noqa: BLE001 - informative only
        return f"unknown ({type(exc).__name__}: {exc})"


def folder_bytes(path):
    """Bytes on disk below ``path`` (like du: links not followed, hard links once)."""
    total, seen = 0, set()
    for folder, dirs, files in os.walk(path):
        for name in files + dirs:
            try:
                st = os.lstat(os.path.join(folder, name))
            except OSError:
                continue
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            total += st.st_blocks * 512
    return total


_aeh_desktop_driver = DesktopDriver(os.environ["AEH_DESKTOP_CONFIG"])
