"""Typed, validated settings in one JSON file (in ``appliance.folders.config_dir()``)."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.errors import StreamChatError
from appliance.folders import config_dir
from appliance.generation import GenerationConfig

SETTINGS_FILE = "settings.json"


class SettingsError(StreamChatError):
    """settings.json is unreadable or has a bad value; the message names the key."""


@dataclass
class GenerationSettings:
    temperature: float = 0.95
    top_p: float = 0.7
    top_k: int = 50
    repetition_penalty: float = 1.2
    max_new_tokens: int = 512

    def config(self, greedy: bool = False, seed: int | None = None) -> GenerationConfig:
        return GenerationConfig(max_new_tokens=self.max_new_tokens, greedy=greedy, temperature=self.temperature,
                                top_p=self.top_p, top_k=self.top_k, repetition_penalty=self.repetition_penalty, seed=seed)


@dataclass
class SafetySettings:
    mode: str = "mask"  # mask | stop | off
    log_matched_text: bool = False  # audit records store the matched text only when the operator enables this


@dataclass
class KioskSettings:
    enabled: bool = False
    idle_timeout_s: int = 180
    keep_history: bool = False
    exit_pin: str = ""
    font_scale: float = 1.6


@dataclass
class Settings:
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    context_budget: int = 2048
    model_bundle: str = ""  # empty: the built-in demo model
    data_dir: str = ""  # empty: the default data folder
    threads: int = 0  # 0: physical cores
    safety: SafetySettings = field(default_factory=SafetySettings)
    kiosk: KioskSettings = field(default_factory=KioskSettings)
    language: str = "auto"  # auto | zh_CN | en
    font_size: int = 11

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_CHOICES = {"safety.mode": ("mask", "stop", "off"), "language": ("auto", "zh_CN", "en")}
_RANGES = {"generation.temperature": (1e-3, 10), "generation.top_p": (1e-3, 1), "generation.top_k": (0, 100000),
           "generation.repetition_penalty": (0.5, 5), "generation.max_new_tokens": (1, 8192),
           "context_budget": (64, 32768), "threads": (0, 1024), "kiosk.idle_timeout_s": (5, 86400),
           "kiosk.font_scale": (0.5, 4), "font_size": (6, 48)}


def _build(cls, raw: Any, prefix: str, source: str):
    if not isinstance(raw, dict):
        raise SettingsError(f"{source}: {prefix.rstrip('.') or 'the file'} must be a JSON object")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise SettingsError(f"{source}: unknown setting {prefix}{unknown[0]} (known: {', '.join(sorted(known))})")
    values = {}
    for name, value in raw.items():
        key, default = prefix + name, getattr(cls(), name)
        if dataclasses.is_dataclass(default):
            values[name] = _build(type(default), value, key + ".", source)
            continue
        expected = type(default)
        ok = isinstance(value, expected) and not (expected is not bool and isinstance(value, bool))
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            raise SettingsError(f"{source}: {key} must be {expected.__name__}, got {value!r}")
        if key in _CHOICES and value not in _CHOICES[key]:
            raise SettingsError(f"{source}: {key} must be one of {', '.join(_CHOICES[key])}, got {value!r}")
        if key in _RANGES and not _RANGES[key][0] <= value <= _RANGES[key][1]:
            raise SettingsError(f"{source}: {key} must be between {_RANGES[key][0]} and {_RANGES[key][1]}, got {value!r}")
        values[name] = value
    return cls(**values)


def load_settings(path: Path | None = None) -> Settings:
    """Settings from ``path`` (default: config_dir()/settings.json); defaults when the file does not exist."""
    path = path or config_dir() / SETTINGS_FILE
    if not path.exists():
        return Settings()
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SettingsError(f"{path} cannot be read as JSON ({exc}); fix or delete it to use the defaults") from exc
    return _build(Settings, raw, "", str(path))


def save_settings(settings: Settings, path: Path | None = None) -> Path:
    """Write atomically (temp file + rename), so a crash never leaves half a settings file."""
    path = path or config_dir() / SETTINGS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(settings.to_dict(), indent=2, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)
    return path
