"""The `clip_where` tower objective (vision.objective: clip_where): the per-patch labels it learns, and a short
stage 0 whose dense losses fall and whose weights load as a plain tiny CLIP tower."""
import csv
import json

import pytest
import torch
from PIL import Image

from lgemma import unimodal
from lgemma.config import get_preset
from lgemma.data import shapes as S
from lgemma.vision import build_vision_tower


def test_where_labels_give_each_covered_patch_its_objects_cell_color_and_shape():
    objs = [{"shape": "square", "color": "red", "size": "large", "cx": 20.0, "cy": 12.0, "r": 10.9},
            {"shape": "circle", "color": "blue", "size": "small", "cx": 50.0, "cy": 50.0, "r": 5.8}]
    lab = unimodal.where_labels(objs, 64, 8)
    assert lab.shape == (4, 64)
    bg = [n - 1 for n in unimodal.WHERE_CLASSES.values()]
    # patch centres at 4, 12, 20, ... px: the square's box [9.1, 30.9] x [1.1, 22.9] covers columns 1-3, rows 0-2
    square = {(r, c) for r in range(3) for c in (1, 2, 3)}
    circle = {(6, 6)}                                        # box [44.2, 55.8]^2 holds only the centre 52 px
    for r in range(8):
        for c in range(8):
            got = lab[:, r * 8 + c].tolist()
            if (r, c) in square:
                assert got == [2, 1, list(S.COLORS).index("red"), S.SHAPES.index("square")]  # cell (2, 1): the object's
            elif (r, c) in circle:
                assert got == [6, 6, list(S.COLORS).index("blue"), S.SHAPES.index("circle")]
            else:
                assert got == bg


def test_clip_where_stage0_learns_the_labels_and_saves_a_plain_clip(world, tmp_path):
    from lgemma.data.llava_json import load_records
    cfg = get_preset("tiny")
    cfg.vision.objective = "clip_where"
    cfg.vision.width, cfg.vision.layers, cfg.vision.heads, cfg.vision.embed_dim = 64, 3, 4, 64
    cfg.data.root = str(world)
    cfg.train.stage0.clip_steps, cfg.train.stage0.clip_batch_size = 60, 32
    tower = build_vision_tower(cfg.vision)
    load = lambda r: tower.preprocess(Image.open(world / r["image"]))  # noqa: E731
    recs = load_records(world / "captions.json")
    info = unimodal.pretrain_vision(cfg, recs, load, load_records(world / "captions_heldout.json"), tmp_path)
    assert info["objective"] == "clip_where"
    acc = info["where_heldout_accuracy"]
    assert set(acc) == set(unimodal.WHERE_CLASSES) and acc["color"] > 0.5, acc   # 7 classes: chance is far below
    rows = [r for r in csv.DictReader((tmp_path / "logs" / "version_0" / "metrics.csv").open()) if r.get("where_color_loss")]
    for head in unimodal.WHERE_CLASSES:
        first, last = float(rows[0][f"where_{head}_loss"]), float(rows[-1][f"where_{head}_loss"])
        assert last < 0.8 * first, (head, first, last)
    loaded = build_vision_tower(cfg.vision, tmp_path / "clip.safetensors")   # no head weights in the file
    assert loaded(torch.stack([load(recs[0])])).shape == (1, 64, 64)


def test_clip_where_needs_shapesworld_scenes(tmp_path):
    cfg = get_preset("tiny")
    cfg.vision.objective = "clip_where"
    cfg.data.root = str(tmp_path)
    rec = {"id": "a", "image": "a.png", "conversations": [{"from": "human", "value": "<image>"},
                                                          {"from": "gpt", "value": "a red circle."}]}
    with pytest.raises(ValueError, match="clip_where learns ShapesWorld's scene labels"):
        unimodal.pretrain_vision(cfg, [rec], lambda r: torch.zeros(3, 64, 64), [], tmp_path / "out")
    assert json.dumps(cfg.to_dict())  # the config stays serialisable
