"""`inaflash simulate`: the I/O of a 7B-class model on this machine, simulated honestly.

This machine cannot hold OPT-6.7B, but its disk can hold the model's FFN. So:
1. record: generate on a real model (dense) and keep, per decode step and layer, every FFN neuron's |activation|;
2. write a synthetic store shaped like OPT-6.7B (32 layers, d = 4096, 16,384 neurons, float16 bundles: 8.6 GB of
   FFN; random bytes: only the I/O is simulated);
3. replay: per step and layer, the recorded top (1 - sparsity) neurons (the real token-to-token overlap, at a chosen
   sparsity), mapped onto the wider layer (each small neuron onto its own random set of ~10.7 large ones, so active
   fractions and overlap are kept and nothing is made artificially contiguous), go through the engine's own neuron
   cache and bundle reader (window, coalescing, O_DIRECT). Naive reads every layer whole.
What is measured is I/O and the cache's bookkeeping; no FFN is computed. Reported as a simulation.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..config import ModelConfig
from ..store.format import ALIGN, FlashStore, bundle_fields, round_up
from ..store.manifest import new_manifest, seal

OPT_6_7B = {"layers": 32, "hidden": 4096, "neurons": 16384}
PAPER_TABLE2 = [  # OPT-6.7B, M1 Max, float32 bundles (Alizadeh et al., Table 2): data read, I/O latency per token
    {"step": "naive", "gb_read": 13.4, "io_ms": 2196},
    {"step": "+predictor", "gb_read": 6.7, "io_ms": 1090},
    {"step": "+windowing", "gb_read": 0.9, "io_ms": 738},
    {"step": "+bundling", "gb_read": 0.2, "io_ms": 164},
]


def record_activations(store: FlashStore, prompt_ids: list[int], tokens: int, progress: bool = True) -> torch.Tensor:
    """[steps, layers, neurons] float16: |hidden activation| of every FFN neuron at each greedy decode step."""
    from ..engine import Engine
    from ..ffn.dense import RecordingFFN
    from ..generate import stream_ids

    steps: list[list[torch.Tensor]] = []
    with Engine(store, mode="dram", context=len(prompt_ids) + tokens + 1) as engine:
        def record(layer, x, out):
            if x.shape[0] == 1:  # decode steps only
                if layer == 0:
                    steps.append([])
                steps[-1].append(engine.ffn.hidden(layer, x)[0].abs().half())

        engine.set_ffn(RecordingFFN(engine.ffn, record))
        for _ in tqdm(stream_ids(engine, prompt_ids, tokens, stop=set()), total=tokens, desc="record",
                      disable=not progress):
            pass
    return torch.stack([torch.stack(s) for s in steps if len(s) == store.config.num_layers])


def write_synthetic_store(path: str | Path, layers: int, hidden: int, neurons: int, progress: bool = True) -> FlashStore:
    """An OPT-shaped store whose ffn.bin holds random float16 bundles (written once; atomically)."""
    from safetensors.torch import save_file

    path = Path(path)
    if (path / "manifest.json").exists():
        return FlashStore(path)
    cfg = ModelConfig(family="opt", model_type="opt", vocab_size=50272, hidden_size=hidden,
                      intermediate_size=neurons, num_layers=layers, num_heads=max(1, hidden // 128),
                      num_kv_heads=max(1, hidden // 128), head_dim=min(128, hidden), max_position_embeddings=2048, norm_eps=1e-5,
                      hidden_act="relu", tie_word_embeddings=True)
    fields = bundle_fields(cfg)
    width = max(b for _, b in fields.values())
    bundle = width * 2
    nbytes = neurons * bundle
    tmp = path.parent / f".{path.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        rng = np.random.default_rng(0)
        extents = []
        with open(tmp / "ffn.bin", "wb") as f:
            for _ in tqdm(range(layers), desc="write synthetic FFN", unit="layer", disable=not progress):
                offset = f.tell()
                f.write(rng.integers(0, 256, size=round_up(nbytes), dtype=np.uint8).tobytes())
                extents.append({"offset": offset, "nbytes": nbytes, "span": round_up(nbytes)})
        resident = {"synthetic": torch.zeros(1)}
        save_file(resident, str(tmp / "resident.safetensors"))
        manifest = new_manifest(config=cfg.to_dict(), dtype="float16", source={"kind": "synthetic", "path": None},
                                ffn={"file": "ffn.bin", "layout": "bundled", "format": "float", "alignment": ALIGN,
                                     "fields": fields, "bundle_width": width, "bundle_bytes": bundle,
                                     "neurons": neurons, "layers": extents},
                                resident={"format": "float", "embed": None}, hf_config={})
        seal(tmp, manifest, resident)
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return FlashStore(path)


def neuron_map(small: int, large: int, seed: int = 0) -> list[np.ndarray]:
    """Each small neuron's own random set of large neurons (a partition of 0..large-1)."""
    perm = np.random.default_rng(seed).permutation(large)
    bounds = np.linspace(0, large, small + 1).round().astype(int)
    return [perm[bounds[i]:bounds[i + 1]] for i in range(small)]


