"""Our DKM palettes (store/dkm.py) against coremltools' DKM (coremltools.optimize.torch.palettization.DKMPalettizer,
by DKM's authors), on one FFN layer: the relative squared error of the layer's output on held-out inputs (The Devil's
Dictionary; training on pydoc's topics, as `convert --dkm`), bits per weight, seconds and peak RSS of each fit.

    python bench/dkm_vs_coremltools.py [--layer 10] [--steps 60]   (needs `pip install coremltools`; SmolLM2)

Writes bench/results/<date>-dkm-vs-coremltools.json and .md.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from inaflash.calibrate import calibration_text, heldout_text, recorded_inputs, token_ids
from inaflash.engine import Engine
from inaflash.loader import resolve_store
from inaflash.store import dkm, quant
from inaflash.store.sources import open_source
from inaflash.tools.report import free_stem


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).pow(2).mean() / ref.pow(2).mean())


def ours(fmt: str, bundles, fields, x_cal, dkm_on: bool, steps: int):
    """(bundles as our palette decodes them, seconds)."""
    t0 = time.perf_counter()
    if dkm_on:
        fit = dkm.fit_layer(fmt, bundles, fields, x_cal, steps=steps)
        raw = quant.pack_palette(fmt, bundles, fields, fit.idx, fit.scales, fit.lows)
        books = fit.books
    else:
        raw, books = quant.encode(fmt, bundles, fields)
    out = quant.decode(fmt, raw, fields, bundles.shape[1], torch.float32, books=books)
    return out, time.perf_counter() - t0


class FFN(torch.nn.Module):
    def __init__(self, bundles, fields):
        super().__init__()
        (g0, g1), (u0, u1), (d0, d1) = fields["gate"], fields["up"], fields["down"]
        n, h = bundles.shape[0], g1 - g0
        self.gate, self.up = torch.nn.Linear(h, n, bias=False), torch.nn.Linear(h, n, bias=False)
        self.down = torch.nn.Linear(n, h, bias=False)
        with torch.no_grad():
            self.gate.weight.copy_(bundles[:, g0:g1])
            self.up.weight.copy_(bundles[:, u0:u1])
            self.down.weight.copy_(bundles[:, d0:d1].T)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


def coreml(bundles, fields, x_cal, ref_cal, bits: int, steps: int, lr: float, granularity: str, group_size: int,
           scale: bool):
    from coremltools.optimize.torch.palettization import (DKMPalettizer, DKMPalettizerConfig,
                                                          ModuleDKMPalettizerConfig)

    t0 = time.perf_counter()
    model = FFN(bundles, fields)
    kw = dict(n_bits=bits, weight_threshold=0, granularity=granularity, enable_per_channel_scale=scale)
    if granularity == "per_grouped_channel":
        kw["group_size"] = group_size
    pal = DKMPalettizer(model, DKMPalettizerConfig(global_config=ModuleDKMPalettizerConfig(**kw)))
    prepared = pal.prepare()
    opt = torch.optim.Adam(prepared.parameters(), lr=lr)
    g = torch.Generator().manual_seed(0)
    prepared.train()
    for step in range(steps):
        if step == 1:
            print(f"coremltools: first step {time.perf_counter() - t0:.1f} s", flush=True)
        rows = torch.randint(x_cal.shape[0], (min(dkm.TOKENS, x_cal.shape[0]),), generator=g)
        loss = (prepared(x_cal[rows]) - ref_cal[rows]).pow(2).mean() / ref_cal[rows].pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        pal.step()
    final = pal.finalize()
    return final, time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layer", type=int, default=10)
    ap.add_argument("--steps", type=int, default=dkm.STEPS)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    store = resolve_store(None)  # the default model's float16 store
    src = open_source(store.manifest["source"]["path"])
    L, p = a.layer, f"model.layers.{a.layer}.mlp."
    g, u, d = (src.tensor(p + f"{n}_proj.weight") for n in ("gate", "up", "down"))
    H = g.shape[1]
    bundles = torch.cat([g, u, d.T], 1).float()
    fields = {"gate": (0, H), "up": (H, 2 * H), "down": (2 * H, 3 * H)}
    with Engine(store, mode="dram", context=257, speculation="off") as engine:
        x_cal = recorded_inputs(engine, engine.ffn, token_ids(engine, calibration_text(), 2048))[L]
        x_held = recorded_inputs(engine, engine.ffn, token_ids(engine, heldout_text(), 1024))[L]
    x_cal, x_held = x_cal.float(), x_held.float()
    with torch.no_grad():
        ref_cal, ref_held = dkm._ffn(fields, bundles, x_cal), dkm._ffn(fields, bundles, x_held)
    rows = []
    n_weights = bundles.numel()
    for fmt, bits in (("palette3", 3), ("palette4", 4)):
        for dkm_on in (False, True):
            rss0 = peak_mb()
            w, s = ours(fmt, bundles, fields, x_cal, dkm_on, a.steps)
            with torch.no_grad():
                e = rel_err(dkm._ffn(fields, w, x_held), ref_held)
            stored = quant.bundle_bytes(fmt, bundles.shape[1], fields) * bundles.shape[0] * 8 / n_weights
            rows.append({"method": f"inaflash {fmt}" + (" + DKM" if dkm_on else " (k-means)"), "bits_per_weight": stored,
                         "heldout_rel_error": e, "seconds": s, "peak_rss_mb": peak_mb(), "rss_before_mb": rss0})
            print(rows[-1], flush=True)
    try:
        import coremltools  # noqa: F401
    except ImportError:
        coremltools = None
    if coremltools is not None:
        for bits, gran, gs, scale in ((3, "per_tensor", 0, True), (4, "per_tensor", 0, True),
                                      (3, "per_grouped_channel", 16, True)):
            for lr in (1e-4,):
                rss0 = peak_mb()
                m, s = coreml(bundles, fields, x_cal, ref_cal, bits, a.steps, lr, gran, gs, scale)
                with torch.no_grad():
                    e = rel_err(m(x_held), ref_held)
                n, h = bundles.shape[0], fields["gate"][1]
                luts = 3 if gran == "per_tensor" else 2 * (n // gs) + h // gs  # gate, up: n rows; down: h rows
                overhead = (luts * (1 << bits) * 16 + (scale and 16 * (2 * n + h))) / n_weights
                rows.append({"method": f"coremltools DKM {bits}-bit {gran}" + (f" {gs}" if gs else "") +
                             (" + channel scale" if scale else "") + f", lr {lr:g}", "bits_per_weight": bits + overhead,
                             "heldout_rel_error": e, "seconds": s, "peak_rss_mb": peak_mb(), "rss_before_mb": rss0})
                print(rows[-1], flush=True)
    results = Path(__file__).parent / "results"
    out = Path(a.out) if a.out else results / free_stem(results, time.strftime("%Y-%m-%d") + "-dkm-vs-coremltools")
    meta = {"model": str(store.path), "layer": L, "steps": a.steps, "calibration": "pydoc_data.topics, 2048 tokens",
            "heldout": "The Devil's Dictionary, 1024 tokens", "coremltools": getattr(coremltools, "__version__", None)}
    out.with_suffix(".json").write_text(json.dumps({**meta, "rows": rows}, indent=1))
    md = [f"# DKM: inaflash's palettes vs coremltools' DKMPalettizer on one FFN layer ({time.strftime('%Y-%m-%d %H:%M')})", "",
          f"`python bench/dkm_vs_coremltools.py --layer {L} --steps {a.steps}`: SmolLM2-135M layer {L}'s FFN (from the "
          "Q4_1 GGUF), each fit trained on its recorded inputs from pydoc's topics (2048 tokens, 512 a step), judged "
          "by the relative squared error of the layer's output on 1024 held-out tokens (The Devil's Dictionary). "
          "Peak RSS is the process's so far (monotone).", "",
          "| method | bits/weight | held-out output error | seconds | peak RSS MB |", "|---|---|---|---|---|"]
    md += [f"| {r['method']} | {r['bits_per_weight']:.2f} | {r['heldout_rel_error']:.4f} | {r['seconds']:.1f} | "
           f"{r['peak_rss_mb']:.0f} |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
