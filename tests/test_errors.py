"""Bad input fails with one clear line naming the value and the fix, and leaves no output."""

import errno

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import run_cli, save_tiny, tiny_model
from prunekit import PruneConfig, prune
from prunekit.config import CalibConfig, EvalConfig
from prunekit.formats import atomic_folder
from prunekit.models import UnsupportedModelError, find_blocks


def _common(folder, out, *extra):
    return ["prune", str(folder), "--calib", "wikitext2", "--nsamples", "2", "--seqlen", "32", "--out", str(out),
            "--eval", "wikitext2", "--max-windows", "1", *extra]


def test_missing_model_path(tmp_path, capsys):
    out = tmp_path / "out"
    rc, err, _ = run_cli(capsys, "prune", str(tmp_path / "no-such-model"), "--out", str(out))
    assert rc == 2 and "not found" in err and "no-such-model" in err and "alias" in err
    assert not out.exists()


@pytest.mark.parametrize("value", ["1.0", "-0.1", "1.5"])
def test_sparsity_out_of_range(tmp_path, capsys, tiny_folder, value):
    out = tmp_path / "out"
    rc, err, _ = run_cli(capsys, "prune", str(tiny_folder), "--sparsity", value, "--out", str(out))
    assert rc == 2 and f"sparsity={float(value)}" in err and "[0, 1)" in err
    assert not out.exists()


def test_nm_on_indivisible_width(tmp_path, capsys, data_dir):
    folder = save_tiny(tmp_path / "m", intermediate_size=126)
    out = tmp_path / "out"
    rc, err, _ = run_cli(capsys, *_common(folder, out, "--pattern", "2:4"))
    assert rc == 2 and "down_proj" in err and "126" in err and "--exclude" in err
    assert not out.exists()


def test_too_little_calibration_text(tmp_path, capsys, tiny_folder):
    txt = tmp_path / "short.txt"
    txt.write_text("a few words only")
    out = tmp_path / "out"
    rc, err, _ = run_cli(capsys, "prune", str(tiny_folder), "--calib", str(txt), "--seqlen", "64", "--out", str(out),
                         "--eval")
    assert rc == 2 and "too little calibration text" in err and "seqlen=64" in err
    assert not out.exists()


def test_seqlen_above_model_limit(tmp_path, capsys, tiny_folder, data_dir):
    out = tmp_path / "out"
    rc, err, _ = run_cli(capsys, "prune", str(tiny_folder), "--seqlen", "512", "--out", str(out), "--eval")
    assert rc == 2 and "512" in err and "context length 256" in err
    assert not out.exists()


def test_nan_weights(tmp_path, capsys, tiny_folder, data_dir):
    f = tiny_folder / "model.safetensors"
    sd = load_file(f)
    key = next(k for k in sd if "layers.1.mlp.up_proj" in k)
    sd[key][0, 0] = float("nan")
    save_file(sd, f, metadata={"format": "pt"})
    out = tmp_path / "out"
    rc, err, _ = run_cli(capsys, *_common(tiny_folder, out))
    assert rc == 2 and "model.layers.1.mlp.up_proj" in err and "NaN" in err
    assert not out.exists()


def test_existing_output_folder_is_not_touched(tmp_path, capsys, tiny_folder):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc, err, _ = run_cli(capsys, "prune", str(tiny_folder), "--out", str(out))
    assert rc == 2 and "already exists" in err and "--overwrite" in err
    assert (out / "keep.txt").read_text() == "mine"


def test_malformed_jsonl_calibration(tmp_path, capsys, tiny_folder):
    bad = tmp_path / "c.jsonl"
    bad.write_text('{"text": "fine"}\n{"txt": "wrong field"}\n')
    rc, err, _ = run_cli(capsys, "prune", str(tiny_folder), "--calib", str(bad), "--seqlen", "8", "--eval")
    assert rc == 2 and "c.jsonl:2" in err and "'text'" in err and "--text-field" in err


def test_unknown_dataset_and_method(tmp_path, capsys, tiny_folder):
    rc, err, _ = run_cli(capsys, "prune", str(tiny_folder), "--calib", "c5", "--eval")
    assert rc == 2 and "unknown dataset 'c5'" in err and "austen" in err


def test_disk_full_leaves_nothing_behind(tmp_path):
    out = tmp_path / "model"

    def write(tmp):
        (tmp / "part.bin").write_bytes(b"x" * 10)
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="disk full.*nothing was left behind"):
        atomic_folder(out, write)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_interrupted_save_leaves_nothing_behind(tmp_path):
    out = tmp_path / "model"

    def write(tmp):
        (tmp / "part.bin").write_bytes(b"x")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_folder(out, write)
    assert list(tmp_path.iterdir()) == []


def test_unsupported_architecture():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4))
    with pytest.raises(UnsupportedModelError, match="Sequential.*ModuleList"):
        find_blocks(model)


def test_config_validation_messages():
    with pytest.raises(ValueError, match="nsamples=0"):
        CalibConfig(nsamples=0)
    with pytest.raises(ValueError, match="contradicts pattern 2:4"):
        PruneConfig(sparsity=0.7, pattern="2:4")
    assert PruneConfig(sparsity=None, pattern="1:4").sparsity == 0.75
    with pytest.raises(ValueError, match="max_windows"):
        EvalConfig(max_windows=0)


def test_api_rejects_bad_calibration_tensor():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="LongTensor"):
        prune(model, PruneConfig(method="wanda"), calib=torch.zeros(2, 8))
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        prune(model, PruneConfig(method="wanda"), calib=torch.full((2, 8), 999, dtype=torch.long))
    with pytest.raises(ValueError, match="no linear layer matches"):
        prune(model, PruneConfig(method="wanda", include=("nothing",)), calib=torch.zeros(2, 8, dtype=torch.long))
