"""`inaflash bench --decoding`: more tokens per pass over the weights, measured under a whole-process limit.

Three parts, each in the same run as its baselines:
- the cost of a pass over k new tokens against one token, k = 1..16, per mode (dram, naive, hybrid): the curve the
  draft policy's cost model learns (speculate.PassCosts), in this process;
- speculation: two prompt sets of my own (code edits, whose answers largely repeat the prompt, and open-ended
  questions), each prompt generated greedily by inaflash's default (--mode auto) with speculation off and with
  prompt lookup, and by llama.cpp-mmap without and with its prompt-lookup decoding (llama-cpp-python's
  LlamaPromptLookupDecoding), each configuration one child process under the limit running every prompt;
- concurrent streams: 1, 2, 4 and 8 prompts decoded together (generate_batch: one pass per step for all), aggregate
  decode tokens/s and the per-token latency every stream sees (one pass).
Decode tokens/s throughout: the tokens after the first over the time after the first (prefill reported apart).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

from .baselines import _events, _run, absorb_events, store_files
from .cgroup import evict_from_page_cache

CODE = [
    "Rename the variable `total` to `acc` in this function and show the whole function:\n\n"
    "def sum_list(items):\n    total = 0\n    for item in items:\n        total = total + item\n    return total\n",
    "Add type hints to this function and show it:\n\ndef scale(values, factor):\n    result = []\n"
    "    for v in values:\n        result.append(v * factor)\n    return result\n",
    "Rewrite this loop as a list comprehension and show the function:\n\ndef squares(n):\n    out = []\n"
    "    for i in range(n):\n        out.append(i * i)\n    return out\n",
    "Fix the typo `lenght` in this code and show it all:\n\ndef longest(words):\n    best = ''\n    for w in words:\n"
    "        if len(w) > len(best):\n            best = w\n    lenght = len(best)\n    return best, lenght\n",
    "Translate this Python function to JavaScript:\n\ndef greet(name):\n    if name:\n        return 'Hello, ' + name\n"
    "    return 'Hello, world'\n",
]
OPEN = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a hash table works.",
    "What are the benefits of regular exercise?",
    "Describe the water cycle.",
    "Give advice to someone learning to cook.",
]
STREAM_PROMPTS = OPEN + ["Why is the sky blue?", "How do vaccines work?",
                         "Summarize the plot of a detective novel you invent."]
WIDTHS = (1, 2, 4, 8)
PASS_WIDTHS = tuple(range(1, 17))
TIMEOUT_S = 1800  # a child runs all ten prompts (llama.cpp-mmap under 900 MB: ~1 token/s)
LOOKUP_DRAFT = 10  # llama-cpp-python's default num_pred_tokens (its docs: 10 for GPUs; under a limit reads dominate)

# inaflash under the limit (as baselines.INAFLASH): every prompt in turn, or the stream widths in turn
INAFLASH_DECODE = r"""
import json, sys
from inaflash.generate import GenerationStats, generate_batch, stream_ids
from inaflash.options import Options
from inaflash.tools.baselines import limited_engine
path, prompts, n, limit, margin, options, widths, specs = (sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]),
    int(sys.argv[4]), int(sys.argv[5]), json.loads(sys.argv[6]), json.loads(sys.argv[7]), json.loads(sys.argv[8]))
with limited_engine(path, limit, margin, max(map(len, prompts)) + n + 1, options) as engine:
    if not widths:  # each prompt with each speculation in turns (who goes first rotates)
        for i, ids in enumerate(prompts):
            for spec in specs[i % len(specs):] + specs[:i % len(specs)]:
                engine.options = Options.of(engine.options, speculation=spec)
                stats = GenerationStats()
                out = list(stream_ids(engine, ids, n, temperature=0.0, stats=stats))
                print(json.dumps({"event": "prompt", "i": i, "spec": spec, "ids": out, **stats.to_dict()}),
                      flush=True)
    for w in widths:
        out, s = generate_batch(engine, prompts[:w], n, stop=set())
        print(json.dumps({"event": "streams", "streams": w, **s.to_dict()}), flush=True)
