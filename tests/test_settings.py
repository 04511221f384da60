import json

import pytest

from appliance.folders import config_dir, data_dir
from appliance.settings import Settings, SettingsError, load_settings, save_settings


def test_defaults_when_missing_and_round_trip(tmp_path):
    path = tmp_path / "settings.json"
    assert load_settings(path) == Settings()
    settings = Settings()
    settings.generation.temperature = 0.5
    settings.kiosk.enabled = True
    save_settings(settings, path)
    assert load_settings(path) == settings
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("raw, key", [
    ({"generation": {"temperature": "hot"}}, "generation.temperature must be float"),
    ({"generation": {"top_p": 2}}, "generation.top_p must be between"),
    ({"safety": {"mode": "shout"}}, "safety.mode must be one of"),
    ({"kiosk": {"enabled": 1}}, "kiosk.enabled must be bool"),
    ({"colour": "blue"}, "unknown setting colour"),
    ({"kiosk": {"pin": "1"}}, "unknown setting kiosk.pin"),
])
def test_bad_values_name_the_key(tmp_path, raw, key):
    path = tmp_path / "settings.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(SettingsError, match=key.replace(".", r"\.")):
        load_settings(path)


def test_unreadable_file(tmp_path):
    path = tmp_path / "settings.json"
    path.write_text("{nope")
    with pytest.raises(SettingsError, match="cannot be read as JSON"):
        load_settings(path)


def test_integers_accepted_for_floats(tmp_path):
    path = tmp_path / "settings.json"
    path.write_text(json.dumps({"generation": {"temperature": 1}}))
    assert load_settings(path).generation.temperature == 1.0


def test_folders(monkeypatch, tmp_path):
    for var in ("STREAMCHAT_CONFIG_DIR", "STREAMCHAT_DATA_DIR", "STREAMCHAT_PORTABLE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("STREAMCHAT_PORTABLE", str(tmp_path / "stick"))
    assert config_dir() == tmp_path / "stick" / "config" and data_dir() == tmp_path / "stick" / "data"
    moved = Settings(data_dir=str(tmp_path / "moved"))
    assert data_dir(moved) == tmp_path / "moved"
    monkeypatch.setenv("STREAMCHAT_DATA_DIR", str(tmp_path / "env"))
    assert data_dir(moved) == tmp_path / "env"
    monkeypatch.delenv("STREAMCHAT_PORTABLE")
    monkeypatch.delenv("STREAMCHAT_DATA_DIR")
    assert "streamchat" in str(data_dir()) and "streamchat" in str(config_dir())
