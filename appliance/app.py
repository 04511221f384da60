"""Everything a front end needs besides the model, resolved from settings: folders, history, safety rules, audit; and
the chat session that the terminal chat, ``streamchat generate`` and the window all answer through."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from appliance.engines import Engine
from appliance.folders import config_dir, data_dir
from appliance.history import History
from appliance.safety import DEFAULT_LIST, AuditLog, RuleSet
from appliance.session import ChatSession
from appliance.settings import SETTINGS_FILE, Settings, load_settings, save_settings
from appliance.tokenizer import ChatGLMTokenizer


def safety_lists(settings_dir: Path) -> list[Path]:
    """The bundled default list, then the operator's ``<config>/safety/*.txt`` in name order."""
    return [DEFAULT_LIST, *sorted((settings_dir / "safety").glob("*.txt"))]


@dataclass
class AppContext:
    settings: Settings
    config_dir: Path
    data_dir: Path
    history: History | None  # None: loaded without one (``streamchat generate`` stores nothing)
    rules: RuleSet
    audit: AuditLog

    @classmethod
    def load(cls, with_history: bool = True) -> AppContext:
        settings = load_settings()
        cfg, data = config_dir(), data_dir(settings)
        return cls(settings=settings, config_dir=cfg, data_dir=data, history=History(data) if with_history else None,
                   rules=RuleSet.load(safety_lists(cfg)),
                   audit=AuditLog(data / "audit.jsonl", log_text=settings.safety.log_matched_text))

    def session(self, engine: Engine, tokenizer: ChatGLMTokenizer, model_id: str = "",
                settings: Settings | None = None) -> ChatSession:
        """A session on this context's settings (or ``settings``), safety rules, audit log and history."""
        return ChatSession(engine, tokenizer, settings or self.settings, self.history, self.rules, self.audit, model_id)

    def reload_rules(self) -> RuleSet:
        """Read the safety lists again into a new RuleSet (sessions keep theirs until ``ChatSession.update``)."""
        self.rules = RuleSet.load(safety_lists(self.config_dir))
        return self.rules

    def apply_settings(self, settings: Settings) -> bool:
        """Save ``settings`` and make them this context's (a new object: nothing another thread reads is changed in
        place). When they move the data folder, the history opens there first, so a folder that cannot be used is refused
        (HistoryError) before anything is saved; the audit log follows. True when the data folder moved: sessions on the old
        history must then be replaced (``ChatSession.update`` carries the rest)."""
        data = data_dir(settings)
        history = History(data) if data != self.data_dir and self.history is not None else self.history
        save_settings(settings, self.config_dir / SETTINGS_FILE)
        moved, self.settings, self.data_dir, self.history = data != self.data_dir, settings, data, history
        self.audit = AuditLog(data / "audit.jsonl", log_text=settings.safety.log_matched_text)
        return moved
