"""Interpretability tools on the random tiny model: shapes, normalization, the teacher-forced
run agreeing with KV-cached generation, and the relevancy map's randomization sanity check."""
import pytest
import torch
from PIL import Image

from lgemma import interpret as I
from lgemma.data.collate import build_prompt
from lgemma.data.llava_json import load_records, turns
from lgemma.evaluation import answer
from lgemma.language import END_TURN


@pytest.fixture
def sample(world, tiny_model):
    """(model, tokenizer, question, answer, PIL image, pixels [3,S,S], record) for a color question."""
    model, tok = tiny_model
    model.eval()
    rec = next(r for r in load_records(world / "instruct_heldout.json") if r["question_type"] == "color")
    img = Image.open(world / rec["image"]).convert("RGB")
    q, a = turns(rec)[0]
    return model, tok, q, a, img, model.vision.preprocess(img), rec


def test_shapes_and_normalization(sample):
    model, tok, q, a, img, px, _ = sample
    res = I.teacher_forced(model, tok, q, a, px)
    L, H = model.lm.config.num_hidden_layers, model.lm.config.num_attention_heads
    T = len(res["input_ids"])
    assert res["attentions"].shape == (L, H, T, T)
    assert len(res["image_positions"]) == model.vision.num_patches
    assert tok.decode(res["input_ids"][res["answer_positions"]]) == a
    assert tok.decode(res["input_ids"][res["question_positions"]]).strip() == q.split("\n", 1)[1]
    assert I.image_attention(res).shape == (L, H, *model.vision.grid)
    torch.testing.assert_close(res["attentions"].sum(-1), torch.ones(L, H, T), atol=1e-5, rtol=0)
    mass = I.attention_mass(res)
    assert all(m.shape == (L, H) and (m >= -1e-6).all() for m in mass.values())
    torch.testing.assert_close(sum(mass.values()), torch.ones(L, H), atol=1e-5, rtol=0)
    assert I.overlay(img, I.image_attention(res).mean((0, 1))).size == img.size


def test_attention_implementation_restored(sample):
    model, tok, q, a, img, px, _ = sample
    before = model.lm.config._attn_implementation
    I.teacher_forced(model, tok, q, a, px)
    assert model.lm.config._attn_implementation == before


def test_teacher_forced_matches_cached_generation(sample):
    model, tok, q, _, _, px, _ = sample
    n = model.num_image_tokens
    stop = [tok.convert_tokens_to_ids(END_TURN), tok.eos_token_id]
    prompt = torch.tensor([build_prompt(tok, q, n)])
    gen = model.generate(prompt, torch.ones_like(prompt), px[None], max_new_tokens=6, stop_token_ids=stop)[0]
    assert answer(model, tok, [q], px[None], max_new_tokens=6)[0] == tok.decode(gen, skip_special_tokens=True).strip()

    res = I.teacher_forced(model, tok, q, gen.tolist(), px)
    pred = res["logits"][res["answer_positions"] - 1].argmax(-1)
    assert pred.tolist() == gen.tolist()

    # KV cache: first step (prompt) and second step (one new token) vs the full forward
    with torch.no_grad():
        embeds = model.embed(prompt, px[None])
        step1 = model.lm(inputs_embeds=embeds, use_cache=True)
        nxt = model.lm.get_input_embeddings()(gen[None, :1])
        step2 = model.lm(inputs_embeds=nxt, past_key_values=step1.past_key_values, use_cache=True)
    p = prompt.shape[1]
    torch.testing.assert_close(step1.logits[0, -1], res["logits"][p - 1], atol=1e-5, rtol=0)
    torch.testing.assert_close(step2.logits[0, -1], res["logits"][p], atol=1e-5, rtol=0)


def test_relevancy_map(sample):
    model, tok, q, a, _, px, _ = sample
    heat, R, res = I.relevancy_map(model, tok, q, a, px, return_all=True)
    assert heat.shape == model.vision.grid and (heat >= 0).all()
    assert heat.sum() > 0, "no gradient reached the attention probabilities"
    # rollout from identity: every row keeps at least its own 1
    assert (R.diagonal() >= 1 - 1e-6).all()
    # model-randomization check (Adebayo et al. 2018): a new connector must change the map
    torch.manual_seed(123)
    for m in model.connector.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    assert not torch.allclose(I.relevancy_map(model, tok, q, a, px), heat, atol=1e-6)


