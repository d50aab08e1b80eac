"""`inaflash bench`: the paper's I/O ablation (Table 2) and per-token latency (Table 3) on this machine, in one run,
next to the baselines users pick today.

Configurations run interleaved (round r runs every configuration once), so the disk's drift hits all alike; reads
bypass the page cache (O_DIRECT). Each row reports the median over rounds. Baselines run in a child process under a
cgroup-v1 memory limit with the model file evicted from the page cache first; a baseline that cannot run says why.
"""

from __future__ import annotations

import gc
import json
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

from tqdm import tqdm

from ..errors import InaflashError
from ..options import Options

DEFAULT_WINDOW = 4
RESULTS = Path("bench/results")


@dataclass
class Config:
    name: str
    what: str  # what this row adds (the paper's ablation steps are cumulative)
    options: Options  # the row's run options; each run adds its context, the budget, the gap and the cache format
    bundled: bool = True
    coalesce: bool = True
    budget: bool = False  # run under --memory (else unlimited)

    @property
    def mode(self) -> str:
        return self.options.mode


SPARSE_ROW = Options(mode="sparse", window=DEFAULT_WINDOW)
CONFIGS = [
    Config("dram", "whole model in DRAM: the bound", Options(mode="dram")),
    Config("naive", "every layer's whole FFN read every token", Options(mode="naive")),
    Config("hybrid", "as many layers' FFN in DRAM as the budget allows, the rest read whole", Options(mode="hybrid"),
           budget=True),
    Config("+predictor", "read only predicted neurons (unbundled, one read each, no reuse)",
           Options(mode="sparse", window=0), bundled=False, coalesce=False),
    Config("+windowing", "keep the last 4 tokens' neurons: read only new ones", SPARSE_ROW, bundled=False,
           coalesce=False),
    Config("+bundling", "one read per neuron (gate, up, down together)", SPARSE_ROW, coalesce=False),
    Config("+coalescing", "merge reads closer than the probed gap", SPARSE_ROW),
    Config("full", "sparse mode with every technique, within --memory", SPARSE_ROW, budget=True),
    Config("auto", "the default (--mode auto): the fastest mode that fits --memory", Options(mode="auto"),
           budget=True),
    Config("naive-unchecked", "naive without checking reads against their checksums (the check's cost)",
           Options(mode="naive", checksums=False)),
    Config("auto-unchecked", "auto without checking reads against their checksums", Options(mode="auto",
           checksums=False), budget=True),
]
FIELDS = ["ms_per_token", "io_ms_per_token", "predictor_ms_per_token", "memory_ms_per_token", "compute_ms_per_token",
          "bytes_read_per_token", "reads_per_token", "cache_hit_rate", "prefill_ms", "peak_rss_bytes"]


def bench_prompt(engine, tokens: int) -> list[int]:
    """Real text the calibration never saw: the end of pydoc_data.topics (calibration uses its start)."""
    from .calibrate import calibration_text

    text = calibration_text()
    ids = engine.tokenizer(text[-tokens * 12:], add_special_tokens=False)["input_ids"]
    if len(ids) < tokens:
        raise InaflashError(f"could not make a {tokens}-token prompt")
    return ids[-tokens:]


def reset_peak_rss() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def prepare_stores(model, progress: bool):
    """The bundled store (calibrated here if it is not yet) and its unbundled twin with the same calibration."""
    from .calibrate import calibrate, copy_sparsity
    from ..loader import resolve_store
    from ..store.format import FlashStore

    store = resolve_store(model, progress=progress)
    if store.layout != "bundled":
        raise InaflashError(f"bench needs a bundled store; {store.path} is {store.layout}")
    if store.manifest.get("sparsity") is None:
        print(f"inaflash: calibrating {store.path} for sparse mode (once)", file=sys.stderr)
        calibrate(store.path, progress=progress)
        store = FlashStore(store.path)
    source = store.manifest.get("source", {}).get("path")
    if source is None or not Path(source).exists():
        return store, None, f"the store's source model {source} is not available to write the unbundled layout"
    if store.ffn_format != "float":
        return store, None, f"the store's FFN is {store.ffn_format}; the unbundled layout is written in float only"
    unbundled = resolve_store(source, dtype=store.dtype_name, layout="unbundled", progress=progress,
                              resident_format=store.resident_format)
    if unbundled.manifest.get("sparsity") != store.manifest.get("sparsity"):
        copy_sparsity(store, unbundled)
        unbundled = FlashStore(unbundled.path)
    return store, unbundled, None


