"""``streamchat serve``: the real server (a subprocess on a free port, the demo model) and real clients: the
``websockets`` client, the ``openai`` SDK and httpx."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
import websockets

from appliance.history import History
from tests.ports import free_port

PROMPT = "StreamChat 是什么？"
LONG = {"text": "hello", "temperature": 5, "top_k": 0, "top_p": 1, "seed": 0, "max_new_tokens": 8192}
LONG_TOKENS = 504  # LONG's answer runs into the demo's 512-token context (see test_long_answer_runs_to_the_context)
TOKEN = "0123456789abcdef-test-token"
JSON = {"Content-Type": "application/json"}
OPENAI_LONG = {"messages": [{"role": "user", "content": "hello"}], "temperature": 5, "top_k": 0, "top_p": 1,
               "seed": 0, "max_tokens": 8192}


def _env(root: Path) -> dict[str, str]:
    return {**os.environ, "STREAMCHAT_CONFIG_DIR": str(root / "config"), "STREAMCHAT_DATA_DIR": str(root / "data"),
            "STREAMCHAT_CACHE_DIR": str(root / "cache"), "PYTHONIOENCODING": "utf-8"}


class Server:
    def __init__(self, root: Path, *args: str, host: str = "127.0.0.1") -> None:
        """``host`` as a URL writes it (``[::1]``), given to ``--host`` the same way."""
        self.root, self.port = root, free_port()
        self.url = f"http://{host}:{self.port}"
        self.ws_url = f"ws://{host}:{self.port}/ws/chat"
        self.env = _env(root)
        self.process = subprocess.Popen([sys.executable, "-m", "streamchat", "serve", "--demo", "--port", str(self.port),
                                         "--host", host, *args], env=self.env, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.process.communicate()[1]
            try:
                if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError("the server did not become ready")

    def history(self) -> History:
        return History(self.root / "data")

    def stop(self) -> str:
        self.process.terminate()
        _, err = self.process.communicate(timeout=60)
        return err


@pytest.fixture
def server(tmp_path):
    started = []

    def start(*args: str, host: str = "127.0.0.1") -> Server:
        started.append(Server(tmp_path, *args, host=host))
        return started[-1]

    yield start
    for s in started:
        s.stop()


def generate(env: dict[str, str], *args: str) -> dict:
    run = subprocess.run([sys.executable, "-m", "streamchat", "generate", "--demo", "--json", *args], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


async def _answer(ws, frame: dict | str) -> tuple[list[str], dict]:
    """Send one message; the streamed deltas and the closing frame (done or error)."""
    await ws.send(frame if isinstance(frame, str) else json.dumps(frame))
    deltas = []
    while True:
        reply = json.loads(await ws.recv())
        if reply["type"] != "delta":
            return deltas, reply
        deltas.append(reply["text"])


def test_websocket_streams_the_stored_answer_and_greedy_equals_generate(server):
    srv = server()

    async def chat():
        async with websockets.connect(srv.ws_url) as ws:
            first = await _answer(ws, {"text": PROMPT, "greedy": True, "max_new_tokens": 64})
            second = await _answer(ws, "这个软件需要联网吗？")  # a plain text frame continues the conversation
            return first, second

    (deltas, done), (deltas2, done2) = asyncio.run(chat())
    assert done["type"] == "done" and done["stop_reason"] == "eos", done
    assert done2["type"] == "done" and done2["conversation_id"] == done["conversation_id"]
    assert done["timings"]["tokens"] > 5 and done["timings"]["ttft_ms"] > 0
    stored = srv.history().messages(done["conversation_id"])
    assert [m.role for m in stored] == ["user", "assistant", "user", "assistant"]
    assert stored[0].text == PROMPT and stored[1].text == "".join(deltas) and stored[3].text == "".join(deltas2)
    assert stored[1].stop_reason == "eos" and stored[1].settings["max_new_tokens"] == 64
    assert generate(srv.env, "--prompt", PROMPT, "--greedy", "--max-new-tokens", "64")["response"] == "".join(deltas)


def test_long_answer_runs_to_the_context(server):
    """The long request the cancellation tests stop: without a stop it runs to the demo's context."""
    srv = server()
    reference = generate(srv.env, "--prompt", LONG["text"], "--temperature", "5", "--top-k", "0", "--top-p", "1",
                         "--seed", "0", "--max-new-tokens", "8192")
    assert reference["stopped"] == "context" and len(reference["token_ids"]) == LONG_TOKENS

    async def chat():
        async with websockets.connect(srv.ws_url) as ws:
            return await _answer(ws, LONG)

    deltas, done = asyncio.run(chat())
    assert "".join(deltas) == reference["response"] and done["stop_reason"] == "context"


