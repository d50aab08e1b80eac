"""More tokens per pass over the weights: draft tokens that the next forward pass verifies all at once.

Under a budget a pass over k tokens reads the same bytes as a pass over one (Qwen2.5-1.5B, hybrid at 530 MB: 8
tokens cost 1.18x one token), so every draft token the model agrees with is a token for (almost) nothing. The
verification lives in generate.decode_step (one decode step for all of it); here are the drafter and the policy that
chooses how many tokens to draft.

- lookup: prompt lookup / n-gram drafting (no model, no memory): where the last few tokens appeared earlier
  in the prompt or the text so far, propose what followed them there. Code edits and quoting repeat their input.
- DraftModel: a smaller model sharing the tokenizer (Qwen2.5-Coder-0.5B for the 1.5B: it agrees with the 1.5B's
  greedy tokens 0.90 on code edits and 0.73 on open-ended text, bench/results/2026-12-05-draft-acceptance.md), in
  DRAM, drafting greedily one token at a time from a KV cache of its own per sequence, until a token it is unsure of
  (MIN_DRAFT_P). Its memory is in the plan.
- DraftPolicy: how many tokens to draft, by a cost model: the expected tokens one pass yields at draft length k,
  (1 - r^(k+1)) / (1 - r) for a per-request acceptance rate r, over the measured cost of a (1 + k)-token pass
  relative to a 1-token pass (per engine, learned as passes run). It drafts only where that beats plain decoding,
  so a request whose drafts keep failing, or a mode where wide passes cost their width (dram), falls back to one
  token a pass.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .embedding import read_rows
from .errors import CorruptStoreError
from .reader import FlashReader, aligned_buffer
from .store.checksum import page_crcs
from .store.format import ALIGN, EMBED_BATCH, round_up
from .store.quant import Int4Matrix

MAX_DRAFT = 8  # the verification pass carries at most 1 + MAX_DRAFT tokens
# The draft model takes a prompt in chunks of this many tokens, its plan's working memory one chunk's (the target's
# prefill chunk, 256, planned 39 MB for Qwen2.5-0.5B at 300 tokens of context, this 17): it reads nothing, so small
# chunks cost it little, and what it does not hold is the target's.
DRAFT_CHUNK = 32
# a draft must promise this much more than plain decoding: the measured pass costs move +-5% between runs on this
# disk (Qwen2.5 hybrid, k = 2..9: 0.99-1.13x a 1-token pass), and with a 2% margin open-ended prompts kept drafting a
# token or two at ~5% acceptance, 0.93-0.96x plain (bench/results/2026-12-05-Qwen2.5-...-mem530MB.md)
MARGIN = 1.10
MIN_NGRAM, MAX_NGRAM = 2, 4  # suffix lengths looked up, longest first
# the draft model stops drafting after a token it gives less than this probability: the target rarely agrees with
# an unsure draft, and each draft token costs a forward of the draft model (~31 ms for Qwen2.5-0.5B beside a ~0.5 s
# verification pass). Simulated over the 1.5B's greedy text of the bench's 10 prompts (the 0.5B's probabilities
# teacher-forced; head cut to 32768 ids): 0.0 / 0.3 / 0.4 / 0.5 / 0.6 gave code 2.01 / 2.10 / 2.12 / 2.10 / 2.03x
# over plain decoding and open-ended 1.37 / 1.46 / 1.49 / 1.49 / 1.46x (/tmp script: acceptance by token, the
# bench's pass costs), a broad optimum; it changes what is drafted, never what is emitted
MIN_DRAFT_P = 0.4
# head rows a draft model cut to --draft-vocab ids adds for its prompts' ids beyond them (preallocated and planned:
# 2.3 MB for Qwen2.5-0.5B's int4 head): a code edit copies identifiers whose ids are rare merges. Simulated as above
# (cut to 32768 ids): code edits 2.12 -> 2.31x over plain decoding, open-ended 1.49 -> 1.50x; the whole head (151936
# ids) 2.61 / 1.54x before its cost (67 MB more of the budget, ~6 ms more a draft token); the prompt's ids and the
# text generated so far no better than the prompt's alone
DRAFT_EXTRA_ROWS = 4096


def lookup(history: list[int], k: int, max_ngram: int = MAX_NGRAM, min_ngram: int = MIN_NGRAM) -> list[int]:
    """Up to k tokens that followed the most recent earlier occurrence of history's longest suffix n-gram
    (max_ngram down to min_ngram tokens); [] where none recurs."""
    n_hist = len(history)
    for n in range(min(max_ngram, n_hist - 1), min_ngram - 1, -1):
        suffix = history[n_hist - n:]
        # the latest occurrence ending before the suffix itself
        for start in range(n_hist - n - 1, -1, -1):
            if history[start:start + n] == suffix:
                follow = history[start + n:start + n + k]
                if follow:
                    return follow
                break
    return []


@dataclass
class PassCosts:
    """Seconds of a forward pass by its width (tokens), per engine: an exponential moving average of what ran.
    Widths never run are estimated from the nearest measured ones (or, before any, from PRIOR_SLOPE)."""

    seconds: dict[int, float] = field(default_factory=dict)
    # before a wide pass has run: assume each extra token costs a quarter of a 1-token pass (between streaming modes,
    # ~0.01-0.05, and dram, ~0.6 at 2 tokens on Qwen2.5): a first 1-token draft at the prior acceptance passes the
    # policy's margin, and the measurement takes over (at half a pass nothing was ever drafted: 0/0 on every prompt)
    PRIOR_SLOPE = 0.25

    def record(self, width: int, seconds: float) -> None:
        old = self.seconds.get(width)
        self.seconds[width] = seconds if old is None else 0.8 * old + 0.2 * seconds

    def one(self) -> float | None:
        """Seconds of a 1-token pass: measured, else the narrowest measured pass's over its prior ratio."""
        if 1 in self.seconds:
            return self.seconds[1]
        if not self.seconds:
            return None
        w = min(self.seconds)
        return self.seconds[w] / (1.0 + self.PRIOR_SLOPE * (w - 1))

    def ratio(self, width: int) -> float:
        """Cost of a pass of `width` tokens over a 1-token pass."""
        one = self.seconds.get(1)
        if width == 1:
            return 1.0
        if one is None:
            return 1.0 + self.PRIOR_SLOPE * (width - 1)
        if width in self.seconds:
            return self.seconds[width] / one
        below = max((w for w in self.seconds if w < width), default=1)
        above = min((w for w in self.seconds if w > width), default=None)
        if above is None:  # beyond what ran: extrapolate the last slope, at least the prior's
            slope = (self.seconds[below] / one - 1) / max(below - 1, 1) if below > 1 else self.PRIOR_SLOPE
            return self.seconds[below] / one + max(slope, 0.0) * (width - below)
        lo, hi = self.seconds[below] / one, self.seconds[above] / one
        return lo + (hi - lo) * (width - below) / (above - below)