def test_localization_score():
    box = [8, 16, 24, 40]
    assert abs(I.localization_score(torch.ones(8, 8), box, 64) - 1.0) < 1e-6
    assert abs(I.localization_score(torch.rand(4, 4) * 0 + 3.0, box, (64, 64)) - 1.0) < 1e-6
    inside = torch.zeros(8, 8)
    inside[2:5, 1:3] = 1.0       # patches 8 px: rows 16..40, cols 8..24 = the box
    score = I.localization_score(inside, box, 64)
    assert score > 1.0
    assert score <= 64 * 64 / (16 * 24) + 1e-6   # can't beat all mass in the box


def test_token_norm_stats(sample):
    model, tok, q, _, _, px, _ = sample
    stats = I.token_norm_stats(model, tok, torch.stack([px, px]), q)
    assert set(stats) >= {"visual_mean", "visual_std", "text_mean", "text_std", "ratio"}
    assert stats["visual_mean"] > 0 and stats["text_mean"] > 0


def test_maps_work_with_a_gemma3_language_model(tokenizer):
    """The same functions on transformers' Gemma 3 class (the 270M's architecture), tiny and random."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from lgemma.interpret import image_attention, relevancy_map, teacher_forced
    from lgemma.language import IMAGE_TOKEN
    from lgemma.model import LlavaGemma
    from lgemma.vision import build_vision_tower
    from tests.conftest import tiny_cfg
    cfg = tiny_cfg()
    lm = Gemma3ForCausalLM(Gemma3TextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                            head_dim=16, sliding_window=16, pad_token_id=0))
    model = LlavaGemma(build_vision_tower(cfg.vision), lm, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    image = torch.randn(3, 64, 64)
    res = teacher_forced(model, tokenizer, "<image>\nWhat color is the circle?", "red", image)
    assert image_attention(res).shape == (2, 2, *model.vision.grid)
    rel = relevancy_map(model, tokenizer, "<image>\nWhat color is the circle?", "red", image)
    assert rel.shape == model.vision.grid and (rel >= 0).all()


def _probe_world(n: int, informative: bool, seed: int = 0):
    """Scenes of one object each on a 4x4 grid of 8-d features; the object's shape is written
    into the feature of the patch under its center only when `informative`."""
    g = torch.Generator().manual_seed(seed)
    shapes = ("circle", "square", "triangle")
    features, scenes = {}, {}
    for i in range(n):
        f = torch.randn(16, 8, generator=g)
        k = int(torch.randint(0, 3, (1,), generator=g))
        r, c = (int(v) for v in torch.randint(0, 4, (2,), generator=g))
        if informative:
            f[r * 4 + c, k] += 6.0
        features[f"img{i}"] = f
        scenes[f"img{i}"] = [{"shape": shapes[k], "cx": c * 8 + 4.0, "cy": r * 8 + 4.0}]
    return features, scenes


@pytest.mark.parametrize("informative", [True, False])
def test_object_probe_reads_what_the_features_hold(informative):
    features, scenes = _probe_world(400, informative)
    ids = list(scenes)
    out = I.object_probe(features, scenes, ids[:300], ids[300:], "shape", grid=(4, 4), image_size=32, steps=300)
    assert out["classes"] == ["circle", "square", "triangle"] and out["n_test"] == 100
    if informative:
        assert out["accuracy"] > 0.9
    else:  # nothing to read: no better than chance, give or take sampling noise
        assert out["accuracy"] < 0.5


def test_position_is_where_the_center_lies_within_its_patch():
    """Not the grid cell, which every patch feature carries in its position embedding."""
    label = lambda cx, cy: I.object_label({"cx": cx, "cy": cy}, "position", grid=(8, 8), image_size=64)  # noqa: E731
    assert label(3.0, 3.0) == label(43.0, 11.0) == "top-left"       # cells (0, 0) and (1, 5), same quarter
    assert label(13.0, 2.0) == "top-right" and label(2.0, 61.5) == "bottom-left" and label(63.9, 7.9) == "bottom-right"
    assert I.object_label({"shape": "circle"}, "shape") == "circle"


def test_one_probe_scores_several_test_sets_and_the_compositional_set_holds_only_unseen_pairs(world):
    import json

    from lgemma.data.shapes import HELDOUT_COMBOS
    scenes = json.loads((world / "scenes.json").read_text())
    train, tests, kept = I.probe_sets(scenes, n_train=100)
    assert len(train) == 100 and set(tests) == {"heldout", "compositional"}
    assert len(tests["heldout"]) == 20 and all(kept[i] == scenes[i] for i in tests["heldout"])
    unseen = {tuple(p) for p in HELDOUT_COMBOS}
    comp = [o for i in tests["compositional"] for o in kept[i]]
    assert comp and all((o["color"], o["shape"]) in unseen for o in comp)
    assert not any((o["color"], o["shape"]) in unseen for i in train for o in scenes[i])
    # features that write each object's color into the patch under its center: color is readable
    # on both test sets (the unseen pairs' colors are all seen in training, with other shapes)
    colors = sorted({o["color"] for i in train for o in scenes[i]})
    features = {}
    for i in train + tests["heldout"] + tests["compositional"]:
        f = torch.zeros(64, len(colors))
        for o in kept[i]:
            f[int(o["cy"] / 8) * 8 + int(o["cx"] / 8), colors.index(o["color"])] = 1.0
        features[i] = f
    out = I.object_probe(features, kept, train, tests, "color", window=1, steps=300)
    assert set(out) == {"heldout", "compositional"}
    assert out["compositional"]["n_test"] == len(comp)
    assert out["heldout"]["accuracy"] > 0.9 and out["compositional"]["accuracy"] > 0.9
    one_class = {"a": [{"shape": "circle", "cx": 4.0, "cy": 4.0}]}
    with pytest.raises(ValueError, match="nothing to probe"):
        I.object_probe({"a": torch.zeros(64, 2)}, one_class, ["a"], ["a"], "shape", window=1, steps=1)


def test_pair_counts_show_the_never_seen_pairs_as_zeros(world):
    """The shortcut notebook 06 teaches: in training, each never-seen pair's color comes only with
    other shapes."""
    from types import SimpleNamespace

    from lgemma.data.shapes import HELDOUT_COMBOS
    cfg = SimpleNamespace(data=SimpleNamespace(root=str(world)))
    counts = I.pair_counts(cfg)
    assert counts.values.sum() > 0
    for color, shape in HELDOUT_COMBOS:
        assert counts.loc[color, shape] == 0 and counts.loc[color].sum() > 0
    assert (counts.values > 0).sum() == counts.size - len(HELDOUT_COMBOS)


def test_untrained_control_is_the_seeded_random_tower(world):
    """probe_table's control: the ViT of the config at its random init, seeded as stage 0 seeds it
    (the same features twice), and different from another seed's."""
    from lgemma.config import get_preset
    cfg = get_preset("tiny")
    cfg.data.root = str(world)
    ids = ["train_000000", "heldout_000000"]
    a, grid = I.untrained_features(cfg, ids)
    b, _ = I.untrained_features(cfg, ids)
    assert grid == (8, 8) and a["train_000000"].shape == (64, cfg.vision.width)
    torch.testing.assert_close(a["heldout_000000"], b["heldout_000000"])
    cfg.train.stage0.seed += 1
    c, _ = I.untrained_features(cfg, ids)
    assert not torch.allclose(a["heldout_000000"], c["heldout_000000"])


