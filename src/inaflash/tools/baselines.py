"""What users run today, measured in the bench: llama.cpp with mmap (llama-cpp-python) and transformers +
accelerate disk offload, each in a child process under the same whole-process memory limit (cgroup v1), on the
same model file and prompt. A baseline that cannot run gets a row that says why; nothing is estimated.

Each child prints one line per generated token (its time), so a run cut off by the timeout still reports its rate.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

from .cgroup import CgroupUnavailable, evict_from_page_cache, run_limited

TIMEOUT_S = 600

LLAMA_CPP = r"""
import json, sys, time
from llama_cpp import Llama
path, prompt, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
llm = Llama(model_path=path, n_ctx=1024, n_threads=2, use_mmap=True, verbose=False)
print(json.dumps({"event": "loaded", "t": time.perf_counter()}), flush=True)
print(json.dumps({"event": "start", "t": time.perf_counter()}), flush=True)
for chunk in llm.create_completion(prompt, max_tokens=n, temperature=0.0, stream=True):
    print(json.dumps({"event": "token", "t": time.perf_counter()}), flush=True)
"""

TRANSFORMERS_OFFLOAD = r"""
import json, sys, time
from pathlib import Path
import torch
from transformers import AutoModelForCausalLM
path, ids, n, offload, cpu_bytes = Path(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
kw = dict(gguf_file=path.name) if path.suffix == ".gguf" else {}
model = AutoModelForCausalLM.from_pretrained(str(path.parent if kw else path), dtype=torch.float32, device_map="auto",
                                             max_memory={"cpu": cpu_bytes}, offload_folder=offload, **kw)
print(json.dumps({"event": "loaded", "t": time.perf_counter()}), flush=True)
past, x = None, torch.tensor([ids])
with torch.no_grad():
    for _ in range(n):
        out = model(x, past_key_values=past, use_cache=True)
        past, x = out.past_key_values, out.logits[:, -1:].argmax(-1)
        print(json.dumps({"event": "token", "t": time.perf_counter()}), flush=True)
"""


# inaflash itself under the same limit: the runtime (Python, torch, tokenizer: ~300 MB for Qwen2.5) is measured in
# the child after it loads, and the model's data gets the rest of the limit minus a margin for per-token temporaries
# (limited_engine, which tools/decoding.py's child uses too)
INAFLASH = r"""
import json, sys, time
from inaflash.generate import GenerationStats, stream_ids
from inaflash.tools.baselines import limited_engine
path, ids, n, limit, margin, options = (sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]),
                                        int(sys.argv[5]), json.loads(sys.argv[6]))
with limited_engine(path, limit, margin, len(ids) + n + 1, options) as engine:
    stats = GenerationStats()
    for _ in stream_ids(engine, ids, n, temperature=0.0, stop=set(), stats=stats):
        print(json.dumps({"event": "token", "t": time.perf_counter()}), flush=True)