@dataclass
class DraftPolicy:
    """Per request: its acceptance rate and the engine's pass costs decide the draft length."""

    costs: PassCosts
    accept_rate: float = 0.6  # a prior; each verified draft updates it
    drafted: int = 0
    accepted: int = 0

    def length(self, available: int, base: int = 0, draft_cost: float = 0.0) -> int:
        """The draft length with the most expected tokens per unit of cost (0: plain decoding), at most
        `available` (what the drafter found, the tokens left, the context left). `base`: tokens the same pass
        already carries for other sequences (a batch): a draft's cost is what it adds to that pass. `draft_cost`:
        what drafting one token costs, in 1-token passes (a draft model's forward; 0 for lookup)."""
        r = min(max(self.accept_rate, 0.0), 0.99)
        best, best_k = 1.0, 0  # plain decoding: one token per 1-token pass
        plain = self.costs.ratio(base + 1)
        for k in range(1, min(available, MAX_DRAFT) + 1):
            expected = (1 - r ** (k + 1)) / (1 - r)
            value = expected / ((self.costs.ratio(base + 1 + k) + k * draft_cost) / plain)
            # drafting at all must beat plain decoding by MARGIN; a longer draft a shorter one by 2%
            if value > best * (MARGIN if best_k == 0 else 1.02):
                best, best_k = value, k
        return best_k

    def update(self, drafted: int, accepted: int) -> None:
        """After a verification: `accepted` of `drafted` tokens agreed. The rate is per drafted token, weighted
        towards recent drafts (EMA over tokens)."""
        self.drafted += drafted
        self.accepted += accepted
        for i in range(drafted):
            hit = 1.0 if i < accepted else 0.0
            self.accept_rate = 0.85 * self.accept_rate + 0.15 * hit
            if not hit:
                break  # tokens after the first miss were not judged


