"""Simplified Chinese for the window, installed as QTranslators (the system locale decides unless a setting does):
StreamChat's own texts from the table below, Qt's (dialog buttons such as OK, Cancel, Save, Yes, No) from the
translations that ship with Qt.

The table also holds the runtime core's messages a window user meets (a model that does not load, a refused question,
a history that cannot be written, a package that is not installed, ...). They reach the window as whole lines with
paths, rule ids and numbers filled in, so their keys are templates: ``{0}``, ``{1}`` stand for the filled-in parts,
which are translated in turn when the table has them (a nested message, a phrase such as "free space"). The core
stays free of Qt and of translations; a test keeps each template's words equal to the core's.
"""

from __future__ import annotations

import re

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
    "CPU kernels: {0}": "CPU 计算内核：{0}",
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
    # a load that failed on the engine or device chosen in Settings
    "This comes from the engine or device chosen in Settings (engine: {0}; device: {1}): choose others there "
    "(onnxruntime on the CPU runs every bundle), or choose another bundle.":
        "原因在于设置中选择的推理引擎或设备（推理引擎：{0}；设备：{1}）：请在设置中改选"
        "（onnxruntime 在 CPU 上可运行所有模型包），或选择其他模型包。",
    # the runtime core's messages (appliance), as templates of the lines it gives
    "bundle not found: {0} (no such folder): give the folder `streamchat export` wrote, or install a bundle package "
    "with `streamchat bundle install FILE`":
        "找不到模型包：{0}（没有这个文件夹）：请指定 `streamchat export` 生成的文件夹，或用 "
        "`streamchat bundle install 文件` 安装模型包",
    "{0} is not a StreamChat bundle (no {1}); export one with `streamchat export`":
        "{0} 不是 StreamChat 模型包（缺少 {1}）；请用 `streamchat export` 导出模型包",
    "cannot read {0} ({1}); re-copy the bundle": "无法读取 {0}（{1}）；请重新复制模型包",
    "bundle file {0} is missing from {1}: re-copy or re-export the bundle":
        "模型包文件 {0} 不在 {1} 中：请重新复制或重新导出模型包",
    "bundle file {0} is {1} bytes but the manifest says {2} (truncated or replaced): re-copy or re-export the bundle":
        "模型包文件 {0} 有 {1} 字节，但清单记录为 {2}（被截断或替换）：请重新复制或重新导出模型包",
    "bundle checksum mismatch in {0}: re-export or re-copy the bundle": "模型包文件 {0} 的校验和不符：请重新导出或重新复制模型包",
    "the built-in demo model is not prepared in {0} ({1}): start the app with `streamchat gui --demo` once, which "
    "prepares it": "内置演示模型尚未在 {0} 中准备好（{1}）：请运行一次 `streamchat gui --demo`，它会准备好演示模型",
    "it was prepared from another release's demo model": "它是由其他版本的演示模型准备的",
    "{0} targets {1}; it cannot run on engine {2} (engines for it: {3})":
        "{0} 的目标平台是 {1}，不能在推理引擎 {2} 上运行（可运行它的推理引擎：{3}）",
    "engine {0} runs on {1}, not on {2} (engines for {2}: {3})":
        "推理引擎 {0} 只能在 {1} 上运行，不能在 {2} 上运行（可在 {2} 上运行的推理引擎：{3}）",
    "pyACL (acl) is not importable: source {0} (CANN's environment) first ({1})":
        "无法导入 pyACL (acl)：请先 source {0}（CANN 的环境）（{1}）",
    "{0} holds no {1}: convert it on the board first (./convert.sh atc, with CANN's set_env.sh sourced)":
        "{0} 中没有 {1}：请先在开发板上转换（在 source 了 CANN 的 set_env.sh 的环境中运行 ./convert.sh atc）",
    "the mindspore engine needs MindSpore: pip install 'streamchat[mindspore]' ({0})":
        "mindspore 推理引擎需要 MindSpore：pip install 'streamchat[mindspore]'（{0}）",
    "{0} (MindSpore {1}, device {2}, card {3}): {4}": "{0}（MindSpore {1}，设备 {2}，卡 {3}）：{4}",
    "no Ascend device or CANN found": "找不到昇腾设备或 CANN",
    "MindSpore cannot compute on the CPU": "MindSpore 无法在 CPU 上计算",
    "MindSpore Lite is not importable here: set STREAMCHAT_LITE_PYTHON to a Python that has the mindspore_lite wheel "
    "(e.g. Lite 2.0.0 needs Python 3.7)":
        "此处无法导入 MindSpore Lite：请将 STREAMCHAT_LITE_PYTHON 设为装有 mindspore_lite wheel 的 Python"
        "（例如 Lite 2.0.0 需要 Python 3.7）",
    "onnxruntime failed during a step: {0}": "onnxruntime 在一步计算中失败：{0}",
    "not enough memory while {0}: {1}; close other programs or raise the limit": "{0}时内存不足：{1}；请关闭其他程序或提高限制",
    "this process is limited to {0} MB (ulimit -v)": "本进程被限制为 {0} MB（ulimit -v）",
    "the machine ran out": "本机内存已耗尽",
    "unexpected error while {0} ({1}); {2}": "{0}时发生意外错误（{1}）；{2}",
    "the details are in {0}": "详细信息见 {0}",
    "no crash log could be written": "无法写入崩溃日志",
    "loading the model": "加载模型",
    "answering": "生成回答",
    "running the window": "运行窗口",
    "{0}. The conversation is kept.": "{0}。对话已保留。",
    "your message contains blocked content (rule {0}); rephrase it": "你的消息包含被屏蔽的内容（规则 {0}）；请换一种说法",
    "the system prompt leaves no room for a question in a context budget of {0} tokens: shorten it in Settings or "
    "raise the budget": "在 {0} 个词元的上下文长度内，系统提示词没有给问题留下空间：请在设置中缩短系统提示词或提高上下文长度",
    "a context budget of {0} tokens is too small: raise it": "{0} 个词元的上下文长度太小：请提高它",
    "{0}: {1} not saved yet (kept in memory); {2} and {3} saved with the next message":
        "{0}：{1}尚未保存（暂存在内存中）；请{2}，之后会随下一条消息一起保存",
    "1 message is": "1 条消息",
    "{0} messages are": "{0} 条消息",
    "{0}: {1} of this chat could not be saved": "{0}：本次对话中有 {1}无法保存",
    "1 message": "1 条消息",
    "{0} messages": "{0} 条消息",
    "{0}: {1}; {2} and try again": "{0}：{1}；请{2}后重试",
    "nothing was saved": "未保存任何内容",
    "nothing was changed": "未做任何更改",
    "the history cannot be opened": "无法打开历史记录",
    "the history cannot be read": "无法读取历史记录",
    "the disk holding {0} is full": "{0} 所在的磁盘已满",
    "the data folder {0} is read-only for StreamChat (a read-only disk or no write permission)":
        "数据文件夹 {0} 对 StreamChat 是只读的（只读磁盘或没有写权限）",
    "{0} is locked by another program (another StreamChat?)": "{0} 被另一个程序锁定（另一个 StreamChat？）",
    "cannot use the history database {0} ({1})": "无法使用历史数据库 {0}（{1}）",
    "free space": "释放磁盘空间",
    "make it writable or choose another data folder (STREAMCHAT_DATA_DIR or the data_dir setting)":
        "使其可写，或选择其他数据文件夹（STREAMCHAT_DATA_DIR 或 data_dir 设置）",
    "close that program": "关闭该程序",
    "check the disk": "检查磁盘",
    "cannot save the settings to {0}: {1}; the settings file was left as it was": "无法将设置保存到 {0}：{1}；设置文件保持原样",
    "cannot write {0}: the folder {1} does not exist": "无法写入 {0}：文件夹 {1} 不存在",
    "{0} is not an uncompressed tar made by `streamchat bundle pack` (compressed packages are refused): re-pack the "
    "bundle": "{0} 不是由 `streamchat bundle pack` 生成的未压缩 tar 包（不接受压缩包）：请重新打包模型包",
    "{0} is not a readable bundle package ({1}); re-copy it": "{0} 不是可读的模型包文件（{1}）；请重新复制",
    "{0} is truncated or damaged ({1}); the installed bundle was not touched":
        "{0} 已被截断或损坏（{1}）；已安装的模型包未受影响",
    "not enough disk space in {0}: the bundle needs {1} GB, {2} GB are free":
        "{0} 的磁盘空间不足：模型包需要 {1} GB，可用 {2} GB",
    "cannot write into {0}: {1}": "无法写入 {0}：{1}",
}

