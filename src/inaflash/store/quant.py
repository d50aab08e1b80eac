"""Compressed weights: the FFN bundle formats on flash, and int8 / int4 matrices for the resident part.

FFN bundle formats (`convert --ffn-format`); each keeps one neuron's bundle contiguous, so one read still fetches a
whole neuron, and is dequantized into the compute dtype as it is read:
  float     the store dtype as is
  int8      int8 codes, a float16 scale per group of 64 weights along each field
  int4      4-bit codes 0..15 (two per byte, low nibble first), per group of 32 a float16 scale and minimum
            (asymmetric, as GGUF's Q4_1: symmetric int4 cost SmolLM2 +20% perplexity, its Q4_1 source being asymmetric)
  palette4  4-bit indices into a per-layer, per-field codebook of 16 float16 centroids found by k-means at convert
  palette3  time (as eDKM, arXiv 2309.00964, clusters weights; here without its training), over weights normalized
            per group of 32 to [0, 1] by a float16 minimum and scale (w = c[i] * scale + min): the codebook places the
            levels where the normalized weights are, where int4 spaces them evenly. palette3: 8 centroids, 3-bit
            indices (8 per 3 bytes). Codebooks live in palettes.safetensors (a few hundred bytes per layer).
            Centroids lie on a grid of 1/127 (PALETTE_LEVELS), so that the native kernel multiplies them as integer
            levels (0..127, int8 activations: the int4 paths with a table lookup); books off the grid (stores
            written before) are computed through torch.
            Measured on SmolLM2 (palette4): one codebook over a layer's raw weights, perplexity 50 -> 388,000 (the
            weights' scale varies along every row); groups normalized by absmax only, 128 (+156%).
int8 scales are rounded *up* to float16, so no code leaves its range and the error is at most half a step:
|w - q * scale| <= scale / 2. int4 groups take the best of a few grids by squared error (fit_int4): never worse than
min/max's half step in total, and exact where the weights already were 4-bit codes (a GGUF's Q4_K).
A field a group does not divide (OPT's 1-wide fc1 bias) is its own group (int8/int4) or stays float16 (palettes).
"""

from __future__ import annotations

import ctypes

import torch

from .. import native


FFN_FORMATS = {
    "float": "bundles in the store's --dtype",
    "int8": "int8, a float16 scale per 64 weights (~8.3 bits/weight)",
    "int4": "4-bit, a float16 scale and minimum per 32 weights (~5 bits/weight)",
    "palette4": "k-means palette of 16 per layer and field, 4-bit indices, scale + minimum per 32 (~5 bits)",
    "palette3": "k-means palette of 8 per layer and field, 3-bit indices, scale + minimum per 32 (~4 bits)",
}
GROUP = {"int8": 64, "int4": 32}  # int8: per-row scales cost SmolLM2 +5.0% perplexity, groups of 64 +0.2%
PALETTE_BITS = {"palette4": 4, "palette3": 3}
PALETTE_GROUP = 32
PALETTE_FILE = "palettes.safetensors"
# centroids are multiples of 1/PALETTE_LEVELS: the kernel's unsigned x signed byte products (maddubs without VNNI)
# stay within int16 for levels <= 127. The grid moves a centroid by <= 1/254 of its group's range, where palette3's
# levels lie ~1/7 apart.
PALETTE_LEVELS = 127


def snap_book(book: torch.Tensor) -> torch.Tensor:
    """Centroids in [0, 1] -> the nearest multiples of 1/PALETTE_LEVELS, float16 (sorted, as they were)."""
    return ((book.float().clamp(0, 1) * PALETTE_LEVELS).round() / PALETTE_LEVELS).sort().values.half()


def book_values(book: torch.Tensor) -> torch.Tensor:
    """What a codebook's centroids are worth, float32: level / 127 exactly where the book is on the grid (the float16
    file holds those to within half a unit in its last place), else its float16 values."""
    levels = book_levels(book)
    if levels is None:
        return book.float()
    return torch.tensor(levels[:book.numel()], dtype=torch.float32) / PALETTE_LEVELS


def book_levels(book: torch.Tensor) -> list[int] | None:
    """A float16 codebook as the kernel's levels (16 bytes, unused entries 0), or None if it is off the grid (within
    float16's rounding of k / 127: half a unit in the last place is up to 0.031 of a level)."""
    v = book.float() * PALETTE_LEVELS
    if (v - v.round()).abs().max().item() > 0.05 or v.min().item() < 0 or v.max().item() > PALETTE_LEVELS + 0.05:
        return None
    levels = v.round().to(torch.int64).tolist()
    return levels + [0] * (16 - len(levels))


