"""An opened store ready to run: resident weights in DRAM, the FFN served by the chosen mode."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from . import streamed
from .errors import BudgetError, InaflashError
from .memory import drop_pages, pin_mmap_threshold, release_free_heap, reset_peak_rss, rss_bytes
from .ffn.dense import HybridFFN, NaiveFlashFFN, ResidentFFN
from .ffn.kernels import warn_if_missing
from .models import build_model
from .paths import load_max_gap
from .options import Options
from .ops import warm_up
from .planner import (active_neurons_per_token, choose_mode, hot_neurons, parse_memory, plan_dense, plan_memory,
                      working_bytes)
from .reader import FlashReader, ReadStats
from .speculate import DRAFT_CHUNK, DRAFT_EXTRA_ROWS, DraftVocab, PassCosts
from .ffn.sparse import SparseCounters, SparseFlashFFN, load_sparsity
from .store.format import FlashStore
from .store.quant import Int4Matrix

DEFAULT_CONTEXT = 1024


@dataclass
class Counters:
    io: ReadStats  # flash reads (FFN and embedding)
    sparse: SparseCounters | None = None  # sparse mode: neurons needed and read, predictor and cache time

    def __sub__(self, other: Counters) -> Counters:
        return Counters(self.io - other.io, None if self.sparse is None else self.sparse - other.sparse)


class Engine:
    """`Engine(store, options)` or `Engine(store, mode="sparse", memory="50%", ...)`: any field of Options."""

    def __init__(self, store: FlashStore, options: Options | None = None, *, draft_store: FlashStore | None = None,
                 tokenizer=None, **changes):
        """`draft_store`: the draft model's store for speculation "draft" (default: options.draft opened).
        `tokenizer`: one already loaded (a draft model shares its target's)."""
        if draft_store is not None and not (changes.get("draft") or (options and options.draft)):
            changes["draft"] = str(draft_store.path)
        self.options = o = Options.of(options, **changes)
        mode, memory, window, context, cache_format = o.mode, o.memory, o.window, o.context, o.cache_format
        pin_mmap_threshold()
        warn_if_missing()
        self.store, self.config = store, store.config
        # the tokenizer is runtime, not model data: it does not grow with --memory (SmolLM2's: ~30 MB of RSS), so
        # it loads before the runtime is read
        self.tokenizer = store.tokenizer() if tokenizer is None else tokenizer
        warm_up()  # torch's kernels allocate on first use (~11 MB): runtime too, not the plan's
        release_free_heap()
        # what the process holds before any model data (Python, torch, libraries, the tokenizer): a whole-process
        # memory limit needs this plus the plan; stats report both, so what the plan leaves out is visible
        self.runtime_bytes = rss_bytes()
        self.context = min(context or DEFAULT_CONTEXT, self.config.max_position_embeddings)
        self.choice = None
        self.pass_costs = PassCosts()  # seconds of a forward pass by its width, as they run (speculation's costs)
        self.draft, self.draft_bytes = None, 0
        self.vocab = None  # a draft model's cut head (set by the target that opens it: _open_draft)
        budget = None if memory is None else parse_memory(memory, store)
        if o.speculation == "draft":
            # first, while only the runtime is in memory: its head is loaded whole before it is cut to draft_vocab
            self.draft = self._open_draft(draft_store or FlashStore(o.draft))
            # its data, KV caches, buffers and working memory: its passes never run beside the target's, but the
            # heap the target's pass freed is not all reused by the draft's (Qwen2.5-1.5B with the 0.5B drafting
            # peaked 25 MB above a plan that counted only the larger of the two working memories)
            self.draft_bytes = self.draft.plan.planned_bytes
            if budget is not None:  # the draft model is in the budget: the target plans within what it leaves
                if budget - self.draft_bytes <= 0:
                    self.draft.close()
                    raise BudgetError(f"memory budget {budget / 1e6:.1f} MB is too small for the draft model: it "
                                        f"holds {self.draft_bytes / 1e6:.1f} MB (lower --draft-vocab, or no --draft)")
                budget -= self.draft_bytes
        reset_peak_rss()  # from here the peak is runtime + model data: stats compare it with the plan
        self.embedding = self.reader = self.head = None
        self._budget, self._freed, head_bytes, head_buffers = budget, 0, 0, 0
        try:
            sparsity = load_sparsity(store) if mode in ("auto", "sparse") else None  # read once (with predictors)
            head_name, self.choice = self._head_on_flash(mode, budget, sparsity, window, cache_format)
            if head_name is not None:
                # the planners see a budget larger by what reading the head frees (its bytes less its buffers); the
                # plan is corrected below
                head_bytes, head_buffers = store.resident_span(head_name)[1], streamed.dram_bytes(store, head_name)
                self._freed = head_bytes - head_buffers
                if budget is not None:
                    budget += self._freed
            if mode == "auto":
                self.choice = self.choice or choose_mode(store, budget, self.context, sparsity, window, cache_format,
                                                         context_given=context is not None, sequences=o.parallel,
                                                         head_freed=self._freed)
                mode, budget, self.context = self.choice.mode, self.choice.budget, self.choice.context
        except BaseException as e:
            self.close()
            raise self._explain(e) from None
        self.mode = mode
        # checksums: every page read from flash and every resident tensor checked against the store's checksums
        # (README: the cost, measured); off only when asked, and then said
        if not o.checksums:
            warnings.warn("checksums off: data read from the store is not verified", RuntimeWarning, stacklevel=2)
        self.reader = FlashReader(store.ffn_path, threads=o.io_threads, pages=store.pages(store.ffn_path, o.checksums),
                                  fixed_buffers=o.fixed_buffers)
        try:  # a failure from here on (a budget too small, no calibration) must not leave the reader's threads
            self.plan = None
            if mode == "sparse":
                # the gap `inaflash probe` measured on this machine, else the default
                max_gap = load_max_gap() if o.max_gap is None else o.max_gap
                if sparsity is None:
                    raise InaflashError(f"store {store.path} is not calibrated for sparsity: run  "
                                        f"inaflash calibrate {store.path}")
                if o.density is not None:
                    sparsity = sparsity.at_density(o.density)
                predictor_bytes = sparsity.predictor_bytes if o.use_predictor else 0
                self.plan = plan_memory(store, budget, self.context, predictor_bytes, window,
                                        active_neurons_per_token(store, sparsity), cache_format, o.parallel)
                hot = hot_neurons(store, sparsity, self.plan.cache_capacity, self.plan.window, o.compute,
                                  max_gap) if o.hot_neurons and o.use_predictor else None
                if hot is not None:
                    self.plan.pinned, self.plan.predicted_read_bundles = hot
                self.ffn = SparseFlashFFN(store, self.reader, sparsity, self.plan.cache_capacity, self.plan.window,
                                          use_predictor=o.use_predictor, max_gap=max_gap,
                                          staging_bytes=self.plan.staging_bytes // 2, compute=o.compute,
                                          cache_format=cache_format, pins=self.plan.pinned)
            else:
                # every mode plans within --memory or is refused with its minimum (naive used to take 52% more)
                self.plan = plan_dense(store, mode, budget, self.context, o.parallel)
                if mode == "dram":
                    self.ffn = ResidentFFN(store, self.reader)
                elif mode == "hybrid":
                    self.ffn = HybridFFN(store, self.reader, self.plan.ffn_layers)
                else:
                    self.ffn = NaiveFlashFFN(store, self.reader)
            self.sparse = self.ffn if mode == "sparse" else None  # the engine's own, whatever set_ffn swaps in
            self.reader.stats = ReadStats()  # loading (dram mode, the oracle) is not generation I/O
            self.weights = store.resident_weights(check=o.checksums, unchecked=frozenset({head_name} - {None}))
            if head_name is not None:  # mapped, never touched: FlashMatrix reads and checks it itself
                self.head = streamed.FlashMatrix(store, head_name, self.weights[head_name], checksums=o.checksums)
                self.head.reader.stats = self.reader.stats  # its reads count with the FFN's
                self.weights[head_name] = self.head
            if store.embed is not None:
                from .embedding import FlashEmbedding

                self.embedding = FlashEmbedding(store, checksums=o.checksums)
                self.embedding.reader.stats = self.reader.stats  # its reads count with the FFN's
                self.weights[store.embed["name"]] = self.embedding
            self.model = build_model(self.config, self.weights, self.ffn)  # its KV cache comes with reset()
            self.max_seq = 0
            release_free_heap()
            # a plan within a budget holds a KV cache of self.context tokens, no more
            self.bounded = mode == "sparse" or budget is not None
            if self.plan is not None:
                self.plan.draft_bytes = self.draft_bytes
                if head_name is not None:
                    self.plan.resident_bytes -= head_bytes
                    self.plan.staging_bytes += head_buffers
                    self.plan.budget_bytes -= self._freed
        except BaseException as e:
            self.close()
            raise self._explain(e) from None

    def _head_on_flash(self, mode: str, budget: int | None, sparsity, window: int, cache_format: str):
        """(the head's name where it is read from flash, else None; auto's choice where it was made with the head in
        DRAM, else None). --head flash; auto where the budget cannot hold the model otherwise (naive, hybrid, auto;
        a float or int4 head, larger than its buffers)."""
        o, store = self.options, self.store
        name = store.head_name()
        streamable = name is not None and f"{name}.scale" not in store.manifest["resident"].get("crc32c", {})
        if o.head == "flash":
            if mode in ("dram", "sparse") or not streamable:
                raise InaflashError(f"--head flash reads a float or int4 head in naive or hybrid mode (or auto), "
                                    f"not {'this store' if not streamable else mode + ' mode'}")
            return name, None
        if o.head == "dram" or budget is None or mode not in ("auto", "naive", "hybrid") or not streamable \
                or store.resident_span(name)[1] <= streamed.dram_bytes(store, name):  # (it would free nothing)
            return None, None
        try:
            if mode == "auto":
                return None, choose_mode(store, budget, self.context, sparsity, window, cache_format,
                                         context_given=o.context is not None, sequences=o.parallel)
            plan_dense(store, mode, budget, self.context, o.parallel)  # (arithmetic: the plan is made below)
            return None, None
        except BudgetError:  # (too small with the head read too: refused below, naming that minimum)
            return name, None

    def _explain(self, e: BaseException) -> BaseException:
        """A budget refused with the head read from flash names that minimum; after the draft model took its part,
        says so."""
        if isinstance(e, BudgetError) and self._freed:
            least = plan_dense(self.store, "naive", None, self.context, self.options.parallel).planned_bytes
            e = BudgetError(f"memory budget {self._budget / 1e6:.1f} MB is too small even with the output head "
                            f"read from flash: the smallest plan (naive) needs at least "
                            f"{(least - self._freed) / 1e6:.1f} MB")
        if isinstance(e, BudgetError) and self.draft_bytes:
            return BudgetError(f"{e}; the draft model took {self.draft_bytes / 1e6:.1f} MB of --memory before it "
                                 "(lower --draft-vocab, or no --draft)")
        return e

    def _open_draft(self, store: FlashStore) -> Engine:
        """The draft model in dram mode (no budget of its own: its bytes are taken from the target's), sharing the
        target's tokenizer, with its head cut to the first draft_vocab token ids where asked."""
        o = self.options
        mine, theirs = (s.manifest.get("files", {}).get("tokenizer/tokenizer.json") for s in (self.store, store))
        if mine != theirs:
            raise InaflashError(f"draft model {store.path} has another tokenizer than {self.store.path}: a draft "
                                "model must share the target's tokenizer")
        engine = Engine(store, mode="dram", context=self.context, checksums=o.checksums, speculation="off",
                        parallel=o.parallel, tokenizer=self.tokenizer)
        # a draft of an id the target does not have (a head padded wider) could never be accepted
        rows = min(o.draft_vocab or engine.config.vocab_size, self.config.vocab_size)
        # its passes: a prompt in chunks of DRAFT_CHUNK, one row of logits over the ids it keeps
        engine.plan.working_bytes = working_bytes(store, self.context, DRAFT_CHUNK, rows)
        head = engine.model.head
        # (a tied head is the embedding too: cutting it would only add a copy)
        if rows < engine.config.vocab_size and head is not engine.model.embed:
            if isinstance(head, (torch.Tensor, Int4Matrix)):
                # the first `rows` ids, and room for the rarer ids prompts bring (speculate.DraftVocab)
                extra = min(DRAFT_EXTRA_ROWS, engine.config.vocab_size - rows)
                engine.vocab = DraftVocab(store, "lm_head.weight", head, rows, extra, checksums=o.checksums)
                cut, held = engine.vocab.head(), engine.vocab.nbytes
            else:  # an int8 head: cut, without room for more
                cut = head.first_rows(rows)
                held = cut.nbytes
            engine.model.head = engine.weights["lm_head.weight"] = cut
            engine.plan.resident_bytes += held - head.nbytes
            for t in (head,) if isinstance(head, torch.Tensor) else head.tensors:
                drop_pages(t)  # (a mapping of the store's file: freeing the tensor alone keeps its pages)
            del head
            release_free_heap()
        return engine

    def reset(self, max_seq: int) -> None:
        """A fresh KV cache for `max_seq` positions (keeps the model when it is already large enough)."""
        self._check_length(max_seq)
        if max_seq > self.max_seq:
            self.model.setup_caches(max_seq)
            self.max_seq = max_seq

    def _check_length(self, max_seq: int) -> None:
        limit = self.config.max_position_embeddings
        if max_seq > limit:
            raise InaflashError(f"{max_seq} tokens exceed the model's context of {limit} (prompt + max tokens)")
        if self.bounded and max_seq > self.context:
            raise InaflashError(f"{max_seq} tokens exceed the planned context of {self.context} "
                                "(prompt + max tokens; raise --context, or --memory)")

    def set_ffn(self, ffn) -> None:
        """Serve the FFN with `ffn` from the next forward pass on, until set again (reset() keeps it): calibration
        and measurement swap in masked or recording providers. `counters()` still counts the engine's own."""
        self.ffn = self.model.ffn = ffn

    def counters(self) -> Counters:
        """A snapshot of what the engine has done so far; generation reports the difference of two."""
        return Counters(self.reader.stats.copy(), None if self.sparse is None else self.sparse.counters.copy())

    def new_cache(self, max_seq: int):
        """A KV cache of its own for one more sequence of a batch (generate.decode_step), `max_seq` positions, held
        to the planned context as reset() is (the planner counts one KV cache of `context` per sequence)."""
        self._check_length(max_seq)
        return self.model.new_cache(max_seq)

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, pos: int, last_only: bool = False, cache=None) -> torch.Tensor:
        """Logits for ids at pos.., into `cache` (new_cache's) or, None, the engine's own (reset's)."""
        return self.model.forward(ids, pos, last_only=last_only, cache=cache)

    @torch.inference_mode()
    def forward_batch(self, segments: list, last_only: bool = False) -> list[torch.Tensor]:
        """One pass over the weights for several sequences: [(ids, pos, cache or None)] -> logits each."""
        return self.model.forward_batch(segments, last_only=last_only)

    def close(self) -> None:
        if self.draft is not None:
            self.draft.close()
        if self.vocab is not None:
            self.vocab.close()
        if self.head is not None:
            self.head.close()
        if self.reader is not None:
            self.reader.close()
        if self.embedding is not None:
            self.embedding.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
