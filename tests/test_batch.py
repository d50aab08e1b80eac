"""Batched decoding: several sequences in one pass over the weights, each with its own KV cache; every prompt's
greedy tokens are what decoding it alone gives, and under a budget the FFN is read once per pass for all."""

import pytest
import torch

import inaflash
from inaflash.engine import Engine
from inaflash.generate import generate_batch, generate_ids
from inaflash.store.format import FlashStore

PROMPTS = ["The capital of France is", "def fib(n):\n    if n < 2:\n        return n\n    return fib(",
           "Once upon a time, a dragon", "1, 2, 3, 4, 5,"]


@pytest.fixture(scope="module")
def f32(smollm2_store_f32):
    return FlashStore(smollm2_store_f32)


@pytest.mark.parametrize("speculation", ["off", "lookup"])
def test_batched_greedy_equals_each_prompt_alone(f32, speculation):
    """Four prompts of different lengths (so sequences finish at different steps: max tokens 24, 40; one stops at
    its own end of text if it gets there) through generate_batch: each one's tokens equal generate_ids' alone, with
    and without drafts; passes carry several tokens."""
    with Engine(f32, mode="dram", speculation=speculation) as engine:
        ids = [engine.tokenizer(p)["input_ids"] for p in PROMPTS]
        for n in (24, 40):
            alone = [generate_ids(engine, p, n)[0] for p in ids]
            together, stats = generate_batch(engine, ids, n)
            assert together == alone
            assert stats.generated_tokens == sum(len(a) for a in alone)
            assert stats.tokens_per_pass > 1.5  # several sequences per pass


def test_a_batch_reads_the_ffn_once_per_pass_under_a_budget(smollm2_store_f16):
    """naive mode (every layer's FFN streamed): a pass for four sequences reads exactly what a pass for one does,
    so bytes per generated token fall by the batch's width."""
    store = FlashStore(smollm2_store_f16)
    with Engine(store, mode="naive", speculation="off", context=256) as engine:
        ids = [engine.tokenizer(p)["input_ids"] for p in PROMPTS]
        _, one = generate_batch(engine, ids[:1], 12, stop=set())
        _, four = generate_batch(engine, ids, 12, stop=set())
    assert one.bytes_read_per_pass == four.bytes_read_per_pass == store.ffn_read_bytes
    assert one.tokens_per_pass == 1.0 and four.tokens_per_pass == 4.0
    assert four.decode_steps == one.decode_steps == 11