def _even(n: int) -> int:
    return n + n % 2


def groups(fields: dict[str, tuple[int, int]], group: int) -> list[tuple[int, int, int]]:
    """(start, end, group size) per field: groups of `group` where the field divides into them, else one group."""
    return [(a, b, group if (b - a) % group == 0 else b - a) for a, b in fields.values()]


def palettized(fields: dict[str, tuple[int, int]]) -> list[str]:
    """The fields a palette format indexes (widths of whole groups, which pack into whole bytes at 3 and 4 bits);
    others stay float16."""
    return [name for name, (a, b) in fields.items() if (b - a) % PALETTE_GROUP == 0]


def _layout(fmt: str, fields: dict[str, tuple[int, int]]) -> tuple[int, int]:
    """(where the float16 group parameters start: the codes' bytes padded to even, how many groups) of a
    compressed bundle; int4 and palettes store per group a scale then (after all scales) a minimum."""
    if fmt in GROUP:
        width = max(b for _, b in fields.values())
        codes = width if fmt == "int8" else sum((b - a + 1) // 2 for a, b in fields.values())
        return _even(codes), sum((b - a) // g for a, b, g in groups(fields, GROUP[fmt]))
    packed = [fields[f] for f in palettized(fields)]
    return (_even(sum((b - a) * PALETTE_BITS[fmt] // 8 for a, b in packed)),
            sum((b - a) // PALETTE_GROUP for a, b in packed))


def bundle_bytes(fmt: str, width: int, fields: dict[str, tuple[int, int]], itemsize: int = 2) -> int:
    """Bytes of one neuron's bundle on flash."""
    if fmt == "float":
        return width * itemsize
    params_at, ngroups = _layout(fmt, fields)
    per_group = 2 if fmt == "int8" else 4  # scale (+ minimum)
    floats = sum(b - a for f, (a, b) in fields.items() if f not in palettized(fields)) if fmt in PALETTE_BITS else 0
    return params_at + per_group * ngroups + 2 * floats


KERNEL_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
KERNEL_FORMATS = {"int8": 3, "int4": 4, "palette4": 5, "palette3": 6}


def kernel_layout(fmt: str, fields: dict[str, tuple[int, int]], dtype: torch.dtype) -> dict | None:
    """Where each field of a bundle starts, in the terms of kernels.c's bundle_layout (byte offsets of each
    field's codes, index of its first group's parameters, group size; where the float16 scales and minimums
    start), or None for a layout the kernel does not compute (palettes with an unindexed field)."""
    names = list(fields)
    if fmt == "float":
        item = dtype.itemsize
        return {"fmt": KERNEL_DTYPES[dtype], "code_off": {f: a * item for f, (a, b) in fields.items()},
                "group_base": dict.fromkeys(names, 0), "group": {f: b - a for f, (a, b) in fields.items()},
                "scale_off": 0, "min_off": 0}
    if fmt not in KERNEL_FORMATS:
        return None
    palette = fmt in PALETTE_BITS
    if palette and palettized(fields) != names:  # the kernel's palettes: every field indexed (SwiGLU, not OPT's bias)
        return None
    code_off, group_base, group, pos, k = {}, {}, {}, 0, 0
    for name, (a, b, g) in zip(names, groups(fields, PALETTE_GROUP if palette else GROUP[fmt])):
        code_off[name] = a if fmt == "int8" else pos
        pos += (b - a) * PALETTE_BITS[fmt] // 8 if palette else (b - a + 1) // 2
        group_base[name], group[name] = k, g
        k += (b - a) // g
    params_at, total = _layout(fmt, fields)
    return {"fmt": KERNEL_FORMATS[fmt], "code_off": code_off, "group_base": group_base, "group": group,
            "scale_off": params_at, "min_off": params_at + 2 * total}


def _scales(x: torch.Tensor, qmax: int, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """absmax / qmax per last-dim group, in `dtype` rounded up (never below the exact value)."""
    exact = x.abs().amax(-1) / qmax
    scale = exact.to(dtype).clamp(min=2 ** -24)
    up = torch.nextafter(scale, torch.tensor(float("inf"), dtype=scale.dtype))
    return torch.where(scale.float() < exact, up, scale)


def _minimum(x: torch.Tensor) -> torch.Tensor:
    """min per last-dim group, as float16 rounded down (never above the exact value)."""
    low = x.amin(-1)
    m = low.half()
    return torch.where(m.float() > low, torch.nextafter(m, torch.tensor(float("-inf"), dtype=m.dtype)), m)


INT4_STRETCH = torch.linspace(-1, 1, 9)  # the candidate grids of fit_int4: (15 + s) steps across a group's range
FIT_ROWS = 1024  # rows fitted at once: the candidates' temporaries stay in cache (~3x faster than a whole layer)


def fit_int4(xg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per group (last dim) of xg [rows, groups, g]: codes 0..15 (float), float16 scale and minimum, with
    w ~ code * scale + min, minimizing the group's squared error over a few candidates (as llama.cpp's
    make_qkx2_quants): the min/max grid (scale rounded up, minimum down: every code in range, error <= half a step),
    and grids of 15 + s steps across the range whose codes are refitted by least squares (scale and minimum).
    A group whose values are already 4-bit codes of some affine grid (a Q4_K GGUF's, whose codes rarely span
    0..15) comes back exact: Qwen2.5's Q4_K gate rows 4.4% -> 0.09% relative error; a Q6_K head 7.8% -> 7.1%."""
    codes, scales, mins = [], [], []
    for x in xg.float().split(FIT_ROWS):
        m = _minimum(x)
        scale = _scales(x - m.float()[..., None], 15)
        q = ((x - m.float()[..., None]) / scale.float()[..., None]).round().clamp(0, 15)
        err = ((q * scale.float()[..., None] + m.float()[..., None] - x) ** 2).sum(-1)
        lo = x.amin(-1, keepdim=True)
        span = (x.amax(-1, keepdim=True) - lo).clamp(min=1e-30)
        g = x.shape[-1]
        sx = x.sum(-1)
        for s in INT4_STRETCH.tolist():
            c = ((x - lo) * ((15 + s) / span)).round_().clamp_(0, 15)
            sc, scc, scx = c.sum(-1), (c * c).sum(-1), (c * x).sum(-1)
            den = g * scc - sc * sc
            ok = den > 0
            step = ((g * scx - sc * sx) / den.clamp(min=1e-30)).half()
            low = ((sx - step.float() * sc) / g).half()
            e = ((c * step.float()[..., None] + low.float()[..., None] - x) ** 2).sum(-1)
            better = ok & (step > 0) & (e < err) & step.isfinite() & low.isfinite()
            q = torch.where(better[..., None], c, q)
            scale, m, err = torch.where(better, step, scale), torch.where(better, low, m), torch.where(better, e, err)
        codes.append(q)
        scales.append(scale)
        mins.append(m)
    return torch.cat(codes), torch.cat(scales), torch.cat(mins)


def _pack4(codes: torch.Tensor) -> torch.Tensor:
    """[n, w] values 0..15 -> [n, ceil(w/2)] bytes, low nibble first."""
    if codes.shape[1] % 2:
        codes = torch.nn.functional.pad(codes, (0, 1))
    c = codes.to(torch.uint8).view(codes.shape[0], -1, 2)
    return c[..., 0] | (c[..., 1] << 4)


def _unpack4(raw: torch.Tensor, w: int) -> torch.Tensor:
    return torch.stack([raw & 15, raw >> 4], -1).view(raw.shape[0], -1)[:, :w]


def _pack3(idx: torch.Tensor) -> torch.Tensor:
    """[n, w] values 0..7 (w % 8 == 0) -> [n, 3w/8] bytes: 8 indices per 24 bits, index k at bits 3k..3k+2."""
    v = idx.to(torch.int32).view(idx.shape[0], -1, 8)
    word = (v << torch.arange(0, 24, 3, dtype=torch.int32)).sum(-1)
    return torch.stack([(word >> s) & 255 for s in (0, 8, 16)], -1).to(torch.uint8).view(idx.shape[0], -1)


def _unpack3(raw: torch.Tensor) -> torch.Tensor:
    b = raw.view(raw.shape[0], -1, 3).to(torch.int32)
    word = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16)
    return ((word[..., None] >> torch.arange(0, 24, 3, dtype=torch.int32)) & 7).view(raw.shape[0], -1)


def kmeans_1d(x: torch.Tensor, k: int, iters: int = 25, sample: int = 1 << 20, seed: int = 0,
              init: torch.Tensor | None = None) -> torch.Tensor:
    """k sorted centroids (float32) of the values of x: Lloyd's algorithm in 1-D on a sample, started from `init`
    (default: quantiles); nearest-centroid assignment is a bucketize against the midpoints. Each iteration lowers
    the sample's squared error, so started from a uniform grid it ends no worse than that grid."""
    v = x.reshape(-1).float()
    if v.numel() > sample:
        v = v[torch.randint(v.numel(), (sample,), generator=torch.Generator().manual_seed(seed))]
    c = torch.quantile(v, (torch.arange(k, dtype=torch.float32) + 0.5) / k) if init is None else init.float()
    for _ in range(iters):
        idx = torch.bucketize(v, (c[1:] + c[:-1]) / 2)
        sums = torch.zeros(k).index_add_(0, idx, v)
        counts = torch.zeros(k).index_add_(0, idx, torch.ones_like(v))
        c = torch.where(counts > 0, sums / counts.clamp(min=1), c).sort().values
    return c


def nearest(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest entry of a sorted codebook, per value."""
    c = codebook.float()
    return torch.bucketize(x.float().contiguous(), (c[1:] + c[:-1]) / 2)


def encode(fmt: str, bundles: torch.Tensor, fields: dict[str, tuple[int, int]]
           ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """[n, width] float -> ([n, bundle_bytes] uint8, this layer's codebooks by field (palettes; else empty))."""
    n, width = bundles.shape
    x = bundles.float()
    out = torch.zeros(n, bundle_bytes(fmt, width, fields), dtype=torch.uint8)
    if fmt in GROUP:
        pos, scales, mins = 0, [], []
        for a, b, g in groups(fields, GROUP[fmt]):
            xg = x[:, a:b].reshape(n, (b - a) // g, g)
            if fmt == "int8":
                scale = _scales(xg, 127)
                codes = (xg / scale.float()[..., None]).round().clamp(-127, 127).reshape(n, b - a)
                out[:, a:b] = codes.to(torch.int8).view(torch.uint8)
            else:
                codes, scale, m = fit_int4(xg)
                packed = _pack4(codes.reshape(n, b - a))
                out[:, pos:pos + packed.shape[1]] = packed
                pos += packed.shape[1]
                mins.append(m)
            scales.append(scale)
        out[:, _layout(fmt, fields)[0]:] = torch.cat(scales + mins, 1).view(torch.uint8)
        return out, {}
    books, idx, scales, lows = {}, {}, {}, {}
    for name in palettized(fields):
        a, b = fields[name]
        xg = x[:, a:b].reshape(n, -1, PALETTE_GROUP)
        lows[name] = _minimum(xg)
        scales[name] = _scales(xg - lows[name].float()[..., None], 1)  # rounded up: normalized within [0, 1]
        normalized = ((xg - lows[name].float()[..., None]) / scales[name].float()[..., None]).reshape(n, b - a)
        k = 1 << PALETTE_BITS[fmt]
        books[name] = snap_book(kmeans_1d(normalized, k, init=torch.linspace(0, 1, k)))
        idx[name] = nearest(normalized, book_values(books[name]))
    return pack_palette(fmt, x, fields, idx, scales, lows), books


def pack_palette(fmt: str, bundles: torch.Tensor, fields: dict[str, tuple[int, int]], idx: dict, scales: dict,
                 lows: dict) -> torch.Tensor:
    """A palette layer's bytes from its fit (k-means in encode, or store/dkm.py): per palettized field each weight's
    level index [n, width of the field] and its groups' float16 scale and minimum [n, groups]; the other fields'
    float16 values from `bundles`."""
    n, width = bundles.shape
    out = torch.zeros(n, bundle_bytes(fmt, width, fields), dtype=torch.uint8)
    pos = 0
    for name in palettized(fields):
        packed = _pack4(idx[name]) if PALETTE_BITS[fmt] == 4 else _pack3(idx[name])
        out[:, pos:pos + packed.shape[1]] = packed
        pos += packed.shape[1]
    pos, ngroups = _layout(fmt, fields)
    if scales:
        names = palettized(fields)
        out[:, pos:pos + 4 * ngroups] = torch.cat([scales[k] for k in names] + [lows[k] for k in names],
                                                  1).view(torch.uint8)
    pos += 4 * ngroups
    for name, (a, b) in fields.items():
        if name not in scales:
            out[:, pos:pos + 2 * (b - a)] = bundles[:, a:b].half().contiguous().view(torch.uint8)
            pos += 2 * (b - a)
    return out


def decode(fmt: str, raw: torch.Tensor, fields: dict[str, tuple[int, int]], width: int, dtype: torch.dtype,
           books: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """[m, bundle_bytes] uint8 -> [m, width] `dtype`: codes times their group's scale, or codebook entries (float
    bundles: the bytes viewed as `dtype`, no copy)."""
    m = raw.shape[0]
    if fmt == "float":
        return raw.view(dtype).view(m, width)
    out = torch.empty(m, width, dtype=dtype)
    if fmt in GROUP:
        params_at, total = _layout(fmt, fields)
        params = raw[:, params_at:].contiguous().view(torch.float16).to(dtype)
        scales, mins = params[:, :total], params[:, total:]
        k, pos = 0, 0
        for a, b, g in groups(fields, GROUP[fmt]):
            count = (b - a) // g
            dst = out[:, a:b].view(m, count, g)
            if fmt == "int8":
                codes = raw[:, a:b].view(torch.int8).to(dtype)
                torch.mul(codes.view(m, count, g), scales[:, k:k + count, None], out=dst)
            else:
                nb = (b - a + 1) // 2
                codes = _unpack4(raw[:, pos:pos + nb], b - a).to(dtype)
                torch.mul(codes.view(m, count, g), scales[:, k:k + count, None], out=dst)
                dst += mins[:, k:k + count, None]
                pos += nb
            k += count
        return out
    bits, pos, packed = PALETTE_BITS[fmt], 0, palettized(fields)
    index_bytes, ngroups = _layout(fmt, fields)
    params = raw[:, index_bytes:index_bytes + 4 * ngroups].contiguous().view(torch.float16).to(dtype)
    scales, lows = params[:, :ngroups], params[:, ngroups:]
    k = 0
    for name in packed:
        a, b = fields[name]
        nb, count = (b - a) * bits // 8, (b - a) // PALETTE_GROUP
        idx = _unpack4(raw[:, pos:pos + nb], b - a) if bits == 4 else _unpack3(raw[:, pos:pos + nb])
        values = book_values(books[name]).to(dtype)[idx.long()].view(m, count, PALETTE_GROUP)
        dst = out[:, a:b].view(m, count, PALETTE_GROUP)
        torch.mul(values, scales[:, k:k + count, None], out=dst)
        dst += lows[:, k:k + count, None]
        pos += nb
        k += count
    pos = index_bytes + 4 * ngroups
    for name, (a, b) in fields.items():
        if name not in packed:
            out[:, a:b] = raw[:, pos:pos + 2 * (b - a)].contiguous().view(torch.float16).to(dtype)
            pos += 2 * (b - a)
    return out


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 x [..., cols] -> (int8 codes, bfloat16 scale per row): scale = absmax / 127 in bfloat16, codes =
    round(x / scale) clamped to +-127 (a scale rounded down costs at most a 2^-8 relative overshoot, clamped).
    Few passes: the neuron cache quantizes each neuron it takes in."""
    scale = (x.abs().amax(-1) / 127).clamp_(min=1e-30).to(torch.bfloat16)
    codes = (x * scale.float().reciprocal().unsqueeze(-1)).round_().clamp_(-127, 127).to(torch.int8)
    return codes, scale


MATVEC = native.function("inaflash_int8_matvec", ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                         ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int)


class Int8Matrix:
    """A resident weight matrix [rows, cols] as int8 codes with a per-row scale: w ~ codes * scale[:, None].

    Multiplied without dequantizing by the native kernel, for any number of tokens (activations quantized to int8
    per 32, as llama.cpp's Q8; each row's codes stay in L1 while every token meets them): Qwen2.5's 151936 x 1536
    head in 9.3 ms vs 16.2 ms with torch's int8pack (`python bench/resident_int8.py`,
    bench/results/2026-11-24-resident-int8.md). Without it, or for a width that is not a multiple of 32, rows are
    decoded to float32 in blocks and multiplied by torch.
    torch's own weight-only kernel (`_weight_int8pack_mm`) is not used: under torch 2.13's AVX-512 kernels it read
    weights at offsets that are not a multiple of 64 bytes with aligned loads (SIGSEGV: safetensors lays tensors at
    8-byte offsets), and for 40 columns it returned inf, then crashed. Row lookups (embeddings) dequantize only those
    rows."""

    BLOCK = 8192  # rows decoded at once by the torch path

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor):
        self.codes, self.scales = codes.contiguous(), scales.contiguous()

    @classmethod
    def quantize(cls, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes int8, scales bfloat16, the kernel's dtype) for w [rows, cols]: see quantize_rows."""
        return quantize_rows(w.float())

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, cols] float -> [T, rows] float32."""
        rows, cols = self.codes.shape
        x = x.float().contiguous()
        out = torch.empty(x.shape[0], rows)
        if MATVEC is not None and cols % 32 == 0 and \
                MATVEC(self.codes.data_ptr(), self.scales.data_ptr(), rows, cols, x.data_ptr(), x.shape[0],
                       out.data_ptr(), torch.get_num_threads()) == 0:
            return out
        for i in range(0, rows, self.BLOCK):
            out[:, i:i + self.BLOCK] = x @ self[i:i + self.BLOCK].T
        return out

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.scales.nbytes

    def first_rows(self, n: int) -> Int8Matrix:
        """The first n rows as a matrix of their own (a cut head: the rest is freed once nothing holds it)."""
        return Int8Matrix(self.codes[:n].clone(), self.scales[:n].clone())

    @property
    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.codes, self.scales

    def __getitem__(self, ids: torch.Tensor | slice) -> torch.Tensor:
        """Rows `ids` (token ids, or a slice of rows) dequantized to float32."""
        return self.codes[ids].float() * self.scales[ids].float()[..., None]


MATVEC4 = native.function("inaflash_int4_matvec", ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                          ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int)


class Int4Matrix:
    """A resident weight matrix [rows, cols] in the FFN's int4 format, each row one int4 field: cols / 2 bytes of
    codes, a float16 scale and minimum per 32 weights (~5 bits per weight: Qwen2.5-1.5B's attention and tied head
    take 218 MB where int8 takes 390). Stored as that uint8 [rows, row_bytes] tensor; a uint8 matrix in the resident
    file is int4 by its dtype, its width cols = row_bytes * 8 / 5.

    Multiplied without dequantizing by the native kernel for any number of tokens (activations quantized to int8 per
    32, as for int4 bundles; a row's codes stay in L1 while every token meets them); without it, rows are decoded to
    float32 in blocks and multiplied by torch. Row lookups (a tied embedding) decode only those rows."""

    BLOCK = 8192  # rows decoded at once by the torch path (the head would be a 933 MB float32 copy)

    def __init__(self, raw: torch.Tensor):
        self.raw = raw.contiguous()
        self.cols = raw.shape[1] * 8 // 5
        self.fields = {"w": (0, self.cols)}
        if raw.dtype != torch.uint8 or raw.dim() != 2 or self.cols % 64 \
                or bundle_bytes("int4", self.cols, self.fields) != raw.shape[1]:
            raise ValueError(f"not an int4 matrix: {raw.dtype} {tuple(raw.shape)}")

    @classmethod
    def quantize(cls, w: torch.Tensor) -> torch.Tensor:
        """float w [rows, cols] (cols % 64 == 0) -> the stored uint8 [rows, row_bytes], in blocks of rows."""
        fields = {"w": (0, w.shape[1])}
        return torch.cat([encode("int4", b, fields)[0] for b in w.split(cls.BLOCK)])

    def decode(self, rows: torch.Tensor) -> torch.Tensor:
        return decode("int4", rows, self.fields, self.cols, torch.float32)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, cols] float -> [T, rows] float32."""
        x = x.float().contiguous()
        out = torch.empty(x.shape[0], self.raw.shape[0])
        if MATVEC4 is not None and MATVEC4(self.raw.data_ptr(), self.raw.shape[0], self.cols, self.raw.shape[1],
                                           x.data_ptr(), x.shape[0], out.data_ptr(), torch.get_num_threads()) == 0:
            return out
        for i, block in enumerate(self.raw.split(self.BLOCK)):
            out[:, i * self.BLOCK:i * self.BLOCK + block.shape[0]] = x @ self.decode(block).T
        return out

    @property
    def nbytes(self) -> int:
        return self.raw.nbytes

    def first_rows(self, n: int) -> Int4Matrix:
        """The first n rows as a matrix of their own (a cut head: the rest is freed once nothing holds it)."""
        return Int4Matrix(self.raw[:n].clone())

    @property
    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.raw,)

    def __getitem__(self, ids: torch.Tensor) -> torch.Tensor:
        return self.decode(self.raw[ids.reshape(-1)]).view(*ids.shape, self.cols)
