"""Markdown for ``benchmarks/results/recover.json`` (used by bench_recover.py)."""

from __future__ import annotations


def _ppl(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}" if x < 1e4 else f"{x:.3e}"


def _acc(t: dict | None, task: str) -> str:
    if not t or task not in t:
        return "-"
    r = t[task]
    return f"{r['metrics']['acc']:.3f}±{r['stderr']['acc']:.3f}"


def _ceiling(row: dict, gf: dict) -> tuple[float, float]:
    """(tokens/s ceiling, achieved share): FLOPs per token over the measured matmul rate of the
    dtypes the row computes in (student bf16 autocast or fp32; teacher in its dtype)."""
    r, fl = row["report"], row["flops_per_token"]
    s_rate = gf["bfloat16" if r["config"]["bf16"] else "float32"] * 1e9
    t_rate = gf["bfloat16" if r.get("teacher_dtype") == "bfloat16" else "float32"] * 1e9
    secs_per_token = fl["student"] / s_rate + (fl["teacher"] / t_rate if fl["teacher"] else 0.0)
    ceiling = 1.0 / secs_per_token
    return ceiling, r["tokens_per_s"] / ceiling


def students(res: dict) -> list[str]:
    """The starting models as pruned (one-shot), the rows' 'before'."""
    out = ["Starting models, one-shot (pruned once, evaluated once):", "",
           "| starting model | prune s | WikiText-2 ppl | piqa | boolq | host |", "|---|---|---|---|---|---|"]
    names = machines(res)
    for key, st in res.get("students", {}).items():
        ev = st["eval"]
        secs = f"{st['prune_s']:.0f}" if "prune_s" in st else "-"
        host = names.get(_machine_key(st["machine"]), "?") if "machine" in st else "?"
        out.append(f"| {st['label']} | {secs} | {_ppl(ev['wikitext2']['ppl'])} | {_acc(ev['tasks'], 'piqa')} | "
                   f"{_acc(ev['tasks'], 'boolq')} | {host} |")
    return out + [""]


def _best(res: dict, pred) -> tuple[str, float] | None:
    rows = [(n, r["report"]["evaluation"]["after"]["wikitext2"]["ppl"]) for n, r in res.get("rows", {}).items()
            if pred(r)]
    return min(rows, key=lambda x: x[1]) if rows else None


def targets(res: dict) -> list[str]:
    """The issue's three targets, each from the rows measured."""
    st = res.get("students", {})
    if "dense" not in st:
        return []
    dense = st["dense"]["eval"]["wikitext2"]["ppl"]
    out = ["## Targets", "", "| target | best row | WikiText-2 ppl | bar | met |", "|---|---|---|---|---|"]
    w50 = _best(res, lambda r: r["student"] == "wanda50")
    if w50:
        out.append(f"| Wanda 50 % → ≤ 30 (≤ 1.3× dense {dense:.2f}) | {w50[0]} | {w50[1]:.2f} "
                   f"({w50[1] / dense:.2f}× dense) | 30 / {1.3 * dense:.2f} | "
                   f"{'yes' if w50[1] <= 30 else 'NO'} / {'yes' if w50[1] <= 1.3 * dense else 'NO'} |")
    if "wanda70" in st:
        base = st["wanda70"]["eval"]["wikitext2"]["ppl"]
        b70 = _best(res, lambda r: r["student"] == "wanda70" or r["student"].startswith("sgpt70a"))
        if b70:
            out.append(f"| best 70 % recipe ≥ 10× below uniform Wanda 70 % one-shot ({base:.1f}) | {b70[0]} | "
                       f"{b70[1]:.2f} ({base / b70[1]:.1f}× below) | {base / 10:.1f} | {'yes' if base / b70[1] >= 10 else 'NO'} |")
    for key in sorted({r["student"] for r in res.get("rows", {}).values() if r["student"].startswith("dir-")}):
        n, ppl = _best(res, lambda r, key=key: r["student"] == key)
        out.append(f"| {res['rows'][n]['label']} → ≤ 1.5× dense | {n} | {ppl:.2f} ({ppl / dense:.2f}× dense) | "
                   f"{1.5 * dense:.2f} | {'yes' if ppl <= 1.5 * dense else 'NO'} |")
    return out + [""]


ABLATION = ("kd-full-adamw", "ce-full-adamw", "kd-lora-adamw", "kd-full-galore", "kd-full-spam", "kd-full-adamw-fast")


