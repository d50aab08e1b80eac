"""Speculation: prompt-lookup drafts verified in one forward pass. Greedy output is plain decoding's token for
token where the arithmetic is exact; sampled tokens keep the model's distribution; the policy drafts only where its
cost model says a wider pass pays."""

import time

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


# --- a draft model (speculation "draft") ---

def _tiny_store(kind, root, seed):
    from inaflash.store.convert import write_store
    from inaflash.store.format import FlashStore
    from inaflash.store.sources import open_source
    from tiny import make_tiny

    make_tiny(kind, root / "hf", seed=seed)
    return FlashStore(write_store(open_source(root / "hf"), root / "store", dtype="float32", progress=False))


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    """A tiny float32 Qwen2 target (untied head) and another (other weights, same vocabulary) as its draft model."""
    return (_tiny_store("qwen2", tmp_path_factory.mktemp("target"), 0),
            _tiny_store("qwen2", tmp_path_factory.mktemp("draft"), 1))


def _streaming_costs(engine, monkeypatch):
    """Pass costs pinned to a streaming mode's (in dram a wide pass costs its width and the policy would not draft)."""
    engine.pass_costs.seconds.update({w: 1.0 + 0.02 * (w - 1) for w in range(1, 10)})
    monkeypatch.setattr(engine.pass_costs, "record", lambda width, seconds: None)


@pytest.mark.parametrize("which,vocab", [("other", 0), ("other", 40), ("itself", 0)])
def test_greedy_with_a_draft_model_is_plain_greedy_token_for_token(tiny_pair, which, vocab, monkeypatch):
    """Whatever the draft model proposes (another model's guesses, ids cut to the head's first 40, or the target
    itself, whose every draft the target accepts), greedy output is plain decoding's on a float32 store. The prompt
    (40 tokens) reaches the draft model in two chunks of up to DRAFT_CHUNK, the chunk its working memory is planned
    for."""
    from inaflash.engine import Engine
    from inaflash.generate import generate_ids
    from inaflash.speculate import DRAFT_CHUNK

    target, draft = tiny_pair
    draft = target if which == "itself" else draft
    prompt = [3, 17, 42, 5, 88, 9, 61, 2] * 5
    assert len(prompt) > DRAFT_CHUNK
    with Engine(target, mode="dram", speculation="off") as plain_engine:
        plain, _ = generate_ids(plain_engine, prompt, 16, stop=set())
    with Engine(target, mode="dram", speculation="draft", draft_store=draft, draft_vocab=vocab) as engine:
        assert engine.draft is not None and engine.draft_bytes > 0
        if vocab:
            assert engine.draft.model.head.shape[0] == vocab  # a float store's head: a tensor, cut
        if which == "itself":  # the same store: the draft model plans a pass of DRAFT_CHUNK tokens, not 256
            assert engine.draft.plan.working_bytes < engine.plan.working_bytes
        _streaming_costs(engine, monkeypatch)
        spec, s = generate_ids(engine, prompt, 16, stop=set())
    assert spec == plain
    assert s.drafted_tokens > 0  # (random weights: another model's drafts are rejected, then no longer drafted)
    if which == "itself":  # the same model agrees with every draft: fewer passes
        assert s.accepted_tokens == s.drafted_tokens and s.decode_steps < 15
    print(f"\n{which}: {s.decode_steps} passes for 16 tokens ({s.accepted_tokens} of {s.drafted_tokens} accepted)")


def test_a_draft_model_is_planned_within_the_budget(tiny_pair):
    """The draft model's bytes come out of --memory before the target plans (hybrid holds fewer layers' FFN); the
    plan's total counts them; a budget the draft model leaves too little of is refused naming the draft model."""
    from inaflash.engine import Engine
    from inaflash.errors import BudgetError
    from inaflash.planner import plan_dense

    target, draft = tiny_pair
    least = plan_dense(target, "hybrid", None, 64).planned_bytes - plan_dense(target, "hybrid", None, 64).cache_bytes
    budget = least + target.ffn_bytes  # every layer's FFN fits beside the streaming buffers, without a draft model
    with Engine(target, mode="hybrid", memory=budget, context=64, speculation="off") as alone:
        assert alone.plan.ffn_layers == target.config.num_layers
    with Engine(target, mode="dram", context=64, speculation="draft", draft_store=draft) as unbounded:
        d = unbounded.draft_bytes
    # room for the draft model and all but (a little of) one layer's FFN
    with Engine(target, mode="hybrid", memory=budget + d - 1, context=64, speculation="draft", draft_store=draft) as both:
        assert 0 < both.plan.draft_bytes == both.draft_bytes == d
        assert both.plan.ffn_layers == target.config.num_layers - 1
        assert both.plan.planned_bytes <= budget + d - 1
    with pytest.raises(BudgetError, match="too small for hybrid mode.*; the draft model took"):
        Engine(target, mode="hybrid", memory=least + d - 1000, context=64, speculation="draft", draft_store=draft)