def run_config(cfg: Config, store, unbundled, memory, prompt: list[int], gen_tokens: int, max_gap: int,
               max_seconds: float, cache_format: str = "store") -> dict:
    from ..engine import Engine
    from ..generate import GenerationStats, stream_ids
    from ..reader import DEFAULT_MAX_GAP

    target = store if cfg.bundled else unbundled
    if target is None:
        return {"status": "unavailable", "reason": "no unbundled store"}
    options = replace(cfg.options, context=len(prompt) + gen_tokens + 1)
    if cfg.mode in ("sparse", "hybrid", "auto"):
        options = replace(options, memory=memory if cfg.budget else None)
    if cfg.mode in ("sparse", "auto"):
        options = replace(options, max_gap=(max_gap if max_gap is not None else DEFAULT_MAX_GAP) if cfg.coalesce
                          else -1, cache_format=cache_format)
    gc.collect()
    reset_peak_rss()
    try:
        with warnings.catch_warnings():  # an unchecked row is asked for by name: its warning says nothing new
            warnings.filterwarnings("ignore", "checksums off", RuntimeWarning)
            engine = Engine(target, options)
        with engine:
            stats = GenerationStats()
            tokens = stream_ids(engine, prompt, gen_tokens, temperature=0.0, stop=set(), stats=stats)
            deadline = time.perf_counter() + max_seconds
            try:
                for _ in tokens:  # a very slow configuration is cut short; its row says after how many tokens
                    if time.perf_counter() > deadline and stats.decode_steps >= 2:
                        break
            finally:
                tokens.close()
            row = {k: getattr(stats, k) for k in FIELDS}
            row["generated_tokens"] = stats.generated_tokens
            if engine.plan is not None:
                row.update(budget_bytes=engine.plan.budget_bytes, planned_bytes=engine.plan.planned_bytes,
                           window=engine.plan.window, cache_capacity=engine.plan.cache_capacity)
            if engine.mode == "hybrid":
                row["resident_ffn_layers"] = len(engine.ffn.resident_layers)
            if engine.choice is not None:
                row.update(chosen_mode=engine.mode, choice=engine.choice.reason)
            row["status"] = "ok"
            return row
    except InaflashError as e:
        return {"status": "refused", "reason": str(e)}


def summarize(runs: list[dict]) -> dict:
    ok = [r for r in runs if r.get("status") == "ok"]
    if not ok:
        return runs[0]
    row = {"status": "ok", "rounds": len(ok)}
    for k in ok[0]:
        values = [r[k] for r in ok if isinstance(r.get(k), (int, float))]
        if values:
            row[k] = statistics.median(values)
        elif k not in row:
            row[k] = ok[0][k]
    row["ms_per_token_all"] = [r["ms_per_token"] for r in ok]
    if row.get("ms_per_token"):
        row["tokens_per_s"] = 1e3 / row["ms_per_token"]
    if row.get("reads_per_token"):
        row["bytes_per_read"] = row["bytes_read_per_token"] / row["reads_per_token"]
    if row.get("io_ms_per_token"):
        row["mb_per_s_while_blocked"] = row["bytes_read_per_token"] / row["io_ms_per_token"] / 1e3
    return row


