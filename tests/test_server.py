"""The OpenAI-compatible server, over loopback, with the embedded model: the official client, validation, auth,
the queue bound, cancellation on disconnect; and the Python API against the CLI."""

import json
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

import inaflash

CHAT = [{"role": "user", "content": "Name three rivers."}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    def __init__(self, model, **options):
        import uvicorn

        from inaflash.server import create_app

        self.app = create_app(model, **options)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.05)

    @property
    def state(self):
        return self.app.state.server

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def model():
    with inaflash.load(mode="dram") as m:
        yield m


@pytest.fixture(scope="module")
def live(model):
    server = LiveServer(model, max_queue=1)
    yield server
    server.stop()


def test_openai_client_chat_and_stream_agree(live, model):
    from openai import OpenAI

    client = OpenAI(base_url=live.url + "/v1", api_key="unused", timeout=120)
    assert [m.id for m in client.models.list().data] == [model.name]
    full = client.chat.completions.create(model=model.name, messages=CHAT, max_tokens=24, temperature=0)
    text = full.choices[0].message.content
    assert text and full.usage.completion_tokens == 24 and full.choices[0].finish_reason == "length"
    assert full.usage.prompt_tokens > 5
    pieces, finish = [], None
    for chunk in client.chat.completions.create(model=model.name, messages=CHAT, max_tokens=24, temperature=0,
                                                stream=True):
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    assert len([p for p in pieces if p]) > 3  # really streamed, piece by piece
    assert "".join(pieces) == text and finish == "length"
    # and the same as the Python API
    assert model.chat(CHAT, max_tokens=24).text == text


