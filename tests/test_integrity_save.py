"""Nothing lost, nothing silently wrong around a save (issue 27, fixes 2-7 and the output-folder probes):
GQA head pruning that a stock config cannot say, blocks/ffn that round to nothing, the free-space check
before the work, the umask, symbolic links, parent folders, a crashed two-rename save, an in-place
export, an interrupted recovery, and a teacher with another tokenizer."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import calib_text, error_line, prune_argv, rand_ids, run_cli, save_tiny
from prunekit.cli import main


def _hidden(parent):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


# ------------------------------------------------------------------------------ 3: GQA heads / width

@pytest.mark.parametrize("heads,kv", [(8, 2), (4, 1)])
@pytest.mark.parametrize("pattern", ["heads", "width"])
def test_gqa_head_pruning_a_stock_config_cannot_say_is_saved_in_prunekits_format(tmp_path, capsys, heads, kv,
                                                                                  pattern):
    """hidden 64: one query head per group gone leaves 6 (or 3) heads, and Llama's config refuses a hidden size
    that is not a multiple of the head count: the finished prune is saved in prunekit's format, and says why."""
    folder = save_tiny(tmp_path / "gqa", num_attention_heads=heads, num_key_value_heads=kv)
    out = tmp_path / "out"
    sparsity = {"heads": "0.04", "width": "0.15"}[pattern]
    rc, err, text = run_cli(capsys, *prune_argv(folder, out, calib_text(tmp_path), "--pattern", pattern,
                                                "--method", "slimgpt", "--sparsity", sparsity, "--option", "multiple=8",
                                                "--nsamples", "4"))
    assert rc == 0, err[-3000:]
    back, _ = __import__("prunekit").load_model(str(out))
    attn = back.model.layers[0].self_attn
    left = attn.q_proj.out_features // attn.head_dim
    assert left < heads and left % (attn.k_proj.out_features // attn.head_dim) == 0  # groups stayed whole
    if 64 % left:  # a config transformers refuses: prunekit's format, and the reason printed
        assert (out / "prunekit_structured.json").is_file() and "transformers refuses the smaller config" in text
        assert "loads with" in text and "prunekit.load_model" in text.split("loads with", 1)[1].splitlines()[0]
    ids = rand_ids(1, 16)
    assert torch.isfinite(back(ids).logits).all()


def test_gqa_plan_check_warns_before_pruning(tmp_path, caplog):
    import logging

    from conftest import tiny_model
    from prunekit import PruneConfig, prune

    model = tiny_model(num_attention_heads=8, num_key_value_heads=2)
    ids = rand_ids(4, 32)
    with caplog.at_level(logging.WARNING, logger="prunekit"):
        rep = prune(model, PruneConfig(method="slimgpt", pattern="heads", sparsity=0.04), calib=ids)
    assert any("6 query heads / 2 key-value heads" in r.getMessage() for r in caplog.records)
    assert rep.extra["structure"]["save"]["format"] == "prunekit-structured"
    assert "hidden size (64) is not a multiple" in rep.extra["structure"]["save"]["why"]


def test_a_save_time_refusal_falls_back_to_prunekits_format(tmp_path, monkeypatch):
    """Whatever transformers refuses while the plain folder is written, the prune is saved, never lost."""
    from transformers import PreTrainedModel

    from conftest import tiny_model
    from prunekit import PruneConfig, prune
    from prunekit.formats import save_compressed
    from prunekit.formats.structured import load_structured_model

    model = tiny_model()
    prune(model, PruneConfig(method="magnitude", pattern="channels", sparsity=0.25, method_options={"multiple": 8}))
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", lambda *a, **k: (_ for _ in ()).throw(
        ValueError("a refusal nobody predicted")))
    out, how = save_compressed(model, None, tmp_path / "m")
    assert "a refusal nobody predicted" in how and (out / "prunekit_structured.json").is_file()
    monkeypatch.undo()
    back = load_structured_model(out, torch.float32)
    ids = rand_ids(1, 8)
    with torch.no_grad():
        assert torch.equal(back(ids).logits, model(ids).logits)


# ------------------------------------------------------------------------------ 4: nothing removed

@pytest.mark.parametrize("pattern, words", [
    ("blocks", ["--sparsity 0.05 removes no block", "use a --sparsity above 0.250", "blocks can reach 0.500"]),
    ("ffn", ["--sparsity 0.05 removes no FFN", "use a --sparsity above 0.167", "ffn can reach 0.333, 0.667"]),
    ("channels", ["--sparsity 0.05 removes nothing", "32 FFN channels", "use a --sparsity above 0.083"]),
])
def test_a_structured_target_that_rounds_to_nothing_is_refused_before_the_work(tmp_path, capsys, tiny_folder,
                                                                               monkeypatch, pattern, words):
    import prunekit.cli.prune as cli_prune

    monkeypatch.setattr(cli_prune, "run_perplexity", lambda *a, **k: pytest.fail("evaluated before the check"))
    rc, err, _ = run_cli(capsys, *prune_argv(tiny_folder, tmp_path / "o", calib_text(tmp_path), "--pattern", pattern,
                                      "--method", "shortgpt" if pattern in ("blocks", "ffn") else "magnitude",
                                      "--sparsity", "0.05"))
    line = error_line(err)
    assert rc == 2 and all(w in line for w in words), line
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------ 5: free space

