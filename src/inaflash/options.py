"""How to run a model: one object from the command line (run, serve, chat, bench) through `load` to `Engine`, checked
once, here."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from .errors import InaflashError
from .ffn.cache import CACHE_FORMATS
from .ffn.sparse import COMPUTE
from .store.format import DTYPES

MODES = {
    "auto": "the fastest of the modes below that fits --memory (dram when the model fits)",
    "dram": "whole model in memory: the upper bound",
    "naive": "every layer's whole FFN read from flash for every token: the paper's baseline",
    "hybrid": "as many layers' FFN in DRAM as --memory allows, the others read whole every token",
    "sparse": "only predicted-active neurons, cached over a window of recent tokens, read from flash",
}
SPECULATION = {
    "lookup": "draft from the prompt and the text so far (prompt lookup), verified in one pass, where the cost "
              "model says it pays (lossless)",
    "draft": "a smaller model sharing the tokenizer (--draft) drafts, verified in one pass, where the cost model "
             "says it pays (lossless)",
    "off": "one token per forward pass",
}
HEAD = {
    "auto": "in DRAM, unless --memory cannot hold it beside the rest (naive, hybrid): then read from flash every pass",
    "dram": "the output head held in DRAM (refused with the minimum where it does not fit)",
    "flash": "the output head (and a tied embedding) read from flash every pass: its bytes of DRAM for its bytes "
             "read per pass (naive, hybrid)",
}
SPARSE_ONLY = {"window": "--window", "use_predictor": "--no-predictor", "compute": "--compute",
               "cache_format": "--cache-format", "density": "--density", "hot_neurons": "--no-hot-neurons"}


@dataclass(frozen=True)
class Options:
    mode: str = "auto"
    memory: str | int | None = None  # DRAM for the model's data: "50%" (of the weights), "300MiB", bytes
    context: int | None = None  # tokens the KV cache is planned for (default engine.DEFAULT_CONTEXT)
    checksums: bool = True  # check every read against the store's checksums (README: the cost)
    speculation: str = "lookup"  # draft tokens verified in one pass (speculate.py); "off": one token a pass
    parallel: int = 1  # sequences decoded together (the server's batch): each its KV cache, planned in --memory
    draft: str | None = None  # speculation "draft": the draft model (a store, GGUF or HF folder; the loader opens it)
    # keep only the draft head's first N token ids (BPE's most frequent merges) and the rarer ids of its prompts; 0: all
    draft_vocab: int = 32768
    head: str = "auto"  # where the output head lives: HEAD
    # sparse mode
    window: int = 4  # keep the neurons of the last `window` tokens cached (0: no reuse)
    use_predictor: bool = True  # False: the true active set (an oracle that holds the FFN: measuring only)
    compute: str = "cached"
    cache_format: str = "store"
    density: float | None = None  # select this fraction of neurons per token (None: the calibrated threshold)
    hot_neurons: bool = True  # pin the planner's hot neurons in each cache (False: the window cache alone)
    max_gap: int | None = None  # read coalescing gap in bytes (None: the probed one; -1: no coalescing)
    io_threads: int = 8
    fixed_buffers: bool = True  # read into io_uring-registered buffers where the kernel allows (reader.py)
    # a source that is not a store (GGUF, HF folder) is converted once with these
    dtype: str = "float16"
    bundling: bool | None = None  # False: the unbundled layout (the bundling ablation); None: the store's own

    def __post_init__(self):
        for name, value, choices in (("mode", self.mode, MODES), ("compute", self.compute, COMPUTE),
                                     ("cache format", self.cache_format, CACHE_FORMATS),
                                     ("speculation", self.speculation, SPECULATION), ("head", self.head, HEAD),
                                     ("dtype", self.dtype, DTYPES)):
            if value not in choices:
                raise InaflashError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}")
        if self.density is not None and (isinstance(self.density, bool) or not isinstance(self.density, (int, float))
                                         or not 0 < self.density <= 1):
            raise InaflashError(f"density must be a fraction in (0, 1], not {self.density!r}")
        for name, value, low in (("window", self.window, 0), ("context", self.context, 2),
                                 ("io_threads", self.io_threads, 1), ("max_gap", self.max_gap, -1),
                                 ("parallel", self.parallel, 1), ("draft_vocab", self.draft_vocab, 0)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
                raise InaflashError(f"{name} must be an integer >= {low}, not {value!r}")

        if self.speculation == "draft" and not self.draft:
            raise InaflashError("speculation draft needs a draft model (--draft MODEL)")

    @classmethod
    def of(cls, options: Options | None = None, **changes) -> Options:
        """`options` (default: the defaults) with `changes`; an unknown name is an error that lists the known ones."""
        unknown = set(changes) - {f.name for f in fields(cls)}
        if unknown:
            raise InaflashError(f"unknown option {', '.join(sorted(unknown))}; the options are "
                                f"{', '.join(f.name for f in fields(cls))}")
        return replace(options or cls(), **changes)

    def unused(self, running: str) -> list[str]:
        """The flags set away from their defaults that the running mode does not use (said, never silently
        dropped): sparse switches outside sparse mode. (--memory binds every mode: planned within, or refused.)"""
        default = Options()
        return [flag for name, flag in SPARSE_ONLY.items()
                if getattr(self, name) != getattr(default, name) and running != "sparse"]
