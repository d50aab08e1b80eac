"""Calibration on the real model: thresholds hit the target, predictors reach their recall on held-out pairs,
results land in the store atomically, and sparse mode then reads only what it needs."""

import json
import shutil

import pytest

from inaflash.calibrate import calibrate
from inaflash.engine import Engine
from inaflash.generate import generate_ids
from inaflash.store.format import FlashStore


@pytest.fixture(scope="module")
def calibrated(smollm2_store_f16, tmp_path_factory):
    path = shutil.copytree(smollm2_store_f16, tmp_path_factory.mktemp("cal") / "store")
    report = calibrate(path, sparsity=0.5, tokens=1024, val_tokens=256, rank=32, progress=False)
    return path, report


def test_report_and_store(calibrated):
    path, report = calibrated
    store = FlashStore(path)  # reopens: sizes of every file (the new sparsity file too) match the manifest
    store.verify()
    entry = store.manifest["sparsity"]
    assert entry["kind"] == "threshold" and entry["target_sparsity"] == 0.5
    assert len(entry["thresholds"]) == len(entry["predictor"]["tau"]) == store.config.num_layers
    for layer in report["layers"]:
        assert layer["true_fraction"] == pytest.approx(1 - 0.5, abs=0.05)  # kept active, on held-out pairs
        assert layer["recall"] >= 0.9
        assert layer["predicted_fraction"] >= layer["true_fraction"] * layer["recall"]
        # the score statistics' normal fit, at the calibrated threshold, against what the predictor selected
        assert layer["estimated_fraction"] == pytest.approx(layer["predicted_fraction"], abs=0.1)
    ppl = report["perplexity"]
    assert ppl["dense"] < ppl["predictor+window4"] < ppl["dense"] * 1.5
    assert set(report["seconds"]) == {"load", "record", "dense", "train", "evaluate", "gate"}
    assert not list(path.glob(".*tmp"))  # no temp files left
    # the quality gate: sparse as deployed against dense on the validation slice, its verdict following its numbers
    gate = entry["quality"]
    assert gate["ppl_increase"] == pytest.approx(ppl["predictor+window4"] / ppl["dense"] - 1)
    assert len(gate["greedy_prefixes"]) == 10 and gate["greedy_prefix"] == sum(gate["greedy_prefixes"]) / 10
    holds = (gate["ppl_increase"] <= 0.03 and gate["top1_agreement"] >= 0.93 and gate["greedy_prefix"] >= 16)
    assert gate["ok"] == holds and (gate["failed"] is None) == holds
    print("\n" + json.dumps({k: v for k, v in report.items() if k != "layers"}))


def test_evaluate_compares_each_selection_with_dense(calibrated, tmp_path):
    """`inaflash eval`: dense, the oracle (true active sets), the predictor, and the predictor over the window, on
    text of its own; each against dense's perplexity and top tokens, with the fraction of the FFN it computed."""
    import pydoc_data.topics

    from inaflash.calibrate import evaluate

    path, _ = calibrated
    text = tmp_path / "heldout.txt"
    text.write_text("\n".join(list(pydoc_data.topics.topics.values())[-40:]))  # not calibration's first tokens
    modes = evaluate(path, [text], tokens=512, window=4, progress=False)["modes"]
    assert list(modes) == ["dense", "oracle", "predictor", "predictor+window4"]
    dense = modes["dense"]
    assert dense["ppl_increase"] == 0 and dense["top1_agreement_with_dense"] == 1 and dense["ffn_fraction_computed"] == 1
    for name in ("oracle", "predictor", "predictor+window4"):
        m = modes[name]
        assert m["ppl_increase"] == pytest.approx(m["perplexity"] / dense["perplexity"] - 1)
        assert 0 < m["top1_agreement_with_dense"] < 1 and 0 < m["ffn_fraction_computed"] < 1
    assert 0.3 < modes["oracle"]["ffn_fraction_computed"] < 0.7  # thresholds set for half of the neurons
    # the window computes the union of the last tokens' predictions: never fewer neurons, never further from dense
    assert modes["predictor+window4"]["ffn_fraction_computed"] > modes["predictor"]["ffn_fraction_computed"]
    assert modes["predictor+window4"]["perplexity"] < modes["predictor"]["perplexity"]


