"""Render ``benchmarks/results/sparse_decode.json`` (``bench_sparse_decode.py``) as Markdown."""

from __future__ import annotations

MB = 1e6


ISA = {0: "portable C++", 1: "AVX-512", 2: "AVX2 (bitmask kernels; the others portable C++ vectorised for this CPU)"}


def _runs(data: dict) -> list[str]:
    out = ["## Runs", ""]
    for i, r in enumerate(data.get("runs", [])):
        e = r.get("environment", {})
        out.append(f"{i}. `{r['command']}` — {r['started']}, {e.get('processor')}, {e.get('threads')} threads, torch "
                   f"{e.get('torch')}, transformers {e.get('transformers')}, prunekit {e.get('prunekit')}; load "
                   f"{r.get('load', 0):.2f}" + (f". Note: {r['note']}" if r.get("note") else ""))
    return out + [""]


def _kernels(k: dict) -> list[str]:
    if not k.get("rows"):
        return []
    bw = k["bandwidth"]
    out = ["## Kernel level: one GEMV (batch 1)", "",
           f"Memory bandwidth of this machine, measured in the same run: **{bw['gb_s']:.1f} GB/s** ({bw['how']}; best "
           f"{bw['gb_s_best']:.1f}). Bound = bytes the format reads / that bandwidth. Times: median of 15 calls "
           "[min-max], weights rotating over copies that exceed the L3 cache three times; speed-up against torch's "
           f"dense GEMV (`F.linear`, W row-major) of the same shape and dtype. Kernel path: "
           f"{ISA.get(k.get('isa'), 'unknown')}.", "",
           "| model | shape in->out | dtype | format | sparsity | MB read | ms [min-max] | bound ms | of bound | "
           "vs F.linear |", "|---|---|---|---|---|---|---|---|---|---|"]
    base = {}
    for r in k["rows"]:
        if r["format"].startswith("torch F.linear"):
            base[(r["model"], r["shape"], r["dtype"])] = r["ms"]
    for r in k["rows"]:
        b = base.get((r["model"], r["shape"], r["dtype"]))
        out.append(f"| {r['model']} | {r['shape']} | {r['dtype']} | {r['format']} | {r['sparsity']:.0%} | "
                   f"{r['bytes'] / MB:.2f} | {r['ms']:.3f} [{r['ms_min']:.3f}-{r['ms_max']:.3f}] | {r['bound_ms']:.3f} | "
                   f"{r['bound_ms'] / r['ms']:.0%} | {b / r['ms']:.2f}x |")
    return out + [""]


def _tie(a: dict | None, b: dict | None) -> str:
    if not a or not b or a.get("stderr") is None or b.get("stderr") is None:
        return ""
    se = (a["stderr"] ** 2 + b["stderr"] ** 2) ** 0.5
    return " (tie)" if abs(a["acc"] - b["acc"]) <= 2 * se else ""


def _quality(q: dict) -> list[str]:
    out = []
    for model, rows in q.items():
        dense = rows.get("dense")
        if not dense:
            continue
        title = model if model.endswith(f"({dense['dtype']})") else f"{model} ({dense['dtype']})"
        out += [f"## Quality: {title}, the masked model (every token thresholded)", "",
                f"WikiText-2 test and GSM8K test (questions + answers) perplexity, seqlen 1024, first "
                f"{dense['wikitext2']['windows']} windows; "
                + (f"PIQA accuracy ± stderr on the first {dense['piqa']['n']} examples, '(tie)' = within 2 stderr of "
                   "dense. " if dense.get("piqa") else "no task run for this model (time). ") + "Calibration: "
                "Austen, 16 x 1024 tokens, seed 0 (thresholds: 4096 sampled tokens per site). act. sparsity = "
                "zeros on the calibration data at the thresholded sites; reads skipped = fraction of the "
                "decoder-linear weights a kernel need not read.", "",
                "| row | blocks | wiki2 ppl | Δ | gsm8k ppl | Δ | PIQA acc | act. sparsity | reads skipped |",
                "|---|---|---|---|---|---|---|---|---|"]
        for label, r in rows.items():
            a = r.get("activation") or {}
            w, g = r["wikitext2"]["ppl"], r["gsm8k"]["ppl"]
            dw, dg = w / dense["wikitext2"]["ppl"] - 1, g / dense["gsm8k"]["ppl"] - 1
            p = r.get("piqa")
            acc = f"{p['acc']:.3f} ± {p['stderr']:.3f}{_tie(p, dense.get('piqa')) if label != 'dense' else ''}" if p else "-"
            out.append(f"| {label} | {r['blocks']} | {w:.2f} | {dw:+.1%} | {g:.2f} | {dg:+.1%} | {acc} | "
                       f"{a.get('mean_sparsity', 0):.3f} | {a.get('skipped_fraction', 0):.3f} |")
        out.append("")
        out += _prompt_quality(model, rows)
    return out


