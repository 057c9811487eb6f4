"""The control of a recovery run: the dense model trained with the same recipe, tokens and text.

Training on text moves any model towards that text's domain. Recovered ÷ dense credits recovery with
whatever the training text would have done to the dense model as well; **recovered ÷ tuned dense**
(the dense model put through the identical run) does not, and is the honest ratio. With pure
distillation from the dense teacher the control starts at zero loss, but it still moves: the
student's and teacher's rounding differ (bf16 autocast against a bf16 teacher, chunked against
whole logits) and Adam scales even such tiny gradients up to steps of about the learning rate; with
next-token loss it adapts to the training domain and may lose elsewhere. Either way the control is
measured, never assumed — and the comparison is also made on text nothing was trained on
(``--eval kjv gsm8k``).

Task accuracies are compared with :mod:`prunekit.eval.ties`: a difference inside two standard errors
of the difference is a tie, not a win.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from ..eval.ties import verdict
from .api import RecoverReport, recover
from .config import RecoverConfig


def train_control(dense: nn.Module, teacher: nn.Module | None, tokenizer, config: RecoverConfig, **kw: Any) -> RecoverReport:
    """Train ``dense`` (in place; pass a fresh copy, not the teacher itself) exactly as ``config`` trains a
    student — same objective, optimizer, schedule, text, tokens and seed. Keywords go to :func:`recover`
    (``evaluate``: its 'before' is the dense model's evaluation, its 'after' the tuned dense one's)."""
    if dense is teacher:
        raise ValueError("the control must train a copy of the dense model, not the teacher object itself")
    return recover(dense, teacher, tokenizer, config, **kw)


@dataclass
class ControlRow:
    """One metric of a recovered model against dense and the control."""

    metric: str  # "ppl:wikitext2", "task:piqa/acc"
    one_shot: float | None
    recovered: float
    dense: float | None
    tuned_dense: float | None
    vs_dense: str  # perplexity: "1.29x"; task: tie / better / worse
    vs_tuned_dense: str

    def to_dict(self) -> dict:
        return asdict(self)


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a is not None and b else "-"


def _get(ev: dict | None, *path: str):
    for key in path:
        if not isinstance(ev, dict) or key not in ev:
            return None
        ev = ev[key]
    return ev


def compare(student: dict, control: dict) -> list[ControlRow]:
    """Rows of the recovered model's ``evaluation`` (``before``/``after``, each ``{"ppl": {...}, "tasks":
    {...}}`` as the CLI records it) against the control's (its ``before`` is dense, ``after`` tuned dense)."""
    out = []
    for ds, res in (_get(student, "after", "ppl") or {}).items():
        one, dense = _get(student, "before", "ppl", ds, "ppl"), _get(control, "before", "ppl", ds, "ppl")
        tuned = _get(control, "after", "ppl", ds, "ppl")
        out.append(ControlRow(f"ppl:{ds}", one, res["ppl"], dense, tuned, _ratio(res["ppl"], dense),
                              _ratio(res["ppl"], tuned)))
    for spec, res in (_get(student, "after", "tasks") or {}).items():
        m, hib = res["main"], res.get("higher_is_better", True)
        a, se = res["metrics"][m], res["stderr"].get(m)

        def ref(ev: dict | None, which: str, _spec=spec, _m=m):
            r = _get(ev, which, "tasks", _spec)
            return (r["metrics"][_m], r["stderr"].get(_m)) if r else (None, None)

        (one, _), (dense, dse), (tuned, tse) = ref(student, "before"), ref(control, "before"), ref(control, "after")
        out.append(ControlRow(f"task:{spec}/{m}", one, a, dense, tuned,
                              verdict(a, se, dense, dse, hib) if dense is not None else "-",
                              verdict(a, se, tuned, tse, hib) if tuned is not None else "-"))
    return out
