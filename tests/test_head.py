"""--head flash: the output head (and a tied embedding) read from flash every pass instead of held in DRAM: the same
logits and tokens, the head's bytes read per pass on top of the FFN's, a budget that frees its bytes, pages
checked."""

import shutil

import pytest
import torch

from inaflash import streamed
from inaflash.errors import BudgetError, CorruptStoreError, InaflashError
from inaflash.store.format import FlashStore
from tiny import make_tiny


def _store(root, kind, resident_format, **overrides):
    from inaflash.store.convert import write_store
    from inaflash.store.sources import open_source

    make_tiny(kind, root / "hf", **overrides)
    return FlashStore(write_store(open_source(root / "hf"), root / "store", dtype="float32", progress=False,
                                  resident_format=resident_format))


# llama: tied (the head is the embedding), 20000 ids; qwen2: untied (the embedding on flash apart)
STORES = {"llama-int4": ("llama", "int4", {"vocab_size": 20000}), "llama-float": ("llama", "float", {}),
          "qwen2-int4": ("qwen2", "int4", {})}


@pytest.fixture(scope="module", params=list(STORES))
def store(request, tmp_path_factory):
    kind, fmt, overrides = STORES[request.param]
    return _store(tmp_path_factory.mktemp(request.param), kind, fmt, **overrides)


def _run(engine, prompt, n=12):
    from inaflash.generate import generate_ids

    engine.reset(len(prompt) + 1)
    logits = engine.forward(torch.tensor(prompt), 0)
    ids, _ = generate_ids(engine, prompt, n, stop=set())
    return logits, ids


def test_the_head_from_flash_computes_what_the_resident_head_does(store, monkeypatch):
    """Slices of a few rows (many reads, the next read while one is multiplied): the logits of every prompt position
    are the resident head's (int4: the same kernel on the same rows, equal; float: within float32 rounding) and
    the greedy tokens the same; a tied head looks the embedding's rows up from flash too."""
    from inaflash.engine import Engine

    monkeypatch.setattr(streamed, "SLICE_BYTES", 1024)
    prompt = [3, 17, 42, 5, 88, 9, 61, 2, 3, 17]
    with Engine(store, mode="naive", head="dram", speculation="off") as resident:
        want, want_ids = _run(resident, prompt)
    with Engine(store, mode="naive", head="flash", speculation="off") as engine:
        assert isinstance(engine.model.head, streamed.FlashMatrix) and len(engine.head.slices) > 1
        assert (engine.model.embed is engine.model.head) == store.config.tie_word_embeddings
        got, ids = _run(engine, prompt)
    assert ids == want_ids
    if store.resident_format == "int4":
        assert torch.equal(got, want)
    else:
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)


def test_a_pass_reads_the_head_beside_the_ffn(store):
    """One token: what the head adds to a naive pass's reads is the head itself, in whole pages (at most two more
    per slice and per looked-up row)."""
    from inaflash.engine import Engine

    _, head_bytes, _ = store.resident_span(store.head_name())

    def one_pass(head):
        with Engine(store, mode="naive", head=head, speculation="off") as engine:
            engine.reset(8)
            engine.forward(torch.tensor([5, 6]), 0)
            before = engine.counters()
            engine.forward(torch.tensor([7]), 2)
            return (engine.counters() - before).io.bytes, engine

    resident, _ = one_pass("dram")
    flashed, engine = one_pass("flash")
    extra_pages = 2 * (len(engine.head.slices) + store.config.tie_word_embeddings)
    assert head_bytes <= flashed - resident <= head_bytes + extra_pages * 4096


def test_a_budget_without_room_for_the_head_reads_it(tmp_path, monkeypatch):
    """--head auto: a budget below naive's minimum with the head in DRAM, but above it with the head read, opens
    with the head on flash and a plan within the budget that holds the head's buffers instead of the head; --head
    dram refuses it with the minimum; below the minimum with the head read, it is refused."""
    from inaflash.engine import Engine
    from inaflash.planner import plan_dense

    monkeypatch.setattr(streamed, "SLICE_BYTES", 1 << 16)  # (a head of 0.8 MB in slices of 64 KB)
    store = _store(tmp_path, "llama", "int4", vocab_size=20000)
    name = store.head_name()
    _, head_bytes, _ = store.resident_span(name)
    least = plan_dense(store, "naive", None, 64).planned_bytes
    buffers = streamed.dram_bytes(store, name)
    assert buffers < head_bytes
    budget = least - 1
    with pytest.raises(BudgetError, match="too small for naive mode"):
        Engine(store, mode="naive", memory=budget, context=64, head="dram")
    with Engine(store, mode="naive", memory=budget, context=64) as engine:
        assert engine.head is not None
        assert engine.plan.resident_bytes == store.resident_bytes - head_bytes
        assert engine.plan.budget_bytes == budget and engine.plan.planned_bytes <= budget
    smallest = least - head_bytes + buffers
    with pytest.raises(BudgetError, match=f"too small even with the output head read from flash: the smallest plan "
                                          rf"\(naive\) needs at least {smallest / 1e6:.1f} MB"):
        Engine(store, mode="naive", memory=smallest - 1, context=64)
    with pytest.raises(InaflashError, match="--head flash reads a float or int4 head in naive or hybrid mode"):
        Engine(store, mode="dram", head="flash")


def test_a_damaged_head_is_found_when_it_is_first_read(tmp_path):
    """A flipped byte inside the head's bytes of resident.safetensors: the engine reading the head from flash
    refuses the store at open (the head's checksum over its first full read), naming the file."""
    from inaflash.engine import Engine

    store = _store(tmp_path, "llama", "int4", vocab_size=20000)
    damaged = tmp_path / "damaged"
    shutil.copytree(store.path, damaged)
    offset, nbytes, _ = store.resident_span(store.head_name())
    path = damaged / "resident.safetensors"
    data = bytearray(path.read_bytes())
    data[offset + nbytes // 2] ^= 0x40
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptStoreError, match="resident.safetensors"):
        Engine(FlashStore(damaged), mode="naive", head="flash")


def test_a_head_damaged_after_open_is_found_by_the_pass_that_reads_it(tmp_path):
    """The head's pages are checked on every pass against the CRCs taken when it was first read: a byte flipped in
    the file while the engine runs stops the next pass with CorruptStoreError instead of wrong logits."""
    from inaflash.engine import Engine

    store = _store(tmp_path, "llama", "int4", vocab_size=20000)
    offset, nbytes, _ = store.resident_span(store.head_name())
    path = store.path / "resident.safetensors"
    with Engine(store, mode="naive", head="flash", speculation="off") as engine:
        engine.reset(8)
        engine.forward(torch.tensor([5, 6]), 0)
        with open(path, "r+b") as f:
            f.seek(offset + nbytes - 100)
            byte = f.read(1)
            f.seek(offset + nbytes - 100)
            f.write(bytes([byte[0] ^ 0x01]))
        with pytest.raises(CorruptStoreError, match="resident.safetensors"):
            engine.forward(torch.tensor([7]), 2)
