"""The window's Live numbers panel (issue 19, item 6) on the real demo model, offscreen: the values it shows are the
ones the session recorded, a value over its alert threshold is highlighted, the process numbers update while an answer
streams, and closing the panel leaves no window behind."""

import json
import os
import re
import time
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import pytest  # noqa: E402

pytest.importorskip("PySide6")
pytest.importorskip("pytestqt")

from PySide6.QtCore import QCoreApplication, QEvent, Qt  # noqa: E402
from PySide6.QtWidgets import QApplication  # noqa: E402

from appliance.answer_quality import repetition_rate, topic_similarity  # noqa: E402
from appliance.app import AppContext  # noqa: E402
from appliance.live_numbers import ProcessMeter  # noqa: E402
from appliance.loading import DEMO_CHECKPOINT, LoadedModel  # noqa: E402
from model_export.export import export_bundle  # noqa: E402
from tests.ui_helpers import PacedEngine, ask, open_window, stop_worker  # noqa: E402
from ui.app import model_loader  # noqa: E402
from ui.live_numbers import LiveNumbersPanel  # noqa: E402
from ui.main_window import MainWindow  # noqa: E402

LISTED = "管理员"  # the demo model writes it answering how to leave kiosk mode


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    os.environ.setdefault("STREAMCHAT_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    return export_bundle(DEMO_CHECKPOINT, tmp_path_factory.mktemp("demo") / "demo", quant="int8",
                         extra_manifest={"demo": True}).bundle


def _window(qtbot, loader) -> MainWindow:
    app = AppContext.load()
    app.settings.generation.top_k = 1  # greedy: the same answers every run
    return open_window(qtbot, app, loader)


def _panel(window) -> LiveNumbersPanel:
    return window.findChild(LiveNumbersPanel)


def _text(panel, key) -> str:
    return panel.values[key].text()


def _red(label) -> bool:
    """Whether the label is drawn with the alert colour (a pixel far redder than green and blue)."""
    image = label.grab().toImage()
    return any((c := image.pixelColor(x, y)).red() > 170 and c.green() < 120 and c.blue() < 120
               for x in range(image.width()) for y in range(image.height()))


