"""Low-rank activation predictor per layer (paper section 3.1): scores = B (A x) + b; active = scores > tau.

Trained on recorded (FFN input, active mask) pairs with a class-balanced loss; tau is then set on held-out pairs so
that recall reaches the target (missing an active neuron costs quality, an extra one only costs a read).

Calibration also keeps each neuron's score mean and standard deviation over its text (`mean`, `std`): with them,
how often a neuron is selected at any threshold is estimated (a normal fit) without the text, which is what the
planner ranks hot neurons by and what `--density` moves the threshold with.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F


@dataclass
class Predictor:
    down: torch.Tensor  # A [rank, hidden]
    up: torch.Tensor  # B [neurons, rank]
    bias: torch.Tensor  # [neurons] float32
    tau: float  # decision threshold on the scores
    mean: torch.Tensor | None = None  # [neurons] float32: each neuron's score mean on the calibration text
    std: torch.Tensor | None = None  # [neurons] float32: and its standard deviation (None: calibrated before these)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.down, self.up, self.bias, self.mean, self.std)
                   if t is not None)

    def frequencies(self, tau: float | None = None) -> torch.Tensor:
        """[neurons]: the estimated fraction of tokens on which each neuron scores above `tau` (default: its own)."""
        if self.mean is None:
            raise ValueError("this predictor has no score statistics (calibrated before they were kept)")
        t = self.tau if tau is None else tau
        return torch.special.ndtr((self.mean - t) / self.std.clamp(min=1e-6))

    def tau_at(self, density: float) -> float:
        """The threshold at which the estimated mean selected fraction is `density` (bisection: it falls with tau)."""
        lo, hi = float((self.mean - 8 * self.std).min()), float((self.mean + 8 * self.std).max())
        for _ in range(50):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if float(self.frequencies(mid).mean()) > density else (lo, mid)
        return (lo + hi) / 2

    def with_statistics(self, x: torch.Tensor, chunk: int = 1024) -> "Predictor":
        """This predictor with its score mean and deviation over the FFN inputs x [N, hidden]."""
        total = torch.zeros(self.bias.numel(), dtype=torch.float64)
        squares = torch.zeros_like(total)
        with torch.no_grad():
            for part in x.split(chunk):
                s = self.scores(part.float()).double()
                total += s.sum(0)
                squares += (s * s).sum(0)
        mean = total / x.shape[0]
        std = (squares / x.shape[0] - mean * mean).clamp(min=0).sqrt()
        return replace(self, mean=mean.float(), std=std.float())

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        from ..ops import linear

        return linear(linear(x, self.down), self.up, self.bias)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """[T, neurons] bool: the neurons predicted active for each token."""
        return self.scores(x) > self.tau


@dataclass
class PredictorMetrics:
    recall: float
    precision: float
    predicted_fraction: float
    true_fraction: float


def train_predictor(x: torch.Tensor, mask: torch.Tensor, rank: int, recall_target: float = 0.95,
                    epochs: int = 8, batch: int = 256, lr: float = 3e-3, seed: int = 0, min_steps: int = 0
                    ) -> tuple[Predictor, PredictorMetrics]:
    """x [N, hidden] float32 FFN inputs, mask [N, neurons] bool true active sets. `epochs` passes over the training
    pairs, more where that would be fewer than `min_steps` optimizer steps (few pairs)."""
    g = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    order = torch.randperm(n, generator=g)
    held = order[: max(1, n // 10)]
    train = order[max(1, n // 10):]
    hidden, neurons = x.shape[1], mask.shape[1]
    a = torch.nn.Parameter(torch.randn(rank, hidden, generator=g) / hidden ** 0.5)
    b = torch.nn.Parameter(torch.randn(neurons, rank, generator=g) / rank ** 0.5)
    p = mask[train].float().mean(0).clamp(1e-4, 1 - 1e-4)
    bias = torch.nn.Parameter(torch.log(p / (1 - p)))  # start at each neuron's base rate
    pos_weight = ((1 - p) / p).clamp(max=50.0)  # balance the rare positives
    opt = torch.optim.Adam([a, b, bias], lr=lr)
    epochs = max(epochs, -(-min_steps // -(-train.numel() // batch)))
    with torch.enable_grad():
        for _ in range(epochs):
            for idx in train[torch.randperm(train.numel(), generator=g)].split(batch):
                logits = F.linear(F.linear(x[idx], a), b, bias)
                loss = F.binary_cross_entropy_with_logits(logits, mask[idx].float(), pos_weight=pos_weight)
                opt.zero_grad()
                loss.backward()
                opt.step()
    with torch.no_grad():
        scores = F.linear(F.linear(x[held], a), b, bias)
        pos = scores[mask[held]]
        tau = float(torch.quantile(pos, 1 - recall_target)) if pos.numel() else 0.0
        pred = Predictor(a.detach().clone(), b.detach().clone(), bias.detach().clone(), tau)
        return pred, measure(pred, x[held], mask[held])


def measure(pred: Predictor, x: torch.Tensor, mask: torch.Tensor) -> PredictorMetrics:
    with torch.no_grad():
        guess = pred.scores(x) > pred.tau
    tp = (guess & mask).sum().item()
    return PredictorMetrics(
        recall=tp / max(mask.sum().item(), 1), precision=tp / max(guess.sum().item(), 1),
        predicted_fraction=guess.float().mean().item(), true_fraction=mask.float().mean().item(),
    )
