"""Damage and faults never become answers: every store file is checked as it is read, I/O faults injected below the
reader (FlashReader.pread, the file layer) are retried within bounds, and what cannot be recovered is a named
error. Generation returns the clean tokens or raises; never other tokens."""

import errno
import os
import shutil

import numpy as np
import pytest

from inaflash.store.convert import write_store
from inaflash.engine import Engine
from inaflash.errors import CorruptStoreError, StoreError
from inaflash.generate import generate_ids
from inaflash.planner import streaming_bytes
from inaflash.reader import READ_ATTEMPTS, FlashReader
from inaflash.store.sources import open_source
from inaflash.store.format import FlashStore
from tiny import make_tiny

PROMPT = [5, 17, 3, 42, 8]
PAGE = 4096


@pytest.fixture(scope="module")
def qwen_store(tmp_path_factory):
    """Untied embedding (embed.bin on flash), int4 FFN bundles, int8 resident matrices."""
    root = tmp_path_factory.mktemp("integrity")
    make_tiny("qwen2", root / "hf")
    return write_store(open_source(root / "hf"), root / "store", ffn_format="int4", resident_format="int8",
                       progress=False)


@pytest.fixture(scope="module")
def clean(qwen_store):
    return greedy(qwen_store)


@pytest.fixture
def copy(qwen_store, tmp_path):
    return shutil.copytree(qwen_store, tmp_path / "copy")


def greedy(path, mode="naive", **options):
    with Engine(FlashStore(path), mode=mode, **options) as e:
        return generate_ids(e, PROMPT, 6, stop=set())[0]


def flip(path, byte, bit=3):
    with open(path, "r+b") as f:
        f.seek(byte)
        b = f.read(1)[0]
        f.seek(byte)
        f.write(bytes([b ^ (1 << bit)]))


def test_a_flipped_bit_in_the_ffn_is_named_in_every_mode(copy):
    store = FlashStore(copy)
    byte = store.layers[1].offset + 3 * store.bundle_bytes + 7  # layer 1, neuron 3
    page = byte // PAGE * PAGE
    flip(copy / "ffn.bin", byte)
    says = f"ffn.bin: bytes {page}-{page + PAGE} do not match their checksums"
    context = min(1024, store.config.max_position_embeddings)
    one_layer = streaming_bytes(store, context) + store.layers[0].span  # hybrid: layer 0 resident
    for mode, options in [("naive", {}), ("dram", {}), ("hybrid", {"memory": one_layer}),
                          ("hybrid", {"memory": 10 ** 9})]:  # dram and resident layers read it at load
        with pytest.raises(CorruptStoreError, match=says):
            greedy(copy, mode, **options)


def test_a_flipped_bit_in_the_embedding_row_of_a_prompt_token(copy):
    store = FlashStore(copy)
    byte = PROMPT[2] * store.embed["row_bytes"] + 5
    flip(copy / "embed.bin", byte)
    with pytest.raises(CorruptStoreError, match=f"embed.bin: bytes {byte // PAGE * PAGE}-"):
        greedy(copy)


