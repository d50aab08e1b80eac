"""`inaflash calibrate`: choose what "active" means per layer and train the predictors, on real offline text.

1. Run the dense model over calibration text (pydoc_data.topics, shipped with Python) and record every layer's
   FFN input.
2. SwiGLU: per layer, the threshold on |act(gate x) * (up x)| that drops the target fraction of neurons (CATS/TEAL
   style, training-free). ReLU (OPT): exact zeros, nothing to choose.
3. Per layer, a low-rank predictor trained on (FFN input, active mask) pairs. With --max-ppl-increase, steps 2-3
   are repeated in a binary search for the largest sparsity whose perplexity *as sparse mode runs it* (predictors,
   window) on a validation slice of the calibration text stays within the bound.
4. Save thresholds, predictors (with their score statistics: the planner's hot neurons, `--density`) and the report
   into the store; the manifest is replaced atomically.
Held-out evaluation text (The Devil's Dictionary) is never used here; `evaluate` (`inaflash eval`) scores on it.
In the core, not tools/: `--mode sparse` calibrates a store on first use (loader.load).
"""

from __future__ import annotations

import gzip
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .engine import Engine
from .errors import InaflashError
from .ffn.dense import RecordingFFN, ResidentFFN
from .ffn.predictor import Predictor, train_predictor
from .ffn.sparse import SPARSITY_FILE, Sparsity, WindowHistory
from .store.format import FlashStore
from .store.manifest import file_entry, read_manifest, write_manifest

DEVIL_DICT = Path("/usr/share/dictd/devil.dict.dz")
CHUNK = 256  # tokens per forward pass when recording or scoring text
GRID = [round(0.05 * i, 2) for i in range(4, 20)]  # candidate sparsity targets 0.20 .. 0.95


def calibration_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def heldout_text() -> str:
    """The Devil's Dictionary (Debian package dict-devil): public domain, unlike pydoc never used for fitting."""
    if not DEVIL_DICT.exists():
        raise InaflashError(f"held-out text {DEVIL_DICT} not found: apt-get install dict-devil (or pass --text)")
    return gzip.decompress(DEVIL_DICT.read_bytes()).decode("utf-8", errors="replace")


def read_texts(paths: list[Path] | None) -> str:
    if not paths:
        return calibration_text()
    for p in paths:
        if not Path(p).exists():
            raise InaflashError(f"text file not found: {p}")
    return "\n\n".join(Path(p).read_text(errors="replace") for p in paths)


def token_ids(engine: Engine, text: str, limit: int) -> torch.Tensor:
    ids = engine.tokenizer(text[: limit * 16], add_special_tokens=False)["input_ids"][:limit]
    if len(ids) < limit:
        raise InaflashError(f"text has only {len(ids)} tokens, {limit} needed")
    return torch.tensor(ids)


def recorded_inputs(engine: Engine, ffn, ids: torch.Tensor, progress: str | None = None) -> list[torch.Tensor]:
    """Every FFN input of each layer, [tokens, hidden], while `ffn` runs `ids` in chunks."""
    inputs = [[] for _ in range(engine.config.num_layers)]
    run_chunks(engine, ids, RecordingFFN(ffn, lambda layer, x, out: inputs[layer].append(x.clone())), progress)
    return [torch.cat(chunks) for chunks in inputs]


def recorded_calibration_inputs(store: FlashStore, tokens: int = 2048, progress: bool = True) -> tuple[list, dict]:
    """For `convert --dkm` (store/dkm.py): each layer's FFN inputs on `tokens` tokens of the calibration text
    (pydoc's topics; never the held-out text), recorded through `store` (the source's float16 store) in dram mode."""
    with Engine(store, mode="dram", context=CHUNK + 1, speculation="off") as engine:
        ids = token_ids(engine, calibration_text(), tokens)
        inputs = recorded_inputs(engine, engine.ffn, ids, "record inputs" if progress else None)
    return inputs, {"calibration_tokens": tokens, "calibration_text": "pydoc_data.topics"}