def ablations(res: dict) -> list[str]:
    """Starting model x recipe at the fixed budget on the same text: WikiText-2 ppl after (optimizer
    state MB, tok/s) -- what each choice buys, read along a row."""
    budget = res.get("settings", {}).get("budget")
    cells: dict[str, dict[str, dict]] = {}
    for row in res.get("rows", {}).values():
        if row["report"]["tokens"] == budget and row["data"] == "wt2valid" and row["recipe"] in ABLATION:
            cells.setdefault(row["student"], {})[row["recipe"]] = row
    if not any(len(v) > 1 for v in cells.values()):
        return []
    names = machines(res)
    labels = {r["recipe"]: r["recipe_label"] for v in cells.values() for r in v.values()}
    recipes = [r for r in ABLATION if r in labels]
    out = [f"## What each choice buys ({budget:,} tokens of wt2valid each)", "",
           "WikiText-2 ppl after (optimizer state MB, training tok/s on host); one-shot ppl in brackets.", "",
           "| starting model | " + " | ".join(labels[r] for r in recipes) + " |", "|---" * (len(recipes) + 1) + "|"]
    for key, by in cells.items():
        first = next(iter(by.values()))
        before = first["report"]["evaluation"]["before"]["wikitext2"]["ppl"]
        line = [f"{first['label']} ({_ppl(before)})"]
        for rec in recipes:
            if rec not in by:
                line.append("-")
                continue
            r, host = by[rec]["report"], names[_machine_key(_row_machine(res, by[rec]))]
            line.append(f"{_ppl(r['evaluation']['after']['wikitext2']['ppl'])} "
                        f"({r['optimizer_state_bytes'] / 2**20:.0f}, {r['tokens_per_s']:.0f} on {host})")
        out.append("| " + " | ".join(line) + " |")
    return out + [""]


def _machine_key(m: dict) -> str:
    return m.get("processor", "?")


def _row_machine(res: dict, row: dict) -> dict:
    """The host a row ran on (rows from before hosts were recorded: the file's machine)."""
    return row.get("machine", res.get("machine", {}))


def machines(res: dict) -> dict[str, str]:
    """Host (processor) -> short name (M1, M2, ...) in the order rows first used them."""
    out: dict[str, str] = {}
    for m in [_row_machine(res, r) for r in res.get("rows", {}).values()] + [res.get("machine", {})]:
        out.setdefault(_machine_key(m), f"M{len(out) + 1}")
    return out


def _rates(res: dict, host: str) -> str:
    """The range of 2048^2 matmul GFLOP/s measured on ``host`` by the invocations whose rows are shown."""
    ms = [m for m in [_row_machine(res, r) for r in res.get("rows", {}).values()] + [res.get("machine", {})]
          if _machine_key(m) == host and "matmul_gflops" in m]
    out = []
    for dt, short in (("float32", "fp32"), ("bfloat16", "bf16")):
        v = sorted({round(m["matmul_gflops"][dt]) for m in ms}) or [0]
        out.append(f"{short} {v[0]}" + (f"–{v[-1]}" if v[-1] != v[0] else ""))
    return " / ".join(out)


