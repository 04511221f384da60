"""Settings: one row per setting of the schema that has a label, the kiosk's aside (their widgets, limits and tooltips
come from the schema), the model bundle (open, verify, manifest), the engine and device the bundle's target can run on,
and the safety lists (open the folder, reload). The kiosk's settings are the operator's (ui.kiosk_settings).

Save changes the context through ``AppContext.apply_settings`` (a new Settings object, saved first) and Reload through
``AppContext.reload_rules`` (a new RuleSet): nothing is changed in place, and the window passes the new objects on to
its worker. A value the user did not touch is saved exactly as it was loaded, even where the widget shows it rounded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from PySide6.QtCore import Qt, QUrl
from PySide6.QtGui import QDesktopServices
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QFrame,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QMessageBox,
    QPlainTextEdit,
    QPushButton,
    QScrollArea,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from appliance.app import AppContext
from appliance.bundle import Bundle
from appliance.engines import AUTO, ENGINES
from appliance.errors import StreamChatError
from appliance.settings import SCHEMA, Setting, value_of, with_values
from appliance.targets import TARGETS
from ui.messages import t

WINDOW_FRAME = 90  # pixels of a dialog's height that are not its form or buttons: title bar, frame, layout margins
SECTION_TITLES = {"generation": "Generation"}  # translation keys of the dialog's headings
DIALOG_SETTINGS = tuple(st for st in SCHEMA if st.label and st.section != "kiosk")


def engines_for(target: str | None) -> list[str]:
    """The engine setting's choices for a bundle of ``target``: auto and every engine that runs its graph layout
    (every engine when the target is not known)."""
    layout = TARGETS[target].graphs if target in TARGETS else None
    return [AUTO, *(kind.name for kind in ENGINES.values() if layout is None or layout in kind.opens)]


def engine_label(name: str) -> str:
    """How an engine setting reads in the window: Automatic, or the engine's own name."""
    return t("Automatic (the bundle's own)") if name == AUTO else name


def devices_for(engine: str, target: str | None) -> tuple[str, ...]:
    """Where ``engine`` (auto: the target's own) can run; every device when that is not known."""
    name = TARGETS[target].runtime if engine == AUTO and target in TARGETS else engine
    return ENGINES[name].devices if name in ENGINES else ("cpu", "ascend")


def setting_widget(setting: Setting, value: Any) -> QWidget:
    """An editor for ``setting`` showing ``value``, limited to what the settings file accepts."""
    if setting.choices:
        widget = QComboBox()
        for choice, label in zip(setting.choices, setting.choice_labels or setting.choices, strict=True):
            widget.addItem(t(label), choice)
        widget.setCurrentIndex(setting.choices.index(value))
    elif setting.type is bool:
        widget = QCheckBox()
        widget.setChecked(value)
    elif setting.type is int:
        widget = QSpinBox()
        widget.setRange(*setting.limits)
        widget.setValue(value)
    elif setting.type is float:
        widget = QDoubleSpinBox()
        widget.setDecimals(setting.decimals)  # before the range and value, which it rounds
        widget.setRange(*setting.limits)
        widget.setSingleStep(setting.step)
        widget.setValue(value)
    elif setting.lines > 1:
        widget = QPlainTextEdit(value)
        widget.setFixedHeight(widget.fontMetrics().lineSpacing() * setting.lines + 12)
    else:
        widget = QLineEdit(value)
    widget.setToolTip(setting.help)
    return widget


def _described(bundle: Bundle) -> str:
    summary = {k: bundle.manifest.get(k) for k in ("name", "target", "quant", "max_context", "created_by")}
    return json.dumps(summary, ensure_ascii=False, indent=1)