def test_evaluate_at_a_density_computes_that_fraction_and_scores_greedy_text(calibrated, tmp_path):
    import pydoc_data.topics

    from inaflash.calibrate import evaluate

    path, _ = calibrated
    text = tmp_path / "heldout.txt"
    text.write_text("\n".join(list(pydoc_data.topics.topics.values())[-40:]))
    out = evaluate(path, [text], tokens=256, window=4, progress=False, modes=["predictor"], density=0.3, greedy=True)
    m = out["modes"]["predictor"]
    assert out["density"] == 0.3 and m["ffn_fraction_computed"] == pytest.approx(0.3, abs=0.1)
    assert len(m["greedy_prefixes"]) == 10 and all(0 <= g <= 32 for g in m["greedy_prefixes"])
    assert m["greedy_prefix"] == sum(m["greedy_prefixes"]) / 10 and m["greedy_prefix"] < 32  # 30%: not dense


def test_hot_neurons_cut_the_reads_of_a_tight_budget_and_the_planner_expects_what_is_read(calibrated):
    """At a budget whose caches hold a third of a token's selection (density 0.5), reads of single neurons (no
    coalescing): the planner pins each layer's hottest neurons (never read again) and the engine reads fewer bytes per
    token than with the window cache alone. With the reader's merged reads, half the neurons selected cover most of
    the layer whatever is pinned (a pin saves a read only where no merged read spans it): never more bytes than the
    window alone. The planner's expected bytes are within 2x of what is read, both ways."""
    path, _ = calibrated
    store = FlashStore(path)
    prompt = [1, 504, 3458, 282, 2593, 30, 253, 1345]
    n, layers = store.config.intermediate_size, store.config.num_layers
    per_layer = n // 6
    with Engine(store, mode="sparse", density=0.5, context=64, memory=10**12) as unlimited:
        fixed = unlimited.plan.planned_bytes - unlimited.plan.cache_bytes
    budget = fixed + layers * per_layer * store.row_bytes
    for gap in (-1, 48 << 10):
        read, pinned = {}, 0
        for hot in (False, True):
            with Engine(store, mode="sparse", density=0.5, context=64, memory=budget, hot_neurons=hot,
                        max_gap=gap, speculation="off") as engine:  # reads of one token a pass
                assert engine.plan.cache_capacity == per_layer
                _, stats = generate_ids(engine, prompt, 12, temperature=0.0, stop=set())
                read[hot] = stats.bytes_read_per_token
                if hot:
                    pinned = sum(len(p) for p in engine.plan.pinned) / layers
                    expected = engine.plan.predicted_read_bundles * store.bundle_bytes
        print(f"\ngap {gap}: bytes read per token, window only {read[False] / 1e6:.2f} MB, hot neurons "
              f"{read[True] / 1e6:.2f} MB (expected {expected / 1e6:.2f}; {pinned:.0f} of {per_layer} pinned per layer)")
        assert 0.5 < read[True] / expected < 2
        if gap < 0:
            assert pinned > 0.5 * per_layer and read[True] < 0.9 * read[False]
        else:
            assert read[True] < 1.05 * read[False] and read[True] > 0.75 * store.ffn_read_bytes


def test_sparse_mode_reads_a_fraction_of_naive(calibrated):
    path, _ = calibrated
    store = FlashStore(path)
    prompt = [1, 504, 3458, 282, 2593, 30, 253, 1345]
    with Engine(store, mode="sparse", window=4, context=64, speculation="off") as engine:  # one token a pass
        _, stats = generate_ids(engine, prompt, 16, temperature=0.0, stop=set())
    print(f"\nsparse (predictor, window 4): {stats.bytes_read_per_token / store.ffn_read_bytes:.1%} of naive's bytes "
          f"per token, cache hit rate {stats.cache_hit_rate:.2f}")
    assert stats.bytes_read_per_token < 0.5 * store.ffn_read_bytes
    assert stats.neurons_read_per_token < store.config.num_layers * store.config.intermediate_size
    assert stats.predictor_ms_per_token > 0


