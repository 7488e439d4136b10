"""How well does a variant answer, and how much does it look at the image?

- exact-match accuracy by question type and split (VQA-style short answers);
- POPE-style yes/no metrics on existence questions: accuracy, precision, recall, F1 and the
  yes-ratio (a model that always says "yes" has F1 0.67 and yes-ratio 1.0), per negative kind;
- the blind baseline: the same questions with the image removed from the prompt. The gap
  between the two is what the model gets from looking.

`describe` answers are whole captions: they get their own exact match and an object-level F1
and are kept out of `overall_accuracy`, which covers the short-answer types.
"""
from __future__ import annotations

from collections import defaultdict

import torch
from tqdm.auto import tqdm

from .data.collate import build_prompt, remove_image
from .data.llava_json import turns
from .data.shapes import final_answer
from .language import END_TURN

LONG_TYPES = {"describe"}
# Answer tokens generated per question type: a caption, a spatial chain ("green circle 5 1, square 1 3,
# so right": data.spatial_answer), a word.
MAX_NEW_TOKENS = {"describe": 48, "spatial": 24}
SHORT_MAX_NEW_TOKENS = 8


def normalize(answer: str) -> str:
    """Lowercase, strip spaces and a trailing period (VQA-style light normalization)."""
    return answer.strip().lower().rstrip(".").strip()


@torch.no_grad()
def answer(model, tokenizer, questions: list[str], images: torch.Tensor | None, max_new_tokens: int = 8,
           **generate_kwargs) -> list[str]:
    """Greedy answers for single-turn questions (each with `<image>` when images are given)."""
    n = model.num_image_tokens if images is not None else None
    prompts = [build_prompt(tokenizer, q, n) for q in questions]
    width = max(map(len, prompts))
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])           # left padding
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    device = next(model.parameters()).device
    stop = [tokenizer.convert_tokens_to_ids(END_TURN), tokenizer.eos_token_id]
    out = model.generate(ids.to(device), mask.to(device), None if images is None else images.to(device),
                         max_new_tokens=max_new_tokens, stop_token_ids=stop, **generate_kwargs)
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in out]


def blind_question(record: dict) -> str:
    """The record's first question without its image placeholder (text-only records: as written)."""
    question = turns(record)[0][0]
    return remove_image(question) if "image" in record else question


def predict(model, tokenizer, records: list[dict], image_source, blind: bool = False, batch_size: int = 64,
            progress: bool = True, desc: str = "eval") -> list[str]:
    """Answers to the first question of each evaluation record. `image_source(record) -> tensor`
    for records with an `image`; text-only records (and every record when `blind`) get none.
    A batch holds only records with an image or only records without, and answers of one length
    (`MAX_NEW_TOKENS`), the longest last."""
    model.eval()
    preds = [""] * len(records)
    groups = defaultdict(list)  # (answer tokens, with image?) -> record indices
    for i, r in enumerate(records):
        groups[(MAX_NEW_TOKENS.get(r.get("question_type"), SHORT_MAX_NEW_TOKENS), "image" in r and not blind)].append(i)
    bar = tqdm(total=len(records), desc=desc, disable=not progress, leave=False)
    for (max_new, seeing), members in sorted(groups.items()):
        for start in range(0, len(members), batch_size):
            idx = members[start:start + batch_size]
            if seeing:
                images = torch.stack([image_source(records[i]) for i in idx])
                out = answer(model, tokenizer, [turns(records[i])[0][0] for i in idx], images, max_new)
            else:
                out = answer(model, tokenizer, [blind_question(records[i]) for i in idx], None, max_new)
            for i, a in zip(idx, out):
                preds[i] = a
            bar.update(len(idx))
    bar.close()
    return preds


def pope_metrics(answers: list[str], truths: list[str]) -> dict:
    """POPE's metrics with "yes" as the positive class."""
    pred = [normalize(a) == "yes" for a in answers]
    true = [normalize(t) == "yes" for t in truths]
    tp = sum(p and t for p, t in zip(pred, true))
    fp = sum(p and not t for p, t in zip(pred, true))
    fn = sum(t and not p for p, t in zip(pred, true))
    n = max(len(true), 1)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": sum(p == t for p, t in zip(pred, true)) / n, "precision": precision, "recall": recall,
            "f1": f1, "yes_ratio": sum(pred) / n, "n": len(true)}


def _objects(caption: str) -> set[str]:
    text = normalize(caption).replace(" and ", ", ")
    return {p.strip().removeprefix("a ").strip() for p in text.split(",") if p.strip()}


def object_f1(pred: str, truth: str) -> float:
    """F1 between the object phrases of two captions ("a large red circle", ...)."""
    p, t = _objects(pred), _objects(truth)
    if not p or not t:
        return float(p == t)
    tp = len(p & t)
    return 2 * tp / (len(p) + len(t))


def score(records: list[dict], preds: list[str]) -> dict:
    """Metrics for one split: overall (short answers), per type, POPE, describe."""
    by_type = defaultdict(list)
    pope = defaultdict(lambda: ([], []))
    describe_f1 = []
    for r, p in zip(records, preds):
        truth = r["answer"] if "answer" in r else turns(r)[0][1]
        qtype = r.get("question_type", "all")
        by_type[qtype].append(normalize(final_answer(p)) == normalize(truth))  # a chain: its conclusion
        if qtype in LONG_TYPES:
            describe_f1.append(object_f1(p, truth))
        if r.get("pope"):
            for kind in (r["pope"], "all"):
                pope[kind][0].append(p), pope[kind][1].append(truth)
    short = [ok for t, oks in by_type.items() if t not in LONG_TYPES for ok in oks]
    out = {"overall_accuracy": sum(short) / max(len(short), 1), "n": len(short),
           "per_type": {t: round(sum(v) / len(v), 4) for t, v in sorted(by_type.items())}}
    if pope:
        out["pope"] = {k: {m: round(v, 4) if isinstance(v, float) else v for m, v in pope_metrics(*pv).items()}
                       for k, pv in sorted(pope.items())}
    if describe_f1:
        out["describe_object_f1"] = round(sum(describe_f1) / len(describe_f1), 4)
    out["overall_accuracy"] = round(out["overall_accuracy"], 4)
    return out


def evaluate(model, tokenizer, eval_sets: dict[str, list[dict]], image_source, progress: bool = True,
             examples: int = 5) -> dict:
    """Score every split with and without the image. Returns
    {split: {"seeing": score, "blind": score, "examples": [...]}}."""
    results = {}
    for split, records in eval_sets.items():
        seeing = predict(model, tokenizer, records, image_source, progress=progress, desc=f"eval {split}")
        blind = predict(model, tokenizer, records, image_source, blind=True, progress=progress,
                        desc=f"blind {split}")
        results[split] = {"seeing": score(records, seeing), "blind": score(records, blind),
                          "examples": [{"id": r.get("id"), "question": blind_question(r),
                                        "answer": r.get("answer"), "predicted": s, "blind": b}
                                       for r, s, b in list(zip(records, seeing, blind))[:examples]]}
    return results
