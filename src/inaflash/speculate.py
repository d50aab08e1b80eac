"""More tokens per pass over the weights: draft tokens that the next forward pass verifies all at once.

Under a budget a pass over k tokens reads the same bytes as a pass over one (Qwen2.5-1.5B, hybrid at 530 MB: 8
tokens cost 1.18x one token), so every draft token the model agrees with is a token for (almost) nothing. The
verification lives in generate.decode_step (one decode step for all of it); here are the drafter and the policy that
chooses how many tokens to draft.

- lookup: prompt lookup / n-gram drafting (no model, no memory): where the last few tokens appeared earlier
  in the prompt or the text so far, propose what followed them there. Code edits and quoting repeat their input.
- DraftPolicy: how many tokens to draft, by a cost model: the expected tokens one pass yields at draft length k,
  (1 - r^(k+1)) / (1 - r) for a per-request acceptance rate r, over the measured cost of a (1 + k)-token pass
  relative to a 1-token pass (per engine, learned as passes run). It drafts only where that beats plain decoding,
  so a request whose drafts keep failing, or a mode where wide passes cost their width (dram), falls back to one
  token a pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_DRAFT = 8  # the verification pass carries at most 1 + MAX_DRAFT tokens
# a draft must promise this much more than plain decoding: the measured pass costs move +-5% between runs on this
# disk (Qwen2.5 hybrid, k = 2..9: 0.99-1.13x a 1-token pass), and with a 2% margin open-ended prompts kept drafting a
# token or two at ~5% acceptance, 0.93-0.96x plain (bench/results/2026-12-05-Qwen2.5-...-mem530MB.md)
MARGIN = 1.10
MIN_NGRAM, MAX_NGRAM = 2, 4  # suffix lengths looked up, longest first


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

    def length(self, available: int, base: int = 0) -> int:
        """The draft length with the most expected tokens per unit of cost (0: plain decoding), at most
        `available` (what the drafter found, the tokens left, the context left). `base`: tokens the same pass
        already carries for other sequences (a batch): a draft's cost is what it adds to that pass."""
        r = min(max(self.accept_rate, 0.0), 0.99)
        best, best_k = 1.0, 0  # plain decoding: one token per 1-token pass
        plain = self.costs.ratio(base + 1)
        for k in range(1, min(available, MAX_DRAFT) + 1):
            expected = (1 - r ** (k + 1)) / (1 - r)
            value = expected / (self.costs.ratio(base + 1 + k) / plain)
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