"""

LLAMA_CPP_DECODE = r"""
import json, sys, time
from llama_cpp import Llama
from llama_cpp.llama_speculative import LlamaPromptLookupDecoding
path, prompts, n, stop, draft, n_ctx = (sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]),
                                        set(json.loads(sys.argv[4])), int(sys.argv[5]), int(sys.argv[6]))
# logits_all with a draft: llama-cpp-python 0.3.x turns it on itself for a draft model but sizes its logits store by
# the argument (n_batch rows, not n_ctx), so the first pass past 64 positions failed (ValueError: could not broadcast)
llm = Llama(model_path=path, n_ctx=n_ctx, n_batch=64, n_threads=2, use_mmap=True, verbose=False,
            logits_all=bool(draft), draft_model=LlamaPromptLookupDecoding(num_pred_tokens=draft) if draft else None)
print(json.dumps({"event": "loaded", "t": time.perf_counter()}), flush=True)
for i, ids in enumerate(prompts):
    out, times, t0 = [], [], time.perf_counter()
    for token in llm.generate(ids, temp=0.0, reset=True):
        out.append(token)
        times.append(time.perf_counter())
        if token in stop or len(out) >= n:
            break
    decode = times[-1] - times[0]
    print(json.dumps({"event": "prompt", "i": i, "ids": out, "generated_tokens": len(out),
                      "prefill_ms": (times[0] - t0) * 1e3,
                      "ms_per_token": decode * 1e3 / (len(out) - 1) if len(out) > 1 else 0.0}), flush=True)
