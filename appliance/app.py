"""Everything a front end needs besides the model, resolved from settings: folders, history, safety rules, audit."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from appliance.folders import config_dir, data_dir
from appliance.history import History
from appliance.safety import DEFAULT_LIST, AuditLog, RuleSet
from appliance.settings import Settings, load_settings


def safety_lists(settings_dir: Path) -> list[Path]:
    """The bundled default list, then the operator's ``<config>/safety/*.txt`` in name order."""
    return [DEFAULT_LIST, *sorted((settings_dir / "safety").glob("*.txt"))]


@dataclass
class AppContext:
    settings: Settings
    config_dir: Path
    data_dir: Path
    history: History
    rules: RuleSet
    audit: AuditLog

    @classmethod
    def load(cls) -> AppContext:
        settings = load_settings()
        cfg, data = config_dir(), data_dir(settings)
        return cls(settings=settings, config_dir=cfg, data_dir=data, history=History(data),
                   rules=RuleSet.load(safety_lists(cfg)),
                   audit=AuditLog(data / "audit.jsonl", log_text=settings.safety.log_matched_text))

    def reload_rules(self) -> None:
        self.rules = RuleSet.load(safety_lists(self.config_dir))