def render(res: dict) -> str:
    m = res.get("machine", {})
    names = machines(res)
    s = res.get("settings", {})
    dense = res.get("students", {}).get("dense", {}).get("eval")
    lines = [
        "# Recovery after pruning: SmolLM2-135M", "",
        f"Machine: {m.get('processor', '?')}, {m.get('threads', '?')} threads, OMP_WAIT_POLICY={m.get('omp_wait_policy')}; "
        f"torch {m.get('torch')}, transformers {m.get('transformers')}, prunekit {m.get('prunekit')}. "
        "The host differs between sessions; each row names the one it ran on, with that host's measured "
        "2048² matmul rate in GFLOP/s (as measured by each invocation): "
        + "; ".join(f"**{v}** = {k}, {_rates(res, k)}" for k, v in names.items()) + ".",
        "",
        "Command(s): " + "; ".join(f"`{c}`" for c in res.get("commands", [])), "",
        f"- starting models: pruned from the dense model with calibration {s.get('calibration')}; "
        f"evaluation: {s.get('eval')}; tasks {', '.join(s.get('tasks', []))}: first {s.get('task_limit')} examples, "
        "acc ± one standard error",
        f"- training: {s.get('base')}; training text `wt2valid` = WikiText-2 *validation* (`{s.get('wt2valid')}`), "
        "`austen` = the six novels; the test split is never trained on; 4 windows of the text are held out "
        "(held-out KL = mean KL(teacher || student) per token on them)",
        "- tok/s = training tokens / training seconds (forward, backward, optimizer; evaluation excluded); "
        "ceiling = tokens/s if every matmul FLOP of the row (student forward+backward, teacher forward, attention) "
        "ran at the measured matmul rate of its dtype; share = tok/s ÷ ceiling",
        "- sparsity = zeros / weights over the decoder linears, before → after training "
        "(must be identical: pruned positions are held at zero)", "",
    ]
    lines += students(res) + targets(res) + ablations(res)
    if dense:
        lines.append(f"Dense SmolLM2-135M: WikiText-2 ppl {_ppl(dense['wikitext2']['ppl'])}, "
                     f"piqa {_acc(dense['tasks'], 'piqa')}, boolq {_acc(dense['tasks'], 'boolq')}.")
        lines.append("")
    lines += [
        "| row | starting model | recipe | text | tokens | train s | tok/s | ceiling tok/s (share) | peak RSS MB | "
        "opt. state MB | sparsity before → after | WikiText-2 ppl before → after | piqa before → after | "
        "boolq before → after | held-out KL before → after | load | host |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in res.get("rows", {}).items():
        r = row["report"]
        ev = r["evaluation"]
        b, a = ev.get("before", {}), ev.get("after", {})
        rm = _row_machine(res, row)
        ceil, share = _ceiling(row, rm["matmul_gflops"])
        sb, sa = r["sparsity_before"]["sparsity"], r["sparsity_after"]["sparsity"]
        same = "identical" if r["sparsity_before"] == r["sparsity_after"] and r["masks_kept"] else "CHANGED"
        lines.append(
            f"| {name} | {row['label']} | {row['recipe_label']} | {row['data']} | {r['tokens']} | {r['seconds']:.0f} | "
            f"{r['tokens_per_s']:.0f} | {ceil:.0f} ({share:.0%}) | {r['peak_rss_mb']:.0f} | "
            f"{r['optimizer_state_bytes'] / 2**20:.0f} | {sb:.4f} → {sa:.4f} ({same}) | "
            f"{_ppl(b.get('wikitext2', {}).get('ppl'))} → {_ppl(a.get('wikitext2', {}).get('ppl'))} | "
            f"{_acc(b.get('tasks'), 'piqa')} → {_acc(a.get('tasks'), 'piqa')} | "
            f"{_acc(b.get('tasks'), 'boolq')} → {_acc(a.get('tasks'), 'boolq')} | "
            f"{r['validation_before'].get('kl', float('nan')):.3f} → {r['validation_after'].get('kl', float('nan')):.3f} | "
            f"{'/'.join(map(str, row.get('loadavg_1min', [])))} | {names[_machine_key(rm)]} |")
    sp = res.get("speed")
    if sp:
        lines += ["", "Training-step speed by dtype (Wanda 50 % student, one 1024-token window, distillation forward + "
                  f"backward, best of 2 after a warm-up; `--speed`; host "
                  f"{names.get(_machine_key(sp.get('machine', m)), _machine_key(sp.get('machine', m)))}):", "",
                  "| student compute | teacher | tok/s |", "|---|---|---|"]
        lines += [f"| {r['student']} | {r['teacher']} | {r['tok_s']:.0f} |" for r in sp["rows"]]
    lora = [(n, row) for n, row in res.get("rows", {}).items() if row["report"].get("lora")]
    if lora:
        lines += ["", "LoRA: merged through the mask vs merged plainly (the plain merge densifies every pruned layer):", ""]
        for n, row in lora:
            r = row["report"]
            um = r["evaluation"].get("unmasked_merge", {}).get("wikitext2", {}).get("ppl")
            lines.append(f"- {n}: WikiText-2 ppl {_ppl(r['evaluation']['after']['wikitext2']['ppl'])} masked vs "
                         f"{_ppl(um)} unmasked (dense); {r['lora']['dropped_energy']:.1%} of the adapters' update energy "
                         f"fell on pruned positions and was dropped")
    return "\n".join(lines) + "\n"
