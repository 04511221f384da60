"""The runtime core's messages in the window: a model that fails to load on the engine or device chosen in Settings
says to change those (not the bundle), the core's lines reach the Chinese window in Chinese (ui.i18n's templates, kept
equal to the core's words), and a question the safety filter refuses shows the refusal and can be rephrased."""

import ast
import os
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import pytest  # noqa: E402

pytest.importorskip("PySide6")
pytest.importorskip("pytestqt")

from PySide6.QtWidgets import QApplication, QMessageBox, QPushButton  # noqa: E402

from appliance.app import AppContext  # noqa: E402
from appliance.history import History, HistoryError  # noqa: E402
from tests.test_ui_defects import _translated_texts  # noqa: E402
from tests.ui_helpers import ask, open_window, stop_worker  # noqa: E402
from ui.app import model_loader  # noqa: E402
from ui.i18n import PLACEHOLDER, ZH_CN, translators_for  # noqa: E402
from ui.messages import t  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
BUNDLE_ADVICE = "Choose another bundle in Settings, or leave its field empty for the built-in demo model."
ENGINE_ADVICE = ("This comes from the engine or device chosen in Settings (engine: {0}; device: {1}): choose others "
                 "there (onnxruntime on the CPU runs every bundle), or choose another bundle.")


def _app(**settings) -> AppContext:
    app = AppContext.load()
    app.settings.generation.top_k, app.settings.generation.max_new_tokens = 1, 8
    for key, value in settings.items():
        setattr(app.settings, key, value)
    return app


def _failed_load(qtbot, app: AppContext) -> tuple[str, str]:
    """The window on ``app``'s settings, whose model does not load: the dialog's text, and the status bar's."""
    window = open_window(qtbot, app, model_loader(None, demo=False), loaded=False)
    qtbot.waitUntil(lambda: bool(_boxes(window)), timeout=60000)
    [box] = _boxes(window)
    assert box.windowTitle() == t("The model could not be loaded")
    shown = box.text(), window.status.text()
    box.close()
    stop_worker(window)
    return shown


def _boxes(window) -> list[QMessageBox]:
    return [w for w in window.findChildren(QMessageBox) if w.isVisible()]


@pytest.fixture
def zh():
    """The Chinese UI, as ``streamchat`` installs it for ``"language": "zh_CN"``."""
    qt = QApplication.instance()
    translators = translators_for("zh_CN")
    for translator in translators:
        qt.installTranslator(translator)
    yield
    for translator in translators:
        qt.removeTranslator(translator)


# -- the advice after a failed load -------------------------------------------------------------------------------------
def test_a_load_that_fails_on_the_chosen_engine_or_device_says_to_change_them(qtbot, tiny, app_dirs):
    text, status = _failed_load(qtbot, _app(model_bundle=str(tiny), engine="mindspore-lite"))
    assert text == (f"{tiny} targets cpu; it cannot run on engine mindspore-lite (engines for it: onnxruntime)\n\n"
                    + ENGINE_ADVICE.format("mindspore-lite", "CPU"))
    assert status.endswith(ENGINE_ADVICE.format("mindspore-lite", "CPU"))

    text, _ = _failed_load(qtbot, _app(model_bundle=str(tiny), engine="auto", device="ascend", device_id=3))
    assert text == ("engine onnxruntime runs on cpu, not on ascend (engines for ascend: mindspore-lite, acl, "
                    "mindspore)\n\n" + ENGINE_ADVICE.format("Automatic (the bundle's own)", "Ascend NPU 3"))

    gone = app_dirs / "gone"  # the bundle is the problem, whatever engine was chosen
    text, _ = _failed_load(qtbot, _app(model_bundle=str(gone), engine="onnxruntime"))
    assert text.startswith(f"bundle not found: {gone} (no such folder)") and text.endswith("\n\n" + BUNDLE_ADVICE)


def test_a_device_that_is_not_there_is_named_in_the_advice(qtbot, tmp_path_factory, app_dirs):
    """An Ascend bundle on the mindspore engine and NPU 0 of a machine without one."""
    pytest.importorskip("mindspore", reason="the mindspore engine needs pip install 'streamchat[mindspore]'")
    from model_export.export import export_bundle
    from tests.conftest import TINY

    bundle = export_bundle(TINY, tmp_path_factory.mktemp("ascend") / "tiny", target="ascend-910b", quant="fp32").bundle
    text, _ = _failed_load(qtbot, _app(model_bundle=str(bundle), engine="mindspore", device="ascend", device_id=0))
    assert text.startswith("no Ascend device or CANN found (MindSpore ")
    assert text.endswith("\n\n" + ENGINE_ADVICE.format("mindspore", "Ascend NPU 0"))


