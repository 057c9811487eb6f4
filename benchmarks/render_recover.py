"""Markdown for ``benchmarks/results/recover.json`` (used by bench_recover.py).

Task accuracies carry a mark against their reference (:mod:`prunekit.eval.ties`): ``≈`` a tie
(inside two standard errors of the difference), ``↑`` / ``↓`` clearly better / worse.
"""

from __future__ import annotations

from prunekit.eval.ties import mark, verdict

HELDOUT_NAMES = {"wikitext2": "WikiText-2 test", "kjv": "King James Bible", "gsm8k": "GSM8K test"}


def _ppl(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}" if x < 1e4 else f"{x:.3e}"


def _task(t: dict | None, task: str) -> tuple[float, float | None] | None:
    if not t or task not in t:
        return None
    return t[task]["metrics"]["acc"], t[task]["stderr"]["acc"]


def _acc(t: dict | None, task: str, ref: dict | None = None) -> str:
    """``acc±stderr`` of ``task``, marked against the same task in ``ref`` when given."""
    a = _task(t, task)
    if a is None:
        return "-"
    b = _task(ref, task)
    return mark(a[0], a[1], *(b if b else (None, None)))


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
    out = ["Starting models, one-shot (pruned once, evaluated once; tasks marked against dense):", "",
           "| starting model | prune s | WikiText-2 ppl | KJV ppl | GSM8K ppl | piqa | boolq | task n | host |",
           "|---|---|---|---|---|---|---|---|---|"]
    names = machines(res)
    dense = res.get("students", {}).get("dense", {}).get("eval", {}).get("tasks")
    for key, st in res.get("students", {}).items():
        ev = st["eval"]
        secs = f"{st['prune_s']:.0f}" if "prune_s" in st else "-"
        host = names.get(_machine_key(st["machine"]), "?") if "machine" in st else "?"
        ho = ev.get("heldout", {})
        ref = None if key == "dense" else dense
        n = "/".join(sorted({str(t["n"]) for t in ev["tasks"].values()}))
        out.append(f"| {st['label']} | {secs} | {_ppl(ev['wikitext2']['ppl'])} | {_ppl(ho.get('kjv', {}).get('ppl'))} | "
                   f"{_ppl(ho.get('gsm8k', {}).get('ppl'))} | {_acc(ev['tasks'], 'piqa', ref)} | "
                   f"{_acc(ev['tasks'], 'boolq', ref)} | {n} | {host} |")
    return out + [""]


#: starting models of bench_recover.py that are structured (physically smaller) models
STRUCTURED_STUDENTS = ("blocks25", "channels25")


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
    structured = {r["student"] for r in res.get("rows", {}).values()
                  if r["student"].startswith("dir-") or r["student"] in STRUCTURED_STUDENTS}
    for key in sorted(structured):  # a saved folder (262k-token rows) and the h- rows' own starting models
        n, ppl = _best(res, lambda r, key=key: r["student"] == key)
        out.append(f"| {res['rows'][n]['label']} → ≤ 1.5× dense | {n} | {ppl:.2f} ({ppl / dense:.2f}× dense) | "
                   f"{1.5 * dense:.2f} | {'yes' if ppl <= 1.5 * dense else 'NO'} |")
    return out + ["", "These bars are in-domain (WikiText-2 test after training on WikiText-2 validation); the next "
                  "table holds the same models against the control and on text nothing was trained on.", ""]


def control_of(res: dict, row: dict) -> dict | None:
    """The control row of ``row``: the dense model trained with the same recipe, text and tokens."""
    for r in res.get("rows", {}).values():
        if r["student"] == "dense" and r["recipe"] == row["recipe"] and r["data"] == row["data"] \
                and r["report"]["tokens"] == row["report"]["tokens"]:
            return r
    return None


def _ppls(ev: dict | None) -> dict[str, float]:
    """``{text: ppl}`` of one evaluation (WikiText-2 test and the held-out texts)."""
    if not ev:
        return {}
    return {"wikitext2": ev["wikitext2"]["ppl"], **{k: v["ppl"] for k, v in ev.get("heldout", {}).items()}}


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}×" if a is not None and b else "-"


