"""Settings: one schema, from which the settings file, the settings dialog and the command-line flags are derived.

Each ``Setting`` is described once: its place in settings.json (``section.name``, or a top-level ``name``), its default
(whose type is the setting's type), the values it may take (an inclusive range or a list of choices), the label the
window shows (a translation key; a setting without one is edited in the file only) and a help text (the dialog's
tooltip, the command line's help). The classes that hold the values (``Settings``, ``GenerationSettings``, ...) are
built from the schema, and so is ``appliance.generation.GenerationConfig``: a new setting is one entry in ``SCHEMA``.
Every setting of the ``generation`` section is also a flag of ``streamchat generate`` and ``chat``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

from appliance.errors import StreamChatError
from appliance.folders import config_dir

SETTINGS_FILE = "settings.json"


class SettingsError(StreamChatError):
    """settings.json is unreadable, cannot be written, or has a bad value; the message names the key."""


@dataclass(frozen=True)
class Setting:
    """One setting, described once (see the module docstring)."""

    key: str  # "section.name", or "name" at the top level of settings.json
    default: bool | int | float | str  # its type is the setting's type
    help: str
    label: str = ""  # the label in the window's dialogs (a translation key); "" = edited in settings.json only
    limits: tuple[float, float] | None = None  # inclusive, for numbers
    choices: tuple[str, ...] = ()
    choice_labels: tuple[str, ...] = ()  # the dialog's names of the choices (translation keys)
    step: float = 1  # the dialog's arrow step
    lines: int = 1  # text settings: the dialog's editor height in lines (more than 1: a multi-line editor)

    @property
    def section(self) -> str:
        return self.key.rpartition(".")[0]

    @property
    def name(self) -> str:
        return self.key.rpartition(".")[2]

    @property
    def type(self) -> type:
        return type(self.default)

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def decimals(self) -> int:
        """Decimals a float needs to show its lower limit and its step exactly (at least 2)."""
        places = [-Decimal(repr(x)).normalize().as_tuple().exponent for x in (*(self.limits or ()), self.step)]
        return max(2, *places)

    def allowed(self) -> str:
        """The allowed values in words, as error messages and the documentation say them."""
        if self.choices:
            return "one of " + ", ".join(self.choices)
        if self.limits:
            return f"between {self.limits[0]:g} and {self.limits[1]:g}"
        return "true or false" if self.type is bool else "any text"

    def check(self, value: Any, where: str) -> Any:
        """``value`` in the setting's type (an int is taken for a float), or a SettingsError naming ``where``."""
        expected = self.type
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, expected) or (expected is not bool and isinstance(value, bool)):
            raise SettingsError(f"{where} must be {expected.__name__}, got {value!r}")
        if (self.choices and value not in self.choices) or (self.limits and not self.limits[0] <= value <= self.limits[1]):
            raise SettingsError(f"{where} must be {self.allowed()}, got {value!r}")
        return value


SCHEMA: tuple[Setting, ...] = (
    Setting("generation.temperature", 0.95, "sampling temperature: lower is more focused, higher more varied",
            "Temperature", (0.001, 10), step=0.05),
    Setting("generation.top_p", 0.7, "sample from the most likely tokens that together pass this probability",
            "Top-p", (0.001, 1), step=0.05),
    Setting("generation.top_k", 50, "sample from at most this many most likely tokens (0: no limit)", "Top-k",
            (0, 100000)),
    Setting("generation.repetition_penalty", 1.2, "scores of tokens already in the prompt or answer are divided by "
            "this (1: off)", "Repetition penalty", (0.5, 5), step=0.05),
    Setting("generation.max_new_tokens", 512, "longest answer, in tokens", "Max new tokens", (1, 8192)),
    Setting("context_budget", 2048, "tokens of prompt and answer; the oldest turns are left out to fit",
            "Context budget", (64, 32768)),
    Setting("system_prompt", "", "instructions the model gets before every conversation (ChatGLM-6B has no system "
            "role: they are the conversation's first round, see appliance/prompt.py; empty: none)", "System prompt",
            lines=4),
    Setting("model_bundle", "", "bundle folder (empty: the built-in demo model)", "Model bundle"),
    Setting("engine", "auto", "runtime the bundle is opened on (auto: the one its target names; the engines are "
            "appliance.engines.ENGINES)", "Engine"),
    Setting("device", "cpu", "where an engine with a device choice runs (MindSpore, MindSpore Lite): the CPU or an "
            "Ascend NPU", "Device", choices=("cpu", "ascend"), choice_labels=("CPU", "Ascend NPU")),
    Setting("device_id", 0, "the Ascend NPU to run on, when the device is ascend", "NPU number", (0, 63)),
    Setting("data_dir", "", "folder of the history and the audit log (empty: the default data folder)", "Data folder"),
    Setting("threads", 0, "CPU threads (0: the physical cores)", limits=(0, 1024)),
    Setting("safety.mode", "mask", "a listed word in an answer is masked (mask) or ends the answer (stop); off turns the "
            "safety filter off", choices=("mask", "stop", "off")),
    Setting("safety.log_matched_text", False, "the audit log also stores the matched text"),
    # the kiosk section: the operator's Kiosk settings dialog (behind the PIN), not the Settings dialog
    Setting("kiosk.enabled", False, "start in kiosk mode (full screen, unattended)", "Start in kiosk mode"),
    Setting("kiosk.idle_timeout_s", 180, "seconds without input before the kiosk starts over", "Idle timeout (s)",
            (5, 86400)),
    Setting("kiosk.keep_history", False, "the kiosk keeps a conversation when it starts over (otherwise it is deleted)",
            "Keep visitors' conversations"),
    Setting("kiosk.exit_pin", "", "PIN that lets an operator leave the kiosk and change its settings (empty: no exit)",
            "Operator PIN"),
    Setting("kiosk.font_scale", 1.6, "kiosk font size, times font_size", "Font scale", (0.5, 4), step=0.1),
    Setting("kiosk.welcome_text", "", "text the kiosk shows above each visitor's conversation (empty: none)",
            "Welcome text", lines=3),
    Setting("language", "auto", "language of the window (auto: the system's)", "Language", choices=("auto", "zh_CN", "en"),
            choice_labels=("Follow the system", "简体中文", "English")),
    Setting("font_size", 11, "font size of the window, in points", "Font size", (6, 48)),
    Setting("theme", "system", "light or dark window (system: as the desktop is set, following its changes)", "Theme",
            choices=("system", "light", "dark"), choice_labels=("Follow the system", "Light", "Dark")),
)
BY_KEY = {s.key: s for s in SCHEMA}


