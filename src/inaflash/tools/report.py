"""`inaflash bench`'s results as files: the key ratios, the JSON, the markdown table and the latency plot."""

from __future__ import annotations

import json
import time
from pathlib import Path


def key_ratios(result: dict) -> dict:
    by = {r["name"]: r for r in result["rows"] if r.get("status") == "ok"}
    out = {}

    def ratio(a, b, key="ms_per_token"):
        if a in by and b in by and by[b].get(key):
            return by[a][key] / by[b][key]
        return None

    out["naive_over_full"] = ratio("naive", "full")
    out["naive_over_full_window_only"] = ratio("naive", "full-window-only")  # the hot neurons' share of it
    out["naive_over_auto"] = ratio("naive", "auto")
    # under each whole-process limit: inaflash's default against llama.cpp-mmap, tokens/s over tokens/s
    for limit in sorted({b.get("limit_bytes") for b in result.get("baselines", []) if b.get("limit_bytes")}):
        rows = {b["name"]: b for b in result["baselines"] if b.get("limit_bytes") == limit}
        ours, theirs = rows.get("inaflash-auto", {}), rows.get("llama.cpp-mmap", {})
        if ours.get("tokens_per_s") and theirs.get("tokens_per_s"):
            out[f"limited_speedup_over_llamacpp_{limit / 1e6:.0f}MB"] = ours["tokens_per_s"] / theirs["tokens_per_s"]
        for name, other in rows.items():  # bench --compare: another store of the model over the main one
            if name.startswith("inaflash-auto ") and other.get("tokens_per_s") and ours.get("tokens_per_s"):
                label = name.split(" ", 1)[1].replace("/", "_")
                out[f"limited_speedup_{label}_over_main_{limit / 1e6:.0f}MB"] = \
                    other["tokens_per_s"] / ours["tokens_per_s"]
    llama = result.get("llama_cpp_unlimited") or {}
    if "dram" in by and llama.get("ms_per_token"):
        out["dram_over_llamacpp"] = by["dram"]["ms_per_token"] / llama["ms_per_token"]
        out["dram_prefill_over_llamacpp"] = by["dram"]["prefill_ms"] / llama["prefill_ms"]
    out["full_over_dram"] = ratio("full", "dram")
    # naive's compute against dram's, alone and while another process reads the same file (what reads landing
    # costs every computation in this VM, whoever reads)
    out["naive_compute_over_dram"] = ratio("naive", "dram", "compute_ms_per_token")
    out["naive_compute_over_dram_beside_reads"] = ratio("naive", "dram-beside-reads", "compute_ms_per_token")
    out["naive_over_coalescing"] = ratio("naive", "+coalescing")
    for name in ("naive", "auto"):  # what checking every read costs: checked over unchecked ms/token, minus 1
        r = ratio(name, f"{name}-unchecked")
        out[f"checksum_cost_{name}"] = None if r is None else r - 1
    for i, d in enumerate(result.get("decoding", [])):  # more tokens per pass: the first limit's unsuffixed
        mb = f"{d['limit_bytes'] / 1e6:.0f}MB"
        for k, v in d["summary"].items():
            if k.startswith("speedup_over_llamacpp"):  # inaflash with speculation over llama.cpp, per prompt set
                out[f"limited_{k}_{mb}"] = v
            elif i == 0:
                out[k] = v
        code = d["summary"].get("speedup_over_llamacpp_lookup_code")
        out[f"limited_speedup_over_llamacpp_lookup_{mb}"] = code  # on code edits, where lookup drafts pay
    gate = (result.get("calibration") or {}).get("quality") or {}
    for k in ("ppl_increase", "top1_agreement", "greedy_prefix"):  # sparse's quality gate (what auto trusts)
        if k in gate:
            out[f"sparse_gate_{k}"] = gate[k]
    for name in ("full", "full-window-only", "+coalescing", "auto"):
        if name in by:
            out[f"{name}_bytes_share_of_ffn"] = by[name]["bytes_read_per_token"] / result["ffn_bytes"]
    return out