def test_stop_frame_cancels_within_one_token(server):
    srv = server()

    async def chat():
        async with websockets.connect(srv.ws_url) as ws:
            await ws.send(json.dumps(LONG))
            deltas = [json.loads(await ws.recv())["text"]]
            await ws.send(json.dumps({"type": "stop"}))
            while (reply := json.loads(await ws.recv()))["type"] == "delta":
                deltas.append(reply["text"])
            return deltas, reply

    deltas, done = asyncio.run(chat())
    assert done["type"] == "done" and done["stop_reason"] == "cancelled"
    tokens = done["timings"]["tokens"]
    assert tokens < LONG_TOKENS // 4, tokens  # the tokens made while the stop frame travelled, then one more at most
    answer = srv.history().messages(done["conversation_id"])[-1]
    assert answer.stop_reason == "cancelled" and answer.text == "".join(deltas) and answer.timings["tokens"] == tokens


def test_disconnect_cancels_and_stores_the_answer(server):
    srv = server()

    async def leave():
        async with websockets.connect(srv.ws_url) as ws:
            await ws.send(json.dumps(LONG))
            await ws.recv()

    asyncio.run(leave())
    history = srv.history()
    deadline = time.monotonic() + 30
    while not ((conv := history.conversations()) and len(history.messages(conv[0].id)) == 2):
        assert time.monotonic() < deadline, "the cancelled answer was not stored"
        time.sleep(0.05)
    answer = history.messages(conv[0].id)[1]
    assert answer.stop_reason == "cancelled" and answer.timings["tokens"] < LONG_TOKENS // 4


def test_openai_sdk_streaming_and_not(server):
    srv = server()
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused")
    assert [m.id for m in client.models.list()] == ["streamchat-demo-int8"]
    expected = generate(srv.env, "--prompt", PROMPT, "--greedy", "--max-new-tokens", "64")["response"]
    messages = [{"role": "user", "content": PROMPT}]
    reply = client.chat.completions.create(model="any", messages=messages, temperature=0, max_tokens=64)
    assert reply.choices[0].message.content == expected and reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens > 5 and reply.model == "streamchat-demo-int8"
    chunks = list(client.chat.completions.create(model="any", messages=messages, temperature=0, max_tokens=64,
                                                 stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens
    short = client.chat.completions.create(model="any", messages=messages, temperature=0, max_tokens=3)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3

    # history rounds and a system message map onto ChatGLM's prompt as generate --history builds it with the same
    # system prompt in its settings (appliance.prompt: the system round first)
    history = srv.root / "h.json"
    history.write_text(json.dumps([[PROMPT, expected]], ensure_ascii=False), encoding="utf-8")
    turns = [{"role": "system", "content": "简短回答。"}, *messages, {"role": "assistant", "content": expected},
             {"role": "user", "content": "需要联网吗？"}]
    multi = client.chat.completions.create(model="any", messages=turns, temperature=0, max_tokens=64)
    (srv.root / "system-config").mkdir()
    (srv.root / "system-config" / "settings.json").write_text('{"system_prompt": "简短回答。"}', encoding="utf-8")
    same = generate({**srv.env, "STREAMCHAT_CONFIG_DIR": str(srv.root / "system-config")}, "--prompt", "需要联网吗？",
                    "--history", str(history), "--greedy", "--max-new-tokens", "64")
    assert multi.choices[0].message.content == same["response"]
    assert multi.usage.prompt_tokens == len(same["prompt_ids"])
    assert srv.history().conversations() == []  # OpenAI requests are not stored


def test_openai_bad_requests_get_400_in_openai_shape(server):
    srv = server()
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="temperature must be 0 or more"):
        client.chat.completions.create(model="any", messages=[{"role": "user", "content": "hi"}], temperature=-1)
    cases = {
        b'{"messages": [{"role": "user", "content": "hi"}': "malformed JSON",
        b'{"messages": []}': "messages must be a non-empty list",
        b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}':
            "the last message (other than system messages) must be from the user",
        b'{"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}': "temperature must be a number",
        b'{"messages": [{"role": "user", "content": "hi"}], "top_k": 1.5}': "top_k must be int",
        b'{"messages": [{"role": "robot", "content": "hi"}]}': "role is one of",
        b'{"messages": [{"role": "user", "content": "hi"}], "frobnicate": 1, "stop": ["x"], "max_tokens": 2}': "",
    }
    for body, message in cases.items():
        reply = httpx.post(srv.url + "/v1/chat/completions", content=body, headers=JSON, timeout=30)
        if not message:  # unknown and unsupported parameters are ignored
            assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 2
            continue
        assert reply.status_code == 400, body
        error = reply.json()["error"]
        assert message in error["message"] and error["type"] == "invalid_request_error", error
    metrics = httpx.get(srv.url + "/metrics").text
    assert 'streamchat_errors_total{kind="bad_request"} 7.0' in metrics


