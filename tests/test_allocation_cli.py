"""``prunekit analyze`` end to end on a tiny saved model."""

from __future__ import annotations

import csv
import json

import pytest

from prunekit.cli import main


def test_analyze_writes_tables_and_plots(tiny_folder, tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    monkeypatch.setenv("PRUNEKIT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "an"
    rc = main(["analyze", "--model", str(tiny_folder), "--out", str(out), "--compare", str(tiny_folder),
               "--sparsity", "0.6", "--epsilon", "0.2"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "model.layers.1.mlp.down_proj" in text and "alpha (alpha_peak, ε=0.2)" in text
    for f in ("alpha_peak_by_block.png", "alpha_peak_by_kind.png", "esd.png", "allocation.png",
              "alpha_peak_compare.png"):
        assert (out / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (out / f).stat().st_size > 10_000, f
    rows = list(csv.DictReader(open(out / "layers.csv")))
    assert len(rows) == 2 * 14 and float(rows[0]["alpha"]) > 1
    data = json.loads((out / "layers.json").read_text())
    per_block = data["allocation_per_block"]["alpha (alpha_peak, ε=0.2)"]
    assert sum(per_block.values()) / len(per_block) == pytest.approx(0.6)  # equal-size blocks


def test_analyze_bad_input_is_a_one_line_error(tiny_folder, tmp_path, capsys):
    assert main(["analyze", "--out", str(tmp_path / "x")]) == 2
    assert "no model given" in capsys.readouterr().err
    assert main(["analyze", str(tiny_folder), "--out", str(tmp_path / "x"), "--sparsity", "1.5", "--no-plots"]) == 2
    assert main(["analyze", str(tiny_folder), "--out", str(tmp_path / "x"), "--layers", "nomatch$"]) == 2


def test_analyze_owl_reports_the_outlier_ratio_per_block(tiny_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PRUNEKIT_CACHE", str(tmp_path / "cache"))
    text_file = tmp_path / "calib.txt"
    text_file.write_text(" ".join(f"word{i % 97} and then some more text number {i}." for i in range(3000)))
    out = tmp_path / "an"
    rc = main(["analyze", "--model", str(tiny_folder), "--out", str(out), "--no-plots", "--brief",
               "--owl-calib", str(text_file), "--nsamples", "4", "--seqlen", "32", "--sparsity", "0.5"])
    assert rc == 0
    data = json.loads((out / "layers.json").read_text())
    ratios = data["owl_outlier_ratio_per_block"]
    assert len(ratios) == len(data["allocation_per_block"]["uniform"])
    # a ratio is a share of the block's scores: a whole number of the block's 36864 weights
    # (q, o 64x64; k, v 32x64; gate, up 128x64; down 64x128)
    assert all(abs(r * 36864 - round(r * 36864)) < 1e-6 and 0 < r < 1 for r in ratios.values())
    assert "OWL outlier ratio per block" in capsys.readouterr().out
    owl = next(v for k, v in data["allocation_per_block"].items() if k.startswith("owl"))
    # the block with the most outliers is pruned least
    top = max(ratios, key=ratios.get)
    assert owl[top] == min(owl.values())
