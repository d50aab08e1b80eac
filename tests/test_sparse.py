"""Sparse mode: the neuron cache's invariants, exact outputs against dense references, reads against the plan."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from inaflash.ffn.cache import NeuronCache
from inaflash.ffn.dense import RecordingFFN
from inaflash.calibrate import MaskedDenseFFN, save_sparsity
from inaflash.engine import Engine
from inaflash.errors import InaflashError
from inaflash.planner import parse_memory, plan_memory
from inaflash.reader import BundleReader, FlashReader
from inaflash.store.sources import open_source
from inaflash.store.format import FlashStore
from inaflash.store.convert import write_store
from tiny import make_tiny

PROMPT = [3, 17, 42, 5, 88, 9, 61]


def tiny_store(kind, root):
    make_tiny(kind, root / "hf")
    return FlashStore(write_store(open_source(root / "hf"), root / "store", dtype="float32", progress=False))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return tiny_store("llama", tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def opt(tmp_path_factory):
    return tiny_store("opt", tmp_path_factory.mktemp("opt"))


@pytest.fixture(scope="module")
def layer0_bundles(llama):
    with FlashReader(llama.ffn_path) as r:
        return BundleReader(llama, r).read(0, torch.arange(llama.config.intermediate_size))


def requantized(store, bundles):
    """What the int8 cache holds for float bundle rows [m, 3d]: quant.py's int8 bundles (a scale per 64), decoded."""
    from inaflash.store import quant

    raw = quant.encode("int8", bundles.float(), store.fields)[0]
    return quant.decode("int8", raw, store.fields, store.bundle_width, torch.float32)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(window=st.integers(0, 4), int8=st.booleans(),
       steps=st.lists(st.sets(st.integers(0, 159), max_size=40), min_size=1, max_size=12))
def test_cache_holds_exactly_the_window(llama, layer0_bundles, window, int8, steps):
    capacity = 160  # room for any window: the cache must then hold exactly the union of the last `window` steps
    cache = NeuronCache(llama, capacity, window, "int8" if int8 else "store")
    stored = requantized(llama, layer0_bundles) if int8 else layer0_bundles
    rows_ptr = cache.rows.data_ptr()
    history = []
    for step, active in enumerate(steps, start=1):
        needed = torch.tensor(sorted(active), dtype=torch.long)
        before = set(cache.live_neurons().tolist())
        read = cache.update(needed, step, lambda ids: layer0_bundles[ids])
        history.append(active)
        expected = set().union(*history[-window:]) | active if window else set(active)
        live = cache.live_neurons().tolist()
        assert set(live) == expected and len(live) == len(expected)
        # only neurons not already cached are read; window 0 means no reuse at all
        assert read == (len(active - before) if window else len(active))
        assert cache.n <= capacity
        for slot, neuron in enumerate(live):
            assert torch.equal(cache.bundle(slot), stored[neuron])
            assert cache.slot_of_neuron[neuron] == slot
        assert cache.rows.data_ptr() == rows_ptr  # never reallocated


def test_cache_evicts_least_recently_used_when_full(llama, layer0_bundles):
    cache = NeuronCache(llama, capacity=4, window=10)
    for step, ids in enumerate([[0, 1], [2, 3], [4, 5]], start=1):
        cache.update(torch.tensor(ids), step, lambda i: layer0_bundles[i])
    assert sorted(cache.live_neurons().tolist()) == [2, 3, 4, 5]
    with pytest.raises(RuntimeError, match="overflow"):
        cache.append_bundles(torch.tensor([7, 8, 9]), layer0_bundles[[7, 8, 9]], 4)


def logits_run(engine, steps=6):
    engine.reset(len(PROMPT) + steps + 1)
    out = [engine.forward(torch.tensor(PROMPT), 0)]
    for i in range(steps):
        out.append(engine.forward(torch.tensor([int(out[-1][-1].argmax())]), len(PROMPT) + i))
    return out


