"""`inaflash loadtest`: the OpenAI-compatible server under concurrent load over loopback.

A server on a free port (in this process, so its RSS is ours to read) gets `requests` requests from `clients`
concurrent clients: chat and completions, streamed and not, fixed seeds; a client told 429 (queue full) retries
after a backoff, as OpenAI's clients do; every `abandon_every`-th request's client hangs up early (a stream left after its first chunk, a non-streamed request given up after 0.3 s), and a few bodies are
invalid. Reported: status codes (a valid answer, 400 for the invalid ones, 429 when the queue is full; never a 5xx),
latency percentiles per kind, that abandoned work was cancelled (the server idles right after the last client),
RSS before, after warm-up and after the load, and that /health still answers. Last, SIGTERM mid-load: streams are
generating when the server's signal handler runs (the same handle_exit `inaflash serve` installs); each must end
with an error event and [DONE] (or be refused, 429/503), and the server must stop within its grace period.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import threading
import time

from ..memory import rss_bytes

RETRIES_429 = 30
PROMPTS = ["Name three rivers.", "What is a flash memory cell?", "Write a haiku about disks.",
           "Explain RAID 5 in one sentence.", "What does a compiler do?", "Give two uses of a hash table."]


def percentiles(values: list[float]) -> dict:
    if not values:
        return {}
    q = statistics.quantiles(values, n=100, method="inclusive") if len(values) > 1 else values * 99
    return {"p50": q[49], "p90": q[89], "p99": q[98], "max": max(values), "n": len(values)}


async def _one(client, url: str, name: str, i: int, rng: random.Random, abandon: bool) -> dict:
    import httpx

    kind = rng.choice(["chat", "chat-stream", "completion", "completion-stream"])
    if i % 23 == 7:
        kind = "invalid"
    max_tokens = rng.randint(4, 24)
    prompt = rng.choice(PROMPTS)
    chat = kind.startswith("chat") or kind == "invalid"
    body = ({"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt}) | {
        "model": name, "max_tokens": max_tokens, "temperature": 0.7, "seed": i, "stream": kind.endswith("stream")}
    if kind == "invalid":
        body["max_tokens"] = -3
    path = "/v1/chat/completions" if chat else "/v1/completions"
    t0 = time.perf_counter()
    row = {"i": i, "kind": kind, "abandoned": abandon}
    try:
        if body["stream"]:
            async with client.stream("POST", url + path, json=body, timeout=300) as r:
                row["status"] = r.status_code
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        row.setdefault("first_s", time.perf_counter() - t0)
                        if abandon:
                            break  # the client goes away mid-stream
                        if line == "data: [DONE]":
                            row["done"] = True
                        elif '"error"' in line:
                            row["stream_error"] = line[:200]
        else:
            r = await client.post(url + path, json=body, timeout=0.3 if abandon else 300)
            row["status"] = r.status_code
            if r.status_code >= 400:
                row["error"] = r.json().get("error", {}).get("message", "")[:200]
    except httpx.TimeoutException:
        row["status"] = "abandoned" if abandon else "timeout"
    row["s"] = time.perf_counter() - t0
    return row


async def _load(url: str, name: str, clients: int, requests: int, abandon_every: int, seed: int) -> list[dict]:
    import httpx

    rng = random.Random(seed)
    plan = [(i, rng.random(), i % abandon_every == abandon_every - 1) for i in range(requests)]
    rng.shuffle(plan)  # abandoned and invalid requests spread over the run
    queue: asyncio.Queue = asyncio.Queue()
    for item in plan:
        queue.put_nowait(item)
    rows: list[dict] = []

    async def client_loop():
        async with httpx.AsyncClient(limits=httpx.Limits(max_connections=1)) as client:
            while not queue.empty():
                i, r, abandon = queue.get_nowait()
                for attempt in range(RETRIES_429 + 1):  # as OpenAI's clients do: a full queue is retried later
                    row = await _one(client, url, name, i, random.Random(seed * 1000 + i), abandon)
                    if row.get("status") != 429:
                        break
                    await asyncio.sleep(min(2.0, 0.25 * (attempt + 1)))
                row["rejected_429"] = attempt
                rows.append(row)

    await asyncio.gather(*(client_loop() for _ in range(clients)))
    return rows


async def _sigterm_phase(url: str, name: str, streams: int, stop, max_tokens: int) -> list[dict]:
    """`streams` long streamed requests; once one has streamed a few chunks, `stop()` (the signal handler). Each
    row: status, chunks, whether it ended with an error event then [DONE]."""
    import httpx

    started = asyncio.Event()

    async def one(i: int) -> dict:
        row = {"i": i, "chunks": 0}
        body = {"model": name, "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                "max_tokens": max_tokens, "temperature": 0.7, "seed": i, "stream": True}
        try:
            async with httpx.AsyncClient() as client:
                async with client.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as r:
                    row["status"] = r.status_code
                    last = []
                    async for line in r.aiter_lines():
                        if line.startswith("data: "):
                            row["chunks"] += 1
                            last = (last + [line[6:]])[-2:]
                            if row["chunks"] == 4:
                                started.set()
                    row["error_then_done"] = len(last) == 2 and last[1] == "[DONE]" and '"error"' in last[0]
        except httpx.TransportError as e:
            row["status"] = f"transport: {type(e).__name__}"
        finally:
            started.set()  # one that ended (refused, or done) also lets the signal go: nothing waits forever
        return row

    async def signal_when_streaming():
        try:
            await asyncio.wait_for(started.wait(), 120)
        except TimeoutError:
            pass
        stop()

    rows, _ = await asyncio.gather(asyncio.gather(*(one(i) for i in range(streams))), signal_when_streaming())
    return rows


def loadtest(model, clients: int = 32, requests: int = 200, abandon_every: int = 8, seed: int = 0,
             max_queue: int = 8, grace: float = 10.0, parallel: int = 1) -> dict:
    """Run the load against a server for `model` (an api.Model) on a free loopback port; the report as a dict."""
    import socket

    import signal

    import httpx

    from ..server import create_app, uvicorn_server

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(model, max_queue=max_queue, parallel=parallel)
    server = uvicorn_server(app, "127.0.0.1", port, grace, log_level="error")
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}"
    try:
        rss0 = rss_bytes()
        warm = asyncio.run(_load(url, model.name, 2, 8, 10 ** 9, seed + 1))  # warm-up: allocator and caches settle
        rss_warm = rss_bytes()
        t0 = time.perf_counter()
        rows = asyncio.run(_load(url, model.name, clients, requests, abandon_every, seed))
        wall = time.perf_counter() - t0
        state = app.state.server
        deadline, idle_s = time.perf_counter() + 60, None
        while time.perf_counter() < deadline:  # abandoned work must stop: the server idles soon after
            if state.pending == 0:
                idle_s = time.perf_counter() - t0 - wall
                break
            time.sleep(0.05)
        health = httpx.get(url + "/health", timeout=30)
        metrics = httpx.get(url + "/metrics", timeout=30).json()
        rss1 = rss_bytes()
        # SIGTERM mid-load: the handler inaflash serve installs, called as a signal would call it
        stopped = {}

        def stop() -> None:
            stopped["t"] = time.perf_counter()
            server.handle_exit(signal.SIGTERM, None)

        # long streams (as long as the context allows: a request over it is a 400 that never streams)
        term = asyncio.run(_sigterm_phase(url, model.name, min(clients, max_queue + parallel), stop,
                                          min(2000, model.context - 64)))
        thread.join(timeout=grace + 30)
        sigterm = {"streams": len(term), "statuses": sorted({str(r.get("status")) for r in term}),
                   "ended_with_error_then_done": sum(1 for r in term if r.get("error_then_done")),
                   "chunks_max": max((r["chunks"] for r in term), default=0),
                   "exit_s": None if thread.is_alive() else time.perf_counter() - stopped["t"], "grace_s": grace}
    finally:
        server.should_exit = True
        thread.join(timeout=60)
    statuses: dict[str, int] = {}
    for r in rows:
        statuses[str(r.get("status"))] = statuses.get(str(r.get("status")), 0) + 1
    served = [r for r in rows if r.get("status") == 200 and not r["abandoned"]]
    return {
        "clients": clients, "requests": requests, "abandon_every": abandon_every, "seed": seed,
        "max_queue": max_queue, "parallel": parallel, "mode": model.engine.mode, "model": model.name, "wall_s": wall,
        "statuses": statuses, "rejected_429_then_retried": sum(r["rejected_429"] for r in rows), "server_errors": sum(1 for r in rows if isinstance(r.get("status"), int)
                                                   and r["status"] >= 500),
        "stream_errors": sum(1 for r in rows if "stream_error" in r),
        "unfinished_streams": sum(1 for r in served if r["kind"].endswith("stream") and not r.get("done")),
        "invalid_not_400": sum(1 for r in rows if r["kind"] == "invalid" and r.get("status") != 400),
        "latency_s": {k: percentiles([r["s"] for r in served if r["kind"] == k])
                      for k in sorted({r["kind"] for r in served})},
        "first_chunk_s": percentiles([r["first_s"] for r in served if "first_s" in r]),
        "idle_after_s": idle_s, "health_status": health.status_code,
        "metrics": {k: metrics.get(k) for k in ("completed", "cancelled", "rejected", "pending")},
        "rss_bytes": {"before": rss0, "after_warmup": rss_warm, "after": rss1},
        "warmup_statuses": sorted({r.get("status") for r in warm}, key=str),
        "sigterm": sigterm,
    }


def _sigterm_line(t: dict) -> str:
    took = "did not stop" if t["exit_s"] is None else f"stopped {t['exit_s']:.2f} s after the signal"
    return (f"- SIGTERM with {t['streams']} streams open (statuses {', '.join(t['statuses'])}): {took} (grace "
            f"{t['grace_s']:g} s); {t['ended_with_error_then_done']} streams ended with an error event then [DONE], "
            f"the longest after {t['chunks_max']} chunks")


def markdown(r: dict) -> str:
    mb = {k: v / 1e6 for k, v in r["rss_bytes"].items()}
    lines = [f"# Server load test: {r['model']} ({r['mode']}), {r['clients']} clients, {r['requests']} requests",
             "", f"`inaflash loadtest --clients {r['clients']} --requests {r['requests']} --abandon-every "
                 f"{r['abandon_every']} --seed {r['seed']} --max-queue {r['max_queue']} --parallel {r['parallel']}`; wall "
                 f"{r['wall_s']:.1f} s",
             "", f"- statuses: {json.dumps(r['statuses'])} (5xx: {r['server_errors']}; stream error events: "
                 f"{r['stream_errors']}; served streams without [DONE]: {r['unfinished_streams']}; invalid bodies "
                 f"not answered 400: {r['invalid_not_400']}; 429s retried by the clients: "
                 f"{r['rejected_429_then_retried']})",
             f"- server idle {r['idle_after_s']:.2f} s after the last client (abandoned work cancelled: "
             f"{r['metrics']['cancelled']}); /health after: {r['health_status']}" if r["idle_after_s"] is not None
             else "- the server was still busy 60 s after the last client",
             f"- RSS: {mb['before']:.0f} MB before, {mb['after_warmup']:.0f} MB after warm-up, {mb['after']:.0f} MB "
             f"after the load ({mb['after'] - mb['after_warmup']:+.0f} MB)",
             _sigterm_line(r["sigterm"]), "",
             "| kind | served | p50 s | p90 s | p99 s | max s |", "|---|---|---|---|---|---|"]
    for kind, p in r["latency_s"].items():
        lines.append(f"| {kind} | {p['n']} | {p['p50']:.2f} | {p['p90']:.2f} | {p['p99']:.2f} | {p['max']:.2f} |")
    if r["first_chunk_s"]:
        p = r["first_chunk_s"]
        lines.append(f"| first chunk (streams) | {p['n']} | {p['p50']:.2f} | {p['p90']:.2f} | {p['p99']:.2f} | "
                     f"{p['max']:.2f} |")
    return "\n".join(lines) + "\n"
