"""Three of the paper's benchmarks, read from their official files and scored as their authors do.

    lgemma eval runs/tiny --benchmark pope=/data/pope --benchmark gqa=/data/gqa --benchmark mmvp=/data/MMVP

| name | folder holds (official names)                                       | metric columns           |
|------|---------------------------------------------------------------------|--------------------------|
| pope | `coco_pope_{random,popular,adversarial}.json` (one JSON object per  | `pope_acc`, `pope_f1`    |
|      | line: question_id, image, text, label) and COCO `val2014/` images    | (means over the 3 splits)|
| gqa  | `testdev_balanced_questions.json` ({qid: {imageId, question,        | `gqa`                    |
|      | answer, ...}}) and `images/<imageId>.jpg`                           |                          |
| mmvp | `Questions.csv` (Index, Question, Options, Correct Answer) and      | `mmvp` (pair accuracy)   |
|      | `MMVP Images/<Index>.jpg`                                           |                          |

The metric names are the columns of `data/paper/llava_gemma_results.csv`, as fractions, so a
result sits beside the paper's row (`beside_paper`). Prompts and scoring follow LLaVA-1.5's
evaluation scripts (`llava/eval/eval_pope.py`, `scripts/convert_gqa_for_eval.py`) and MMVP's
(`scripts/evaluate_mllm.py`), with one substitute: MMVP's authors graded answers with GPT-4;
here a rule reads the chosen option (its letter, or exactly one option's text), which is strict
with rambling answers.

Predictions are appended to `<out>/<name>_predictions.jsonl` as they are made, so an interrupted
run continues where it stopped; `<out>/paper_benchmarks.json` holds the metrics.
"""
from __future__ import annotations

import csv
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .data.llava_json import DataError, load_image
from .evaluation import answer, pope_metrics

SHORT_ANSWER = "\nAnswer the question using a single word or phrase."  # LLaVA-1.5's prompt for POPE and GQA
POPE_SPLITS = ("random", "popular", "adversarial")


@dataclass
class Question:
    """One benchmark question: `prompt` is the user turn with its `<image>`, `group` the POPE split
    or the MMVP pair it belongs to."""
    id: str
    image: Path
    prompt: str
    answer: str
    group: str = ""
    options: dict | None = None  # MMVP: {"a": "Open", "b": "Closed"}


def _need(path: Path, what: str, how: str) -> Path:
    if not path.exists():
        raise DataError(f"{path}: {what} not found. {how}")
    return path


def _check_images(questions: list[Question], name: str, how: str) -> list[Question]:
    if not questions:
        raise DataError(f"{name}: the questions file holds no question.")
    missing = sorted({str(q.image) for q in questions if not q.image.is_file()})
    if missing:
        raise DataError(f"{name}: {len(missing)} image(s) named by the questions are missing, e.g. {missing[0]}. {how}")
    return questions


# ---------------------------------------------------------------- POPE
def read_pope(folder: str | Path) -> list[Question]:
    """POPE's three COCO splits (`coco_pope_<split>.json`, in `folder` or `folder/coco` as in
    LLaVA's playground), images in `folder/val2014`."""
    folder = Path(folder)
    get = "Get them from POPE's repository (output/coco/) or LLaVA's eval data (playground/data/eval/pope/coco/)."
    questions = []
    for split in POPE_SPLITS:
        name = f"coco_pope_{split}.json"
        path = folder / name if (folder / name).exists() else _need(folder / "coco" / name, f"POPE's {split} split", get)
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}, line {n}: not a JSON object ({e.msg}). POPE files hold one object per "
                                "line: {\"question_id\", \"image\", \"text\", \"label\"}.") from e
            missing = [k for k in ("question_id", "image", "text", "label") if not isinstance(rec, dict) or k not in rec]
            if missing:
                raise DataError(f"{path}, line {n}: lacks {', '.join(missing)}; is this POPE's question file?")
            if rec["label"] not in ("yes", "no"):
                raise DataError(f"{path}, line {n}: label {rec['label']!r}, expected 'yes' or 'no'.")
            questions.append(Question(f"{split}/{rec['question_id']}", folder / "val2014" / rec["image"],
                                      f"<image>\n{rec['text']}{SHORT_ANSWER}", rec["label"], split))
    return _check_images(questions, f"POPE ({folder})", f"Put COCO's val2014 images in {folder / 'val2014'}.")