def bench(model: str | None = None, memory: str = "50%", prompt_tokens: int = 128, gen_tokens: int = 256,
          repeat: int = 1, configs: list[str] | None = None, baselines: bool = True, limit: str | None = None,
          out_dir: str | Path = RESULTS, max_seconds: float = 120.0, prompt_ids: list[int] | None = None,
          progress: bool = True, cache_format: str = "store") -> dict:
    """prompt_ids: use these instead of `prompt_tokens` of real text (a model without a tokenizer).
    cache_format: the sparse rows' neuron cache ("store": bundles as stored, or "int8")."""
    from ..engine import Engine
    from ..planner import parse_memory
    from ..paths import load_max_gap, profile_path
    from .probe import throughput

    chosen = [c for c in CONFIGS if configs is None or c.name in configs]
    if configs is not None and len(chosen) != len(configs):
        known = ", ".join(c.name for c in CONFIGS)
        raise InaflashError(f"unknown configuration in {configs}; choose from {known}")
    store, unbundled, unbundled_reason = prepare_stores(model, progress)
    budget = parse_memory(memory, store)
    if prompt_ids is None:
        with Engine(store, mode="naive", context=8) as probe_engine:
            prompt = bench_prompt(probe_engine, prompt_tokens)
    else:
        prompt, prompt_tokens = list(prompt_ids), len(prompt_ids)
    max_gap = load_max_gap()
    profile = json.loads(profile_path().read_text()) if profile_path().exists() else None

    rounds: dict[str, list[dict]] = {c.name: [] for c in chosen}
    bar = tqdm(total=repeat * len(chosen), desc="bench", unit="run", disable=not progress)
    for _ in range(repeat):
        for cfg in chosen:
            bar.set_postfix_str(cfg.name)
            row = run_config(cfg, store, unbundled, budget, prompt, gen_tokens, max_gap, max_seconds, cache_format)
            if row.get("status") == "unavailable" and unbundled_reason:
                row["reason"] = unbundled_reason
            rounds[cfg.name].append(row)
            bar.update()
    bar.close()
    rows = []
    for cfg in chosen:
        row = {"name": cfg.name, "what": cfg.what, "mode": cfg.mode, **summarize(rounds[cfg.name])}
        if profile and row.get("bytes_per_read"):
            row["probe_mb_per_s_at_read_size"] = throughput(profile, int(row["bytes_per_read"]))
        rows.append(row)

    result = {
        "model": store.manifest.get("source", {}).get("path") or str(store.path), "store": str(store.path),
        "dtype": store.dtype_name, "ffn_bytes": store.ffn_bytes, "resident_bytes": store.resident_bytes,
        "memory": memory, "budget_bytes": budget, "prompt_tokens": prompt_tokens, "gen_tokens": gen_tokens,
        "ffn_format": store.ffn_format, "resident_format": store.resident_format, "cache_format": cache_format,
        "ffn_compute": ffn_compute(store),
        "embeddings_on_flash": store.embed is not None,
        "repeat": repeat, "max_seconds_per_run": max_seconds, "max_gap": max_gap, "probe_profile": str(profile_path()) if profile else None,
        "calibration": {k: store.manifest["sparsity"].get(k) for k in ("target_sparsity", "rank", "window", "quality")},
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine(), "rows": rows,
    }
    if baselines:
        from .baselines import run_baselines, run_inaflash_limited, run_llama_cpp_unlimited

        result["llama_cpp_unlimited"] = run_llama_cpp_unlimited(store, prompt, gen_tokens)
        result["baselines"] = []
        for one in (limit.split(",") if limit else [memory]):
            limit_bytes = parse_memory(one.strip(), store)
            result["baselines"] += run_baselines(store, prompt, gen_tokens, limit_bytes, progress)
            # inaflash's default (--mode auto) under the same whole-process limit, runtime included
            result["baselines"].append(run_inaflash_limited(
                store, prompt, gen_tokens, limit_bytes,
                dict(mode="auto", window=DEFAULT_WINDOW, cache_format=cache_format, max_gap=max_gap)))
    result["summary"] = key_ratios(result)
    write_results(result, Path(out_dir))
    return result


def ffn_compute(store) -> str:
    """How this store's FFN is multiplied: by the native kernel on the bundles as stored, or decoded by torch."""
    from ..ffn.dense import BundleMath

    if BundleMath(store).native:
        return "the native kernel, on bundles as stored"
    return "torch, bundles decoded per call (no native kernel for this format or machine)"