def section(name: str) -> tuple[Setting, ...]:
    """The settings of one section of settings.json ("" = the top level), in schema order."""
    return tuple(s for s in SCHEMA if s.section == name)


def section_class(name: str, frozen: bool = False) -> type:
    """A dataclass with one field per setting of section ``name``, defaulting to the schema's defaults."""
    fields = [(s.name, s.type, field(default=s.default)) for s in section(name)]
    return dataclasses.make_dataclass(f"{name.title()}Settings", fields, frozen=frozen,
                                      namespace={"__module__": __name__})


_SECTIONS = {name: section_class(name) for name in dict.fromkeys(s.section for s in SCHEMA if s.section)}
GenerationSettings = _SECTIONS["generation"]


def _settings_fields() -> list[tuple[str, type, Any]]:
    """Settings' fields in the order of settings.json: a section where its first setting is."""
    fields, placed = [], set()
    for s in SCHEMA:
        if not s.section:
            fields.append((s.name, s.type, field(default=s.default)))
        elif s.section not in placed:
            placed.add(s.section)
            fields.append((s.section, _SECTIONS[s.section], field(default_factory=_SECTIONS[s.section])))
    return fields


Settings = dataclasses.make_dataclass("Settings", _settings_fields(), namespace={"__module__": __name__})
Settings.__doc__ = "Every setting, grouped as in settings.json (``settings.generation.temperature``); see SCHEMA."


def _holder(settings: Settings, key: str) -> Any:
    """The object holding setting ``key``: its section's, or ``settings`` itself for a top-level one."""
    return getattr(settings, BY_KEY[key].section) if BY_KEY[key].section else settings


def value_of(settings: Settings, key: str) -> Any:
    return getattr(_holder(settings, key), BY_KEY[key].name)


def with_values(settings: Settings, values: dict[str, Any]) -> Settings:
    """A copy of ``settings`` with the given values (keys as in SCHEMA, values already checked)."""
    new = copy.deepcopy(settings)
    for key, value in values.items():
        setattr(_holder(new, key), BY_KEY[key].name, value)
    return new


def settings_from_dict(raw: Any, source: str) -> Settings:
    """Settings from the JSON object of a settings file: every key known, every value checked against SCHEMA."""
    if not isinstance(raw, dict):
        raise SettingsError(f"{source}: the file must be a JSON object")
    values = {}
    for name, value in raw.items():
        group = name if name in _SECTIONS else ""
        if group and not isinstance(value, dict):
            raise SettingsError(f"{source}: {group} must be a JSON object")
        for sub, item in value.items() if group else [(name, value)]:
            key = f"{group}.{sub}" if group else sub
            if key not in BY_KEY or BY_KEY[key].section != group:
                known = [s.name for s in section(group)] if group else [*_SECTIONS, *(s.name for s in section(""))]
                raise SettingsError(f"{source}: unknown setting {key} (known: {', '.join(sorted(known))})")
            values[key] = BY_KEY[key].check(item, f"{source}: {key}")
    return with_values(Settings(), values)


def load_settings(path: Path | None = None) -> Settings:
    """Settings from ``path`` (default: config_dir()/settings.json); defaults when the file does not exist."""
    path = path or config_dir() / SETTINGS_FILE
    if not path.exists():
        return Settings()
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SettingsError(f"{path} cannot be read as JSON ({exc}); fix or delete it to use the defaults") from exc
    return settings_from_dict(raw, str(path))


def save_settings(settings: Settings, path: Path | None = None) -> Path:
    """Write atomically (temp file + rename), so a crash never leaves half a settings file."""
    path = path or config_dir() / SETTINGS_FILE
    tmp = path.with_suffix(".json.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(dataclasses.asdict(settings), indent=2, ensure_ascii=False), encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise SettingsError(f"cannot save the settings to {path}: {exc.strerror or exc}; the settings file was left "
                            "as it was") from exc
    return path