def pope_yes_no(text: str) -> str:
    """POPE's reading of an answer: its first sentence, commas dropped; "no" if a word is No, no or
    not, else "yes" (so an empty answer counts as yes)."""
    words = text.split(".")[0].replace(",", "").split(" ")
    return "no" if {"No", "no", "not"} & set(words) else "yes"


def score_pope(questions: list[Question], predictions: list[str]) -> dict:
    """Accuracy, precision, recall, F1 and yes-ratio per split; `pope_acc` and `pope_f1` are the
    means over the splits."""
    out = {}
    for split in POPE_SPLITS:
        pairs = [(pope_yes_no(p), q.answer) for q, p in zip(questions, predictions) if q.group == split]
        if pairs:
            out[split] = {k: round(v, 4) for k, v in pope_metrics(*zip(*pairs)).items()}
    return {"pope_acc": round(sum(s["accuracy"] for s in out.values()) / len(out), 4),
            "pope_f1": round(sum(s["f1"] for s in out.values()) / len(out), 4), "pope_splits": out}


# ---------------------------------------------------------------- GQA
def read_gqa(folder: str | Path) -> list[Question]:
    """GQA's `testdev_balanced_questions.json`, images in `folder/images`."""
    folder = Path(folder)
    path = _need(folder / "testdev_balanced_questions.json", "GQA's test-dev balanced questions",
                 "Get questions1.2.zip from https://cs.stanford.edu/people/dorarad/gqa/download.html.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); re-download it.") from e
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected GQA's {{question id: {{...}}}} object, found a {type(data).__name__}.")
    questions = []
    for qid, q in data.items():
        missing = [k for k in ("imageId", "question", "answer") if not isinstance(q, dict) or k not in q]
        if missing:
            raise DataError(f"{path}, question {qid!r}: lacks {', '.join(missing)}; is this GQA's questions file?")
        kind = q.get("types", {}).get("structural", "") if isinstance(q.get("types"), dict) else ""
        questions.append(Question(str(qid), folder / "images" / f"{q['imageId']}.jpg",
                                  f"<image>\n{q['question']}{SHORT_ANSWER}", q["answer"], kind))
    return _check_images(questions, f"GQA ({folder})", f"Put GQA's images (images.zip) in {folder / 'images'}.")


def gqa_normalize(text: str) -> str:
    """LLaVA's conversion of an answer for GQA's scorer: stripped, trailing periods dropped, lowercase."""
    return text.strip().rstrip(".").lower()


def score_gqa(questions: list[Question], predictions: list[str]) -> dict:
    """Exact match after `gqa_normalize` (GQA's eval.py compares the strings as they are), overall
    and per structural type (verify, query, choose, logical, compare)."""
    right = [gqa_normalize(p) == q.answer for q, p in zip(questions, predictions)]
    kinds = {}
    for q, ok in zip(questions, right):
        kinds.setdefault(q.group or "all", []).append(ok)
    return {"gqa": round(sum(right) / len(right), 4),
            "gqa_per_type": {k: round(sum(v) / len(v), 4) for k, v in sorted(kinds.items())}}


# ---------------------------------------------------------------- MMVP
OPTION = re.compile(r"\(([a-z])\)\s*([^(]*?)\s*(?=\([a-z]\)|$)")


