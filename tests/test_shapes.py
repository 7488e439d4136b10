"""Tests for lgemma.data.shapes: the procedural ShapesWorld dataset."""

import json
import random
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from lgemma.data import shapes as S
from lgemma.data.llava_json import load_image, load_records, turns, validate_record

SMALL = dict(n_train=80, n_heldout=30, n_compositional=30, image_size=64, progress=False)
JSON_FILES = ("captions.json", "instruct_train.json", "instruct_heldout.json", "instruct_compositional.json")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes_seed0")
    summary = S.generate(out, seed=0, **SMALL)
    return out, summary


def read(out, name):
    return json.loads((Path(out) / name).read_text(encoding="utf-8"))


def all_files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- checking answers against scenes


def resolve(expr, objects):
    """Objects matching a referring expression such as 'large red object' or 'circle'."""
    *attrs, noun = expr.split()
    found = [o for o in objects if noun == "object" or o["shape"] == noun]
    for word in attrs:
        key = "size" if word in S.SIZES else "color"
        assert word in S.SIZES or word in S.COLORS, f"unknown word {word!r} in {expr!r}"
        found = [o for o in found if o[key] == word]
    return found


def parse(question):
    """(template kind, captured fields) for a question; exactly one template must match."""
    hits = [(kind, m.groupdict()) for kind, temps in S.TEMPLATES.items() for t in temps
            if (m := S.template_regex(t).match(question))]
    assert len(hits) == 1, f"{question!r} matches {len(hits)} templates"
    return hits[0]


def expected_answer(question, objects, image_size):
    """Recompute the answer to a question from the scene's objects alone."""
    kind, f = parse(question)
    if kind in ("color", "shape"):
        (obj,) = resolve(f["ref"], objects)  # a referring expression must pick exactly one object
        assert obj[kind] not in f["ref"].split(), "the question gives its answer away"
        return obj[kind]
    if kind == "size":
        (obj,) = [o for o in objects if (o["color"], o["shape"]) == (f["color"], f["shape"])]
        return obj["size"]
    if kind == "count":
        return str(len(objects))
    if kind == "count_color":
        return str(sum(o["color"] == f["color"] for o in objects))
    if kind == "exist":
        return "yes" if any((o["color"], o["shape"]) == (f["color"], f["shape"]) for o in objects) else "no"
    if kind == "spatial":
        (a,), (b,) = resolve(f["a"], objects), resolve(f["b"], objects)
        dx, dy = a["cx"] - b["cx"], a["cy"] - b["cy"]
        margin = S.SPATIAL_MARGIN * image_size
        # Check against the boxes too: the answer must be visible in the box geometry.
        ax, ay = (a["box"][0] + a["box"][2]) / 2, (a["box"][1] + a["box"][3]) / 2
        bx, by = (b["box"][0] + b["box"][2]) / 2, (b["box"][1] + b["box"][3]) / 2
        if abs(dx) >= margin and abs(dx) > abs(dy):
            assert (ax < bx) == (dx < 0)
            return "left" if dx < 0 else "right"
        assert abs(dy) >= margin and abs(dy) > abs(dx), f"ambiguous spatial question {question!r}"
        assert (ay < by) == (dy < 0)
        return "above" if dy < 0 else "below"
    assert kind == "describe"
    scene = S.Scene([S.Obj(**{k: v for k, v in o.items() if k != "box"}) for o in objects], image_size)
    return S.describe(scene)


def referred(question, objects):
    """The object a question is about (None for counting, describing and absent objects)."""
    kind, f = parse(question)
    if kind in ("color", "shape"):
        return resolve(f["ref"], objects)[0]
    if kind == "spatial":
        return resolve(f["a"], objects)[0]
    if kind in ("size", "exist"):
        found = [o for o in objects if (o["color"], o["shape"]) == (f["color"], f["shape"])]
        return found[0] if found else None
    return None


# ---------------------------------------------------------------- determinism


def test_same_seed_gives_identical_files(dataset, tmp_path):
    out, summary = dataset
    again = S.generate(tmp_path, seed=0, **SMALL)
    first, second = all_files(out), all_files(tmp_path)
    assert summary == again
    assert first.keys() == second.keys()
    assert len([k for k in first if k.endswith(".png")]) == 140
    for name in first:
        assert first[name] == second[name], name


def test_different_seed_differs(dataset, tmp_path):
    out, _ = dataset
    S.generate(tmp_path, seed=1, **SMALL)
    for name in ("scenes.json", "captions.json", "instruct_train.json", "images/train/train_000000.png"):
        assert (out / name).read_bytes() != (tmp_path / name).read_bytes(), name


