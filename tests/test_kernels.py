"""The native FFN kernel against float references: every bundle format, both FFN families, token counts, row
offsets and masks; a neuron cache's live block after arbitrary evict/append sequences; greedy text of the real
model through the kernel against torch's decoded path."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from inaflash.ffn import kernels
from inaflash.store import quant
from inaflash.ffn.kernels import BundleFFN

pytestmark = pytest.mark.skipif(not kernels.available(), reason="the native kernel is not built")

FORMATS = [("float", torch.float16), ("float", torch.bfloat16), ("float", torch.float32), ("int8", torch.float16),
           ("int4", torch.float16)]


def fields_of(family, d):
    if family == "swiglu":
        return {"gate": (0, d), "up": (d, 2 * d), "down": (2 * d, 3 * d)}
    return {"fc1": (0, d), "fc1_bias": (d, d + 1), "fc2": (d + 1, 2 * d + 1)}


def encoded(fmt, dtype, bundles, fields):
    """(raw bundles as stored, the float weights they hold)."""
    n, width = bundles.shape
    if fmt == "float":
        raw = bundles.to(dtype).contiguous().view(torch.uint8).view(n, -1)
        return raw, raw.view(dtype).view(n, width).float()
    raw = quant.encode(fmt, bundles, fields)[0]
    return raw, quant.decode(fmt, raw, fields, width, torch.float32)


def reference(family, w, x, d):
    """(out, h) of the FFN over float bundle rows w [m, width]."""
    if family == "swiglu":
        h = F.silu(x @ w[:, :d].T) * (x @ w[:, d:2 * d].T)
        return h @ w[:, 2 * d:], h
    h = F.relu(x @ w[:, :d].T + w[:, d])
    return h @ w[:, d + 1:], h


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("fmt,dtype", FORMATS)
@pytest.mark.parametrize("family", ["swiglu", "relu"])
@pytest.mark.parametrize("d,n", [(64, 160), (256, 300), (576, 1536)])
@pytest.mark.parametrize("quantized", [False, True])
def test_kernel_matches_the_float_reference(fmt, dtype, family, d, n, quantized):
    """Whole matrices, 1/3/9 tokens (the kernel takes 8 tokens per pass over a bundle); the hidden activations too.
    Float activations: float32 rounding. int8 activations (int formats' default): within 2%. Widths of whole
    blocks of 8 groups (256) take int4's several-token path (gate_up_q4_tokens), the others its generic one."""
    fields = fields_of(family, d)
    width = max(b for _, b in fields.values())
    bundles = torch.randn(n, width, generator=torch.Generator().manual_seed(d)) * 0.05
    raw, w = encoded(fmt, dtype, bundles, fields)
    kernel = BundleFFN(fmt, fields, dtype, raw.shape[1], d, "silu" if family == "swiglu" else "relu", quantized)
    assert kernel.ok
    bound = 2e-2 if quantized and fmt != "float" else 1e-4
    for T in (1, 3, 9):
        x = torch.randn(T, d, generator=torch.Generator().manual_seed(T))
        expected, h = reference(family, w, x, d)
        hidden = torch.empty(T, n)
        got = kernel(x, raw, n, hidden=hidden)
        assert rel(got, expected) < bound and rel(hidden, h) < bound


@pytest.mark.parametrize("fmt,dtype", [("int4", torch.float16), ("float", torch.float16), ("int8", torch.float16)])
@pytest.mark.parametrize("family", ["swiglu", "relu"])
@pytest.mark.parametrize("n,threads", [(7, 1), (300, 2), (1100, 2), (1100, 1)])
def test_kernel_hashes_the_pages_under_its_rows(fmt, dtype, family, n, threads, monkeypatch):
    """With `crcs`, the kernel returns every page's CRC-32C of the whole buffer (the pages past the last row too),
    exactly checksum.page_crcs', and the same output as without: 1, 2 and 8 parts (1100 rows on 2 threads), pages
    straddling the parts' rows, 1/3/9 tokens (the pages hashed in the first pass over the rows only)."""
    from inaflash.store import checksum

    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    d = 64
    fields = fields_of(family, d)
    width = max(b for _, b in fields.values())
    raw, _ = encoded(fmt, dtype, torch.randn(n, width, generator=torch.Generator().manual_seed(n)) * 0.05, fields)
    pages = -(-raw.numel() // checksum.PAGE) + 2  # two pages of other bytes after the rows, as a layer's span may
    buf = torch.randint(0, 256, (pages * checksum.PAGE,), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    buf[: raw.numel()] = raw.view(-1)
    kernel = BundleFFN(fmt, fields, dtype, raw.shape[1], d, "silu" if family == "swiglu" else "relu")
    for T in (1, 3, 9):
        x = torch.randn(T, d, generator=torch.Generator().manual_seed(T))
        crcs = np.zeros(pages, dtype=np.uint32)
        got = kernel(x, buf, n, crcs=crcs)
        np.testing.assert_array_equal(crcs, checksum.page_crcs(buf))
        assert torch.equal(got, kernel(x, buf, n))
    with pytest.raises(RuntimeError, match="native FFN kernel failed"):  # rows at offsets: no pages to hash
        kernel(x, buf, 2, offsets=torch.tensor([0, raw.shape[1]]), crcs=np.zeros(1, dtype=np.uint32))


@pytest.mark.parametrize("fmt,dtype", FORMATS)
@pytest.mark.parametrize("family", ["swiglu", "relu"])
def test_native_decode_is_the_documented_layout(fmt, dtype, family):
    """The decode behind many-token passes (one decode, then a GEMM) gives exactly quant.decode's weights."""
    d, n = 576, 300
    fields = fields_of(family, d)
    width = max(b for _, b in fields.values())
    raw, w = encoded(fmt, dtype, torch.randn(n, width, generator=torch.Generator().manual_seed(5)) * 0.05, fields)
    kernel = BundleFFN(fmt, fields, dtype, raw.shape[1], d, "silu" if family == "swiglu" else "relu")
    assert torch.equal(kernel.decode(raw, n, width), w)
    ids = torch.tensor([3, 17, 299])
    assert torch.equal(kernel.decode(raw.view(-1), 3, width, offsets=ids * raw.shape[1]), w[ids])


@pytest.mark.parametrize("fmt,dtype", FORMATS)
def test_kernel_over_offsets_with_a_mask(fmt, dtype):
    """Bundles picked by byte offset out of a buffer (a staging buffer as read), hidden activations masked per
    token: the FFN of exactly those neurons, masked."""
    d, n = 128, 300
    fields = fields_of("swiglu", d)
    bundles = torch.randn(n, 3 * d, generator=torch.Generator().manual_seed(1)) * 0.05
    raw, w = encoded(fmt, dtype, bundles, fields)
    kernel = BundleFFN(fmt, fields, dtype, raw.shape[1], d, "silu", False)
    ids = torch.randperm(n, generator=torch.Generator().manual_seed(2))[:77].sort().values
    gap = raw.shape[1] + 40  # bundles need not be evenly spaced
    buf = torch.zeros(ids.numel() * gap + 100, dtype=torch.uint8)
    offsets = torch.arange(ids.numel()) * gap + 13
    for k, i in enumerate(ids.tolist()):
        buf[offsets[k]: offsets[k] + raw.shape[1]] = raw[i]
    x = torch.randn(2, d)
    mask = torch.rand(2, ids.numel(), generator=torch.Generator().manual_seed(3)) > 0.5
    _, h = reference("swiglu", w[ids], x, d)
    expected = (h * mask) @ w[ids][:, 2 * d:]
    assert rel(kernel(x, buf, ids.numel(), offsets=offsets, mask=mask), expected) < 1e-4


@pytest.mark.parametrize("d", [64, 576, 1536])
@pytest.mark.parametrize("m", [1, 3, 4, 5, 31, 32, 33, 77, 300])
@pytest.mark.parametrize("T", [1, 3, 9, 20])
def test_int4_down_projection_in_integers(d, m, T):
    """int4 with int8 activations takes the down projection in integers too (kernels.c rows_down_q4 for one token,
    rows_down_q4_tokens for several: coefficients h * scale quantized to int16 per token and block of 32 rows, rows
    paired): equal, to 5e-4, to the float product of the kernel's own hidden activations and the decoded down
    columns, for blocks cut anywhere (m), rows skipped by the mask (per token: a row is skipped only where every
    token of its block of 8 masks it) and picked by offset, widths with and without a tail of groups, 1 token, a
    partial block, a block and a tail, tiles of rows (more than 8 tokens). A lost, repeated or misplaced row, block or
    token is an error of order 1. A token computes the same among others as alone (one token's sums are the same
    integers either way; the gate/up dot products of a block of tokens round differently: within 1e-4)."""
    fields = fields_of("swiglu", d)
    bundles = torch.randn(m + 20, 3 * d, generator=torch.Generator().manual_seed(d + m)) * 0.05
    raw, w = encoded("int4", torch.float16, bundles, fields)
    kernel = BundleFFN("int4", fields, torch.float16, raw.shape[1], d, "silu", True)
    x = torch.randn(T, d, generator=torch.Generator().manual_seed(m))
    mask = torch.rand(T, m, generator=torch.Generator().manual_seed(d)) > 0.3
    mask[:, 0] = True  # never an all-zero output
    ids = torch.arange(m) + 7
    hidden = torch.empty(T, m)
    got = kernel(x, raw.flatten(), m, offsets=ids * raw.shape[1], mask=mask, hidden=hidden)
    assert (hidden[~mask] == 0).all()
    assert rel(got, hidden @ w[ids][:, 2 * d:]) < 5e-4
    alone = torch.cat([kernel(x[t:t + 1], raw.flatten(), m, offsets=ids * raw.shape[1], mask=mask[t:t + 1])
                       for t in range(T)])
    assert rel(got, alone) < 1e-4


@pytest.mark.parametrize("fmt", ["palette4", "palette3"])
@pytest.mark.parametrize("d", [64, 576, 1536])
@pytest.mark.parametrize("T", [1, 3, 9, 20])
def test_palette_kernel_against_its_decoded_weights(fmt, d, T):
    """Palettes go through int4's integer paths, each nibble (palette3: each 3-bit index, widened as it loads) looked
    up in the layer's levels: within 2% of the float FFN over the decoded weights (int8 activations, as int4), the
    down projection within 5e-4 of the kernel's own hidden activations times the decoded columns (a wrong level,
    row or nibble order is an error of order 1); rows by offset and mask; a pass of up to 16 tokens gives each token
    the bits it gets alone (palette3 widens a row's indices once for them all)."""
    fields = fields_of("swiglu", d)
    m = 77
    bundles = torch.randn(m + 20, 3 * d, generator=torch.Generator().manual_seed(d)) * 0.05
    raw, books = quant.encode(fmt, bundles, fields)
    w = quant.decode(fmt, raw, fields, 3 * d, torch.float32, books)
    kernel = BundleFFN(fmt, fields, torch.float16, raw.shape[1], d, "silu", True, books=[books])
    assert kernel.ok
    x = torch.randn(T, d, generator=torch.Generator().manual_seed(T))
    ids = torch.arange(m) + 7
    expected, h = reference("swiglu", w[ids], x, d)
    hidden = torch.empty(T, m)
    got = kernel(x, raw.flatten(), m, offsets=ids * raw.shape[1], hidden=hidden)
    assert rel(got, expected) < 2e-2 and rel(hidden, h) < 2e-2
    assert rel(got, hidden @ w[ids][:, 2 * d:]) < 5e-4
    mask = torch.rand(T, m, generator=torch.Generator().manual_seed(d)) > 0.3
    masked = kernel(x, raw.flatten(), m, offsets=ids * raw.shape[1], mask=mask, hidden=hidden)
    assert (hidden[~mask] == 0).all() and rel(masked, hidden @ w[ids][:, 2 * d:]) < 5e-4
    alone = torch.cat([kernel(x[t:t + 1], raw, m + 20) for t in range(T)])
    together = kernel(x, raw, m + 20)
    if T <= 16:
        assert torch.equal(together, alone)
    else:
        assert rel(together, alone) < 1e-4


def test_palette_kernel_takes_only_what_it_computes():
    """The kernel computes palettes on SwiGLU bundles with quantized activations and books on the 1/127 grid; other
    cases (OPT's fc1 with its float bias, float activations, a book written before the grid) decline, and BundleMath
    then decodes through torch."""
    d = 64
    bundles = torch.randn(100, 3 * d, generator=torch.Generator().manual_seed(0)) * 0.05
    raw, books = quant.encode("palette4", bundles, fields_of("swiglu", d))
    args = ("palette4", fields_of("swiglu", d), torch.float16, raw.shape[1], d, "silu")
    assert BundleFFN(*args, True, books=[books]).ok
    assert not BundleFFN(*args, False, books=[books]).ok  # float activations: the integer paths only
    assert not BundleFFN(*args, True).ok  # no books
    off = {k: (v.float() * 0.999 + 0.0004).half() for k, v in books.items()}
    assert quant.book_levels(off["gate"]) is None and not BundleFFN(*args, True, books=[off]).ok
    opt = fields_of("relu", d)
    raw_opt, books_opt = quant.encode("palette4", torch.randn(100, 2 * d + 1) * 0.05, opt)
    assert not BundleFFN("palette4", opt, torch.float16, raw_opt.shape[1], d, "relu", True, books=[books_opt]).ok


@pytest.fixture(scope="module")
def int4_llama(tmp_path_factory):
    from inaflash.store.sources import open_source
    from inaflash.store.format import FlashStore
    from inaflash.store.convert import write_store
    from tiny import make_tiny

    root = tmp_path_factory.mktemp("int4")
    make_tiny("llama", root / "hf")
    return FlashStore(write_store(open_source(root / "hf"), root / "store", dtype="float32", progress=False,
                                  ffn_format="int4"))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture],
          derandomize=True)
@given(window=st.integers(0, 3), capacity=st.integers(20, 160),
       steps=st.lists(st.sets(st.integers(0, 159), min_size=1, max_size=20), min_size=1, max_size=10))
def test_cache_live_block_computes_its_neurons(int4_llama, window, capacity, steps):
    """An int4 store's cache after any evict/append sequence: the kernel over its live block (bundles as read,
    moved by swap-delete) equals the float FFN of exactly the neurons it holds, decoded from the store."""
    from inaflash.ffn.cache import NeuronCache
    from inaflash.reader import BundleReader, FlashReader

    store, d = int4_llama, int4_llama.config.hidden_size
    cache = NeuronCache(store, capacity, window)
    exact = BundleFFN("int4", store.fields, store.dtype, store.bundle_bytes, d, "silu", False)
    x = torch.randn(1, d, generator=torch.Generator().manual_seed(0))
    with FlashReader(store.ffn_path) as r:
        reader = BundleReader(store, r)
        every = reader.read(0, torch.arange(store.config.intermediate_size))
        for step, active in enumerate(steps, start=1):
            needed = torch.tensor(sorted(active))[:capacity]
            missing = cache.prepare(needed, step)
            for chunk, plans in reader.chunks(0, missing):
                src, offsets = reader.finish(reader.start(0, chunk, plans))
                cache.append(chunk, src, offsets, step)
            live = cache.live_neurons()
            expected, _ = reference("swiglu", every[live].float(), x, d)
            got = exact(x, cache.rows, cache.n)
            # 1e-3, not 1e-4: with one live neuron nothing averages out, and a gate or up product near zero
            # (cancellation over 64 terms) carries float32's summation-order difference whole (random draws have
            # reached 1.2e-4 and 3.1e-4); a wrong, missing or stale neuron is an error of order 1
            assert rel(got, expected) < 1e-3


PROMPTS = ["The capital of France is", "def add(a, b):", "Water boils at", "Once upon a time, a small robot",
           "The three primary colors are"]


def test_greedy_text_through_the_kernel_equals_the_decoded_path(smollm2_gguf, tmp_path_factory, monkeypatch):
    """The default model from an int8 store: 32 greedy tokens on 5 prompts through the kernel (float activations)
    are the tokens of torch's decoded path."""
    from inaflash.engine import Engine
    from inaflash.generate import generate_ids
    from inaflash.store.sources import open_source
    from inaflash.store.format import FlashStore
    from inaflash.store.convert import write_store

    store = FlashStore(write_store(open_source(smollm2_gguf), tmp_path_factory.mktemp("smol8") / "s",
                                   ffn_format="int8", progress=False))
    monkeypatch.setattr(kernels, "QUANTIZED_ACTIVATIONS", False)
    runs = {}
    for path in ("kernel", "torch"):
        if path == "torch":  # as INAFLASH_KERNEL=torch does
            monkeypatch.setattr(kernels, "LIB", None)
            monkeypatch.setenv("INAFLASH_KERNEL", "torch")
        with Engine(store, mode="dram", context=64) as engine:
            assert engine.ffn.math.native == (path == "kernel")
            tok = engine.tokenizer
            runs[path] = [generate_ids(engine, tok(p)["input_ids"], 32, temperature=0.0, stop=set())[0]
                          for p in PROMPTS]
    assert runs["kernel"] == runs["torch"]


def test_cache_moves_bytes_the_same_without_the_native_library(int4_llama, monkeypatch):
    """Swap-delete and append through torch (no compiler) leave every slot byte for byte as the native moves do."""
    from inaflash.ffn.cache import NeuronCache
    from inaflash.reader import BundleReader, FlashReader

    steps = [[1, 5, 9, 40, 41], [5, 60, 61, 62], [0, 1, 2, 3, 150], [9, 159], [70, 71, 72, 73, 74, 75]]
    states = []
    for native in (True, False):
        if not native:
            monkeypatch.setattr(kernels, "LIB", None)
        cache = NeuronCache(int4_llama, capacity=12, window=2)
        with FlashReader(int4_llama.ffn_path) as r:
            reader = BundleReader(int4_llama, r)
            for step, ids in enumerate(steps, start=1):
                for chunk, plans in reader.chunks(0, cache.prepare(torch.tensor(ids), step)):
                    src, offsets = reader.finish(reader.start(0, chunk, plans))
                    cache.append(chunk, src, offsets, step)
        states.append((cache.rows[: cache.n].clone(), cache.live_neurons().clone()))
    assert torch.equal(states[0][0], states[1][0]) and torch.equal(states[0][1], states[1][1])


@settings(max_examples=25, deadline=None, derandomize=True)
@given(rows=st.integers(1, 700), blocks=st.integers(1, 12), tokens=st.integers(1, 20), seed=st.integers(0, 2 ** 16))
def test_resident_int8_matrix_against_its_float_weights(rows, blocks, tokens, seed):
    """A resident int8 matrix (head, attention) times activations: the native kernel, for any number of tokens
    (activations quantized to int8 per 32, as llama.cpp's Q8), within 1.5% of the float product over the same int8
    weights; the torch path (rows decoded in blocks) equals that product to float32 rounding."""
    g = torch.Generator().manual_seed(seed)
    cols = 32 * blocks
    w = torch.randn(rows, cols, generator=g) * torch.rand(rows, 1, generator=g)
    m = quant.Int8Matrix(*quant.Int8Matrix.quantize(w))
    x = torch.randn(tokens, cols, generator=g)
    ref = x @ (m.codes.float() * m.scales.float()[:, None]).T
    got = m.linear(x)
    assert got.shape == (tokens, rows) and got.dtype == torch.float32
    assert ((got - ref).norm() / ref.norm()).item() < 0.015
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(quant, "MATVEC", None)
        mp.setattr(quant.Int8Matrix, "BLOCK", 64)  # several blocks
        assert torch.allclose(m.linear(x), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_native_matvec_is_taken_for_any_tokens_and_declines_odd_widths(monkeypatch):
    """Every token count goes through the native kernel (torch's int8pack is never called: on AVX-512 it returned
    inf for 40 columns, then crashed); a width that is not a multiple of 32 goes to the torch path, exactly."""
    calls = []
    real = quant.MATVEC
    monkeypatch.setattr(quant, "MATVEC", lambda *a: calls.append((a[2], a[3], a[5])) or real(*a))
    monkeypatch.setattr(torch, "_weight_int8pack_mm", None)
    for cols in (64, 40):
        w = torch.randn(16, cols)
        m = quant.Int8Matrix(*quant.Int8Matrix.quantize(w))
        for tokens in (1, 9):
            x = torch.randn(tokens, cols)
            ref = x @ (m.codes.float() * m.scales.float()[:, None]).T
            assert ((m.linear(x) - ref).norm() / ref.norm()).item() < (0.015 if cols == 64 else 1e-5)
    assert calls == [(16, 64, 1), (16, 64, 9)]


@settings(max_examples=25, deadline=None, derandomize=True)
@given(rows=st.integers(1, 300), blocks=st.integers(1, 11), tokens=st.integers(1, 20), seed=st.integers(0, 2 ** 16))
def test_resident_int4_matrix_against_its_decoded_weights(rows, blocks, tokens, seed):
    """A resident int4 matrix (--resident-format int4) times activations: the native kernel, for any number of
    tokens, within 1.5% of the float product over the same int4 weights decoded (its activations are quantized to
    int8 per 32); the torch path (decoded blocks) equals that product; row lookups decode exactly those rows."""
    g = torch.Generator().manual_seed(seed)
    cols = 64 * blocks  # 64..704: the 8-group loop and the two-group tail both run (Qwen's 1536 = 24 groups)
    w = torch.randn(rows, cols, generator=g) * torch.rand(rows, 1, generator=g) + 0.3 * torch.rand(1, cols,
                                                                                                   generator=g)
    m = quant.Int4Matrix(quant.Int4Matrix.quantize(w))
    dense = m.decode(m.raw)
    assert (m.raw.shape[0], m.cols) == (rows, cols) and (dense - w).abs().max() <= (w.max() - w.min()) / 15  # half a step and more
    x = torch.randn(tokens, cols, generator=g)
    ref = x @ dense.T
    got = m.linear(x)
    assert got.shape == (tokens, rows) and got.dtype == torch.float32
    assert ((got - ref).norm() / ref.norm()).item() < 0.015
    ids = torch.randint(rows, (3,), generator=g)
    assert torch.equal(m[ids], dense[ids])


def test_resident_int4_torch_path_and_bad_shapes(monkeypatch):
    """Without the native kernel the product is the decoded blocks' (the head's BLOCK split included); a uint8 tensor
    that is no int4 row layout is refused."""
    monkeypatch.setattr(quant.Int4Matrix, "BLOCK", 7)
    w = torch.randn(20, 128)
    m = quant.Int4Matrix(quant.Int4Matrix.quantize(w))
    x = torch.randn(3, 128)
    monkeypatch.setattr(quant, "MATVEC4", None)
    assert torch.allclose(m.linear(x), x @ m.decode(m.raw).T, atol=1e-5)
    for bad in (torch.zeros(4, 81, dtype=torch.uint8), torch.zeros(4, 50, dtype=torch.uint8)):  # 81: not 5/8 of a width
        with pytest.raises(ValueError, match="not an int4 matrix"):
            quant.Int4Matrix(bad)


@pytest.mark.parametrize("T,heads,hd", [(1, 12, 128), (5, 2, 64), (3, 9, 64)])
def test_native_rms_norm_and_rope_equal_torch(T, heads, hd):
    """ops.c's RMSNorm and rotary embedding (used by every decode step) against torch's formulas."""
    from inaflash import ops

    assert ops._RMS_NORM is not None and ops._ROPE is not None
    g = torch.Generator().manual_seed(T)
    x, w = torch.randn(T, heads * hd, generator=g), torch.randn(heads * hd, generator=g)
    assert torch.allclose(ops.rms_norm(x, w, 1e-6), F.rms_norm(x, (heads * hd,), w, 1e-6), rtol=1e-5, atol=1e-5)
    q = torch.randn(T, heads, hd, generator=g)
    angles = torch.rand(T, hd // 2, generator=g) * 6
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    half = hd // 2
    expected = q * cos[:, None] + torch.cat([-q[..., half:], q[..., :half]], -1) * sin[:, None]
    assert torch.allclose(ops.rope(q.clone(), cos, sin), expected, atol=1e-6)


def test_many_tokens_take_the_gemm_and_agree_with_the_kernel(int4_llama, monkeypatch):
    """From GEMM_FROM_TOKENS tokens on, BundleMath decodes the rows once and multiplies with torch's GEMM (exact to
    the decoded weights); below, the kernel (int8 activations, within 2%): the same FFN either way."""
    from inaflash.ffn import dense

    store = int4_llama
    e = store.layers[0]
    raw = np.fromfile(store.ffn_path, dtype=np.uint8, count=e.span, offset=e.offset)
    math, rows = dense.BundleMath(store), store.layer_rows(torch.from_numpy(raw))
    x = torch.randn(12, store.config.hidden_size, generator=torch.Generator().manual_seed(5))
    kernel_out = math(x, rows, rows.shape[0], 0)
    monkeypatch.setattr(dense, "GEMM_FROM_TOKENS", 12)
    calls = []
    monkeypatch.setattr(type(math.kernel), "__call__", lambda *a, **k: calls.append(1))
    gemm_out = math(x, rows, rows.shape[0], 0)
    w = store.decode(rows, 0).float()
    d = store.config.hidden_size
    expected, _ = reference("swiglu", w, x, d)
    assert not calls and rel(gemm_out, expected) < 1e-4 and rel(kernel_out, expected) < 2e-2


UNALIGNED_INT8 = r"""
import sys, torch
from safetensors.torch import load_file, save_file
from inaflash.store import quant
codes, scales = quant.Int8Matrix.quantize(torch.randn(96, 64))
# a 3-byte tensor first: safetensors lays the codes at an offset that is not a multiple of 64, as in a real store
save_file({"a": torch.zeros(3, dtype=torch.int8), "w": codes, "w.scale": scales}, sys.argv[1])
w = load_file(sys.argv[1])
assert w["w"].data_ptr() % 64 != 0, "the case did not build: codes landed aligned"
m = quant.Int8Matrix(w["w"], w["w.scale"])
x = torch.randn(8 * 64 + 1, dtype=torch.bfloat16)[1:].view(8, 64)  # activations at an odd offset too
assert x.data_ptr() % 64 != 0
got = m.linear(x)
ref = x.float() @ (codes.float() * scales.float()[:, None]).T
print(((got - ref).norm() / ref.norm()).item())
"""


def test_int8_matrix_from_unaligned_file_bytes(tmp_path):
    """Codes that safetensors loads at an offset not a multiple of 64 bytes, times 8 tokens, with activations at an
    odd offset: where torch's int8pack took more than 4 tokens, on a CPU where torch runs AVX-512 kernels it read
    such memory with aligned loads and the process died (SIGSEGV). Run in a child so a regression fails this test,
    not the suite."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", UNALIGNED_INT8, str(tmp_path / "w.safetensors")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"exit {r.returncode}: {r.stderr[-2000:]}"
    assert float(r.stdout.split()[-1]) < 0.015  # int8 activations against the float product


def test_the_library_is_built_portable_and_loaded_only_where_the_cpu_runs_it(monkeypatch):
    """setup.py builds for x86-64-v3, not this machine's CPU: no AVX-512 instruction in the AVX2 library nor the
    AVX-VNNI one (a build on an AVX-512 machine died with SIGILL on an AVX2-only one); a CPU without
    AVX2/FMA/F16C/BMI2 gets no library (torch's path) instead of a crash; a CPU with VNNI gets its variant."""
    import platform
    import re
    import subprocess
    from pathlib import Path

    from inaflash import native

    if native.LIB is None or platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("no native library on this machine")
    here = Path(native.__file__).parent
    for name in ("_kernels", "_kernels_avxvnni"):
        for path in here.glob(f"{name}.*so"):
            dump = subprocess.run(["objdump", "-d", str(path)], capture_output=True, text=True)
            if dump.returncode != 0:
                pytest.skip("objdump is not available")
            # AVX-512's marks: zmm registers, the upper 16 of xmm/ymm, mask registers (a -march=native build had 855)
            evex = re.findall(r"zmm|[xy]mm(?:1[6-9]|2[0-9]|3[01])|\{%k[0-7]\}|kmov", dump.stdout)
            assert not evex, (path.name, evex[:5])
    monkeypatch.delenv("INAFLASH_KERNEL", raising=False)  # the choice by CPU, not a variant forced for the run
    monkeypatch.setattr(native, "cpu_flags", lambda: {"sse2", "sse4_2", "avx"})  # an old CPU
    assert native._load() == (None, None)
    monkeypatch.setattr(native, "cpu_flags", lambda: set(native.REQUIRED_FLAGS))
    assert native._load()[1] == "avx2"
    for name, needs, label in native.VARIANTS[:-1]:
        if any(here.glob(f"{name}.*so")):
            monkeypatch.setattr(native, "cpu_flags", lambda: set(native.REQUIRED_FLAGS) | set(needs))
            assert native._load()[1] == label


# every variant's integer dot products are the AVX2 build's exactly (kernels.c: DOT_U8S8, DOT_S16)
VARIANT_OUTPUTS = r"""
import hashlib, sys, torch
from inaflash import native
from inaflash.ffn.kernels import BundleFFN
from inaflash.store import quant
print(native.VARIANT)
h = hashlib.sha256()
for fmt in ("int8", "int4", "palette4", "palette3"):
    for d, n in ((256, 300), (1536, 520)):
        fields = {"gate": (0, d), "up": (d, 2 * d), "down": (2 * d, 3 * d)}
        bundles = torch.randn(n, 3 * d, generator=torch.Generator().manual_seed(d)) * 0.05
        raw, books = quant.encode(fmt, bundles, fields)
        kernel = BundleFFN(fmt, fields, torch.float16, raw.shape[1], d, "silu", True, books=[books] if books else None)
        for T in (1, 3, 9):
            h.update(kernel(torch.randn(T, d, generator=torch.Generator().manual_seed(T)), raw, n).numpy().tobytes())
w = torch.randn(300, 1536, generator=torch.Generator().manual_seed(1))
x = torch.randn(5, 1536, generator=torch.Generator().manual_seed(2))
h.update(quant.Int8Matrix(*quant.Int8Matrix.quantize(w)).linear(x).numpy().tobytes())
h.update(quant.Int4Matrix(quant.Int4Matrix.quantize(w)).linear(x).numpy().tobytes())
print(h.hexdigest())
"""


def test_every_kernel_variant_computes_what_the_avx2_build_does():
    import os
    import subprocess
    import sys

    from inaflash import native

    out = {}
    for label in native.LABELS:
        env = {**os.environ, "INAFLASH_KERNEL": label}
        r = subprocess.run([sys.executable, "-c", VARIANT_OUTPUTS], capture_output=True, text=True, env=env)
        assert r.returncode == 0, r.stderr[-2000:]
        loaded, digest = r.stdout.split()
        if loaded == label:  # built, and this CPU runs it
            out[label] = digest
    if len(out) < 2:
        pytest.skip(f"only {list(out)} runs here")
    assert len(set(out.values())) == 1, out
