"""Settings: generation parameters, model bundle (open, verify, manifest), data folder, safety lists, language, font."""

from __future__ import annotations

import json
from pathlib import Path

from PySide6.QtCore import QUrl
from PySide6.QtGui import QDesktopServices
from PySide6.QtWidgets import (
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPlainTextEdit,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
)

from appliance.app import AppContext
from appliance.bundle import Bundle
from appliance.errors import StreamChatError
from appliance.settings import save_settings
from ui.messages import t


def _spin(value: float, low: float, high: float, step: float, decimals: int = 2) -> QDoubleSpinBox:
    box = QDoubleSpinBox(decimals=decimals, minimum=low, maximum=high, singleStep=step)
    box.setValue(value)
    return box


class SettingsDialog(QDialog):
    def __init__(self, app: AppContext, model_summary: dict, parent=None) -> None:
        super().__init__(parent)
        self.app, self.model_changed = app, False
        self.setWindowTitle(t("Settings"))
        s = app.settings
        g = s.generation
        self.temperature = _spin(g.temperature, 0.01, 2.0, 0.05)
        self.top_p = _spin(g.top_p, 0.01, 1.0, 0.05)
        self.top_k = QSpinBox(minimum=0, maximum=1000, value=g.top_k)
        self.repetition_penalty = _spin(g.repetition_penalty, 1.0, 2.0, 0.05)
        self.max_new_tokens = QSpinBox(minimum=1, maximum=8192, value=g.max_new_tokens)
        self.context_budget = QSpinBox(minimum=64, maximum=32768, value=s.context_budget)
        self.bundle = QLineEdit(s.model_bundle, placeholderText=t("Use the demo model"))
        browse, verify = QPushButton(t("Open folder...")), QPushButton(t("Verify"))
        browse.clicked.connect(self._browse)
        verify.clicked.connect(self._verify)
        bundle_row = QHBoxLayout()
        for widget in (self.bundle, browse, verify):
            bundle_row.addWidget(widget)
        self.manifest = QPlainTextEdit(readOnly=True)
        self.manifest.setMaximumHeight(120)
        self.data_dir = QLineEdit(s.data_dir, placeholderText=str(app.data_dir))
        open_lists, reload_lists = QPushButton(t("Open the folder")), QPushButton(t("Reload"))
        open_lists.clicked.connect(self._open_lists)
        reload_lists.clicked.connect(self._reload_lists)
        lists_row = QHBoxLayout()
        lists_row.addWidget(open_lists)
        lists_row.addWidget(reload_lists)
        self.language = QComboBox()
        for code, name in (("auto", t("Follow the system")), ("zh_CN", "简体中文"), ("en", "English")):
            self.language.addItem(name, code)
        self.language.setCurrentIndex(max(0, self.language.findData(s.language)))
        self.font_size = QSpinBox(minimum=6, maximum=48, value=s.font_size)

        form = QFormLayout()
        form.addRow(QLabel(f"<b>{t('Generation')}</b>"))
        form.addRow(t("Temperature"), self.temperature)
        form.addRow(t("Top-p"), self.top_p)
        form.addRow(t("Top-k"), self.top_k)
        form.addRow(t("Repetition penalty"), self.repetition_penalty)
        form.addRow(t("Max new tokens"), self.max_new_tokens)
        form.addRow(t("Context budget"), self.context_budget)
        form.addRow(t("Model bundle"), bundle_row)
        form.addRow("", self.manifest)
        form.addRow(t("Data folder"), self.data_dir)
        form.addRow(t("Safety lists"), lists_row)
        form.addRow(t("Language"), self.language)
        form.addRow(t("Font size"), self.font_size)
        buttons = QDialogButtonBox(QDialogButtonBox.Save | QDialogButtonBox.Cancel)
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(buttons)
        self._show_manifest(s.model_bundle or model_summary.get("path", ""))

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
            bundle = Bundle.open(folder, full_check=False)
            summary = {k: bundle.manifest.get(k) for k in ("name", "target", "quant", "max_context", "created_by")}
            self.manifest.setPlainText(json.dumps(summary, ensure_ascii=False, indent=1))
        except StreamChatError as exc:
            self.manifest.setPlainText(str(exc))

    def _verify(self) -> None:
        folder = self.bundle.text().strip()
        try:
            Bundle.open(folder, full_check=True)
            self.manifest.setPlainText(f"OK: {folder}\n" + self.manifest.toPlainText())
        except StreamChatError as exc:
            self.manifest.setPlainText(str(exc))

    def _open_lists(self) -> None:
        folder = self.app.config_dir / "safety"
        folder.mkdir(parents=True, exist_ok=True)
        QDesktopServices.openUrl(QUrl.fromLocalFile(str(folder)))

    def _reload_lists(self) -> None:
        self.app.reload_rules()

    def accept(self) -> None:
        s = self.app.settings
        g = s.generation
        g.temperature, g.top_p, g.top_k = self.temperature.value(), self.top_p.value(), self.top_k.value()
        g.repetition_penalty, g.max_new_tokens = self.repetition_penalty.value(), self.max_new_tokens.value()
        s.context_budget = self.context_budget.value()
        self.model_changed = self.bundle.text().strip() != s.model_bundle
        s.model_bundle = self.bundle.text().strip()
        s.data_dir = self.data_dir.text().strip()
        s.language, s.font_size = self.language.currentData(), self.font_size.value()
        save_settings(s, self.app.config_dir / "settings.json")
        super().accept()