def lay_out_with_save(dialog: QDialog, form: QFormLayout) -> None:
    """A settings dialog's layout: its form above Save and Cancel (accept / reject). The form is as tall as it needs
    where the screen has the room, and scrolls where it has not (a 768-line laptop, a kiosk's small panel, a big
    text size), so that Save and Cancel are always on the screen."""
    box = QDialogButtonBox(QDialogButtonBox.Save | QDialogButtonBox.Cancel)
    box.accepted.connect(dialog.accept)
    box.rejected.connect(dialog.reject)
    inner = QWidget()
    inner.setLayout(form)
    scroll = QScrollArea()
    scroll.setWidget(inner)
    scroll.setWidgetResizable(True)
    scroll.setFrameShape(QFrame.NoFrame)
    scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
    layout = QVBoxLayout(dialog)
    layout.addWidget(scroll, 1)
    layout.addWidget(box)
    room = dialog.screen().availableGeometry().height() - box.sizeHint().height() - WINDOW_FRAME
    form_size = inner.sizeHint()
    scroll.setMinimumSize(form_size.width() + scroll.verticalScrollBar().sizeHint().width(),
                          max(0, min(form_size.height(), room)))


def widget_value(widget: QWidget) -> Any:
    if isinstance(widget, QComboBox):
        return widget.currentData()
    if isinstance(widget, QCheckBox):
        return widget.isChecked()
    if isinstance(widget, QLineEdit):
        return widget.text().strip()
    if isinstance(widget, QPlainTextEdit):
        return widget.toPlainText().strip()
    return widget.value()