@pytest.mark.parametrize("window,memory", [(0, None), (1, None), (4, None), (4, "bind")])
def test_relu_oracle_sparse_equals_dense(opt, window, memory):
    if memory == "bind":  # a budget whose caches hold 100 of 160 neurons per layer: LRU evictions, streaming
        free = plan_memory(opt, None, context=32, predictor_bytes=0, window=window, active_neurons=80)
        memory = free.planned_bytes - free.cache_bytes + 2 * 100 * opt.row_bytes
    with Engine(opt, mode="dram") as dense:
        ref = logits_run(dense)
    with Engine(opt, mode="sparse", use_predictor=False, window=window, memory=memory, context=32) as sparse:
        got = logits_run(sparse)
        assert sparse.ffn.counters.neurons_read > 0
    for a, b in zip(got, ref):
        assert (a - b).abs().max().item() < 1e-4


def test_a_swapped_ffn_serves_across_resets_and_the_engine_still_counts_its_own(opt):
    """set_ffn after reset() takes effect (it once did not: the model kept its old provider), a smaller reset keeps
    it, and counters() still counts the engine's sparse provider under the wrapper."""
    with Engine(opt, mode="sparse", use_predictor=False, context=32) as e:
        e.reset(16)
        seen = []
        e.set_ffn(RecordingFFN(e.ffn, lambda layer, x, out: seen.append((layer, x.shape[0]))))
        e.reset(8)
        before = e.counters()
        e.forward(torch.tensor(PROMPT), 0)
        done = e.counters() - before
    assert seen == [(layer, len(PROMPT)) for layer in range(opt.config.num_layers)]
    assert done.sparse.neurons_needed > 0 and done.sparse.neurons_read > 0 and done.io.bytes > 0


@pytest.fixture
def thresholded_llama(llama, tmp_path):
    """The tiny Llama with thresholds dropping about half of each layer's neurons on PROMPT."""
    import shutil

    store = FlashStore(shutil.copytree(llama.path, tmp_path / "s"))
    with Engine(store, mode="dram") as dense:
        xs = []
        dense.set_ffn(RecordingFFN(dense.ffn, lambda layer, x, out: xs.append(x.clone())))
        logits_run(dense, steps=0)
        th = [float(dense.ffn.hidden(i, x).abs().median())
              for i, x in enumerate(xs)]
    save_sparsity(store, "threshold", th, None, {})
    return FlashStore(store.path)


def test_threshold_sparse_equals_dense_restricted_to_active(thresholded_llama):
    store = thresholded_llama
    with Engine(store, mode="dram") as masked:
        from inaflash.ffn.sparse import load_sparsity

        spec = load_sparsity(store)
        masked.set_ffn(MaskedDenseFFN(masked.ffn, spec, use_predictor=False))
        ref = logits_run(masked)
    with Engine(store, mode="dram") as dense:
        full = logits_run(dense)
    with Engine(store, mode="sparse", use_predictor=False, window=2, context=32, compute="active") as sparse:
        got = logits_run(sparse)
        frac = sparse.ffn.counters.neurons_needed / (7 * 3 * store.config.intermediate_size)
    assert 0.2 < frac < 0.8  # the thresholds really drop neurons
    assert max((a - b).abs().max().item() for a, b in zip(got, ref)) < 1e-4
    assert max((a - b).abs().max().item() for a, b in zip(got, full)) > 1e-3  # and that changes the output


def test_cached_compute_is_dense_restricted_to_the_cache(thresholded_llama):
    """compute="cached": each step's FFN output is the dense FFN over exactly the neurons the cache then holds."""
    store = thresholded_llama
    with Engine(store, mode="dram") as dense, \
            Engine(store, mode="sparse", use_predictor=False, window=3, context=32, compute="cached") as sparse:
        ffn, ref = sparse.ffn, dense.ffn
        checked, beyond_active = [], 0

        def check(layer, x, out):
            nonlocal beyond_active
            mask = torch.zeros(store.config.intermediate_size, dtype=torch.bool)
            mask[ffn.caches[layer].live_neurons()] = True
            h = ref.hidden(layer, x)
            expected = ref(layer, x, mask.expand(x.shape[0], -1))
            checked.append((out - expected).abs().max().item())
            beyond_active += int((mask & ~ffn.sparsity.true_active(layer, h).any(0)).sum())

        sparse.set_ffn(RecordingFFN(ffn, check))
        logits_run(sparse)
    assert len(checked) == 7 * store.config.num_layers and max(checked) < 1e-5
    assert beyond_active > 0  # the window really adds neurons beyond this token's active set


