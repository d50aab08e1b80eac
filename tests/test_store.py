"""The store round-trips the source weights, and the reader returns exactly the bytes asked for."""

import random

import pytest
import torch
from safetensors.torch import load_file

from inaflash.ffn.dense import bundle_views
from inaflash.reader import FlashReader, aligned_buffer
from inaflash.errors import InaflashError
from inaflash.store.sources import open_source
from inaflash.store.format import FlashStore
from inaflash.store.convert import write_store
from tiny import make_tiny


def read_layer(store: FlashStore, layer: int, direct=True) -> torch.Tensor:
    e = store.layers[layer]
    buf = aligned_buffer(e.span)
    with FlashReader(store.ffn_path, direct=direct) as r:
        r.read([(e.offset, buf[:e.span])])
    return buf


@pytest.mark.parametrize("layout", ["bundled", "unbundled"])
@pytest.mark.parametrize("kind", ["llama", "opt"])
def test_bundles_round_trip(kind, layout, tmp_path):
    make_tiny(kind, tmp_path / "hf")
    src = load_file(str(tmp_path / "hf" / "model.safetensors"))
    store = FlashStore(write_store(open_source(tmp_path / "hf"), tmp_path / "s", dtype="float32", progress=False,
                                   layout=layout))
    assert store.layout == layout
    if layout == "unbundled":
        assert all(offset % 4096 == 0 for offset in store.blocks.values()) and len(store.blocks) == 3
    rng = random.Random(0)
    for layer in range(store.config.num_layers):
        assert store.layers[layer].offset % 4096 == 0
        v = bundle_views(store, read_layer(store, layer), layer)
        for i in rng.sample(range(store.config.intermediate_size), 10):
            if kind == "opt":
                p = f"model.decoder.layers.{layer}."
                assert torch.equal(v["fc1"][i], src[p + "fc1.weight"][i])
                assert v["fc1_bias"][i] == src[p + "fc1.bias"][i]
                assert torch.equal(v["fc2"][i], src[p + "fc2.weight"][:, i])
            else:
                p = f"model.layers.{layer}.mlp."
                assert torch.equal(v["gate"][i], src[p + "gate_proj.weight"][i])
                assert torch.equal(v["up"][i], src[p + "up_proj.weight"][i])
                assert torch.equal(v["down"][i], src[p + "down_proj.weight"][:, i])