def test_the_panel_shows_what_the_session_recorded(qtbot, demo, app_dirs):
    lists = app_dirs / "config" / "safety"
    lists.mkdir(parents=True)
    (lists / "operator.txt").write_text(f"{LISTED}\n", encoding="utf-8")
    window = _window(qtbot, model_loader(demo, demo=False))
    window.menu_actions["live_numbers"].trigger()
    panel = _panel(window)
    assert panel is not None and panel.isVisible() and panel.windowTitle() == "Live numbers"
    assert [_text(panel, key) for key in ("ttft", "answers", "ttft_p99", "safety")] == ["—", "0", "—", "0"]
    firsts = []
    window.worker.finished.connect(lambda _result, first: firsts.append(first))

    ttfts, topics = [], []
    for question in ("StreamChat 是什么？", "怎么退出 kiosk 模式？"):
        window.new_conversation()  # each question on its own, as the demo model was trained
        result = ask(qtbot, window, question)
        stored = window.app.history.messages(result.conversation_id)[-1]
        gen = result.generation
        assert stored.text == result.response and stored.timings["tokens"] == len(gen.token_ids) > 4
        assert _text(panel, "ttft") == f"{firsts[-1]:.2f} s" and firsts[-1] > 0
        assert f"first token {firsts[-1]:.2f} s" in window.speed.text()  # the same number as the status bar
        assert _text(panel, "tokens") == str(stored.timings["tokens"])
        assert _text(panel, "speed") == f"{1000 / gen.decode_ms_per_token:.1f}"
        assert _text(panel, "repetition") == f"{repetition_rate(gen.token_ids) * 100:.1f}%"
        topics.append(topic_similarity(question, stored.text))
        assert _text(panel, "topic") == f"{topics[-1]:.2f}"
        ttfts.append(firsts[-1])
    assert LISTED not in result.response and "PIN" in result.response  # the listed word was masked

    refused = ask(qtbot, window, f"{LISTED}是谁？")  # refused before anything is generated: no time to first token
    assert refused.stopped == "blocked" and firsts[-1] == 0.0
    assert [_text(panel, key) for key in ("ttft", "tokens", "speed", "repetition", "topic")] == ["—", "0", "—", "—",
                                                                                              "—"]
    audit = (window.app.data_dir / "audit.jsonl").read_text(encoding="utf-8").splitlines()
    hits = [json.loads(line)["where"] for line in audit]
    assert "output" in hits and "input" in hits
    on_topic = [score > 0 for score in topics if score is not None]
    assert [_text(panel, key) for key in ("answers", "ttft_p50", "ttft_p99", "safety", "errors")] == \
        ["3", f"{min(ttfts):.2f} s", f"{max(ttfts):.2f} s", str(len(hits)), "0"]
    assert _text(panel, "on_topic") == f"{100 * sum(on_topic) / len(on_topic):.0f}% ({sum(on_topic)}/{len(on_topic)})"
    rss = int(re.search(r"^VmRSS:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1)) / 1024
    shown = float(_text(panel, "memory").split(" MiB")[0])
    assert abs(shown - rss) < max(50, rss * 0.1)  # this process, sampled within the last second
    assert on_topic == [True, False]  # the answer to leaving kiosk mode shares no term with its question
    assert panel.values["on_topic"].property("alert") is True and _red(panel.values["on_topic"])  # 50% < 70%
    assert not any(panel.values[key].property("alert") for key in ("ttft", "ttft_p99", "errors", "safety"))
    stop_worker(window)


def test_a_breach_is_highlighted_and_process_numbers_update_while_an_answer_streams(qtbot, demo, app_dirs):
    """Decode steps that keep the worker busy (0.1 s each, 0.8 s once): the CPU share sampled during the answer shows
    the busy thread, the answer's numbers appear when it ends, and its 0.8 s pause is a highlighted stall."""
    real = model_loader(demo, demo=False)

    def paced(settings, progress):
        model = real(settings, progress)
        return LoadedModel(PacedEngine(model.engine, lambda step: 0.8 if step == 5 else 0.1), model.tokenizer,
                           model.label, model.summary)

    window = _window(qtbot, paced)
    window.menu_actions["live_numbers"].trigger()
    panel = _panel(window)
    during = []  # at each sample: answering?, the CPU and time-to-first-token texts, the kernel's CPU count, the time

    def sampled():
        ticks = sum(map(int, Path("/proc/self/stat").read_text().rpartition(")")[2].split()[11:13]))  # utime + stime
        during.append((window.answering, _text(panel, "cpu"), _text(panel, "ttft"), ticks, time.monotonic()))

    panel.timer.timeout.connect(sampled)  # after the panel's own sample
    result = ask(qtbot, window, "StreamChat 是什么？")
    assert len(result.generation.token_ids) > 10
    streaming = [i for i, sample in enumerate(during) if sample[0]]
    assert len(streaming) >= 2, during
    assert {during[i][2] for i in streaming} == {"—"}  # per-answer numbers come when the answer ends
    hz, cpus = os.sysconf("SC_CLK_TCK"), ProcessMeter().cpus
    for i in streaming[1:]:  # the share shown is the kernel's count of this process's CPU time since the last sample
        (_, _, _, ticks0, t0), (_, shown, _, ticks1, t1) = during[i - 1], during[i]
        expected = 100 * (ticks1 - ticks0) / hz / (t1 - t0) / cpus
        assert float(shown.rstrip("%")) == pytest.approx(expected, abs=4), (shown, expected)
        assert float(shown.rstrip("%")) > 0  # the worker is busy (how busy depends on what else the machine runs)

    pause = panel.values["pause"]
    assert float(pause.text().split()[0]) >= 800 and pause.property("alert") is True and _red(pause)
    stalls, pauses = map(int, re.fullmatch(r"(\d+) of (\d+) pauses", _text(panel, "stalls")).groups())
    assert stalls >= 1 and pauses >= 10 and panel.values["stalls"].property("alert") is (stalls / pauses > 0.01)
    ttft = panel.values["ttft"]
    assert float(ttft.text().split()[0]) < 1 and ttft.property("alert") is False and not _red(ttft)
    stop_worker(window)


def test_closing_the_panel_leaves_no_window_behind_and_keeps_the_run(qtbot, demo, app_dirs):
    window = _window(qtbot, model_loader(demo, demo=False))
    window.activateWindow()
    qtbot.waitUntil(window.isActiveWindow, timeout=5000)
    before = len(QApplication.topLevelWidgets())
    qtbot.keyClick(window.composer, Qt.Key_L, Qt.ControlModifier | Qt.ShiftModifier)  # the View menu's shortcut
    panel = _panel(window)
    assert panel is not None and panel.isVisible() and not panel.isFloating()
    ask(qtbot, window, "StreamChat 是什么？")
    assert _text(panel, "answers") == "1"
    panel.setFloating(True)  # a floating panel is a window of its own until it is closed
    assert len(QApplication.topLevelWidgets()) == before + 1
    timer = panel.timer
    panel.close()
    QCoreApplication.sendPostedEvents(None, QEvent.DeferredDelete)
    assert _panel(window) is None and len(QApplication.topLevelWidgets()) == before
    with pytest.raises(RuntimeError):  # deleted with the panel: nothing samples the process any more
        timer.isActive()

    window.menu_actions["live_numbers"].trigger()
    again = _panel(window)
    assert _text(again, "answers") == "1"  # the run's numbers are the window's, not the panel's
    window.menu_actions["live_numbers"].trigger()  # the same entry closes it
    QCoreApplication.sendPostedEvents(None, QEvent.DeferredDelete)
    assert _panel(window) is None and len(QApplication.topLevelWidgets()) == before
    stop_worker(window)