def test_sample_is_deterministic():
    img1, scene1 = S.sample(7)
    img2, scene2 = S.sample(7)
    assert scene1 == scene2 and img1.tobytes() == img2.tobytes()
    assert S.sample(8)[1] != scene1


# ---------------------------------------------------------------- scenes and images


def test_scene_invariants():
    rng = random.Random(0)
    for i in range(400):
        comp = i % 2 == 1
        scene = S.sample_scene(rng, image_size=64, compositional=comp)
        objs = scene.objects
        pairs = [(o.color, o.shape) for o in objs]
        assert 1 <= len(objs) <= 3
        assert len(set(pairs)) == len(pairs)  # "the red circle" is always unique
        assert bool(set(pairs) & set(S.HELDOUT_COMBOS)) == comp
        assert [o.cx for o in objs] == sorted(o.cx for o in objs)
        for o in objs:
            x0, y0, x1, y1 = o.box
            assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
            # Sizes never overlap: every small radius is well below every large one.
            assert (o.r < 0.12 * 64) if o.size == "small" else (o.r > 0.14 * 64)
        for a in objs:
            for b in objs:
                if a is not b:
                    assert S._boxes_apart(a, b, S.GAP * 64)


def test_render_rgb_size_and_colors():
    rng = random.Random(3)
    for size in (64, 96):
        scene = S.sample_scene(rng, image_size=size)
        img = S.render(scene)
        assert img.mode == "RGB" and img.size == (size, size)
        assert S.render(scene).tobytes() == img.tobytes()
        arr = np.asarray(img).astype(int)
        for o in scene.objects:
            # The center pixel of every shape (the up-triangle included) has the shape's color.
            pixel = arr[int(o.cy), int(o.cx)]
            assert np.abs(pixel - S.COLORS[o.color]).max() <= 3, (o, pixel)
        assert tuple(arr[0, 0]) == S.BACKGROUND  # shapes keep a 1 px border free


def test_colors_shapes_and_heldout_tables():
    assert len(S.COLORS) == 6 and S.SHAPES == ("circle", "square", "triangle") and S.SIZES == ("small", "large")
    assert len(S.HELDOUT_COMBOS) == 4
    train_pairs = {p for p in S.ALL_PAIRS if p not in S.HELDOUT_COMBOS}
    assert {c for c, _ in train_pairs} == set(S.COLORS)
    assert {s for _, s in train_pairs} == set(S.SHAPES)


# ---------------------------------------------------------------- language


def make_scene(*specs, size=64):
    objs = [S.Obj(shape=s, color=c, size=z, cx=x, cy=y, r=5.8 if z == "small" else 10.9)
            for z, c, s, x, y in specs]
    return S.Scene(objs, size)


def test_describe_orders_left_to_right():
    one = make_scene(("large", "red", "circle", 30, 30))
    assert S.describe(one) == "a large red circle."
    two = make_scene(("small", "blue", "square", 50, 30), ("large", "red", "circle", 15, 30))
    assert S.describe(two) == "a large red circle and a small blue square."
    three = make_scene(("small", "green", "triangle", 55, 10), ("large", "red", "circle", 12, 30),
                       ("small", "blue", "square", 35, 50))
    assert S.describe(three) == "a large red circle, a small blue square and a small green triangle."


def test_ref_is_shortest_unique():
    scene = make_scene(("large", "red", "circle", 12, 12), ("small", "blue", "circle", 40, 12),
                       ("large", "blue", "square", 40, 45))
    red_c, blue_c, blue_s = scene.objects
    assert S.ref(scene, blue_s) == "square"
    assert S.ref(scene, red_c) == "red circle"
    assert S.ref(scene, red_c, without="color") == "large circle"
    assert S.ref(scene, blue_c, without="color") == "small circle"
    assert S.ref(scene, red_c, without="shape") == "red object"
    assert S.ref(scene, blue_s, without="shape") == "large blue object"
    assert S.ref(scene, blue_c, without="shape") == "small object"
    same = make_scene(("large", "red", "circle", 12, 12), ("large", "blue", "circle", 45, 45))
    assert S.ref(same, same.objects[0], without="color") is None
    full = make_scene(("large", "red", "circle", 12, 12), ("small", "red", "circle", 45, 12),
                      ("large", "blue", "circle", 30, 45))
    assert S.ref(full, full.objects[0]) == "large red circle"


