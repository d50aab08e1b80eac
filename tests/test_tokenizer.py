"""The store's tokenizer without transformers gives transformers' ids, text and chat template on the same files."""

import copy

import pytest

TEXTS = ["Hello world", "  leading spaces and\ttabs\n\nnew lines", "def f(x):\n    return x ** 2  # ünïcödé 日本語 🙂",
         "", "<|im_start|>user\nhi<|im_end|>", "What is flash memory? " * 30]
CHATS = [[{"role": "user", "content": "Hi"}],
         [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name three rivers."},
          {"role": "assistant", "content": "Nile, Amazon, Yangtze."}, {"role": "user", "content": "More?"}]]


@pytest.fixture(scope="module")
def pair(smollm2_store_f16):
    from transformers import PreTrainedTokenizerFast

    from inaflash.store.format import FlashStore
    from inaflash.store.tokenizer import Tokenizer

    ours = FlashStore(smollm2_store_f16).tokenizer()
    assert isinstance(ours, Tokenizer)
    return ours, PreTrainedTokenizerFast.from_pretrained(str(smollm2_store_f16 / "tokenizer"))


def test_ids_and_text_equal_transformers(pair):
    ours, theirs = pair
    for text in TEXTS:
        for special in (True, False):
            assert ours(text, add_special_tokens=special)["input_ids"] == \
                theirs(text, add_special_tokens=special)["input_ids"]
        ids = theirs(text)["input_ids"] + [ours.eos_token_id, 1, 17, 255]
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip)
    assert ours.eos_token_id == theirs.eos_token_id


def test_chat_template_renders_as_transformers_does(pair):
    ours, theirs = pair
    assert ours.chat_template == theirs.chat_template
    for messages in CHATS:
        for prompt in (True, False):
            assert ours.apply_chat_template(messages, add_generation_prompt=prompt, tokenize=False) == \
                theirs.apply_chat_template(messages, add_generation_prompt=prompt, tokenize=False)
            assert ours.apply_chat_template(messages, add_generation_prompt=prompt) == \
                theirs(theirs.apply_chat_template(messages, add_generation_prompt=prompt, tokenize=False),
                       add_special_tokens=False)["input_ids"]
    copied = copy.deepcopy(ours)
    assert copied is not ours and copied("Hi")["input_ids"] == ours("Hi")["input_ids"]


def test_running_the_default_model_does_not_import_transformers(smollm2_store_f16):
    """The runtime a model holds: generating from a store loads no transformers (its import is for conversion)."""
    import subprocess
    import sys

    code = ("import sys, inaflash\n"
            f"m = inaflash.load({str(smollm2_store_f16)!r}, mode='dram')\n"
            "m.generate('Hi', max_tokens=4)\n"
            "print('transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False"