def test_named_object_attention_matches_the_teacher_forced_attention_maps(world, tiny_model):
    """Notebook 06's look-up check: per head, the answer's mean attention per visual token on the named
    object over that on the other objects, recomputed here from `teacher_forced` + `image_attention`."""
    import json

    from tests.conftest import tiny_cfg
    model, tok = tiny_model
    model.eval()
    cfg = tiny_cfg()
    cfg.data.root = str(world)
    out = I.named_object_attention(model, tok, cfg, types=("color", "shape"), n=3)
    assert set(out) <= {"color", "shape"} and out
    scenes = json.loads((world / "scenes.json").read_text())
    for qtype, v in out.items():
        assert 1 <= v["n"] <= 3 and v["ratio"].shape == (cfg.language.layers, cfg.language.heads)
        assert torch.isfinite(v["ratio"]).all() and (v["ratio"] > 0).all() and v["all heads"].shape == (cfg.language.layers,)
        # the same questions, the other way round
        on_sum = off_sum = 0
        used = 0
        for r in load_records(world / "instruct_heldout.json"):
            objs = scenes[r["image"].split("/")[-1][:-4]]
            named = [o for o in objs if r.get("box") is not None and list(o["box"]) == list(r["box"])]
            if r["question_type"] != qtype or len(objs) < 2 or len(named) != 1 or used == v["n"]:
                continue
            on = I._token_cells(named[0], model.grid, cfg.data.image_size)
            off = sorted({i for o in objs if o is not named[0] for i in I._token_cells(o, model.grid, 64)} - set(on))
            if not on or not off:
                continue
            q, a = turns(r)[0]
            att = I.image_attention(I.teacher_forced(model, tok, q, a, model.vision.preprocess(
                Image.open(world / r["image"]).convert("RGB")))).flatten(2)      # [L, H, N]
            on_sum, off_sum, used = on_sum + att[..., on].mean(-1), off_sum + att[..., off].mean(-1), used + 1
        torch.testing.assert_close(v["ratio"], on_sum / off_sum, rtol=1e-3, atol=1e-5)


