"""The ``streamchat`` command: generate, chat, serve, export, verify, history, bundle, gui.

Errors are one line on stderr: exit code 2 for bad input or too little memory, 1 for a bug (whose traceback goes to a
crash log, see ``appliance.crash``). The runtime (numpy, onnxruntime) is imported only when a command runs, inside
that error path, so even a machine that cannot load it gets one line instead of a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import shutil
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from appliance import crash
from appliance.display import one_line, printable
from appliance.errors import StreamChatError

if TYPE_CHECKING:
    from appliance.app import AppContext
    from appliance.prompt import Turn
    from appliance.settings import Settings

EXIT_USAGE = 2
EXIT_BUG = 1
EXIT_BROKEN_PIPE = 128 + 13  # what a shell reports for a program ended by SIGPIPE
RESUME_TURNS = 10  # turns of a continued conversation shown before the prompt


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--demo", action="store_true", help="the built-in demo model (answers questions about StreamChat)")
    source.add_argument("--checkpoint", type=Path, metavar="DIR",
                        help="a small THUDM-layout checkpoint, run by the numpy reference (slow; for tests)")
    source.add_argument("--bundle", type=Path, metavar="DIR", help="an exported model bundle")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: physical cores)")
    _add_device_args(parser)


def _add_device_args(parser: argparse.ArgumentParser) -> None:
    """The engine of a bundle, where it runs and the weights it holds (``appliance.engines.EngineOptions``); the values
    are checked by ``_engine_placement``, so a bad one is one line. Not given: the saved setting, as the window uses it."""
    from appliance.engines import describe_engines

    parser.add_argument("--engine", default=None, metavar="NAME", help=f"runtime for a bundle: {describe_engines()} "
                        "(default: the saved engine setting, auto unless changed)")
    parser.add_argument("--device", default=None, metavar="{cpu,ascend}", help="where the engine runs: cpu or ascend, "
                        "an NPU (engines mindspore, mindspore-lite, acl) (default: the saved setting, cpu unless changed)")
    parser.add_argument("--device-id", default=None, metavar="N", help="the NPU number with --device ascend (default: "
                        "the saved setting, 0 unless changed)")
    parser.add_argument("--weights", default=None, metavar="{int8,int4}", help="engine mindspore: hold the matrices as "
                        "int8 (per row) or int4 (groups of 128) codes quantized when the bundle is opened (default: "
                        "the bundle's own precision)")


def _engine_placement(args: argparse.Namespace, settings: Settings) -> dict:
    """``--engine``, ``--device``, ``--device-id`` (each not given: the saved setting) and ``--weights`` checked before
    anything loads (one line, exit 2), as keyword arguments of ``load_model``."""
    from appliance.engines import EngineOptions, device_number

    device_id = settings.device_id if args.device_id is None else device_number(args.device_id)
    options = EngineOptions(device=args.device or settings.device, device_id=device_id, weights=args.weights)
    return {"engine": args.engine or settings.engine, "device": options.device, "device_id": options.device_id,
            "weights": options.weights}


def _add_generation_args(parser: argparse.ArgumentParser) -> None:
    """--greedy and --seed for this run, and a flag per generation setting of the schema (not given: the saved value)."""
    from appliance.settings import section

    parser.add_argument("--greedy", action="store_true", help="always take the most likely token")
    parser.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    for setting in section("generation"):
        kind = {"action": argparse.BooleanOptionalAction} if setting.type is bool else {"type": setting.type}
        parser.add_argument(setting.flag, **kind, default=None, metavar="X" if setting.type is float else "N",
                            help=f"{setting.help}; {setting.allowed()} (default: the saved setting, "
                                 f"{setting.default} unless changed)")


def _apply_generation_args(settings: Settings, args: argparse.Namespace) -> Settings:
    """The saved settings with the generation flags given on the command line (for this run only), checked like the
    settings file."""
    from appliance.settings import section, with_values

    given = {s.key: s.check(getattr(args, s.name), f"{s.flag} (setting {s.key})") for s in section("generation")
             if getattr(args, s.name) is not None}
    return with_values(settings, given)


HISTORY_FILE_CAP = 64 << 20  # far above any context window's worth of turns


def read_history(path: Path) -> list[Turn]:
    """A JSON list of ``[query, response]`` pairs, from a regular file of at most HISTORY_FILE_CAP bytes."""
    from appliance.folders import read_small_text

    text = read_small_text(path, HISTORY_FILE_CAP, "history file")
    try:
        raw = json.loads(text)
    except RecursionError as exc:
        raise StreamChatError(f"history file {path} is nested too deeply") from exc
    except ValueError as exc:
        raise StreamChatError(f"history file {path} is not valid JSON: {exc}") from exc
    if not (isinstance(raw, list) and all(isinstance(t, list | tuple) and len(t) == 2
                                          and all(isinstance(s, str) for s in t) for t in raw)):
        raise StreamChatError(f"history file {path} must be a JSON list of [query, response] string pairs")
    return [(q, r) for q, r in raw]


def cmd_generate(args: argparse.Namespace) -> int:
    """One answer through the same session as ``chat`` (settings, safety lists, context budget), stored nowhere."""
    from appliance.app import AppContext
    from appliance.safety import SafetyError
    from streamchat.models import load_model

    turns = read_history(args.history) if args.history else []
    app = AppContext.load(with_history=False)
    placement = _engine_placement(args, app.settings)
    settings = _apply_generation_args(app.settings, args)
    model = load_model(checkpoint=args.checkpoint, bundle=args.bundle, threads=args.threads or settings.threads or None,
                       demo=args.demo, data=app.data_dir, context=settings.context_budget, **placement)
    session = app.session(model.engine, model.tokenizer, model.label, settings)
    session.open(None, turns)
    for delta in session.send(args.prompt, greedy=args.greedy, seed=args.seed):
        if not args.json:
            sys.stdout.write(printable(delta))
            sys.stdout.flush()
    result = session.last
    if result.blocked_reason:
        raise SafetyError(result.blocked_reason)
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    print(json.dumps(result.to_dict(), ensure_ascii=False) if args.json else "")
    return 0


def _stream_interruptibly(run: Callable[[Callable[[str], None], threading.Event], None]) -> None:
    """Run an answer in a worker thread so Ctrl-C cancels the answer, not the program; a second Ctrl-C before the
    answer has stopped (an engine that hangs) leaves the program."""
    cancel, deltas = threading.Event(), queue.Queue()
    outcome: dict[str, object] = {}

    def work() -> None:
        try:
            run(deltas.put, cancel)
        except BaseException as exc:  # handed to the main thread, which reports it
            outcome["error"] = exc
        finally:
            deltas.put(None)

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    while True:
        try:
            delta = deltas.get()
        except KeyboardInterrupt:
            if cancel.is_set():
                raise
            cancel.set()
            continue
        if delta is None:
            break
        sys.stdout.write(printable(delta))
        sys.stdout.flush()
    worker.join()
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]


def cmd_chat(args: argparse.Namespace) -> int:
    from appliance.app import AppContext
    from streamchat.models import load_model

    app = AppContext.load()
    placement = _engine_placement(args, app.settings)
    settings = _apply_generation_args(app.settings, args)
    model = load_model(checkpoint=args.checkpoint, bundle=args.bundle, threads=args.threads or settings.threads or None,
                       demo=args.demo, data=app.data_dir, context=settings.context_budget, **placement)
    session = app.session(model.engine, model.tokenizer, model.label, settings)
    session.open(args.conversation)
    turns = session.turns()
    if len(turns) > RESUME_TURNS:
        print(f"({len(turns) - RESUME_TURNS} earlier turns not shown: streamchat history show {args.conversation} "
              "prints them all)")
    for query, answer in turns[-RESUME_TURNS:]:
        print(printable(f"\n> {query}\n{answer}"))
    print(f"StreamChat on {model.label}. Ctrl-C stops an answer, /clear starts a new conversation, /exit quits.")
    if hasattr(sys.stdin, "reconfigure"):  # an undecodable byte typed or piped in becomes U+FFFD, not the end of the chat
        sys.stdin.reconfigure(errors="replace")
    while True:
        try:
            query = input("\n> ")
        except EOFError:
            print()
            session.save_unsaved()  # messages a full disk refused: stored now, or one line saying they are lost
            return 0
        except KeyboardInterrupt:
            print("\n(type /exit to quit)")
            continue
        if query.strip() == "/exit":
            session.save_unsaved()
            return 0
        if query.strip() == "/clear":
            session.clear()
            print("(new conversation)")
            continue
        if not query.strip():
            continue

        def run(put: Callable[[str], None], cancel: threading.Event, q: str = query) -> None:
            for delta in session.send(q, cancel, greedy=args.greedy, seed=args.seed):
                put(delta)

        try:
            _stream_interruptibly(run)
        except Exception as exc:  # the chat goes on: the conversation so far is stored, the line says what failed
            print(f"\nerror: {crash.one_line(exc, 'answering')}", file=sys.stderr)
            continue
        result = session.last
        for note in result.notes:
            print(f"\nnote: {note}", file=sys.stderr)
        if result.blocked_reason:
            print(f"(not sent: {result.blocked_reason})")
        elif result.stopped == "cancelled":
            print(" [stopped]", end="")
        print()


def cmd_export(args: argparse.Namespace) -> int:
    from model_export.export import export_bundle
    from model_export.progress import Progress

    result = export_bundle(args.checkpoint, args.out, target=args.target, quant=args.quant, group_size=args.group_size,
                           embeddings=args.quantize_embeddings, accuracy_level=args.accuracy_level, force=args.force,
                           progress=Progress(enabled=not args.quiet))
    size = sum(f["bytes"] for f in result.manifest["files"])
    print(f"bundle written: {result.bundle} ({size / 1e6:.1f} MB, {result.seconds:.1f} s)")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from appliance.bundle import Bundle

    bundle = Bundle.open(args.bundle, full_check=True)  # also remembers the result for later opens
    size = sum(f["bytes"] for f in bundle.files)
    print(f"ok: {bundle.label}, {len(bundle.files)} files, {size / 1e6:.1f} MB, checksums match")
    return 0


def _local_time(seconds: float) -> str:
    """A stored time as the user reads it; a database written before imports bounded times may hold any number."""
    try:
        return time.strftime("%Y-%m-%d %H:%M", time.localtime(seconds))
    except (OverflowError, OSError, ValueError):
        return "????-??-?? ??:??"


HISTORY_URL_ENV = "STREAMCHAT_HISTORY_URL"


def _add_history_url(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--history-url", metavar="URL", default=None,
                        help="keep conversations in this PostgreSQL database, postgresql://USER@HOST:PORT/DATABASE "
                             f"(default ${HISTORY_URL_ENV}; without either, SQLite in the data folder)")


def _app_context(args: argparse.Namespace) -> AppContext:
    """The app's context with its history where --history-url or $STREAMCHAT_HISTORY_URL says (a PostgreSQL database
    shared by several servers), else in the data folder (SQLite)."""
    from appliance.app import AppContext
    from appliance.history import History

    url = args.history_url or os.environ.get(HISTORY_URL_ENV)
    if not url:
        return AppContext.load()
    app = AppContext.load(with_history=False)
    app.history = History(url)
    return app


def cmd_history(args: argparse.Namespace) -> int:
    from appliance.history import read_export, write_export

    history = _app_context(args).history
    if args.action == "list":
        for c in history.conversations():
            print(f"{c.id:>5}  {_local_time(c.updated)}  {c.messages:>3} msgs  {one_line(c.title)}")
    elif args.action == "show":
        print(printable(history.export_markdown(args.id)))
    elif args.action == "search":
        typed = args.text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")  # undecodable bytes -> U+FFFD
        found = history.search(typed)
        for m in found:
            print(f"[{m.conversation_id}] {m.role}: {one_line(m.text[:200])}")
        if not found:  # on stderr: a script reading the matches gets none
            print(f"no stored message contains {one_line(typed)[:80]!r}", file=sys.stderr)
    elif args.action == "export":
        text = (json.dumps(history.export_json(args.id), ensure_ascii=False, indent=1) if args.format == "json"
                else history.export_markdown(args.id))
        write_export(args.out, text)
        print(f"exported to {args.out}")
    elif args.action == "import":
        document = read_export(args.file)
        added = len(history.import_json(document))
        skipped = len(document["conversations"]) - added  # a document import_json accepted has this list
        print(f"imported {added} conversation(s)" + (f"; skipped {skipped} already in the history" if skipped else ""))
    elif args.action == "delete":
        history.delete(args.id)
        print(f"deleted conversation {args.id}")
    return 0


def conversation_id(text: str) -> int:
    """An argparse type: the ids SQLite can hold (a larger number would overflow inside the query, not say why)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"a conversation id is a whole number from 1 to {2**63 - 1}, got {text[:40]!r}")
    return value