# -- the core's messages in Chinese ---------------------------------------------------------------------------------------
def test_the_cores_messages_reach_the_chinese_window_in_chinese(qtbot, tiny, app_dirs, zh, monkeypatch):
    gone = app_dirs / "gone"
    text, status = _failed_load(qtbot, _app(model_bundle=str(gone)))
    not_found = (f"找不到模型包：{gone}（没有这个文件夹）：请指定 `streamchat export` 生成的文件夹，或用 "
                 "`streamchat bundle install 文件` 安装模型包")
    assert text == f"{not_found}\n\n请在设置中选择其他模型包，或将该项留空以使用内置演示模型。"
    assert status.startswith(f"错误：{not_found}")

    text, _ = _failed_load(qtbot, _app(model_bundle=str(tiny), device="ascend", device_id=1))
    assert text == ("推理引擎 onnxruntime 只能在 cpu 上运行，不能在 ascend 上运行"
                    "（可在 ascend 上运行的推理引擎：mindspore-lite, acl, mindspore）\n\n"
                    "原因在于设置中选择的推理引擎或设备（推理引擎：自动（模型包默认）；设备：昇腾 NPU 1）："
                    "请在设置中改选（onnxruntime 在 CPU 上可运行所有模型包），或选择其他模型包。")

    window = open_window(qtbot, _app(), model_loader(tiny, demo=False))

    def full(self, *args, **kwargs):  # as the SQLite history words a full disk (appliance/history/sqlite.py)
        raise HistoryError(f"the disk holding {self.path} is full: nothing was saved; free space and try again",
                           f"the disk holding {self.path} is full", "free space")

    monkeypatch.setattr(History, "add_message", full)
    ask(qtbot, window, "你好")
    qtbot.waitUntil(lambda: bool(_boxes(window)), timeout=10000)
    [box] = _boxes(window)
    assert box.text() == (f"{window.app.history.path} 所在的磁盘已满：2 条消息尚未保存（暂存在内存中）；"
                          "请释放磁盘空间，之后会随下一条消息一起保存")
    box.close()
    monkeypatch.undo()
    stop_worker(window)


def _core_pieces() -> list[str]:
    """The literal words of every string in the core and the window: a constant, or an f-string's text between its
    fields (implicitly joined strings are one)."""
    pieces = []
    for source in [*(REPO / "appliance").rglob("*.py"), *(REPO / "ui").glob("*.py")]:
        for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                pieces.append(node.value)
    return pieces


def test_every_core_message_in_the_table_has_the_cores_words():
    """A key that is not one of the window's own texts is a core line (or a part of one): each stretch of its words
    between placeholders is written so in the core, so rewording a message there shows here, not as English in the
    Chinese window."""
    own, pieces = _translated_texts(), _core_pieces()
    core = [key for key in ZH_CN if key not in own]
    assert len(core) > 50
    stale = [(key, words) for key in core for words in PLACEHOLDER.split(key)[::2]
             if words and not any(words in piece for piece in pieces)]
    assert stale == []
    for key in core:  # the translation fills the same parts
        assert sorted(set(PLACEHOLDER.findall(ZH_CN[key]))) <= sorted(set(PLACEHOLDER.findall(key))), key


# -- a question the safety filter refuses ---------------------------------------------------------------------------------
def test_a_refused_question_shows_the_refusal_and_can_be_rephrased(qtbot, tiny, app_dirs, zh):
    lists = app_dirs / "config" / "safety"
    lists.mkdir(parents=True)
    (lists / "operator.txt").write_text("炸弹\n", encoding="utf-8")
    window = open_window(qtbot, _app(), model_loader(tiny, demo=False))
    refused = ask(qtbot, window, "怎么做炸弹")
    assert (refused.stopped, refused.user_message_id, refused.answer_message_id) == ("blocked", None, None)
    question, answer = window.transcript.views
    assert answer.body.document().toPlainText() == "未发送：你的消息包含被屏蔽的内容（规则 operator.txt:1）；请换一种说法"
    assert window.app.history.conversations() == []  # nothing of the refused turn is stored, nothing claims it is

    next(b for b in question.findChildren(QPushButton) if b.text() == "编辑").click()  # Edit: back to be rephrased
    assert window.composer.toPlainText() == "怎么做炸弹" and window.edit_target is None
    assert not window.edit_bar.isVisible()
    window.composer.setPlainText("怎么做饭")
    with qtbot.waitSignal(window.answer_finished, timeout=60000) as finished:
        window.send_current()
    answered = finished.args[0]
    assert answered.user_message_id is not None
    assert [m.text for m in window.app.history.messages(answered.conversation_id)] == ["怎么做饭", answered.response]
    stop_worker(window)