print(json.dumps({"event": "stats", **stats.to_dict()}), flush=True)
"""


def limited_engine(path: str, limit: int, margin: int, context: int, options: dict):
    """In a child under a whole-process limit: the store with its tokenizer loaded (runtime, not model data), the
    runtime's RSS read, and an Engine given the rest of the limit less `margin`; prints the "budget" and "loaded"
    events. Exits naming the sizes where the runtime alone leaves nothing."""
    from ..engine import Engine
    from ..memory import release_free_heap, rss_bytes
    from ..store.format import FlashStore

    store = FlashStore(path)
    store.tokenizer()
    release_free_heap()
    runtime = rss_bytes()
    budget = limit - runtime - margin
    print(json.dumps({"event": "budget", "runtime_bytes": runtime, "budget_bytes": budget}), flush=True)
    if budget <= 0:
        sys.exit(f"the runtime alone (Python, torch, tokenizer: {runtime / 1e6:.0f} MB) + a {margin / 1e6:.0f} MB "
                 f"margin exceeds the {limit / 1e6:.0f} MB limit")
    engine = Engine(store, memory=budget, context=context, **options)
    print(json.dumps({"event": "loaded", "t": time.perf_counter(),
                      "chosen_mode": engine.mode + (", head on flash" if engine.head is not None else ""),
                      "planned_bytes": engine.plan.planned_bytes if engine.plan else None}), flush=True)
    return engine


def store_files(store) -> list[Path]:
    """The files an engine on `store` reads: evicted from the page cache before a limited run."""
    return [store.ffn_path, store.path / "resident.safetensors"] + \
        ([store.path / store.embed["file"]] if store.embed else [])


def absorb_events(row: dict, stdout: str, kinds) -> None:
    """The fields of a child's `kinds` events into its row (a later event's None keeps an earlier value)."""
    for kind in kinds:
        for event in _events(stdout, kind):
            row.update({k: v for k, v in event.items() if k not in ("event", "t") and v is not None})


INAFLASH_MARGIN = 64 << 20


def _events(stdout: str, kind: str) -> list[dict]:
    out = []
    for line in stdout.splitlines():
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(event, dict) and event.get("event") == kind:
            out.append(event)
    return out


def _rate(stdout: str) -> dict:
    times = [event["t"] for event in _events(stdout, "token")]
    start = _events(stdout, "start")
    prefill = {"prefill_ms": (times[0] - start[0]["t"]) * 1e3} if start and times else {}  # prompt + first token
    if len(times) < 2:
        return {"tokens": len(times), **prefill}
    decode_s = times[-1] - times[0]
    return {"tokens": len(times), "tokens_per_s": (len(times) - 1) / decode_s,
            "ms_per_token": decode_s * 1e3 / (len(times) - 1), **prefill}


def _run(name: str, script: str, args: list[str], limit: int, model_file: Path, gen_tokens: int,
         timeout: float = TIMEOUT_S) -> dict:
    """`script` in a child under the limit: its rate from the token events, its status, and its stdout."""
    row = {"name": name, "limit_bytes": limit}
    evict_from_page_cache(model_file)
    try:
        run = run_limited([sys.executable, "-c", script, *args], limit, timeout, name=f"inaflash-{name}")
    except CgroupUnavailable as e:
        return {**row, "status": "unavailable", "reason": f"no memory limit possible: {e}"}
    row.update(_rate(run.stdout), max_usage_bytes=run.max_usage_bytes, seconds=run.seconds, stdout=run.stdout)
    if run.oom_killed:
        row.update(status="killed", reason=f"out of memory under the {limit / 1e6:.0f} MB limit "
                                           f"(after {row.get('tokens', 0)} tokens)")
    elif run.returncode != 0 and row.get("tokens", 0) < gen_tokens:
        cause = "timeout" if run.seconds >= timeout else f"exit {run.returncode}"
        tail = run.stderr.strip().splitlines()[-1:] or [""]
        row.update(status="partial" if row.get("tokens_per_s") else "failed",
                   reason=f"{cause} after {row.get('tokens', 0)} tokens: {tail[0][:200]}")
    else:
        row["status"] = "ok"
    return row


def run_inaflash_limited(store, prompt_ids: list[int], gen_tokens: int, limit: int, options: dict) -> dict:
    """inaflash (`options`: Engine's, e.g. mode="sparse") in a child under the limit, as the baselines run."""
    name = f"inaflash-{options.get('mode', 'naive')}"
    for f in store_files(store):
        evict_from_page_cache(f)
    row = _run(name, INAFLASH, [str(store.path), json.dumps(prompt_ids), str(gen_tokens), str(limit),
                                str(INAFLASH_MARGIN), json.dumps(options)], limit, store.ffn_path, gen_tokens)
    absorb_events(row, row.pop("stdout", ""), ("budget", "loaded", "stats"))
    row["options"] = options
    return row


def run_llama_cpp_unlimited(store, prompt_ids: list[int], gen_tokens: int) -> dict:
    """llama.cpp on the store's source GGUF with no memory limit (its file in the page cache, as users run it when
    the model fits): the speed bound inaflash's dram mode is measured against."""
    import subprocess

    row = {"name": "llama.cpp (no limit)"}
    source = Path(store.manifest.get("source", {}).get("path", ""))
    if source.suffix != ".gguf" or not source.exists():
        return {**row, "status": "unavailable", "reason": f"the store's source {source} is not an available GGUF"}
    if importlib.util.find_spec("llama_cpp") is None:
        return {**row, "status": "unavailable", "reason": "llama-cpp-python is not installed "
                                                          "(pip install 'inaflash[baselines]')"}
    prompt = store.tokenizer().decode(prompt_ids)
    t0 = time.perf_counter()
    run = subprocess.run([sys.executable, "-c", LLAMA_CPP, str(source), prompt, str(gen_tokens)],
                         capture_output=True, text=True, timeout=TIMEOUT_S)
    row.update(_rate(run.stdout), seconds=time.perf_counter() - t0)
    row["status"] = "ok" if run.returncode == 0 else "failed"
    if run.returncode != 0:
        row["reason"] = (run.stderr.strip().splitlines() or [""])[-1][:200]
    return row


def run_baselines(store, prompt_ids: list[int], gen_tokens: int, limit: int, progress: bool = True) -> list[dict]:
    source = Path(store.manifest.get("source", {}).get("path", ""))
    rows = []
    if not source.exists():
        reason = f"the store's source model {source} is not available"
        return [{"name": n, "status": "unavailable", "reason": reason} for n in ("llama.cpp-mmap", "transformers-offload")]
    if progress:
        print(f"inaflash: baselines under a {limit / 1e6:.0f} MB limit", file=sys.stderr)
    if source.suffix != ".gguf":
        rows.append({"name": "llama.cpp-mmap", "status": "unavailable", "reason": "the source is not a GGUF file"})
    elif importlib.util.find_spec("llama_cpp") is None:
        rows.append({"name": "llama.cpp-mmap", "status": "unavailable",
                     "reason": "llama-cpp-python is not installed (pip install 'inaflash[baselines]'; it builds "
                               "llama.cpp from source)"})
    else:
        prompt = store.tokenizer().decode(prompt_ids)
        rows.append(_run("llama.cpp-mmap", LLAMA_CPP, [str(source), prompt, str(gen_tokens)], limit, source,
                         gen_tokens))
        rows[-1].pop("stdout", None)
    if importlib.util.find_spec("accelerate") is None:
        rows.append({"name": "transformers-offload", "status": "unavailable", "reason": "accelerate not installed"})
    else:
        with tempfile.TemporaryDirectory(prefix="inaflash-offload-") as offload:
            rows.append(_run("transformers-offload", TRANSFORMERS_OFFLOAD,
                             [str(source), json.dumps(prompt_ids), str(gen_tokens), offload, str(limit // 2)],
                             limit, source, gen_tokens))
            rows[-1].pop("stdout", None)
    return rows