def test_make_questions_types_and_answers():
    rng = random.Random(5)
    popular = list(S.ALL_PAIRS)
    seen = Counter()
    for _ in range(300):
        scene = S.sample_scene(rng)
        objects = [S._obj_dict(o) for o in scene.objects]
        for q in S.make_questions(scene, rng, popular):
            seen[q["type"]] += 1
            assert q["answer"] == expected_answer(q["question"], objects, 64), q
            assert (q["pope"] is not None) == (q["type"] == "exist")
            target = objects[q["target"]] if q["target"] is not None else None
            assert target == referred(q["question"], objects), q
    assert set(seen) == set(S.QUESTION_TYPES)


def test_exist_questions_balanced_and_pope_kinds():
    rng = random.Random(11)
    popular = [("red", "circle"), ("blue", "square"), ("red", "square")] + list(S.ALL_PAIRS)
    answers, kinds = Counter(), Counter()
    for _ in range(600):
        scene = S.sample_scene(rng)
        present = {(o.color, o.shape) for o in scene.objects}
        (q,) = [q for q in S.make_questions(scene, rng, popular, avoid=S.HELDOUT_COMBOS) if q["type"] == "exist"]
        _, f = parse(q["question"])
        pair = (f["color"], f["shape"])
        answers[q["answer"]] += 1
        kinds[q["pope"], q["answer"]] += 1
        assert pair not in S.HELDOUT_COMBOS  # training never names a heldout pair
        if q["answer"] == "no":
            assert pair not in present
            if q["pope"] == "popular":
                assert pair == next(p for p in popular if p not in present and p not in S.HELDOUT_COMBOS)
            if q["pope"] == "adversarial":
                assert any(pair[0] == c or pair[1] == s for c, s in present)
    assert 0.42 < answers["yes"] / 600 < 0.58
    for kind in S.POPE_KINDS:
        assert kinds[kind, "yes"] > 50 and kinds[kind, "no"] > 50


# ---------------------------------------------------------------- generated files


def test_heldout_combos_only_in_compositional(dataset):
    out, _ = dataset
    scenes = read(out, "scenes.json")
    assert len(scenes) == 140
    for image_id, objects in scenes.items():
        pairs = {(o["color"], o["shape"]) for o in objects}
        if image_id.startswith("compositional_"):
            assert pairs & set(S.HELDOUT_COMBOS), image_id
        else:
            assert not pairs & set(S.HELDOUT_COMBOS), image_id


def test_all_records_valid_and_images_load(dataset):
    out, _ = dataset
    for name in JSON_FILES:
        records = load_records(out / name)
        for i, rec in enumerate(records):
            validate_record(rec, f"{name} #{i}")
            assert (out / rec["image"]).is_file()
        img = load_image(records[0]["image_path"], name)
        assert img.mode == "RGB" and img.size == (64, 64)


def test_eval_answers_match_scenes(dataset):
    out, summary = dataset
    scenes = read(out, "scenes.json")
    for split in ("heldout", "compositional"):
        records = read(out, f"instruct_{split}.json")
        per_image = Counter(r["image"] for r in records)
        assert set(per_image.values()) == {4}
        types = Counter(r["question_type"] for r in records)
        assert set(types) == set(S.QUESTION_TYPES) and dict(sorted(types.items())) == summary["questions"][split]
        for rec in records:
            image_id = Path(rec["image"]).stem
            objects = scenes[image_id]
            question = rec["conversations"][0]["value"].removeprefix("<image>\n")
            assert rec["split"] == split and rec["answer"] == rec["conversations"][1]["value"]
            assert rec["answer"] == expected_answer(question, objects, 64), rec
            assert (rec["pope"] in S.POPE_KINDS) == (rec["question_type"] == "exist")
            target = referred(question, objects)
            assert rec["box"] == (target["box"] if target else None), rec


