"""The quality and speed stages of ``bench_sparse_decode.py`` (one row per setting, resumable)."""

from __future__ import annotations

import gc
import time

import torch

import prunekit
from prunekit import ActivationSparsityConfig, CalibConfig, PruneConfig
from prunekit.formats.activation import ACTIVATION, read_side_files, write_side_files
from prunekit.data import calibration_ids
from prunekit.eval import perplexity
from prunekit.eval.tasks import TaskSettings, prepare_tasks, run_tasks
from prunekit.formats import save_model
from prunekit.kernels.bench import bench_decode
from prunekit.kernels.generate import decode_seconds, interleaved, prefill_seconds
from prunekit.report import environment

from bench_sparse_decode import CACHE, save

QUALITY = {
    "smollm2-135m": ["dense", *[f"act/{m}/uniform/{s}" for m in ("teal", "cats", "chess") for s in (0.25, 0.4, 0.5)],
                     "act/teal/greedy/0.4", "act/wina/uniform/0.4", "act/wina/greedy/0.4", "weight/wanda/0.5", "both/wanda0.5+teal0.4", "blocks/shortgpt/7",
                     "blocks/shortgpt/8", "blocks/shortgpt/9"],
    "qwen2.5-coder-1.5b": ["dense", "act/teal/uniform/0.4", "weight/wanda/0.5", "both/wanda0.5+teal0.4",
                           "act/teal/uniform/0.25", "act/teal/uniform/0.3", "act/teal/uniform/0.5",
                           "act/teal/greedy/0.4", "act/cats/uniform/0.4", "act/chess/uniform/0.4", "blocks/shortgpt/8",
                           "act/wina/uniform/0.4"],
}
SPEED = {
    "smollm2-135m": ["layout/W^T", "act/teal/uniform/0.4", "act/teal/uniform/0.5", "act/teal/greedy/0.4",
                     "act/cats/uniform/0.4", "act/chess/uniform/0.4", "weight/wanda/0.5", "both/wanda0.5+teal0.4",
                     "blocks/shortgpt/8", "blocks/shortgpt/9"],
    "qwen2.5-coder-1.5b": ["layout/W^T", "act/teal/uniform/0.4", "act/teal/uniform/0.3", "act/teal/uniform/0.25",
                           "act/teal/greedy/0.4", "act/cats/uniform/0.4", "act/chess/uniform/0.4",
                           "weight/wanda/0.5", "both/wanda0.5+teal0.4", "blocks/shortgpt/8"],
}
#: tokens of each 1024-token window prefilled densely in the generation-protocol perplexity (TEAL: half)
PROMPT = 512
#: quality runs in bf16 (2x the matmul speed here; core.md: SmolLM2 dense 23.47 bf16 vs 23.48 fp32)
QUALITY_DTYPE = {"smollm2-135m": "bfloat16", "qwen2.5-coder-1.5b": "bfloat16"}


def _calib(args, tok) -> torch.Tensor:
    return calibration_ids(CalibConfig("austen", args.nsamples, 1024, 0), tok)


def _dir(model: str, what: str):
    return CACHE / model / what.replace("/", "_").replace("^", "")


def _act_cfg(label: str, args) -> ActivationSparsityConfig:
    """``act/<method>/<allocation>/<sparsity>[/pca]``: ``/pca`` rotates the residual stream first."""
    _, method, alloc, s, *rotate = label.split("/")
    return ActivationSparsityConfig(sparsity=float(s), method=method, allocation=alloc, rotate=(rotate or ["none"])[0],
                                    calib=CalibConfig("austen", args.nsamples, 1024, 0))


def _wanda(model, tok, ids, args, name: str):
    cfg = PruneConfig(method="wanda", sparsity=0.5, calib=CalibConfig("austen", args.nsamples, 1024, 0, batch_size=4))
    prunekit.prune(model, cfg, calib=ids)
    folder = _dir(name, "wanda0.5")
    if not folder.exists():
        save_model(model, tok, folder)


