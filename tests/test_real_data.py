"""Real-format LLaVA data through every path: a LLaVA-shaped mini mix (text-only ShareGPT records,
multi-turn records, `<image>` before and after the question, images of odd sizes and modes) goes
through `lgemma train` with the tiny LM: stage 0 (tiny CLIP and tiny Gemma), stage 1, stage 2
and evaluation. A stage that would take no step stops with an error naming the cause."""
import json

import pytest
import torch
from PIL import Image

from lgemma import cli
from lgemma.evaluation import predict
from lgemma.unimodal import lm_texts
from tests.conftest import tiny_cfg
from tests.test_paper_benchmarks import write_mmvp


def ask(*values):
    """Alternating human/gpt turns."""
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(values)]


def write_mini_mix(root):
    """LLaVA-1.5's files in miniature under `root` (images in `root/images`)."""
    images = root / "images"
    (images / "coco").mkdir(parents=True)
    (images / "00000").mkdir()
    palette = Image.new("P", (33, 21), 1)
    palette.putpalette([250, 10, 10, 10, 200, 10] * 128)
    odd = {
        "coco/rgba.png": Image.new("RGBA", (50, 30), (0, 0, 255, 90)),        # transparency
        "coco/gray.png": Image.new("L", (17, 40), 120),
        "coco/palette.png": palette,
        "coco/cmyk.jpg": Image.new("CMYK", (40, 40), (0, 200, 200, 0)),
        "00000/tall.png": Image.new("RGB", (6, 90), (10, 200, 10)),            # 1:15
        "00000/wide.jpg": Image.new("RGB", (120, 9), (200, 200, 10)),          # 13:1
    }
    for rel, img in odd.items():
        img.save(images / rel)
    names = list(odd)
    captions = [{"id": f"cap{k}", "image": rel,
                 "conversations": ask("<image>\nWrite a terse but informative summary of the picture." if k % 2
                                      else "Give a brief description of the image.\n<image>", f"a picture, number {k}.")}
                for k, rel in enumerate(names)]
    captions.append({"id": "cap-text", "conversations": ask("Say a caption.", "no image here.")})  # CLIP skips it
    instruct = [
        {"id": "i6IyJda_0", "model": "", "conversations": ask(
            "Write a haiku about autumn leaves.", "Red leaves drift and fall\nthe cold wind hums…\nsoft ground.",
            "Now one line on winter.", "Snow hushes the world.")},                                  # ShareGPT
        {"id": "sharegpt-2", "conversations": ask("What is 2 + 2?", "4")},
        {"id": "coco-1", "image": names[0], "conversations": ask(
            "<image>\nWhat colors do you see?", "Blue on white.", "Is it transparent?", "Partly.")},  # multi-turn
        {"id": "gqa-1", "image": names[1], "conversations": ask("Is the image gray?\n<image>", "Yes")},
        {"id": "ocr-1", "image": names[2], "conversations": ask("<image>\nWhat color is it?", "Red",
                                                                 "Any text?", "No")},
        {"id": "vg-1", "image": names[3], "conversations": ask("Which color dominates?\n<image>", "Cyan")},
        {"id": "vg-2", "image": names[4], "conversations": ask("<image>\nIs it tall or wide?", "Tall")},
        {"id": "vg-3", "image": names[5], "conversations": ask("Is it tall or wide?\n<image>", "Wide")},
    ]
    heldout = [
        {"id": "q1", "image": names[4], "answer": "tall", "question_type": "shape",
         "conversations": ask("<image>\nIs it tall or wide?", "tall")},
        {"id": "q2", "image": names[5], "answer": "wide", "question_type": "shape",
         "conversations": ask("Is it tall or wide?\n<image>", "wide")},
        {"id": "q3", "answer": "4", "question_type": "math", "conversations": ask("What is 2 + 2?", "4")},
    ]
    for name, recs in (("captions.json", captions), ("mix.json", instruct), ("heldout.json", heldout)):
        (root / name).write_text(json.dumps(recs))
    return root


