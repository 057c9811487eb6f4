"""Tasks: metric definitions on hand-built numbers, the batched engine against naive references,
every task family end to end on a tiny random model, and clear errors for bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import tiny_model, tiny_tokenizer
from prunekit.eval.tasks import TaskSettings, get_task, prepare_tasks, run_tasks
from prunekit.eval.tasks.lm import cut_at_stop, greedy_generate, loglikelihoods, split_request
from prunekit.eval.tasks.scoring import (
    contains_match, exact_match, extract_flexible, extract_strict, gsm8k_gold, mc_metrics, mc_predictions,
    mean_stderr, normalize_answer,
)
from prunekit.errors import ConfigError
from prunekit.registry import TASKS


# --- scoring: exact values -------------------------------------------------------------------
def test_mean_stderr_matches_sample_std_over_sqrt_n():
    m, se = mean_stderr([1.0, 0.0, 1.0, 1.0])
    assert m == 0.75
    assert se == pytest.approx(math.sqrt((3 * 0.25**2 + 0.75**2) / 3) / 2)  # ddof=1
    assert mean_stderr([0.5]) == (0.5, 0.0)
    with pytest.raises(ValueError, match="no examples"):
        mean_stderr([])


def test_acc_and_acc_norm_differ_by_character_length():
    # the long choice has the higher total log-likelihood per character, the short one in total
    lls = [-4.0, -6.0]
    choices = [" no", " a much longer answer"]  # 3 and 21 characters
    assert mc_predictions(lls, choices) == (0, 1)
    metrics, stderr = mc_metrics([lls, [-1.0, -2.0]], [choices, [" x", " yy"]], [1, (0,)])
    assert metrics == {"acc": 0.5, "acc_norm": 1.0}  # ex1: acc wrong, norm right; ex2: both pick 0 (-1 vs -1)
    assert stderr["acc"] == pytest.approx(0.5) and stderr["acc_norm"] == 0.0


def test_ties_go_to_the_first_choice_and_multiple_golds_count():
    assert mc_predictions([-1.0, -1.0], [" a", " b"]) == (0, 0)
    metrics, _ = mc_metrics([[-2.0, -1.0, -3.0]], [[" a", " b", " c"]], [(1, 2)])
    assert metrics["acc"] == 1.0


def test_answer_normalization_and_exact_match():
    assert normalize_answer("  The  Eiffel-Tower! ") == "eiffeltower"
    assert normalize_answer("An apple, a day") == "apple day"
    assert exact_match(" the United States.", ["United States", "USA"]) == 1.0
    assert exact_match("United States of America", ["United States"]) == 0.0
    assert contains_match("United States of America", ["United States"]) == 1.0
    assert contains_match("Parisian", ["Paris"]) == 0.0  # whole words only


def test_gsm8k_answer_extraction():
    gen = " She has 16 - 3 - 4 = 9 eggs.\nShe makes 9 * 2 = $18.\n#### 18"
    assert extract_strict(gen) == "18" and extract_flexible(gen) == "18"
    assert extract_strict("the answer is 1,234.") is None
    assert extract_flexible("the answer is $1,234.") == "1234"
    assert extract_flexible("so 18.00 dollars") == "18"
    assert extract_flexible("no digits here") is None
    assert gsm8k_gold("Janet sells 9 eggs.\n#### 18") == "18" and gsm8k_gold("-3") == "-3"
    with pytest.raises(ValueError, match="no final number"):
        gsm8k_gold("eighteen")


def test_cut_at_stop_picks_the_earliest():
    assert cut_at_stop("abc\n\nQuestion: x", ("Question:", "\n\n")) == ("abc", True)
    assert cut_at_stop("abc", ("\n",)) == ("abc", False)


# --- the engine against naive references -----------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    tok = tiny_tokenizer(320)
    return tiny_model("llama", vocab_size=len(tok)), tok


def test_split_request_moves_trailing_space_like_the_harness(tiny):
    _, tok = tiny
    ctx, cont = split_request(tok, "the quick ", "fox")
    assert tok.decode(ctx) == "the quick" and tok.decode(cont) == " fox"


def test_prefix_reuse_equals_scoring_each_sequence_alone(tiny):
    model, tok = tiny
    reqs = [("the quick brown", [" fox", " dog jumps over", " lazy"]), ("It is a truth ", ["universally", "all the"]),
            ("", [" hello there"]), ("a b c d e f g the lazy dog jumps", [" x"])]
    fast = loglikelihoods(model, tok, reqs, batch_size=2)
    ref = loglikelihoods(model, tok, reqs, batch_size=3, reuse_prefix=False)
    # naive: one unpadded forward per context+continuation
    naive = []
    for ctx, conts in reqs:
        row = []
        for c in conts:
            ci, ki = split_request(tok, ctx, c)
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=torch.tensor([ci + ki])).logits[0].float(), -1)
            row.append(float(sum(logp[len(ci) - 1 + t, k] for t, k in enumerate(ki))))
        naive.append(row)
    for a, b, c in zip(fast, ref, naive):
        assert a == pytest.approx(c, abs=1e-4) and b == pytest.approx(c, abs=1e-4)


def test_batched_cached_greedy_equals_naive_greedy(tiny):
    model, tok = tiny
    prompts = ["the quick", "It is a truth universally acknowledged", "dog"]

    def naive(p, n):
        ids, gen = tok(p, add_special_tokens=False).input_ids, []
        for _ in range(n):
            with torch.no_grad():
                gen.append(int(model(input_ids=torch.tensor([ids + gen])).logits[0, -1].argmax()))
        return tok.decode(gen)

    assert greedy_generate(model, tok, prompts, max_new_tokens=6, batch_size=2) == [naive(p, 6) for p in prompts]


@pytest.mark.parametrize("arch", ["qwen2", "mistral", "opt", "gpt_neox", "gpt2"])
def test_engine_is_exact_on_other_architectures(arch):
    from transformers import AutoModelForCausalLM

    from conftest import tiny_config

    tok = tiny_tokenizer(320)
    cfg = tiny_config(arch)
    cfg.vocab_size = len(tok)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    reqs = [("the quick brown", [" fox", " dog jumps over"]), ("It is a truth ", ["universally", "all the"]),
            ("a b c d e f g the lazy dog jumps", [" x y"])]
    fast = loglikelihoods(model, tok, reqs, batch_size=2)
    full = loglikelihoods(model, tok, reqs, batch_size=1, reuse_prefix=False)
    for a, b in zip(fast, full):
        assert a == pytest.approx(b, abs=1e-4)
    prompts = ["the quick", "It is a truth universally acknowledged"]
    batched = greedy_generate(model, tok, prompts, max_new_tokens=4, batch_size=2)
    assert batched == [greedy_generate(model, tok, [p], max_new_tokens=4, batch_size=1)[0] for p in prompts]


# --- every family end to end on the tiny model -------------------------------------------------
def _write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_families_end_to_end(tiny, tmp_path):
    model, tok = tiny
    mc = _write_jsonl(tmp_path / "mc.jsonl", [{"context": "the quick brown", "choices": ["fox", "dog"], "label": 0},
                                              {"context": "It is a", "choices": ["truth", "lie", "day"], "label": [1, 2]},
                                              {"context": "the lazy", "choices": ["dog", "fox"], "label": 1}])
    qa = _write_jsonl(tmp_path / "qa.jsonl", [{"question": "the quick brown", "answers": ["fox"]},
                                              {"prompt": "It is a truth", "answer": "universally"}])
    ar = _write_jsonl(tmp_path / "ar.jsonl", [{"question": "1+1?", "answer": "1+1=2\n#### 2"},
                                              {"question": "2+2?", "answer": "4"}])
    bb = tmp_path / "bb" / "task.json"
    bb.parent.mkdir()
    bb.write_text(json.dumps({"name": "toy", "examples": [{"input": "the quick brown", "target_scores": {"fox": 1, "dog": 0}},
                                                         {"input": "the lazy", "target_scores": {"dog": 1, "cat": 0}}]}))
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    specs = [f"mc:{mc}", f"qa:{qa}", f"arith:{ar}:shots=1,max_new_tokens=8", f"bigbench:{bb}", f"ppl:{text}"]
    tasks = prepare_tasks(specs)
    settings = TaskSettings(limit=2, batch_size=2, ppl_seqlen=32, ppl_max_windows=3)
    res = run_tasks(model, tok, tasks, settings)
    assert [r.family for r in res.values()] == ["multiple_choice", "generation", "arithmetic", "multiple_choice", "perplexity"]
    assert res[specs[0]].n == 2 and res[specs[1]].n == 2 and res[specs[2]].n == 1  # arith: 1 exemplar + 1 scored
    for r in res.values():
        for m, v in r.metrics.items():
            assert math.isfinite(v)
        assert r.tokens > 0 and r.tokens_per_s > 0
    assert res[specs[4]].n == 3 and res[specs[4]].metrics["ppl"] > 1  # windows, not the example limit
    # a random model is wrong or right, but the bookkeeping is exact: the arithmetic sample holds its gold
    assert res[specs[2]].samples[0]["gold"] == "4"
    # the multiple-choice metrics, recomputed from naive one-forward-per-choice scoring
    golds = [{0}, {1, 2}]
    preds, preds_norm = [], []
    for (ctx, choices) in [("the quick brown", ["fox", "dog"]), ("It is a", ["truth", "lie", "day"])]:
        lls = [_naive_loglikelihood(model, tok, ctx, " " + c) for c in choices]
        preds.append(max(range(len(lls)), key=lambda i: (lls[i], -i)))
        norm = [ll / len(" " + c) for ll, c in zip(lls, choices)]
        preds_norm.append(max(range(len(norm)), key=lambda i: (norm[i], -i)))
    mc = res[specs[0]]
    assert mc.metrics["acc"] == sum(p in g for p, g in zip(preds, golds)) / 2
    assert mc.metrics["acc_norm"] == sum(p in g for p, g in zip(preds_norm, golds)) / 2
    assert mc.settings["majority"] == 0.5
    assert mc.settings["pred_position_share"] == {str(p): preds.count(p) / 2 for p in sorted(set(preds))}


def _naive_loglikelihood(model, tok, context: str, continuation: str) -> float:
    ci, ki = split_request(tok, context, continuation)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ci + ki])).logits[0].float(), -1)
    return float(sum(logp[len(ci) - 1 + t, k] for t, k in enumerate(ki)))


def test_registered_tasks_read_the_data_directory(data_dir, tiny):
    model, tok = tiny
    expected = {"boolq": 3270, "piqa": 1838, "rte": 277, "mmlu": 14042, "gsm8k": 1319, "general_knowledge": 70,
                "social_iqa": 1954, "qa_wikidata": 20442 - 3}
    tasks = prepare_tasks(list(expected), data_dir)
    for name, task in tasks.items():
        assert len(task.examples()) == expected[name], name
    mmlu = tasks["mmlu"].examples()
    assert mmlu[0].context.startswith("The following are multiple choice questions (with answers) about abstract algebra.")
    assert mmlu[0].context.count("\nAnswer:") == 6 and mmlu[0].choices == (" A", " B", " C", " D")
    assert mmlu[1].context.split("\n")[0].endswith("about anatomy.")  # round-robin over subjects
    assert get_task("mmlu:shots=0", data_dir).examples()[0].context.count("\nAnswer:") == 1
    res = run_tasks(model, tok, {"rte": tasks["rte"]}, TaskSettings(limit=3, batch_size=2))
    assert res["rte"].n == 3


# --- errors --------------------------------------------------------------------------------------
def test_bad_task_names_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="unknown task 'hellaswag'; choose one of: .*boolq"):
        get_task("hellaswag")
    with pytest.raises(ValueError, match="not KEY=VALUE"):
        get_task("mmlu:five")
    with pytest.raises(ConfigError, match=r"^task 'piqa:shots=3' has no option 'shots'; its options are: none$"):
        get_task("piqa:shots=3")
    with pytest.raises(ConfigError, match=r"^task 'mmlu:shots=abc' option shots='abc' is invalid: it must be an integer$"):
        get_task("mmlu:shots=abc")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        get_task(f"mc:{tmp_path}/missing.jsonl")
    with pytest.raises(ValueError, match="listed twice"):
        prepare_tasks(["boolq", "boolq"], tmp_path)
    assert "boolq" in TASKS and "gsm8k" in TASKS


@pytest.mark.parametrize("line, message", [
    ("{not json", "is not valid JSON"),
    ('{"context": "a", "label": 0}', "has no field 'choices'"),
    ('{"context": "a", "choices": ["x", "y"], "label": 5}', "must be an index"),
    ('["a", "b"]', "not an object"),
])
def test_malformed_jsonl_fails_with_file_and_line(tmp_path, line, message):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"context": "ok", "choices": ["a", "b"], "label": 0}\n' + line + "\n")
    with pytest.raises(ValueError, match=message) as e:
        prepare_tasks([f"mc:{f}"])
    assert "bad.jsonl" in str(e.value)


def test_malformed_qa_and_arith_files(tmp_path):
    f = tmp_path / "qa.jsonl"
    f.write_text('{"question": "q"}\n')
    with pytest.raises(ValueError, match="qa.jsonl:1 has no field 'answers' or 'answer'"):
        prepare_tasks([f"qa:{f}"])
    g = tmp_path / "ar.jsonl"
    g.write_text('{"question": "q", "answer": "many"}\n')
    with pytest.raises(ValueError, match="no final number"):
        prepare_tasks([f"arith:{g}"])


def test_lm_eval_bridge_without_the_package_says_how_to_install(monkeypatch):
    import prunekit.eval.tasks.lm_eval_bridge as bridge

    monkeypatch.setattr(bridge, "lm_eval_available", lambda: False)
    with pytest.raises(ValueError, match="pip install lm-eval"):
        get_task("lm_eval:hellaswag")


def test_cli_rejects_a_bad_task_before_loading_the_model(capsys):
    from prunekit.cli import main

    assert main(["eval", "no-such-model-folder", "--tasks", "nope"]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err


@pytest.mark.integration
def test_real_model_prefix_reuse_matches_full_scoring_and_piqa_prefers_the_right_choice(smollm2, data_dir):
    model, tok = smollm2
    task = get_task("piqa", data_dir)
    exs = task.examples()[:4]
    reqs = [(e.context, e.choices) for e in exs]
    fast = loglikelihoods(model, tok, reqs, batch_size=4)
    full = loglikelihoods(model, tok, reqs, batch_size=8, reuse_prefix=False)
    for a, b in zip(fast, full):
        assert a == pytest.approx(b, abs=2e-3)  # fp32: same numbers, only the order of float sums differs
    # a hand-made pair no language model should get wrong
    lls = loglikelihoods(model, tok, [("The capital of France is", [" Paris", " potato"])])[0]
    assert lls[0] > lls[1] + 3