class _ActivationTap:
    """The dense FFN, keeping each layer's inputs and its hidden activations h from the same kernel pass (h as
    bfloat16: Qwen2.5's 4096 tokens x 8960 neurons x 28 layers are 2 GB). Computing h again per layer afterwards
    cost ~2.3 s a layer there (the training phase: 302 -> 238 s)."""

    def __init__(self, resident: ResidentFFN, layers: int):
        self.resident = resident
        self.xs, self.hs = [[] for _ in range(layers)], [[] for _ in range(layers)]

    def begin_forward(self) -> None:
        pass

    def __call__(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        h = torch.empty(x.shape[0], self.resident.rows[layer].shape[0])
        out = self.resident(layer, x, hidden=h)
        self.xs[layer].append(x.clone())
        self.hs[layer].append(h.to(torch.bfloat16))
        return out


def recorded_activations(engine: Engine, resident: ResidentFFN, ids: torch.Tensor, progress: str | None = None
                         ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Every FFN input [tokens, hidden] and hidden activation [tokens, neurons] (bfloat16) of each layer, dense."""
    tap = _ActivationTap(resident, engine.config.num_layers)
    run_chunks(engine, ids, tap, progress)
    engine.set_ffn(resident)
    return [torch.cat(c) for c in tap.xs], [torch.cat(c) for c in tap.hs]


class MaskedDenseFFN:
    """Dense weights in DRAM, output restricted to the selected neurons: quality of a sparsity setting, fast.
    window > 1 selects, for each token, the union of the last `window` tokens' selections: sparse mode's default
    compute="cached" while decoding with room for the window, across calls too (token-by-token decoding) until
    `reset_state()` starts a new sequence. (tests/test_sparse.py checks the sparse flash path computes the same
    numbers.)"""

    def __init__(self, resident: ResidentFFN, sparsity: Sparsity, use_predictor: bool, window: int = 1):
        self.resident, self.sparsity, self.use_predictor = resident, sparsity, use_predictor
        self.selected = self.total = 0
        self.windows = WindowHistory(window)

    def begin_forward(self) -> None:
        pass

    def reset_state(self) -> None:
        self.windows.reset()

    def __call__(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        if self.use_predictor:
            mask = self.sparsity.predictors[layer](x)
        else:
            mask = self.sparsity.true_active(layer, self.resident.hidden(layer, x))
        mask = self.windows.union(layer, mask)
        self.selected += int(mask.sum())
        self.total += mask.numel()
        return self.resident(layer, x, mask)


def run_chunks(engine: Engine, ids: torch.Tensor, ffn=None, progress: str | None = None,
               predictions: list | None = None) -> float:
    """Feed `ids` through the model in CHUNK-token passes (fresh KV cache each); return the perplexity.
    With `predictions`, the argmax token at every position is appended to it."""
    if ffn is not None:
        engine.set_ffn(ffn)
    nll, count = 0.0, 0
    starts = range(0, len(ids) - 1, CHUNK)
    for start in tqdm(starts, desc=progress, disable=progress is None, leave=False):
        seg = ids[start:start + CHUNK + 1]
        if len(seg) < 2:
            break
        if hasattr(engine.ffn, "reset_state"):  # each chunk is a sequence of its own
            engine.ffn.reset_state()
        engine.reset(len(seg))
        logits = engine.forward(seg[:-1], 0)
        nll += F.cross_entropy(logits, seg[1:], reduction="sum").item()
        count += len(seg) - 1
        if predictions is not None:
            predictions.extend(logits.argmax(-1).tolist())
    return math.exp(nll / count)


def evaluate(store_path: str | Path, texts: list[Path] | None = None, tokens: int = 4096, window: int = 4,
             progress: bool = True, modes: list[str] | None = None, density: float | None = None,
             greedy: bool = False) -> dict:
    """Perplexity on held-out text (default: The Devil's Dictionary) and how often dense's top token is kept, for:
    dense; oracle (true active set); predictor (this token's predicted set: the paper's); and predictor+window
    (sparse mode's default: every neuron of the last `window` tokens' predictions, compute="cached").
    `modes`: only these (dense always runs: the others are compared with it). `density`: the predictors moved to
    select that fraction per token (`--density`). `greedy`: also the greedy prefix shared with dense (quality_gate's
    measure) on GATE_PROMPTS prompts cut from the held-out text."""
    from .ffn.sparse import load_sparsity

    store = FlashStore(store_path)
    engine = Engine(store, mode="dram", context=CHUNK + 1)
    text = read_texts(texts) if texts else heldout_text()
    ids = token_ids(engine, text, tokens)
    resident, spec = engine.ffn, load_sparsity(store)
    if density is not None:
        if spec is None:
            raise InaflashError(f"store {store.path} is not calibrated: --density moves a calibration's predictors")
        spec = spec.at_density(density)
    runs = {"dense": resident}
    if spec is not None:
        runs["oracle"] = MaskedDenseFFN(resident, spec, use_predictor=False)
        if spec.predictors:
            runs["predictor"] = MaskedDenseFFN(resident, spec, use_predictor=True)
            if window > 1:
                runs[f"predictor+window{window}"] = MaskedDenseFFN(resident, spec, True, window)
    if modes is not None:
        unknown = set(modes) - set(runs)
        if unknown:
            raise InaflashError(f"unknown or unavailable eval mode(s) {', '.join(sorted(unknown))}; this store has: "
                                f"{', '.join(runs)}")
        runs = {name: ffn for name, ffn in runs.items() if name == "dense" or name in modes}
    results, dense_top = {}, None
    for name, ffn in runs.items():
        top: list[int] = []
        ppl = run_chunks(engine, ids, ffn, progress=f"eval {name}" if progress else None, predictions=top)
        dense_top = top if dense_top is None else dense_top
        results[name] = {
            "perplexity": ppl, "ppl_increase": ppl / results["dense"]["perplexity"] - 1 if results else 0.0,
            "top1_agreement_with_dense": sum(a == b for a, b in zip(top, dense_top)) / len(top),
            "ffn_fraction_computed": ffn.selected / ffn.total if name != "dense" else 1.0,
        }
        if greedy and name != "dense":
            prefixes = greedy_prefixes(engine, resident, ffn, ids, f"greedy {name}" if progress else None)
            results[name].update(greedy_prefix=sum(prefixes) / len(prefixes), greedy_prefixes=prefixes)
    engine.close()
    return {"tokens": tokens, "text": [str(t) for t in texts] if texts else str(DEVIL_DICT), "density": density,
            "modes": results}


# What sparse mode must keep, against dense on the same store, to be chosen by `--mode auto` (issue 14's bounds):
# perplexity within +3%, dense's top token kept at >= 93% of positions, and greedy continuations that share >= 16 of
# their first 32 tokens on average. Measured here: SmolLM2's per-token selections fail them at 50% even with the exact
# active set (oracle: top-1 0.876, greedy 10.0 of 32; bench/results/2026-11-24-selection-smollm2.md).
QUALITY_BOUNDS = {"ppl_increase": 0.03, "top1_agreement": 0.93, "greedy_prefix": 16.0}
GATE_PROMPTS, GATE_PROMPT_TOKENS, GATE_TOKENS = 10, 24, 32


def agreement(a: list[int], b: list[int]) -> int:
    """How many leading tokens two greedy continuations share."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def greedy_prefixes(engine: Engine, resident: ResidentFFN, ffn, ids: torch.Tensor, progress: str | None = None
                    ) -> list[int]:
    """For GATE_PROMPTS prompts of GATE_PROMPT_TOKENS cut evenly from `ids`: how many of the first GATE_TOKENS greedy
    tokens `ffn` shares with dense (`resident`)."""
    from .generate import generate_ids

    step = (len(ids) - GATE_PROMPT_TOKENS) // GATE_PROMPTS
    greedy = []
    for i in tqdm(range(GATE_PROMPTS), desc=progress, disable=progress is None, leave=False):
        prompt = ids[i * step: i * step + GATE_PROMPT_TOKENS].tolist()
        outs = []
        for one in (resident, ffn):
            engine.set_ffn(one)
            if hasattr(one, "reset_state"):
                one.reset_state()
            outs.append(generate_ids(engine, prompt, GATE_TOKENS, temperature=0.0, stop=set())[0])
        greedy.append(agreement(*outs))
    engine.set_ffn(resident)
    return greedy


def quality_gate(engine: Engine, resident: ResidentFFN, spec: Sparsity, val: torch.Tensor, window: int,
                 progress: bool = False, scored: tuple | None = None) -> dict:
    """Sparse mode as it runs by default (predictors, the window's union computed) against dense, on the validation
    slice of the calibration text: perplexity, top-1 agreement, and greedy agreement over GATE_PROMPTS prompts cut
    from it. `ok` when every bound of QUALITY_BOUNDS holds; `failed` names those that do not. `scored`: (dense
    perplexity, dense top tokens, deployed perplexity, deployed top tokens) on `val` already measured."""
    deployed = MaskedDenseFFN(resident, spec, True, window)
    if scored is None:
        dense_top, top = [], []
        dense_ppl = run_chunks(engine, val, resident, predictions=dense_top)
        ppl = run_chunks(engine, val, deployed, predictions=top)
    else:
        dense_ppl, dense_top, ppl, top = scored
    greedy = greedy_prefixes(engine, resident, deployed, val, "quality gate: greedy" if progress else None)
    measured = {"ppl_increase": ppl / dense_ppl - 1,
                "top1_agreement": sum(a == b for a, b in zip(top, dense_top)) / len(top),
                "greedy_prefix": sum(greedy) / len(greedy)}
    failed = [k for k, bound in QUALITY_BOUNDS.items()
              if (measured[k] > bound if k == "ppl_increase" else measured[k] < bound)]
    return {**measured, "greedy_prefixes": greedy, "dense_ppl": dense_ppl, "ppl": ppl, "window": window,
            "fraction_computed": deployed.selected / max(deployed.total, 1), "bounds": QUALITY_BOUNDS,
            "ok": not failed, "failed": ", ".join(f"{k} {measured[k]:.3f}" for k in failed) or None}


def gate_only(store_path: str | Path, progress: bool = True) -> dict:
    """Measure the quality gate of a store's existing calibration (no retraining) and save it into the manifest."""
    from .ffn.sparse import load_sparsity

    store = FlashStore(store_path)
    spec = load_sparsity(store)
    if spec is None or not spec.predictors:
        raise InaflashError(f"store {store.path} has no calibration to gate: run  inaflash calibrate {store.path}")
    info = spec.info
    engine = Engine(store, mode="dram", context=CHUNK + 1)
    tokens, val_tokens = info.get("calibration_tokens", 8192), info.get("validation_tokens", 2048)
    val = token_ids(engine, calibration_text(), tokens + val_tokens)[tokens:]  # the slice calibration left out
    gate = quality_gate(engine, engine.ffn, spec, val, info.get("window", 4), progress)
    engine.close()
    save_sparsity(store, spec.kind, spec.thresholds, spec.predictors, {**_report(info), "quality": gate})
    return gate


# Predictor training passes over the calibration tokens. SmolLM2 layers 3/15/29 on held-out pairs (4096 tokens):
# precision at recall 0.95 was 0.557/0.522/0.541 after 8 passes and 0.543/0.516/0.532 after 4, for half the time;
# 6 keeps SmolLM2's whole calibration within 3 minutes here (issue 14's target). Short calibrations get more passes,
# at least MIN_STEPS optimizer steps (512 tokens: 2 batches a pass; 12 steps left predictors too weak for the tests'
# perplexity bound, 16 did not).
EPOCHS, MIN_STEPS = 6, 16


def default_rank(hidden: int) -> int:
    """hidden/8, at most 64: Qwen2.5-1.5B's rank 192 trained in 12.2 s per layer here (its 28 layers: 5.7 min of a
    16-minute calibration); its stores' predictors, the ones measured in docs/measurements.md, are rank 64."""
    return max(16, min(64, (hidden // 8 + 7) // 8 * 8))


def calibrate(store_path: str | Path, texts: list[Path] | None = None, sparsity: float | None = None,
              max_ppl_increase: float | None = None, rank: int | None = None, tokens: int = 4096,
              val_tokens: int = 1024, recall: float = 0.95, window: int = 4, progress: bool = True) -> dict:
    """`val_tokens`: the validation slice the gate judges on (dense and deployed perplexity, top-1 over ~1000
    positions, greedy prompts cut from it); 2048 spent ~190 of Qwen2.5-1.5B's ~650 s in those two passes."""
    store = FlashStore(store_path)
    cfg = store.config
    if sparsity is not None and not 0 <= sparsity < 1:
        raise InaflashError("--sparsity must be in [0, 1)")
    if max_ppl_increase is not None and max_ppl_increase <= 0:
        raise InaflashError("--max-ppl-increase must be positive, e.g. 3%")
    relu = cfg.hidden_act == "relu"
    seconds, t0 = {}, time.perf_counter()  # per phase, in the report: calibration time is a target (issue 14)
    engine = Engine(store, mode="dram", context=CHUNK + 1)
    if engine.tokenizer is None:
        raise InaflashError(f"store {store.path} has no tokenizer: cannot tokenize calibration text")
    resident = engine.ffn
    all_ids = token_ids(engine, read_texts(texts), tokens + val_tokens)
    fit, val = all_ids[:tokens], all_ids[tokens:]

    seconds["load"], t0 = time.perf_counter() - t0, time.perf_counter()
    xs, hs = recorded_activations(engine, resident, fit, progress="record FFN activations" if progress else None)
    seconds["record"], t0 = time.perf_counter() - t0, time.perf_counter()
    rank = rank or default_rank(cfg.hidden_size)

    def level(h: torch.Tensor, t: float) -> float:
        """The |h| value below which fraction t of h lies (kthvalue: a sort of Qwen2.5's 37M activations per layer
        took seconds)."""
        flat = h.abs().flatten()
        return float(flat.kthvalue(max(1, min(flat.numel(), int(t * flat.numel())))).values) if t > 0 else 0.0

    def thresholds_at(targets: list[float]) -> dict[float, list[float]]:
        """Per-layer |h| thresholds dropping each target fraction, from the recorded activations."""
        out = {t: [] for t in targets}
        for h in hs:
            h = h.float()
            for t in targets:
                out[t].append(level(h, t))
        return out

    def with_predictors(spec: Sparsity, desc: str, target: float | None = None) -> list[dict]:
        """Train each layer's predictor for `spec`'s active sets; returns per-layer metrics (held-out pairs). With
        `target`, each layer's threshold is set first, from the same activation pass."""
        spec.predictors, layers = [], []
        for layer in tqdm(range(cfg.num_layers), desc=desc, disable=not progress, leave=False):
            x, h = xs[layer], hs[layer].float()
            if target is not None:
                spec.thresholds[layer] = level(h, target)
            mask = spec.true_active(layer, h)
            pred, metrics = train_predictor(x, mask, rank, recall_target=recall, epochs=EPOCHS, min_steps=MIN_STEPS)
            # as deployed (store dtype), with its score statistics over all the calibration tokens (the planner's hot
            # neurons and --density come from them; estimated_fraction checks their normal fit against the text)
            pred = Predictor(pred.down.to(store.dtype), pred.up.to(store.dtype), pred.bias, pred.tau).with_statistics(x)
            spec.predictors.append(pred)
            layers.append({"threshold": spec.thresholds[layer], **metrics.__dict__,
                           "estimated_fraction": float(pred.frequencies().mean())})
        return layers

    def deployed_ppl(spec: Sparsity, predictions: list | None = None) -> float:
        """Validation perplexity as sparse mode runs by default: predictor, compute over the window's cache."""
        return run_chunks(engine, val, MaskedDenseFFN(resident, spec, True, window), predictions=predictions)

    dense_top: list[int] = []  # the quality gate reuses the dense pass
    ppl = {"dense": run_chunks(engine, val, resident, progress="dense perplexity" if progress else None,
                               predictions=dense_top)}
    seconds["dense"], t0 = time.perf_counter() - t0, time.perf_counter()
    if relu:
        target, spec = None, Sparsity("relu", [0.0] * cfg.num_layers)
        layers = with_predictors(spec, "train predictors")
    elif max_ppl_increase is not None:
        # binary search over GRID for the largest sparsity whose *deployed* perplexity (predictors trained for
        # that level, window union) stays within the bound; perplexity grows with sparsity
        bound = ppl["dense"] * (1 + max_ppl_increase)
        grid = thresholds_at(GRID)
        lo, hi, best, tried = 0, len(GRID) - 1, None, {}
        while lo <= hi:
            mid = (lo + hi) // 2
            spec = Sparsity("threshold", grid[GRID[mid]])
            layers = with_predictors(spec, f"sparsity {GRID[mid]:.2f}: train predictors")
            tried[GRID[mid]] = deployed_ppl(spec)
            if tried[GRID[mid]] <= bound:
                best, lo = (GRID[mid], spec, layers), mid + 1
            else:
                hi = mid - 1
        if best is None:
            raise InaflashError(f"no sparsity >= {GRID[0]} keeps perplexity within +{max_ppl_increase:.1%} "
                                f"(tried {tried})")
        target, spec, layers = best
        ppl["search"] = {str(k): v for k, v in sorted(tried.items())}
    else:
        target = 0.5 if sparsity is None else sparsity
        spec = Sparsity("threshold", [0.0] * cfg.num_layers)
        layers = with_predictors(spec, "train predictors", target)

    seconds["train"], t0 = time.perf_counter() - t0, time.perf_counter()
    # sparse as deployed only: the oracle's and the predictor's own perplexities (no window) are `inaflash eval`'s,
    # on held-out text (they cost a third of SmolLM2's calibration here)
    deployed_top: list[int] = []
    ppl[f"predictor+window{window}"] = deployed_ppl(spec, deployed_top)
    seconds["evaluate"], t0 = time.perf_counter() - t0, time.perf_counter()
    quality = quality_gate(engine, resident, spec, val, window, progress,
                           scored=(ppl["dense"], dense_top, ppl[f"predictor+window{window}"], deployed_top))
    engine.close()
    seconds["gate"] = time.perf_counter() - t0

    predictors = spec.predictors
    report = {
        "target_sparsity": target, "max_ppl_increase": max_ppl_increase, "window": window, "rank": rank,
        "recall_target": recall, "calibration_tokens": tokens, "validation_tokens": val_tokens, "perplexity": ppl,
        "layers": layers, "predictor_bytes": sum(p.nbytes for p in predictors), "quality": quality,
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
    }
    save_sparsity(store, spec.kind, spec.thresholds, predictors, report)
    return report


def save_sparsity(store: FlashStore, kind: str, thresholds: list[float], predictors: list[Predictor] | None,
                  report: dict) -> None:
    """Write the sparsity file (temp name, then rename) and replace the manifest atomically."""
    from safetensors.torch import save_file

    manifest = read_manifest(store.path)  # as on disk now, its checksum checked
    if predictors:
        tensors = {}
        for i, p in enumerate(predictors):
            tensors.update({f"{i}.down": p.down.contiguous(), f"{i}.up": p.up.contiguous(),
                            f"{i}.bias": p.bias.contiguous()})
            if p.mean is not None:
                tensors.update({f"{i}.mean": p.mean.contiguous(), f"{i}.std": p.std.contiguous()})
        tmp = store.path / f".{SPARSITY_FILE}.tmp"
        save_file(tensors, str(tmp))
        os.replace(tmp, store.path / SPARSITY_FILE)
        manifest["files"][SPARSITY_FILE] = file_entry(store.path / SPARSITY_FILE)
    else:
        manifest["files"].pop(SPARSITY_FILE, None)
    entry = {"kind": kind, "thresholds": thresholds, **report}
    if predictors:
        entry["predictor"] = {"rank": predictors[0].down.shape[0], "tau": [p.tau for p in predictors]}
    manifest["sparsity"] = entry
    store.manifest = write_manifest(store.path, manifest)


def copy_sparsity(src: FlashStore, dst: FlashStore) -> None:
    """Give `dst` (the same weights in another layout) `src`'s calibration."""
    from .ffn.sparse import load_sparsity

    spec = load_sparsity(src)
    if spec is None or src.manifest.get("sparsity") is None:
        raise InaflashError(f"store {src.path} is not calibrated")
    if src.config.to_dict() != dst.config.to_dict():
        raise InaflashError(f"stores {src.path} and {dst.path} hold different models")
    save_sparsity(dst, spec.kind, spec.thresholds, spec.predictors, _report(src.manifest["sparsity"]))


def _report(entry: dict) -> dict:
    """A manifest's sparsity entry less what save_sparsity writes from its own arguments: the calibration report."""
    return {k: v for k, v in entry.items() if k not in ("kind", "thresholds", "predictor")}