@pytest.mark.parametrize("quantized_activations,bound", [(False, 1e-5), (True, 0.02)])
def test_int8_cache_computes_its_requantized_neurons(thresholded_llama, monkeypatch, quantized_activations, bound):
    """cache_format="int8": each step's FFN output is the dense FFN over the cached neurons, with the weights the
    cache holds (int8 bundles, a scale per 64 weights); the planner counts their bytes per neuron. With float
    activations to float32 rounding; with the kernel's int8 activations (per 32, the default) within 2%."""
    from inaflash.ffn import kernels
    from inaflash.store import quant
    from inaflash.ffn.dense import FFNMath, compute_layout

    if quantized_activations and not kernels.available():
        pytest.skip("the native kernel is not built")
    monkeypatch.setattr(kernels, "QUANTIZED_ACTIVATIONS", quantized_activations)
    store = thresholded_llama
    with Engine(store, mode="sparse", use_predictor=False, window=3, context=32, cache_format="int8") as sparse:
        ffn, math, errors = sparse.ffn, FFNMath(store), []
        with FlashReader(store.ffn_path) as r:
            n = store.config.intermediate_size
            weights = [compute_layout(store, requantized(store, BundleReader(store, r).read(i, torch.arange(n))))
                       for i in range(store.config.num_layers)]

        def check(layer, x, out):
            w = weights[layer]
            mask = torch.zeros(n, dtype=torch.bool)
            mask[ffn.caches[layer].live_neurons()] = True
            expected = math.output(math.hidden(x, w) * mask, w)
            errors.append(((out - expected).norm() / expected.norm()).item())

        sparse.set_ffn(RecordingFFN(ffn, check))
        logits_run(sparse)
        int8_bytes = quant.bundle_bytes("int8", store.bundle_width, store.fields)
        assert ffn.caches[0].nbytes == ffn.caches[0].capacity * int8_bytes < ffn.caches[0].capacity * store.bundle_bytes / 3
    assert len(errors) == 7 * store.config.num_layers and max(errors) < bound


@given(st.lists(st.lists(st.booleans(), min_size=5, max_size=5), min_size=1, max_size=9), st.integers(0, 5))
def test_window_union_is_the_or_of_the_last_k_rows(rows, window):
    from inaflash.ffn.sparse import window_union

    mask = torch.tensor(rows)
    got = window_union(mask, window)
    for t in range(len(rows)):
        expected = mask[max(0, t - max(window, 1) + 1): t + 1].any(0)
        assert torch.equal(got[t], expected)


def test_reads_are_exactly_the_planned_spans_of_missing_neurons(opt):
    with Engine(opt, mode="sparse", use_predictor=False, window=3, context=32) as engine:
        planned, cached_before = [], []
        real_start = engine.ffn.bundles.start  # every read goes through start (read() too)

        def recording_start(layer, ids, plans=None):
            cache = engine.ffn.caches[layer]
            cached_before.append(bool((cache.slot_of_neuron[ids] >= 0).any()))
            planned.append(engine.ffn.bundles.planned_bytes(layer, ids))
            return real_start(layer, ids, plans)

        engine.ffn.bundles.start = recording_start
        logits_run(engine)
        assert engine.reader.stats.bytes == sum(planned) > 0
        assert not any(cached_before)  # never a neuron the cache already holds


@pytest.mark.parametrize("kind", ["llama", "opt"])
def test_unbundled_layout_reads_the_same_bundles_in_more_requests(kind, tmp_path):
    """--no-bundling: the same rows come back (and the same logits), but each neuron costs one read per field."""
    make_tiny(kind, tmp_path / "hf")
    stores = {layout: FlashStore(write_store(open_source(tmp_path / "hf"), tmp_path / layout, dtype="float32",
                                             progress=False, layout=layout))
              for layout in ("bundled", "unbundled")}
    ids = torch.tensor([0, 1, 2, 7, 40, 41, 90, 150, 159])
    got, requests = {}, {}
    for layout, store in stores.items():
        with FlashReader(store.ffn_path) as r:
            got[layout] = BundleReader(store, r, max_gap=0).read(1, ids)
            requests[layout] = r.stats.requests
    assert torch.equal(got["bundled"], got["unbundled"])
    assert requests["unbundled"] > requests["bundled"]
    logits = {}
    for layout, store in stores.items():
        with Engine(store, mode="naive") as engine:
            logits[layout] = logits_run(engine, steps=3)
    # (float32 sums may round differently: the unbundled views are contiguous, the bundled ones strided)
    assert max((a - b).abs().max().item() for a, b in zip(logits["bundled"], logits["unbundled"])) < 1e-5