def _add_history_parser(sub) -> None:
    hist = sub.add_parser("history", help="list, show, search, export, import or delete stored conversations",
                          description="Stored conversations (SQLite in the data folder).")
    actions = hist.add_subparsers(dest="action", metavar="ACTION", required=True)
    actions.add_parser("list", help="conversations, newest first")
    actions.add_parser("show", help="one conversation as Markdown").add_argument("id", type=conversation_id)
    actions.add_parser("search", help="messages containing TEXT").add_argument("text")
    export = actions.add_parser("export", help="a conversation (or all) to Markdown or JSON")
    export.add_argument("id", type=conversation_id, nargs="?", default=None)
    export.add_argument("--format", choices=("md", "json"), default="md")
    export.add_argument("--out", type=Path, required=True)
    actions.add_parser("import", help="conversations from a JSON export").add_argument("file", type=Path)
    actions.add_parser("delete", help="delete a conversation for good").add_argument("id", type=conversation_id)
    for action in actions.choices.values():
        _add_history_url(action)
    hist.set_defaults(func=cmd_history)


def cmd_bundle(args: argparse.Namespace) -> int:
    from appliance import bundle_package

    if args.action in ("convert", "smoke-test"):
        return _run_bundle_script(args)
    if args.action == "pack":
        if args.format == "deb" and not shutil.which("dpkg-deb"):
            raise StreamChatError("--format deb needs dpkg-deb (Debian's dpkg package)")
        out = (bundle_package.pack_deb if args.format == "deb" else bundle_package.pack)(args.bundle, args.out)
        print(f"packed {args.bundle} into {out} ({out.stat().st_size / 1e6:.1f} MB)")
    else:
        from appliance.folders import data_dir
        from appliance.settings import load_settings

        into = args.into or data_dir(load_settings()) / "bundles"
        installed = bundle_package.install(args.file, into)
        print(f"installed and verified: {installed}")
    return 0