def read_mmvp(folder: str | Path) -> list[Question]:
    """MMVP's `Questions.csv` (150 pairs of questions, one image each), images in
    `folder/MMVP Images/<Index>.jpg`. The prompt is MMVP's: the question, a space, the options."""
    folder = Path(folder)
    path = _need(folder / "Questions.csv", "MMVP's questions", "Get the MMVP dataset (Questions.csv and 'MMVP Images/').")
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    columns = ("Index", "Question", "Options", "Correct Answer")
    if not rows or any(c not in rows[0] for c in columns):
        raise DataError(f"{path}: expected the columns {', '.join(columns)}; found {list(rows[0]) if rows else 'no rows'}.")
    questions = []
    for n, row in enumerate(rows, 2):
        options = dict(OPTION.findall(row["Options"].strip()))
        letter = row["Correct Answer"].strip().strip("()").lower()
        if len(options) < 2 or letter not in options or not row["Index"].strip().isdigit():
            raise DataError(f"{path}, line {n}: cannot read index {row['Index']!r}, options {row['Options']!r} "
                            f"(expected '(a) ... (b) ...') or answer {row['Correct Answer']!r} (expected '(a)' or '(b)').")
        index = int(row["Index"])
        questions.append(Question(str(index), folder / "MMVP Images" / f"{index}.jpg",
                                  f"<image>\n{row['Question'].strip()} {row['Options'].strip()}", letter,
                                  str((index - 1) // 2), options))
    pairs = {}
    for q in questions:
        pairs.setdefault(q.group, []).append(q.id)
    odd = [ids for ids in pairs.values() if len(ids) != 2]
    if odd:
        raise DataError(f"{path}: MMVP's questions come in pairs (1-2, 3-4, ...); {odd[0]} has no partner.")
    return _check_images(questions, f"MMVP ({folder})", f"Put MMVP's images in {folder / 'MMVP Images'}.")


def mmvp_choice(response: str, options: dict) -> str:
    """The option a free-form answer picks: a letter ("(a)", "a", "B.", "the answer is (b)"), else
    the one option whose text it contains; "" when it picks none or several."""
    text = response.strip().lower()
    letters = "".join(options)
    m = (re.match(rf"^\(?([{letters}])\)?(?:[.):,]|\s*$)", text) or re.search(rf"\(([{letters}])\)", text)
         or re.search(rf"answer is:?\s*\(?([{letters}])\b", text))
    if m:
        return m.group(1)
    named = [k for k, v in options.items() if v and re.search(rf"\b{re.escape(v.lower())}\b", text)]
    return named[0] if len(named) == 1 else ""


def score_mmvp(questions: list[Question], predictions: list[str]) -> dict:
    """MMVP's pair accuracy: a pair counts only when both of its questions are answered right."""
    right = {q.id: mmvp_choice(p, q.options) == q.answer for q, p in zip(questions, predictions)}
    pairs = {}
    for q in questions:
        pairs.setdefault(q.group, []).append(right[q.id])
    return {"mmvp": round(sum(all(v) for v in pairs.values()) / len(pairs), 4),
            "mmvp_question_accuracy": round(sum(right.values()) / len(right), 4)}


BENCHMARKS = {"pope": (read_pope, score_pope, 16), "gqa": (read_gqa, score_gqa, 16),
              "mmvp": (read_mmvp, score_mmvp, 32)}  # reader, scorer, max new tokens


# ---------------------------------------------------------------- running
def subset(name: str, questions: list[Question], limit: int | None) -> list[Question]:
    """The first `limit` questions of each POPE split, or of the file (MMVP: whole pairs)."""
    if not limit:
        return questions
    if name == "pope":
        return [q for s in POPE_SPLITS for q in [q for q in questions if q.group == s][:limit]]
    return questions[:limit + (limit % 2 if name == "mmvp" else 0)]


def _read_predictions(path: Path, model_id: str) -> dict[str, str]:
    """Predictions made before, by id. A half-written last line (an interrupted run) is dropped;
    predictions by another model are refused."""
    meta = path.with_suffix(".model")
    if path.exists() and meta.exists() and meta.read_text() != model_id:
        raise ValueError(f"{path} holds predictions of another model ({meta.read_text()}): delete it (and "
                         f"{meta.name}) or pass another --out")
    done = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
                done[rec["id"]] = rec["prediction"]
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
    meta.write_text(model_id)
    return done


def run_benchmark(model, tokenizer, name: str, folder: str | Path, out_dir: str | Path, model_id: str = "",
                  batch_size: int = 16, limit: int | None = None, progress: bool = True) -> dict:
    """Answer every question of benchmark `name` (greedy) and score them. Resumes from
    `out_dir/<name>_predictions.jsonl`; `model_id` tells apart the models that wrote it."""
    if name not in BENCHMARKS:
        raise KeyError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    read, score, max_new_tokens = BENCHMARKS[name]
    questions = subset(name, read(folder), limit)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}_predictions.jsonl"
    done = _read_predictions(path, model_id)
    todo = [q for q in questions if q.id not in done]
    model.eval()
    with open(path, "a", encoding="utf-8") as f, \
            tqdm(total=len(questions), initial=len(questions) - len(todo), desc=name, disable=not progress) as bar:
        if f.tell() and not path.read_text(encoding="utf-8").endswith("\n"):
            f.write("\n")  # after a line cut off by an interruption
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            images = torch.stack([model.vision.preprocess(load_image(q.image, f"{name} question {q.id}")) for q in batch])
            images = images.to(next(model.vision.parameters()).dtype)
            for q, a in zip(batch, answer(model, tokenizer, [q.prompt for q in batch], images, max_new_tokens)):
                f.write(json.dumps({"id": q.id, "prediction": a, "answer": q.answer}) + "\n")
                done[q.id] = a
            f.flush()  # on disk before the next batch: an interruption loses at most one batch
            bar.update(len(batch))
    return {**score(questions, [done[q.id] for q in questions]), f"{name}_n": len(questions)}


def load_model(source: str, overrides: list[str] = ()) -> tuple[object, object, Path, str]:
    """(model, tokenizer, weights folder, label) from a run folder (`runs/<variant>/`, with
    config.yaml and model.safetensors), a transformers Llava folder (config.json, safetensors: an
    `lgemma.hf` export or e.g. a download of `Intel/llava-gemma-2b`), or a preset / YAML name whose
    run is trained (`--set` overrides apply to the name)."""
    from .pipeline import get_config, load_variant
    path = Path(source)
    if path.is_dir() and (path / "model.safetensors").exists() and (path / "config.yaml").exists():
        model, tokenizer, _ = load_variant(path)
        return model, tokenizer, path, path.name
    if path.is_dir() and (path / "config.json").exists():
        from .hf import load_transformers
        model, tokenizer = load_transformers(path)
        return model, tokenizer, path, path.name
    if path.is_dir():
        raise FileNotFoundError(f"{path} is neither an lgemma run (config.yaml + model.safetensors) nor a "
                                "transformers Llava folder (config.json + safetensors)")
    run = get_config(source, list(overrides)).run_dir
    model, tokenizer, cfg = load_variant(run)
    return model, tokenizer, run, cfg.name


def evaluate_model(source: str, benchmarks: dict[str, str], out_dir: str | Path | None = None,
                   overrides: list[str] = (), device: str | None = None, dtype: str = "float32",
                   batch_size: int = 16, limit: int | None = None, progress: bool = True) -> dict:
    """Run `benchmarks` ({name: folder}) on the model at `source` (see `load_model`); write the
    metrics to `<out_dir>/paper_benchmarks.json` (default out_dir: `<model folder>/paper_benchmarks`),
    keeping those of benchmarks run before, and return them."""
    unknown = sorted(set(benchmarks) - set(BENCHMARKS))
    if unknown:
        raise KeyError(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}")
    for name, folder in benchmarks.items():
        if not Path(folder).is_dir():
            raise FileNotFoundError(f"--benchmark {name}={folder}: no such folder")
    model, tokenizer, folder, label = load_model(source, overrides)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device=device, dtype=getattr(torch, dtype))
    out = Path(out_dir) if out_dir else folder / "paper_benchmarks"
    results_file = out / "paper_benchmarks.json"
    metrics = json.loads(results_file.read_text()) if results_file.exists() else {}
    for name, bench_folder in benchmarks.items():
        metrics.update(run_benchmark(model, tokenizer, name, bench_folder, out, f"{model_fingerprint(folder)} {dtype}",
                                     batch_size, limit, progress))
    metrics.update(model=label, out_dir=str(out))
    results_file.write_text(json.dumps(metrics, indent=2))
    return metrics


def model_fingerprint(folder: str | Path) -> str:
    """Which weights made a prediction file: the folder and its safetensors files' sizes and times."""
    files = sorted(Path(folder).glob("*.safetensors"))
    stamp = [(f.name, f.stat().st_size, int(f.stat().st_mtime)) for f in files]
    return f"{Path(folder).resolve()} {hashlib.sha1(json.dumps(stamp).encode()).hexdigest()[:12]}"


def beside_paper(metrics: dict, label: str, paper_csv: str | Path | None = None) -> list[dict]:
    """The paper's rows (gqa, pope_acc, pope_f1, mmvp) and `metrics` as one more row, for a table."""
    path = Path(paper_csv) if paper_csv else Path(__file__).resolve().parent.parent / "data" / "paper" / "llava_gemma_results.csv"
    cols = ("gqa", "pope_acc", "pope_f1", "mmvp")
    with open(path, newline="") as f:
        rows = [{"model": f"paper: {r['lm']}, {r['vision']}, stage 1 {r['pretrained_connector']}",
                 **{c: r[c] for c in cols}} for r in csv.DictReader(f)]
    return rows + [{"model": label, **{c: "" if metrics.get(c) is None else f"{metrics[c]:.3f}" for c in cols}}]