def machine() -> dict:
    import os
    import platform

    import torch

    return {"cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads(), "platform": platform.platform()}


def key_ratios(result: dict) -> dict:
    by = {r["name"]: r for r in result["rows"] if r.get("status") == "ok"}
    out = {}

    def ratio(a, b, key="ms_per_token"):
        if a in by and b in by and by[b].get(key):
            return by[a][key] / by[b][key]
        return None

    out["naive_over_full"] = ratio("naive", "full")
    out["naive_over_auto"] = ratio("naive", "auto")
    # under each whole-process limit: inaflash's default against llama.cpp-mmap, tokens/s over tokens/s
    for limit in sorted({b.get("limit_bytes") for b in result.get("baselines", []) if b.get("limit_bytes")}):
        rows = {b["name"]: b for b in result["baselines"] if b.get("limit_bytes") == limit}
        ours, theirs = rows.get("inaflash-auto", {}), rows.get("llama.cpp-mmap", {})
        if ours.get("tokens_per_s") and theirs.get("tokens_per_s"):
            out[f"limited_speedup_over_llamacpp_{limit / 1e6:.0f}MB"] = ours["tokens_per_s"] / theirs["tokens_per_s"]
    llama = result.get("llama_cpp_unlimited") or {}
    if "dram" in by and llama.get("ms_per_token"):
        out["dram_over_llamacpp"] = by["dram"]["ms_per_token"] / llama["ms_per_token"]
        out["dram_prefill_over_llamacpp"] = by["dram"]["prefill_ms"] / llama["prefill_ms"]
    out["full_over_dram"] = ratio("full", "dram")
    out["naive_over_coalescing"] = ratio("naive", "+coalescing")
    for name in ("naive", "auto"):  # what checking every read costs: checked over unchecked ms/token, minus 1
        r = ratio(name, f"{name}-unchecked")
        out[f"checksum_cost_{name}"] = None if r is None else r - 1
    gate = (result.get("calibration") or {}).get("quality") or {}
    for k in ("ppl_increase", "top1_agreement", "greedy_prefix"):  # sparse's quality gate (what auto trusts)
        if k in gate:
            out[f"sparse_gate_{k}"] = gate[k]
    for name in ("full", "+coalescing", "auto"):
        if name in by:
            out[f"{name}_bytes_share_of_ffn"] = by[name]["bytes_read_per_token"] / result["ffn_bytes"]
    return out


def write_results(result: dict, out_dir: Path) -> tuple[Path, Path, Path | None]:
    out_dir.mkdir(parents=True, exist_ok=True)
    memory = str(result["memory"]).replace("%", "pct").replace("/", "_")
    formats = "".join(f"-{key}-{result[key]}" for key in ("ffn_format", "resident_format", "cache_format")
                      if result.get(key, "float") not in ("float", "store")).replace("_format", "")
    base = f"{time.strftime('%Y-%m-%d')}-{Path(result['model']).stem}{formats}-mem{memory}"
    # a second run on the same day gets its own files (-run2, ...): earlier results stay as they were
    stem = next(s for s in (base if n == 1 else f"{base}-run{n}" for n in range(1, 1000))
                if not (out_dir / f"{s}.json").exists())
    json_path, md_path, png_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md", out_dir / f"{stem}.png"
    json_path.write_text(json.dumps(result, indent=1))
    md_path.write_text(markdown(result, png_path.name))
    try:
        plot(result, png_path)
    except ImportError:
        png_path = None
    return json_path, md_path, png_path


def _mb(x) -> str:
    return "-" if x is None else f"{x / 1e6:.1f}"


def _ms(x) -> str:
    return "-" if x is None else f"{x:.1f}"


def markdown(result: dict, png_name: str | None = None) -> str:
    lines = [
        f"# inaflash bench: {Path(result['model']).name}",
        "",
        f"{result['date']}; store {result['dtype']} (FFN {result.get('ffn_format', 'float')}, resident "
        f"{result.get('resident_format', 'float')}, embeddings on flash: {result.get('embeddings_on_flash', False)}, "
        f"neuron cache {result.get('cache_format', 'store')}; FFN computed by "
        f"{result.get('ffn_compute', 'torch')}), FFN {_mb(result['ffn_bytes'])} MB, resident "
        f"{_mb(result['resident_bytes'])} MB; --memory {result['memory']} = {_mb(result['budget_bytes'])} MB; "
        f"{result['prompt_tokens']}-token prompt, {result['gen_tokens']} generated tokens (greedy), "
        f"{result['repeat']} round(s), medians, each run cut at {result['max_seconds_per_run']:.0f} s; "
        f"I/O = issuing reads + blocked on them; coalescing gap {result['max_gap'] // 1024} KiB; "
        f"{result['machine']['cpus']} CPUs, torch {result['machine']['torch']}.",
        "",
        "| configuration | adds | tokens | ms/token | I/O | predictor | memory mgmt | compute | MB read/token | "
        "reads/token | KiB/read | MB/s blocked | probe MB/s | hit rate | prefill ms | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        if r.get("status") != "ok":
            lines.append(f"| {r['name']} | {r['what']} | {r['status']}: {r.get('reason', '')} |" + " |" * 13)
            continue
        hit = r.get("cache_hit_rate")
        lines.append(
            f"| {r['name']} | {r['what']} | {r['generated_tokens']:.0f} | {_ms(r['ms_per_token'])} | "
            f"{_ms(r['io_ms_per_token'])} | "
            f"{_ms(r.get('predictor_ms_per_token'))} | {_ms(r.get('memory_ms_per_token'))} | "
            f"{_ms(r['compute_ms_per_token'])} | {_mb(r['bytes_read_per_token'])} | {r['reads_per_token']:.0f} | "
            f"{r.get('bytes_per_read', 0) / 1024:.1f} | {r.get('mb_per_s_while_blocked', 0):.0f} | "
            f"{r.get('probe_mb_per_s_at_read_size', 0) or 0:.0f} | {'-' if hit is None else f'{hit:.3f}'} | "
            f"{_ms(r.get('prefill_ms'))} | {_mb(r['peak_rss_bytes'])} |")
    llama = result.get("llama_cpp_unlimited")
    if llama:
        detail = (f"{_ms(llama.get('ms_per_token'))} ms/token ({llama.get('tokens_per_s', 0) or 0:.2f} tokens/s), "
                  f"prefill + first token {_ms(llama.get('prefill_ms'))} ms" if llama.get("status") == "ok"
                  else f"{llama['status']}: {llama.get('reason', '')}")
        lines += ["", f"llama.cpp on the same GGUF with no memory limit (the speed to beat when the model fits; "
                      f"inaflash dram's prefill above is the {result['prompt_tokens']}-token prompt): {detail}"]
    if result.get("baselines"):
        lines += ["", "Baselines and inaflash's default (--mode auto; the mode it chose in brackets), each a child process "
                      "under a cgroup-v1 memory limit on "
                      "the whole process (runtime included), model files evicted from the page cache first:", "",
                  "| baseline | limit MB | status | tokens/s | ms/token | peak cgroup usage MB |", "|---|---|---|---|---|---|"]
        for b in result["baselines"]:
            chosen = f" ({b['chosen_mode']})" if b.get("chosen_mode") else ""
            lines.append(f"| {b['name']}{chosen} | {_mb(b.get('limit_bytes'))} | {b['status']}"
                         f"{': ' + b['reason'] if b.get('reason') else ''} | "
                         f"{b.get('tokens_per_s', 0) or 0:.2f} | {_ms(b.get('ms_per_token'))} | "
                         f"{_mb(b.get('max_usage_bytes'))} |")
    s = result.get("summary", {})
    parts = [f"{k} = {v:.3g}" for k, v in s.items() if v is not None]
    gate = result.get("calibration", {}).get("quality")
    if gate:
        lines += ["", f"The store's sparse quality gate (calibration's validation text; `--mode auto` runs sparse only "
                      f"if it passed): {'passed' if gate.get('ok') else 'failed: ' + str(gate.get('failed'))}; "
                      f"perplexity {gate['ppl_increase']:+.2%}, top-1 agreement {gate['top1_agreement']:.3f}, "
                      f"greedy prefix {gate['greedy_prefix']:.1f} of 32."]
    lines += ["", "Key ratios: " + ("; ".join(parts) if parts else "n/a"), ""]
    if png_name:
        lines += [f"![ms/token by configuration]({png_name})", ""]
    return "\n".join(lines)


def plot(result: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r.get("status") == "ok"]
    names = [r["name"] for r in rows]
    parts = [("io_ms_per_token", "I/O wait"), ("predictor_ms_per_token", "predictor"),
             ("memory_ms_per_token", "memory mgmt"), ("compute_ms_per_token", "compute")]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
    bottom = [0.0] * len(rows)
    for key, label in parts:
        values = [max(0.0, r.get(key) or 0.0) for r in rows]
        ax1.bar(names, values, bottom=bottom, label=label)
        bottom = [a + b for a, b in zip(bottom, values)]
    ax1.set_ylabel("ms per token (median)")
    ax1.legend(fontsize=8)
    ax1.tick_params(axis="x", rotation=30)
    ax2.bar(names, [r["bytes_read_per_token"] / 1e6 for r in rows], color="tab:gray")
    ax2.set_ylabel("MB read from flash per token")
    ax2.tick_params(axis="x", rotation=30)
    fig.suptitle(f"inaflash bench: {Path(result['model']).name}, --memory {result['memory']} ({result['date']})")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