"""


def pass_costs(store, budget: int, prompt: list[int], widths=PASS_WIDTHS, repeat: int = 3,
               modes=("dram", "naive", "hybrid"), progress: bool = True) -> list[dict]:
    """Milliseconds of one forward pass over k new tokens after `prompt` (median of `repeat`, after one unmeasured
    pass), and its ratio to k = 1, per mode; hybrid under `budget`. Each pass writes the same KV positions."""
    import torch
    from tqdm import tqdm

    from ..engine import Engine
    from ..errors import InaflashError

    rows = []
    bar = tqdm(total=len(modes) * len(widths), desc="pass cost", unit="width", disable=not progress)
    for mode in modes:
        try:
            engine = Engine(store, mode=mode, memory=budget if mode == "hybrid" else None,
                            context=len(prompt) + max(widths) + 1, speculation="off")
        except InaflashError as e:
            rows.append({"mode": mode, "status": "refused", "reason": str(e)})
            bar.update(len(widths))
            continue
        with engine:
            engine.reset(len(prompt) + max(widths) + 1)
            engine.forward(torch.tensor(prompt), 0, last_only=True)
            feed = torch.tensor((prompt * (1 + max(widths) // len(prompt)))[:max(widths)])
            engine.forward(feed[:1], len(prompt))
            ms, mb = {}, {}
            for k in widths:
                times, before = [], engine.counters()
                for _ in range(repeat):
                    t0 = time.perf_counter()
                    engine.forward(feed[:k], len(prompt))
                    times.append((time.perf_counter() - t0) * 1e3)
                ms[k] = statistics.median(times)
                mb[k] = (engine.counters() - before).io.bytes / repeat / 1e6
                bar.update()
            rows.append({"mode": engine.mode, "status": "ok", "ms": ms, "mb_read": mb,
                         "ratio": {k: ms[k] / ms[1] for k in widths},
                         **({"resident_ffn_layers": len(engine.ffn.resident_layers)} if mode == "hybrid" else {})})
    bar.close()
    return rows


def _limited(name: str, script: str, args: list[str], limit: int, files, tokens: int) -> dict:
    for f in files:
        evict_from_page_cache(f)
    row = _run(name, script, args, limit, files[0], tokens, timeout=TIMEOUT_S)
    stdout = row.pop("stdout", "")
    for key in ("tokens", "tokens_per_s", "ms_per_token", "prefill_ms"):  # _rate's: per-token events are not sent
        row.pop(key, None)
    absorb_events(row, stdout, ("budget", "loaded"))
    row["prompts"] = [{k: v for k, v in e.items() if k != "event"} for e in _events(stdout, "prompt")]
    row["streams"] = [{k: v for k, v in e.items() if k != "event"} for e in _events(stdout, "streams")]
    if row.get("status") == "failed" and row["prompts"]:
        row["status"] = "partial"
    return row


def decoding(store, limit: int, gen_tokens: int, options: dict, progress: bool = True, streams: bool = True,
             draft: str | None = None, draft_vocab: int = 32768) -> dict:
    """The speculation and (`streams`) the streams rows under one whole-process limit (children), with the same
    prompts for all; `draft`: also a child with that draft model (speculation "draft", its head cut to
    `draft_vocab` ids)."""
    import importlib.util

    from ..generate import chat_template_ids, eos_ids
    from .baselines import INAFLASH_MARGIN

    tok = store.tokenizer()
    encode = (lambda p: chat_template_ids(tok, [{"role": "user", "content": p}])) if tok.chat_template else \
        (lambda p: tok(p)["input_ids"])
    sets = {"code": [encode(p) for p in CODE], "open": [encode(p) for p in OPEN]}
    prompts = sets["code"] + sets["open"]
    files = store_files(store)
    runs = {}

    def say(what):
        if progress:
            print(f"inaflash: {what} under {limit / 1e6:.0f} MB", file=sys.stderr)

    # one child runs every prompt with speculation off and on in turns: two children one after the other met the
    # disk in different states (the second ran 5-10% slower with the same work: bench/results/2026-12-05-*-run2.md)
    say(f"inaflash, speculation off and lookup in turns, {len(prompts)} prompts")
    both = _limited("inaflash-speculation", INAFLASH_DECODE,
                    [str(store.path), json.dumps(prompts), str(gen_tokens), str(limit), str(INAFLASH_MARGIN),
                     json.dumps(options), "[]", json.dumps(["off", "lookup"])], limit, files, gen_tokens)
    for spec in ("off", "lookup"):
        runs[f"inaflash-{spec}"] = {**both, "name": f"inaflash-{spec}",
                                    "prompts": [p for p in both["prompts"] if p.get("spec") == spec]}
    if draft:
        # its own child: the draft model takes part of the budget, so speculation off there would not be plain
        # decoding at this limit (compared with inaflash-off above)
        say(f"inaflash with draft model {Path(draft).name}, {len(prompts)} prompts")
        runs["inaflash-draft"] = _limited(
            "inaflash-draft", INAFLASH_DECODE,
            [str(store.path), json.dumps(prompts), str(gen_tokens), str(limit), str(INAFLASH_MARGIN),
             json.dumps({**options, "speculation": "draft", "draft": str(draft), "draft_vocab": draft_vocab}), "[]",
             json.dumps(["draft"])], limit, files, gen_tokens)
    if streams:
        say(f"inaflash, {'/'.join(map(str, WIDTHS))} streams")
        runs["inaflash-streams"] = _limited(
            "inaflash-streams", INAFLASH_DECODE,
            [str(store.path), json.dumps([encode(p) for p in STREAM_PROMPTS[:max(WIDTHS)]]), str(gen_tokens),
             str(limit), str(INAFLASH_MARGIN), json.dumps({**options, "speculation": "off", "parallel": max(WIDTHS)}),
             json.dumps(list(WIDTHS)), "[]"], limit, files, gen_tokens)
    source = Path(store.manifest.get("source", {}).get("path", ""))
    # llama.cpp's context no larger than the longest prompt and its tokens need, batches of 64: its lookup decoding
    # keeps logits for every position (logits_all), 1024 x Qwen2.5's 151936 floats = 622 MB at n_ctx 1024, which a
    # 900 MB limit cannot hold (killed before its first token; at n_ctx 192 with n_batch 512 still killed)
    n_ctx = -(-(max(map(len, prompts)) + gen_tokens + LOOKUP_DRAFT + 2) // 64) * 64
    for name, n_lookup in (("llama.cpp-mmap", 0), ("llama.cpp-mmap-lookup", LOOKUP_DRAFT)):
        if source.suffix != ".gguf" or not source.exists():
            runs[name] = {"name": name, "status": "unavailable", "reason": f"no source GGUF ({source})"}
        elif importlib.util.find_spec("llama_cpp") is None:
            runs[name] = {"name": name, "status": "unavailable", "reason": "llama-cpp-python is not installed"}
        else:
            say(f"{name}, {len(prompts)} prompts")
            runs[name] = _limited(name, LLAMA_CPP_DECODE, [str(source), json.dumps(prompts), str(gen_tokens),
                                                           json.dumps(sorted(eos_ids(store.config, tok))),
                                                           str(n_lookup), str(n_ctx)], limit, [source], gen_tokens)
    rows = per_prompt(runs, sets)
    return {"limit_bytes": limit, "gen_tokens": gen_tokens, "sets": {k: len(v) for k, v in sets.items()},
            "prompt_tokens": [len(p) for p in prompts], "lookup_draft_llamacpp": LOOKUP_DRAFT,
            "llamacpp_n_ctx": n_ctx, "draft": draft, "draft_vocab": draft_vocab, "runs": runs, "per_prompt": rows, "summary": summary(runs, sets, rows)}


def _rate(p: dict) -> float | None:
    return 1e3 / p["ms_per_token"] if p.get("ms_per_token") else None


def per_prompt(runs: dict, sets: dict) -> list[dict]:
    """One row per prompt: each configuration's decode tokens/s, speculation's tokens per pass and acceptance, and
    whether its greedy ids are plain decoding's."""
    labels = [(kind, i) for kind, items in sets.items() for i in range(len(items))]
    rows = []
    for j, (kind, i) in enumerate(labels):
        row = {"set": kind, "prompt": i}
        for name, run in runs.items():
            p = next((p for p in run.get("prompts", []) if p["i"] == j), None)
            if p is not None:
                row[f"{name}_tok_s"] = _rate(p)
                row[f"{name}_tokens"] = p.get("generated_tokens")
        off, on, with_draft = (next((p for p in runs.get(n, {}).get("prompts", []) if p["i"] == j), None)
                               for n in ("inaflash-off", "inaflash-lookup", "inaflash-draft"))
        if off and on:
            row.update(tokens_per_pass=on.get("tokens_per_pass"), drafted=on.get("drafted_tokens"),
                       accepted=on.get("accepted_tokens"), identical=on["ids"] == off["ids"],
                       first_difference=_first_difference(on["ids"], off["ids"]),
                       mb_read_per_token_off=off.get("bytes_read_per_token", 0) / 1e6,
                       mb_read_per_token_lookup=on.get("bytes_read_per_token", 0) / 1e6)
        if off and with_draft:
            row.update(draft_tokens_per_pass=with_draft.get("tokens_per_pass"),
                       draft_drafted=with_draft.get("drafted_tokens"), draft_accepted=with_draft.get("accepted_tokens"),
                       draft_identical=with_draft["ids"] == off["ids"],
                       draft_first_difference=_first_difference(with_draft["ids"], off["ids"]))
        rows.append(row)
    return rows