def test_window_cuts_bytes_read_per_token(opt):
    # one token a pass: prompt lookup's draft lengths follow measured pass times, and a wide pass reads the union of
    # its tokens' neurons, so with it on the bytes per token moved between runs (window 4 read 0.51-0.84x of 0)
    per_token = {}
    for window in (0, 4):
        with Engine(opt, mode="sparse", use_predictor=False, window=window, context=64,
                    speculation="off") as engine:
            from inaflash.generate import generate_ids

            _, stats = generate_ids(engine, PROMPT, 24, temperature=0.0, stop=set())
            per_token[window] = stats.bytes_read_per_token
    assert per_token[4] < 0.8 * per_token[0]


def test_planner_refuses_a_budget_below_the_minimum(opt):
    with pytest.raises(InaflashError, match=r"too small: this model needs at least [0-9.]+ MB"):
        Engine(opt, mode="sparse", use_predictor=False, memory="10KB", context=32)


def test_planner_stays_within_budget(opt):
    unlimited = plan_memory(opt, None, context=32, predictor_bytes=0, window=4, active_neurons=80)
    budget = unlimited.planned_bytes - unlimited.cache_bytes + 2 * 100 * opt.row_bytes + 1000  # 100 per layer
    plan = plan_memory(opt, budget, context=32, predictor_bytes=0, window=4, active_neurons=80)
    assert plan.cache_capacity == 100 and plan.window == 1  # a window of 4 does not fit: it adapts down
    assert plan.planned_bytes <= budget
    assert plan.cache_capacity < opt.config.intermediate_size  # the budget really binds
    with Engine(opt, mode="sparse", use_predictor=False, memory=budget, context=32) as engine:
        assert engine.ffn.cache_bytes == plan.cache_bytes
        assert engine.plan.planned_bytes <= budget


@pytest.mark.parametrize("spec,expected", [("300MiB", 300 << 20), ("4GB", 4_000_000_000), ("1234", 1234)])
def test_parse_memory(opt, spec, expected):
    assert parse_memory(spec, opt) == expected


def test_parse_memory_rejects_nonsense(opt):
    with pytest.raises(InaflashError, match="cannot read memory budget 'lots'"):
        parse_memory("lots", opt)


@pytest.fixture(scope="module")
def predicted_llama(llama, tmp_path_factory):
    """The tiny Llama with median thresholds and low-rank predictors (with their score statistics) trained on
    the FFN inputs of a few random prompts."""
    import shutil

    from inaflash.ffn.predictor import train_predictor

    store = FlashStore(shutil.copytree(llama.path, tmp_path_factory.mktemp("pred") / "s"))
    g = torch.Generator().manual_seed(1)
    xs = [[] for _ in range(store.config.num_layers)]
    with Engine(store, mode="dram", context=64) as dense:
        dense.set_ffn(RecordingFFN(dense.ffn, lambda layer, x, out: xs[layer].append(x.clone())))
        for _ in range(8):
            dense.reset(48)
            dense.forward(torch.randint(0, store.config.vocab_size, (48,), generator=g), 0)
    with Engine(store, mode="dram") as dense:
        th, preds = [], []
        for layer, parts in enumerate(xs):
            x = torch.cat(parts)
            h = dense.ffn.hidden(layer, x)
            th.append(float(h.abs().median()))
            pred, _ = train_predictor(x, h.abs() > th[-1], rank=8, epochs=20)
            preds.append(pred.with_statistics(x))
    save_sparsity(store, "threshold", th, preds, {})
    return FlashStore(store.path), [torch.cat(parts) for parts in xs]


