import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session", autouse=True)
def _isolated_home(tmp_path_factory):
    # never touch the user's cache; conversions made by tests live and die with the session
    os.environ["INAFLASH_HOME"] = str(tmp_path_factory.mktemp("inaflash-home"))


@pytest.fixture(scope="session")
def smollm2_gguf():
    from inaflash.loader import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def smollm2_store_f32(smollm2_gguf, tmp_path_factory):
    from inaflash.store.sources import open_source
    from inaflash.store.convert import write_store

    return write_store(open_source(smollm2_gguf), tmp_path_factory.mktemp("smol") / "f32", dtype="float32",
                       progress=False)


@pytest.fixture(scope="session")
def smollm2_store_f16(smollm2_gguf, tmp_path_factory):
    from inaflash.store.sources import open_source
    from inaflash.store.convert import write_store

    return write_store(open_source(smollm2_gguf), tmp_path_factory.mktemp("smol") / "f16", dtype="float16",
                       progress=False)


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_gguf):
    """transformers' own model on the same GGUF: the reference (slow to load, so once per session)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name,
                                                 dtype="float32")
    return model.eval()