@pytest.fixture(scope="module")
def mini_mix(tmp_path_factory):
    """A tiny-LM config on the mini mix, written as YAML (as a user would pass it). The tests share
    its runs folder, so that stage 0, trained once, is reused."""
    tmp = tmp_path_factory.mktemp("mini-mix")
    root = write_mini_mix(tmp / "llava")
    cfg = tiny_cfg()
    cfg.name, cfg.runs_dir = "mini-mix", str(tmp / "runs")
    d = cfg.data
    d.kind, d.root, d.image_folder = "llava", str(root), "images"
    d.caption_file, d.instruct_file, d.eval_files = "captions.json", "mix.json", {"heldout": "heldout.json"}
    t = cfg.train
    t.precision, t.stage0.precision = "32-true", "32-true"
    t.stage0.clip_steps, t.stage0.lm_steps, t.stage0.clip_batch_size, t.stage0.lm_batch_size = 3, 3, 4, 4
    t.align.steps, t.instruct.steps, t.align.batch_size, t.instruct.batch_size = 2, 3, 4, 4
    path = tmp / "mini-mix.yaml"
    cfg.to_yaml(path)
    return cfg, path


def test_mini_mix_trains_through_the_cli(mini_mix, capsys):
    cfg, path = mini_mix
    assert cli.main(["train", str(path)]) == 0, capsys.readouterr().err
    run = cfg.run_dir
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["heldout_accuracy"] >= 0 and metrics["splits"]["heldout"]["seeing"]["n"] == 3
    assert {e["id"] for e in metrics["splits"]["heldout"]["examples"]} == {"q1", "q2", "q3"}
    for stage, steps in (("align", 2), ("instruct", 3)):
        assert json.loads((run / stage / "done.json").read_text())["steps"] == steps
    stage0 = [json.loads(p.read_text()) for p in (run.parent / "stage0").glob("*/info.json")]
    assert sorted(i["steps"] for i in stage0) == [3, 3]   # the CLIP and the LM both trained
    assert "wall time" in capsys.readouterr().out
    # the trained run, named by its folder: re-evaluated, then on a paper benchmark (MMVP's format)
    assert cli.main(["eval", str(run)]) == 0 and "mini-mix" in capsys.readouterr().out
    mmvp = write_mmvp(run.parent.parent / "mmvp")
    assert cli.main(["eval", str(run), "--benchmark", f"mmvp={mmvp}"]) == 0, capsys.readouterr().err
    scores = json.loads((run / "paper_benchmarks" / "paper_benchmarks.json").read_text())
    assert 0 <= scores["mmvp"] <= 1 and scores["mmvp_n"] == 4 and scores["model"] == "mini-mix"


def test_a_stage_with_no_step_is_an_error(mini_mix, capsys):
    _, path = mini_mix
    # 6 captions with an image (the text-only one is skipped) cannot fill one CLIP batch of 8
    assert cli.main(["train", str(path), "--set", "name=big-batch", "--set", "train.stage0.clip_batch_size=8"]) == 2
    err = capsys.readouterr().err
    assert "6 training samples, fewer than one full batch of 8" in err and "clip_batch_size" in err
    assert cli.main(["train", str(path), "--set", "name=no-steps", "--set", "train.align.steps=0"]) == 2
    err = capsys.readouterr().err
    assert "stage align (captions): steps=0 would train nothing" in err and "skip_align" in err


def test_lm_texts_keep_text_only_and_every_turn():
    recs = [{"id": "t", "conversations": ask("Write a haiku.", "Leaves.", "Another?", "Snow.")},
            {"id": "i", "image": "a.png", "conversations": ask("Colour?\n<image>", "Red", "Sure?", "Yes")}]
    caps = [{"id": "c", "image": "a.png", "conversations": ask("<image>\nDescribe.", "a dot.")}]
    assert lm_texts(caps, recs) == [[("Write a haiku.", "Leaves."), ("Another?", "Snow.")],
                                    [("Colour?", "Red"), ("Sure?", "Yes")], [("Describe.", "a dot.")]]


def test_predict_mixes_text_only_and_image_records(tiny_model):
    model, tok = tiny_model
    recs = [{"id": "a", "image": "x.png", "conversations": ask("<image>\nColour?", "red")},
            {"id": "b", "conversations": ask("What is 2 + 2?", "4")},
            {"id": "c", "image": "y.png", "conversations": ask("Shape?\n<image>", "circle")}]
    seen = []

    def pixels(rec):
        seen.append(rec["id"])
        return torch.zeros(3, 64, 64)
    assert len(predict(model, tok, recs, pixels, progress=False)) == 3 and sorted(seen) == ["a", "c"]
    seen.clear()
    assert len(predict(model, tok, recs, pixels, blind=True, progress=False)) == 3 and not seen
