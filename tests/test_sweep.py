"""Sweeps: knee definitions on hand-built curves, a resumed sweep does no repeated work, plots/report."""

from __future__ import annotations

import json

import pytest

from conftest import tiny_model, tiny_tokenizer
from prunekit.eval.knee import piecewise_knee, quality_loss, tolerance_knee
from prunekit.errors import ConfigError
from prunekit.sweep import SweepConfig, cell_key, knees, run_sweep
from prunekit.eval.tasks import TaskSettings, prepare_tasks

S = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]


def test_tolerance_knee_is_the_last_point_within_tolerance_of_dense():
    acc = [0.70, 0.70, 0.69, 0.685, 0.66, 0.60, 0.50, 0.40, 0.30]
    assert tolerance_knee(S, acc, True, 0.02) == 0.3  # 0.4 loses 0.04
    assert tolerance_knee(S, acc, True, 0.5) == 0.8
    assert tolerance_knee(S[:3], [0.7, 0.6, 0.7], True, 0.02) == 0.0  # a later recovery does not count
    ppl = [10.0, 10.1, 10.3, 10.6, 11.0, 13.0, 20.0, 60.0, 300.0]
    assert quality_loss(10.0, 10.4, False) == pytest.approx(0.04)
    assert tolerance_knee(S, ppl, False, 0.05) == 0.2  # 10.6 is +6%
    with pytest.raises(ValueError, match="strictly increasing"):
        tolerance_knee([0.0, 0.2, 0.1], [1, 2, 3], True, 0.1)


def test_piecewise_knee_finds_the_break_of_an_exact_two_segment_curve():
    # flat-ish to 0.5, then falling 10x faster
    acc = [0.70 - 0.02 * s if s <= 0.5 else 0.69 - 1.0 * (s - 0.5) for s in S]
    k = piecewise_knee(S, acc, True)
    assert k is not None and k.sparsity == 0.5
    assert k.slope_before == pytest.approx(-0.02, abs=1e-9) and k.slope_after == pytest.approx(-1.0, abs=1e-9)
    assert k.sse == pytest.approx(0.0, abs=1e-12)


def test_piecewise_knee_uses_log_perplexity_and_rejects_curves_that_do_not_break_down():
    import math

    ppl = [10 * math.exp(0.1 * s if s <= 0.6 else 0.06 + 8 * (s - 0.6)) for s in S]
    assert piecewise_knee(S, ppl, False).sparsity == 0.6
    improving = [0.5 + 0.01 * i for i in range(9)]
    assert piecewise_knee(S, improving, True) is None  # quality rises: no knee
    concave_up = [0.7 - 0.5 * s if s <= 0.3 else 0.55 - 0.05 * (s - 0.3) for s in S]
    assert piecewise_knee(S, concave_up, True) is None  # falls SLOWER after the break
    assert piecewise_knee(S[:3], [0.7, 0.6, 0.5], True) is None  # too few points


def test_sweep_config_validates():
    with pytest.raises(ConfigError, match="unknown method 'nope'"):
        SweepConfig(methods=("nope",))
    with pytest.raises(ValueError, match="must lie in"):
        SweepConfig(sparsities=(0.0, 1.0))
    with pytest.raises(ValueError, match="duplicates"):
        SweepConfig(methods=("wanda", "wanda"))
    cells = SweepConfig(methods=("wanda", "magnitude"), sparsities=(0.5, 0.0, 0.2)).cells()
    assert [(c["sparsity"], c["method"]) for c in cells] == [(0.2, "wanda"), (0.2, "magnitude"), (0.5, "wanda"), (0.5, "magnitude")]


@pytest.fixture
def toy(tmp_path):
    tok = tiny_tokenizer(320)
    model = tiny_model("llama", vocab_size=len(tok))
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. It is a truth universally acknowledged. " * 60)
    mc = tmp_path / "mc.jsonl"
    mc.write_text("\n".join(json.dumps({"context": c, "choices": ["fox", "dog"], "label": i % 2})
                            for i, c in enumerate(["the quick brown", "the lazy", "It is a"])) + "\n")
    return model, tok, text, mc


