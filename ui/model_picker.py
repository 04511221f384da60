"""The model picker: the built-in demo and every installed bundle, with name, quantization, size on disk and target.

Installed bundles are the folders in ``<data>/bundles`` (where ``streamchat bundle install`` puts a package unless
given ``--into``, and where the demo is prepared) and ``/usr/share/streamchat/models`` (the .deb packages), plus the
configured bundle when it lives elsewhere. Choosing one emits ``chosen`` with the value of the ``model_bundle``
setting that loads it ("" for the demo); a bundle that does not open is listed with the reason and, chosen, explained
in a dialog. "Install a bundle package..." runs that same install (``appliance.bundle_package.install``) in a thread
of its own, with a progress bar over the bytes extracted and then verified, and a Cancel (obeyed in both) that
removes what it wrote.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

from PySide6.QtCore import QObject, Qt, QThread, Signal, Slot
from PySide6.QtWidgets import (
    QAbstractItemView,
    QDialog,
    QFileDialog,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QProgressDialog,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
)

from appliance import bundle_package
from appliance.app import AppContext
from appliance.bundle import Bundle
from appliance.errors import StreamChatError
from appliance.folders import data_dir
from appliance.settings import Settings
from ui.alerts import alert
from ui.messages import t

MODELS_FOLDER = "bundles"  # in the data folder: `streamchat bundle install`'s default --into, and the demo's place


@dataclass(frozen=True)
class BundleEntry:
    setting: str  # the model_bundle value that loads it: "" for the built-in demo, else the folder
    name: str
    quant: str
    target: str
    size: int | None  # bytes on disk; None: not on disk yet (the demo before its first load)
    folder: str
    problem: str = ""  # why it cannot be loaded ("" when it can)
    demo: bool = False


def models_dir(settings: Settings) -> Path:
    """Where the app installs packages: the folder ``streamchat bundle install`` uses by default."""
    return data_dir(settings) / MODELS_FOLDER


def size_on_disk(folder: Path) -> int:
    """Bytes of the regular files under ``folder`` (an installed bundle's link followed to its version folder)."""
    total = 0
    for root, _dirs, files in os.walk(folder.resolve()):
        for name in files:
            path = Path(root, name)
            if path.is_file() and not path.is_symlink():
                total += path.stat().st_size
    return total


def _entry(folder: Path, setting: str) -> BundleEntry:
    try:
        bundle = Bundle.open(folder, full_check=False)
    except StreamChatError as exc:
        return BundleEntry(setting, folder.name, "", "", None, str(folder), str(exc))
    return BundleEntry(setting, bundle.manifest.get("name") or folder.name, bundle.manifest["quant"]["weights"],
                       bundle.target, size_on_disk(folder), str(folder), demo=bundle.is_demo)


def installed_bundles(settings: Settings) -> list[BundleEntry]:
    """The demo first (the prepared one, or a row saying it is prepared when first loaded), then every other bundle
    by folder name; the configured bundle is listed even when it is not in a models folder."""
    own = models_dir(settings)
    folders = [p for where in (own, bundle_package.SYSTEM_MODELS) if where.is_dir()
               for p in sorted(where.iterdir()) if not p.name.startswith(".") and p.is_dir()]
    if settings.model_bundle and Path(settings.model_bundle).expanduser().resolve() not in \
            {p.resolve() for p in folders}:
        folders.append(Path(settings.model_bundle).expanduser())
    demo, others = None, []
    for folder in folders:
        entry = _entry(folder, str(folder))
        if entry.demo and folder.parent == own:  # the demo as the app prepares it: loaded through the setting ""
            demo = demo or BundleEntry("", t("the built-in demo model"), entry.quant, entry.target, entry.size,
                                       entry.folder, demo=True)
        else:
            others.append(entry)
    if demo is None:
        demo = BundleEntry("", t("the built-in demo model"), "", "cpu", None, t("prepared when first loaded"),
                           demo=True)
    return [demo, *others]


def human_size(size: int | None) -> str:
    if size is None:
        return "—"
    return f"{size / 1e9:.2f} GB" if size >= 1e9 else f"{size / 1e6:.1f} MB"


class InstallCancelled(StreamChatError):
    """The user cancelled a package install; it removed what it had written."""


class InstallJob(QObject):
    """``bundle_package.install`` in its own thread: ``progress(bytes)`` per chunk, then ``done(path)`` or
    ``failed(line)``; ``cancel`` (an Event the dialog sets) stops it at the next chunk."""

    progress = Signal(int)
    done = Signal(str)
    failed = Signal(str)

    def __init__(self, package: Path, into: Path) -> None:
        super().__init__()
        self.package, self.into = package, into
        self.cancel = threading.Event()
        self.written = 0

    def _on_bytes(self, count: int) -> None:
        if self.cancel.is_set():
            raise InstallCancelled("the install was cancelled; nothing was changed")
        self.written += count
        self.progress.emit(self.written)

    @Slot()
    def run(self) -> None:
        try:
            self.done.emit(str(bundle_package.install(self.package, self.into, self._on_bytes)))
        except StreamChatError as exc:
            self.failed.emit(str(exc))


class ModelPicker(QDialog):
    """Pick a model to load, or install a bundle package (see the module docstring)."""

    chosen = Signal(str)  # the model_bundle value of the chosen entry
    install_finished = Signal(str)  # the installed bundle's path, or "" when the install failed or was cancelled

    COLUMNS = ("Name", "Quantization", "Size on disk", "Target", "Folder")

    def __init__(self, app: AppContext, loaded_path: str = "", parent=None) -> None:
        """``loaded_path``: the folder of the model the window runs now (marked in the list)."""
        super().__init__(parent)
        self.app, self.loaded_path = app, loaded_path
        self.setWindowTitle(t("Models"))
        self.entries: list[BundleEntry] = []
        self.table = QTableWidget(0, len(self.COLUMNS))
        self.table.setHorizontalHeaderLabels([t(c) for c in self.COLUMNS])
        self.table.setSelectionBehavior(QAbstractItemView.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SingleSelection)
        self.table.setEditTriggers(QAbstractItemView.NoEditTriggers)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeToContents)
        self.table.horizontalHeader().setStretchLastSection(True)
        self.table.cellDoubleClicked.connect(lambda row, _column: self.choose(row))
        self.note = QLabel()
        self.note.setWordWrap(True)
        load, install, other, close = (QPushButton(t(label)) for label in
                                       ("Load", "Install a bundle package...", "Open folder...", "Close"))
        load.clicked.connect(lambda: self.choose(self.table.currentRow()))
        install.clicked.connect(self.ask_install)
        other.clicked.connect(self._open_folder)
        close.clicked.connect(self.reject)
        buttons = QHBoxLayout()
        for button in (install, other):
            buttons.addWidget(button)
        buttons.addStretch(1)
        for button in (load, close):
            buttons.addWidget(button)
        layout = QVBoxLayout(self)
        layout.addWidget(self.table, 1)
        layout.addWidget(self.note)
        layout.addLayout(buttons)
        self.resize(820, 360)
        self.job: InstallJob | None = None
        self.refresh()

    def refresh(self, select: str = "") -> None:
        """List the bundles again; select the one in folder ``select``, else the loaded one."""
        self.entries = installed_bundles(self.app.settings)
        self.table.setRowCount(len(self.entries))
        mark = select or self.loaded_path
        for row, entry in enumerate(self.entries):
            cells = (entry.name, entry.quant.upper(), human_size(entry.size), entry.target, entry.folder)
            for column, text in enumerate(cells):
                item = QTableWidgetItem(text)
                item.setToolTip(t(entry.problem) if entry.problem else entry.folder)
                if entry.problem:
                    item.setForeground(Qt.gray)
                self.table.setItem(row, column, item)
            if mark and entry.folder and Path(entry.folder).resolve() == Path(mark).resolve():
                self.table.selectRow(row)
        if self.table.currentRow() < 0 and self.entries:
            self.table.selectRow(0)

    def choose(self, row: int) -> None:
        """Load the entry in ``row``; one that does not open is explained in a dialog instead."""
        if not 0 <= row < len(self.entries):
            return
        entry = self.entries[row]
        if entry.problem:
            alert(self, t("This bundle cannot be loaded"), t(entry.problem))
            return
        self.chosen.emit(entry.setting)
        self.accept()

    def _open_folder(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, t("Model bundle"), str(Path.home()))
        if not folder:
            return
        entry = _entry(Path(folder), folder)
        if entry.problem:
            alert(self, t("This bundle cannot be loaded"), t(entry.problem))
            return
        self.chosen.emit(folder)
        self.accept()

    # -- installing ------------------------------------------------------------------------------------------
    def ask_install(self) -> None:
        package, _ = QFileDialog.getOpenFileName(self, t("Install a bundle package..."), str(Path.home()),
                                                 t("Bundle packages (*.tar);;All files (*)"))
        if package:
            self.install(Path(package))

    def install(self, package: Path) -> None:
        """Install ``package`` into the models folder with a progress dialog (Cancel stops it at the next chunk)."""
        if self.job is not None:
            return
        try:
            total = package.stat().st_size
        except OSError as exc:
            alert(self, t("The package was not installed"), f"{package}: {exc.strerror or exc}")
            return
        self.progress = QProgressDialog(t("Extracting and verifying {0}...").format(package.name), t("Cancel"), 0,
                                        max(2 * total, 1), self)  # every byte extracted, then hashed
        self.progress.setWindowModality(Qt.WindowModal)
        self.progress.setMinimumDuration(0)
        self.progress.setAutoClose(False)
        self.progress.setAutoReset(False)
        self.job = InstallJob(package, models_dir(self.app.settings))
        self.thread = QThread(self)
        self.job.moveToThread(self.thread)
        self.thread.started.connect(self.job.run)
        for ended in (self.job.done, self.job.failed):
            ended.connect(self.thread.quit)  # first, so that the thread has ended when the handlers below wait for it
        self.job.progress.connect(self._on_progress)
        self.job.done.connect(self._on_installed)
        self.job.failed.connect(self._on_install_failed)
        self.progress.canceled.connect(self.job.cancel.set)
        self.note.setText(t("Installing {0}...").format(package.name))
        self.thread.start()

    def _on_progress(self, written: int) -> None:
        self.progress.setValue(min(written, self.progress.maximum()))

    def _finish_install(self) -> None:
        self.thread.wait(10000)
        self.progress.close()
        self.job = None

    def _on_installed(self, path: str) -> None:
        self._finish_install()
        self.note.setText(t("Installed and verified: {0}").format(path))
        self.refresh(select=path)
        self.install_finished.emit(path)

    def _on_install_failed(self, line: str) -> None:
        cancelled = self.job is not None and self.job.cancel.is_set()
        self._finish_install()
        if cancelled:
            self.note.setText(t("Install cancelled: nothing was changed."))
        else:
            self.note.setText("")
            alert(self, t("The package was not installed"), t(line))
        self.install_finished.emit("")

    def reject(self) -> None:
        """Closing while a package installs cancels the install first (it removes what it wrote)."""
        if self.job is not None:
            self.job.cancel.set()
            self.thread.quit()  # its loop ends when the install returns (the queued quit would wait for this thread)
            self.thread.wait(60000)
        super().reject()
