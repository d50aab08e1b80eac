"""The generation loop: prompt -> tokens, with sampling, streaming and per-token statistics."""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import asdict, dataclass, field
from collections.abc import Callable, Iterator

import torch

from .engine import Counters, Engine
from .errors import InaflashError
from .memory import peak_rss_bytes
from .planner import PREFILL_CHUNK
from .speculate import DRAFT_CHUNK, MAX_DRAFT, DraftModel, DraftPolicy, lookup


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_ms: float = 0.0
    ms_per_token: float = 0.0  # decode only: its time over the tokens its passes produced
    io_ms_per_token: float = 0.0  # time blocked on flash reads (not hidden behind compute)
    compute_ms_per_token: float = 0.0  # the rest of the step (sparse: also less predictor and memory management)
    bytes_read_per_token: float = 0.0
    reads_per_token: float = 0.0
    decode_steps: int = 0  # forward passes after the prompt's (each: one new token + its verified drafts)
    tokens_per_pass: float = 0.0  # tokens the decode passes produced, per pass (1.0 without speculation)
    drafted_tokens: int = 0  # speculation: draft tokens verified
    accepted_tokens: int = 0  # of them, those the model agreed with
    # sparse mode only (None otherwise)
    neurons_read_per_token: float | None = None
    cache_hit_rate: float | None = None  # needed neurons found in the neuron cache
    predictor_ms_per_token: float | None = None
    memory_ms_per_token: float | None = None  # neuron-cache bookkeeping: evict, gather, append (I/O wait excluded)
    peak_cache_bytes: int | None = None  # the neuron caches are preallocated: this is their fixed size
    budget_bytes: int | None = None
    planned_bytes: int | None = None
    peak_rss_bytes: int = 0  # the whole process's peak resident set so far (runtime included; see planner.py)
    runtime_rss_bytes: int = 0  # the process's RSS before the engine loaded any model data (Python, torch, libs)

    def to_dict(self) -> dict:
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in asdict(self).items()}


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    stats: GenerationStats = field(default_factory=GenerationStats)
    finish_reason: str | None = None  # "stop" (end of sequence or a stop string) or "length" (max_tokens)


