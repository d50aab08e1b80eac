"""int8 FFN bundles: the stored codes dequantize exactly as documented, within half a step of the weights, and
every mode computes with them."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from inaflash.engine import Engine
from inaflash.ffn import bundle_views
from inaflash.reader import BundleReader, FlashReader
from inaflash.sources import open_source
from inaflash.store import FlashStore, bundle_fields, build_bundles, ffn_tensor_names, round_up, write_store
from test_store import read_layer
from tiny import make_tiny

PROMPT = [3, 17, 42, 5, 88, 9, 61]


@pytest.fixture(scope="module", params=["llama", "opt"])
def stores(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"q-{request.param}")
    make_tiny(request.param, root / "hf")
    src = open_source(root / "hf")
    return (root / "hf", FlashStore(write_store(src, root / "f32", dtype="float32", progress=False)),
            FlashStore(write_store(src, root / "i8", dtype="float32", progress=False, ffn_format="int8")))


def reference_dequant(store, layer):
    """Parse ffn.bin by the documented layout: per neuron, int8 codes (padded to even), then float16 scales, one per
    group of 64 weights of a field (a field that 64 does not divide: one scale). Returns the weights and, per weight,
    its scale."""
    e, cfg = store.layers[layer], store.config
    n = cfg.intermediate_size
    raw = np.fromfile(store.ffn_path, dtype=np.uint8, count=e.nbytes, offset=e.offset).reshape(n, store.bundle_bytes)
    width = store.bundle_width
    codes = raw[:, :width].view(np.int8).astype(np.float32)
    scales = raw[:, round_up(width, 2):].copy().view(np.float16).astype(np.float32)
    per_weight, k = np.empty_like(codes), 0
    for a, b in bundle_fields(cfg).values():
        g = 64 if (b - a) % 64 == 0 else b - a
        per_weight[:, a:b] = np.repeat(scales[:, k: k + (b - a) // g], g, axis=1)
        k += (b - a) // g
    assert k == scales.shape[1]  # every scale accounted for
    return codes * per_weight, per_weight


def test_int8_bundles_round_trip_within_half_a_step(stores):
    hf, _, q = stores
    weights = load_file(str(hf / "model.safetensors"))
    assert q.quantized and q.bundle_bytes < q.row_bytes / 3  # float32 rows: ~4x fewer bytes on flash
    for layer in range(q.config.num_layers):
        deq, scales = reference_dequant(q, layer)
        views = bundle_views(q, read_layer(q, layer))
        for name, (a, b) in q.fields.items():
            got = views[name].unsqueeze(1) if views[name].dim() == 1 else views[name]
            assert np.array_equal(got.numpy(), deq[:, a:b]), name  # exactly the stored codes times their scale
        exact = build_bundles(q.config, [weights[n] for n in ffn_tensor_names(q.config, layer)]).numpy()
        assert (np.abs(exact - deq) <= scales / 2 * (1 + 1e-3)).all()
        # bundles read neuron by neuron (the sparse path) are the same rows
        ids = torch.tensor([0, 1, 5, 77, q.config.intermediate_size - 1])
        with FlashReader(q.ffn_path) as r:
            rows = BundleReader(q, r).read(layer, ids)
        assert np.array_equal(rows.numpy(), deq[ids.numpy()])


def logits(store, **options):
    with Engine(store, **options) as engine:
        engine.reset(len(PROMPT) + 5)
        out = [engine.forward(torch.tensor(PROMPT), 0)]
        for i in range(4):
            out.append(engine.forward(torch.tensor([int(out[-1][-1].argmax())]), len(PROMPT) + i))
        return torch.cat(out), engine.reader.stats


def test_every_mode_computes_with_int8_bundles(stores):
    _, f32, q = stores
    ref, _ = logits(f32, mode="dram")
    dram, _ = logits(q, mode="dram")
    naive, io = logits(q, mode="naive")
    assert torch.allclose(naive, dram, atol=1e-5)
    assert io.bytes == 5 * q.ffn_read_bytes  # five forward passes, every layer's span of int8 bundles
    assert (dram - ref).norm() / ref.norm() < 0.02  # quantization moves the logits, a little
    if q.config.hidden_act == "relu":  # OPT: exact-zero sparsity needs no calibration
        sparse, _ = logits(q, mode="sparse", use_predictor=False, context=32)
        assert torch.allclose(sparse, dram, atol=1e-4)


def test_int8_groups_of_64_along_each_field():
    from inaflash.store import dequantize_int8, int8_bundle_bytes, quantize_int8

    fields = {"fc1": (0, 192), "fc1_bias": (192, 193), "fc2": (193, 385)}  # 3 + 1 + 3 groups
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 385, generator=g) * torch.logspace(-3, 1, 385)  # scales that vary along the row
    raw = quantize_int8(x, fields)
    assert raw.shape == (50, int8_bundle_bytes(385, fields)) == (50, 386 + 2 * 7)
    deq = dequantize_int8(raw, fields, 385, torch.float32)
    scales = raw[:, 386:].contiguous().view(torch.float16).float()
    per_weight = torch.cat([scales[:, :3].repeat_interleave(64, 1), scales[:, 3:4],
                            scales[:, 4:].repeat_interleave(64, 1)], 1)
    codes = raw[:, :385].view(torch.int8).float()
    assert torch.equal(deq, codes * per_weight)
    assert ((x - deq).abs() <= per_weight / 2 * (1 + 1e-3)).all()
    assert codes.abs().max() == 127  # each group uses the full range
    # a group's scale follows its own weights: the last group of fc1 holds ~20x larger weights than the first
    assert (scales[:, 2] > 5 * scales[:, 0]).all()