def build(label: str, name: str, dtype: str, args, tok=None, ids=None):
    """The model of a row, compressed as the label says (thresholds / weights cached for the speed stage)."""
    kind = label.split("/")[0]
    rotated = kind == "act" and label.endswith("/pca")  # the rotation changes the weights: the whole model is cached
    if rotated and ACTIVATION.detect(_dir(name, label)) and not args.recalibrate:
        return prunekit.load_model(str(_dir(name, label)), dtype)
    if kind in ("weight", "both") and _dir(name, "wanda0.5").exists():
        model, tok = prunekit.load_model(str(_dir(name, "wanda0.5")), dtype)
    else:
        model, tok = prunekit.load_model(name, dtype)
        if kind in ("weight", "both"):
            _wanda(model, tok, ids if ids is not None else _calib(args, tok), args, name)
    act = {"act": label, "both": "act/teal/uniform/0.4"}.get(kind)
    if rotated:
        return _rotated(label, name, args, model, tok, ids)
    if act is not None:
        folder = _dir(name, label)
        if ACTIVATION.detect(folder) and not args.recalibrate:
            read_side_files(folder).install(model)
        else:
            st = prunekit.sparsify_activations(model, _act_cfg(act, args), calib=ids if ids is not None else _calib(args, tok))
            folder.mkdir(parents=True, exist_ok=True)
            write_side_files(st, folder)
    if kind == "blocks":
        folder = _dir(name, label)
        if folder.exists():
            del model
            model, tok = prunekit.load_model(str(folder), dtype)
        else:
            k = int(label.split("/")[-1])
            n = model.config.num_hidden_layers
            prunekit.prune(model, PruneConfig(method="shortgpt", pattern="blocks", sparsity=k / n,
                                              calib=CalibConfig("austen", args.nsamples, 1024, 0, batch_size=4)),
                           calib=ids if ids is not None else _calib(args, tok))
            from prunekit.formats import save_folder

            save_folder(model, tok, folder)
    return model, tok


def _rotated(label: str, name: str, args, model, tok, ids):
    """A row whose residual stream is rotated before its thresholds, built and saved whole (rotated weights and
    thresholds, in the dtype it was built in): ``build`` loads that folder afterwards, never the dense model."""
    st = prunekit.sparsify_activations(model, _act_cfg(label, args), calib=ids if ids is not None else _calib(args, tok))
    ACTIVATION.save(model, tok, _dir(name, label), {"extra": {"activation": st.report}}, overwrite=True)
    return model, tok


def quality_dtype(name: str, args) -> str:
    return getattr(args, "quality_dtype", None) or QUALITY_DTYPE[name]


def quality_key(name: str, args) -> str:
    """The quality table of a model: its name, with the dtype when it is not the default (bf16)."""
    dtype = quality_dtype(name, args)
    return name if dtype == QUALITY_DTYPE[name] else f"{name} ({dtype})"


def quality_row(label: str, name: str, args, ids) -> dict:
    dtype = quality_dtype(name, args)
    t0 = time.perf_counter()
    model, tok = build(label, name, dtype, args, ids=ids)
    built = time.perf_counter() - t0
    row = {"label": label, "model": name, "dtype": dtype, "build_s": built, "blocks": model.config.num_hidden_layers}
    st = getattr(model, "prunekit_activation", None)
    if st is not None:
        row["activation"] = {k: st.report.get(k) for k in ("mean_target", "mean_sparsity", "skipped_fraction")}
    for ds in ("wikitext2", "gsm8k"):
        r = perplexity(model, tok, ds, 1024, args.windows, 1)
        row[ds] = {"ppl": r.ppl, "windows": r.windows, "tokens": r.tokens}
    if args.dense_prompt:
        row["wikitext2_prompt"] = _prompt_ppl(model, tok, args)
    if args.piqa:
        row["piqa"] = _piqa(model, tok, args)
    row["seconds"] = time.perf_counter() - t0
    print(f"{name} {label}: wiki {row['wikitext2']['ppl']:.2f} gsm8k {row['gsm8k']['ppl']:.2f} "
          f"piqa {row.get('piqa', {}).get('acc', float('nan')):.3f} ({row['seconds']:.0f}s)", flush=True)
    del model
    gc.collect()
    return row


def _piqa(model, tok, args) -> dict:
    res = run_tasks(model, tok, prepare_tasks(["piqa"]), TaskSettings(limit=args.piqa, batch_size=16))["piqa"]
    return {"acc": res.metrics["acc"], "stderr": res.stderr.get("acc"), "n": res.n}


def _prompt_ppl(model, tok, args) -> dict:
    """WikiText-2 as generation sees it (TEAL's protocol): each 1024-token window's first half a prompt
    prefilled densely, the second half thresholded and scored."""
    r = perplexity(model, tok, "wikitext2", 1024, args.windows, 1, prompt=PROMPT)
    return {"ppl": r.ppl, "windows": r.windows, "tokens": r.tokens, "prompt": PROMPT}


def add_metric(row: dict, key: str, label: str, name: str, args, ids) -> None:
    """``piqa`` or ``wikitext2_prompt`` for a row measured without it (the rest of the row is kept)."""
    t0 = time.perf_counter()
    model, tok = build(label, name, row["dtype"], args, ids=ids)
    got = _piqa(model, tok, args) if key == "piqa" else _prompt_ppl(model, tok, args)
    row[key] = got | {"seconds": time.perf_counter() - t0, "environment": environment()}
    print(f"{name} {label}: {key} {got.get('acc', got.get('ppl')):.3f} ({row[key]['seconds']:.0f}s)", flush=True)
    del model
    gc.collect()