def free_stem(out_dir: Path, base: str) -> str:
    """base, or base-run2, -run3, ... where a run earlier that day has written base.json: results are never
    overwritten."""
    return next(s for s in (base if n == 1 else f"{base}-run{n}" for n in range(1, 1000))
                if not (out_dir / f"{s}.json").exists())


def write_results(result: dict, out_dir: Path) -> tuple[Path, Path, Path | None]:
    out_dir.mkdir(parents=True, exist_ok=True)
    memory = str(result["memory"]).replace("%", "pct").replace("/", "_")
    formats = "".join(f"-{key}-{result[key]}" for key in ("ffn_format", "resident_format", "cache_format")
                      if result.get(key, "float") not in ("float", "store")).replace("_format", "")
    stem = free_stem(out_dir, f"{time.strftime('%Y-%m-%d')}-{Path(result['model']).stem}{formats}-mem{memory}")
    json_path, md_path, png_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md", out_dir / f"{stem}.png"
    json_path.write_text(json.dumps(result, indent=1))
    if not any(r.get("status") == "ok" for r in result["rows"]):
        png_path = None  # `--config none`: no rows to plot
    md_path.write_text(markdown(result, png_path.name if png_path else None))
    try:
        if png_path:
            plot(result, png_path)
    except ImportError:
        png_path = None
    return json_path, md_path, png_path


def _mb(x) -> str:
    return "-" if x is None else f"{x / 1e6:.1f}"


def _ms(x) -> str:
    return "-" if x is None else f"{x:.1f}"