def honest(res: dict) -> list[str]:
    """Every held-out-protocol row: perplexity on WikiText-2 test and on the two texts nothing here trains
    on, against dense and against the dense model tuned by the same recipe (the honest ratio); then the
    tasks, each comparison called a tie or not."""
    rows = [(n, r) for n, r in res.get("rows", {}).items()
            if "heldout" in r["report"]["evaluation"].get("after", {}) and r["student"] != "dense"]
    dense = res.get("students", {}).get("dense", {}).get("eval")
    if not rows or not dense or "heldout" not in dense:
        return []
    d = _ppls(dense)
    out = ["## Recovery against the control, on text it never saw", "",
           "Perplexity (seqlen 1024, first 20 windows of each text). *WikiText-2 test* is the training text's own "
           "domain (training: WikiText-2 *validation*); the *King James Bible* and *GSM8K test* are domains no "
           "recipe or calibration here sees. *tuned dense* = the dense model trained with the row's recipe, text "
           "and tokens (the control row named); **recovered ÷ tuned dense** is the honest ratio.", "",
           "| row | starting model | recipe, text, tokens | text | one-shot | recovered | dense | tuned dense "
           "(control) | recovered ÷ dense | **recovered ÷ tuned dense** | one-shot ÷ dense |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, row in rows:
        ev = row["report"]["evaluation"]
        ctrl = control_of(res, row)
        b, a = _ppls(ev.get("before")), _ppls(ev.get("after"))
        c = _ppls(ctrl["report"]["evaluation"]["after"]) if ctrl else {}
        cname = next((n for n, r in res["rows"].items() if r is ctrl), None)
        for k, text in enumerate(a):
            head = (f"| {name} | {row['label']} | {row['recipe_label']}, {row['data']}, {row['report']['tokens']:,} |"
                    if k == 0 else "| | | |")
            tuned = f"{_ppl(c[text])} ({cname})" if text in c else "not run"
            out.append(f"{head} {HELDOUT_NAMES.get(text, text)} | {_ppl(b.get(text))} | {_ppl(a[text])} | "
                       f"{_ppl(d.get(text))} | {tuned} | {_ratio(a[text], d.get(text))} | "
                       f"**{_ratio(a[text], c.get(text))}** | {_ratio(b.get(text), d.get(text))} |")
    return out + [""] + honest_tasks(res, rows, dense)


def honest_tasks(res: dict, rows: list[tuple[str, dict]], dense: dict) -> list[str]:
    """Accuracy ± stderr of every held-out-protocol row; each comparison a tie (≈) or a real difference."""
    out = ["Tasks (0-shot accuracy ± one standard error on the first n examples; ≈ = a tie: the difference is "
           "inside two standard errors of the difference, ↑ / ↓ = clearly better / worse than the column it is "
           "compared with):", "",
           "| row | task | n | one-shot | recovered | dense | tuned dense | recovered vs one-shot | recovered vs dense "
           "| recovered vs tuned dense |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, row in rows:
        ev = row["report"]["evaluation"]
        ctrl = control_of(res, row)
        c = ctrl["report"]["evaluation"]["after"]["tasks"] if ctrl else None
        for task in ev["after"]["tasks"]:
            a, b, dd = _task(ev["after"]["tasks"], task), _task(ev["before"]["tasks"], task), _task(dense["tasks"], task)
            cc = _task(c, task)
            vs = [verdict(*a, *ref) if ref else "-" for ref in (b, dd, cc)]
            out.append(f"| {name} | {task} | {ev['after']['tasks'][task]['n']} | {_acc(ev['before']['tasks'], task)} | "
                       f"{_acc(ev['after']['tasks'], task)} | {_acc(dense['tasks'], task)} | "
                       f"{_acc(c, task) if c else 'not run'} | " + " | ".join(vs) + " |")
    return out + [""]


ABLATION = ("kd-full-adamw", "ce-full-adamw", "kd-lora-adamw", "kd-full-galore", "kd-full-spam", "kd-full-adamw-fast")


def ablations(res: dict) -> list[str]:
    """Starting model x recipe at the fixed budget on the same text: WikiText-2 ppl after (optimizer
    state MB, tok/s) -- what each choice buys, read along a row."""
    budget = res.get("settings", {}).get("budget")
    cells: dict[str, dict[str, dict]] = {}
    for name, row in res.get("rows", {}).items():  # the h- rows repeat a recipe on a new host: their own table
        if row["report"]["tokens"] == budget and row["data"] == "wt2valid" and row["recipe"] in ABLATION \
                and not name.startswith("h-"):
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
        f"evaluation: {s.get('eval')}; tasks {', '.join(s.get('tasks', []))}: the first n examples "
        "(500 from the held-out protocol on, 60 in the rows before it), acc ± one standard error; an accuracy after "
        "training is marked ≈ when it ties with the one before (inside two standard errors of the difference), "
        "↑ / ↓ when it is clearly higher / lower",
        f"- training: {s.get('base')}; training text `wt2valid` = WikiText-2 *validation* (`{s.get('wt2valid')}`), "
        "`austen` = the six novels; the test split is never trained on; 4 windows of the text are held out "
        "(held-out KL = mean KL(teacher || student) per token on them)",
        "- tok/s = training tokens / training seconds (forward, backward, optimizer; evaluation excluded); "
        "ceiling = tokens/s if every matmul FLOP of the row (student forward+backward, teacher forward, attention) "
        "ran at the measured matmul rate of its dtype; share = tok/s ÷ ceiling",
        "- sparsity = zeros / weights over the decoder linears, before → after training "
        "(must be identical: pruned positions are held at zero)", "",
    ]
    lines += students(res) + honest(res) + targets(res) + ablations(res)
    if dense:
        lines.append(f"Dense SmolLM2-135M (current protocol): WikiText-2 ppl {_ppl(dense['wikitext2']['ppl'])}, "
                     f"piqa {_acc(dense['tasks'], 'piqa')}, boolq {_acc(dense['tasks'], 'boolq')}.")
        lines.append("")
    lines += [
        "All rows (task columns: before → after, the after value marked against the before one):", "",
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
            f"{_acc(b.get('tasks'), 'piqa')} → {_acc(a.get('tasks'), 'piqa', b.get('tasks'))} | "
            f"{_acc(b.get('tasks'), 'boolq')} → {_acc(a.get('tasks'), 'boolq', b.get('tasks'))} | "
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