def test_completions_and_stop_strings(live, model):
    body = {"model": model.name, "prompt": "The capital of France is", "max_tokens": 16, "temperature": 0}
    r = httpx.post(live.url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    text = r.json()["choices"][0]["text"]
    assert text == model.generate("The capital of France is", max_tokens=16, raw=True).text
    word = text.split()[1]  # stop at the second word: the text ends right before it
    r = httpx.post(live.url + "/v1/completions", json={**body, "stop": [word]}, timeout=60)
    choice = r.json()["choices"][0]
    assert choice["text"] == text[: text.index(word)] and choice["finish_reason"] == "stop"
    lines = []
    with httpx.stream("POST", live.url + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    assert "".join(json.loads(line[6:])["choices"][0]["text"] for line in lines[:-1]) == text


@pytest.mark.parametrize("body,status,needle", [
    ('{"model": "m", "messages": [', 400, "not valid JSON"),
    ({"messages": CHAT}, 400, "model"),
    ({"model": "MODEL", "messages": CHAT, "max_tokens": "ten"}, 400, "max_tokens"),
    ({"model": "MODEL", "messages": CHAT, "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "MODEL", "messages": CHAT, "temperature": "hot"}, 400, "temperature"),
    ({"model": "MODEL", "messages": CHAT, "temperature": 7}, 400, "temperature"),
    ({"model": "MODEL", "messages": CHAT, "stream": "yes"}, 400, "stream"),
    ({"model": "MODEL", "messages": []}, 400, "messages"),
    ({"model": "MODEL", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "role"),
    ({"model": "MODEL", "messages": [{"role": "user", "content": 5}]}, 400, "content"),
    ({"model": "gpt-4o", "messages": CHAT}, 404, "unknown model 'gpt-4o'"),
    ({"model": "MODEL", "messages": CHAT, "logprobs": True}, 400, "logprobs: logprobs are not returned"),
    ({"model": "MODEL", "messages": CHAT, "top_logprobs": 3}, 400, "top_logprobs: logprobs are not returned"),
    ({"model": "MODEL", "messages": CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400,
     "tools: tool calling is not supported"),
    ({"model": "MODEL", "messages": CHAT, "functions": [{"name": "f"}]}, 400, "functions: function calling"),
    ({"model": "MODEL", "messages": CHAT, "response_format": {"type": "json_object"}}, 400, "response_format"),
    ({"model": "MODEL", "messages": CHAT, "stop": ["a", "b", "c", "d", "e"]}, 400,
     "stop: 5 stop strings, at most 4 are allowed"),
    ({"model": "MODEL", "messages": CHAT, "max_tokens": 10 ** 6}, 400, "exceed the context"),
    ({"model": "MODEL", "messages": CHAT, "seed": 2 ** 64}, 400, "seed"),
    ({"model": "MODEL", "messages": CHAT, "seed": -1}, 400, "seed"),
    ('{"model": "MODEL", "messages": [{"role": "user", "content": "hi \\ud800"}]}', 400, "text is not valid UTF-8 (byte 3 of it)"),
])
def test_bad_requests_get_openai_style_400s(live, model, body, status, needle):
    if isinstance(body, dict):
        content = json.dumps({k: (model.name if v == "MODEL" else v) for k, v in body.items()})
    else:
        content = body.replace("MODEL", model.name)
    r = httpx.post(live.url + "/v1/chat/completions", content=content,
                   headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert needle in error["message"] or needle == error["param"], error
    assert error["type"] == "invalid_request_error"


def test_fields_that_ask_for_nothing_unsupported_are_accepted(live, model):
    """Clients send the unsupported fields at their off values (logprobs false, tools [], response_format text):
    those are served, not refused."""
    body = {"model": model.name, "messages": CHAT, "max_tokens": 2, "temperature": 0, "logprobs": False,
            "tools": [], "response_format": {"type": "text"}, "stop": ["a", "b", "c", "d"]}
    r = httpx.post(live.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text


def test_oversized_body_gets_an_openai_style_413(live, model):
    from inaflash.server import MAX_BODY_BYTES

    body = json.dumps({"model": model.name, "messages": [{"role": "user", "content": "x" * MAX_BODY_BYTES}]})
    r = httpx.post(live.url + "/v1/chat/completions", content=body, headers={"Content-Type": "application/json"},
                   timeout=30)
    assert r.status_code == 413, r.text
    assert r.json()["error"]["code"] == "request_too_large" and str(MAX_BODY_BYTES) in r.json()["error"]["message"]
    assert httpx.get(live.url + "/health", timeout=10).json()["status"] == "ok"


def test_shutdown_cancels_a_generation_in_flight_within_bounded_time(model):
    """Shutdown (Ctrl-C) with a non-streamed request generating: the generation is cancelled and the worker stops
    before the model is closed under it (which used to hang the process forever)."""
    import asyncio
    import time as clock

    from inaflash.server import Server

    server = Server(model, max_queue=1)
    gen = server.prepare(type("R", (), {"model": model.name, "max_tokens": 4000, "max_completion_tokens": None,
                                        "temperature": 0.0, "top_p": 1.0, "seed": None, "stops": lambda self: []})(),
                         [1, 2, 3, 4])
    loop = asyncio.new_event_loop()
    server.pending = 1
    task = loop.create_task(server.run(gen))
    loop.run_until_complete(asyncio.sleep(1.0))  # generating now
    assert gen in server.admitted and 0 < len(gen.token_ids) < 4000
    t0 = clock.perf_counter()
    assert server.shutdown(timeout=30)
    assert clock.perf_counter() - t0 < 5  # one token's time, not the 4000-token generation's
    loop.run_until_complete(task)
    loop.close()
    assert gen.finish_reason is None and len(gen.token_ids) < 4000 and not server.admitted


def test_a_stream_that_fails_sends_an_error_event_then_done(live, model, monkeypatch):
    real, calls = model.engine.forward_batch, []

    def failing(segments, last_only=False):  # decode steps (the prompt's pass is forward's)
        calls.append(len(segments))
        if len(calls) == 3:  # the prompt's token and two decode steps went out, then the disk goes away
            raise OSError(5, "Input/output error")
        return real(segments, last_only)

    monkeypatch.setattr(model.engine, "forward_batch", failing)
    body = {"model": model.name, "messages": CHAT, "max_tokens": 16, "temperature": 0, "stream": True}
    with httpx.stream("POST", live.url + "/v1/chat/completions", json=body, timeout=60) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    monkeypatch.setattr(model.engine, "forward_batch", real)
    assert lines[-1] == "data: [DONE]"
    error = json.loads(lines[-2][6:])["error"]
    assert error["type"] == "server_error" and "Input/output error" in error["message"]
    assert all("choices" in json.loads(line[6:]) for line in lines[:-2])  # the pieces before it were sent
    assert httpx.get(live.url + "/health", timeout=10).json()["status"] == "ok"  # and the server goes on


def test_api_key_is_required_when_set(model):
    server = LiveServer(model, api_key="sesame")
    try:
        body = {"model": model.name, "messages": CHAT, "max_tokens": 2}
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            r = httpx.post(server.url + "/v1/chat/completions", json=body, headers=headers, timeout=30)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(server.url + "/v1/models", timeout=30).status_code == 401
        r = httpx.post(server.url + "/v1/chat/completions", json=body, headers={"Authorization": "Bearer sesame"},
                       timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
    finally:
        server.stop()


def wait_for(predicate, seconds=60):
    deadline = time.time() + seconds
    while not predicate():
        assert time.time() < deadline, "timed out"
        time.sleep(0.02)


def test_queue_bound_gives_429_and_a_disconnect_frees_the_model(live, model):
    """max_queue=1: one generating + one waiting; a third request gets 429. Leaving a stream mid-way cancels its
    generation: the waiting request then completes promptly instead of after the abandoned one's 2000 tokens."""
    long = {"model": model.name, "messages": CHAT, "max_tokens": 2000, "temperature": 0.8, "seed": 1, "stream": True}
    short = {"model": model.name, "messages": CHAT, "max_tokens": 4, "temperature": 0}
    cancelled0 = live.state.metrics.cancelled
    client = httpx.Client(timeout=120)
    stream = client.stream("POST", live.url + "/v1/chat/completions", json=long)
    response = stream.__enter__()
    lines = response.iter_lines()
    got = [next(lines) for _ in range(3)]  # generation is under way
    assert all(g.startswith("data: ") or g == "" for g in got)

    waiting = {}
    t = threading.Thread(target=lambda: waiting.update(
        r=httpx.post(live.url + "/v1/chat/completions", json=short, timeout=120), t=time.time()))
    t.start()
    wait_for(lambda: live.state.pending == 2)
    r = httpx.post(live.url + "/v1/chat/completions", json=short, timeout=30)
    assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"

    left = time.time()
    stream.__exit__(None, None, None)  # the client goes away mid-stream
    client.close()
    t.join(timeout=120)
    assert waiting["r"].status_code == 200 and waiting["r"].json()["usage"]["completion_tokens"] == 4
    assert waiting["t"] - left < 15  # 2000 tokens would take well over a minute
    wait_for(lambda: live.state.metrics.cancelled == cancelled0 + 1)
    assert live.state.metrics.last is not None
    m = httpx.get(live.url + "/metrics", timeout=30).json()
    assert m["rejected"] >= 1 and m["cancelled"] >= 1 and m["pending"] == 0


def test_a_non_streamed_request_whose_client_leaves_is_cancelled(live, model):
    """The client sends a non-streamed 2000-token request and hangs up: its generation stops (prefill or decode) and
    the next request is served promptly instead of after it."""
    import socket
    from urllib.parse import urlparse

    body = json.dumps({"model": model.name, "messages": CHAT, "max_tokens": 2000, "temperature": 0.8, "seed": 2})
    cancelled0 = live.state.metrics.cancelled
    url = urlparse(live.url)
    s = socket.create_connection((url.hostname, url.port))
    s.sendall((f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n\r\n{body}").encode())
    wait_for(lambda: live.state.pending == 1)
    time.sleep(1.0)  # under way
    s.close()  # gone before the first byte of the answer
    left = time.time()
    wait_for(lambda: live.state.metrics.cancelled == cancelled0 + 1)
    r = httpx.post(live.url + "/v1/chat/completions", json={"model": model.name, "messages": CHAT, "max_tokens": 4,
                                                             "temperature": 0}, timeout=120)
    assert r.status_code == 200 and time.time() - left < 15  # 2000 tokens would take well over a minute


def test_python_api_greedy_equals_cli(model):
    prompt = "Give me two facts about owls."
    out = subprocess.run([sys.executable, "-m", "inaflash", "run", "--mode", "dram", "--temperature", "0",
                          "--max-tokens", "24", "--json", prompt], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    cli = json.loads(out.stdout)
    result = model.generate(prompt, max_tokens=24, temperature=0)
    assert result.token_ids == cli["token_ids"] and result.text == cli["text"]
    assert "".join(model.stream(prompt, max_tokens=24)) == cli["text"]


class InterruptingOut:
    """A terminal whose user presses Ctrl-C during the first answer, as its second piece arrives (writes 1-2 are the
    banner line)."""

    def __init__(self):
        self.parts, self.writes, self.fired = [], 0, False

    def write(self, s):
        self.writes += 1
        if not self.fired and self.writes == 4:
            self.fired = True
            raise KeyboardInterrupt
        self.parts.append(s)

    def flush(self):
        pass


def scripted(*lines):
    it = iter(lines)

    def fake_input(prompt):
        line = next(it, EOFError)
        if line in (KeyboardInterrupt, EOFError):
            raise line  # Ctrl-C / Ctrl-D at the prompt
        return line

    return fake_input


def test_chat_repl_turns_commands_and_ctrl_c(model):
    from inaflash.chat import repl

    out = InterruptingOut()
    messages = repl(model, system="Be brief.", max_tokens=12, temperature=0, out=out,
                    input_fn=scripted("Hello!", KeyboardInterrupt, "/stats", "What is 2+2?", "/bogus", "/exit"))
    text = "".join(out.parts)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]
    shown = text.split("\n", 1)[1].split(" [stopped]")[0]
    assert shown and messages[2]["content"].startswith(shown)  # Ctrl-C keeps the answer so far in the history
    assert "ms/token" in text and "unknown command /bogus" in text
    # the second answer is the model's greedy reply to the whole conversation, the stopped answer included
    assert messages[4]["content"] == model.chat(messages[:4], max_tokens=12, temperature=0).text

    messages = repl(model, system="Be brief.", max_tokens=4, temperature=0, out=InterruptingOut(),
                    input_fn=scripted("Hi", "/reset"))  # then Ctrl-D
    assert messages == [{"role": "system", "content": "Be brief."}]


def test_load_with_abandoned_requests_gives_no_5xx_and_stops_abandoned_work(model):
    """A small run of `inaflash loadtest`: concurrent clients, a queue that overflows, clients that hang up, invalid
    bodies. Every answer is valid, 400 (invalid) or 429 (queue full); abandoned work is cancelled, so the server is
    idle right after the last client; /health answers."""
    from inaflash.tools.loadtest import loadtest

    r = loadtest(model, clients=6, requests=30, abandon_every=4, seed=3, max_queue=2)
    assert r["server_errors"] == 0 and r["stream_errors"] == 0 and r["unfinished_streams"] == 0, r
    assert r["invalid_not_400"] == 0 and set(r["statuses"]) <= {"200", "400", "429", "abandoned"}, r
    assert r["statuses"].get("200", 0) >= 10 and r["metrics"]["cancelled"] >= 1, r
    assert r["idle_after_s"] is not None and r["idle_after_s"] < 15 and r["health_status"] == 200, r
    # SIGTERM mid-load: every admitted stream ends with an error event then [DONE], the rest are refused, and the
    # server stops within its grace period
    t = r["sigterm"]
    assert t["exit_s"] is not None and t["exit_s"] < t["grace_s"], t
    assert set(t["statuses"]) <= {"200", "429", "503"} and t["ended_with_error_then_done"] >= 1, t
    assert t["chunks_max"] < 2000, t


def test_a_body_that_is_not_utf8_gets_an_openai_style_400(live, model):
    content = b'{"model": "%s", "messages": [{"role": "user", "content": "caf\xe9"}]}' % model.name.encode()
    r = httpx.post(live.url + "/v1/chat/completions", content=content,
                   headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 400 and set(r.json()) == {"error"}, r.text
    assert r.json()["error"]["type"] == "invalid_request_error" and "not valid UTF-8" in r.json()["error"]["message"]
    r = httpx.get(live.url + "/v1/nowhere", timeout=30)  # FastAPI's own errors are OpenAI-shaped too
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error", r.text


SERVE_SCRIPT = r"""
import sys, inaflash
from inaflash.server import serve
with inaflash.load(mode="naive") as m:
    print("ready", flush=True)
    serve(m, port=int(sys.argv[1]), grace=float(sys.argv[2]))
print("closed", flush=True)
"""


def test_sigterm_with_a_stream_in_flight_ends_it_and_exits_within_the_grace_period(model):
    """`inaflash serve` under a service manager: SIGTERM while a 3000-token stream is generating. The stream ends
    with an error event that says why and [DONE]; the process exits 0 within the grace period (uvicorn alone waited
    for the stream to finish, so only SIGKILL ended it)."""
    import signal

    port, grace = free_port(), 5.0
    proc = subprocess.Popen([sys.executable, "-c", SERVE_SCRIPT, str(port), str(grace)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() else "no start"
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        events = []
        body = {"model": model.name, "messages": CHAT, "max_tokens": 3000, "temperature": 0, "stream": True}
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                events.append(line[6:])
                if len(events) == 5:  # streaming now
                    proc.send_signal(signal.SIGTERM)
                    t0 = time.perf_counter()
        proc.wait(timeout=grace + 10)
        took = time.perf_counter() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert "shutting down" in error["message"] and error["type"] == "server_error"
    assert len(events) < 3000
    assert proc.returncode == 0 and took < grace + 3, (proc.returncode, took)
    assert "closed" in proc.stdout.read()


def test_parallel_requests_share_passes_and_answer_as_each_alone(smollm2_store_f32):
    """`serve --parallel 4` on a float32 store: four concurrent requests (streamed and not, different prompts and
    lengths) get each the text it gets alone; the batch's steps carried several sequences at once; a client that
    leaves mid-stream frees its place; /metrics says so."""
    from concurrent.futures import ThreadPoolExecutor

    prompts = ["The capital of France is", "def add(a, b):", "Once upon a time", "Rivers of Europe:"]
    with inaflash.load(smollm2_store_f32, mode="dram", parallel=4, speculation="off") as m:
        alone = LiveServer(m, parallel=1)
        try:
            want = [httpx.post(alone.url + "/v1/completions", json={"model": m.name, "prompt": p, "max_tokens": 16 + 4 * i,
                                                                   "temperature": 0}, timeout=120).json()
                    ["choices"][0]["text"] for i, p in enumerate(prompts)]
        finally:
            alone.stop()
        live = LiveServer(m, parallel=4, max_queue=4)
        try:
            def ask(i):
                body = {"model": m.name, "prompt": prompts[i], "max_tokens": 16 + 4 * i, "temperature": 0,
                        "stream": i % 2 == 1}
                if not body["stream"]:
                    return httpx.post(live.url + "/v1/completions", json=body, timeout=120).json()["choices"][0]["text"]
                text = ""
                with httpx.stream("POST", live.url + "/v1/completions", json=body, timeout=120) as r:
                    for line in r.iter_lines():
                        if line.startswith("data: ") and line != "data: [DONE]":
                            text += json.loads(line[6:])["choices"][0]["text"]
                return text

            with ThreadPoolExecutor(4) as pool:
                got = list(pool.map(ask, range(4)))
            metrics = httpx.get(live.url + "/metrics", timeout=30).json()
            # a client that hangs up mid-stream leaves the batch; the next request is served
            with httpx.stream("POST", live.url + "/v1/completions", json={
                    "model": m.name, "prompt": prompts[0], "max_tokens": 500, "temperature": 0, "stream": True},
                    timeout=120) as r:
                next(line for line in r.iter_lines() if line.startswith("data: "))
            again = httpx.post(live.url + "/v1/completions", json={"model": m.name, "prompt": prompts[0],
                                                                   "max_tokens": 16, "temperature": 0}, timeout=120)
            deadline = time.time() + 30
            while live.state.batcher.running and time.time() < deadline:
                time.sleep(0.05)
            left = len(live.state.batcher.running)
        finally:
            live.stop()
    assert got == want
    assert metrics["parallel"] == 4 and metrics["batch_shared_steps"] > 0, metrics
    assert again.status_code == 200 and again.json()["choices"][0]["text"] == want[0]
    assert left == 0


def test_load_on_a_batching_server_gives_no_5xx_and_stops_on_sigterm():
    """The same load against `--parallel 3`: answers valid, 400 or 429, abandoned work leaves the batch (the server
    idles right after the last client), and SIGTERM ends every open stream with an error event then [DONE]."""
    from inaflash.tools.loadtest import loadtest

    with inaflash.load(mode="dram", parallel=3) as m:
        r = loadtest(m, clients=6, requests=30, abandon_every=4, seed=5, max_queue=2, parallel=3)
    assert r["server_errors"] == 0 and r["stream_errors"] == 0 and r["unfinished_streams"] == 0, r
    assert r["invalid_not_400"] == 0 and set(r["statuses"]) <= {"200", "400", "429", "abandoned"}, r
    assert r["idle_after_s"] is not None and r["idle_after_s"] < 15 and r["health_status"] == 200, r
    t = r["sigterm"]
    assert t["exit_s"] is not None and t["exit_s"] < t["grace_s"] and t["ended_with_error_then_done"] >= 3, t