def stage_quality(args, data: dict) -> None:
    name = args.model
    tab = data["quality"].setdefault(quality_key(name, args), {})
    tok = prunekit.formats.load_tokenizer(name)
    ids = _calib(args, tok)
    for label in args.rows or QUALITY[name]:
        if label in tab and not args.redo:
            if args.piqa and "piqa" not in tab[label] and args.add_tasks:
                add_metric(tab[label], "piqa", label, name, args, ids)
                save(data)
            if args.dense_prompt and "wikitext2_prompt" not in tab[label]:
                add_metric(tab[label], "wikitext2_prompt", label, name, args, ids)
                save(data)
            continue
        tab[label] = quality_row(label, name, args, ids)
        tab[label]["environment"] = environment()
        save(data)


def _blocks_speed(name: str, label: str, dtype: str, args) -> dict:
    dense, _ = prunekit.load_model(name, dtype)
    small, _ = build(label, name, dtype, args)
    vocab = dense.config.vocab_size
    ids = torch.randint(0, vocab, (1, max(args.prefill_tokens, 128)), generator=torch.Generator().manual_seed(0))
    models = {"dense": dense, "sparse": small}

    def measure(n):
        m = models[n]
        return prefill_seconds(m, ids[:, :args.prefill_tokens]), decode_seconds(m, ids[:, :128], args.new_tokens)

    t = interleaved({"dense": lambda: None, "sparse": lambda: None}, measure, args.repeats)
    d, s = t["dense"].summary(), t["sparse"].summary()
    return {"dense": d, "sparse": s, "decode_speedup": d["decode_s_per_token"]["median"] / s["decode_s_per_token"]["median"],
            "prefill_speedup": d["prefill_s"]["median"] / s["prefill_s"]["median"], "repeats": args.repeats,
            "params": sum(p.numel() for p in small.parameters()), "params_dense": sum(p.numel() for p in dense.parameters())}


def speed_row(label: str, name: str, dtype: str, args) -> dict:
    if label.startswith("blocks/"):
        return _blocks_speed(name, label, dtype, args)
    model, kw = _timed_model(label, name, dtype, args)
    return bench_decode(model, 128, args.new_tokens, args.prefill_tokens, args.repeats, **kw)


def _timed_model(label: str, name: str, dtype: str, args):
    """The model a speed / prefill row times, and how ``bench_decode`` converts it: the layout row is the
    dense model with every linear in the kernels' layout; the others are built as the label says."""
    if label.startswith("layout/"):
        return prunekit.load_model(name, dtype)[0], {"weights": "dense", "convert_all": True}
    return build(label, name, dtype, args)[0], {"weights": "auto"}


def prefill_row(label: str, name: str, dtype: str, args) -> dict:
    """Prefill alone at every ``--prefill-lengths`` (the bitmask unpack is a fixed cost per forward pass; the
    matmul grows with the prompt), dense and sparse interleaved at each length."""
    model, kw = _timed_model(label, name, dtype, args)
    out = {}
    for n in args.prefill_lengths:
        r = bench_decode(model, 128, 0, n, args.repeats, **kw)
        out[str(n)] = {k: r[k] for k in ("dense", "sparse", "prefill_speedup", "repeats")}
        print(f"{name} {dtype} {label} prefill {n}: {r['prefill_speedup']:.2f}x", flush=True)
    return out


def stage_prefill(args, data: dict) -> None:
    name = args.model
    for dtype in args.dtypes:
        tab = data.setdefault("prefill", {}).setdefault(name, {}).setdefault(dtype, {})
        for label in args.rows or ["weight/wanda/0.5", "layout/W^T"]:
            if label in tab and not args.redo:
                continue
            t0 = time.perf_counter()
            tab[label] = {"lengths": prefill_row(label, name, dtype, args), "seconds": time.perf_counter() - t0,
                          "environment": environment()}
            save(data)
            gc.collect()


def stage_speed(args, data: dict) -> None:
    name = args.model
    for dtype in args.dtypes:
        tab = data["speed"].setdefault(name, {}).setdefault(dtype, {})
        for label in args.rows or SPEED[name]:
            if label in tab and not args.redo:
                continue
            t0 = time.perf_counter()
            row = speed_row(label, name, dtype, args)
            row.update(label=label, seconds=time.perf_counter() - t0, environment=environment())
            tab[label] = row
            print(f"{name} {dtype} {label}: decode {row['decode_speedup']:.2f}x, prefill "
                  f"{row.get('prefill_speedup', float('nan')):.2f}x", flush=True)
            save(data)
            gc.collect()
