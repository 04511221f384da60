"""Simplified Chinese for the window, installed as a QTranslator (the system locale decides unless a setting does)."""

from __future__ import annotations

from PySide6.QtCore import QLocale, QTranslator

ZH_CN = {
    "New conversation": "新对话",
    "Search conversations": "搜索对话",
    "Send": "发送",
    "Stop": "停止",
    "Regenerate": "重新生成",
    "Settings": "设置",
    "Copy": "复制",
    "Copy code": "复制代码",
    "Edit": "编辑",
    "Rename": "重命名",
    "Delete": "删除",
    "Export...": "导出...",
    "You": "你",
    "StreamChat": "StreamChat",
    "Type a message. Enter sends, Shift+Enter starts a new line, Esc stops.":
        "输入消息。Enter 发送，Shift+Enter 换行，Esc 停止。",
    "Loading the model...": "正在加载模型...",
    "first token {0:.2f} s · {1:.1f} tokens/s": "首字 {0:.2f} 秒 · {1:.1f} 字/秒",
    "This is the built-in demo model: it only knows about StreamChat. To chat with ChatGLM-6B, export a bundle "
    "(streamchat export CHECKPOINT --out BUNDLE) and open it in Settings.":
        "这是内置的演示模型，只了解 StreamChat。要使用 ChatGLM-6B，请导出模型包（streamchat export 模型目录 --out 模型包目录），"
        "然后在设置中打开它。",
    "Generation": "生成",
    "Temperature": "温度",
    "Top-p": "Top-p",
    "Top-k": "Top-k",
    "Repetition penalty": "重复惩罚",
    "Max new tokens": "最大生成长度",
    "Context budget": "上下文长度",
    "Model bundle": "模型包",
    "Open folder...": "打开文件夹...",
    "Verify": "校验",
    "Use the demo model": "使用演示模型",
    "Data folder": "数据文件夹",
    "Safety lists": "安全词表",
    "Open the folder": "打开文件夹",
    "Reload": "重新加载",
    "Language": "语言",
    "Font size": "字号",
    "Follow the system": "跟随系统",
    "Operator exit": "管理员退出",
    "PIN": "PIN",
    "Stopped": "已停止",
    "Not sent: {0}": "未发送：{0}",
    "Error: {0}": "错误：{0}",
    "Rename conversation": "重命名对话",
    "The answer was stopped.": "回答已停止。",
}


class DictTranslator(QTranslator):
    """A QTranslator backed by a Python table (no .qm build step needed on offline machines)."""

    def __init__(self, table: dict[str, str]) -> None:
        super().__init__()
        self.table = table

    def translate(self, context, source_text, disambiguation=None, n=-1):  # noqa: D401 - Qt override
        return self.table.get(source_text) or None

    def isEmpty(self) -> bool:  # noqa: N802 - Qt override
        return False


def translator_for(language: str) -> DictTranslator | None:
    """``auto`` follows the system locale; zh_CN gets the table, anything else stays English."""
    code = QLocale.system().name() if language == "auto" else language
    return DictTranslator(ZH_CN) if code.startswith("zh") else None
