"""Training against the question-only prior: a product of experts (PoE) in stage 2.

Why: in ShapesWorld's training images red never comes as a triangle, so "What shape is the red
object?" is never answered "triangle". A model can lower its loss by learning that from the
question alone, and then answers a red triangle (an unseen pair) with "circle" or "square".
PoE (Clark et al. 2019, "Don't Take the Easy Way Out"; He et al. 2019) trains the model *in
product* with a fixed question-only expert: the loss is the cross-entropy of

    softmax(model logits + w * (log prior(answer | question) - log prior(answer | question type)))

at each answer's first token (w: `train.instruct.debias_weight`, 1 by default), so what the question
alone predicts is already paid for and the model has no reason to learn it. At test time the model
answers alone. The known price: the expert rules out the answers a question never had, so nothing
pushes the model's own logits for them down, and alone it sometimes gives them where they are wrong
(`interpret.pair_answers` counts it; notebook 06, section 6).

The prior is counted, not learned: for each training question string, how often each first
answer token followed it, smoothed toward its question type's answer frequencies (Dirichlet,
weight `alpha`). Dividing by the type's frequencies keeps the answer's *format* (a color for a
color question) the model's own job: only the within-type preference is removed. Tokens that
never answer the question type get no bias.
"""
from __future__ import annotations

import math
import re
from collections import Counter, defaultdict

import torch
import torch.nn.functional as F

from .data.collate import IGNORE_INDEX, encode_text, remove_image
from .data.llava_json import turns
from .data.shapes import TEMPLATES, template_regex
from .language import IMAGE_TOKEN

_TYPE_PATTERNS = [(qtype, template_regex(t)) for qtype, ts in TEMPLATES.items() for t in ts]


def shapesworld_type(question: str) -> str | None:
    """ShapesWorld's question type of `question` (a key of `shapes.TEMPLATES`), or None."""
    q = re.sub(r"\s+", " ", question).strip()
    return next((qtype for qtype, pattern in _TYPE_PATTERNS if pattern.match(q)), None)


def _question(human: str) -> str:
    """The question of a human turn, without the `<image>` placeholder of a conversation's first turn."""
    return (remove_image(human) if IMAGE_TOKEN in human else human).strip()


class QuestionPrior:
    """The question-only expert: first-answer-token counts per question and per question type."""

    def __init__(self, records: list[dict], tokenizer, type_of=shapesworld_type, alpha: float = 1.0):
        self.type_of, self.alpha = type_of, alpha
        self.by_question: dict[str, Counter] = defaultdict(Counter)
        self.by_type: dict[str, Counter] = defaultdict(Counter)
        for rec in records:
            for human, gpt in turns(rec):
                q, ids = _question(human), encode_text(tokenizer, gpt)
                qtype = type_of(q)
                if qtype is not None and ids:
                    self.by_question[q][ids[0]] += 1
                    self.by_type[qtype][ids[0]] += 1
        if not self.by_type:
            raise ValueError("train.instruct.debias=question_prior: no training question matched a known question "
                             "type (it needs ShapesWorld's templates, lgemma.data.shapes.TEMPLATES); "
                             "set train.instruct.debias=none for other data")
        self._cache: dict[str, tuple[list[int], list[float]]] = {}

    def bias(self, question: str) -> tuple[list[int], list[float]]:
        """(token ids, log prior(token | question) - log prior(token | type)) over the type's answer
        tokens; empty for a question of no known type."""
        q = _question(question)
        if q not in self._cache:
            qtype = self.type_of(q)
            if qtype is None or qtype not in self.by_type:
                self._cache[q] = ([], [])
            else:
                t, c = self.by_type[qtype], self.by_question.get(q, Counter())
                nt, nq = sum(t.values()), sum(c.values())
                ids = sorted(t)
                vals = [math.log((c[v] + self.alpha * t[v] / nt) / (nq + self.alpha)) - math.log(t[v] / nt)
                        for v in ids]
                self._cache[q] = (ids, vals)
        return self._cache[q]

    def sample_bias(self, record: dict, labels: torch.Tensor) -> list[tuple[int, list[int], list[float]]]:
        """For each reply of `record` still in `labels`: (position of its first token, ids, values)."""
        supervised = labels != IGNORE_INDEX
        starts = (supervised[1:] & ~supervised[:-1]).nonzero().flatten() + 1
        return [(int(p), *self.bias(human)) for p, (human, _) in zip(starts.tolist(), turns(record))]


def collate_bias(batch: list[dict]) -> dict:
    """The samples' `prior` lists as flat tensors: sample index, position, token id, value."""
    rows = [(i, p, v, x) for i, b in enumerate(batch) for p, ids, vals in b["prior"] for v, x in zip(ids, vals)]
    if not rows:
        return {"prior_sample": torch.zeros(0, dtype=torch.long), "prior_pos": torch.zeros(0, dtype=torch.long),
                "prior_token": torch.zeros(0, dtype=torch.long), "prior_value": torch.zeros(0)}
    i, p, v, x = zip(*rows)
    return {"prior_sample": torch.tensor(i), "prior_pos": torch.tensor(p), "prior_token": torch.tensor(v),
            "prior_value": torch.tensor(x, dtype=torch.float32)}


def product_loss(logits: torch.Tensor, labels: torch.Tensor, batch: dict, weight: float = 1.0) -> torch.Tensor:
    """Cross-entropy of (logits + weight x prior bias): `weight` < 1 tempers the prior. `logits` are the model's at supervised positions
    ([M, vocab], in the order of `labels[:, 1:] != IGNORE_INDEX`), as `LlavaGemma.forward` returns them."""
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    row = keep.flatten().cumsum(0).view_as(keep) - 1   # row of logits for each (sample, position - 1)
    bias = torch.zeros_like(logits, dtype=torch.float32)
    if batch["prior_pos"].numel():
        rows = row[batch["prior_sample"], batch["prior_pos"] - 1]
        bias[rows, batch["prior_token"]] = weight * batch["prior_value"].to(bias.device)
    return F.cross_entropy(logits.float() + bias, targets[keep])
