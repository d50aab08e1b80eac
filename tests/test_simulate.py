"""The 7B-scale simulation: traces keep their active fractions and overlap on the wider layers, and the replay reads
exactly the planned spans of the neurons its cache lacks."""

import numpy as np
import torch

from inaflash.reader import plan_bundle_reads
from inaflash.tools.simulate import neuron_map, replay, selections, write_synthetic_store


def test_neuron_map_partitions_the_wide_layer():
    groups = neuron_map(48, 500)
    ids = np.concatenate(groups)
    assert sorted(ids.tolist()) == list(range(500))  # every wide neuron stands for exactly one small one
    assert {len(g) for g in groups} <= {10, 11}


def test_selections_keep_fraction_and_overlap(tmp_path):
    g = torch.Generator().manual_seed(0)
    acts = torch.rand(5, 3, 48, generator=g).half()
    mapping = neuron_map(48, 480)
    sel = list(selections(acts, 0.75, 4, mapping))
    top = acts.float().topk(12, dim=-1).indices
    for t in range(5):
        for layer in range(4):
            small = set(top[t, layer * 3 // 4].tolist())
            assert set(sel[t][layer].tolist()) == set(np.concatenate([mapping[i] for i in small]).tolist())
    # overlap between consecutive steps carries over exactly (each small neuron maps to 10 wide ones)
    a, b = set(top[0, 0].tolist()), set(top[1, 0].tolist())
    assert len(set(sel[0][0].tolist()) & set(sel[1][0].tolist())) == 10 * len(a & b)


def test_replay_reads_exactly_the_missing_neurons(tmp_path):
    store = write_synthetic_store(tmp_path / "syn", layers=2, hidden=64, neurons=480, progress=False)
    assert store.ffn_bytes == 2 * 480 * (2 * 64 + 1) * 2
    acts = torch.rand(6, 3, 48, generator=torch.Generator().manual_seed(1)).half()
    out = replay(store, acts, sparsity=0.75, window=0, max_gap=-1, progress=False)
    # window 0: every step reads all its neurons, one aligned span each
    mapping = neuron_map(48, 480)
    sel = list(selections(acts, 0.75, 2, mapping))
    expected = [sum(sum(n for _, n in plan_bundle_reads(store.layers[layer].offset, store.bundle_bytes, 2,
                                                          needed, -1).spans) for layer, needed in enumerate(step))
                for step in sel]
    assert out["bytes_read_per_token"] == float(np.median(expected[1:]))
    assert out["neurons_per_layer"] == 120
