"""`--mode auto` (one --memory knob) and the quality gate it trusts: the mode chosen follows the budget and the
store's calibration verdict, its output is the chosen mode's, and the gate's verdict follows its measurements."""

import shutil

import pytest
import torch

from inaflash.calibrate import QUALITY_BOUNDS, quality_gate, save_sparsity
from inaflash.engine import Engine
from inaflash.errors import InaflashError
from inaflash.planner import dram_bytes, streaming_bytes
from inaflash.ffn.predictor import Predictor
from inaflash.ffn.sparse import load_sparsity
from inaflash.store.format import FlashStore
from inaflash.store.sources import open_source
from inaflash.store.convert import write_store
from test_sparse import logits_run
from tiny import make_tiny

LAYERS = 6


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny Llama deep enough that streaming (two layer buffers + resident layers) needs less than the model."""
    root = tmp_path_factory.mktemp("llama")
    make_tiny("llama", root / "hf", num_hidden_layers=LAYERS, max_position_embeddings=512)
    return FlashStore(write_store(open_source(root / "hf"), root / "store", dtype="float32", progress=False))


def predictors(store, tau: float):
    """Constant predictors: every neuron selected (tau < 0) or none (tau > 0)."""
    c = store.config
    return [Predictor(torch.zeros(4, c.hidden_size), torch.zeros(c.intermediate_size, 4),
                      torch.zeros(c.intermediate_size), tau) for _ in range(c.num_layers)]


def calibrated(store, tmp_path, quality: dict | None, tau: float = -1.0) -> FlashStore:
    path = shutil.copytree(store.path, tmp_path / "cal")
    report = {"layers": [{"predicted_fraction": 1.0}] * store.config.num_layers, "window": 4}
    if quality is not None:
        report["quality"] = quality
    save_sparsity(FlashStore(path), "threshold", [0.0] * store.config.num_layers, predictors(store, tau), report)
    return FlashStore(path)


def streaming_budget(store, context: int, layers: int) -> int:
    """A budget that holds what streaming needs for `context` tokens and `layers` layers' FFN."""
    return streaming_bytes(store, context) + layers * max(e.nbytes for e in store.layers)


def test_auto_runs_dram_when_the_model_fits(llama):
    with Engine(llama, mode="auto", memory=dram_bytes(llama, 32), context=32) as e:
        assert e.mode == "dram" and "fits" in e.choice.reason


def test_auto_without_calibration_streams_and_matches_dense(llama):
    budget = streaming_budget(llama, 32, layers=1)
    with Engine(llama, mode="dram") as dense:
        ref = logits_run(dense)
    with Engine(llama, mode="auto", memory=budget, context=32) as e:
        assert e.mode == "hybrid" and "not calibrated" in e.choice.reason
        assert f"1 of {LAYERS} layers" in e.choice.reason
        got = logits_run(e)
        from inaflash.generate import generate_ids

        stats = generate_ids(e, [3, 4, 5], 2, stop=set())[1]
        assert 0 < stats.runtime_rss_bytes <= stats.peak_rss_bytes  # what the plan does not cover is reported
    for a, b in zip(got, ref):
        assert (a - b).abs().max().item() < 1e-4


@pytest.mark.parametrize("quality,mode,says", [
    (None, "hybrid", "no quality gate"),
    ({"ok": False, "failed": "top1_agreement 0.812"}, "hybrid", "failed the quality gate (top1_agreement 0.812)"),
    ({"ok": True, "failed": None, "fraction_computed": 0.3}, "sparse", "passed the quality gate, computes 30%"),
    # passed, but computing (so reading, at worst) more than hybrid streams: hybrid, exact and no slower
    ({"ok": True, "failed": None, "fraction_computed": 0.98}, "hybrid", "computes 98% of the FFN per token"),
    ({"ok": True, "failed": None}, "hybrid", "computes 100% of the FFN per token"),  # an older gate: assumed all
])
def test_auto_runs_sparse_only_where_the_gate_passed(llama, tmp_path, quality, mode, says):
    store = calibrated(llama, tmp_path, quality)
    budget = streaming_budget(store, 32, layers=1)
    with Engine(store, mode="auto", memory=budget, context=32) as e:
        assert e.mode == mode and says in e.choice.reason
        if mode == "sparse":
            assert e.plan.planned_bytes <= budget


def test_auto_refuses_a_budget_that_cannot_even_stream(llama):
    """The refusal names the minimum of the smallest mode (it said "too small for hybrid mode", the mode auto would
    not even need)."""
    least = streaming_budget(llama, 32, 0)
    with pytest.raises(InaflashError, match=rf"too small for this model in any mode: the smallest plan \(naive: "
                                            rf"every layer's FFN streamed\) needs at least {least / 1e6:.1f} MB"):
        Engine(llama, mode="auto", memory=least - 1, context=32)
    with Engine(llama, mode="auto", memory=least, context=32) as e:
        assert e.mode == "naive"


def test_quality_gate_passes_a_selection_of_everything_and_names_what_fails(llama, tmp_path):
    ids = torch.randint(0, llama.config.vocab_size, (300,), generator=torch.Generator().manual_seed(0))
    everything = load_sparsity(calibrated(llama, tmp_path / "a", None, tau=-1.0))
    nothing = load_sparsity(calibrated(llama, tmp_path / "b", None, tau=1.0))
    with Engine(llama, mode="dram", context=257) as engine:
        same = quality_gate(engine, engine.ffn, everything, ids, window=4)
        off = quality_gate(engine, engine.ffn, nothing, ids, window=4)
    # every neuron selected: the deployed FFN is dense's, bit for bit
    assert same["ok"] and same["failed"] is None
    assert same["ppl_increase"] == 0.0 and same["top1_agreement"] == 1.0 and same["greedy_prefix"] == 32
    # no neuron: the FFN is gone; the verdict lists exactly the bounds its own measurements break
    assert off["ppl_increase"] != 0.0
    broken = [k for k, b in QUALITY_BOUNDS.items() if (off[k] > b if k == "ppl_increase" else off[k] < b)]
    assert broken and not off["ok"]
    assert off["failed"] == ", ".join(f"{k} {off[k]:.3f}" for k in broken)


def test_auto_plans_a_shorter_context_where_the_default_does_not_fit(llama):
    budget = streaming_budget(llama, 300, 0)  # room for the KV cache of 300 tokens, not of the default 512
    with pytest.raises(InaflashError, match="too small for this model in any mode"):
        Engine(llama, mode="auto", memory=budget, context=512)  # a context asked for is kept, or refused
    with Engine(llama, mode="auto", memory=budget) as e:
        assert e.mode == "naive" and e.context == 300 and "KV cache planned for 300 tokens" in e.choice.reason
        e.reset(300)
        with pytest.raises(InaflashError, match="exceed the planned context of 300"):
            e.reset(301)