def test_resumed_sweep_does_no_repeated_work(toy, tmp_path, monkeypatch):
    from prunekit.calibration import calibration_forward_context  # noqa: F401
    import prunekit.api as api
    import prunekit.eval.tasks as task_mod
    import prunekit.sweep.run as sweep_mod
    from prunekit.config import CalibConfig

    model, tok, text, mc = toy
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = SweepConfig(methods=("magnitude", "wanda"), sparsities=(0.0, 0.3, 0.6), calibs=(str(text),),
                      calib=CalibConfig(str(text), nsamples=2, seqlen=16, batch_size=2),
                      tasks=(f"ppl:{text}", f"mc:{mc}"))
    settings = TaskSettings(batch_size=2, ppl_seqlen=32, ppl_max_windows=2)
    tasks = prepare_tasks(list(cfg.tasks))
    calls = {"prune": 0, "eval": 0}
    real_prune, real_run = api.prune, sweep_mod.run_tasks

    def counting_prune(*a, **k):
        calls["prune"] += 1
        return real_prune(*a, **k)

    def counting_run(*a, **k):
        calls["eval"] += 1
        return real_run(*a, **k)

    monkeypatch.setattr(api, "prune", counting_prune)
    monkeypatch.setattr(sweep_mod, "run_tasks", counting_run)  # the dense row
    monkeypatch.setattr(task_mod, "run_tasks", counting_run)  # every cell: pipeline.run scores through it
    out = tmp_path / "sweep"
    data = run_sweep(model, tok, cfg, tasks, settings, out, "tiny")
    assert calls == {"prune": 4, "eval": 5}  # 2 methods x 2 sparsities, + dense evaluated once
    assert all(torch_equal(before[k], v) for k, v in model.state_dict().items())  # dense weights untouched
    keys = [r["key"] for r in data["rows"]]
    assert keys[0] == "dense" and cell_key({"method": "wanda", "allocation": "uniform", "calib": str(text),
                                            "sparsity": 0.6}) in keys
    by_key = {r["key"]: r for r in data["rows"]}
    assert by_key[keys[1]]["actual_sparsity"] == pytest.approx(0.3, abs=0.01)
    assert (out / "results.csv").read_text().splitlines()[0].startswith("method,allocation,calib,sparsity")
    # same command again: nothing is pruned or evaluated
    data2 = run_sweep(model, tok, cfg, tasks, settings, out, "tiny")
    assert calls == {"prune": 4, "eval": 5}
    assert [r["key"] for r in data2["rows"]] == keys
    # one more sparsity: only the two new cells run
    cfg3 = SweepConfig(methods=cfg.methods, sparsities=(0.0, 0.3, 0.6, 0.8), calibs=cfg.calibs, calib=cfg.calib,
                       tasks=cfg.tasks)
    run_sweep(model, tok, cfg3, tasks, settings, out, "tiny")
    assert calls == {"prune": 6, "eval": 7}
    # different evaluation settings are refused, not mixed
    with pytest.raises(ConfigError, match=r"holds a sweep with different settings \(settings.ppl_seqlen: stored 32, "
                                          r"now 16\); use another --out folder"):
        run_sweep(model, tok, cfg3, tasks, TaskSettings(batch_size=2, ppl_seqlen=16, ppl_max_windows=2), out, "tiny")
    assert {k["metric"] for k in knees(json.loads((out / "results.json").read_text()))} >= {
        f"ppl:{text}/ppl", f"mc:{mc}/acc", f"mc:{mc}/acc_norm"}


def torch_equal(a, b) -> bool:
    import torch

    return torch.equal(a, b)