def test_resident_file_holds_no_ffn_weights(tmp_path):
    make_tiny("llama", tmp_path / "hf")
    store = FlashStore(write_store(open_source(tmp_path / "hf"), tmp_path / "s", dtype="float16", progress=False))
    names = set(store.resident_weights())
    assert not any(".mlp." in n for n in names)
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names  # tied: stored once
    assert store.resident_weights()["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float16


def test_gguf_store_round_trips_dequantized_weights(smollm2_gguf, smollm2_store_f32):
    """Bundle rows equal the gguf package's dequantization of the source tensors (HF orientation)."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(str(smollm2_gguf))
    tensors = {t.name: t for t in reader.tensors}
    store = FlashStore(smollm2_store_f32)
    for layer in (0, 17, store.config.num_layers - 1):
        v = bundle_views(store, read_layer(store, layer), layer)
        deq = {k: np.asarray(gguf.quants.dequantize(tensors[f"blk.{layer}.ffn_{k}.weight"].data,
                                                    tensors[f"blk.{layer}.ffn_{k}.weight"].tensor_type))
               for k in ("gate", "up", "down")}
        for i in (0, 5, 1000, store.config.intermediate_size - 1):
            assert np.array_equal(v["gate"][i].numpy(), deq["gate"][i])
            assert np.array_equal(v["up"][i].numpy(), deq["up"][i])
            assert np.array_equal(v["down"][i].numpy(), deq["down"][:, i])


def test_reader_falls_back_when_o_direct_is_refused(tmp_path, monkeypatch):
    """Filesystems without O_DIRECT (older tmpfs) answer EINVAL: buffered reads + fadvise(DONTNEED) instead."""
    import errno
    import os

    real_open = os.open

    def refusing_open(path, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", refusing_open)
    data = os.urandom(3 * 4096)
    (tmp_path / "f").write_bytes(data)
    buf = aligned_buffer(8192)
    with pytest.warns(RuntimeWarning, match="O_DIRECT refused") as said, FlashReader(tmp_path / "f") as r:
        r.read([(4096, buf)])
        assert not r.direct
        assert r.stats.bytes == 8192 and r.stats.requests == 1
    assert bytes(buf.numpy()) == data[4096:]
    assert "O_DIRECT refused" in str(said[0].message)


def test_reader_splits_large_reads_and_counts_them(tmp_path):
    import os

    data = os.urandom(10 * 4096)
    (tmp_path / "f").write_bytes(data)
    buf = aligned_buffer(8 * 4096)
    with FlashReader(tmp_path / "f", threads=3, chunk_bytes=3 * 4096) as r:
        assert r.direct
        r.read([(4096, buf[:6 * 4096]), (8 * 4096, buf[6 * 4096:8 * 4096])])
        assert r.stats.requests == 3  # 6 pages in chunks of 3, then 2 pages
        assert r.stats.bytes == 8 * 4096
    assert bytes(buf.numpy()) == data[4096:7 * 4096] + data[8 * 4096:10 * 4096]


def test_reader_reads_registered_buffers_through_io_uring(tmp_path, monkeypatch, caplog):
    """Registered buffers are read through io_uring with fixed buffers (where the kernel allows: then the stats
    count them), others through preadv, every byte the file's; a registration the kernel refuses (a locked-memory
    limit: ENOMEM) and a registered buffer that has gone both leave the reads on preadv, still correct."""
    import gc
    import logging
    import os

    from inaflash import reader as reader_module

    data = os.urandom(40 * 4096)
    (tmp_path / "f").write_bytes(data)
    probe = reader_module._Ring()
    usable = reader_module._URING_OPEN is not None and probe.holds([aligned_buffer(4096)], 1)
    probe.close()
    a, b = aligned_buffer(16 * 4096), aligned_buffer(8 * 4096)
    with FlashReader(tmp_path / "f", threads=2, chunk_bytes=4 * 4096) as r:
        r.register(a)
        r.read([(0, a[:8 * 4096]), (20 * 4096, a[8 * 4096:]), (32 * 4096, b)])
        assert bytes(a.numpy()) == data[:8 * 4096] + data[20 * 4096:28 * 4096]
        assert bytes(b.numpy()) == data[32 * 4096:]
        assert r.stats.requests == 6 and r.stats.fixed == (4 if usable else 0)  # a's 4 pieces; b is not registered
        c = aligned_buffer(4096)
        r.register(c)
        del c
        gc.collect()
        a.zero_()
        r.read([(4096, a)])  # a registered buffer has gone: preadv until the next register()
        assert bytes(a.numpy()) == data[4096:17 * 4096] and r.stats.fixed == (4 if usable else 0)
    monkeypatch.setattr(reader_module, "_URING_REGISTER", lambda *args: -12)
    a.zero_()
    with caplog.at_level(logging.INFO, logger="inaflash"), FlashReader(tmp_path / "f", threads=1) as r:
        r.register(a)
        r.read([(8192, a)])
        assert bytes(a.numpy()) == data[8192:8192 + 16 * 4096] and r.stats.fixed == 0
    if reader_module._URING_OPEN is not None:
        assert "refused the buffers (Cannot allocate memory)" in caplog.text
    if usable:  # a read io_uring fails (EIO from the ring): this thread's reads go through preadv, bytes still right
        monkeypatch.undo()
        monkeypatch.setattr(reader_module, "_URING_READ", lambda *args: -5)
        a.zero_()
        with caplog.at_level(logging.INFO, logger="inaflash"), FlashReader(tmp_path / "f", threads=1) as r:
            r.register(a)
            r.read([(4096, a), (0, b)])
            r.read([(4096 * 3, a)])
            assert bytes(a.numpy()) == data[3 * 4096:19 * 4096] and r.stats.fixed == 0 and r.stats.requests == 3
        assert "failed a read (Input/output error)" in caplog.text


def _gguf(path, tensors):
    """A GGUF holding only a tensor table: {name: (float32 array, GGML type)}."""
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), "llama")
    for name, (a, qtype) in tensors.items():
        if qtype == gguf.GGMLQuantizationType.F16:
            w.add_tensor(name, a.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_a_gguf_converts_by_default_to_the_formats_nearest_its_own(tmp_path, smollm2_gguf):
    """convert/load's default formats follow the source: the FFN's and the resident part's (attention, head, a tied
    embedding) bits per weight, weighted by elements, to the nearest store format; an unbundled FFN is float (the
    only format written unbundled); a Hugging Face folder float. A damaged file is named."""
    import gguf
    import numpy as np

    from inaflash.loader import source_formats
    from inaflash.store.sources import closest_formats

    Q = gguf.GGMLQuantizationType
    a = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    f16 = _gguf(tmp_path / "f16.gguf", {"blk.0.ffn_up.weight": (a, Q.F16), "blk.0.attn_q.weight": (a, Q.Q8_0),
                                        "output.weight": (a, Q.Q8_0), "token_embd.weight": (a, Q.F16)})
    assert closest_formats(f16)[:2] == ("float", "int8")  # the untied embedding (on flash) is not counted
    q4 = _gguf(tmp_path / "q4.gguf", {"blk.0.ffn_up.weight": (a, Q.Q4_0), "blk.0.ffn_down.weight": (a, Q.Q8_0),
                                      "blk.0.ffn_gate.weight": (a, Q.Q4_0), "blk.0.attn_q.weight": (a, Q.Q4_0),
                                      "token_embd.weight": (a, Q.Q4_0)})  # tied: the embedding is the head
    ffn, resident, why = closest_formats(q4)
    assert (ffn, resident) == ("int4", "int4") and "FFN Q4_0/Q8_0 5.8 bits/weight -> int4" in why
    assert source_formats(q4, "unbundled")[:2] == ("float", "int4")
    assert source_formats(tmp_path, "bundled") == ("float", "float", None)  # not a GGUF: a folder's float
    # the embedded default model: Q4_1 everywhere but its tied embedding, Q8_0
    assert closest_formats(smollm2_gguf)[:2] == ("int4", "int8")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 20)
    with pytest.raises(InaflashError, match="not a valid GGUF file"):
        closest_formats(bad)


def test_a_gguf_loads_into_its_nearest_formats_the_default_model_into_float(tmp_path, monkeypatch, smollm2_gguf,
                                                                             capfd):
    """load()/run on a GGUF converts it once into the formats closest_formats chooses and says so on stderr; the
    embedded default model (no model named) stays float: int formats move its greedy text (docs/measurements.md)."""
    from inaflash.loader import resolve_store

    monkeypatch.setenv("INAFLASH_HOME", str(tmp_path))
    store = resolve_store(smollm2_gguf)
    assert (store.ffn_format, store.resident_format) == ("int4", "int8")
    err = capfd.readouterr().err
    assert "into a store with FFN int4, resident int8: the formats nearest its own (FFN Q4_1 5.0 bits/weight" in err
    assert resolve_store(smollm2_gguf).path == store.path and "converting" not in capfd.readouterr().err  # once
    default = resolve_store(None)
    assert (default.ffn_format, default.resident_format) == ("float", "float") and default.path != store.path