@pytest.mark.parametrize("where,says", [
    ("data", "of resident.safetensors does not match its checksum"),
    ("header", "resident.safetensors"),
])
def test_a_flipped_bit_in_the_resident_file(copy, where, says):
    path = copy / "resident.safetensors"
    header = int.from_bytes(path.read_bytes()[:8], "little")
    flip(path, path.stat().st_size - 100 if where == "data" else 8 + header // 2)
    with pytest.raises(StoreError, match=says):
        greedy(copy)


@pytest.mark.parametrize("name,says", [
    ("checksums.safetensors", "checksums.safetensors does not match its sha256"),
    ("manifest.json", "manifest"),
])
def test_a_flipped_bit_in_the_small_files(copy, name, says):
    flip(copy / name, (copy / name).stat().st_size // 2)
    with pytest.raises(StoreError, match=says):
        FlashStore(copy)


def test_a_flipped_bit_in_the_tokenizer(smollm2_store_f16, tmp_path):
    copy = shutil.copytree(smollm2_store_f16, tmp_path / "smol", ignore=shutil.ignore_patterns("ffn.bin"))
    os.link(smollm2_store_f16 / "ffn.bin", copy / "ffn.bin")  # unchanged, not copied (135 MB)
    flip(copy / "tokenizer" / "tokenizer.json", 1000)
    with pytest.raises(StoreError, match="tokenizer/tokenizer.json does not match its sha256"):
        FlashStore(copy).tokenizer()


def test_info_verify_checks_pages_tensors_and_files(copy, capsys, monkeypatch):
    from test_errors import cli

    assert cli(["info", copy, "--verify"], capsys, monkeypatch)[0] == 0
    flip(copy / "ffn.bin", FlashStore(copy).layers[0].offset + 10)
    code, err = cli(["info", copy, "--verify"], capsys, monkeypatch)
    assert code == 1 and "ffn.bin does not match its sha256" in err


class Faults:
    """An injected file layer: the real preadv, then the fault `kind` on the calls it picks."""

    def __init__(self, kind, on=lambda call, offset: True, byte=None):
        self.kind, self.on, self.calls, self.fired, self.byte = kind, on, 0, 0, byte

    def __call__(self, fd, buffers, offset):
        self.calls += 1
        hit = self.on(self.calls, offset)
        self.fired += hit
        if hit and self.kind == "eio":
            raise OSError(errno.EIO, "Input/output error")
        if hit and self.kind == "eintr":
            raise InterruptedError(errno.EINTR, "Interrupted system call")
        if hit and self.kind == "short" and len(buffers[0]) > PAGE:
            return os.preadv(fd, [buffers[0][:PAGE]], offset)
        n = os.preadv(fd, buffers, offset)
        if hit and self.kind == "flip":
            at = min(n - 1, 100) if self.byte is None else self.byte - offset  # `byte`: of the file, where read
            if 0 <= at < n:
                buffers[0][at] ^= 0x10
        return n


@pytest.mark.parametrize("kind,on", [
    ("flip", lambda call, offset: call == 3),  # once: the re-read is clean
    ("short", lambda call, offset: True),  # every read returns one page at most
    ("eintr", lambda call, offset: call % 2 == 1),  # every other call interrupted
    ("eio", lambda call, offset: call == 5),  # one transient I/O error
    ("eio", lambda call, offset: call % 3 == 0),  # every third call: retried, never READ_ATTEMPTS in a row
])
@pytest.mark.parametrize("mode", ["naive", "dram"])
def test_recoverable_faults_give_the_clean_tokens(qwen_store, clean, monkeypatch, kind, on, mode):
    faults = Faults(kind, on)
    monkeypatch.setattr(FlashReader, "pread", staticmethod(faults))
    assert greedy(qwen_store, mode) == clean
    assert faults.fired > 0


def test_a_layer_damaged_once_is_caught_by_the_kernels_hashes_read_again_and_recomputed(qwen_store, clean,
                                                                                        monkeypatch):
    """naive mode reads layers unchecked and the FFN kernel hashes the pages it computes on: a layer damaged on its
    first read is found by those hashes (verify), read again and computed again, and the tokens are the clean ones."""
    store = FlashStore(qwen_store)
    bad = store.layers[1].offset + PAGE + 9
    seen = []
    faults = Faults("flip", lambda call, offset: offset <= bad < offset + 4 * PAGE and not seen and not seen.append(1),
                    byte=bad)
    monkeypatch.setattr(FlashReader, "pread", staticmethod(faults))
    verdicts = []
    verify = FlashReader.verify
    monkeypatch.setattr(FlashReader, "verify", lambda self, *a: verdicts.append(verify(self, *a)) or verdicts[-1])
    assert greedy(qwen_store) == clean
    assert faults.fired == 1 and verdicts.count(True) == 1 and len(verdicts) > 1


def test_persistent_faults_are_named_errors(qwen_store, monkeypatch):
    store = FlashStore(qwen_store)
    bad = store.layers[1].offset + PAGE  # a page of layer 1, damaged on every read
    monkeypatch.setattr(FlashReader, "pread", staticmethod(Faults("flip", byte=bad + 9)))
    with pytest.raises(CorruptStoreError, match=f"ffn.bin: bytes {bad}-{bad + PAGE} do not match their checksums"):
        greedy(qwen_store)
    monkeypatch.setattr(FlashReader, "pread", staticmethod(Faults("eio", lambda c, off: c >= 4)))
    with pytest.raises(StoreError, match=f"after {READ_ATTEMPTS} attempts: Input/output error"):
        greedy(qwen_store)


def test_unchecked_reads_are_a_switch_that_says_so(copy, recwarn):
    flip(copy / "ffn.bin", FlashStore(copy).layers[1].offset + 7)
    assert len(greedy(copy, checksums=False)) == 6  # the damage is read and used, as asked
    assert any("checksums off: data read from the store is not verified" in str(w.message) for w in recwarn.list)


def test_page_checksums_match_an_independent_crc32c(qwen_store):
    import google_crc32c

    store = FlashStore(qwen_store)
    data = (qwen_store / "ffn.bin").read_bytes()
    table = store.page_crcs["ffn.bin"]
    assert table.size == len(data) // PAGE
    for i in np.linspace(0, table.size - 1, 7).astype(int):
        assert table[i] == google_crc32c.value(data[i * PAGE:(i + 1) * PAGE])


def test_the_server_answers_a_damaged_read_with_an_error_and_goes_on(monkeypatch):
    import httpx

    import inaflash
    from test_server import LiveServer

    with inaflash.load(mode="naive") as model:
        server = LiveServer(model)
        try:
            bad = model.engine.store.layers[5].offset + 3 * PAGE
            monkeypatch.setattr(FlashReader, "pread", staticmethod(Faults("flip", byte=bad + 1)))
            body = {"model": model.name, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3,
                    "temperature": 0}
            r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=120)
            assert r.status_code == 500, r.text
            error = r.json()["error"]
            assert error["type"] == "server_error"
            assert f"ffn.bin: bytes {bad}-{bad + PAGE} do not match their checksums" in error["message"]
            monkeypatch.undo()  # the damage was transient: the next request is served
            r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=120)
            assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]
        finally:
            server.stop()
