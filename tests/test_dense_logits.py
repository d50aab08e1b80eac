"""dram, naive and hybrid modes reproduce transformers' logits (float32) for a prompt and 8 cached decode steps."""

import pytest
import torch

from inaflash.engine import Engine
from inaflash.store.sources import open_source
from inaflash.store.format import FlashStore
from inaflash.store.convert import write_store
from tiny import make_tiny

KINDS = ["llama", "qwen2", "opt", "opt-postnorm"]


@pytest.fixture(scope="module", params=KINDS)
def tiny(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    hf = make_tiny(request.param, root / "hf")
    store = write_store(open_source(root / "hf"), root / "store", dtype="float32", progress=False)
    return hf, FlashStore(store)


def hf_logits(model, prompt, steps):
    """Prompt logits, then greedy decode steps through transformers' KV cache."""
    with torch.no_grad():
        out = model(torch.tensor([prompt]), use_cache=True)
        logits = [out.logits[0]]
        past, token = out.past_key_values, int(out.logits[0, -1].argmax())
        for _ in range(steps):
            out = model(torch.tensor([[token]]), past_key_values=past, use_cache=True)
            past = out.past_key_values
            logits.append(out.logits[0])
            token = int(out.logits[0, -1].argmax())
    return logits


@pytest.mark.parametrize("mode", ["dram", "naive", "hybrid"])
def test_logits_match_transformers(tiny, mode):
    hf, store = tiny
    prompt = [3, 17, 42, 5, 88, 9, 61]
    ref = hf_logits(hf, prompt, steps=8)
    memory = None
    if mode == "hybrid":  # room for exactly one layer's FFN in DRAM: the other is streamed
        from inaflash.planner import streaming_bytes

        context = min(1024, store.config.max_position_embeddings)
        memory = streaming_bytes(store, context) + store.layers[0].nbytes + 100
    with Engine(store, mode=mode, memory=memory) as engine:
        if mode == "hybrid":
            assert engine.ffn.resident_layers == [0]
            assert engine.ffn.flash.streamed == list(range(1, store.config.num_layers))
        engine.reset(len(prompt) + 9)
        got = [engine.forward(torch.tensor(prompt), 0)]
        pos = len(prompt)
        for _ in range(8):
            token = int(got[-1][-1].argmax())
            got.append(engine.forward(torch.tensor([token]), pos))
            pos += 1
    for step, (a, b) in enumerate(zip(got, ref)):
        assert a.shape == b.shape
        err = (a - b).abs().max().item()
        assert err < 1e-4, f"step {step}: max |logit diff| {err}"