def test_train_instructions_and_captions(dataset):
    out, summary = dataset
    scenes = read(out, "scenes.json")
    instruct = read(out, "instruct_train.json")
    assert len(instruct) == 80
    types = Counter()
    for rec in instruct:
        objects = scenes[rec["id"]]
        pairs = turns(rec)
        assert len(pairs) == 4 and pairs[0][0].startswith("<image>\n")
        kinds = [parse(q.removeprefix("<image>\n"))[0].replace("count_color", "count") for q, _ in pairs]
        assert len(set(kinds)) == 4  # different question types
        types.update(kinds)
        for q, a in pairs:
            assert a == expected_answer(q.removeprefix("<image>\n"), objects, 64)
    assert dict(sorted(types.items())) == summary["questions"]["train"]
    assert 0 < types["describe"] < 0.4 * 80

    captions = read(out, "captions.json")
    corpus = (out / "text_corpus.txt").read_text(encoding="utf-8").splitlines()
    assert [c["conversations"][1]["value"] for c in captions] == corpus
    orders = Counter()
    for c in captions:
        human = c["conversations"][0]["value"]
        orders[human.startswith("<image>\n")] += 1
        assert human.replace("<image>", "").strip() in S.CAPTION_PROMPTS
        assert c["image"] == f"images/train/{c['id']}.png"
        assert c["conversations"][1]["value"] == expected_answer("Describe the image.", scenes[c["id"]], 64)
    assert orders[True] and orders[False]  # both "<image>\nQ" and "Q\n<image>"
    heldout = read(out, "captions_heldout.json")  # stage 0's retrieval check: captions of unseen images
    assert [c["image"] for c in heldout] == [f"images/heldout/heldout_{i:06d}.png" for i in range(30)]
    for c in heldout:
        assert c["conversations"][1]["value"] == expected_answer("Describe the image.", scenes[c["id"]], 64)


def test_questions_per_image_sets_the_turns_of_each_training_conversation(tmp_path):
    S.generate(tmp_path, seed=3, n_train=30, n_heldout=2, n_compositional=2, questions_per_image=6, progress=False)
    convs = [r["conversations"] for r in json.loads((tmp_path / "instruct_train.json").read_text())]
    assert all(len(c) == 12 for c in convs)                      # 6 question/answer pairs each
    assert all(len({t["value"] for t in c[::2]}) == 6 for c in convs)  # never the same question twice


def test_locate_gives_each_objects_cell_right_after_its_name():
    three = make_scene(("small", "green", "triangle", 55, 10), ("large", "red", "circle", 12, 30),
                       ("small", "blue", "square", 35, 50))
    # left to right; column then row on the 8 x 8 grid of a 64 px image (8 px cells)
    assert S.locate(three) == "a large red circle 1 3, a small blue square 4 6, a small green triangle 6 1."
    edge = make_scene(("small", "red", "circle", 63.9, 0.0))
    assert S.cell(edge.objects[0], 64) == (7, 0)


def test_locate_fraction_adds_training_turns_only_and_zero_changes_nothing(tmp_path):
    off, on = tmp_path / "off", tmp_path / "on"
    S.generate(off, seed=3, n_train=60, n_heldout=10, n_compositional=10, progress=False)
    s = S.generate(on, seed=3, n_train=60, n_heldout=10, n_compositional=10, locate_fraction=1.0, progress=False)
    assert s["questions"]["train"]["locate"] == 60                      # one turn in every conversation
    assert "locate" not in s["questions"]["heldout"] and "locate" not in s["questions"]["compositional"]
    for name in ("instruct_heldout.json", "instruct_compositional.json", "captions.json"):
        assert (off / name).read_bytes() == (on / name).read_bytes()    # evaluation and stage 1 unchanged
    scenes = json.loads((on / "scenes.json").read_text())
    for r in json.loads((on / "instruct_train.json").read_text()):
        conv = r["conversations"]
        answers = [conv[i + 1]["value"] for i in range(0, len(conv), 2)
                   if any(conv[i]["value"].endswith(t) for t in S.TEMPLATES["locate"])]
        assert len(answers) == 1 and len(conv) == 8                      # still 4 turns per conversation
        objs = sorted(scenes[r["id"]], key=lambda o: o["cx"])
        want = ", ".join(f"a {o['size']} {o['color']} {o['shape']} {min(7, int(o['cx'] / 8))} {min(7, int(o['cy'] / 8))}"
                         for o in objs) + "."
        assert answers[0] == want


def test_data_made_without_locate_turns_is_not_reused_for_a_config_that_asks_for_them(tmp_path):
    from lgemma.config import get_preset
    from lgemma.pipeline import ensure_data, stage0_dirs
    cfg = get_preset("tiny")
    cfg.data.root = str(tmp_path / "sw")
    cfg.data.n_train, cfg.data.n_heldout, cfg.data.n_compositional = 20, 4, 4
    ensure_data(cfg, progress=False)
    vision, lm = stage0_dirs(cfg)
    cfg.data.locate_fraction = 0.5
    with pytest.raises(ValueError, match="locate_fraction=0.0.*set data.root to a new folder"):
        ensure_data(cfg, progress=False)
    assert stage0_dirs(cfg) == (vision, stage0_dirs(cfg)[1]) and stage0_dirs(cfg)[1] != lm  # same tower, new LM
    cfg.data.root = str(tmp_path / "sw-locate")
    assert json.loads((ensure_data(cfg, progress=False) / "summary.json").read_text())["locate_fraction"] == 0.5