def test_free_space_is_checked_before_the_work_with_a_proportional_margin(tmp_path, capsys, tiny_folder,
                                                                          monkeypatch):
    import prunekit.api as api

    real = shutil.disk_usage
    free = {"bytes": 5 * 2**20}  # 5 MB: plenty for a 0.4 MB model, less than the old fixed 64 MB margin
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=free["bytes"]))
    assert main([str(a) for a in prune_argv(tiny_folder, tmp_path / "ok", calib_text(tmp_path))]) == 0
    capsys.readouterr()
    free["bytes"] = 100_000
    monkeypatch.setattr(api, "prune", lambda *a, **k: pytest.fail("pruned before the free-space check"))
    rc, err, _ = run_cli(capsys, *prune_argv(tiny_folder, tmp_path / "no", calib_text(tmp_path)))
    line = error_line(err)
    assert rc == 2 and "not enough disk space for --out" in line and "MB are free" in line
    assert not (tmp_path / "no").exists()


def test_estimates_follow_the_output_format():
    from conftest import tiny_model
    from prunekit.formats.sizes import model_bytes
    from prunekit.formats.space import estimate_output_bytes
    from prunekit.models import decoder_linears

    model = tiny_model()
    lin = decoder_linears(model)
    lin_bytes = sum(m.weight.numel() * 4 for m in lin.values())
    full = model_bytes(model)
    assert estimate_output_bytes(model, "dense", 0.5, False, lin) == full
    assert estimate_output_bytes(model, "dense", 0.5, True, lin) == full - lin_bytes // 2
    compressed = full - lin_bytes + lin_bytes // 2 + sum(m.weight.numel() for m in lin.values()) // 8
    assert abs(estimate_output_bytes(model, "compressed", 0.5, False, lin) - compressed) <= len(lin)


# ------------------------------------------------------------------------------ 7: permissions

@pytest.mark.parametrize("umask, folder_mode, file_mode", [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)])
def test_saved_folders_honour_the_umask(tmp_path, capsys, tiny_folder, umask, folder_mode, file_mode):
    old = os.umask(umask)
    try:
        assert main([str(a) for a in prune_argv(tiny_folder, tmp_path / "o", calib_text(tmp_path))]) == 0
    finally:
        os.umask(old)
    out = tmp_path / "o"
    assert out.stat().st_mode & 0o777 == folder_mode
    assert {f.stat().st_mode & 0o777 for f in out.iterdir()} == {file_mode}


# ------------------------------------------------------------------------------ output folders

def test_a_symlinked_out_is_written_at_its_target_and_leaves_nothing_hidden(tmp_path, capsys, tiny_folder):
    real = tmp_path / "runs" / "v1"
    real.mkdir(parents=True)
    (real / "old.txt").write_text("old")
    link = tmp_path / "latest"
    link.symlink_to(real)
    assert main([str(a) for a in prune_argv(tiny_folder, link, calib_text(tmp_path), "--overwrite")]) == 0
    assert link.is_symlink() and os.path.realpath(link) == str(real)
    assert (real / "config.json").is_file() and not (real / "old.txt").exists()
    assert _hidden(tmp_path) == [] and _hidden(tmp_path / "runs") == []


def test_a_dangling_symlink_out_fails_before_the_prune(tmp_path, capsys, tiny_folder, no_weights):
    link = tmp_path / "latest"
    link.symlink_to(tmp_path / "nowhere" / "x")
    rc, err, _ = run_cli(capsys, *prune_argv(tiny_folder, link, calib_text(tmp_path)))
    line = error_line(err)
    assert rc == 2 and "is a symbolic link to" in line and "does not exist" in line
    assert link.is_symlink() and _hidden(tmp_path) == []


