"""Settings: one row per setting of the schema that has a label (its widget, limits and tooltip come from the schema),
the model bundle (open, verify, manifest), and the safety lists (open the folder, reload).

Save changes the context through ``AppContext.apply_settings`` (a new Settings object, saved first) and Reload through
``AppContext.reload_rules`` (a new RuleSet): nothing is changed in place, and the window passes the new objects on to
its worker. A value the user did not touch is saved exactly as it was loaded, even where the widget shows it rounded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from PySide6.QtCore import QUrl
from PySide6.QtGui import QDesktopServices
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QMessageBox,
    QPlainTextEdit,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from appliance.app import AppContext
from appliance.bundle import Bundle
from appliance.errors import StreamChatError
from appliance.settings import SCHEMA, Setting, value_of, with_values
from ui.messages import t

SECTION_TITLES = {"generation": "Generation"}  # translation keys of the dialog's headings


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
    else:
        widget = QLineEdit(value)
    widget.setToolTip(setting.help)
    return widget


def _described(bundle: Bundle) -> str:
    summary = {k: bundle.manifest.get(k) for k in ("name", "target", "quant", "max_context", "created_by")}
    return json.dumps(summary, ensure_ascii=False, indent=1)


def widget_value(widget: QWidget) -> Any:
    if isinstance(widget, QComboBox):
        return widget.currentData()
    if isinstance(widget, QCheckBox):
        return widget.isChecked()
    if isinstance(widget, QLineEdit):
        return widget.text().strip()
    return widget.value()


class SettingsDialog(QDialog):
    def __init__(self, app: AppContext, model_summary: dict, parent=None) -> None:
        super().__init__(parent)
        self.app = app
        # what an empty bundle field means: the built-in demo model, whose folder is known once it has been loaded
        self.demo_path = model_summary.get("path", "") if model_summary.get("demo") else ""
        self.setWindowTitle(t("Settings"))
        s = app.settings
        self.editors = {st.key: setting_widget(st, value_of(s, st.key)) for st in SCHEMA if st.label}
        self.shown = {key: widget_value(widget) for key, widget in self.editors.items()}  # to tell what was touched
        self.bundle = self.editors["model_bundle"]
        self.bundle.setPlaceholderText(t("Use the demo model"))
        self.editors["data_dir"].setPlaceholderText(str(app.data_dir))
        self.manifest = QPlainTextEdit(readOnly=True)
        self.manifest.setMaximumHeight(120)

        buttons = {"model_bundle": ((t("Open folder..."), self._browse), (t("Verify"), self._verify))}
        rows_after = {"model_bundle": ("", self.manifest),
                      "data_dir": (t("Safety lists"), self._buttons(None, ((t("Open the folder"), self._open_lists),
                                                                           (t("Reload"), self._reload_lists))))}
        form, headed = QFormLayout(), set()
        for setting in (st for st in SCHEMA if st.label):
            if setting.section in SECTION_TITLES and setting.section not in headed:
                headed.add(setting.section)
                form.addRow(QLabel(f"<b>{t(SECTION_TITLES[setting.section])}</b>"))
            editor = self.editors[setting.key]
            form.addRow(t(setting.label), self._buttons(editor, buttons[setting.key]) if setting.key in buttons else editor)
            if setting.key in rows_after:
                form.addRow(*rows_after[setting.key])
        box = QDialogButtonBox(QDialogButtonBox.Save | QDialogButtonBox.Cancel)
        box.accepted.connect(self.accept)
        box.rejected.connect(self.reject)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(box)
        self._show_manifest(s.model_bundle or model_summary.get("path", ""))

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
            self.manifest.setPlainText(str(exc))

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
            self.manifest.setPlainText(str(exc))

    def _open_lists(self) -> None:
        folder = self.app.config_dir / "safety"
        folder.mkdir(parents=True, exist_ok=True)
        QDesktopServices.openUrl(QUrl.fromLocalFile(str(folder)))

    def _reload_lists(self) -> None:
        try:
            self.app.reload_rules()
        except StreamChatError as exc:  # a bad list: the rules in use stay
            QMessageBox.warning(self, t("Safety lists"), str(exc))

    def edited(self) -> dict[str, Any]:
        """The values the user changed (the others keep their exact loaded value)."""
        return {key: widget_value(widget) for key, widget in self.editors.items()
                if widget_value(widget) != self.shown[key]}

    def accept(self) -> None:
        try:
            self.app.apply_settings(with_values(self.app.settings, self.edited()))
        except StreamChatError as exc:  # the settings file cannot be written, or the data folder cannot be used
            QMessageBox.warning(self, t("Settings"), str(exc))
            return
        super().accept()