def test_full_queue_answers_429_and_an_error_frame(server):
    srv = server("--replicas", "1", "--queue", "1")

    async def crowd():
        async with websockets.connect(srv.ws_url) as running, websockets.connect(srv.ws_url) as queued, \
                websockets.connect(srv.ws_url) as refused:
            await running.send(json.dumps(LONG))
            await running.recv()  # the only replica is answering
            await queued.send(json.dumps(LONG))  # waits in the queue's one place
            await asyncio.sleep(0.02)
            async with httpx.AsyncClient() as http:
                over = await http.post(srv.url + "/v1/chat/completions",
                                       json={"messages": [{"role": "user", "content": "hi"}]})
            await refused.send(json.dumps(LONG))
            frame = json.loads(await refused.recv())
            _, first = await _answer(running, {"type": "stop"})
            _, second = await _answer(queued, {"type": "stop"})
            return over, frame, first, second

    over, frame, first, second = asyncio.run(crowd())
    assert over.status_code == 429 and over.headers["retry-after"] == "1"
    assert "busy" in over.json()["error"]["message"]
    assert frame["type"] == "error" and frame["retry_after"] == 1 and "busy" in frame["message"]
    assert first["stop_reason"] == "cancelled" and second["type"] == "done"  # the queued request was answered
    assert "streamchat_errors_total{kind=\"queue_full\"} 2.0" in httpx.get(srv.url + "/metrics").text


