"""The paper's benchmarks (POPE, GQA, MMVP) read from miniature copies of their official files,
written here: scoring as their authors score, clear errors for bad folders, resumable runs, and
`lgemma eval --benchmark` on a transformers export of a tiny random model."""
import csv
import json

import pytest
from PIL import Image

from lgemma import cli, paper_benchmarks as pb
from lgemma.data.llava_json import DataError


def _image(path, size=(40, 30), color=(200, 30, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def write_pope(root, per_split=4):
    """coco_pope_<split>.json in root/coco (LLaVA's playground layout), images in root/val2014."""
    (root / "coco").mkdir(parents=True)
    for s, split in enumerate(pb.POPE_SPLITS):
        lines = []
        for k in range(per_split):
            image = f"COCO_val2014_{k:012d}.jpg"
            _image(root / "val2014" / image, (30 + k, 20))
            lines.append(json.dumps({"question_id": k + 1, "image": image, "text": f"Is there a {split} thing {k}?",
                                     "label": "yes" if k % 2 == 0 else "no"}))
        (root / "coco" / f"coco_pope_{split}.json").write_text("\n".join(lines) + "\n")
    return root


def write_gqa(root):
    root.mkdir(parents=True)
    questions = {
        "201307251": {"imageId": "n161313", "question": "Is it overcast?", "answer": "no", "isBalanced": True,
                      "fullAnswer": "No, it is clear.", "types": {"structural": "verify", "semantic": "global"}},
        "20515045": {"imageId": "n161313", "question": "Which side is the car on?", "answer": "left",
                     "types": {"structural": "query"}},
        "05515938": {"imageId": "n235859", "question": "What color is the shirt?", "answer": "white",
                     "types": {"structural": "query"}},
    }
    for q in questions.values():
        _image(root / "images" / f"{q['imageId']}.jpg", (50, 20))
    (root / "testdev_balanced_questions.json").write_text(json.dumps(questions))
    return root


def write_mmvp(root, pairs=2):
    root.mkdir(parents=True)
    rows = []
    for p in range(pairs):
        for k, answer in ((2 * p + 1, "(a)"), (2 * p + 2, "(b)")):
            rows.append({"Index": str(k), "Question": "Are the butterfly's wings closer to being open or closed?",
                         "Options": "(a) Open (b) Closed", "Correct Answer": answer})
            _image(root / "MMVP Images" / f"{k}.jpg", (60, 40))
    with open(root / "Questions.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["Index", "Question", "Options", "Correct Answer"])
        w.writeheader()
        w.writerows(rows)
    return root


# ---------------------------------------------------------------- readers and scoring
def test_readers_take_the_official_files(tmp_path):
    pope = pb.read_pope(write_pope(tmp_path / "pope"))
    assert len(pope) == 12 and {q.group for q in pope} == set(pb.POPE_SPLITS) and len({q.id for q in pope}) == 12
    assert pope[0].prompt == "<image>\nIs there a random thing 0?\nAnswer the question using a single word or phrase."
    assert pope[0].image == tmp_path / "pope" / "val2014" / "COCO_val2014_000000000000.jpg" and pope[1].answer == "no"
    gqa = pb.read_gqa(write_gqa(tmp_path / "gqa"))
    assert [q.id for q in gqa] == ["201307251", "20515045", "05515938"] and gqa[1].answer == "left"
    assert gqa[0].image.name == "n161313.jpg" and gqa[0].group == "verify"
    mmvp = pb.read_mmvp(write_mmvp(tmp_path / "mmvp"))
    assert [q.group for q in mmvp] == ["0", "0", "1", "1"] and [q.answer for q in mmvp] == ["a", "b", "a", "b"]
    assert mmvp[0].prompt.endswith("open or closed? (a) Open (b) Closed") and mmvp[0].options == {"a": "Open", "b": "Closed"}


@pytest.mark.parametrize("text,parsed", [
    ("Yes", "yes"), ("Yes, there is a dog.", "yes"), ("No", "no"), ("No, there is not.", "no"),
    ("There is not a dog in the image.", "no"), ("yes. No dog though.", "yes"), ("", "yes"), ("Nope", "yes")])
def test_pope_reads_answers_as_pope_does(text, parsed):
    assert pb.pope_yes_no(text) == parsed


def test_pope_metrics_per_split_and_means(tmp_path):
    qs = pb.read_pope(write_pope(tmp_path / "pope"))                  # truths: yes no yes no per split
    preds = ["Yes", "Yes", "Yes", "No"] + ["No"] * 4 + ["Yes, it is.", "no", "not sure", "No"]
    m = pb.score_pope(qs, preds)
    r, p, a = (m["pope_splits"][s] for s in pb.POPE_SPLITS)
    assert (r["accuracy"], r["precision"], r["recall"], r["f1"], r["yes_ratio"]) == (0.75, 0.6667, 1.0, 0.8, 0.75)
    assert (p["accuracy"], p["f1"], p["yes_ratio"]) == (0.5, 0.0, 0.0)   # never yes: no true positive
    assert (a["accuracy"], a["recall"], a["f1"]) == (0.75, 0.5, 0.6667)
    assert m["pope_acc"] == round((0.75 + 0.5 + 0.75) / 3, 4) and m["pope_f1"] == round((0.8 + 0 + 2 / 3) / 3, 4)


def test_gqa_exact_match_after_llavas_normalization(tmp_path):
    qs = pb.read_gqa(write_gqa(tmp_path / "gqa"))
    m = pb.score_gqa(qs, ["No.", " Left ", "white shirt"])
    assert m["gqa"] == round(2 / 3, 4) and m["gqa_per_type"] == {"query": 0.5, "verify": 1.0}


@pytest.mark.parametrize("response,choice", [
    ("(a)", "a"), ("a", "a"), ("B", "b"), ("b.", "b"), ("(b) Closed", "b"), ("The answer is (a).", "a"),
    ("The answer is b", "b"), ("Open", "a"), ("The wings are closed.", "b"), ("a butterfly", ""),
    ("open or closed", ""), ("I cannot tell", "")])
def test_mmvp_reads_the_chosen_option(response, choice):
    assert pb.mmvp_choice(response, {"a": "Open", "b": "Closed"}) == choice


def test_mmvp_pair_accuracy(tmp_path):
    qs = pb.read_mmvp(write_mmvp(tmp_path / "mmvp"))   # truths a, b | a, b
    m = pb.score_mmvp(qs, ["(a)", "Closed", "(a)", "(a)"])
    assert m == {"mmvp": 0.5, "mmvp_question_accuracy": 0.75}


def test_subsets_keep_pope_splits_and_mmvp_pairs(tmp_path):
    pope = pb.read_pope(write_pope(tmp_path / "pope"))
    assert [q.id for q in pb.subset("pope", pope, 1)] == ["random/1", "popular/1", "adversarial/1"]
    mmvp = pb.read_mmvp(write_mmvp(tmp_path / "mmvp"))
    assert len(pb.subset("mmvp", mmvp, 3)) == 4 and len(pb.subset("mmvp", mmvp, 2)) == 2


# ---------------------------------------------------------------- bad folders
def test_missing_files_and_images_are_named(tmp_path):
    pope = write_pope(tmp_path / "pope")
    (pope / "coco" / "coco_pope_adversarial.json").unlink()
    with pytest.raises(DataError, match="coco_pope_adversarial.json: POPE's adversarial split not found"):
        pb.read_pope(pope)
    with pytest.raises(DataError, match="testdev_balanced_questions.json: GQA's .* not found.*questions1.2.zip"):
        pb.read_gqa(tmp_path)
    with pytest.raises(DataError, match="Questions.csv: MMVP's questions not found"):
        pb.read_mmvp(tmp_path)
    gqa = write_gqa(tmp_path / "gqa")
    (gqa / "images" / "n235859.jpg").unlink()
    with pytest.raises(DataError, match=r"1 image\(s\) .* missing, e.g. .*n235859.jpg"):
        pb.read_gqa(gqa)


def test_wrong_formats_are_explained(tmp_path):
    pope = write_pope(tmp_path / "pope")
    with open(pope / "coco" / "coco_pope_popular.json", "a") as f:
        f.write('{"question_id": 9, "image": "x.jpg", "text": "Is there a cat?"}\n')
    with pytest.raises(DataError, match=r"coco_pope_popular.json, line 5: lacks label"):
        pb.read_pope(pope)
    (pope / "coco" / "coco_pope_popular.json").write_text("question_id,image,text,label\n")
    with pytest.raises(DataError, match="line 1: not a JSON object"):
        pb.read_pope(pope)
    gqa = write_gqa(tmp_path / "gqa")
    (gqa / "testdev_balanced_questions.json").write_text(json.dumps([{"question": "?"}]))
    with pytest.raises(DataError, match="expected GQA's .* found a list"):
        pb.read_gqa(gqa)
    mmvp = write_mmvp(tmp_path / "mmvp")
    (mmvp / "Questions.csv").write_text("Index,Question,Answer\n1,What?,(a)\n")
    with pytest.raises(DataError, match="expected the columns Index, Question, Options, Correct Answer"):
        pb.read_mmvp(mmvp)
    (mmvp / "Questions.csv").write_text("Index,Question,Options,Correct Answer\n1,Open?,(a) Open (b) Closed,(a)\n")
    with pytest.raises(DataError, match="come in pairs"):
        pb.read_mmvp(mmvp)


# ---------------------------------------------------------------- running
@pytest.fixture
def export(tiny_model, tmp_path):
    """A tiny random model written as a transformers Llava folder (as `Intel/llava-gemma-2b` is)."""
    from lgemma.hf import save_transformers
    model, tok = tiny_model
    return save_transformers(model.eval(), tok, tmp_path / "export")


def test_eval_cli_writes_the_papers_columns(export, tmp_path, capsys):
    pope, gqa, mmvp = write_pope(tmp_path / "pope"), write_gqa(tmp_path / "gqa"), write_mmvp(tmp_path / "mmvp")
    out = tmp_path / "out"
    assert cli.main(["eval", str(export), "--benchmark", f"pope={pope}", "--benchmark", f"gqa={gqa}",
                     "--benchmark", f"mmvp={mmvp}", "--out", str(out), "--device", "cpu"]) == 0, capsys.readouterr().err
    metrics = json.loads((out / "paper_benchmarks.json").read_text())
    for column in ("gqa", "pope_acc", "pope_f1", "mmvp"):
        assert 0 <= metrics[column] <= 1, column
    assert (metrics["pope_n"], metrics["gqa_n"], metrics["mmvp_n"]) == (12, 3, 4)
    lines = (out / "pope_predictions.jsonl").read_text().splitlines()
    assert len(lines) == 12 and {json.loads(x)["id"] for x in lines} == {q.id for q in pb.read_pope(pope)}
    text = capsys.readouterr().out
    assert "paper: gemma-2b-it, CLIP, stage 1 yes" in text and "export (this run)" in text
    assert cli.main(["eval", str(export), "--benchmark", "vqav2=/data"]) == 2
    assert "unknown benchmark(s) vqav2; known: pope, gqa, mmvp" in capsys.readouterr().err
    assert cli.main(["eval", str(export), "--benchmark", f"gqa={tmp_path / 'nowhere'}"]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_an_interrupted_run_continues_where_it_stopped(tiny_model, tmp_path, monkeypatch):
    model, tok = tiny_model
    pope = write_pope(tmp_path / "pope")
    asked, real = [], pb.answer

    def answer(model, tok, prompts, images, n):
        if len(asked) == 2:
            raise KeyboardInterrupt  # the user stops the run during its third batch
        asked.append(len(prompts))
        return real(model, tok, prompts, images, n)
    monkeypatch.setattr(pb, "answer", answer)
    with pytest.raises(KeyboardInterrupt):
        pb.run_benchmark(model, tok, "pope", pope, tmp_path / "out", "model-1", batch_size=4, progress=False)
    path = tmp_path / "out" / "pope_predictions.jsonl"
    assert len(path.read_text().splitlines()) == 8
    with open(path, "a") as f:
        f.write('{"id": "adversarial/1", "predi')   # a line cut off mid-write
    asked.clear()
    asked.append(0)   # one slot left before the stub interrupts again: enough for the 4 questions left
    m = pb.run_benchmark(model, tok, "pope", pope, tmp_path / "out", "model-1", batch_size=4, progress=False)
    assert asked == [0, 4] and m["pope_n"] == 12
    ids = [json.loads(x)["id"] for x in path.read_text().splitlines() if x.endswith("}")]
    assert sorted(ids) == sorted(q.id for q in pb.read_pope(pope))
    with pytest.raises(ValueError, match="predictions of another model"):
        pb.run_benchmark(model, tok, "pope", pope, tmp_path / "out", "model-2", progress=False)