def _prompt_quality(model: str, rows: dict) -> list[str]:
    """The rows measured as generation sees them: a dense prompt, thresholded tokens after it."""
    dense = rows["dense"].get("wikitext2_prompt")
    have = {label: r["wikitext2_prompt"] for label, r in rows.items() if r.get("wikitext2_prompt")}
    if not dense or len(have) < 2:
        return []
    out = [f"### {model}: WikiText-2 as generation sees it (TEAL's protocol)", "",
           f"Each 1024-token window's first {dense['prompt']} tokens are a prompt prefilled densely (the runtime "
           "prefills densely), the next tokens are thresholded and only they are scored "
           f"({dense['windows']} windows, {dense['tokens']} tokens). The table above thresholds every token, "
           "prompt included: the stricter number.", "",
           "| row | wiki2 ppl, dense prompt | Δ | Δ every token thresholded |", "|---|---|---|---|"]
    for label, r in have.items():
        full = rows[label]["wikitext2"]["ppl"] / rows["dense"]["wikitext2"]["ppl"] - 1
        out.append(f"| {label} | {r['ppl']:.2f} | {r['ppl'] / dense['ppl'] - 1:+.1%} | {full:+.1%} |")
    return out + [""]


def _ms(s: dict) -> str:
    return f"{s['median'] * 1e3:.1f} [{s['min'] * 1e3:.1f}-{s['max'] * 1e3:.1f}]"


def _speed(sp: dict, bw: float | None) -> list[str]:
    out = []
    for model, by_dtype in sp.items():
        for dtype, rows in by_dtype.items():
            first = next(iter(rows.values()))
            out += [f"## End to end: {model}, {dtype}, 2 threads", "",
                    f"Batch 1, KV cache: prefill of one {first.get('prefill_tokens', 512)}-token sequence; decode = "
                    f"{first.get('new_tokens', 64)} forced steps after a {first.get('prompt_tokens', 128)}-token "
                    "prompt (random ids, seeded). Every row times its own dense model (stock modules, same weights, "
                    "no thresholds) interleaved with it in one process: median of 5 after a warm-up, [min-max]. "
                    "Bound = bytes of the weights a decode step reads (all parameters, tied once, minus what the "
                    f"kernels skipped at the measured sparsity) / {bw:.1f} GB/s." if bw else "", "",
                    "| row | dense ms/token | sparse ms/token | decode tok/s dense → sparse | decode speed-up | "
                    "prefill ms dense / sparse | prefill | act. skipped (decode) | dense bound ms | sparse bound ms |",
                    "|---|---|---|---|---|---|---|---|---|---|"]
            for label, r in rows.items():
                d, s = r["dense"], r["sparse"]
                dd, ss = d["decode_s_per_token"], s["decode_s_per_token"]
                pre = f"{_ms(d['prefill_s'])} / {_ms(s['prefill_s'])}" if d.get("prefill_s") else "-"
                bd = r.get("bytes_per_token_dense")
                bs = r.get("bytes_per_token_sparse")
                bound = (f"{bd / bw / 1e6:.1f}" if bd and bw else "-", f"{bs / bw / 1e6:.1f}" if bs and bw else "-")
                skip = r.get("decode_sparsity_mean")
                out.append(f"| {label} | {_ms(dd)} | {_ms(ss)} | {1 / dd['median']:.1f} → {1 / ss['median']:.1f} | "
                           f"**{r['decode_speedup']:.2f}x** | {pre} | {r.get('prefill_speedup', float('nan')):.2f}x | "
                           f"{'-' if skip is None else f'{skip:.3f}'} | {bound[0]} | {bound[1]} |")
            out.append("")
    return out


def _prefill(pf: dict) -> list[str]:
    out = []
    for model, by_dtype in pf.items():
        out += [f"## Prefill against prompt length: {model}, 2 threads", "",
                "One sequence of random ids (seeded), no decode; dense (stock modules) and sparse interleaved in one "
                "process at each length, median [min-max] of the repeats after a warm-up. extra ms = sparse - dense "
                "medians: the bitmask format unpacks every weight once per forward pass (a fixed cost), the layout "
                "row multiplies by W^T (input-major) instead of W.", "",
                "| row | dtype | prompt tokens | dense ms | sparse ms | extra ms | prefill speed |",
                "|---|---|---|---|---|---|---|"]
        for dtype, rows in by_dtype.items():
            for label, r in rows.items():
                for n, x in r["lengths"].items():
                    d, s = x["dense"]["prefill_s"], x["sparse"]["prefill_s"]
                    out.append(f"| {label} | {dtype} | {n} | {_ms(d)} | {_ms(s)} | "
                               f"{(s['median'] - d['median']) * 1e3:+.1f} | **{x['prefill_speedup']:.2f}x** |")
        out.append("")
    return out


def render(data: dict) -> str:
    bw = data.get("kernels", {}).get("bandwidth", {}).get("gb_s")
    lines = ["# Sparsity that runs faster on a CPU (measured)", "",
             "Written by `benchmarks/bench_sparse_decode.py` (stages `kernels`, `quality`, `speed`, `prefill`), rendered by "
             "`benchmarks/sparse_decode_render.py`. What the numbers mean and what they do not: "
             "[docs/activation_sparsity.md](../../docs/activation_sparsity.md).", ""]
    lines += _runs(data) + _kernels(data.get("kernels", {})) + _quality(data.get("quality", {}))
    lines += _speed(data.get("speed", {}), bw) + _prefill(data.get("prefill", {}))
    return "\n".join(lines) + "\n"