class DraftVocab:
    """A draft model's head cut to its first `base` token ids (BPE's most frequent merges), plus rows for the ids its
    prompts use beyond them, read from the store as prompts arrive (up to `extra` of them, in a buffer allocated at
    open: nothing grows later). Rows are only ever appended, so a row's token never changes while sequences draft.
    Each row read is checked against a CRC-32C taken per row at open, from the head as loaded and checked whole."""

    def __init__(self, store, name: str, head, base: int, extra: int, checksums: bool = True):
        self.int4 = isinstance(head, Int4Matrix)
        full = head.raw if self.int4 else head
        self.base, self.vocab = base, full.shape[0]
        self.buf = full.new_empty((base + extra, full.shape[1]))
        self.buf[:base] = full[:base]
        self.offset, nbytes, _ = store.resident_span(name)
        self.row_bytes = nbytes // self.vocab
        self.crcs = page_crcs(full, self.row_bytes) if checksums else None
        self.ids: list[int] = []  # the token id of each row added after the base
        self.added: set[int] = set()  # (the same ids, for lookups)
        self.reader = FlashReader(store.path / "resident.safetensors", threads=1)
        self.row_buf = aligned_buffer(EMBED_BATCH * (round_up(self.row_bytes) + ALIGN))

    @property
    def nbytes(self) -> int:
        """What it holds beside the model: the head's buffer, the row checksums, the read buffer."""
        crcs = 0 if self.crcs is None else self.crcs.nbytes
        return self.buf.nbytes + crcs + self.row_buf.nbytes

    def head(self):
        """The head over the rows it has (a view of the buffer: no copy)."""
        n = self.base + len(self.ids)
        return Int4Matrix(self.buf[:n]) if self.int4 else self.buf[:n]

    def add(self, token_ids) -> bool:
        """Rows for those of token_ids beyond the base it has not yet (while room is left); True where any came."""
        room = self.buf.shape[0] - self.base - len(self.ids)
        new = sorted({t for t in token_ids if self.base <= t < self.vocab and t not in self.added})[:room]
        if not new:
            return False
        raw = read_rows(self.reader, self.row_buf, self.offset, self.row_bytes, new)
        if self.crcs is not None:
            bad = [t for t, c in zip(new, page_crcs(raw, self.row_bytes)) if c != self.crcs[t]]
            if bad:
                raise CorruptStoreError(f"{self.reader.path}: draft head row {bad[0]} does not match its checksum "
                                        "(the store is damaged: re-convert it)")
        n = self.base + len(self.ids)
        self.buf[n:n + len(new)] = raw.view(self.buf.dtype).view(len(new), -1)
        self.ids += new
        self.added.update(new)
        return True

    def token(self, row: int) -> int:
        """The token id of head row `row`."""
        return row if row < self.base else self.ids[row - self.base]

    def close(self) -> None:
        self.reader.close()


class DraftModel:
    """One sequence's drafter: `engine` (the draft model's, dram mode) drafts greedily into a KV cache of its own.
    Its cache holds the sequence's history up to `pos`; propose() first feeds what it has not seen (the prompt, in
    chunks, on the first call; then the tokens decided since), and keep() takes back what verification rejected
    (those positions are overwritten by the next feed: no copy)."""

    def __init__(self, engine, max_seq: int, chunk: int, min_p: float = MIN_DRAFT_P, prompt=()):
        self.engine, self.cache, self.pos, self.chunk = engine, engine.new_cache(max_seq), 0, chunk
        self.min_p = min_p
        self.vocab = engine.vocab  # a cut head's: the prompt's rarer ids join it
        if self.vocab is not None and self.vocab.add(prompt):
            engine.model.head = self.vocab.head()

    def cost(self, costs: PassCosts) -> float:
        """Seconds of one draft token over the target's 1-token pass (0.2 before either is measured)."""
        mine, one = self.engine.pass_costs.seconds.get(1), costs.one()
        return 0.2 if mine is None or not one else mine / one

    @torch.inference_mode()
    def propose(self, history: list[int], k: int) -> list[int]:
        """Up to k greedy draft tokens after history (whose last token the target has not seen yet either): fewer
        where the draft model gives its own choice less than min_p (that token is the last drafted)."""
        out = []
        while self.pos < len(history):  # catch up: the prompt in chunks, then the tokens decided since
            feed = history[self.pos:self.pos + self.chunk]
            t0 = time.perf_counter()
            logits = self.engine.forward(torch.tensor(feed), self.pos, last_only=True, cache=self.cache)[-1]
            if len(feed) <= 2:  # the token(s) decided since: what a draft token costs (a 1-token draft has no other)
                self.engine.pass_costs.record(1, time.perf_counter() - t0)
            self.pos += len(feed)
        for i in range(k):
            top = int(torch.argmax(logits))
            out.append(top if self.vocab is None else self.vocab.token(top))
            if i == k - 1 or (self.min_p > 0 and float(torch.softmax(logits, -1)[top]) < self.min_p):
                break  # the last draft token is not fed: the target's pass decides the token after it
            t0 = time.perf_counter()
            logits = self.engine.forward(torch.tensor(out[-1:]), self.pos, cache=self.cache)[-1]
            self.engine.pass_costs.record(1, time.perf_counter() - t0)
            self.pos += 1
        return out

    def keep(self, n: int) -> None:
        """Verification kept the first n positions of the history (the rest of the drafts were rejected)."""
        self.pos = min(self.pos, n)
