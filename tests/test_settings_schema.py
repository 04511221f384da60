"""One settings schema: the settings file, the settings dialog, the command-line flags, GenerationConfig and the docs
all follow appliance.settings.SCHEMA; every value the file accepts survives the dialog's Save."""

import json
import os
from pathlib import Path

import pytest

from appliance.generation import GenerationConfig
from appliance.settings import SCHEMA, SettingsError, load_settings, save_settings, section, settings_from_dict, value_of
from streamchat.cli import build_parser, main
from tests.conftest import TINY

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
DOCS = Path(__file__).resolve().parent.parent / "docs" / "history-and-safety.md"


def _raw(key, value) -> dict:
    group, _, name = key.rpartition(".")
    return {group: {name: value}} if group else {name: value}


def _accepted(setting) -> list:
    """Values of ``setting`` at the edges of what the schema allows."""
    if setting.choices:
        return list(setting.choices)
    if setting.limits:
        return [setting.type(limit) for limit in setting.limits]
    return [not setting.default] if setting.type is bool else ["some text ü 文字"]


def _beyond(setting) -> list:
    if setting.choices:
        return ["not-a-choice"]
    if setting.limits:
        step = 1 if setting.type is int else 1e-9
        return [setting.limits[0] - step, setting.limits[1] + step]
    return []


@pytest.mark.parametrize("setting", SCHEMA, ids=lambda s: s.key)
def test_the_file_takes_the_schemas_edges_and_refuses_what_lies_beyond(setting):
    for value in _accepted(setting):
        assert value_of(settings_from_dict(_raw(setting.key, value), "f"), setting.key) == value
    for value in _beyond(setting):
        with pytest.raises(SettingsError, match=f"f: {setting.key} must be {setting.allowed()}, got"):
            settings_from_dict(_raw(setting.key, value), "f")
    wrong = 1 if setting.type is bool else [1]
    with pytest.raises(SettingsError, match=f"{setting.key} must be {setting.type.__name__}"):
        settings_from_dict(_raw(setting.key, wrong), "f")


def test_generation_config_defaults_are_the_schemas():
    config = GenerationConfig()
    assert {s.name: getattr(config, s.name) for s in section("generation")} == \
        {s.name: s.default for s in section("generation")}
    assert (config.temperature, config.top_p, config.top_k, config.repetition_penalty, config.max_new_tokens) == \
        (0.95, 0.7, 50, 1.2, 512)


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_every_generation_setting_is_a_flag_that_defaults_to_the_saved_value(command):
    parser = build_parser()
    base = [command, "--checkpoint", "x"] + (["--prompt", "p"] if command == "generate" else [])
    for setting in section("generation"):
        assert getattr(parser.parse_args(base), setting.name) is None  # not given: the saved setting applies
        high = setting.limits[1]
        parsed = getattr(parser.parse_args([*base, setting.flag, str(high)]), setting.name)
        assert parsed == high and type(parsed) is setting.type


@pytest.mark.parametrize("setting", section("generation"), ids=lambda s: s.key)
def test_a_generation_flag_beyond_the_schema_is_refused_before_the_model_loads(capsys, tmp_path, monkeypatch, setting):
    monkeypatch.setenv("STREAMCHAT_CONFIG_DIR", str(tmp_path))
    too_high = setting.limits[1] + (1 if setting.type is int else 0.5)
    assert main(["generate", "--checkpoint", str(TINY), "--prompt", "x", setting.flag, str(too_high)]) == 2
    assert capsys.readouterr().err == (f"error: {setting.flag} (setting {setting.key}) must be {setting.allowed()}, "
                                       f"got {too_high!r}\n")


def test_the_docs_table_lists_every_setting_as_the_schema_says():
    rows = DOCS.read_text(encoding="utf-8").splitlines()
    for s in SCHEMA:
        assert f"| `{s.key}` | `{json.dumps(s.default, ensure_ascii=False)}` | {s.allowed()} | {s.help} |" in rows, s.key


# -- the settings dialog -------------------------------------------------------------------------------------------
def _edges(which: int) -> dict:
    """settings.json with every setting at one edge of what the schema allows (0: low or first, 1: high or last)."""
    raw: dict = {}
    for setting in SCHEMA:
        values = _accepted(setting)
        group, _, name = setting.key.rpartition(".")
        (raw.setdefault(group, {}) if group else raw)[name] = values[min(which, len(values) - 1)]
    return raw


@pytest.fixture
def dialog_for(qtbot, tmp_path, monkeypatch):
    pytest.importorskip("pytestqt")
    from appliance.app import AppContext
    from ui.settings_dialog import SettingsDialog

    monkeypatch.setenv("STREAMCHAT_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("STREAMCHAT_DATA_DIR", str(tmp_path / "data"))

    def open_with(raw: dict):
        save_settings(settings_from_dict(raw, "test"), tmp_path / "config" / "settings.json")
        dialog = SettingsDialog(AppContext.load(), {})
        qtbot.addWidget(dialog)
        return dialog

    return open_with


def _save(qtbot, dialog):
    """Press Save, as the user does; the settings file as it is then."""
    from PySide6.QtCore import Qt
    from PySide6.QtWidgets import QDialogButtonBox

    qtbot.mouseClick(dialog.findChild(QDialogButtonBox).button(QDialogButtonBox.Save), Qt.LeftButton)
    return load_settings()


@pytest.mark.parametrize("which", [0, 1], ids=["low", "high"])
def test_the_dialog_saves_every_value_the_file_accepts(qtbot, dialog_for, which):
    raw = _edges(which)
    dialog = dialog_for(raw)
    assert _save(qtbot, dialog) == settings_from_dict(raw, "test")
    assert dialog.result() == dialog.DialogCode.Accepted


def test_the_dialogs_widgets_have_the_schemas_limits_and_choices(dialog_for):
    dialog = dialog_for({})
    for setting in (s for s in SCHEMA if s.label and s.section != "kiosk"):  # the kiosk's: ui.kiosk_settings
        widget = dialog.editors[setting.key]
        if setting.limits:
            assert (widget.minimum(), widget.maximum()) == setting.limits, setting.key
        if setting.choices:
            assert [widget.itemData(i) for i in range(widget.count())] == list(setting.choices)


def test_an_edited_value_is_saved_as_typed_and_an_untouched_one_exactly(qtbot, dialog_for):
    dialog = dialog_for({"generation": {"temperature": 0.123456, "top_p": 0.5}})
    dialog.editors["generation.top_p"].setValue(0.95)
    dialog.editors["font_size"].setValue(48)
    saved = _save(qtbot, dialog)
    assert saved.generation.temperature == 0.123456  # shown rounded to 0.123, saved as it was
    assert (saved.generation.top_p, saved.font_size) == (0.95, 48)


def test_a_saved_temperature_of_5_survives_the_dialog(qtbot, dialog_for):
    dialog = dialog_for({"generation": {"temperature": 5}})
    dialog.editors["generation.top_k"].setValue(7)
    saved = _save(qtbot, dialog)
    assert (saved.generation.temperature, saved.generation.top_k) == (5.0, 7)