def distribution(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """The sampling distribution (float64) of temperature > 0 and top_p over logits [vocab]."""
    # shifted by the maximum first, so a tiny temperature (1e-40) tends to greedy instead of overflowing to nan
    logits = logits.double()
    probs = torch.softmax((logits - logits.max()) / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, 0) - sorted_p < top_p  # the smallest prefix whose mass reaches top_p
        keep[0] = True  # top_p 0 keeps the most likely token
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
        probs /= probs.sum()  # verify() reads p(draft) as a probability
    return probs


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    if temperature <= 0:
        return int(torch.argmax(logits))
    return int(torch.multinomial(distribution(logits, temperature, top_p), 1, generator=generator))


def verify(logits: torch.Tensor, draft: int, temperature: float, top_p: float,
           generator: torch.Generator | None) -> int:
    """The token to emit where the drafter proposed `draft` and the model gives `logits`: `draft` itself when
    accepted, else a replacement. Greedy: the argmax (accepted iff equal). Sampling: speculative sampling with a
    draft distribution that is all on `draft` (Leviathan et al. 2211.17192, Chen et al. 2302.01318): accepted
    with probability p(draft), else sampled from p without `draft`, renormalized; so every emitted token is
    distributed as p, exactly as plain sampling would draw it."""
    if temperature <= 0:
        return int(torch.argmax(logits))
    p = distribution(logits, temperature, top_p)
    if float(torch.rand(1, generator=generator, dtype=torch.float64)) < float(p[draft]):
        return draft
    p[draft] = 0.0
    return int(torch.multinomial(p, 1, generator=generator))


def encode_prompt(engine: Engine, prompt: str, raw: bool = False) -> list[int]:
    """The prompt as one user message through the chat template (if the model has one), or as is with raw."""
    tok = _tokenizer(engine)
    check_text(prompt, "prompt")
    if not raw and tok.chat_template:
        return encode_chat(engine, [{"role": "user", "content": prompt}])
    return tok(prompt)["input_ids"]


def encode_chat(engine: Engine, messages: list[dict]) -> list[int]:
    """[{"role": "system"|"user"|"assistant", "content": str}, ...] through the model's chat template, ready for
    the assistant's turn."""
    tok = _tokenizer(engine)
    if not tok.chat_template:
        raise InaflashError(f"the model in {engine.store.path} has no chat template")
    for m in messages:
        check_text(m.get("content"), f"{m.get('role', 'message')} message")
    return chat_template_ids(tok, messages)


def check_text(text, what: str) -> str:
    """Text a tokenizer can take: a str that is valid Unicode (a shell passes invalid UTF-8 in an argument through
    as lone surrogates, and JSON can carry them as \\ud800 escapes; the tokenizer rejects them with a traceback)."""
    if not isinstance(text, str):
        raise InaflashError(f"{what} must be text, not {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InaflashError(f"{what} is not valid UTF-8 (byte {e.start} of it)") from None
    return text


def chat_template_ids(tokenizer, messages: list[dict]) -> list[int]:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _tokenizer(engine: Engine):
    if engine.tokenizer is None:
        raise InaflashError(f"store {engine.store.path} has no tokenizer; pass token ids instead of text")
    return engine.tokenizer


def stop_ids(engine: Engine) -> set[int]:
    return eos_ids(engine.config, engine.tokenizer)


def eos_ids(config, tokenizer) -> set[int]:
    """The ids generation stops at: the config's end-of-sequence ids and the tokenizer's."""
    ids = set(config.eos_token_ids)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


# Prompts are prefilled in chunks of planner.PREFILL_CHUNK tokens (the plan's working memory is one chunk's),
# checking for cancellation between them: a server client that leaves during a 1600-token prefill used to hold the
# model for its whole prefill (~60 s on Qwen2.5-1.5B).


def stream_ids(engine: Engine, prompt_ids: list[int], max_tokens: int, temperature: float = 0.0,
               top_p: float = 1.0, seed: int | None = None, stop: set[int] | None = None,
               stats: GenerationStats | None = None, cancelled: Callable[[], bool] | None = None) -> Iterator[int]:
    """Yield generated token ids one by one; `stats` is filled in when the generator ends (also when the consumer
    stops early: closing it is how a server cancels a generation). `cancelled()` (from another thread) ends it
    between prefill chunks and between tokens."""
    if not prompt_ids:
        raise InaflashError("empty prompt")
    check_sampling(max_tokens, temperature, top_p, seed)
    stop = stop_ids(engine) if stop is None else stop
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    engine.reset(len(prompt_ids) + max_tokens)
    stats = GenerationStats() if stats is None else stats
    stats.prompt_tokens = len(prompt_ids)

    t0 = time.perf_counter()
    seq = start_sequence(engine, prompt_ids, None, temperature, top_p, generator, max_tokens, cancelled)
    if seq is None:
        return
    stats.prefill_ms = (time.perf_counter() - t0) * 1e3
    before, t_decode = engine.counters(), 0.0
    try:
        while True:
            for token in seq.decided:
                stats.generated_tokens += 1
                seq.history.append(token)
                yield token
                if token in stop or stats.generated_tokens >= max_tokens or (cancelled is not None and cancelled()):
                    return
            t_decode += decode_step(engine, [seq])
            stats.decode_steps += 1
    finally:
        stats.drafted_tokens, stats.accepted_tokens = seq.drafted, seq.accepted
        _finish_stats(engine, stats, engine.counters() - before, t_decode)


def start_sequence(engine: Engine, prompt_ids: list[int], cache, temperature: float, top_p: float,
                   generator: torch.Generator | None, max_tokens: int,
                   cancelled: Callable[[], bool] | None = None) -> Sequence | None:
    """A sequence's prompt through the model into `cache` (None: the engine's own) in chunks of PREFILL_CHUNK, then
    its first token decided: ready for decode_step. None where `cancelled()` turned true between two chunks."""
    for start in range(0, len(prompt_ids), PREFILL_CHUNK):
        if cancelled is not None and cancelled():
            return None
        logits = engine.forward(torch.tensor(prompt_ids[start:start + PREFILL_CHUNK]), start, last_only=True,
                                cache=cache)[-1]
    spec = engine.options.speculation
    if spec == "draft" and engine.draft is None:
        raise InaflashError("speculation draft: this engine was opened without a draft model (draft=MODEL)")
    policy = DraftPolicy(engine.pass_costs) if spec in ("lookup", "draft") else None
    drafter = DraftModel(engine.draft, len(prompt_ids) + max_tokens + MAX_DRAFT, DRAFT_CHUNK, prompt=prompt_ids) \
        if spec == "draft" else None
    seq = Sequence(list(prompt_ids), len(prompt_ids), cache, temperature, top_p, generator, max_tokens, policy,
                   drafter=drafter)
    seq.decided = [sample(logits, temperature, top_p, generator)]
    return seq


@dataclass
class Sequence:
    """One generation's decoding state, as decode_step takes it. `history`: the prompt and every token emitted; its
    last token is decided but not yet in the KV cache (`cache`; None: the engine's own), whose first `pos`
    positions are filled. decode_step leaves the next tokens in `decided` for the caller to emit."""

    history: list[int]
    pos: int
    cache: object | None
    temperature: float
    top_p: float
    generator: torch.Generator | None
    max_tokens: int
    policy: DraftPolicy | None = None
    drafter: DraftModel | None = None  # speculation "draft": the draft model's state for this sequence; else lookup
    prompt_len: int = -1
    decided: list[int] = field(default_factory=list)
    drafted: int = 0
    accepted: int = 0

    def __post_init__(self):
        if self.prompt_len < 0:
            self.prompt_len = self.pos

    def draft(self, base: int) -> list[int]:
        """Draft tokens for the next pass (none without a policy, or where it says they do not pay)."""
        if self.policy is None:
            return []
        left = self.max_tokens - (len(self.history) - self.prompt_len)  # tokens still allowed after the last
        if self.drafter is not None:
            k = self.policy.length(min(MAX_DRAFT, left), base, self.drafter.cost(self.policy.costs))
            return self.drafter.propose(self.history, k) if k else []
        found = lookup(self.history, min(MAX_DRAFT, left))
        return found[:self.policy.length(len(found), base)] if found else []


def decode_step(engine: Engine, seqs: list[Sequence]) -> float:
    """The decode step, for one sequence or a batch, with or without drafts: each sequence's last token and its
    drafts go through one forward pass together (every weight read once for all of them); the drafts the model
    agrees with are kept, then the model's own next token (a correction, or the token after the last draft).
    Rejected drafts' KV entries are overwritten by the next pass at the same positions: no rollback copy.
    Returns the step's seconds: the drafting, the pass and the verification (the pass's own go to pass_costs)."""
    start = time.perf_counter()
    feeds, drafts, width = [], [], 0
    for s in seqs:
        d = s.draft(width)
        drafts.append(d)
        feeds.append((torch.tensor([s.history[-1]] + d), s.pos, s.cache))
        width += 1 + len(d)
    t0 = time.perf_counter()
    outs = engine.forward_batch(feeds)
    took = time.perf_counter() - t0
    engine.pass_costs.record(width, took)
    for s, d, out in zip(seqs, drafts, outs):
        s.decided, accepted = [], 0
        for j, token in enumerate(d):
            s.decided.append(verify(out[j], token, s.temperature, s.top_p, s.generator))
            if s.decided[-1] != token:
                break
            accepted += 1
        if accepted == len(d):  # every draft agreed: the pass also gives the token after them
            s.decided.append(sample(out[len(d)], s.temperature, s.top_p, s.generator))
        s.pos += 1 + accepted
        if s.drafter is not None:
            s.drafter.keep(len(s.history) + accepted)  # its cache holds the history and the accepted drafts
        if d and s.policy is not None:
            s.policy.update(len(d), accepted)
            s.drafted += len(d)
            s.accepted += accepted
    return time.perf_counter() - start


@dataclass
class BatchStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_ms: float = 0.0
    decode_steps: int = 0  # forward passes after the prompts', each for every sequence still running
    decode_ms: float = 0.0
    tokens_per_pass: float = 0.0  # tokens the decode passes produced, all sequences together, per pass
    bytes_read_per_pass: float = 0.0
    pass_ms_p50: float = 0.0  # a pass's time: the per-token latency of every sequence in it
    pass_ms_p99: float = 0.0

    def to_dict(self) -> dict:
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in asdict(self).items()}


def generate_batch(engine: Engine, prompts: list[list[int]], max_tokens: int, temperature: float = 0.0,
                   top_p: float = 1.0, seed: int | None = None,
                   stop: set[int] | None = None) -> tuple[list[list[int]], BatchStats]:
    """Several prompts decoded together: each is prefilled alone into a KV cache of its own, then every decode step
    is one pass over the weights for all sequences still running (a finished one leaves the batch, as a request
    leaves vLLM's or llama.cpp's running batch). Under a budget that pass reads the FFN once for all of them.
    Greedy output per prompt is what generating it alone gives (exact arithmetic; tests/test_batch.py).
    Returns each prompt's generated ids and the batch's statistics. (The planner counts Options.parallel KV caches
    of --context; a batch of more prompts holds more than its plan.)"""
    if not prompts or any(not p for p in prompts):
        raise InaflashError("empty prompt")
    check_sampling(max_tokens, temperature, top_p, seed)
    stop = stop_ids(engine) if stop is None else stop
    stats = BatchStats(prompt_tokens=sum(len(p) for p in prompts))
    seqs, out = [], [[] for _ in prompts]
    t0 = time.perf_counter()
    for i, prompt in enumerate(prompts):
        generator = torch.Generator().manual_seed(seed + i) if seed is not None else None
        seqs.append((i, start_sequence(engine, prompt, engine.new_cache(len(prompt) + max_tokens), temperature,
                                       top_p, generator, max_tokens)))
    stats.prefill_ms = (time.perf_counter() - t0) * 1e3
    before, passes = engine.counters(), []
    running = seqs
    while running:
        still = []
        for i, s in running:
            for token in s.decided:
                out[i].append(token)
                s.history.append(token)
                if token in stop or len(out[i]) >= max_tokens:
                    break
            else:
                still.append((i, s))
        running = still
        if running:
            passes.append(decode_step(engine, [s for _, s in running]) * 1e3)
            stats.decode_steps += 1
    stats.decode_ms = sum(passes)
    if passes:
        q = torch.tensor(passes, dtype=torch.float64).quantile(torch.tensor([0.5, 0.99], dtype=torch.float64))
        stats.pass_ms_p50, stats.pass_ms_p99 = q.tolist()
    stats.generated_tokens = sum(len(o) for o in out)
    produced = stats.generated_tokens - len(prompts)  # the first token of each came from its prompt's pass
    stats.tokens_per_pass = produced / stats.decode_steps if stats.decode_steps else 0.0
    stats.bytes_read_per_pass = (engine.counters() - before).io.bytes / max(stats.decode_steps, 1)
    return out, stats


class Batcher:
    """Continuous batching over one engine (the server's --parallel N): a thread runs decode steps over every
    running sequence; a request joins between steps (its prompt prefilled alone into a KV cache of its own) and
    leaves when it ends or is cancelled, as requests join and leave vLLM's running batch or llama.cpp's server
    slots. The model runner only runs steps: `decode_step`, the same one a single generation runs."""

    def __init__(self, engine: Engine, parallel: int):
        self.engine, self.parallel = engine, parallel
        self.inbox: queue.Queue = queue.Queue()
        self.running: list[_Slot] = []
        self.closed = False
        self.steps = self.shared_steps = 0  # decode steps, and those that carried 2+ sequences
        self.thread = threading.Thread(target=self._run, name="inaflash-batch", daemon=True)
        self.thread.start()

    def stream(self, prompt_ids: list[int], max_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
               seed: int | None = None, stop: set[int] | None = None, stats: GenerationStats | None = None,
               cancelled: Callable[[], bool] | None = None) -> Iterator[int]:
        """stream_ids' contract, through the running batch: token ids as the steps produce them; closing it (or
        `cancelled()`) takes the sequence out at the next step."""
        if not prompt_ids:
            raise InaflashError("empty prompt")
        check_sampling(max_tokens, temperature, top_p, seed)
        self.engine._check_length(len(prompt_ids) + max_tokens)
        slot = _Slot(list(prompt_ids), max_tokens, temperature, top_p,
                     torch.Generator().manual_seed(seed) if seed is not None else None,
                     stop_ids(self.engine) if stop is None else stop, GenerationStats() if stats is None else stats,
                     cancelled or (lambda: False))
        slot.stats.prompt_tokens = len(prompt_ids)
        if self.closed:
            raise InaflashError("the model is shutting down")
        self.inbox.put(slot)
        try:
            while True:
                item = slot.out.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            slot.left = True  # the consumer is gone: the sequence leaves at the next step

    def close(self, timeout: float = 30.0) -> None:
        self.closed = True
        self.inbox.put(None)
        self.thread.join(timeout)

    def _run(self) -> None:
        while not self.closed:
            try:
                self._admit()
                self._deliver()
                if self.running:
                    seqs = [s.seq for s in self.running]
                    before = self.engine.counters()
                    took = decode_step(self.engine, seqs)
                    read = (self.engine.counters() - before).io.bytes
                    self.steps += 1
                    self.shared_steps += len(seqs) > 1
                    for s in self.running:
                        s.decode_s += took
                        s.read_bytes += read
                        s.stats.decode_steps += 1
            except BaseException as e:  # a damaged store, a bug: every running sequence hears of it, none hangs
                for s in self.running:
                    s.out.put(e)
                self.running = []
        for s in self.running:  # closed: whoever still waits is told it ended
            s.finish()
        self.running = []
        while not self.inbox.empty():
            slot = self.inbox.get_nowait()
            if slot is not None:
                slot.out.put(None)

    def _admit(self) -> None:
        while len(self.running) < self.parallel:
            try:
                slot = self.inbox.get(block=not self.running, timeout=None)
            except queue.Empty:
                return
            if slot is None:  # close()
                self.closed = True
                return
            if slot.left or slot.cancelled():
                slot.out.put(None)
                continue
            try:
                t0 = time.perf_counter()
                slot.seq = start_sequence(self.engine, slot.prompt,
                                          self.engine.new_cache(len(slot.prompt) + slot.max_tokens), slot.temperature,
                                          slot.top_p, slot.generator, slot.max_tokens,
                                          lambda: slot.cancelled() or slot.left)
                slot.stats.prefill_ms = (time.perf_counter() - t0) * 1e3
            except BaseException as e:
                slot.out.put(e)
                continue
            if slot.seq is None:  # cancelled or abandoned during its prefill
                slot.out.put(None)
                continue
            self.running.append(slot)

    def _deliver(self) -> None:
        """Hand each sequence's decided tokens to its consumer; those that end (stop token, max_tokens, cancelled,
        consumer gone) leave the batch."""
        still = []
        for s in self.running:
            done = s.left or s.cancelled()
            for token in ([] if done else s.seq.decided):
                s.stats.generated_tokens += 1
                s.seq.history.append(token)
                s.out.put(token)
                if token in s.stop or s.stats.generated_tokens >= s.max_tokens or s.cancelled():
                    done = True
                    break
            if done:
                s.finish()
            else:
                still.append(s)
        self.running = still


@dataclass
class _Slot:
    prompt: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    generator: torch.Generator | None
    stop: set[int]
    stats: GenerationStats
    cancelled: Callable[[], bool]
    out: queue.Queue = field(default_factory=queue.Queue)
    seq: Sequence | None = None
    left: bool = False
    decode_s: float = 0.0
    read_bytes: int = 0

    def finish(self) -> None:
        s, produced = self.stats, max(self.stats.generated_tokens - 1, 0)
        steps = max(produced, 1)
        s.ms_per_token = self.decode_s * 1e3 / steps  # each pass it waited for, over the tokens it got
        s.compute_ms_per_token = s.ms_per_token
        s.bytes_read_per_token = self.read_bytes / steps  # the passes' reads, shared with the batch
        s.tokens_per_pass = produced / s.decode_steps if s.decode_steps else 0.0
        if self.seq is not None:
            s.drafted_tokens, s.accepted_tokens = self.seq.drafted, self.seq.accepted
        s.peak_rss_bytes = peak_rss_bytes()
        self.out.put(None)


def check_sampling(max_tokens: int, temperature: float, top_p: float, seed: int | None) -> None:
    """The sampling options, checked before anything is loaded (the CLI) and again per generation."""
    if max_tokens < 1:
        raise InaflashError("max tokens must be at least 1")
    if seed is not None and not 0 <= seed < 2 ** 64:
        raise InaflashError(f"seed {seed} is out of range: use 0 .. 2**64 - 1")
    if not 0 <= top_p <= 1 or not 0 <= temperature < float("inf"):
        raise InaflashError(f"temperature must be >= 0 and top_p in [0, 1] (got {temperature}, {top_p})")


def _finish_stats(engine: Engine, stats: GenerationStats, done: Counters, t_decode: float) -> None:
    io = done.io
    # tokens the decode passes produced: all but the first (the prompt's pass gave it); passes stopped early by a
    # stop token or max_tokens leave some of their tokens unused
    produced = max(stats.generated_tokens - 1, 0)
    steps = max(produced, 1) if stats.decode_steps else 1
    stats.tokens_per_pass = produced / stats.decode_steps if stats.decode_steps else 0.0
    stats.ms_per_token = t_decode * 1e3 / steps
    stats.io_ms_per_token = io.wait_s * 1e3 / steps
    stats.compute_ms_per_token = stats.ms_per_token - stats.io_ms_per_token
    stats.bytes_read_per_token = io.bytes / steps
    stats.reads_per_token = io.requests / steps
    if done.sparse is not None:
        c = done.sparse
        stats.neurons_read_per_token = c.neurons_read / steps
        stats.cache_hit_rate = 1 - c.neurons_read / c.neurons_needed if c.neurons_needed else 0.0
        stats.predictor_ms_per_token = c.predictor_s * 1e3 / steps
        stats.memory_ms_per_token = max(0.0, c.update_s * 1e3 / steps - stats.io_ms_per_token)
        stats.compute_ms_per_token -= stats.predictor_ms_per_token + stats.memory_ms_per_token
        stats.peak_cache_bytes = engine.sparse.cache_bytes
    if engine.plan is not None:
        stats.budget_bytes, stats.planned_bytes = engine.plan.budget_bytes, engine.plan.planned_bytes
    stats.peak_rss_bytes = peak_rss_bytes()
    stats.runtime_rss_bytes = engine.runtime_bytes


def generate_ids(engine: Engine, prompt_ids: list[int], max_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = None, stop: set[int] | None = None,
                 on_token: Callable[[int], None] | None = None) -> tuple[list[int], GenerationStats]:
    stats = GenerationStats()
    out = []
    for token in stream_ids(engine, prompt_ids, max_tokens, temperature, top_p, seed, stop, stats):
        out.append(token)
        if on_token is not None:
            on_token(token)
    return out, stats


_DECODE_LOCK = threading.Lock()


class Generation:
    """A generation in progress: iterate it for text pieces as they are decoded; afterwards `text`, `token_ids`,
    `stats` and `finish_reason` ("stop": end of sequence or a stop string; "length": max_tokens) are set.
    Incomplete UTF-8 sequences and text that may begin a stop string are held back until resolved.
    `close()` (or breaking out of the loop) cancels it: the engine is free again right away."""

    def __init__(self, engine: Engine, prompt_ids: list[int], max_tokens: int = 256, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = None, stop: list[str] | None = None,
                 batcher: Batcher | None = None):
        self.engine, self.stop = engine, [s for s in (stop or []) if s]
        self.stats = GenerationStats()
        self.token_ids: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None
        self._eos = stop_ids(engine)
        self.cancelled = threading.Event()  # set from any thread: the generation ends at the next check
        # alone (stream_ids: the engine's own KV cache), or as one sequence of a running batch
        source = batcher.stream if batcher is not None else lambda *a: stream_ids(engine, *a)
        self._tokens = source(prompt_ids, max_tokens, temperature, top_p, seed, self._eos, self.stats,
                              self.cancelled.is_set)

    def __iter__(self) -> Iterator[str]:
        tok, sent = self.engine.tokenizer, 0
        hold = max((len(s) for s in self.stop), default=1) - 1
        try:
            for token in self._tokens:
                self.token_ids.append(token)
                with _DECODE_LOCK:  # batched generations decode text on threads of their own: one tokenizer
                    text = tok.decode(self.token_ids, skip_special_tokens=True)
                if text.endswith("\ufffd"):
                    continue
                hits = [i for i in (text.find(s, max(0, sent - len(s))) for s in self.stop) if i >= 0]
                if hits:
                    self.text, self.finish_reason = text[: min(hits)], "stop"
                    break
                self.text = text
                if len(text) - hold > sent:
                    yield text[sent: len(text) - hold]
                    sent = len(text) - hold
            else:
                last = self.token_ids[-1] if self.token_ids else None
                if not self.cancelled.is_set():  # cancelled: no finish reason
                    self.finish_reason = "stop" if last in self._eos else "length"
            if len(self.text) > sent:
                yield self.text[sent:]
        finally:
            self._tokens.close()

    def close(self) -> None:
        self._tokens.close()

    def result(self) -> GenerationResult:
        """Run to the end (if not already) and return text, ids and stats."""
        for _ in self:
            pass
        return GenerationResult(self.text, self.token_ids, self.stats, self.finish_reason)


def generate(engine: Engine, prompt: str, max_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
             seed: int | None = None, raw: bool = False, stop: list[str] | None = None,
             on_text: Callable[[str], None] | None = None) -> GenerationResult:
    gen = Generation(engine, encode_prompt(engine, prompt, raw=raw), max_tokens, temperature, top_p, seed, stop)
    for piece in gen:
        if on_text is not None:
            on_text(piece)
    return gen.result()