def selections(activations: torch.Tensor, sparsity: float, large_layers: int, mapping: list[np.ndarray]):
    """Per step, per large layer: the sorted large neuron ids standing for the recorded top (1 - sparsity)."""
    steps, small_layers, small = activations.shape
    k = max(1, round((1 - sparsity) * small))
    top = activations.float().topk(k, dim=-1).indices.numpy()
    for t in range(steps):
        yield [torch.from_numpy(np.sort(np.concatenate([mapping[i] for i in top[t, layer * small_layers //
                                                                                large_layers]])))
               for layer in range(large_layers)]


def replay(store: FlashStore, activations: torch.Tensor, sparsity: float, window: int, max_gap: int,
           staging_bytes: int = 64 << 20, progress: bool = True) -> dict:
    from ..ffn.cache import NeuronCache
    from ..reader import BundleReader, FlashReader

    cfg = store.config
    mapping = neuron_map(activations.shape[2], cfg.intermediate_size)
    k = max(1, round((1 - sparsity) * activations.shape[2])) * cfg.intermediate_size // activations.shape[2]
    capacity = min(cfg.intermediate_size, (max(window, 1) + 1) * (k + 16))  # room for any window union
    caches = [NeuronCache(store, capacity, window) for _ in range(cfg.num_layers)]
    per_token, needed_total = [], 0
    with FlashReader(store.ffn_path, pages=store.pages(store.ffn_path)) as reader:
        bundles = BundleReader(store, reader, staging_bytes=staging_bytes, max_gap=max_gap)
        for step, layers in enumerate(tqdm(list(selections(activations, sparsity, cfg.num_layers, mapping)),
                                           desc=f"replay s={sparsity} k={window}", disable=not progress), start=1):
            io0, t0 = reader.stats.copy(), time.perf_counter()
            for layer, needed in enumerate(layers):
                needed_total += needed.numel()
                missing = caches[layer].prepare(needed, step)
                if missing.numel():
                    for chunk, plans in bundles.chunks(layer, missing):
                        src, offsets = bundles.finish(bundles.start(layer, chunk, plans))
                        caches[layer].append(chunk, src, offsets, step)
            io = reader.stats - io0
            per_token.append({"ms": (time.perf_counter() - t0) * 1e3, "io_ms": io.wait_s * 1e3, "bytes": io.bytes,
                              "reads": io.requests})
    warm = per_token[window + 1:] or per_token  # the first steps fill an empty cache
    med = {key: float(np.median([p[key] for p in warm])) for key in ("ms", "io_ms", "bytes", "reads")}
    return {"sparsity": sparsity, "window": window, "max_gap": max_gap, "neurons_per_layer": k,
            "cache_capacity": capacity, "steps": len(per_token), "ms_per_token": med["ms"],
            "io_ms_per_token": med["io_ms"], "bytes_read_per_token": med["bytes"], "reads_per_token": med["reads"],
            "memory_ms_per_token": med["ms"] - med["io_ms"]}


