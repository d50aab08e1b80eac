"""The commands that use a model (run, serve, chat) or make and describe a store (convert, info)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from ..errors import InaflashError
from ..options import Options
from ..store.format import RESIDENT_FORMATS
from ..store.quant import FFN_FORMATS
from .app import app, open_model, run_options

TEMPERATURE = typer.Option(0.7, "--temperature", "-t", min=0.0, help="0 = greedy.")
TOP_P = typer.Option(0.95, "--top-p", min=0.0, max=1.0, help="Nucleus sampling mass.")


@app.command()
@run_options
def run(
    model: Optional[str], options: Options,
    prompt: str = typer.Argument(..., help="The prompt (sent through the model's chat template unless --raw)."),
    max_tokens: int = typer.Option(128, "--max-tokens", "-n", min=1, help="Tokens to generate at most."),
    temperature: float = TEMPERATURE,
    top_p: float = TOP_P,
    seed: Optional[int] = typer.Option(None, help="Seed for sampling (reproducible output)."),
    raw: bool = typer.Option(False, "--raw", help="Tokenize the prompt as is (tokenizer(prompt)), no chat template."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object: text, token_ids, stats."),
):
    """Generate text from PROMPT, streaming it to stdout."""
    from ..generate import check_sampling, check_text

    check_sampling(max_tokens, temperature, top_p, seed)  # before minutes of loading, not after
    if raw and not check_text(prompt, "prompt"):
        raise InaflashError("empty prompt: --raw tokenizes the prompt as is, and it has no text")
    with open_model(model, options) as m:
        gen = m.start_prompt(prompt, max_tokens, temperature, top_p, seed, raw=raw)
        for piece in gen:
            if not as_json:
                sys.stdout.write(piece)
                sys.stdout.flush()
        result = gen.result()
    if as_json:
        print(json.dumps({"text": result.text, "token_ids": result.token_ids, "stats": result.stats.to_dict()}))
    else:
        s = result.stats
        print(f"\n[{s.generated_tokens} tokens, {s.ms_per_token:.1f} ms/token "
              f"(I/O {s.io_ms_per_token:.1f}), {s.bytes_read_per_token / 1e6:.1f} MB read/token, mode {m.engine.mode}"
              f"{f', {s.tokens_per_pass:.2f} tokens/pass ({s.accepted_tokens}/{s.drafted_tokens} drafts accepted)' if s.drafted_tokens else ''}; "
              f"peak RSS {s.peak_rss_bytes / 1e6:.0f} MB = runtime {s.runtime_rss_bytes / 1e6:.0f} + model data"
              f"{'' if s.planned_bytes is None else f' (planned {s.planned_bytes / 1e6:.0f})'}]",
              file=sys.stderr)


@app.command()
@run_options
def serve(
    model: Optional[str], options: Options,
    host: str = typer.Option("127.0.0.1", help="Address to bind (127.0.0.1: this machine only; 0.0.0.0: all)."),
    port: int = typer.Option(8000, min=1, max=65535, help="TCP port."),
    api_key: Optional[str] = typer.Option(None, envvar="INAFLASH_API_KEY",
                                          help="Require `Authorization: Bearer KEY` on /v1/* and /metrics."),
    max_queue: int = typer.Option(8, min=0, help="Requests that may wait while one generates; more get HTTP 429."),
    parallel: int = typer.Option(1, "--parallel", min=1, max=64,
                                 help="Requests decoded together: every step is one pass over the weights for all "
                                      "of them (each its own KV cache, counted in --memory)."),
    grace: float = typer.Option(10.0, "--grace-period", min=0.0,
                                help="Seconds SIGTERM/SIGINT waits for open connections to close; generations stop "
                                     "at once and streams end with an error event."),
):
    """Serve the model over an OpenAI-compatible HTTP API: /v1/chat/completions, /v1/completions (both with
    stream: true), /v1/models, /health, /metrics."""
    from dataclasses import replace

    from ..server import serve as run_server

    with open_model(model, replace(options, parallel=parallel)) as m:
        print(f"inaflash: serving {m.name!r} ({m.engine.mode}) on http://{host}:{port}/v1", file=sys.stderr)
        run_server(m, host=host, port=port, api_key=api_key, max_queue=max_queue, grace=grace, parallel=parallel)


@app.command()
@run_options
def chat(
    model: Optional[str], options: Options,
    system: Optional[str] = typer.Option(None, help="A system message to start the conversation with."),
    max_tokens: int = typer.Option(512, "--max-tokens", "-n", min=1, help="Tokens per answer at most."),
    temperature: float = TEMPERATURE,
    top_p: float = TOP_P,
    seed: Optional[int] = typer.Option(None, help="Seed for sampling."),
):
    """Talk with the model: multi-turn, through its chat template, answers streamed. Commands: /reset (forget the
    conversation), /stats (last answer's speed and I/O), /exit. Ctrl-C stops an answer; Ctrl-D leaves."""
    from ..chat import repl
    from ..generate import check_sampling

    check_sampling(max_tokens, temperature, top_p, seed)
    with open_model(model, options) as m:
        repl(m, system=system, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)


@app.command()
def convert(
    src: Path = typer.Argument(..., help="A .gguf file or a Hugging Face folder (config.json + *.safetensors)."),
    out: Path = typer.Argument(..., help="The store directory to create."),
    dtype: str = typer.Option("float16", help="float32 | float16 | bfloat16: dtype of the stored weights."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT if it exists."),
    unbundled: bool = typer.Option(False, "--unbundled", help="Write gate rows, up rows and down columns as "
                                                             "separate blocks (for the --no-bundling ablation)."),
    ffn_format: str = typer.Option("auto", help="How FFN bundles are stored and read: " + "; ".join(
        f"{k}: {v}" for k, v in FFN_FORMATS.items()) + "; auto: a GGUF's nearest (a Q4 file int4, Q8_0 int8, F16 "
        "float), a Hugging Face folder's float."),
    resident_format: str = typer.Option("auto", help="; ".join(f"{k}: {v}" for k, v in RESIDENT_FORMATS.items())
                                        + "; auto: as --ffn-format's."),
    embeddings: str = typer.Option("flash", help="flash: an untied input embedding is read from flash one row per "
                                                 "token; dram: held in memory. (A tied one is the head: in DRAM.)"),
    dkm: bool = typer.Option(False, "--dkm", help="palette3/palette4: learn each layer's palette by differentiable "
                                                  "k-means against the layer's output on calibration text (pydoc's "
                                                  "topics), instead of plain k-means; resumable per layer."),
    dkm_steps: int = typer.Option(60, min=1, help="--dkm: optimizer steps per layer."),
    dkm_tokens: int = typer.Option(2048, min=64, help="--dkm: calibration tokens recorded per layer."),
):
    """Convert a model into a flash store (resident part + bundled FFN file)."""
    from ..store.convert import write_store
    from ..store.format import FlashStore
    from ..store.sources import open_source

    if embeddings not in ("flash", "dram"):
        raise InaflashError(f"--embeddings must be flash or dram, not {embeddings!r}")
    from ..loader import source_formats

    ffn_format, resident_format, _ = source_formats(src, "unbundled" if unbundled else "bundled", ffn_format,
                                                    resident_format, say=True)
    encoder = None
    if dkm:
        from ..calibrate import recorded_calibration_inputs
        from ..store.dkm import DKMEncoder
        from ..store.quant import PALETTE_BITS

        if ffn_format not in PALETTE_BITS:
            raise InaflashError(f"--dkm learns palettes: pass --ffn-format {' or '.join(PALETTE_BITS)}, "
                                f"not {ffn_format}")
        from ..loader import resolve_store

        # recorded through the source's float store (converted once into $INAFLASH_HOME): the outputs DKM keeps
        inputs, calibration = recorded_calibration_inputs(
            resolve_store(src, ffn_format="float", resident_format="float"), dkm_tokens)
        encoder = DKMEncoder(ffn_format, inputs, out.parent / f".{out.name}.dkm", steps=dkm_steps,
                             calibration=calibration)
    write_store(open_source(src), out, dtype=dtype, overwrite=overwrite,
                layout="unbundled" if unbundled else "bundled", ffn_format=ffn_format,
                resident_format=resident_format, embeddings_on_flash=embeddings == "flash", encoder=encoder)
    if encoder is not None:
        r = encoder.reports
        print(f"dkm: {len(r)} layers in {sum(x['seconds'] for x in r if 'seconds' in x):.0f} s; calibration loss "
              f"(relative squared error of each layer's output) k-means {sum(x['kmeans_loss'] for x in r) / len(r):.4f}"
              f" -> dkm {sum(x['dkm_loss'] for x in r) / len(r):.4f} (mean over layers)")
    store = FlashStore(out)
    on_flash = f", embedding on flash {store.embed['rows'] * store.embed['row_bytes'] / 1e6:.1f} MB" \
        if store.embed else ""
    print(f"wrote {out}: resident {store.resident_bytes / 1e6:.1f} MB ({store.resident_format}){on_flash}, "
          f"FFN {store.ffn_bytes / 1e6:.1f} MB ({store.config.num_layers} layers x {store.config.intermediate_size} "
          f"neurons of {store.bundle_bytes} bytes, {store.layout}, {store.ffn_format})")


@app.command()
def info(store: Path = typer.Argument(..., help="A store directory."),
         verify: bool = typer.Option(False, "--verify", help="Also read the whole store and check it: every file's "
                                                             "sha256, every page's and resident tensor's CRC-32C.")):
    """Describe a store: model shape, dtype, resident and FFN sizes."""
    from ..store.format import FlashStore

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