def test_a_draft_model_with_another_tokenizer_is_refused(tiny_pair, smollm2_store_f32):
    from inaflash.engine import Engine
    from inaflash.errors import InaflashError
    from inaflash.generate import generate_ids
    from inaflash.store.format import FlashStore

    with pytest.raises(InaflashError, match="another tokenizer"):
        Engine(tiny_pair[0], mode="dram", speculation="draft", draft_store=FlashStore(smollm2_store_f32))
    with pytest.raises(InaflashError, match="needs a draft model"):
        inaflash.Options(speculation="draft")
    with Engine(tiny_pair[0], mode="dram", speculation="off") as engine:  # switched to draft without loading one
        engine.options = inaflash.Options.of(engine.options, speculation="draft", draft="somewhere")
        with pytest.raises(InaflashError, match="without a draft model"):
            generate_ids(engine, [3, 17, 42], 4)


def test_a_batch_with_a_draft_model_gives_each_prompt_its_plain_greedy_tokens(tiny_pair, monkeypatch):
    """Every sequence of a batch drafts from a draft-model cache of its own in the one decode step: each prompt's
    greedy tokens are what plain decoding of it alone gives, with drafts accepted (the target as its own draft)."""
    from inaflash.engine import Engine
    from inaflash.generate import generate_batch, generate_ids

    target, _ = tiny_pair
    prompts = [[3, 17, 42, 5], [88, 9, 61, 2, 7, 7], [1, 2, 3]]
    with Engine(target, mode="dram", speculation="off") as plain_engine:
        alone = [generate_ids(plain_engine, p, 24, stop=set())[0] for p in prompts]
    with Engine(target, mode="dram", speculation="draft", draft_store=target, parallel=3) as engine:
        _streaming_costs(engine, monkeypatch)
        out, stats = generate_batch(engine, prompts, 24, stop=set())
    assert out == alone
    assert stats.tokens_per_pass > len(prompts)  # more than one token per sequence per pass


def test_a_step_s_time_counts_the_drafting(tiny_pair, monkeypatch):
    """decode_step's seconds (what ms_per_token and tokens/s are made of) include the draft model's work, not only the
    verification pass: a draft model's forward passes are part of what speculation costs (they were left out once,
    which overstated its speed-up). The pass alone is what pass_costs records."""
    from inaflash.engine import Engine
    from inaflash.generate import GenerationStats, stream_ids
    from inaflash.speculate import DraftModel

    slow = 0.05
    propose = DraftModel.propose

    def slow_propose(self, history, k):
        time.sleep(slow)
        return propose(self, history, k)

    target, _ = tiny_pair
    calls = []
    monkeypatch.setattr(DraftModel, "propose", lambda self, h, k: calls.append(k) or slow_propose(self, h, k))
    with Engine(target, mode="dram", speculation="draft", draft_store=target) as engine:
        _streaming_costs(engine, monkeypatch)
        stats = GenerationStats()
        list(stream_ids(engine, [3, 17, 42, 5, 88, 9], 12, stats=stats, stop=set()))
    produced = stats.generated_tokens - 1
    assert calls and stats.ms_per_token * produced >= len(calls) * slow * 1e3


def test_the_draft_model_stops_after_a_token_it_is_unsure_of(tiny_pair):
    """A draft ends with the first token the draft model gives less than min_p (its probabilities checked here
    against a forward of its own); with min_p 0 it drafts all k. Either way the tokens are its greedy choices."""
    from inaflash.engine import Engine
    from inaflash.speculate import DraftModel

    _, draft = tiny_pair
    history = [3, 17, 42, 5, 88, 9]
    with Engine(draft, mode="dram", speculation="off") as engine:
        full = DraftModel(engine, 64, 4, min_p=0.0).propose(history, 6)
        assert len(full) == 6
        engine.reset(64)
        logits = engine.forward(torch.tensor(history + full), 0)[len(history) - 1:]
        assert [int(x) for x in logits.argmax(-1)[:6]] == full  # greedy, token by token
        p = torch.softmax(logits, -1).max(-1).values[:6]
        for min_p in (float(p[0]) + 1e-6, float(p[:3].max()) + 1e-6, float(p.min()) - 1e-6):
            cut = DraftModel(engine, 64, 4, min_p=min_p).propose(history, 6)
            stop = next((i for i in range(6) if float(p[i]) < min_p), 5)  # the first unsure token is the last drafted
            assert cut == full[:stop + 1], min_p