def _first_difference(ids: list[int], plain: list[int]) -> int | None:
    return next((k for k, (x, y) in enumerate(zip(ids, plain)) if x != y), None)


def _ratios(rows: list[dict], kind: str, a: str, b: str) -> list[float]:
    """a's tok/s over b's on every prompt of the set where both ran."""
    return [row[f"{a}_tok_s"] / row[f"{b}_tok_s"] for row in rows if row["set"] == kind
            and row.get(f"{a}_tok_s") and row.get(f"{b}_tok_s")]


def _geomean_ratio(rows: list[dict], kind: str, a: str, b: str) -> float | None:
    r = _ratios(rows, kind, a, b)
    return statistics.geometric_mean(r) if r and len(r) == sum(1 for row in rows if row["set"] == kind) else None


def summary(runs: dict, sets: dict, rows: list[dict]) -> dict:
    """The key ratios of per_prompt's `rows` and of the streams run."""
    out = {}
    for kind in sets:
        out[f"speculative_speedup_{kind}"] = _geomean_ratio(rows, kind, "inaflash-lookup", "inaflash-off")
        out[f"min_speculative_speedup_{kind}"] = min(_ratios(rows, kind, "inaflash-lookup", "inaflash-off"),
                                                     default=None)
        out[f"speedup_over_llamacpp_{kind}"] = _geomean_ratio(rows, kind, "inaflash-lookup", "llama.cpp-mmap")
        out[f"speedup_over_llamacpp_lookup_{kind}"] = _geomean_ratio(rows, kind, "inaflash-lookup",
                                                                     "llama.cpp-mmap-lookup")
        out[f"llamacpp_lookup_speedup_{kind}"] = _geomean_ratio(rows, kind, "llama.cpp-mmap-lookup",
                                                                "llama.cpp-mmap")
        out[f"draft_speculative_speedup_{kind}"] = _geomean_ratio(rows, kind, "inaflash-draft", "inaflash-off")
        out[f"min_draft_speculative_speedup_{kind}"] = min(_ratios(rows, kind, "inaflash-draft", "inaflash-off"),
                                                           default=None)
        out[f"draft_speedup_over_llamacpp_{kind}"] = _geomean_ratio(rows, kind, "inaflash-draft", "llama.cpp-mmap")
    with_ids = [r for r in rows if "identical" in r]
    out["identical_greedy_ids"] = f"{sum(r['identical'] for r in with_ids)}/{len(with_ids)}" if with_ids else None
    with_draft = [r for r in rows if "draft_identical" in r]
    if with_draft:
        out["draft_identical_greedy_ids"] = f"{sum(r['draft_identical'] for r in with_draft)}/{len(with_draft)}"
    streams = {s["streams"]: s for s in runs.get("inaflash-streams", {}).get("streams", [])}
    if streams.get(1):
        one = streams[1]
        for w, s in streams.items():
            s["aggregate_tok_s"] = (s["generated_tokens"] - w) / (s["decode_ms"] / 1e3) if s["decode_ms"] else None
        for w in WIDTHS[1:]:
            if w in streams and streams[w]["aggregate_tok_s"] and one["aggregate_tok_s"]:
                out[f"batched_speedup_{w}"] = streams[w]["aggregate_tok_s"] / one["aggregate_tok_s"]
    return out


