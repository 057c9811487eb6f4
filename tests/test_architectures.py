"""Every block is computed on the activations the model really produces, on every architecture.

Two independent checks per architecture (tiny random configs; Mistral with a 4-token sliding
window, Gemma-2/3 mixing sliding-window and full attention, Gemma-3 with a rotary table per layer
type — where replaying block 0's arguments to every block is wrong):

1. the engine's block-by-block replay of the dense model equals the outputs of the model's own
   forward, block by block;
2. one-shot Wanda through the engine gives exactly the masks of a slow, obviously correct
   computation that runs the *whole* model once per block with forward hooks.
"""

import pytest
import torch

from conftest import rand_ids, tiny_model
from prunekit import PruneConfig, prune
from prunekit.calibration import run_sequential
from prunekit.calibration.context import capture_block_inputs
from prunekit.masks import keep_mask
from prunekit.methods import CompressResult, Method, Target
from prunekit.methods.base import InputStats
from prunekit.methods.wanda import wanda_scores
from prunekit.models import block_linears, decoder_linears, find_blocks, weight_view

ARCHS = ["llama", "qwen2", "mistral", "gemma2", "gemma3", "opt", "gpt2", "gpt_neox"]
SLIDING = {"mistral": {"sliding_window": 4}}


def _model(arch):
    return tiny_model(arch, **SLIDING.get(arch, {}))


def _ids(n=6, seqlen=24):
    return rand_ids(n, seqlen, seed=1)


def _block_outputs(model, ids, bs):
    """Each block's output on ``ids`` from the model's own forward (hooks), batches of ``bs``."""
    _, blocks = find_blocks(model)
    outs = [[] for _ in blocks]
    hooks = [b.register_forward_hook(lambda m, a, o, i=i: outs[i].append(o[0] if isinstance(o, tuple) else o))
             for i, b in enumerate(blocks)]
    with torch.no_grad():
        for s in range(0, ids.shape[0], bs):
            model(input_ids=ids[s : s + bs], use_cache=False)
    for h in hooks:
        h.remove()
    return [torch.cat(o) for o in outs]


class _Keep(Method):
    name = "keep"
    needs_calibration = False

    def compress(self, name, linear, stats, target):
        return CompressResult()


@pytest.mark.parametrize("arch", ARCHS)
def test_blocks_are_found_from_the_model_declaration(arch):
    model = _model(arch)
    path, blocks = find_blocks(model)
    assert len(blocks) == model.config.get_text_config().num_hidden_layers
    assert all(type(b).__name__ in model._no_split_modules for b in blocks), path


@pytest.mark.parametrize("arch", ARCHS)
def test_replay_equals_the_models_own_forward_block_by_block(arch):
    model, ids = _model(arch), _ids()
    want = _block_outputs(model, ids, bs=3)
    got = []
    targets = {n: Target(0.0) for n in decoder_linears(model)}
    run_sequential(model, ids, _Keep(), targets, batch_size=3, keep_outputs=True,
                   callback=lambda ev: got.append(torch.cat([t.clone() for t in ev.outputs])))
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, msg=f"{arch} block {i}")


def test_replaying_block_0_arguments_is_wrong_for_mixed_attention():
    """The control: the old replay (block 0's arguments for every block) is off from Gemma-3's first
    full-attention block on — the test above would have caught it."""
    model, ids = _model("gemma3"), _ids()
    want = _block_outputs(model, ids, bs=6)
    _, blocks = find_blocks(model)
    with torch.no_grad():
        rec = capture_block_inputs(model, blocks, ids, 6, torch.device("cpu"))
        h = rec.hidden[0]
        errs = []
        for i, block in enumerate(blocks):
            h = rec.calls[0][0](block, h)  # block 0's mask and rotary table, replayed
            errs.append(float((h - want[i]).norm() / want[i].norm()))
    assert errs[0] == 0.0 and errs[1] > 1e-2  # block 1 is full attention with its own rotary base


def _wanda_by_whole_model_forwards(model, ids, sparsity):
    """Slow and obviously correct: for each block, run the WHOLE (partially pruned) model on the
    calibration ids with hooks on that block's linears, then prune them with Wanda."""
    path, blocks = find_blocks(model)
    masks = {}
    for i, block in enumerate(blocks):
        linears = block_linears(block, f"{path}.{i}")
        stats = {n: InputStats(weight_view(m).shape[1], torch.device("cpu")) for n, m in linears.items()}
        hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: stats[n].update(a[0])) for n, m in linears.items()]
        with torch.no_grad():
            for s in range(ids.shape[0]):
                model(input_ids=ids[s : s + 1], use_cache=False)
        for h in hooks:
            h.remove()
        for n, m in linears.items():
            w = weight_view(m)
            keep = keep_mask(wanda_scores(w, stats[n].col_norm), sparsity, Target(sparsity).pattern, per_row=True)
            w.mul_(keep.to(w.dtype))
            masks[n] = keep
    return masks


@pytest.mark.parametrize("arch", ARCHS)
def test_wanda_through_the_engine_equals_wanda_by_whole_model_forwards(arch):
    ids = _ids()
    reference = _wanda_by_whole_model_forwards(_model(arch), ids, 0.5)
    model = _model(arch)
    prune(model, PruneConfig(method="wanda", sparsity=0.5, calib={"batch_size": 2}), calib=ids)
    for n, m in decoder_linears(model).items():
        assert torch.equal(weight_view(m) != 0, reference[n]), n
