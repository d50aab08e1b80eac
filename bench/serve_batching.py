"""The server with --parallel N under concurrent streams: aggregate decode tokens/s with 1, 2, 4 and 8 clients, and
per-stream time between tokens (p50/p99), one server, greedy.

    python bench/serve_batching.py [STORE] --mode naive --memory 300MB --context 256 --tokens 48 --parallel 8

Writes bench/results/<date>-serve-batching-<model>-<mode>.json and .md.
"""

from __future__ import annotations

import asyncio
import json
import socket
import statistics
import threading
import time
from pathlib import Path

import inaflash
from inaflash.server import create_app, uvicorn_server
from inaflash.tools.loadtest import percentiles
from inaflash.tools.report import free_stem

from common import command, model_args

PROMPTS = ["Write a short story about a lighthouse keeper.", "Explain how a hash table works.",
           "What are the benefits of regular exercise?", "Describe the water cycle.",
           "Give advice to someone learning to cook.", "Why is the sky blue?", "How do vaccines work?",
           "Summarize the plot of a detective novel you invent."]


async def streams(url: str, name: str, n: int, tokens: int) -> list[dict]:
    import httpx

    async def one(i: int) -> dict:
        body = {"model": name, "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                "max_tokens": tokens, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
        times, usage = [], None
        async with httpx.AsyncClient() as client:
            async with client.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        chunk = json.loads(line[6:])
                        if chunk.get("usage"):
                            usage = chunk["usage"]
                        elif chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                            times.append(time.perf_counter())
        return {"times": times, "tokens": usage["completion_tokens"] if usage else len(times)}

    return await asyncio.gather(*(one(i) for i in range(n)))


def main() -> None:
    ap = model_args(__doc__, context=256, tokens=48)
    ap.add_argument("--parallel", type=int, default=8)
    ap.add_argument("--clients", default="1,2,4,8")
    a = ap.parse_args()
    model = inaflash.load(a.store, mode=a.mode, memory=a.memory, context=a.context, parallel=a.parallel,
                          speculation="off")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(model, max_queue=16, parallel=a.parallel)
    server = uvicorn_server(app, "127.0.0.1", port, 5.0, log_level="error")
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    url, rows = f"http://127.0.0.1:{port}", []
    asyncio.run(streams(url, model.name, 1, 4))  # warm-up
    for n in [int(c) for c in a.clients.split(",")]:
        t0 = time.perf_counter()
        out = asyncio.run(streams(url, model.name, n, a.tokens))
        # decode rate: tokens after each stream's first, over the time from the first first-token to the last token
        start, end = min(o["times"][0] for o in out), max(o["times"][-1] for o in out)
        decoded = sum(len(o["times"]) - 1 for o in out)
        gaps = [b - a_ for o in out for a_, b in zip(o["times"], o["times"][1:])]
        rows.append({"clients": n, "tokens": sum(o["tokens"] for o in out), "wall_s": time.perf_counter() - t0,
                     "aggregate_tok_s": decoded / (end - start), "gap_ms": {k: v * 1e3 if k != "n" else v
                                                                           for k, v in percentiles(gaps).items()}})
        r = rows[-1]
        print(f"{n} streams: {r['aggregate_tok_s']:.1f} tok/s aggregate, p50 {r['gap_ms']['p50']:.0f} ms, "
              f"p99 {r['gap_ms']['p99']:.0f} ms between tokens", flush=True)
    server.should_exit = True
    thread.join(30)
    metrics = {"steps": app.state.server.batcher.steps, "shared_steps": app.state.server.batcher.shared_steps}
    one = rows[0]["aggregate_tok_s"]
    for r in rows:
        r["speedup_over_one"] = r["aggregate_tok_s"] / one
    result = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "model": model.name, "mode": model.engine.mode,
              "memory": a.memory, "context": a.context, "tokens": a.tokens, "parallel": a.parallel, "rows": rows,
              "batch": metrics}
    out_dir = Path("bench/results")
    stem = free_stem(out_dir, f"{time.strftime('%Y-%m-%d')}-serve-batching-{model.name}-{model.engine.mode}")
    (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=1))
    cmd = command("serve_batching.py", a, f"--parallel {a.parallel}", f"--clients {a.clients}")
    lines = [f"# Server with --parallel {a.parallel}: {model.name}, {model.engine.mode} ({result['date']})", "",
             f"`{cmd}`; concurrent streamed chat requests, greedy, speculation off; decode tokens/s from the first "
             f"token of any stream to the last token of all.", "",
             "| streams | aggregate tok/s | vs one | p50 ms between tokens | p99 ms |", "|---|---|---|---|---|"]
    lines += [f"| {r['clients']} | {r['aggregate_tok_s']:.1f} | {r['speedup_over_one']:.2f}x | "
              f"{r['gap_ms']['p50']:.0f} | {r['gap_ms']['p99']:.0f} |" for r in rows]
    lines += ["", f"Batch: {metrics['steps']} decode steps, {metrics['shared_steps']} of them for 2+ sequences."]
    (out_dir / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    model.close()


if __name__ == "__main__":
    main()