def _run_bundle_script(args: argparse.Namespace) -> int:
    """An Ascend bundle's conversion or smoke test, with StreamChat's own copy of the script, after the bundle passed
    every check (its converter files byte for byte included); the script's exit status is the command's."""
    import subprocess
    import tempfile

    from appliance.bundle import Bundle
    from appliance.conversion import convert_script
    from appliance.targets import STATIC, TARGETS

    bundle = Bundle.open(args.bundle, full_check=True)
    if TARGETS[bundle.target].graphs != STATIC:
        raise StreamChatError(f"{args.bundle} is a {bundle.target} bundle: only Ascend bundles are converted and "
                              "smoke-tested")
    if args.action == "convert":
        script = convert_script(bundle.manifest["quant"]["weights"])
        return subprocess.run(["bash", "-s", "--", args.route], input=script.encode(), cwd=bundle.path).returncode
    from appliance.ascend_smoke import smoke_script
    from appliance.engines.mindspore_lite import lite_python

    with tempfile.TemporaryDirectory(prefix="streamchat-smoke-") as folder:
        script = Path(folder) / "smoke_test.py"
        script.write_text(smoke_script(), encoding="utf-8")
        return subprocess.run([lite_python(), "-I", str(script), "--bundle", str(bundle.path.resolve()),
                               "--device", args.device, "--device-id", str(args.device_id)]).returncode


