"""Speculation: prompt-lookup drafts verified in one forward pass. Greedy output is plain decoding's token for
token where the arithmetic is exact; sampled tokens keep the model's distribution; the policy drafts only where its
cost model says a wider pass pays."""

import pytest
import torch

import inaflash
from inaflash.generate import distribution, verify
from inaflash.speculate import DraftPolicy, PassCosts, lookup


def test_lookup_proposes_what_followed_the_latest_earlier_occurrence():
    h = [5, 1, 2, 3, 9, 9, 1, 2, 3, 4, 8, 1, 2, 3]
    assert lookup(h, 3) == [4, 8, 1]  # the suffix 1 2 3 last occurred before 4 8 1 (not the earlier 9 9)
    assert lookup(h, 1) == [4]
    assert lookup([1, 2, 3, 4], 3) == []  # nothing recurs
    assert lookup([7, 7], 4) == []  # a suffix of 1 token is not looked up
    assert lookup([1, 2, 1, 2], 5) == [1, 2]  # only what exists


def test_policy_drafts_where_a_wide_pass_is_cheap_and_not_where_it_costs_its_width():
    streaming, dram = PassCosts(), PassCosts()
    for w in range(1, 10):
        streaming.record(w, 0.2 * (1 + 0.03 * (w - 1)))  # under a budget: reads dominate (Qwen2.5 hybrid)
        dram.record(w, 0.04 * (1 + 0.9 * (w - 1)))  # in DRAM: compute grows with the width
    assert DraftPolicy(streaming, accept_rate=0.7).length(8) >= 4
    assert DraftPolicy(streaming, accept_rate=0.05).length(8) == 0  # not even one token at 5%
    assert DraftPolicy(dram, accept_rate=0.5).length(8) == 0
    assert DraftPolicy(streaming, accept_rate=0.7).length(2) == 2  # no more than was found
    assert DraftPolicy(PassCosts()).length(8) >= 1  # before any wide pass ran: it explores (else it never learns)
    p = DraftPolicy(streaming, accept_rate=0.9)
    for _ in range(30):
        p.update(4, 0)  # drafts keep failing: the rate falls, drafting stops
    assert p.accept_rate < 0.05 and p.length(8) == 0


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_speculative_sampling_keeps_the_distribution(temperature, top_p):
    """The token verify() emits for a draft is distributed as plain sampling's, whichever token was drafted:
    100,000 draws per draft against p, within 4 standard errors for every token."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, 1.5])
    p = distribution(logits, temperature, top_p)
    g = torch.Generator().manual_seed(0)
    n = 100_000
    for draft in (0, 3, 4):  # the most likely, an unlikely one, one top_p may cut
        counts = torch.zeros(len(logits), dtype=torch.float64)
        for _ in range(n):
            counts[verify(logits, draft, temperature, top_p, g)] += 1
        se = (p * (1 - p) / n).sqrt()
        assert ((counts / n - p).abs() <= 4 * se + 1e-12).all(), (draft, counts / n, p)


PROMPT = ("def area(width, height):\n    return width * height\n\n"
          "Rename width to w and height to h in this function:\n\ndef area(width, height):\n    return width")


@pytest.fixture(scope="module")
def f32_model(smollm2_store_f32):
    with inaflash.load(smollm2_store_f32, mode="dram") as m:
        yield m


def test_greedy_with_speculation_is_plain_greedy_token_for_token(f32_model, monkeypatch):
    """A float32 store (exact arithmetic up to summation order): the same 64 greedy tokens with and without
    speculation, with drafts drafted and accepted (the prompt's code is repeated), in fewer passes. The pass costs
    are pinned to a streaming mode's (in dram a wide pass costs its width and the policy would not draft)."""
    from inaflash.generate import generate_ids

    engine = f32_model.engine
    ids = engine.tokenizer(PROMPT)["input_ids"]
    monkeypatch.setattr(engine, "options", inaflash.Options.of(engine.options, speculation="off"))
    plain, s0 = generate_ids(engine, ids, 64, stop=set())
    monkeypatch.setattr(engine, "options", inaflash.Options.of(engine.options, speculation="lookup"))
    engine.pass_costs.seconds.update({w: 1.0 + 0.02 * (w - 1) for w in range(1, 10)})
    monkeypatch.setattr(engine.pass_costs, "record", lambda width, seconds: None)
    spec, s1 = generate_ids(engine, ids, 64, stop=set())
    assert spec == plain
    assert s0.tokens_per_pass == 1.0 and s0.drafted_tokens == 0
    assert s1.drafted_tokens > 0 and s1.accepted_tokens > 0 and s1.decode_steps < s0.decode_steps
    assert s1.tokens_per_pass == pytest.approx(63 / s1.decode_steps)
    print(f"\n{s1.decode_steps} passes for 64 tokens ({s1.accepted_tokens} of {s1.drafted_tokens} drafts accepted)")