def test_parent_folders_made_for_a_failed_run_are_removed(tmp_path, capsys, tiny_folder):
    from safetensors.torch import load_file, save_file

    f = tiny_folder / "model.safetensors"
    sd = load_file(f)
    sd["model.norm.weight"][0] = float("nan")  # fails after the model loads, with --out reserved
    save_file(sd, f, metadata={"format": "pt"})
    out = tmp_path / "a" / "b" / "c"
    rc, err, _ = run_cli(capsys, *prune_argv(tiny_folder, out, calib_text(tmp_path)))
    assert rc == 2 and "NaN" in error_line(err)
    assert not (tmp_path / "a").exists()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_rerun_after_a_crashed_two_rename_save_fails_before_the_prune(tmp_path, capsys, tiny_folder, no_weights):
    """A crash between the fallback's two renames leaves the old folder as .OUT.old-PID-…: a rerun without
    --overwrite must say so before the work (it used to prune, then refuse at the save and lose the prune)."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")
    out.rename(tmp_path / f".out.old-{_dead_pid()}-abcd")
    rc, err, _ = run_cli(capsys, *prune_argv(tiny_folder, out, calib_text(tmp_path)))
    line = error_line(err)
    assert rc == 2 and "already exists" in line and "--overwrite" in line and "interrupted save" in line
    assert (out / "config.json").read_text() == "{}" and _hidden(tmp_path) == []


def test_in_place_export_keeps_the_report(tmp_path, capsys, tiny_folder):
    out = tmp_path / "c"
    argv = prune_argv(tiny_folder, out, calib_text(tmp_path), "--save-format", "compressed")
    assert main([str(a) for a in argv]) == 0
    before = json.loads((out / "prunekit_report.json").read_text())
    assert main(["export", str(out), "--out", str(out), "--overwrite", "--save-format", "dense"]) == 0
    after = json.loads((out / "prunekit_report.json").read_text())
    assert after["method"] == before["method"] == "magnitude" and after["evaluation"] == before["evaluation"]
    assert after["storage"]["save_format"] == "dense" and (out / "model.safetensors").is_file()


# ------------------------------------------------------------------------------ interrupted recovery

def _interrupt_after_a_checkpoint(monkeypatch):
    rec = sys.modules["prunekit.recover"]  # the package (prunekit.recover is shadowed by the function)

    def fake(model, teacher, tok, cfg, checkpoint_dir=None, **k):
        if checkpoint_dir is not None:
            checkpoint_dir.mkdir(parents=True, exist_ok=True)
            (checkpoint_dir / "state.pt").write_bytes(b"x")
        raise KeyboardInterrupt

    monkeypatch.setattr(rec, "recover", fake)


def test_interrupted_recover_says_the_checkpoint_is_kept_and_nothing_else(tmp_path, capsys, tiny_folder,
                                                                          monkeypatch):
    _interrupt_after_a_checkpoint(monkeypatch)
    calib = calib_text(tmp_path)
    out = tmp_path / "r"
    rc, err, _ = run_cli(capsys, "recover", tiny_folder, "--kl-weight", "0", "--ce-weight", "1", "--data", calib,
                      "--seqlen", "32", "--tokens", "256", "--checkpoint-every", "1", "--eval", "none", "--out", out)
    lines = [ln for ln in err.strip().splitlines() if ln.startswith(("interrupted", "terminated"))]
    assert rc == 130 and len(lines) == 1 and "nothing was saved" not in err
    assert f"checkpoint in {tmp_path / 'r.checkpoint'} is kept" in lines[0] and "rerun the same command" in lines[0]


def test_interrupted_prune_recover_mentions_the_checkpoint(tmp_path, capsys, tiny_folder, monkeypatch):
    _interrupt_after_a_checkpoint(monkeypatch)
    calib = calib_text(tmp_path)
    rc, err, _ = run_cli(capsys, *prune_argv(tiny_folder, tmp_path / "p", calib, "--recover", "--recover-option",
                                      f"data={calib}", "--recover-option", "checkpoint_every=1",
                                      "--recover-option", "kl_weight=0", "--recover-option", "ce_weight=1"))
    last = err.strip().splitlines()[-1]
    assert rc == 130 and f"checkpoint in {tmp_path / 'p.checkpoint'} is kept" in last and "prune is redone" in last


# ------------------------------------------------------------------------------ 2: the teacher's tokenizer

def _other_tokenizer(vocab_size: int):
    """A byte-level BPE of the same size as conftest's, trained on other text: other merges, other ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [" ".join(f"{w}{i}" for i in range(200)) for w in ("pack my box", "sphinx of quartz", "judge my vow")]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


def test_a_teacher_with_another_tokenizer_of_the_same_size_is_refused_before_loading(tmp_path, capsys, tiny_folder,
                                                                                      no_weights):
    from transformers import AutoTokenizer

    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_folder, teacher)
    for f in teacher.glob("tokenizer*"):
        f.unlink()
    other = _other_tokenizer(len(AutoTokenizer.from_pretrained(tiny_folder)))
    other.save_pretrained(teacher)
    assert len(other) == len(AutoTokenizer.from_pretrained(tiny_folder))
    rc, err, _ = run_cli(capsys, "recover", tiny_folder, "--teacher", teacher, "--data", calib_text(tmp_path), "--eval",
                      "none", "--out", tmp_path / "r")
    line = error_line(err)
    assert rc == 2 and f"teacher '{teacher}' and student '{tiny_folder}' have different tokenizers" in line
    assert "both have" in line and "vocabulary (e.g." in line and "merges differ" in line


def test_tokenizer_differences():
    from conftest import tiny_tokenizer
    from prunekit.formats.tokenizer_match import tokenizer_differences

    a, b = tiny_tokenizer(320), tiny_tokenizer(320)
    assert tokenizer_differences(a, b) == []
    c = tiny_tokenizer(320)
    c.add_special_tokens({"bos_token": "<eos>"})
    assert tokenizer_differences(a, c) == ["special tokens"]
    assert tokenizer_differences(a, _other_tokenizer(320))[0].startswith("vocabulary (e.g.")