def replay_naive(store: FlashStore, tokens: int = 2) -> dict:
    from ..reader import FlashReader, aligned_buffer

    span = max(e.span for e in store.layers)
    bufs = [aligned_buffer(span), aligned_buffer(span)]
    times = []
    with FlashReader(store.ffn_path, pages=store.pages(store.ffn_path)) as reader:
        for _ in range(tokens):
            io0, t0 = reader.stats.copy(), time.perf_counter()
            pending = reader.submit([(store.layers[0].offset, bufs[0][:store.layers[0].span])])
            for i in range(len(store.layers)):  # double-buffered, as naive mode streams
                nxt = reader.submit([(store.layers[i + 1].offset, bufs[(i + 1) % 2][:store.layers[i + 1].span])]) \
                    if i + 1 < len(store.layers) else None
                pending.wait()
                pending = nxt
            times.append((time.perf_counter() - t0) * 1e3)
            io = reader.stats - io0
    return {"ms_per_token": float(np.median(times)), "io_ms_per_token": float(np.median(times)),
            "bytes_read_per_token": io.bytes, "reads_per_token": io.requests, "tokens": tokens}


def simulate(model=None, out: str | Path | None = None, sparsities=(0.97, 0.9), tokens: int = 48,
             max_gap: int | None = None, results: str | Path = "bench/results", progress: bool = True) -> dict:
    """Record on `model` (default: the embedded SmolLM2), replay on an OPT-6.7B-shaped synthetic store."""
    from .bench import bench_prompt, machine
    from ..engine import Engine
    from ..loader import resolve_store
    from ..paths import home
    from ..paths import load_max_gap

    small = resolve_store(model, progress=progress)
    with Engine(small, mode="naive", context=8) as e:
        prompt = bench_prompt(e, 64)
    activations = record_activations(small, prompt, tokens, progress)
    big = write_synthetic_store(Path(out) if out else home() / "stores" / "synthetic-opt-6.7b", progress=progress,
                                **OPT_6_7B)
    gap = load_max_gap() if max_gap is None else max_gap
    rows = [{"name": "naive", **replay_naive(big)}]
    for s in sparsities:
        for name, window, g in (("+predictor (no reuse, one read per neuron)", 0, -1),
                                ("+windowing (k = 4)", 4, -1), ("+coalescing", 4, gap)):
            rows.append({"name": name, **replay(big, activations, s, window, g, progress=progress)})
    result = {"what": "simulation: I/O of an OPT-6.7B-shaped float16 store, replaying activation traces recorded "
                      "on a real model; no FFN compute", "recorded_on": str(small.path), "recorded_steps":
              int(activations.shape[0]), "store": str(big.path), "ffn_bytes": big.ffn_bytes, "max_gap": gap,
              "rows": rows, "paper_table2": PAPER_TABLE2, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
              "machine": machine()}
    out_dir = Path(results)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{time.strftime('%Y-%m-%d')}-simulate-opt-6.7b"
    (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=1))
    (out_dir / f"{stem}.md").write_text(markdown(result))
    return result


def markdown(result: dict) -> str:
    lines = [f"# inaflash simulate: OPT-6.7B-shaped store ({result['ffn_bytes'] / 1e9:.1f} GB of float16 FFN)", "",
             f"{result['date']}. {result['what']}. Traces: {result['recorded_steps']} greedy decode steps on "
             f"{Path(result['recorded_on']).name}, top (1 - sparsity) neurons per layer by |activation|. Medians "
             f"over steps after the window filled; I/O = issuing reads + blocked on them.", "",
             "| step | sparsity | neurons/layer | GB read/token | reads/token | I/O ms/token | cache mgmt ms/token |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['name']} | {r.get('sparsity', '-')} | {r.get('neurons_per_layer', 'all')} | "
                     f"{r['bytes_read_per_token'] / 1e9:.3f} | "
                     f"{'-' if r.get('reads_per_token') is None else format(r['reads_per_token'], '.0f')} | "
                     f"{r['io_ms_per_token']:.0f} | {r.get('memory_ms_per_token', 0):.0f} |")
    lines += ["", "The paper's Table 2 (OPT-6.7B, M1 Max, float32 bundles, ~97% sparsity): "
              + "; ".join(f"{p['step']} {p['gb_read']} GB, {p['io_ms']} ms" for p in result["paper_table2"]), ""]
    return "\n".join(lines)
