"""Palettes learned against what the layer computes: differentiable k-means (DKM, Cho et al., arXiv 2108.12659; eDKM,
arXiv 2309.00964) for the palette3/palette4 FFN formats, layer by layer.

Plain k-means (quant.encode) places a layer's 8 or 16 levels where its normalized weights are dense and sends each
weight to the nearest level: on SmolLM2 palette3 cost +178% perplexity. Here, per layer, the levels c (one codebook
per field, as stored) and the weights' normalized values u (in [0, 1] of their group of 32: w = u * scale + min,
scale and min as quant.encode fits them) are trained so that the FFN's output on recorded calibration inputs stays the
float layer's: each weight is a softmax-weighted mix of the levels, sum_j softmax(-(u - c_j)^2 / tau)_j c_j (DKM's
attention over centroids), tau annealed towards a hard assignment; then each weight takes its nearest level. So a
weight near the boundary of two levels goes to the one the layer's output prefers, not the nearer one, and the levels
move to where they serve the output. The hard result is kept only where its loss beats k-means' (never worse than
plain palettes on the calibration loss).

Memory: the attention map is weights x levels floats per field (Qwen2.5-1.5B: 13.8 M x 8 x 4 B = 440 MB, with its
gradient ~1.3 GB at most per step): it fits this machine's 24 GB whole, so eDKM's uniquification and sharding (which
make LLaMA-7B's fit on a GPU) are not needed here.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from .quant import (PALETTE_BITS, PALETTE_GROUP, PALETTE_LEVELS, _minimum, _scales, book_values, kmeans_1d, nearest,
                    palettized, snap_book)

STEPS = 60  # Adam steps per layer (SmolLM2: ~0.1 s each on 2 cores)
TOKENS = 512  # calibration tokens per step (sampled from those recorded)
LR = 2e-3


def _ffn(fields: dict[str, tuple[int, int]], w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The FFN over bundle rows w [neurons, width] for inputs x [T, hidden] (SwiGLU or OPT's ReLU with fc1 bias)."""
    if "gate" in fields:
        (g0, g1), (u0, u1), (d0, d1) = fields["gate"], fields["up"], fields["down"]
        h = F.silu(x @ w[:, g0:g1].T) * (x @ w[:, u0:u1].T)
        return h @ w[:, d0:d1]
    (a0, a1), (b0, _), (c0, c1) = fields["fc1"], fields["fc1_bias"], fields["fc2"]
    return F.relu(x @ w[:, a0:a1].T + w[:, b0]) @ w[:, c0:c1]


class LayerFit:
    """One layer's palette: per palettized field its codebook (float16, sorted), each weight's index, and the
    groups' float16 scale and minimum (quant.encode's normalization); `report` says what the training did."""

    def __init__(self, books, idx, scales, lows, report):
        self.books, self.idx, self.scales, self.lows, self.report = books, idx, scales, lows, report


