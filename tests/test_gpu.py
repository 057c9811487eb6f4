"""``--device cuda``: the same engine on a GPU. Skipped where torch has no CUDA device (this CI);
run on a machine that has one (the numbers of a GPU run are recorded in benchmarks/results/)."""

import pytest
import torch

from conftest import tiny_model
from prunekit import EvalConfig, PruneConfig, evaluate, load_model, prune
from prunekit.cli import main
from prunekit.models import decoder_linears, weight_view

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_gpu_prune_matches_cpu_masks(method, calib_ids):
    cpu, gpu = tiny_model(), tiny_model().cuda()
    prune(cpu, PruneConfig(method=method, sparsity=0.5), calib=calib_ids)
    prune(gpu, PruneConfig(method=method, sparsity=0.5), calib=calib_ids)
    for (n, a), b in zip(decoder_linears(cpu).items(), decoder_linears(gpu).values()):
        agree = float(((weight_view(a) != 0) == (weight_view(b).cpu() != 0)).float().mean())
        assert agree > 0.99, n  # float accumulation differs between devices; near-ties may flip


@cuda
def test_offload_from_cpu_model_to_gpu_compute(calib_ids):
    model = tiny_model()
    report = prune(model, PruneConfig(method="sparsegpt", sparsity=0.5), calib=calib_ids, device="cuda")
    assert next(model.parameters()).device.type == "cpu" and report.sparsity == pytest.approx(0.5, abs=0.01)
    assert report.blocks[0].peak_device_mb is not None


@cuda
def test_cli_prune_and_eval_on_cuda(tiny_folder, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 100)
    out = tmp_path / "out"
    assert main(["prune", str(tiny_folder), "--device", "cuda", "--calib", str(text), "--nsamples", "2", "--seqlen",
                 "32", "--eval", str(text), "--eval-seqlen", "32", "--max-windows", "2", "--out", str(out)]) == 0
    assert main(["eval", str(out), "--device", "cuda", "--datasets", str(text), "--seqlen", "32"]) == 0
    model, tok = load_model(str(out), device="cuda")
    res = evaluate(model, tok, EvalConfig((str(text),), seqlen=32, max_windows=2))
    assert res[str(text)].ppl > 1


def test_asking_for_cuda_without_it_is_one_line(tiny_folder, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["eval", str(tiny_folder), "--device", "cuda"]) == 2
    assert "this torch has no CUDA device; use --device cpu" in capsys.readouterr().err
