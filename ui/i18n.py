"""Simplified Chinese for the window, installed as QTranslators (the system locale decides unless a setting does):
StreamChat's own texts from the table below, Qt's (dialog buttons such as OK, Cancel, Save, Yes, No) from the
translations that ship with Qt."""

from __future__ import annotations

from PySide6.QtCore import QLibraryInfo, QLocale, QTranslator

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
    "first token {0:.2f} s · {1:.1f} tokens/s": "首个词元 {0:.2f} 秒 · {1:.1f} 词元/秒",
    "{0:.1f} tokens/s": "{0:.1f} 词元/秒",
    "the built-in demo model": "内置演示模型",
    "preparing the built-in demo model (first run after installing or upgrading)...":
        "正在准备内置演示模型（安装或升级后首次运行）...",
    "Choose another bundle in Settings, or leave its field empty for the built-in demo model.":
        "请在设置中选择其他模型包，或将该项留空以使用内置演示模型。",
    "the model is not loaded": "模型尚未加载",
    "an answer is still being written: stop it or wait": "正在生成回答：请先停止或等待其完成",
    "Editing a sent message: sending replaces it and everything after it.":
        "正在编辑已发送的消息：发送后将替换它及其后的所有消息。",
    "Cancel editing": "取消编辑",
    'Delete the conversation "{0}"? This cannot be undone.': "删除对话“{0}”？此操作无法撤销。",
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
    "The field is empty: the built-in demo model is used. It is checked when it loads; open a bundle folder to verify "
    "a bundle.": "此项为空：使用内置演示模型，加载时会自动检查；要校验模型包，请打开其文件夹。",
    "Data folder": "数据文件夹",
    "Safety lists": "安全词表",
    "Open the folder": "打开文件夹",
    "Reload": "重新加载",
    "Language": "语言",
    "Font size": "字号",
    "Follow the system": "跟随系统",
    "Theme": "主题",
    "Light": "浅色",
    "Dark": "深色",
    "简体中文": "简体中文",
    "English": "English",
    "PIN": "PIN",
    "Stopped": "已停止",
    "Not sent: {0}": "未发送：{0}",
    "Error: {0}": "错误：{0}",
    "Rename conversation": "重命名对话",
    "The answer was stopped.": "回答已停止。",
    # menus and their commands
    "File": "文件",
    "View": "视图",
    "Help": "帮助",
    "New chat": "新对话",
    "Choose model...": "选择模型...",
    "Install bundle package...": "安装模型包...",
    "Export conversation...": "导出对话...",
    "Quit": "退出",
    "Copy last answer": "复制最后的回答",
    "Bigger text": "放大文字",
    "Smaller text": "缩小文字",
    "Reset text size": "恢复默认字号",
    "Settings...": "设置...",
    "Kiosk settings...": "展台设置...",
    "About StreamChat": "关于 StreamChat",
    "The last answer was copied.": "已复制最后的回答。",
    "There is no answer to copy yet.": "还没有可复制的回答。",
    "There is no saved conversation on screen to export.": "当前没有可导出的已保存对话。",
    "Model: {0}": "模型：{0}",
    "Engine: {0}": "推理引擎：{0}",
    "Device: {0}": "设备：{0}",
    "Prompt kernels: {0}": "提示词计算内核：{0}",
    "not loaded": "未加载",
    # the model picker and package install
    "Models": "模型",
    "Models...": "模型...",
    "Name": "名称",
    "Quantization": "量化",
    "Size on disk": "占用空间",
    "Target": "目标平台",
    "Folder": "文件夹",
    "Load": "加载",
    "Close": "关闭",
    "Cancel": "取消",
    "Install a bundle package...": "安装模型包...",
    "Bundle packages (*.tar);;All files (*)": "模型包 (*.tar);;所有文件 (*)",
    "prepared when first loaded": "首次加载时准备",
    "This bundle cannot be loaded": "无法加载此模型包",
    "The package was not installed": "模型包未安装",
    "Extracting and verifying {0}...": "正在解包并校验 {0}...",
    "Installing {0}...": "正在安装 {0}...",
    "Installed and verified: {0}": "已安装并校验：{0}",
    "Install cancelled: nothing was changed.": "已取消安装：未做任何更改。",
    "The model could not be loaded": "模型加载失败",
    # settings: engine, device, system prompt
    "System prompt": "系统提示词",
    "Engine": "推理引擎",
    "Automatic (the bundle's own)": "自动（模型包默认）",
    "Device": "设备",
    "CPU": "CPU",
    "Ascend NPU": "昇腾 NPU",
    "NPU number": "NPU 编号",
    # kiosk, for the operator
    "Operator": "管理员",
    "Wrong PIN.": "PIN 错误。",
    "No operator PIN is set (kiosk.exit_pin in settings.json).": "未设置管理员 PIN（settings.json 中的 kiosk.exit_pin）。",
    "Kiosk settings": "展台设置",
    "Start in kiosk mode": "以展台模式启动",
    "Idle timeout (s)": "空闲超时（秒）",
    "Keep visitors' conversations": "保留访客的对话",
    "Operator PIN": "管理员 PIN",
    "Font scale": "字号倍数",
    "Welcome text": "欢迎语",
    # the Live numbers panel
    "Live numbers": "实时指标",
    "Alert when": "告警条件",
    "Last answer": "最近一次回答",
    "This run": "本次运行",
    "This process": "本进程",
    "Time to first token": "首个词元用时",
    "Tokens": "词元数",
    "Tokens/s": "词元/秒",
    "Longest pause between tokens": "词元间最长停顿",
    "Repetition rate": "重复率",
    "Topic similarity": "主题相似度",
    "Answers": "回答数",
    "Time to first token, P50": "首个词元用时 P50",
    "Time to first token, P99": "首个词元用时 P99",
    "Stalls (pauses over {0:g} ms)": "卡顿（停顿超过 {0:g} 毫秒）",
    "On-topic answers": "切题回答占比",
    "Safety-filter hits": "安全过滤命中",
    "Errors": "错误",
    "Memory (resident)": "内存（常驻）",
    "{0:.0f} MiB": "{0:.0f} MiB",
    "{0:.0f} ms": "{0:.0f} 毫秒",
    "{0:.2f} s": "{0:.2f} 秒",
    "{0:g} ms": "{0:g} 毫秒",
    "{0:g} s": "{0:g} 秒",
    "{0} of answers": "回答的 {0}",
    "{0} of pauses": "停顿的 {0}",
    "{0} of {1} pauses": "{1} 次停顿中 {0} 次",
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


def translators_for(language: str) -> list[QTranslator]:
    """What to install for ``language`` (``auto`` follows the system locale): for Chinese, the table and Qt's own
    qtbase translation when this Qt has it; for anything else none (English)."""
    code = QLocale.system().name() if language == "auto" else language
    if not code.startswith("zh"):
        return []
    translators: list[QTranslator] = [DictTranslator(ZH_CN)]
    qt_own = QTranslator()
    if qt_own.load("qtbase_zh_CN", QLibraryInfo.path(QLibraryInfo.LibraryPath.TranslationsPath)):
        translators.append(qt_own)
    return translators