def markdown(d: dict) -> list[str]:
    """The decoding section of the bench's markdown."""
    mb = d["limit_bytes"] / 1e6
    lines = ["", f"## More tokens per pass under a {mb:.0f} MB whole-process limit", "",
             f"Greedy, up to {d['gen_tokens']} tokens per prompt (stopping at end of turn), each configuration one "
             f"child process under the limit running every prompt; inaflash's default (--mode auto) with speculation "
             f"off and with prompt lookup; llama.cpp-mmap (llama-cpp-python, n_ctx {d.get('llamacpp_n_ctx')}) plain and "
             f"with LlamaPromptLookupDecoding(num_pred_tokens={d['lookup_draft_llamacpp']}). Decode tokens/s (after "
             "the first token).", "",
             "| configuration | status | mode | runtime MB | budget MB |", "|---|---|---|---|---|"]
    for name, run in d["runs"].items():
        lines.append(f"| {name} | {run.get('status')}{': ' + run['reason'] if run.get('reason') else ''} | "
                     f"{run.get('chosen_mode', '-')} | {(run.get('runtime_bytes') or 0) / 1e6:.0f} | "
                     f"{(run.get('budget_bytes') or 0) / 1e6:.0f} |")
    names = ("inaflash-off", "inaflash-lookup", "llama.cpp-mmap", "llama.cpp-mmap-lookup")
    lines += ["", "| set | prompt | " + " | ".join(f"{n} tok/s" for n in names) + " | speculation speed-up | "
              "tokens/pass | accepted/drafted | identical ids (first difference) |",
              "|---|---|" + "---|" * (len(names) + 4)]
    draft_rows = [r for r in d["per_prompt"] if "draft_identical" in r]
    for r in d["per_prompt"]:
        cells = [f"{r[f'{n}_tok_s']:.2f}" if r.get(f"{n}_tok_s") else "-" for n in names]
        speed = (f"{r['inaflash-lookup_tok_s'] / r['inaflash-off_tok_s']:.2f}x"
                 if r.get("inaflash-lookup_tok_s") and r.get("inaflash-off_tok_s") else "-")
        same = "-" if "identical" not in r else ("yes" if r["identical"] else f"no ({r['first_difference']})")
        lines.append(f"| {r['set']} | {r['prompt']} | " + " | ".join(cells) + f" | {speed} | "
                     f"{r.get('tokens_per_pass') or 0:.2f} | {r.get('accepted', '-')}/{r.get('drafted', '-')} | "
                     f"{same} |")
    if draft_rows:
        cut = f"the first {d['draft_vocab']} token ids and the prompt's rarer ones" if d["draft_vocab"] else "all ids"
        lines += ["", f"With the draft model {Path(d['draft']).name} (its head: {cut}; its own child: it takes part "
                      "of the budget), against inaflash-off above:", "",
                  "| set | prompt | inaflash-draft tok/s | speed-up over off | over llama.cpp-mmap | tokens/pass | "
                  "accepted/drafted | identical ids (first difference) |", "|---|---|---|---|---|---|---|---|"]
        for r in draft_rows:
            rate, off, ll = r.get("inaflash-draft_tok_s"), r.get("inaflash-off_tok_s"), r.get("llama.cpp-mmap_tok_s")
            same = "yes" if r["draft_identical"] else f"no ({r['draft_first_difference']})"
            lines.append(f"| {r['set']} | {r['prompt']} | {rate or 0:.2f} | "
                         f"{f'{rate / off:.2f}x' if rate and off else '-'} | {f'{rate / ll:.2f}x' if rate and ll else '-'} "
                         f"| {r.get('draft_tokens_per_pass') or 0:.2f} | {r.get('draft_accepted')}/{r.get('draft_drafted')} "
                         f"| {same} |")
    streams = d["runs"].get("inaflash-streams", {}).get("streams", [])
    if streams:
        lines += ["", "Concurrent streams (generate_batch, speculation off; every stream gets one token per pass, so "
                      "its per-token latency is the pass's):", "",
                  "| streams | aggregate tok/s | vs one | passes | ms/pass p50 | ms/pass p99 | MB read/pass |",
                  "|---|---|---|---|---|---|---|"]
        one = streams[0].get("aggregate_tok_s") or 0
        for s in streams:
            agg = s.get("aggregate_tok_s") or 0
            lines.append(f"| {s['streams']} | {agg:.2f} | {agg / one if one else 0:.2f}x | {s['decode_steps']} | "
                         f"{s.get('pass_ms_p50', 0):.1f} | {s.get('pass_ms_p99', 0):.1f} | "
                         f"{s['bytes_read_per_pass'] / 1e6:.1f} |")
    parts = [f"{k} = {v:.3g}" if isinstance(v, float) else f"{k} = {v}" for k, v in d["summary"].items()
             if v is not None]
    lines += ["", "Decoding summary: " + "; ".join(parts)]
    return lines


def pass_cost_markdown(rows: list[dict]) -> list[str]:
    ok = [r for r in rows if r.get("status") == "ok"]
    if not ok:
        return []
    widths = list(ok[0]["ms"])
    lines = ["", "## The cost of a pass over k new tokens (ms, and over k = 1)", "",
             "| mode | MB read/pass | " + " | ".join(f"k={k}" for k in widths) + " |",
             "|---|---|" + "---|" * len(widths)]
    for r in ok:
        lines.append(f"| {r['mode']}{' (' + str(r['resident_ffn_layers']) + ' FFN layers in DRAM)' if 'resident_ffn_layers' in r else ''} | "
                     f"{r['mb_read'][widths[0]]:.0f} | " +
                     " | ".join(f"{r['ms'][k]:.0f} ({r['ratio'][k]:.2f}x)" for k in widths) + " |")
    for r in rows:
        if r.get("status") != "ok":
            lines.append(f"\n{r['mode']}: {r['status']}: {r.get('reason', '')}")
    return lines