def test_a_cut_draft_head_takes_in_the_prompt_s_rarer_ids(tiny_pair, monkeypatch, tmp_path):
    """A draft head cut to the first 40 ids gains rows for the prompt's ids beyond them (read from the store, each row
    checked): its logits for those ids are the whole head's, its drafts name them by token id, and greedy output is
    still plain decoding's. A row whose bytes changed on disk is refused naming the damage."""
    import shutil

    from inaflash.engine import Engine
    from inaflash.errors import CorruptStoreError
    from inaflash.generate import generate_ids
    from inaflash.speculate import DraftModel
    from inaflash.store.format import FlashStore

    target, _ = tiny_pair
    prompt = [3, 17, 42, 5, 88, 9, 61, 95] * 3  # 42, 88, 61, 95: beyond the first 40; the model answers 95 95 ...
    with Engine(target, mode="dram", speculation="off") as plain_engine:
        plain, _ = generate_ids(plain_engine, prompt, 12, stop=set())
        whole = plain_engine.forward(torch.tensor(prompt), 0)
    with Engine(target, mode="dram", speculation="draft", draft_store=target, draft_vocab=40) as engine:
        _streaming_costs(engine, monkeypatch)
        spec, s = generate_ids(engine, prompt, 12, stop=set())
        vocab = engine.draft.vocab
        assert vocab.ids == [42, 61, 88, 95] and engine.draft.model.head.shape[0] == 44
        engine.draft.reset(len(prompt))
        cut = engine.draft.forward(torch.tensor(prompt), 0)
        torch.testing.assert_close(cut[:, :40], whole[:, :40])
        torch.testing.assert_close(cut[:, 40:], whole[:, [42, 61, 88, 95]])
        assert vocab.token(41) == 61 and vocab.token(7) == 7
    # itself as its draft agrees with every draft it can name: 95, through the prompt's rows
    assert spec == plain and set(plain) == {95} and s.accepted_tokens == s.drafted_tokens > 0

    damaged = tmp_path / "damaged"
    shutil.copytree(target.path, damaged)
    store = FlashStore(damaged)
    offset, nbytes, shape = store.resident_span("lm_head.weight")
    with Engine(store, mode="dram", speculation="draft", draft_store=store, draft_vocab=40) as engine:
        row = offset + 88 * (nbytes // shape[0])
        with open(damaged / "resident.safetensors", "r+b") as f:  # after the head was loaded and checked whole
            f.seek(row)
            byte = f.read(1)
            f.seek(row)
            f.write(bytes([byte[0] ^ 0xFF]))
        with pytest.raises(CorruptStoreError, match="draft head row 88"):
            DraftModel(engine.draft, 64, 4, prompt=[88])


@pytest.mark.parametrize("kind,overrides", [("qwen2", {}), ("llama", dict(hidden_size=256, intermediate_size=320))])
def test_a_few_token_pass_gives_each_token_the_bits_of_a_one_token_pass(kind, overrides, tmp_path, monkeypatch):
    """On an int4 store (int8 activations: rounding that depends on how sums are ordered) a pass over 9 tokens (a
    verification) gives each token exactly the logits a one-token pass gives it, so speculation's greedy text is
    plain decoding's token for token there too (hidden 64: gate/up in a partial block of groups; 256: whole blocks).
    The native kernel's property: the torch fallback's matrix products order their sums by width."""
    from inaflash.ffn import kernels

    if not kernels.available():
        pytest.skip("the torch fallback path (INAFLASH_KERNEL=torch): its products round by width")
    from inaflash.engine import Engine
    from inaflash.generate import generate_ids
    from inaflash.store.convert import write_store
    from inaflash.store.format import FlashStore
    from inaflash.store.sources import open_source
    from tiny import make_tiny

    make_tiny(kind, tmp_path / "hf", seed=3, **overrides)
    store = FlashStore(write_store(open_source(tmp_path / "hf"), tmp_path / "store", dtype="float32", progress=False,
                                   ffn_format="int4", resident_format="int4"))
    ids = torch.tensor([3, 17, 42, 5, 88, 9, 61, 95, 7])
    with Engine(store, mode="dram", speculation="off") as engine:
        engine.reset(64)
        engine.forward(torch.tensor([11, 12, 13]), 0)  # a prompt before: the pass attends to a cache
        wide = engine.forward(ids, 3)
        engine.reset(64)
        engine.forward(torch.tensor([11, 12, 13]), 0)
        one = torch.cat([engine.forward(ids[i:i + 1], 3 + i) for i in range(len(ids))])
        assert all(torch.equal(wide[i], one[i]) for i in range(len(ids))), (wide - one).abs().max()
        plain, _ = generate_ids(engine, [3, 17, 42, 5, 88, 9], 16, stop=set())
    with Engine(store, mode="dram", speculation="draft", draft_store=store) as engine:
        _streaming_costs(engine, monkeypatch)
        spec, s = generate_ids(engine, [3, 17, 42, 5, 88, 9], 16, stop=set())
    assert spec == plain and s.accepted_tokens > 0