def fit_layer(fmt: str, bundles: torch.Tensor, fields: dict[str, tuple[int, int]], x: torch.Tensor,
              steps: int = STEPS, tokens: int = TOKENS, lr: float = LR, seed: int = 0) -> LayerFit:
    """DKM for one layer's bundles [neurons, width] against its FFN's output on recorded inputs x [T, hidden]."""
    t0 = time.perf_counter()
    k = 1 << PALETTE_BITS[fmt]
    w = bundles.float()
    n = w.shape[0]
    x = x.float()
    with torch.no_grad():
        ref = _ffn(fields, w, x)
        ref_power = ref.pow(2).mean()
    names = palettized(fields)
    scales, lows, u0, books0 = {}, {}, {}, {}
    for name in names:
        a, b = fields[name]
        xg = w[:, a:b].reshape(n, -1, PALETTE_GROUP)
        lows[name] = _minimum(xg)
        scales[name] = _scales(xg - lows[name].float()[..., None], 1)
        u0[name] = ((xg - lows[name].float()[..., None]) / scales[name].float()[..., None]).reshape(n, b - a)
        books0[name] = book_values(snap_book(kmeans_1d(u0[name], k, init=torch.linspace(0, 1, k))))

    def rebuilt(u: dict, c: dict, tau: float | None) -> torch.Tensor:
        """The bundles with each palettized field from levels c: soft (tau) or hard (nearest level)."""
        parts, at = [], 0
        for name in names:
            a, b = fields[name]
            if a > at:
                parts.append(w[:, at:a])
            if tau is None:
                cs = book_values(snap_book(c[name].detach()))  # the levels as stored
                v = cs[nearest(u[name].detach(), cs)]
            else:
                att = torch.softmax(-(u[name].unsqueeze(-1) - c[name]) ** 2 / tau, -1)
                v = att @ c[name]
            parts.append((v.view(n, -1, PALETTE_GROUP) * scales[name].float()[..., None] +
                          lows[name].float()[..., None]).view(n, b - a))
            at = b
        if at < w.shape[1]:
            parts.append(w[:, at:])
        return torch.cat(parts, 1)

    def hard_loss(u, c) -> float:
        with torch.no_grad():
            return float((_ffn(fields, rebuilt(u, c, None), x) - ref).pow(2).mean() / ref_power)

    kmeans_loss = hard_loss(u0, books0)
    u = {name: u0[name].clone().requires_grad_() for name in names}
    c = {name: books0[name].clone().requires_grad_() for name in names}
    opt = torch.optim.Adam([*u.values(), *c.values()], lr=lr)
    g = torch.Generator().manual_seed(seed)
    spacing = 1.0 / (k - 1)
    best, best_loss = ({n_: t.detach().clone() for n_, t in u.items()},
                       {n_: t.detach().clone() for n_, t in c.items()}), kmeans_loss
    for step in range(steps):
        # tau from (spacing / 2)^2 (soft: neighbouring levels mix) to (spacing / 20)^2 (all but hard)
        frac = step / max(steps - 1, 1)
        tau = (spacing * (0.5 * (0.1 ** frac))) ** 2
        rows = torch.randint(x.shape[0], (min(tokens, x.shape[0]),), generator=g)
        loss = (_ffn(fields, rebuilt(u, c, tau), x[rows]) - ref[rows]).pow(2).mean() / ref_power
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            for t in u.values():
                t.clamp_(0, 1)
            for t in c.values():
                t.clamp_(0, 1)
        if (step + 1) % 10 == 0 or step == steps - 1:
            now = hard_loss(u, c)
            if now < best_loss:
                best_loss = now
                best = ({n_: t.detach().clone() for n_, t in u.items()}, {n_: t.detach().clone() for n_, t in c.items()})
    u_best, c_best = best
    books, idx = {}, {}
    for name in names:
        books[name] = snap_book(c_best[name])  # the kernel's grid (quant.PALETTE_LEVELS)
        idx[name] = nearest(u_best[name], book_values(books[name]))
    report = {"kmeans_loss": kmeans_loss, "dkm_loss": best_loss, "steps": steps, "tokens": tokens,
              "seconds": time.perf_counter() - t0}
    return LayerFit(books, idx, scales, lows, report)


class DKMEncoder:
    """quant.encode's replacement for write_store (`convert --dkm`): each layer's palette fitted by fit_layer on
    that layer's recorded FFN inputs. Resumable: each fitted layer is kept in `work` (a folder beside the store being
    written) and taken from there by a second run with the same settings; write_store removes it when the store is
    in place."""

    def __init__(self, fmt: str, inputs: list[torch.Tensor], work, steps: int = STEPS, tokens: int = TOKENS,
                 calibration: dict | None = None):
        from pathlib import Path

        self.fmt, self.inputs, self.steps, self.tokens = fmt, inputs, steps, tokens
        self.work = Path(work)
        self.reports: list[dict] = []
        # the levels' grid too: a layer fitted before books lay on it is fitted again, not resumed
        self.settings = {"format": fmt, "steps": steps, "tokens": tokens, "levels": PALETTE_LEVELS,
                         **(calibration or {})}

    def __call__(self, layer: int, bundles: torch.Tensor, fields: dict) -> tuple[torch.Tensor, dict]:
        import json

        from safetensors.torch import load_file, save_file

        from .quant import pack_palette

        path = self.work / f"layer{layer}.safetensors"
        if path.exists():
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
            if json.loads(meta.get("settings", "null")) == self.settings:
                saved = load_file(str(path))
                self.reports.append({**json.loads(meta["report"]), "resumed": True})
                return saved["raw"], {k[5:]: v for k, v in saved.items() if k.startswith("book.")}
        fit = fit_layer(self.fmt, bundles, fields, self.inputs[layer], steps=self.steps, tokens=self.tokens)
        raw = pack_palette(self.fmt, bundles.float(), fields, fit.idx, fit.scales, fit.lows)
        self.reports.append(fit.report)
        self.work.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".partial")
        save_file({"raw": raw, **{f"book.{k}": v for k, v in fit.books.items()}}, str(tmp),
                  metadata={"settings": json.dumps(self.settings), "report": json.dumps(fit.report)})
        tmp.rename(path)
        return raw, fit.books

