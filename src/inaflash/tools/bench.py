"""`inaflash bench`: the paper's I/O ablation (Table 2) and per-token latency (Table 3) on this machine, in one run,
next to the baselines users pick today.

Configurations run interleaved (round r runs every configuration once), so the disk's drift hits all alike; reads
bypass the page cache (O_DIRECT). Each row reports the median over rounds. Baselines run in a child process under a
cgroup-v1 memory limit with the model file evicted from the page cache first; a baseline that cannot run says why.
"""

from __future__ import annotations

import contextlib
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
from .report import key_ratios, write_results

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
    beside_reads: bool = False  # another process reads the FFN file the whole time it generates

    @property
    def mode(self) -> str:
        return self.options.mode


# the paper's ablation steps: the window cache alone (no budget, so the hot neurons would be every neuron)
SPARSE_ROW = Options(mode="sparse", window=DEFAULT_WINDOW, hot_neurons=False)
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
    Config("full", "sparse mode with every technique, within --memory (hot neurons pinned by the planner)",
           Options(mode="sparse", window=DEFAULT_WINDOW), budget=True),
    Config("full-window-only", "full without hot neurons: each cache is the window's alone (the paper's)", SPARSE_ROW,
           budget=True),
    Config("auto", "the default (--mode auto): the fastest mode that fits --memory", Options(mode="auto"),
           budget=True),
    Config("naive-preadv", "naive reading with preadv, not into io_uring-registered buffers (their gain)",
           Options(mode="naive", fixed_buffers=False)),
    Config("naive-unchecked", "naive without checking reads against their checksums (the check's cost)",
           Options(mode="naive", checksums=False)),
    Config("auto-unchecked", "auto without checking reads against their checksums", Options(mode="auto",
           checksums=False), budget=True),
    Config("dram-beside-reads", "dram while another process reads the FFN file (O_DIRECT, 4 MiB): compute's bound "
           "while reads land", Options(mode="dram"), beside_reads=True),
]

# The child of a `beside_reads` row: reads the file whole in 4 MiB pieces, over and over, bypassing the page cache
# where the file system allows; prints the bytes it has read after its first pass and on SIGTERM. (In this VM a
# reader of 2.2 GB/s slowed dram's compute 1.8x: naive's compute is to be compared with this row's; docs/measurements.md.)
READ_LOOP = """
import mmap, os, signal, sys
piece, total = 4 << 20, 0
try:
    fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECT)
except OSError:
    fd = os.open(sys.argv[1], os.O_RDONLY)
def done(*_):
    print(total, flush=True)
    os._exit(0)
signal.signal(signal.SIGTERM, done)
buf, size = mmap.mmap(-1, piece), os.fstat(fd).st_size
while True:
    for offset in range(0, max(size - piece, 0) + 1, piece):
        total += os.preadv(fd, [buf], offset)
    os.posix_fadvise(fd, 0, size, os.POSIX_FADV_DONTNEED)
    if total <= size:
        print(total, flush=True)
"""


class BesideReads:
    """READ_LOOP in a child process for the life of the `with`; `.bytes` and `.seconds` after it."""

    MIN_SECONDS = 0.5

    def __init__(self, path):
        self.path, self.bytes, self.seconds = str(path), 0, 0.0

    def __enter__(self):
        import subprocess

        self.child = subprocess.Popen([sys.executable, "-c", READ_LOOP, self.path], stdout=subprocess.PIPE, text=True)
        first = self.child.stdout.readline().strip()  # its first pass is done: reads are landing from here on
        self.first = int(first) if first.isdigit() else 0
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        # A tiny model generates in milliseconds, in which a reader sharing two cores with torch may not be scheduled
        # at all (a CI run saw 0 bytes): its rate is taken over at least MIN_SECONDS.
        time.sleep(max(0.0, self.MIN_SECONDS - (time.perf_counter() - self.t0)))
        self.child.terminate()
        out = self.child.communicate(timeout=30)[0].split()
        self.seconds = time.perf_counter() - self.t0
        self.bytes = int(out[-1]) - self.first if out and out[-1].isdigit() else 0