def cmd_self_test(args: argparse.Namespace) -> int:
    """Open the configured bundle (or the demo), stream a short answer, store and read it back, clean up."""
    from appliance.app import AppContext
    from appliance.kernels import describe
    from appliance.session import ChatSession
    from streamchat.models import load_model

    app = AppContext.load()
    configured = Path(app.settings.model_bundle) if app.settings.model_bundle else None
    model = load_model(bundle=configured, demo=configured is None, data=app.data_dir, quiet=True)
    app.settings.generation.max_new_tokens = 32
    session = ChatSession(model.engine, model.tokenizer, app.settings, app.history, app.rules, app.audit, model.label)
    answer = "".join(session.send("StreamChat 是什么？", greedy=True))
    stored = app.history.messages(session.conversation_id)
    ok = bool(answer) and [m.role for m in stored] == ["user", "assistant"] and stored[-1].text == answer
    app.history.delete(session.conversation_id)
    print(f"self-test {'ok' if ok else 'FAILED'}: model {model.label}; answer {answer[:60]!r}; history {app.history.path}; "
          f"kernels: {describe()}")
    return 0 if ok else 1


SERVICE_MODULES = ("fastapi", "starlette", "uvicorn", "prometheus_client", "pydantic")


def cmd_serve(args: argparse.Namespace) -> int:
    """The local HTTP/WebSocket service (docs/service.md); each replica opens the model on its own engine."""
    from appliance.engines.cpu import physical_cores
    from appliance.service.config import ServiceConfig, check_config, parse_devices, read_token

    devices = parse_devices(args.devices, args.replicas)
    replicas = 1 if args.replicas is None else args.replicas
    config = ServiceConfig(host=args.host, port=args.port, replicas=replicas, devices=devices, queue=args.queue,
                           token=read_token(args.token_file), allow_origins=tuple(args.allow_origin),
                           client_connections=args.client_connections, log_messages=args.log_messages)
    check_config(config)
    try:
        from appliance.service.server import serve
    except ImportError as exc:
        if (exc.name or "").partition(".")[0] not in SERVICE_MODULES:
            raise
        raise StreamChatError(f"streamchat serve needs {exc.name}: pip install 'streamchat[service]'") from exc
    from streamchat.models import load_model

    app = _app_context(args)
    placement = _engine_placement(args, app.settings)
    threads = args.threads or app.settings.threads or max(1, physical_cores() // config.size)
    if devices:
        serve(config, app, _device_loader(args, app, threads, placement, devices))
        return 0

    def load(replica: int):
        return load_model(bundle=args.bundle, demo=args.demo, threads=threads, data=app.data_dir,
                          context=app.settings.context_budget, quiet=replica > 0, **placement)

    serve(config, app, load)
    return 0


def _device_loader(args: argparse.Namespace, app, threads: int, placement: dict, devices: tuple[int, ...]):
    """``serve --devices``: the bundle (the demo exported first, if it must be) opened in a worker process per device
    id. With ``--device cpu`` the workers run on the CPU and the ids only name them (docs/service.md)."""
    from dataclasses import replace

    from appliance.engines import EngineOptions
    from appliance.engines.worker import load_in_worker
    from appliance.loading import demo_bundle
    from streamchat.models import export_demo

    if args.device_id is not None:
        raise StreamChatError("--device-id picks the one NPU of a single replica; with --devices each replica has its "
                              "own: leave --device-id out")
    bundle = args.bundle or demo_bundle(app.data_dir, export_demo, lambda line: print(line, file=sys.stderr))
    options = EngineOptions(threads=threads, context=app.settings.context_budget, device=placement["device"],
                            weights=placement["weights"])
    if options.device == "cpu":
        print(f"note: --devices with --device cpu: {len(devices)} worker processes on the CPU, the ids only name "
              "them (--device ascend puts one on each NPU)", file=sys.stderr, flush=True)
    return lambda index: load_in_worker(bundle, placement["engine"], replace(options, device_id=devices[index]))


def cmd_gui(args: argparse.Namespace) -> int:
    try:
        from ui.app import run
    except ImportError as exc:
        raise StreamChatError(f"the desktop app needs PySide6 ({exc.name} is missing): pip install 'streamchat[ui]'") \
            from exc
    from streamchat.models import export_demo

    return run(bundle=args.bundle, kiosk=args.kiosk, demo=args.demo, ready_exit=args.ready_exit, export=export_demo)


class OneLineParser(argparse.ArgumentParser):
    """argparse's usage errors as one line (``error: ...``, exit 2) like every other bad input; --help keeps the
    usage. Subcommands' parsers are of this class too (add_subparsers takes the parent's class)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="streamchat", description="Offline chat appliance for ChatGLM-6B.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    gen = sub.add_parser("generate", help="answer one prompt, streaming to stdout",
                         description="Answer one prompt and stream the answer to stdout.")
    _add_model_args(gen)
    gen.add_argument("--prompt", required=True, help="the user's message")
    gen.add_argument("--history", type=Path, metavar="FILE", help="JSON list of [query, response] pairs")
    _add_generation_args(gen)
    gen.add_argument("--json", action="store_true", help="print one JSON object with ids, deltas, stop reason, timings")
    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser("chat", help="interactive terminal chat", description="Interactive terminal chat.")
    _add_model_args(chat)
    _add_generation_args(chat)
    where = chat.add_mutually_exclusive_group()
    where.add_argument("--conversation", type=conversation_id, metavar="ID", help="continue a stored conversation")
    where.add_argument("--new", action="store_true", help="start a new conversation (the default)")
    chat.set_defaults(func=cmd_chat)
    _add_history_parser(sub)

    bundle = sub.add_parser("bundle", help="pack, install, convert (Ascend) or smoke-test (Ascend) a bundle",
                            description="Move model bundles between machines.")
    bundle_actions = bundle.add_subparsers(dest="action", metavar="ACTION", required=True)
    pack = bundle_actions.add_parser("pack", help="one archive holding the bundle, manifest and checksums")
    pack.add_argument("bundle", type=Path, metavar="BUNDLE_DIR")
    pack.add_argument("--out", type=Path, required=True, metavar="FILE")
    pack.add_argument("--format", choices=("tar", "deb"), default="tar",
                      help="tar (for `bundle install`) or deb (installs into /usr/share/streamchat/models)")
    inst = bundle_actions.add_parser("install", help="verify a packed bundle, then switch to it atomically")
    inst.add_argument("file", type=Path, metavar="FILE")
    inst.add_argument("--into", type=Path, default=None, metavar="DIR", help="models folder (default: <data>/bundles)")
    convert = bundle_actions.add_parser("convert", help="check an Ascend bundle, then convert its graphs for this "
                                        "machine's NPU with StreamChat's own convert.sh (hours for a 6B model)")
    convert.add_argument("bundle", type=Path, metavar="BUNDLE_DIR")
    convert.add_argument("--route", choices=("lite", "atc"), default="lite",
                         help="lite: MindSpore Lite's converter_lite -> mindir/ (default); atc: CANN's ATC -> om/")
    smoke = bundle_actions.add_parser("smoke-test", help="check an Ascend bundle, then convert, build and run its "
                                      "one-layer model against the export's logits (minutes; before converting)")
    smoke.add_argument("bundle", type=Path, metavar="BUNDLE_DIR")
    smoke.add_argument("--device", choices=("ascend", "cpu"), default="ascend",
                       help="ascend: on the NPU (default); cpu: the fp32 check graph on Lite's CPU backend")
    smoke.add_argument("--device-id", type=int, default=0, metavar="N", help="the NPU (default 0)")
    bundle.set_defaults(func=cmd_bundle)

    selftest = sub.add_parser("self-test", help="headless check: model, a short answer, history (exit 0 when fine)",
                              description="Open the configured bundle or the demo, answer, store and read history.")
    selftest.set_defaults(func=cmd_self_test)

    serve = sub.add_parser("serve", help="local WebSocket and OpenAI-compatible API (docs/service.md)",
                           description="Serve chat over HTTP: /ws/chat, /v1/chat/completions, /health, /ready, /metrics.")
    served = serve.add_mutually_exclusive_group(required=True)
    served.add_argument("--demo", action="store_true", help="the built-in demo model")
    served.add_argument("--bundle", type=Path, metavar="DIR", help="an exported model bundle")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; any other needs a token)")
    serve.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    serve.add_argument("--replicas", type=int, default=None, metavar="N", help="engines answering at once in this "
                       "process, each with its own KV cache and memory (default 1)")
    serve.add_argument("--devices", default=None, metavar="IDS", help="one replica per accelerator device, each in a "
                       "worker process of its own: 0,1,2,3 with --device ascend (not with --replicas)")
    serve.add_argument("--queue", type=int, default=16, metavar="N", help="requests that may wait for a free replica; "
                       "more are answered 429 (default 16)")
    _add_history_url(serve)
    serve.add_argument("--token-file", type=Path, metavar="FILE", help="bearer token clients must send (first line; "
                       "default: $STREAMCHAT_TOKEN, else none, allowed on loopback only)")
    serve.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                       help="a web origin whose pages may use the server: open /ws/chat and read HTTP answers (CORS, "
                       "off without this flag); repeatable; 'null' for a page opened from a file")
    serve.add_argument("--client-connections", type=int, default=32, metavar="N", help="WebSocket connections plus "
                       "HTTP answers in flight one client address may hold at once (default 32)")
    serve.add_argument("--log-messages", action="store_true", help="log one line per request with its text to stderr "
                       "(default: no message text is logged)")
    serve.add_argument("--threads", type=int, default=None, help="CPU threads per replica (default: the physical "
                       "cores shared among the replicas)")
    _add_device_args(serve)
    serve.set_defaults(func=cmd_serve)

    gui = sub.add_parser("gui", help="the desktop chat window (the default command)",
                         description="Open the chat window (the built-in demo model when no bundle is configured).")
    gui.add_argument("--bundle", type=Path, metavar="DIR", help="a model bundle (default: from settings, else the demo)")
    gui.add_argument("--demo", action="store_true", help="use the built-in demo model")
    gui.add_argument("--kiosk", action="store_true", help="full screen, unattended kiosk mode")
    gui.add_argument("--ready-exit", action="store_true", help=argparse.SUPPRESS)  # installers/test.sh: cold start
    gui.set_defaults(func=cmd_gui)

    from appliance.model.quantize import GROUP_SIZES
    from appliance.model.weights import WEIGHT_PRECISIONS
    from appliance.targets import describe_targets

    export = sub.add_parser("export", help="convert a checkpoint into a verified model bundle",
                            description="Convert a THUDM ChatGLM-6B checkpoint into a quantized, self-verified bundle.")
    export.add_argument("checkpoint", type=Path, metavar="CHECKPOINT_DIR")
    export.add_argument("--target", default="cpu", metavar="NAME", help=f"{describe_targets()} (default cpu)")
    export.add_argument("--quant", default=None, metavar="PREC",
                        help=f"{' | '.join(WEIGHT_PRECISIONS)} (default: the target's first, int4 for cpu, int8 for "
                             "Ascend, which offers int8 | fp16 | fp32)")
    export.add_argument("--group-size", type=int, default=128, help=f"INT4/INT8 group size, one of {GROUP_SIZES}")
    export.add_argument("--quantize-embeddings", default=None, metavar="PREC",
                        help=f"lm_head/embedding precision: {' | '.join(WEIGHT_PRECISIONS)} (default int8 for int4/int8 "
                             "bundles, else as --quant)")
    export.add_argument("--accuracy-level", type=int, default=4, choices=(0, 1, 2, 3, 4),
                        help="MatMulNBits accuracy level (4: int8 activations, fastest; 0: fp32)")
    export.add_argument("--out", type=Path, required=True, metavar="BUNDLE_DIR")
    export.add_argument("--force", action="store_true", help="replace an existing bundle (only after success)")
    export.add_argument("--quiet", action="store_true", help="no progress bars")
    export.set_defaults(func=cmd_export)

    check = sub.add_parser("verify", help="check a bundle's files against its manifest checksums",
                           description="Check every file of a bundle against the sha256 in its manifest.")
    check.add_argument("bundle", type=Path, metavar="BUNDLE_DIR")
    check.set_defaults(func=cmd_verify)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--self-test"]:
        argv = ["self-test", *argv[1:]]
    doing = "starting"
    try:
        crash.check_address_space()
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            args = parser.parse_args(["gui", *argv])
        doing = f"running `streamchat {args.command or 'gui'}`"
        code = args.func(args)
        sys.stdout.flush()  # here, where a reader that left is a BrokenPipeError below, not a message at exit
        return code
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader left (`streamchat history list | head -1`): stop quietly, as `cat` would
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit-time flush cannot fail again
        return EXIT_BROKEN_PIPE
    except Exception as exc:
        print(f"error: {crash.one_line(exc, doing)}", file=sys.stderr)
        return EXIT_USAGE if crash.expected(exc) else EXIT_BUG


if __name__ == "__main__":
    sys.exit(main())