def test_non_loopback_bind_without_token_refuses_to_start(tmp_path):
    env = {k: v for k, v in _env(tmp_path).items() if k != "STREAMCHAT_TOKEN"}
    run = subprocess.run([sys.executable, "-m", "streamchat", "serve", "--demo", "--host", "0.0.0.0", "--port",
                          str(free_port())], env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert run.stderr == ("error: --host 0.0.0.0 is not a loopback address: give --token-file FILE or set "
                          "$STREAMCHAT_TOKEN so that clients must authenticate\n")


def test_an_ipv6_loopback_in_url_brackets_binds_and_answers(server):
    srv = server(host="[::1]")
    reply = httpx.post(srv.url + "/v1/chat/completions",
                       json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"]
    assert f"on http://[::1]:{srv.port} (1 replica(s))" in srv.stop()


def test_token_and_size_limits_give_clear_errors_while_serving_others(server, tmp_path):
    (tmp_path / "token").write_text(TOKEN + "\n", encoding="utf-8")
    srv = server("--token-file", str(tmp_path / "token"))
    good = {"Authorization": f"Bearer {TOKEN}"}
    hi = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    assert httpx.get(srv.url + "/health").status_code == 200  # probes need no token
    for headers in ({}, {"Authorization": "Bearer wrong-token-of-some-length"}):
        reply = httpx.post(srv.url + "/v1/chat/completions", json=hi, headers=headers)
        assert reply.status_code == 401 and reply.json()["error"]["message"].startswith("unauthorized")
    assert httpx.get(srv.url + "/metrics").status_code == 401
    big = httpx.post(srv.url + "/v1/chat/completions", content=b"{" + b" " * (1 << 20) + b"}", headers={**good, **JSON})
    assert big.status_code == 413 and "limit is 1048576" in big.json()["error"]["message"]
    long = {"messages": [{"role": "user", "content": "长" * 16001}]}
    reply = httpx.post(srv.url + "/v1/chat/completions", json=long, headers=good)
    assert reply.status_code == 400
    assert reply.json()["error"]["message"] == "messages[0].content has 16001 characters; the limit is 16000"

    async def sockets():
        async with websockets.connect(srv.ws_url) as ws:
            refused = json.loads(await ws.recv())
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await ws.recv()
        async with websockets.connect(srv.ws_url, additional_headers=good) as ws:
            malformed = await _answer(ws, '{"text": ')
            too_long = await _answer(ws, "长" * 16001)
            fine = await _answer(ws, {"text": PROMPT, "greedy": True})
        async with websockets.connect(f"{srv.ws_url}?token={TOKEN}") as ws:
            by_query = await _answer(ws, {"text": PROMPT, "greedy": True})
        return refused, closed.value.rcvd.code, malformed, too_long, fine, by_query

    refused, code, malformed, too_long, fine, by_query = asyncio.run(sockets())
    assert refused["type"] == "error" and refused["message"].startswith("unauthorized") and code == 1008
    assert malformed[1]["message"].startswith("malformed JSON")
    assert too_long[1]["message"] == "the message has 16001 characters; the limit is 16000"
    assert fine[1]["type"] == by_query[1]["type"] == "done" and "".join(fine[0]) == "".join(by_query[0])
    answered = httpx.post(srv.url + "/v1/chat/completions", json=hi, headers=good)
    assert answered.status_code == 200 and answered.json()["usage"]["completion_tokens"] >= 1


def test_missing_service_extra_is_one_line(tmp_path):
    """Without fastapi (the ``service`` extra) ``serve`` says what to install; nothing else needs it."""
    hide = ("import sys\n"
            "class Hide:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.partition('.')[0] == 'fastapi':\n"
            "            raise ImportError(f'No module named {name!r}', name=name)\n"
            "sys.meta_path.insert(0, Hide())\n"
            "from streamchat.cli import main\n"
            "import appliance.app, appliance.session\n"
            "sys.exit(main(['serve', '--demo']))\n")
    run = subprocess.run([sys.executable, "-c", hide], env=_env(tmp_path), capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert run.stderr == "error: streamchat serve needs fastapi: pip install 'streamchat[service]'\n"


def test_sigterm_cancels_and_stores_the_answer_in_flight(server):
    srv = server()

    async def chat():
        async with websockets.connect(srv.ws_url) as ws:
            await ws.send(json.dumps(LONG))
            await ws.recv()
            srv.process.terminate()
            with pytest.raises(websockets.ConnectionClosed) as closed:
                while True:
                    await ws.recv()
            return closed.value.rcvd.code

    assert asyncio.run(chat()) == 1012  # "service restart"
    assert srv.process.wait(timeout=60) == -15
    conversation = srv.history().conversations()[0]
    answer = srv.history().messages(conversation.id)[-1]
    assert answer.role == "assistant" and answer.stop_reason == "cancelled" and answer.timings["tokens"] < LONG_TOKENS


def test_pool_serves_waiting_requests_in_arrival_order():
    from appliance.service.pool import EnginePool, QueueFull, Replica

    async def run():
        pool = EnginePool(size=1, queue_limit=2, retry_after=1)
        pool.bind(asyncio.get_running_loop())
        pool.add(Replica(0, None))
        await asyncio.sleep(0)
        first = await pool.acquire()
        order = []

        async def wait(name: str) -> None:
            replica = await pool.acquire()
            order.append(name)
            pool.release(replica)

        waiters = [asyncio.create_task(wait(name)) for name in ("second", "third")]
        await asyncio.sleep(0)
        with pytest.raises(QueueFull, match="2 requests waiting"):
            await pool.acquire()
        assert (pool.waiting, pool.busy) == (2, 1)
        pool.release(first)
        await asyncio.gather(*waiters)
        return order, pool.waiting, pool.busy

    assert asyncio.run(run()) == (["second", "third"], 0, 0)


def _metric(srv: Server, name: str) -> float:
    """One sample of the server's /metrics, by its full name with labels."""
    for line in httpx.get(srv.url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.rpartition(" ")[2])
    raise AssertionError(f"no metric {name}")


def _wait_for(condition, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def _raw_post(srv: Server, body: dict) -> socket.socket:
    """A non-streaming completion request on a bare socket, so the test can leave without reading the answer."""
    data = json.dumps(body).encode()
    conn = socket.create_connection(("127.0.0.1", srv.port))
    conn.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(data) + data)
    return conn


def test_a_queued_message_for_a_busy_conversation_is_refused(server):
    """With two replicas busy, a second message for a conversation that already has one queued is refused at once
    (it used to queue too, and both answers interleaved in the stored conversation)."""
    srv = server("--replicas", "2")

    async def chat():
        async with websockets.connect(srv.ws_url) as ws:
            _, first = await _answer(ws, {"text": "first", "max_new_tokens": 3})
        conversation = first["conversation_id"]
        async with websockets.connect(srv.ws_url) as b1, websockets.connect(srv.ws_url) as b2, \
                websockets.connect(srv.ws_url) as a, websockets.connect(srv.ws_url) as b:
            for blocker in (b1, b2):
                await blocker.send(json.dumps(LONG))
                await blocker.recv()  # both replicas are answering
            await a.send(json.dumps({"text": "A", "conversation_id": conversation, "max_new_tokens": 3}))
            await asyncio.sleep(0.05)
            refused = await asyncio.wait_for(_answer(b, {"text": "B", "conversation_id": conversation}), 10)
            for blocker in (b1, b2):
                await _answer(blocker, {"type": "stop"})
            while (answered := json.loads(await asyncio.wait_for(a.recv(), 30)))["type"] == "delta":
                pass
        return conversation, refused[1], answered

    conversation, refused, answered = asyncio.run(chat())
    assert refused == {"type": "error", "message": f"conversation {conversation} is answering another message: "
                                                   "wait for its end"}
    assert answered["type"] == "done" and answered["conversation_id"] == conversation
    stored = srv.history().messages(conversation)
    assert [(m.role, m.text) for m in stored][::2] == [("user", "first"), ("user", "A")] and len(stored) == 4


def test_leaving_a_non_streaming_request_cancels_its_answer(server):
    """Only the tokens made after the client left are bounded: how many came before depends on how fast this
    machine generates while the test polls, which is not what the test is about."""
    srv = server()
    conn = _raw_post(srv, OPENAI_LONG)
    gaps = "streamchat_inter_token_seconds_count"  # one per token after the first, as the reader has seen them
    _wait_for(lambda: _metric(srv, gaps) >= 1, "the answer did not start")
    seen = _metric(srv, gaps) + 1
    conn.close()
    _wait_for(lambda: _metric(srv, "streamchat_busy_replicas") == 0, "the answer still runs", 60)
    assert _metric(srv, 'streamchat_answers_total{stop_reason="cancelled"}') == 1
    made = _metric(srv, "streamchat_generated_tokens_total")
    assert seen <= made < LONG_TOKENS and made - seen < LONG_TOKENS // 4, (seen, made)


def test_clients_leaving_the_queue_give_up_their_place(server):
    """Queued requests whose clients leave (WebSocket or HTTP, or a stop frame) leave the queue: nothing is answered
    or stored for them."""
    srv = server("--replicas", "1")
    leave = {**LONG, "text": "leaver"}

    async def crowd():
        clients = [await websockets.connect(srv.ws_url) for _ in range(5)]
        await clients[0].send(json.dumps(LONG))
        await clients[0].recv()
        for keeper in clients[1:]:  # queued behind it: about 2 s of answers (LONG takes about 0.4 s)
            await keeper.send(json.dumps(LONG))
        for _ in range(3):
            async with websockets.connect(srv.ws_url) as leaver:
                await leaver.send(json.dumps(leave))
                await asyncio.sleep(0.02)
        http_leaver = _raw_post(srv, {**OPENAI_LONG, "messages": [{"role": "user", "content": "leaver"}]})
        await asyncio.sleep(0.1)
        http_leaver.close()
        async with websockets.connect(srv.ws_url) as stopped:
            await stopped.send(json.dumps(leave))
            await asyncio.sleep(0.05)
            _, withdrawn = await _answer(stopped, {"type": "stop"})
        for client in clients:
            await _answer(client, {"type": "stop"})
            await client.close()
        return withdrawn

    withdrawn = asyncio.run(crowd())
    assert withdrawn == {"type": "error", "message": "cancelled while waiting for a free model: nothing was answered "
                                                     "or stored"}
    _wait_for(lambda: _metric(srv, "streamchat_busy_replicas") == 0, "answers still run")
    assert _metric(srv, "streamchat_queue_depth") == 0
    history = srv.history()
    assert len(history.conversations()) == 5
    assert all(m.text != "leaver" for c in history.conversations() for m in history.messages(c.id))
    answers = [line for line in httpx.get(srv.url + "/metrics").text.splitlines()
               if line.startswith("streamchat_answers_total{")]
    assert sum(float(line.rpartition(" ")[2]) for line in answers) == 5, answers
    assert _metric(srv, "streamchat_generated_tokens_total") <= 5 * LONG_TOKENS  # the HTTP leaver made none


def test_unknown_conversation_gets_an_error_frame_and_the_connection_goes_on(server):
    srv = server()

    async def chat():
        async with websockets.connect(srv.ws_url) as ws:
            unknown = await asyncio.wait_for(_answer(ws, {"text": "hi", "conversation_id": 424242}), 10)
            huge = await asyncio.wait_for(_answer(ws, {"text": "hi", "conversation_id": 2**63 - 1}), 10)
            fine = await asyncio.wait_for(_answer(ws, {"text": "hi", "max_new_tokens": 3}), 30)
            return unknown[1], huge[1], fine[1]

    unknown, huge, fine = asyncio.run(chat())
    assert unknown["type"] == "error" and "no conversation 424242" in unknown["message"], unknown
    assert "\n" not in unknown["message"] and f"no conversation {2**63 - 1}" in huge["message"]
    assert fine["type"] == "done" and fine["conversation_id"] == 1


def test_pages_of_other_sites_are_refused(server):
    srv = server()

    async def sockets():
        with pytest.raises(websockets.InvalidStatus) as refused:
            async with websockets.connect(srv.ws_url, additional_headers={"Origin": "http://evil.example"}):
                pass
        own = {"Origin": f"http://127.0.0.1:{srv.port}"}
        async with websockets.connect(srv.ws_url, additional_headers=own) as ws:
            _, done = await _answer(ws, {"text": "hi", "max_new_tokens": 2})
        return refused.value.response.status_code, done

    status, done = asyncio.run(sockets())
    assert status == 403 and done["type"] == "done"
    rebound = httpx.get(srv.url + "/v1/models", headers={"Host": f"evil.example:{srv.port}"})
    assert rebound.status_code == 403 and "Host header" in rebound.json()["error"]["message"]
    assert httpx.get(srv.url + "/v1/models", headers={"Host": f"localhost:{srv.port}"}).status_code == 200
    hi = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    plain = httpx.post(srv.url + "/v1/chat/completions", content=hi, headers={"Content-Type": "text/plain"})
    assert plain.status_code == 415 and "application/json" in plain.json()["error"]["message"]
    assert httpx.post(srv.url + "/v1/chat/completions", content=hi, headers=JSON).status_code == 200
    assert _metric(srv, 'streamchat_errors_total{kind="forbidden"}') == 2


def test_an_allowed_origin_may_open_the_websocket(server):
    """``--allow-origin null``: a kiosk page opened from a file may connect; other sites still may not."""
    srv = server("--allow-origin", "null")

    async def sockets():
        async with websockets.connect(srv.ws_url, additional_headers={"Origin": "null"}) as ws:
            _, done = await _answer(ws, {"text": "hi", "max_new_tokens": 2})
        with pytest.raises(websockets.InvalidStatus) as refused:
            async with websockets.connect(srv.ws_url, additional_headers={"Origin": "http://evil.example"}):
                pass
        return done, refused.value.response.status_code

    done, status = asyncio.run(sockets())
    assert done["type"] == "done" and status == 403


def test_deeply_nested_json_is_malformed_json_not_a_crash(server):
    srv = server()
    deep = httpx.post(srv.url + "/v1/chat/completions", content="[" * 100000 + "]" * 100000, headers=JSON)
    assert deep.status_code == 400 and deep.json()["error"]["message"] == "malformed JSON: nested too deeply"

    async def chat():
        async with websockets.connect(srv.ws_url) as ws:
            nested = await _answer(ws, '{"text": ' + "[" * 100000 + "]" * 100000 + "}")
            fine = await _answer(ws, {"text": "hi", "max_new_tokens": 2})
            return nested[1], fine[1]

    nested, fine = asyncio.run(chat())
    assert nested == {"type": "error", "message": "malformed JSON: nested too deeply"} and fine["type"] == "done"
    assert _metric(srv, 'streamchat_errors_total{kind="bad_request"}') == 2


def test_a_lone_surrogate_is_refused_before_anything_is_stored(server):
    srv = server()
    reply = httpx.post(srv.url + "/v1/chat/completions", headers=JSON,
                       content='{"messages": [{"role": "user", "content": "\\ud800 hi"}]}')
    assert reply.status_code == 400
    assert reply.json()["error"]["message"] == "messages[0].content is not valid Unicode: a lone surrogate at character 0"

    async def chat():
        async with websockets.connect(srv.ws_url) as ws:
            lone = await _answer(ws, '{"text": "\\ud800 hi"}')
            fine = await _answer(ws, {"text": "hi", "max_new_tokens": 2})
            return lone[1], fine[1]

    lone, fine = asyncio.run(chat())
    assert lone == {"type": "error", "message": "text is not valid Unicode: a lone surrogate at character 0"}
    assert fine["type"] == "done" and [c.id for c in srv.history().conversations()] == [fine["conversation_id"]]


def test_tool_messages_are_left_out_and_parameter_types_are_strict(server):
    srv = server()
    url = srv.url + "/v1/chat/completions"
    tools = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": []},
             {"role": "tool", "content": "x", "tool_call_id": "1"}, {"role": "function", "content": "y"},
             {"role": "user", "content": "ok"}]
    with_tools = httpx.post(url, json={"messages": tools, "temperature": 0, "max_tokens": 8})
    without = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}, {"role": "user", "content": "ok"}]
    plain = httpx.post(url, json={"messages": without, "temperature": 0, "max_tokens": 8})
    assert with_tools.status_code == 200, with_tools.text
    assert with_tools.json()["choices"][0]["message"] == plain.json()["choices"][0]["message"]
    assert with_tools.json()["usage"] == plain.json()["usage"]
    hi = [{"role": "user", "content": "hi"}]
    for extra, message in (({"n": True}, "n must be 1: one answer per request, got true"),
                           ({"n": 1.0}, "n must be 1: one answer per request, got 1.0"),
                           ({"stream_options": []}, "stream_options must be an object")):
        reply = httpx.post(url, json={"messages": hi, **extra})
        assert reply.status_code == 400 and reply.json()["error"]["message"] == message, (extra, reply.text)