def test_spatial_chain_names_each_object_then_its_cell_then_the_relation():
    two = make_scene(("large", "green", "circle", 44, 12), ("small", "red", "square", 12, 30))
    assert S.spatial_chain(two, 0, 1, "right") == "circle 5 1, square 1 3, so right"
    twins = make_scene(("large", "green", "circle", 44, 12), ("small", "red", "circle", 12, 30))
    assert S.spatial_chain(twins, 1, 0, "left") == "red circle 1 3, green circle 5 1, so left"  # named as the question names them
    assert S.final_answer("red circle 1 3, green circle 5 1, so left") == "left"
    assert S.final_answer("left") == "left" and S.final_answer("a red circle, so to speak") == "a red circle, so to speak"


def test_spatial_turns_put_that_many_chain_questions_in_each_conversation_and_leave_evaluation_alone(tmp_path):
    off, on = tmp_path / "off", tmp_path / "on"
    base = S.generate(off, seed=3, n_train=80, n_heldout=10, n_compositional=10, progress=False)
    s = S.generate(on, seed=3, n_train=80, n_heldout=10, n_compositional=10, spatial_turns=2, spatial_answer="chain",
                   progress=False)
    assert s["spatial_turns"] == 2 and s["spatial_answer"] == "chain" and "spatial_turns" not in base
    for name in ("instruct_heldout.json", "instruct_compositional.json", "captions.json", "scenes.json"):
        assert (off / name).read_bytes() == (on / name).read_bytes()    # evaluation and stage 1 unchanged
    scenes = json.loads((on / "scenes.json").read_text())
    pattern = re.compile(r"(.+) (\d) (\d), (.+) (\d) (\d), so (left|right|above|below)")
    for r, r0 in zip(json.loads((on / "instruct_train.json").read_text()), json.loads((off / "instruct_train.json").read_text())):
        scene = make_scene(*[(o["size"], o["color"], o["shape"], o["cx"], o["cy"]) for o in scenes[r["id"]]])
        conv, conv0 = r["conversations"], r0["conversations"]
        pairs = lambda c: [(c[i]["value"].replace("<image>\n", ""), c[i + 1]["value"]) for i in range(0, len(c), 2)]
        spatial = [(q, a) for q, a in pairs(conv) if pattern.fullmatch(a)]
        assert [qa for qa in pairs(conv) if qa not in spatial] == \
            [(q, a) for q, a in pairs(conv0) if a not in ("left", "right", "above", "below")]  # the others, in order
        assert conv[0]["value"].startswith("<image>\n") and all("<image>" not in t["value"] for t in conv[1:])
        assert len(spatial) == min(2, len(S._spatial_pairs(scene)))
        assert len({q for q, _ in spatial}) == len(spatial)
        for q, a in spatial:
            m = pattern.fullmatch(a)
            ia = next(i for i, o in enumerate(scene.objects) if S.ref(scene, o) == m.group(1))
            ib = next(i for i, o in enumerate(scene.objects) if S.ref(scene, o) == m.group(4))
            assert (ia, ib, m.group(7)) in S._spatial_pairs(scene)
            assert any(t.format(a=m.group(1), b=m.group(4)) == q for t in S.TEMPLATES["spatial"])
            assert (int(m.group(2)), int(m.group(3))) == S.cell(scene.objects[ia], 64)
    with pytest.raises(ValueError, match="spatial_answer must be 'word' or 'chain'"):
        S.generate(tmp_path / "x", n_train=2, n_heldout=1, n_compositional=1, spatial_answer="cot", progress=False)


def test_chain_answers_without_extra_turns_rewrite_only_the_drawn_spatial_answers(tmp_path):
    off, on = tmp_path / "off", tmp_path / "on"
    S.generate(off, seed=5, n_train=60, n_heldout=4, n_compositional=4, progress=False)
    S.generate(on, seed=5, n_train=60, n_heldout=4, n_compositional=4, spatial_answer="chain", progress=False)
    words = ("left", "right", "above", "below")
    n = 0
    for r, r0 in zip(json.loads((on / "instruct_train.json").read_text()), json.loads((off / "instruct_train.json").read_text())):
        for t, t0 in zip(r["conversations"], r0["conversations"]):
            if t0["value"] in words and t0["from"] == "gpt":
                assert t["value"].endswith(f", so {t0['value']}") and S.final_answer(t["value"]) == t0["value"]
                n += 1
            else:
                assert t == t0
    assert n > 10
