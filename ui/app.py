"""Start the window: settings, translations, the model (a bundle, or the built-in demo), kiosk or not.

The window's launcher owns the demo's first-run export: ``run`` takes it as ``export`` (the CLI passes the export
stage), so nothing under ``ui`` imports ``streamchat`` or ``model_export``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

from appliance import crash
from appliance.app import AppContext
from appliance.errors import StreamChatError
from appliance.folders import data_dir
from appliance.loading import DemoExporter, LoadedModel, demo_bundle, open_bundle
from appliance.settings import Settings

ModelLoader = Callable[[Settings, Callable[[str], None]], LoadedModel]


def model_loader(bundle: Path | None, demo: bool, export: DemoExporter | None = None) -> ModelLoader:
    """What the worker calls (in its thread) with its own copy of the settings and a progress callback: the given
    bundle or the demo whatever the settings say (a fixed model, for tests and the screenshot tool), else the
    configured one, or the demo (exported by ``export`` on first use); on the engine and device the settings name."""

    def load(settings: Settings, progress: Callable[[str], None]) -> LoadedModel:
        chosen = bundle or (Path(settings.model_bundle) if settings.model_bundle and not demo else None)
        if chosen is None:
            progress("the built-in demo model")
            chosen = demo_bundle(data_dir(settings), export, progress)  # the data folder the settings name now
        else:
            progress(str(chosen))
        return open_bundle(chosen, threads=settings.threads or None, engine=settings.engine,
                           context=settings.context_budget, progress=progress, device=settings.device,
                           device_id=settings.device_id)

    return load


def install_crash_dialog() -> None:
    """A bug in a slot of the GUI thread shows its one line in a dialog (the traceback goes to the crash log) instead of
    a traceback on a console that a desktop or kiosk user never sees; the window keeps running."""
    from PySide6.QtCore import QThread
    from PySide6.QtWidgets import QApplication, QMessageBox

    from ui.messages import t

    shown: list[QMessageBox] = []  # Python must hold a parentless dialog, or it is collected before it is seen

    def report(exc_type, exc, tb) -> None:
        line = crash.one_line(exc, "running the window")
        print(f"error: {line}", file=sys.stderr)
        qt = QApplication.instance()
        if qt is not None and QThread.currentThread() == qt.thread():
            box = QMessageBox(QMessageBox.Critical, "StreamChat", t(line), QMessageBox.Ok, qt.activeWindow())
            box.finished.connect(lambda _result, box=box: shown.remove(box))
            shown.append(box)
            box.open()

    sys.excepthook = report


def run(bundle: Path | None = None, kiosk: bool = False, demo: bool = False, argv: list[str] | None = None,
        ready_exit: bool = False, export: DemoExporter | None = None) -> int:
    """``ready_exit``: quit as soon as the model is loaded, printing the cold-start time (installer smoke tests), or
    with status 1 when it fails to load; ``export``: the export stage, for the demo's first run (without it the demo
    must have been prepared before). No display Qt can use: a ``StreamChatError`` saying so (exit 2), not Qt's abort."""
    import time

    started = time.perf_counter()
    from PySide6.QtWidgets import QApplication

    from ui.i18n import translators_for
    from ui.main_window import MainWindow
    from ui.platform_check import checked_display

    qt = QApplication.instance()
    if qt is None:
        with checked_display() as problem:  # its X connection held until Qt has its own (see platform_check)
            if problem is not None:
                raise StreamChatError(problem)
            qt = QApplication(argv or sys.argv[:1])
    qt.setApplicationName("StreamChat")
    qt.setDesktopFileName("streamchat")  # the desktop entry (installers/deb): its icon on Wayland docks and task bars
    install_crash_dialog()
    app = AppContext.load()
    translators = translators_for(app.settings.language)  # held here: Qt does not own an installed translator
    for translator in translators:
        qt.installTranslator(translator)
    window = MainWindow(app, model_loader(None, False, export), kiosk=kiosk or app.settings.kiosk.enabled,
                        model="" if demo else (str(bundle) if bundle else None))  # until one is chosen in the window
    if not window.isFullScreen():
        window.show()
    if ready_exit:  # exit(), not quit(): Qt 6's quit() first closes the windows, and a kiosk window refuses
        window.model_ready.connect(lambda: (print(f"window ready with {window.model_label} in "
                                                  f"{time.perf_counter() - started:.2f} s", flush=True), qt.exit(0)))
        window.model_failed.connect(lambda line: (print(f"error: {line}", file=sys.stderr, flush=True), qt.exit(1)))
    code = qt.exec()
    # Leave without interpreter finalisation: PySide6 6.x can abort while collecting its wrappers at shutdown, and a
    # kiosk's systemd unit would read that as a crash and restart the app after an operator exit.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