def test_plots_and_report(tmp_path):
    from prunekit.sweep.plots import markdown_report, plot_sweep

    def row(method, s, acc, ppl):
        return {"key": "dense" if method == "dense" else f"{method}|uniform|austen|{s:.4f}", "method": method,
                "allocation": "-" if method == "dense" else "uniform", "calib": "-" if method == "dense" else "austen",
                "sparsity": s, "actual_sparsity": s, "prune_seconds": 1.0, "eval_seconds": 2.0,
                "metrics": {"piqa/acc": {"value": acc, "stderr": 0.03, "higher_is_better": True, "main": True},
                            "ppl:wikitext2/ppl": {"value": ppl, "stderr": None, "higher_is_better": False, "main": True}},
                "tasks": {"piqa": {"n": 100, "settings": {"chance": 0.5}}}}

    rows = [row("dense", 0.0, 0.65, 15.0)]
    for i, s in enumerate(S[1:], 1):
        rows.append(row("wanda", s, 0.65 - (0.005 * i if s <= 0.5 else 0.03 + 0.5 * (s - 0.5)), 15 * (1.02 ** i if s <= 0.5 else 1.1 * 4 ** (10 * (s - 0.5)))))
        rows.append(row("magnitude", s, 0.65 - 0.04 * i, 15 * 1.5 ** i))
    data = {"rows": rows, "config": {"tolerance": 0.02, "ppl_tolerance": 0.05, "methods": ["wanda", "magnitude"]},
            "signature": {"model": "toy"}, "command": "prunekit sweep toy --out x"}
    data["knees"] = knees(data)
    wanda_acc = next(k for k in data["knees"] if k["method"] == "wanda" and k["metric"] == "piqa/acc")
    assert wanda_acc["piecewise_knee"] == 0.5 and wanda_acc["tolerance_knee"] == 0.4
    plots = plot_sweep(data, tmp_path / "plots", title="toy")
    assert set(plots) == {"piqa/acc", "ppl:wikitext2/ppl"}
    for name in plots.values():
        assert (tmp_path / "plots" / name).stat().st_size > 10_000
    md = markdown_report(data, plots)
    assert "![piqa/acc vs sparsity](plots/piqa_acc.png)" in md and "prunekit sweep toy" in md
    assert "| wanda | uniform | austen | piqa/acc | 40% | 50% |" in md


def test_sweep_cli_end_to_end_and_resume(tiny_folder, tmp_path, capsys):
    from prunekit.cli import main

    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. It is a truth universally acknowledged. " * 60)
    mc = tmp_path / "mc.jsonl"
    mc.write_text('{"context": "the quick brown", "choices": ["fox", "dog"], "label": 0}\n'
                  '{"context": "the lazy", "choices": ["fox", "dog"], "label": 1}\n')
    out = tmp_path / "sw"
    argv = ["sweep", str(tiny_folder), "--methods", "magnitude", "--sparsities", "0:0.5:0.25", "--calib", str(text),
            "--nsamples", "2", "--seqlen", "16", "--eval", str(text), "--eval-seqlen", "32", "--max-windows", "2",
            "--tasks", f"mc:{mc}", "--out", str(out)]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert "[3/3] magnitude|uniform" in first and "skipped" not in first
    assert {p.name for p in (out / "plots").iterdir()} >= {"mc_mc_acc.png", "mc_mc_acc_norm.png", "ppl_t_ppl.png"}
    report = (out / "report.md").read_text()
    assert "| magnitude | uniform |" in report and "![" in report
    assert main(argv) == 0
    assert capsys.readouterr().out.count("done earlier, skipped") == 3
    assert main(["sweep", str(tiny_folder), "--out", str(tmp_path / "none"), "--report-only"]) == 2
    assert main(["eval", str(tiny_folder), "--tasks", f"mc:{mc}", "--limit", "other=3"]) == 2
    assert "not in --tasks" in capsys.readouterr().err