def test_score_statistics_are_the_scores_mean_and_deviation(predicted_llama):
    from inaflash.ffn.sparse import load_sparsity

    store, xs = predicted_llama
    for p, x in zip(load_sparsity(store).predictors, xs):  # as saved and loaded
        s = p.scores(x)
        assert torch.allclose(p.mean, s.mean(0), atol=1e-4) and torch.allclose(p.std, s.std(0, unbiased=False),
                                                                                atol=1e-4)


@pytest.mark.parametrize("density", [0.2, 0.5, 0.8])
def test_density_moves_the_predictors_to_select_that_fraction(predicted_llama, density):
    """On the text the statistics came from, the moved thresholds select about `density` of each layer's neurons
    (the normal fit of each neuron's scores is an estimate: within 0.1)."""
    from inaflash.ffn.sparse import load_sparsity

    store, xs = predicted_llama
    spec = load_sparsity(store).at_density(density)
    assert spec.density == density
    for p, x in zip(spec.predictors, xs):
        assert float(p(x).float().mean()) == pytest.approx(density, abs=0.1)


def test_density_needs_score_statistics(thresholded_llama):
    from inaflash.ffn.sparse import Sparsity
    from inaflash.ffn.predictor import Predictor

    spec = Sparsity("threshold", [0.0], [Predictor(torch.zeros(2, 64), torch.zeros(160, 2), torch.zeros(160), 0.0)])
    with pytest.raises(InaflashError, match="--density needs a calibration with score statistics"):
        spec.at_density(0.5)


def test_hot_split_pins_all_when_the_window_cannot_hold_a_token_and_few_when_it_can():
    from inaflash.planner import SPLIT_MARGIN, hot_split

    f = torch.linspace(0.9, 0.1, 100)  # a token selects 50 of 100 on average
    h, reads = hot_split(f, capacity=40, window=4)
    assert h == 40 and reads == pytest.approx(float(f[40:].sum()))  # the 40 hottest held, the rest read every time
    # room for every window: neurons on half of the time are worth pinning, rare ones are left to the window (a pin
    # is computed every token, compute="cached"); where computing is free (compute="active") every slot is pinned: a
    # pinned rare neuron is a sure hit, a window slot a hit 6% of the time
    f = torch.cat([torch.full((10,), 0.5), torch.full((90,), 0.02)])
    assert hot_split(f, capacity=60, window=4, steps=60)[0] == 10
    # neurons on nearly always are hits in the window too: pinning them saves less than the margin, so none are
    assert hot_split(torch.cat([torch.full((10,), 0.95), torch.full((90,), 0.02)]), 60, 4, steps=60)[0] == 0
    h, reads = hot_split(f, capacity=60, window=4, compute_cost=0.0, steps=60)
    assert h >= 57 and reads == pytest.approx(40 * 0.02, rel=SPLIT_MARGIN)  # all but what saves < the margin


def test_coalesced_reads_count_the_bundles_a_merged_read_covers():
    from inaflash.planner import coalesced_reads, hot_split

    miss = torch.tensor([1.0, 0, 0, 1])
    approx = lambda v: pytest.approx(v, abs=1e-6)
    reads = lambda m, gap: float(coalesced_reads(m, gap))
    assert reads(miss, gap=0) == 2 and reads(miss, gap=2) == approx(2)  # gap/2 = 1 a side: apart
    assert reads(miss, gap=4) == approx(4)  # the two between are read with them
    assert reads(torch.zeros(9), gap=8) == 0 and reads(torch.ones(9), gap=8) == approx(9)
    # about half of the neurons selected, the hot ones scattered over the file: read one by one, pinning every slot
    # saves their reads; with reads merging over 16 bundles, >90% of the layer is read whatever is pinned
    f = 0.4 + 0.2 * torch.rand(200, generator=torch.Generator().manual_seed(0))
    h, reads = hot_split(f, capacity=60, window=4, gap=0)
    assert h == 60 and reads == pytest.approx(float(f.sort().values[:140].sum()))
    assert hot_split(f, capacity=60, window=4, gap=16)[1] > 0.9 * 200