FIELDS = ["ms_per_token", "io_ms_per_token", "predictor_ms_per_token", "memory_ms_per_token", "compute_ms_per_token",
          "bytes_read_per_token", "reads_per_token", "cache_hit_rate", "prefill_ms", "peak_rss_bytes"]


def bench_prompt(engine, tokens: int) -> list[int]:
    """Real text the calibration never saw: the end of pydoc_data.topics (calibration uses its start)."""
    from ..calibrate import calibration_text

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


def prepare_stores(model, progress: bool, sparse: bool = True):
    """The bundled store (calibrated here if it is not yet and `sparse` rows will run) and its unbundled twin with
    the same calibration."""
    from ..calibrate import calibrate, copy_sparsity
    from ..loader import resolve_store
    from ..store.format import FlashStore

    store = resolve_store(model, progress=progress)
    if store.layout != "bundled":
        raise InaflashError(f"bench needs a bundled store; {store.path} is {store.layout}")
    if not sparse:
        return store, None, "no sparse row was asked for"
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
               max_seconds: float, cache_format: str = "store", density: float | None = None) -> dict:
    from ..engine import Engine
    from ..generate import GenerationStats, stream_ids
    from ..reader import DEFAULT_MAX_GAP

    target = store if cfg.bundled else unbundled
    if target is None:
        return {"status": "unavailable", "reason": "no unbundled store"}
    # one token per forward pass in every row: these rows compare modes and techniques per pass (and the baselines
    # decode one token a pass); bench/speculation.py measures speculation against it
    options = replace(cfg.options, context=len(prompt) + gen_tokens + 1, speculation="off")
    if cfg.mode in ("sparse", "hybrid", "auto"):
        options = replace(options, memory=memory if cfg.budget else None)
    if cfg.mode in ("sparse", "auto"):
        options = replace(options, max_gap=(max_gap if max_gap is not None else DEFAULT_MAX_GAP) if cfg.coalesce
                          else -1, cache_format=cache_format)
    if cfg.mode == "sparse":
        options = replace(options, density=density)
    gc.collect()
    reset_peak_rss()
    try:
        with warnings.catch_warnings():  # an unchecked row is asked for by name: its warning says nothing new
            warnings.filterwarnings("ignore", "checksums off", RuntimeWarning)
            engine = Engine(target, options)
        with engine:
            stats = GenerationStats()
            with BesideReads(target.ffn_path) if cfg.beside_reads else contextlib.nullcontext() as beside:
                tokens = stream_ids(engine, prompt, gen_tokens, temperature=0.0, stop=set(), stats=stats)
                deadline = time.perf_counter() + max_seconds
                try:
                    for _ in tokens:  # a very slow configuration is cut short; its row says after how many tokens
                        if time.perf_counter() > deadline and stats.decode_steps >= 2:
                            break
                finally:
                    tokens.close()
            row = {k: getattr(stats, k) for k in FIELDS}
            if beside is not None:
                row.update(beside_read_bytes=beside.bytes, beside_read_mb_per_s=beside.bytes / beside.seconds / 1e6)
            row["generated_tokens"] = stats.generated_tokens
            if engine.plan is not None:
                row.update(budget_bytes=engine.plan.budget_bytes, planned_bytes=engine.plan.planned_bytes,
                           window=engine.plan.window, cache_capacity=engine.plan.cache_capacity)
                if engine.plan.pinned is not None:  # hot neurons: the planner's split, and the reads it expected
                    row.update(pinned_per_layer=sum(len(p) for p in engine.plan.pinned) / len(engine.plan.pinned),
                               predicted_bytes_read_per_token=engine.plan.predicted_read_bundles * store.bundle_bytes)
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
          progress: bool = True, cache_format: str = "store", density: float | None = None,
          decoding: bool = False, decoding_tokens: int = 64, decoding_streams: bool = True,
          draft: str | None = None, draft_vocab: int = 32768, compare: list[str] | None = None) -> dict:
    """prompt_ids: use these instead of `prompt_tokens` of real text (a model without a tokenizer).
    cache_format: the sparse rows' neuron cache ("store": bundles as stored, or "int8"). density: the sparse rows'
    selected fraction per token (None: the calibrated threshold). decoding: also measure more tokens per pass
    (tools/decoding.py: the k-token pass cost per mode; under each limit, speculation on two prompt sets against
    llama.cpp with and without its lookup decoding, and 1/2/4/8 concurrent streams), `decoding_tokens` per prompt;
    `draft` (a store): also speculation with that draft model, its head cut to `draft_vocab` ids.
    compare: other stores of the same model (another FFN or resident format) whose default also runs under each
    limit, on the same prompt."""
    from ..engine import Engine
    from ..planner import parse_memory
    from ..paths import load_max_gap, profile_path
    from .probe import throughput

    configs = [] if configs == ["none"] else configs  # `--config none`: only the baselines / --decoding
    chosen = [c for c in CONFIGS if configs is None or c.name in configs]
    if configs is not None and len(chosen) != len(configs):
        known = ", ".join(c.name for c in CONFIGS)
        raise InaflashError(f"unknown configuration in {configs}; choose from {known}")
    store, unbundled, unbundled_reason = prepare_stores(model, progress, any(c.mode == "sparse" for c in chosen))
    others = [comparable_store(store, path) for path in compare or []]
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
            row = run_config(cfg, store, unbundled, budget, prompt, gen_tokens, max_gap, max_seconds, cache_format,
                             density)
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
        "density": density,
        "ffn_compute": ffn_compute(store),
        "embeddings_on_flash": store.embed is not None,
        "repeat": repeat, "max_seconds_per_run": max_seconds, "max_gap": max_gap, "probe_profile": str(profile_path()) if profile else None,
        "calibration": {k: (store.manifest.get("sparsity") or {}).get(k)
                        for k in ("target_sparsity", "rank", "window", "quality")},
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine(), "rows": rows,
    }
    if decoding and decoding_streams:
        from .decoding import pass_costs

        result["pass_costs"] = pass_costs(store, budget, prompt[:64], progress=progress)
    if baselines:
        from .baselines import run_llama_cpp_unlimited

        result["llama_cpp_unlimited"] = run_llama_cpp_unlimited(store, prompt, gen_tokens)
        result["baselines"] = []
    for one in (limit.split(",") if limit else [memory]) if baselines or decoding else []:
        limit_bytes = parse_memory(one.strip(), store)
        if baselines:
            from .baselines import run_baselines, run_inaflash_limited

            result["baselines"] += run_baselines(store, prompt, gen_tokens, limit_bytes, progress)
            # inaflash's default (--mode auto) under the same whole-process limit, runtime included; one token a
            # pass, as the llama.cpp baseline decodes
            for one_store in [store, *others]:
                row = run_inaflash_limited(one_store, prompt, gen_tokens, limit_bytes,
                                           dict(mode="auto", window=DEFAULT_WINDOW, cache_format=cache_format,
                                                max_gap=max_gap, speculation="off"))
                if one_store is not store:
                    row.update(name=f"inaflash-auto {store_label(one_store)}", store=str(one_store.path))
                result["baselines"].append(row)
        if decoding:
            from .decoding import decoding as run_decoding

            result.setdefault("decoding", []).append(run_decoding(
                store, limit_bytes, decoding_tokens, dict(mode="auto", window=DEFAULT_WINDOW,
                                                          cache_format=cache_format, max_gap=max_gap), progress,
                decoding_streams, draft, draft_vocab))
    result["summary"] = key_ratios(result)
    write_results(result, Path(out_dir))
    return result


def store_label(store) -> str:
    """How a store differs from another of its model: its formats, e.g. `palette3/int4`."""
    return f"{store.ffn_format}/{store.resident_format}"


def comparable_store(store, path: str):
    """The store at `path` (bench --compare), refused unless its model config is the main store's."""
    from ..store.format import FlashStore

    other = FlashStore(path)
    if other.config != store.config:
        raise InaflashError(f"--compare {path}: not the same model as {store.path} (its config differs)")
    return other


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