def markdown(result: dict, png_name: str | None = None) -> str:
    lines = [
        f"# inaflash bench: {Path(result['model']).name}",
        "",
        f"{result['date']}; store {result['dtype']} (FFN {result.get('ffn_format', 'float')}, resident "
        f"{result.get('resident_format', 'float')}, embeddings on flash: {result.get('embeddings_on_flash', False)}, "
        f"neuron cache {result.get('cache_format', 'store')}; FFN computed by "
        f"{result.get('ffn_compute', 'torch')}), FFN {_mb(result['ffn_bytes'])} MB, resident "
        f"{_mb(result['resident_bytes'])} MB; --memory {result['memory']} = {_mb(result['budget_bytes'])} MB; "
        f"{result['prompt_tokens']}-token prompt, {result['gen_tokens']} generated tokens (greedy), "
        f"{result['repeat']} round(s), medians, each run cut at {result['max_seconds_per_run']:.0f} s; "
        f"I/O = issuing reads + blocked on them; coalescing gap {result['max_gap'] // 1024} KiB; "
        f"{result['machine']['cpus']} CPUs, torch {result['machine']['torch']}.",
        "",
        "| configuration | adds | tokens | ms/token | I/O | predictor | memory mgmt | compute | MB read/token | "
        "reads/token | KiB/read | MB/s blocked | probe MB/s | hit rate | prefill ms | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    if not result["rows"]:
        lines = lines[:-2] + ["(no configuration rows: `--config none`)"]
    for r in result["rows"]:
        if r.get("status") != "ok":
            lines.append(f"| {r['name']} | {r['what']} | {r['status']}: {r.get('reason', '')} |" + " |" * 13)
            continue
        hit = r.get("cache_hit_rate")
        lines.append(
            f"| {r['name']} | {r['what']} | {r['generated_tokens']:.0f} | {_ms(r['ms_per_token'])} | "
            f"{_ms(r['io_ms_per_token'])} | "
            f"{_ms(r.get('predictor_ms_per_token'))} | {_ms(r.get('memory_ms_per_token'))} | "
            f"{_ms(r['compute_ms_per_token'])} | {_mb(r['bytes_read_per_token'])} | {r['reads_per_token']:.0f} | "
            f"{r.get('bytes_per_read', 0) / 1024:.1f} | {r.get('mb_per_s_while_blocked', 0):.0f} | "
            f"{r.get('probe_mb_per_s_at_read_size', 0) or 0:.0f} | {'-' if hit is None else f'{hit:.3f}'} | "
            f"{_ms(r.get('prefill_ms'))} | {_mb(r['peak_rss_bytes'])} |")
    for r in result["rows"]:
        if r.get("beside_read_mb_per_s"):
            lines += ["", f"{r['name']}: the other process read {r['beside_read_mb_per_s']:.0f} MB/s of the FFN file "
                          "while this row generated."]
    llama = result.get("llama_cpp_unlimited")
    if llama:
        detail = (f"{_ms(llama.get('ms_per_token'))} ms/token ({llama.get('tokens_per_s', 0) or 0:.2f} tokens/s), "
                  f"prefill + first token {_ms(llama.get('prefill_ms'))} ms" if llama.get("status") == "ok"
                  else f"{llama['status']}: {llama.get('reason', '')}")
        lines += ["", f"llama.cpp on the same GGUF with no memory limit (the speed to beat when the model fits; "
                      f"inaflash dram's prefill above is the {result['prompt_tokens']}-token prompt): {detail}"]
    if result.get("baselines"):
        lines += ["", "Baselines and inaflash's default (--mode auto; the mode it chose in brackets), each a child process "
                      "under a cgroup-v1 memory limit on "
                      "the whole process (runtime included), model files evicted from the page cache first:", "",
                  "| baseline | limit MB | status | tokens/s | ms/token | MB read/token | peak cgroup usage MB |",
                  "|---|---|---|---|---|---|---|"]
        for b in result["baselines"]:
            chosen = f" ({b['chosen_mode']})" if b.get("chosen_mode") else ""
            read = b.get("bytes_read_per_token")
            lines.append(f"| {b['name']}{chosen} | {_mb(b.get('limit_bytes'))} | {b['status']}"
                         f"{': ' + b['reason'] if b.get('reason') else ''} | "
                         f"{b.get('tokens_per_s', 0) or 0:.2f} | {_ms(b.get('ms_per_token'))} | "
                         f"{'-' if read is None else _mb(read)} | {_mb(b.get('max_usage_bytes'))} |")
    s = result.get("summary", {})
    gate = result.get("calibration", {}).get("quality")
    if gate:
        lines += ["", f"The store's sparse quality gate (calibration's validation text; `--mode auto` runs sparse only "
                      f"if it passed): {'passed' if gate.get('ok') else 'failed: ' + str(gate.get('failed'))}; "
                      f"perplexity {gate['ppl_increase']:+.2%}, top-1 agreement {gate['top1_agreement']:.3f}, "
                      f"greedy prefix {gate['greedy_prefix']:.1f} of 32."]
    if result.get("pass_costs") or result.get("decoding"):
        from .decoding import markdown as decoding_markdown, pass_cost_markdown

        lines += pass_cost_markdown(result.get("pass_costs", []))
        for d in result.get("decoding", []):
            lines += decoding_markdown(d)
    parts = [f"{k} = {v:.3g}" if isinstance(v, float) else f"{k} = {v}" for k, v in s.items() if v is not None]
    lines += ["", "Key ratios: " + ("; ".join(parts) if parts else "n/a"), ""]
    if png_name:
        lines += [f"![ms/token by configuration]({png_name})", ""]
    return "\n".join(lines)


def plot(result: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r.get("status") == "ok"]
    names = [r["name"] for r in rows]
    parts = [("io_ms_per_token", "I/O wait"), ("predictor_ms_per_token", "predictor"),
             ("memory_ms_per_token", "memory mgmt"), ("compute_ms_per_token", "compute")]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
    bottom = [0.0] * len(rows)
    for key, label in parts:
        values = [max(0.0, r.get(key) or 0.0) for r in rows]
        ax1.bar(names, values, bottom=bottom, label=label)
        bottom = [a + b for a, b in zip(bottom, values)]
    ax1.set_ylabel("ms per token (median)")
    ax1.legend(fontsize=8)
    ax1.tick_params(axis="x", rotation=30)
    ax2.bar(names, [r["bytes_read_per_token"] / 1e6 for r in rows], color="tab:gray")
    ax2.set_ylabel("MB read from flash per token")
    ax2.tick_params(axis="x", rotation=30)
    fig.suptitle(f"inaflash bench: {Path(result['model']).name}, --memory {result['memory']} ({result['date']})")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