PLACEHOLDER = re.compile(r"\{(\d+)\}")
CONTEXT = "StreamChat"  # the context of the window's own texts (``ui.messages.t``)


def _template(key: str) -> re.Pattern | None:
    """The pattern of the lines a key with ``{0}``, ``{1}`` ... stands for (a placeholder used twice must be the same
    text twice); None for a key without placeholders, or with a format spec (``{0:.2f}``: the window formats it)."""
    if not PLACEHOLDER.search(key) or re.search(r"\{\d+:", key):
        return None
    pattern, seen = "", set()
    for i, part in enumerate(PLACEHOLDER.split(key)):
        if i % 2 == 0:
            pattern += re.escape(part)
        else:
            pattern += f"(?P=p{part})" if part in seen else f"(?P<p{part}>.+?)"
            seen.add(part)
    return re.compile(pattern, re.DOTALL)


class DictTranslator(QTranslator):
    """A QTranslator backed by a Python table (no .qm build step needed on offline machines): a text is its entry, or,
    in StreamChat's own context, a line one of the template keys stands for (the most specific template first)."""

    def __init__(self, table: dict[str, str]) -> None:
        super().__init__()
        self.table = table
        patterns = {key: pattern for key in table if (pattern := _template(key)) is not None}
        specific_first = sorted(patterns, key=lambda key: -len(PLACEHOLDER.sub("", key)))  # the most words of its own
        self.templates = [(PLACEHOLDER.split(key)[::2], patterns[key], table[key]) for key in specific_first]

    def translate(self, context, source_text, disambiguation=None, n=-1):  # noqa: D401 - Qt override
        return self.table.get(source_text) or (self._filled(source_text) if context == CONTEXT else None)

    def _filled(self, text: str) -> str | None:
        """``text`` as a template's translation, each filled-in part translated in turn; None when none matches."""
        for words, pattern, translation in self.templates:
            # only where each of its stretches of words occurs: the match itself can take long on a long line
            match = all(part in text for part in words) and pattern.fullmatch(text)
            if match:
                parts = {int(name[1:]): value for name, value in match.groupdict().items()}
                return translation.format(*(self.table.get(parts[i]) or self._filled(parts[i]) or parts[i]
                                             for i in range(len(parts))))
        return None

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