def test_spatial_decisions_split_the_axis_from_the_direction():
    """Notebook 06's split of a spatial answer into its axis and its direction, by hand."""
    answers = ["left", "right", "above", "left", "below", "yes"]
    truths = ["left", "left", "left", "below", "below", "above"]
    table = I.spatial_decisions(answers, truths, [2, 2, 2, 3, 3, 3])
    assert list(table.index) == ["all", "2 objects", "3 objects"] and list(table.n) == [6, 3, 3]
    two, three, every = table.loc["2 objects"], table.loc["3 objects"], table.loc["all"]
    assert two.accuracy == pytest.approx(1 / 3) and two.axis == pytest.approx(2 / 3)     # "right" has the axis
    assert two["direction | axis"] == pytest.approx(1 / 2) and two["axis, most common"] == 1.0
    assert three.axis == pytest.approx(1 / 3) and three["direction | axis"] == 1.0      # "yes" is no axis
    assert every.accuracy == pytest.approx(2 / 6) and every["axis, most common"] == 0.5     # 3 beside, 3 above/below


def test_spatial_breakdown_scores_the_split_s_spatial_questions(world, tiny_model):
    """On the random tiny model: one row per object count present, n = the split's spatial questions."""
    from tests.conftest import tiny_cfg
    from lgemma.pipeline import records
    model, tok = tiny_model
    cfg = tiny_cfg()
    cfg.data.root = str(world)
    table = I.spatial_breakdown(model, tok, cfg)
    n = sum(r["question_type"] == "spatial" for r in records(cfg, "heldout"))
    assert table.loc["all", "n"] == n == table.drop(index="all").n.sum() > 0
    assert ((table.accuracy <= table.axis) & (table.axis <= 1)).all()