def test_max_ppl_increase_picks_the_largest_level_within_the_bound(smollm2_store_f16, tmp_path):
    from inaflash.calibrate import GRID

    path = shutil.copytree(smollm2_store_f16, tmp_path / "store")
    report = calibrate(path, max_ppl_increase=0.05, tokens=512, val_tokens=256, rank=16, progress=False)
    ppl, target = report["perplexity"], report["target_sparsity"]
    bound = ppl["dense"] * 1.05
    tried = {float(k): v for k, v in ppl["search"].items()}
    # the search scores sparse mode as it runs (predictors trained for each level, window-4 cache)
    assert tried[target] <= bound and ppl["predictor+window4"] == pytest.approx(tried[target])
    above = [level for level in GRID if level > target]
    if above:  # the binary search tried the next level up and it broke the bound
        assert tried[above[0]] > bound
    assert all(layer["true_fraction"] == pytest.approx(1 - target, abs=0.05) for layer in report["layers"])


RSS_PROBE = """
import json, sys
from inaflash.generate import generate_ids
from inaflash.loader import load
from inaflash.store.format import FlashStore

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))

FlashStore(sys.argv[1]).tokenizer()  # the runtime (torch, transformers, the tokenizer) is outside the budget
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak (VmHWM) to the current RSS: loading the tokenizer peaks higher than it stays
base = status("VmRSS")
with load(sys.argv[1], mode="sparse", memory=int(sys.argv[2]), context=64) as model:
    engine = model.engine
    _, stats = generate_ids(engine, [1, 504, 3458, 282, 2593, 30, 253, 1345], 24, temperature=0.0, stop=set())
    print(json.dumps({"growth": status("VmHWM") - base, "planned": engine.plan.planned_bytes,
                      "cache": engine.ffn.cache_bytes, "capacity": engine.plan.cache_capacity}))
"""


def test_process_memory_growth_stays_within_the_budget(calibrated):
    """The planner's accounting holds in a real process: from before the engine exists to the end of a
    generation, peak RSS grows by no more than the budget (plus 16 MiB of activations and scratch)."""
    import subprocess
    import sys

    from inaflash.planner import active_neurons_per_token, plan_memory
    from inaflash.ffn.sparse import load_sparsity

    path, _ = calibrated
    store = FlashStore(path)
    spec = load_sparsity(store)
    free = plan_memory(store, None, 64, spec.predictor_bytes, 4, active_neurons_per_token(store, spec))
    n = store.config.intermediate_size
    capacity = max(active_neurons_per_token(store, spec), int(0.95 * n))
    budget = free.planned_bytes - free.cache_bytes + store.config.num_layers * capacity * store.row_bytes
    out = subprocess.run([sys.executable, "-c", RSS_PROBE, str(path), str(budget)], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    m = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"\nbudget {budget / 1e6:.1f} MB, planned {m['planned'] / 1e6:.1f} MB, "
          f"peak RSS growth {m['growth'] / 1e6:.1f} MB")
    assert m["planned"] <= budget and m["capacity"] < n  # the budget binds
    assert m["growth"] <= budget + (16 << 20)
    assert m["growth"] >= m["cache"]  # the caches are really in memory


def test_sparse_mode_calibrates_a_store_on_first_use_and_keeps_it(smollm2_store_f16, tmp_path, monkeypatch):
    """`load(..., mode="sparse")` (run/serve/chat --mode sparse) on a store without a calibration calibrates it (here
    with fewer tokens, to keep the test short), saves it in the store, and runs sparse; the next load reuses it."""
    import inaflash.calibrate as cal
    from inaflash import load

    path = shutil.copytree(smollm2_store_f16, tmp_path / "store")
    assert FlashStore(path).manifest.get("sparsity") is None
    calls, real = [], cal.calibrate
    monkeypatch.setattr(cal, "calibrate", lambda p, **kw: calls.append(p) or real(
        p, **{**kw, "tokens": 512, "val_tokens": 128, "rank": 16}))
    model = load(path, mode="sparse", context=64)
    try:
        assert calls == [path] and model.engine.mode == "sparse"
        assert FlashStore(path).manifest["sparsity"]["calibration_tokens"] == 512
        assert len(model.generate("The capital of France is", max_tokens=4).token_ids) > 0
        assert model.engine.counters().sparse.neurons_needed > 0
    finally:
        model.engine.close()
    load(path, mode="sparse", context=64).engine.close()
    assert len(calls) == 1  # kept in the store
