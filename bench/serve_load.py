"""Load on ``streamchat serve``: concurrent WebSocket clients on the demo model, and the server's cost per token.

The real server runs in a subprocess on a free port with its own config, data and cache folders. Each client holds one
conversation of ``--turns`` turns (a different short prompt each turn, sampling with a fixed seed); every turn's deltas
joined must be exactly the answer the server stored in the history, and every turn must stream deltas then one
``done`` in the client's conversation. The demo model is tiny, so the numbers measure the service (queue, threads,
event loop, WebSocket frames, history writes), not a model.

The overhead table compares one client's greedy answers through the server with the same prompts answered by
``ChatSession`` in this process on the same bundle and thread count, in alternating rounds (the idle server waits
while this process answers), split into what
serving costs each decode step (the model's step time as the pipeline measures it, in the server's worker thread and
here) and what it costs once per answer (request, session, history writes, frames: outside the generation).

    python bench/serve_load.py [--clients 32] [--turns 5] [--replicas 1]

Exits 1 if any request failed, a turn's deltas differ from its stored answer, frames came out of order, or greedy
answers through the server differ from the in-process ones.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import websockets

from appliance.engines.cpu import physical_cores
from appliance.history import History

PROMPTS = ("StreamChat 是什么？", "这个软件需要联网吗？", "你好", "What can you do?", "今天天气怎么样？",
           "Tell me a short story.", "怎么保存对话？", "What is a token?")
READY_TIMEOUT_S = 300
DECODE_STEP_MS = 250  # ChatGLM-6B INT4 on a desktop CPU, as in bench/overhead.py: what the overhead adds to in use


@dataclass
class TurnLog:
    """One turn as the client saw it: when it was sent, each delta and when it arrived, the closing frame."""

    prompt: str
    sent: float
    deltas: list[str] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)
    end: dict = field(default_factory=dict)
    ended: float = 0.0


@dataclass
class ClientLog:
    turns: list[TurnLog] = field(default_factory=list)
    failure: str = ""  # the connection failed (an exception): the client's remaining turns did not run
    stray_frames: int = 0  # frames that arrived after the last turn's ``done``


def cpu_name() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")),
                "unknown CPU")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def folders_env(root: Path) -> dict[str, str]:
    return {"STREAMCHAT_CONFIG_DIR": str(root / "config"), "STREAMCHAT_DATA_DIR": str(root / "data"),
            "STREAMCHAT_CACHE_DIR": str(root / "cache")}


class Server:
    """``streamchat serve --demo`` in a subprocess, ready when the constructor returns."""

    def __init__(self, root: Path, replicas: int, queue: int, threads: int) -> None:
        self.port = free_port()
        self.url, self.ws_url = f"http://127.0.0.1:{self.port}", f"ws://127.0.0.1:{self.port}/ws/chat"
        self.log = root / "serve.log"
        with self.log.open("w") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "streamchat", "serve", "--demo", "--port", str(self.port), "--replicas",
                 str(replicas), "--queue", str(queue), "--threads", str(threads)],
                env={**os.environ, **folders_env(root)}, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"serve_load: the server exited with {self.process.returncode}: {self.last_line()}")
            try:
                if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise SystemExit(f"serve_load: the server was not ready after {READY_TIMEOUT_S} s: {self.last_line()}")

    def last_line(self) -> str:
        lines = self.log.read_text(errors="replace").strip().splitlines()
        return lines[-1] if lines else "(no output)"

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)


async def turn(ws, prompt: str, options: dict) -> TurnLog:
    """Send one message and read its deltas up to the first other frame (``done`` or ``error``)."""
    log = TurnLog(prompt, time.perf_counter())
    await ws.send(json.dumps({"text": prompt, **options}))
    while True:
        frame = json.loads(await ws.recv())
        now = time.perf_counter()
        if frame.get("type") != "delta":
            log.end, log.ended = frame, now
            return log
        log.deltas.append(frame.get("text"))
        log.arrivals.append(now)


async def client(url: str, index: int, turns: int, max_new_tokens: int) -> ClientLog:
    log = ClientLog()
    try:
        async with websockets.connect(url) as ws:
            for t in range(turns):
                log.turns.append(await turn(ws, PROMPTS[t], {"seed": index * 1000 + t,
                                                            "max_new_tokens": max_new_tokens}))
            try:
                while True:
                    await asyncio.wait_for(ws.recv(), 0.2)
                    log.stray_frames += 1
            except asyncio.TimeoutError:
                pass
    except Exception as exc:  # counted as an error; the other clients go on
        log.failure = f"{type(exc).__name__}: {exc}"
    return log


async def load(url: str, clients: int, turns: int, max_new_tokens: int) -> tuple[list[ClientLog], float]:
    start = time.perf_counter()
    logs = await asyncio.gather(*(client(url, i, turns, max_new_tokens) for i in range(clients)))
    return list(logs), time.perf_counter() - start


@dataclass
class Check:
    errors: int = 0
    mismatched: int = 0  # turns whose joined deltas are not the stored answer
    order_faults: int = 0
    notes: list[str] = field(default_factory=list)


def check(logs: list[ClientLog], turns: int, history: History) -> Check:
    """Errors, turns whose deltas lost or duplicated text against the stored answer, frames out of order."""
    result, seen = Check(), set()
    for index, log in enumerate(logs):
        if log.failure:
            result.errors += 1
            result.notes.append(f"client {index}: {log.failure}")
        result.order_faults += log.stray_frames
        ids = {t.end.get("conversation_id") for t in log.turns}
        for t in log.turns:
            if t.end.get("type") == "error":
                result.errors += 1
                result.notes.append(f"client {index}: error frame {t.end.get('message')}")
            elif t.end.get("type") != "done" or not all(isinstance(d, str) and d for d in t.deltas):
                result.order_faults += 1
        if log.failure or any(t.end.get("type") != "done" for t in log.turns):
            continue
        if len(ids) != 1 or ids & seen:  # one conversation per client, not shared with another
            result.order_faults += 1
            continue
        seen |= ids
        stored = history.messages(ids.pop())
        if [m.role for m in stored] != ["user", "assistant"] * turns:
            result.mismatched += turns
            result.notes.append(f"client {index}: stored roles {[m.role for m in stored]}")
            continue
        for t, question, answer in zip(log.turns, stored[::2], stored[1::2], strict=True):
            if question.text != t.prompt or answer.text != "".join(t.deltas):
                result.mismatched += 1
                result.notes.append(f"client {index}: streamed {''.join(t.deltas)!r} but stored {answer.text!r}")
    return result


def histogram_p99(metrics: str, name: str) -> str:
    """P99 of a Prometheus histogram in a /metrics text, as the upper bound of the bucket it falls in (what
    ``histogram_quantile`` would interpolate within): the server times each token as the model makes it."""
    buckets = []
    for line in metrics.splitlines():
        if line.startswith(f"{name}_bucket{{"):
            bound = line.split('le="', 1)[1].split('"', 1)[0]
            buckets.append((float(bound), float(line.rpartition(" ")[2])))
    if not buckets or buckets[-1][1] == 0:
        return "n/a"
    bound = next(b for b, count in buckets if count >= 0.99 * buckets[-1][1])
    return f"<= {bound * 1000:g} ms" if bound != float("inf") else f"> {buckets[-2][0] * 1000:g} ms"


def percentile_ms(values: list[float], q: float) -> str:
    return f"{np.percentile(values, q) * 1000:.1f} ms" if values else "n/a"


@dataclass
class OneClient:
    """One client's greedy answers, one new conversation each: wall time from each send (or call) to its end, the
    time the generation itself took (prefill + decode, as the pipeline times it), decode time alone, tokens."""

    wall_ms: float = 0.0
    generation_ms: float = 0.0
    decode_ms: float = 0.0
    tokens: int = 0
    answers: list[str] = field(default_factory=list)

    def add(self, wall_ms: float, timings: dict, answer: str) -> None:
        decode_ms = timings["decode_ms_per_token"] * timings["tokens"]
        self.wall_ms += wall_ms
        self.generation_ms += timings["prefill_ms"] + decode_ms
        self.decode_ms += decode_ms
        self.tokens += timings["tokens"]
        self.answers.append(answer)

    @property
    def decode_ms_per_token(self) -> float:
        return self.decode_ms / self.tokens

    @property
    def outside_ms_per_answer(self) -> float:
        """Everything but the generation: request, session, history writes, frames."""
        return (self.wall_ms - self.generation_ms) / len(self.answers)


async def served_greedy(url: str, prompts: tuple[str, ...], max_new_tokens: int) -> OneClient:
    """One client through the server, each prompt a new conversation (timings from each ``done`` frame)."""
    run = OneClient()
    for prompt in prompts:
        async with websockets.connect(url) as ws:
            log = await turn(ws, prompt, {"greedy": True, "max_new_tokens": max_new_tokens})
        if log.end.get("type") != "done":
            raise SystemExit(f"serve_load: the one-client run failed: {log.end}")
        run.add((log.ended - log.sent) * 1000, log.end["timings"], "".join(log.deltas))
    return run


def in_process_answerer(root: Path, threads: int, max_new_tokens: int) -> Callable[[tuple[str, ...]], OneClient]:
    """A round of prompts answered by ChatSession in this process the server's way (a new conversation per prompt,
    stored in the same history), on the same bundle and thread count; warmed up."""
    os.environ.update(folders_env(root))
    from appliance.app import AppContext
    from appliance.service.options import generation_settings
    from streamchat.models import load_model

    app = AppContext.load()
    model = load_model(demo=True, data=app.data_dir, threads=threads, quiet=True, context=app.settings.context_budget)
    settings = generation_settings(app.settings, {"max_new_tokens": max_new_tokens})

    def answer_round(prompts: tuple[str, ...]) -> OneClient:
        run = OneClient()
        for prompt in prompts:
            start = time.perf_counter()
            session = app.session(model.engine, model.tokenizer, model.label, settings)
            session.open(None)
            text = "".join(session.send(prompt, greedy=True))
            run.add((time.perf_counter() - start) * 1000, session.last.generation.timings(), text)
        return run

    answer_round(PROMPTS[:1])  # warm-up
    return answer_round


# (label, measure of one round, compared as a ratio rather than a difference)
OVERHEAD_ROWS: tuple[tuple[str, Callable[[OneClient], float], bool], ...] = (
    ("decode, ms per token (the model's steps, timed inside the pipeline)", lambda r: r.decode_ms_per_token, True),
    ("outside the generation, ms per answer (request, session, history, frames)", lambda r: r.outside_ms_per_answer,
     False),
    ("send to end, ms per token", lambda r: r.wall_ms / r.tokens, True),
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=32, help="concurrent WebSocket clients (default 32)")
    parser.add_argument("--turns", type=int, default=5, help=f"turns per client, 1 to {len(PROMPTS)} (default 5)")
    parser.add_argument("--replicas", type=int, default=1, help="server replicas (default 1)")
    parser.add_argument("--queue", type=int, default=None, help="server queue places (default: 2 x clients)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens per answer at most (default 64)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of the one-client overhead run (default 5)")
    parser.add_argument("--threads", type=int, default=None,
                        help="engine threads per replica, here and in the server (default: the physical cores shared "
                             "among the replicas; fewer leave a core to the clients, which run on the same machine)")
    args = parser.parse_args()
    if not 1 <= args.turns <= len(PROMPTS):
        parser.error(f"--turns must be between 1 and {len(PROMPTS)} (one different prompt per turn)")
    if args.clients < 1 or args.rounds < 1 or args.max_new_tokens < 1:
        parser.error("--clients, --rounds and --max-new-tokens must be at least 1")
    threads = args.threads or max(1, physical_cores() // args.replicas)
    prompts = PROMPTS[:args.turns]

    with tempfile.TemporaryDirectory(prefix="streamchat-load-") as tmp:
        root = Path(tmp)
        server = Server(root, args.replicas, args.queue if args.queue is not None else 2 * args.clients, threads)
        try:
            asyncio.run(served_greedy(server.ws_url, prompts[:1], args.max_new_tokens))  # warm-up
            answer_round = in_process_answerer(root, threads, args.max_new_tokens)
            served, local = [], []
            for _ in range(args.rounds):  # alternating, so the machine's load changes touch both sides alike
                served.append(asyncio.run(served_greedy(server.ws_url, prompts, args.max_new_tokens)))
                local.append(answer_round(prompts))
            logs, wall = asyncio.run(load(server.ws_url, args.clients, args.turns, args.max_new_tokens))
            inter_token_p99 = histogram_p99(httpx.get(server.url + "/metrics").text, "streamchat_inter_token_seconds")
        finally:
            server.stop()
        found = check(logs, args.turns, History(root / "data"))

    done = [t for log in logs for t in log.turns if t.end.get("type") == "done"]
    ttft = [t.arrivals[0] - t.sent for t in done if t.arrivals]
    gaps = [b - a for t in done for a, b in zip(t.arrivals, t.arrivals[1:], strict=False)]
    tokens = sum(t.end["timings"]["tokens"] for t in done)
    same = all(run.answers == local[0].answers for run in served + local)

    print(f"CPU: {cpu_name()} ({os.cpu_count()} logical CPUs, {threads} thread(s) per replica); built-in demo model "
          f"(tiny: this measures the service, not the model)\n")
    print("| clients x turns | replicas | TTFT P50 | TTFT P99 | inter-token P99 | between frames P99 | throughput "
          "| errors | lost or duplicated deltas | frames out of order |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {args.clients} x {args.turns} | {args.replicas} | {percentile_ms(ttft, 50)} | {percentile_ms(ttft, 99)} "
          f"| {inter_token_p99} | {percentile_ms(gaps, 99)} | {tokens / wall:.0f} tokens/s ({tokens} in {wall:.1f} s) "
          f"| {found.errors} | {found.mismatched} | {found.order_faults} |")
    print(f"\n| one client, greedy, {len(prompts)} prompts x {args.rounds} rounds (medians of rounds) | in process "
          "| through the server | overhead |")
    print("|---|---|---|---|")
    for label, measure, relative in OVERHEAD_ROWS:
        here, there = (statistics.median(measure(run) for run in runs) for runs in (local, served))
        change = f"{there / here - 1:+.1%}" if relative else f"{there - here:+.2f} ms"
        print(f"| {label} | {here:.3f} | {there:.3f} | {change} |")
    outside = statistics.median(r.outside_ms_per_answer for r in served) - statistics.median(
        r.outside_ms_per_answer for r in local)
    print(f"\nThe per-token overhead (target < 2%) is the decode row: what serving costs each step. The rest is paid "
          f"once per answer: {outside / (100 * DECODE_STEP_MS):+.3%} of a 100-token answer at ChatGLM-6B's "
          f"{DECODE_STEP_MS} ms per token.")
    print(f"\ngreedy answers through the server equal the in-process ones: {'yes' if same else 'NO'}")
    for note in found.notes[:10]:
        print(note, file=sys.stderr)
    return 1 if found.errors or found.mismatched or found.order_faults or not same else 0


if __name__ == "__main__":
    sys.exit(main())