def test_pinned_neurons_are_never_read_again_and_do_not_change_the_output(predicted_llama, monkeypatch):
    """The planner's hot neurons are read once, at setup, and stay in slots 0..pinned-1; each token's FFN is still the
    dense FFN over its selected neurons (compute="active"), the same numbers as without pins, at a tight budget."""
    from inaflash.ffn.sparse import load_sparsity

    store, _ = predicted_llama
    n = store.config.intermediate_size
    with Engine(store, mode="dram") as masked:
        masked.set_ffn(MaskedDenseFFN(masked.ffn, load_sparsity(store), use_predictor=True))
        ref = logits_run(masked)
    unlimited = plan_memory(store, None, context=32, predictor_bytes=load_sparsity(store).predictor_bytes, window=4,
                            active_neurons=n)
    budget = unlimited.planned_bytes - unlimited.cache_bytes + store.config.num_layers * (n // 2) * store.row_bytes
    got, pinned_ids = {}, {}
    for hot in (False, True):
        with Engine(store, mode="sparse", window=4, context=32, compute="active", memory=budget,
                    hot_neurons=hot, max_gap=-1) as engine:  # reads not merged: pins save reads, so some are taken
            ffn = engine.ffn
            assert engine.plan.planned_bytes <= budget
            if hot:
                pins = engine.plan.pinned
                assert all(0 < len(p) <= ffn.caches[0].capacity for p in pins)
                read = []
                start = ffn.bundles.start
                monkeypatch.setattr(ffn.bundles, "start", lambda layer, ids, *a: read.append((layer, ids)) or
                                    start(layer, ids, *a))
                monkeypatch.setattr(ffn.next_bundles, "start", lambda layer, ids, *a: read.append((layer, ids)) or
                                    ffn.next_bundles.__class__.start(ffn.next_bundles, layer, ids, *a))
            got[hot] = logits_run(engine)
            if hot:
                assert read and not any(set(ids.tolist()) & set(pins[layer].tolist()) for layer, ids in read)
                for layer, cache in enumerate(ffn.caches):
                    assert cache.pinned == len(pins[layer])
                    assert set(cache.neuron_of_slot[:cache.pinned].tolist()) == set(pins[layer].tolist())
    for hot in (False, True):
        assert max((a - b).abs().max().item() for a, b in zip(got[hot], ref)) < 1e-4


def test_auto_weighs_sparse_by_the_planners_expected_bytes(predicted_llama, tmp_path, monkeypatch):
    """With score statistics, --mode auto compares the bytes the planner expects sparse to read (merged reads
    included) with what hybrid streams at the same budget, and says which figure decided."""
    import re
    import shutil

    from inaflash.ffn.sparse import load_sparsity
    from inaflash.paths import load_max_gap
    from inaflash import planner
    from inaflash.planner import choose_mode, hot_neurons, plan_hybrid, plan_memory

    store = FlashStore(shutil.copytree(predicted_llama[0].path, tmp_path / "s"))
    spec = load_sparsity(store)
    save_sparsity(store, "threshold", spec.thresholds, spec.predictors,
                  {**spec.info, "quality": {"ok": True, "fraction_computed": 0.5}})
    store = FlashStore(store.path)
    spec = load_sparsity(store)
    n = store.config.intermediate_size
    unlimited = plan_memory(store, None, 32, spec.predictor_bytes, 4, n)
    budget = unlimited.planned_bytes - unlimited.cache_bytes + store.config.num_layers * (n // 8) * store.row_bytes
    choice = choose_mode(store, budget, 32, spec, 4)  # (an eighth of the FFN cached: the model does not fit)
    plan = plan_memory(store, budget, 32, spec.predictor_bytes, 4, n // 2)
    expected = hot_neurons(store, spec, plan.cache_capacity, plan.window, "cached", load_max_gap())[1] * \
        store.bundle_bytes
    streamed = sum(e.span for e in store.layers[plan_hybrid(store, budget, 32):])
    assert expected < streamed and choice.mode == "sparse"  # the tiny model streams all of its layers in hybrid
    # where the planner expects more than hybrid streams (SwiGLU models here), auto streams exactly and says why
    monkeypatch.setattr(planner, "hot_neurons", lambda *a: ([], 2 * streamed / store.bundle_bytes))
    choice = choose_mode(store, budget, 32, spec, 4)
    said = re.search(r"expected to read ([0-9.]+) MB per token, not less than hybrid's ([0-9.]+) MB", choice.reason)
    assert choice.mode == "naive" and said and said[1] != said[2], choice.reason