def test_experiment_runs_reads_the_committed_step8_runs(tmp_path):
    import json
    runs = I.experiment_runs()
    assert {"base1600", "pos1-1600", "oracle-pos1", "oracle-sc1"} <= set(runs.index)  # the rows notebook 06 shows
    cols = ["held-out", "blind", "spatial", "color, unseen pairs", "shape, unseen pairs", "color, seen pairs"]
    assert runs.loc["oracle-pos1", cols].between(0, 1).all()
    prov = json.loads((I.STEP8_RUNS.parent / "provenance.json").read_text())
    assert {"command", "code", "machine", "dates", "wall_seconds_total"} <= set(prov)
    assert set(prov["runs"]) == set(runs.index) and all(r["curve"] and r["wall_seconds"] for r in prov["runs"].values())
    import tarfile
    with tarfile.open(I.STEP8_RUNS.parent / "code.tar.gz") as tar:  # every toy's script is committed
        scripts = {name for name in tar.getnames() if name.endswith(".py")}
    assert prov["toy"] and all(t["command"].startswith("python code/") and t["command"].split()[1] in scripts
                               and t["wall_seconds"] and t["curve (step, train loss, held-out accuracy)"]
                               for t in prov["toy"].values())
    line = {"name": "x", "heldout": 0.5, "blind": 0.25, "comp": 0.4, "per_type": {"spatial": 0.3},
            "unseen_detail": {"color_unseen": "0.012 (n=85)", "shape_seen": "1.000 (n=37)"},
            "locate_heldout": {"cell": 0.4, "cell, 2 objects": 0.43, "objects": 588},
            "spatial_chain": {"spatial": 0.6, "both_cells_right": 0.2, "relation_follows_own_cells": 0.9, "n": 90},
            "tower": {"column": 0.92, "stage-0 steps": 1500},
            "never_seen_heldout": {"color": "0.098 (n=183)"},
            "sets": ["name=x", "train.instruct.debias=question_prior", "train.instruct.debias_weight=0.5"]}
    plain = {**line, "name": "y", "sets": ["train.instruct.debias_weight=0.5"]}  # a weight without debias: none
    (tmp_path / "runs.jsonl").write_text(json.dumps(line) + "\n" + json.dumps(plain) + "\n")
    one = I.experiment_runs(tmp_path / "runs.jsonl").loc["x"]
    assert one["color, unseen pairs"] == 0.012 and one["shape, seen pairs"] == 1.0 and one["spatial"] == 0.3
    assert one["locate cell"] == 0.4 and one["locate cell, 2 objects"] == 0.43 and "locate objects" not in one
    assert one["spatial, chain"] == 0.6 and one["chain, both cells right"] == 0.2 and one["spatial"] == 0.3
    assert one["chain, relation follows own cells"] == 0.9 and "chain, n" not in one
    assert one["tower column"] == 0.92 and one["tower stage-0 steps"] == 1500
    assert one["color, never-seen answers"] == 0.098 and one["debias weight"] == 0.5
    assert I.experiment_runs(tmp_path / "runs.jsonl").loc["y", "debias weight"] == 0.0
    assert {"poe-base", "poe-w1"} <= set(runs.index)  # notebook 06's section 6
    assert runs.loc["poe-base", "debias weight"] == 0 and runs.loc["poe-w1", "debias weight"] == 1


def test_pair_answers_flag_answers_that_make_a_never_seen_pair(world, tiny_model, monkeypatch):
    """pair_answers: every color / shape question of both splits once, scored, and `never_seen` set exactly
    when the predicted attribute and the one the question names form a HELDOUT_COMBOS pair."""
    import lgemma.evaluation
    from lgemma.data.shapes import HELDOUT_COMBOS
    from lgemma.pipeline import records
    from tests.conftest import tiny_cfg
    model, tok = tiny_model
    cfg = tiny_cfg()
    cfg.data.root = str(world)
    color, shape = HELDOUT_COMBOS[0]
    # a model that always answers the never-seen partner of the named shape (color questions) or color (shape)
    def fake_predict(model_, tok_, recs, source, progress=True):
        return [color if r["question_type"] == "color" else shape for r in recs]
    monkeypatch.setattr(lgemma.evaluation, "predict", fake_predict)
    a = I.pair_answers(model, tok, cfg)
    want = sum(r["question_type"] in ("color", "shape") for split in ("heldout", "compositional")
               for r in records(cfg, split))
    assert len(a) == want > 0 and set(a.split) == {"heldout", "compositional"}
    for _, row in a.iterrows():
        assert row["correct"] == (row["answer"] == row["predicted"])
        words = row["question"].rstrip("?").split()
        pairs = {(row["predicted"], w) for w in words} if row["type"] == "color" else {(w, row["predicted"]) for w in words}
        assert row["never_seen"] == bool(pairs & set(HELDOUT_COMBOS)), row.to_dict()
    assert a.never_seen.any() and not a.never_seen.all()
    assert (a[a.split == "heldout"].object == "seen pair").all() and (a.object == "unseen pair").any()