class SettingsDialog(QDialog):
    def __init__(self, app: AppContext, model_summary: dict, parent=None) -> None:
        super().__init__(parent)
        self.app = app
        # what an empty bundle field means: the built-in demo model, whose folder is known once it has been loaded
        self.demo_path = model_summary.get("path", "") if model_summary.get("demo") else ""
        self.setWindowTitle(t("Settings"))
        s = app.settings
        self.target: str | None = None  # of the bundle in the field (None: it does not open)
        self.editors = {st.key: setting_widget(st, value_of(s, st.key)) for st in DIALOG_SETTINGS}
        self.editors["engine"] = QComboBox()  # its choices depend on the bundle in the field (_offer_engines)
        self.shown = {key: widget_value(widget) for key, widget in self.editors.items() if key != "engine"}
        self.shown["engine"] = s.engine  # to tell what was touched
        self.bundle = self.editors["model_bundle"]
        self.bundle.textChanged.connect(lambda folder: self._offer_engines(folder))
        self.editors["engine"].activated.connect(self._engine_picked)
        self.editors["device"].currentIndexChanged.connect(self._enable_device_id)
        self.bundle.setPlaceholderText(t("Use the demo model"))
        self.editors["data_dir"].setPlaceholderText(str(app.data_dir))
        self.manifest = QPlainTextEdit(readOnly=True)
        self.manifest.setMaximumHeight(120)

        buttons = {"model_bundle": ((t("Open folder..."), self._browse), (t("Verify"), self._verify))}
        rows_after = {"model_bundle": ("", self.manifest),
                      "data_dir": (t("Safety lists"), self._buttons(None, ((t("Open the folder"), self._open_lists),
                                                                           (t("Reload"), self._reload_lists))))}
        form, headed = QFormLayout(), set()
        for setting in DIALOG_SETTINGS:
            if setting.section in SECTION_TITLES and setting.section not in headed:
                headed.add(setting.section)
                form.addRow(QLabel(f"<b>{t(SECTION_TITLES[setting.section])}</b>"))
            editor = self.editors[setting.key]
            form.addRow(t(setting.label), self._buttons(editor, buttons[setting.key]) if setting.key in buttons else editor)
            if setting.key in rows_after:
                form.addRow(*rows_after[setting.key])
        lay_out_with_save(self, form)
        self._show_manifest(s.model_bundle or model_summary.get("path", ""))
        self._offer_engines(s.model_bundle, keep=s.engine)

    @staticmethod
    def _buttons(editor: QWidget | None, buttons) -> QHBoxLayout:
        """``editor`` (if any) followed by (label, action) buttons, in one row."""
        row = QHBoxLayout()
        if editor is not None:
            row.addWidget(editor)
        for label, action in buttons:
            button = QPushButton(label)
            button.clicked.connect(action)
            row.addWidget(button)
        return row

    def _target(self, folder: str) -> str | None:
        """The target of the bundle in the field (empty: the demo's, a cpu bundle); None when it does not open."""
        if not folder.strip():
            return "cpu"
        try:
            return Bundle.open(folder.strip(), full_check=False).target
        except StreamChatError:
            return None

    def _offer_engines(self, folder: str, keep: str | None = None) -> None:
        """Offer the engines the bundle in the field can run on, keeping the one chosen (``keep``: the saved one, also
        when it is not among them, so that an untouched value is saved as it was)."""
        combo = self.editors["engine"]
        current = keep if keep is not None else combo.currentData()
        self.target = self._target(folder)
        names = engines_for(self.target)
        if current not in names:
            names.append(current)
        combo.clear()
        for name in names:
            combo.addItem(engine_label(name), name)
        combo.setCurrentIndex(names.index(current))
        self._enable_device()

    def _engine_picked(self) -> None:
        """An engine that cannot run on the chosen device takes the first it can run on."""
        devices = devices_for(self.editors["engine"].currentData(), self.target)
        device = self.editors["device"]
        if device.currentData() not in devices:
            device.setCurrentIndex(device.findData(devices[0]))
        self._enable_device()

    def _enable_device(self) -> None:
        self.editors["device"].setEnabled(len(devices_for(self.editors["engine"].currentData(), self.target)) > 1)
        self._enable_device_id()

    def _enable_device_id(self) -> None:
        device = self.editors["device"]
        self.editors["device_id"].setEnabled(device.currentData() == "ascend" and "ascend" in
                                             devices_for(self.editors["engine"].currentData(), self.target))

    def _browse(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, t("Model bundle"), self.bundle.text() or str(Path.home()))
        if folder:
            self.bundle.setText(folder)
            self._show_manifest(folder)

    def _show_manifest(self, folder: str) -> None:
        if not folder:
            self.manifest.setPlainText("")
            return
        try:
            self.manifest.setPlainText(_described(Bundle.open(folder, full_check=False)))
        except StreamChatError as exc:
            self.manifest.setPlainText(t(str(exc)))

    def _verify(self) -> None:
        """Check every file of the bundle in the field (empty: the demo's) and show that bundle's own manifest."""
        folder = self.bundle.text().strip() or self.demo_path
        if not folder:
            self.manifest.setPlainText(t("The field is empty: the built-in demo model is used. It is checked when it "
                                         "loads; open a bundle folder to verify a bundle."))
            return
        try:
            self.manifest.setPlainText(f"OK: {folder}\n" + _described(Bundle.open(folder, full_check=True)))
        except StreamChatError as exc:
            self.manifest.setPlainText(t(str(exc)))

    def _open_lists(self) -> None:
        folder = self.app.config_dir / "safety"
        folder.mkdir(parents=True, exist_ok=True)
        QDesktopServices.openUrl(QUrl.fromLocalFile(str(folder)))

    def _reload_lists(self) -> None:
        try:
            self.app.reload_rules()
        except StreamChatError as exc:  # a bad list: the rules in use stay
            QMessageBox.warning(self, t("Safety lists"), t(str(exc)))

    def edited(self) -> dict[str, Any]:
        """The values the user changed (the others keep their exact loaded value)."""
        return {key: widget_value(widget) for key, widget in self.editors.items()
                if widget_value(widget) != self.shown[key]}

    def accept(self) -> None:
        try:
            self.app.apply_settings(with_values(self.app.settings, self.edited()))
        except StreamChatError as exc:  # the settings file cannot be written, or the data folder cannot be used
            QMessageBox.warning(self, t("Settings"), t(str(exc)))
            return
        super().accept()
