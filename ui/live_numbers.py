"""The Live numbers panel (View menu): the monitoring table's indicators for this window's own answers in this run,
beside the chat, with each value over its alert threshold highlighted.

The numbers come from ``appliance.live_numbers``: the worker measures each answer in its thread and the window adds it
to its ``RunNumbers`` (kept while the panel is closed, so opening it shows the whole run). The panel redraws the
answer rows when an answer ends and samples the process (memory, CPU) once a second with a timer of its own, which also
runs while an answer streams: the worker computes, the GUI thread only reads two counters. A dock widget of the
window, deleted when closed (its timer with it): closing it leaves no window behind.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from PySide6.QtCore import Qt, QTimer
from PySide6.QtWidgets import QDockWidget, QGridLayout, QLabel, QWidget

from appliance.live_numbers import STALL_S, THRESHOLDS, AnswerNumbers, ProcessMeter, RunNumbers
from ui.messages import t

if TYPE_CHECKING:
    from ui.main_window import MainWindow

REFRESH_MS = 1000
ALERT_STYLE = 'QLabel[alert="true"] { color: #e5484d; font-weight: bold; }'  # readable on both themes
NONE = "—"


def _seconds(value: float) -> str:
    return t("{0:.2f} s").format(value)


def _percent(value: float) -> str:
    return f"{value * 100:.1f}%"


def _limit_percent(value: float) -> str:
    return f"{value * 100:g}%"


LIMITS: dict[str, Callable[[float], str]] = {  # how each threshold of ``THRESHOLDS`` reads in the panel
    "ttft_s": lambda v: t("{0:g} s").format(v),
    "pause_s": lambda v: t("{0:g} ms").format(v * 1000),
    "stall_share": lambda v: t("{0} of pauses").format(_limit_percent(v)),
    "repetition": _limit_percent,
    "on_topic": _limit_percent,
    "error_rate": lambda v: t("{0} of answers").format(_limit_percent(v)),
    "cpu": _limit_percent,
    "memory": _limit_percent,
}


def alert_text(threshold: str) -> str:
    """``> 1 s``, ``< 70%``: when the indicator alerts."""
    limit = THRESHOLDS[threshold]
    return f"{'>' if limit.above else '<'} {LIMITS[threshold](limit.limit)}"


class LiveNumbersPanel(QDockWidget):
    """Three sections (last answer, this run, this process), a row per indicator: name, value, alert threshold."""

    def __init__(self, window: MainWindow) -> None:
        super().__init__(t("Live numbers"), window)
        self.setObjectName("liveNumbers")
        self.setAttribute(Qt.WA_DeleteOnClose)
        self.run: RunNumbers = window.run_numbers
        self.meter = ProcessMeter()
        self.values: dict[str, QLabel] = {}  # by row key; each holds its value and the ``alert`` property
        sections = {  # row key, indicator, the threshold it alerts on (a key of THRESHOLDS)
            t("Last answer"): [("ttft", t("Time to first token"), "ttft_s"), ("tokens", t("Tokens"), None),
                               ("speed", t("Tokens/s"), None),
                               ("pause", t("Longest pause between tokens"), "pause_s"),
                               ("repetition", t("Repetition rate"), "repetition"),
                               ("topic", t("Topic similarity"), None)],
            t("This run"): [("answers", t("Answers"), None), ("ttft_p50", t("Time to first token, P50"), None),
                            ("ttft_p99", t("Time to first token, P99"), "ttft_s"),
                            ("stalls", t("Stalls (pauses over {0:g} ms)").format(STALL_S * 1000), "stall_share"),
                            ("on_topic", t("On-topic answers"), "on_topic"),
                            ("safety", t("Safety-filter hits"), None), ("errors", t("Errors"), "error_rate")],
            t("This process"): [("memory", t("Memory (resident)"), "memory"), ("cpu", t("CPU"), "cpu")],
        }
        body = QWidget()
        grid = QGridLayout(body)
        grid.setColumnStretch(1, 1)
        grid.setHorizontalSpacing(12)
        grid.addWidget(QLabel(t("Alert when")), 0, 2)
        row = 0
        for title, rows in sections.items():
            grid.addWidget(QLabel(f"<b>{title}</b>"), row, 0, 1, 2)
            row += 1
            for key, name, threshold in rows:
                value = QLabel(NONE)
                value.setAlignment(Qt.AlignRight | Qt.AlignVCenter)
                value.setTextInteractionFlags(Qt.TextSelectableByMouse)
                grid.addWidget(QLabel(name), row, 0)
                grid.addWidget(value, row, 1)
                grid.addWidget(QLabel(alert_text(threshold) if threshold else ""), row, 2)
                self.values[key] = value
                row += 1
        grid.setRowStretch(row, 1)
        body.setStyleSheet(ALERT_STYLE)
        self.setWidget(body)
        self.timer = QTimer(self)
        self.timer.setInterval(REFRESH_MS)
        self.timer.timeout.connect(self.show_process)
        self.timer.start()
        window.answer_measured.connect(self.show_answers)
        self.show_answers()
        self.show_process()

    def _show(self, key: str, text: str, alert: bool = False) -> None:
        label = self.values[key]
        label.setText(text)
        if label.property("alert") != alert:  # the style sheet's ``alert`` rule applies once re-polished
            label.setProperty("alert", alert)
            label.style().unpolish(label)
            label.style().polish(label)

    def _set(self, key: str, value: float | None, text: Callable[[float], str] = str,
             threshold: str | None = None) -> None:
        """Row ``key`` shows ``value`` (— when None), highlighted when it breaches ``threshold``."""
        self._show(key, NONE if value is None else text(value),
                   threshold is not None and THRESHOLDS[threshold].breached(value))

    def show_answers(self, _latest: AnswerNumbers | None = None) -> None:
        """The last answer's numbers and the run's (connected to the window's ``answer_measured``)."""
        run, last = self.run, self.run.last
        self._set("ttft", last and last.ttft_s, _seconds, "ttft_s")
        self._set("tokens", last and last.tokens)
        self._set("speed", last and last.tokens_per_s, lambda v: f"{v:.1f}")
        self._set("pause", last and last.longest_pause_s, lambda v: t("{0:.0f} ms").format(v * 1000), "pause_s")
        self._set("repetition", last and last.repetition, _percent, "repetition")
        self._set("topic", last and last.topic, lambda v: f"{v:.2f}")
        self._set("answers", run.answers)
        self._set("ttft_p50", run.ttft(0.5), _seconds)
        self._set("ttft_p99", run.ttft(0.99), _seconds, "ttft_s")
        self._set("stalls", run.stall_share, lambda _: t("{0} of {1} pauses").format(run.stalls, run.pauses),
                  "stall_share")
        self._set("on_topic", run.on_topic_share, lambda v: f"{v * 100:.0f}% ({run.on_topic}/{run.scored})",
                  "on_topic")
        self._set("safety", run.safety_hits)
        self._set("errors", run.error_rate, lambda _: str(run.errors), "error_rate")

    def show_process(self) -> None:
        """Resident memory and CPU use of this process (the first CPU share comes one interval after opening)."""
        usage = self.meter.sample()
        memory = NONE
        if usage.rss_bytes is not None:
            memory = t("{0:.0f} MiB").format(usage.rss_bytes / (1 << 20))
            if usage.memory_share is not None:
                memory += f" ({_percent(usage.memory_share)})"
        self._show("memory", memory, THRESHOLDS["memory"].breached(usage.memory_share))
        self._set("cpu", usage.cpu_share, _percent, "cpu")


def toggle_live_numbers(window: MainWindow) -> LiveNumbersPanel | None:
    """Open the panel at the window's right edge, or close it when it is open; the open panel, or None."""
    panel = window.findChild(LiveNumbersPanel)
    if panel is not None:
        panel.close()
        return None
    panel = LiveNumbersPanel(window)
    window.addDockWidget(Qt.RightDockWidgetArea, panel)
    panel.show()
    return panel
