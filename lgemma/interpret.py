"""Where does the model look? Attention maps, gradient-weighted relevancy, and sanity checks.

Everything here runs one *teacher-forced* forward (prompt + answer, built by the same
`build_sample` as training, so the spans are the ones the model was trained on) instead of
`generate`: one pass gives the attention of every answer token at once, and it is
differentiable. Position t predicts token t+1, so the attention that "produced" answer token
k is the row of its *predicting position* (the position just before it).

    result = teacher_forced(model, tokenizer, "<image>\\nWhat color is the circle?", "red", pixels)
    image_attention(result)          # [L, H, gh, gw] raw attention to the image grid
    attention_mass(result)           # {"image", "question", "other"}: [L, H] shares
    relevancy_map(model, tokenizer, question, "red", pixels)   # [gh, gw] (Chefer et al. 2021)
    overlay(pil_image, heat)         # PIL heat-map overlay
    localization_score(heat, box, 64)  # > 1: more mass in the box than a uniform map
    tower_probe(cfg, "shape")        # can the frozen patch features alone tell an object's shape?
    probe_table({"CLIP-style": get_config("tiny"), "DINO-style": get_config("tiny-dino")})  # all of it

Attention is only returned by the *eager* implementation (SDPA/flash fuse the softmax away),
so the LM is switched to eager for the forward and switched back afterwards.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

from .alignment import token_norms
from .data.collate import IGNORE_INDEX, build_prompt, build_sample, encode_text, remove_image
from .language import END_TURN, START_TURN


# ---------------------------------------------------------------- teacher-forced forward
@contextmanager
def eager_attention(lm):
    """Run `lm` with eager attention inside the block (the only kind that returns attention
    probabilities, and returns them as part of the autograd graph); restore it afterwards."""
    before = lm.config._attn_implementation
    if before != "eager":
        lm.set_attn_implementation("eager")
    try:
        yield lm
    finally:
        if before != "eager":
            lm.set_attn_implementation(before)


def _as_pixels(model, image) -> torch.Tensor:
    """PIL image, pixels [3,S,S] or tower features [N,Dv] -> a batch of one on the model's device."""
    if not isinstance(image, torch.Tensor):
        image = model.vision.preprocess(image)
    return image.unsqueeze(0).to(next(model.parameters()).device)


def _question_positions(tokenizer, ids: list[int], image_end: int, answer_start: int) -> list[int]:
    """Positions of the question text: between the last image token and the answer, minus the
    chat-template tail `<end_of_turn>\\n<start_of_turn>model\\n` (template, not question)."""
    span = list(range(image_end, answer_start))
    tail = encode_text(tokenizer, f"{END_TURN}\n{START_TURN}model\n")
    if len(tail) <= len(span) and [ids[p] for p in span[-len(tail):]] == tail:
        span = span[:-len(tail)]
    return span


def teacher_forced(model, tokenizer, question: str, answer: str | list[int], image,
                   with_grad: bool = False) -> dict:
    """One eager-attention forward over prompt + answer for a single (question, image).

    `question` holds `<image>`; `answer` is the reply text (the sequence is then exactly
    `build_sample`'s: prompt + reply + `<end_of_turn>` + "\\n") or a list of token ids (e.g. what
    `generate` returned; the sequence is then prompt + those ids). `image`: PIL, pixels
    [3,S,S] or features [N,Dv].

    Returns (T = sequence length, L layers, H heads, V vocab):
        input_ids [T]; image_positions [N]; question_positions [Q]; answer_positions [A]
        (the reply's tokens); target_positions (reply + `<end_of_turn>` for text answers, the
        given ids otherwise); attentions [L, H, T, T] (rows sum to 1); logits [T, V];
        grid (gh, gw) of the tower; embeds [T, D]; attentions_graph (the per-layer tensors
        [1, H, T, T] still in the graph, only with `with_grad=True`).
    """
    n = model.num_image_tokens
    prompt = build_prompt(tokenizer, question, n)
    if isinstance(answer, str):
        sample = build_sample(tokenizer, [(question, answer)], n)
        ids = sample.input_ids
        assert ids[:len(prompt)] == prompt, "build_prompt and build_sample disagree on the prompt"
        targets = [i for i, t in enumerate(sample.labels) if t != IGNORE_INDEX]
        answer_positions = targets[:len(encode_text(tokenizer, answer))]
    else:
        ids = prompt + [int(t) for t in answer]
        targets = answer_positions = list(range(len(prompt), len(ids)))
    image_positions = [i for i, t in enumerate(ids) if t == model.image_token_id]
    question_positions = _question_positions(tokenizer, ids, image_positions[-1] + 1, len(prompt))

    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], device=device)
    with eager_attention(model.lm), torch.set_grad_enabled(with_grad):
        embeds = model.embed(input_ids, _as_pixels(model, image))        # [1, T, D]
        out = model.lm(inputs_embeds=embeds, output_attentions=True, use_cache=False)
    attentions = torch.stack([a[0] for a in out.attentions])             # [L, H, T, T]
    result = {"input_ids": input_ids[0], "image_positions": torch.tensor(image_positions),
              "question_positions": torch.tensor(question_positions, dtype=torch.long),
              "answer_positions": torch.tensor(answer_positions, dtype=torch.long),
              "target_positions": torch.tensor(targets, dtype=torch.long),
              "attentions": attentions if with_grad else attentions.detach(),
              "logits": out.logits[0], "grid": tuple(model.grid), "embeds": embeds[0]}
    if with_grad:
        result["attentions_graph"] = out.attentions
    return result


def predicting_position(result: dict, answer_index: int = 0) -> int:
    """The position whose next-token prediction is answer token `answer_index` (it sits one
    before the token: causal LMs predict t+1 from t)."""
    return int(result["answer_positions"][answer_index]) - 1


# ---------------------------------------------------------------- raw attention
def image_attention(result: dict, answer_index: int = 0, grid: tuple[int, int] | None = None) -> torch.Tensor:
    """Raw attention [L, H, gh, gw] from the predicting position of answer token
    `answer_index` to the image tokens, laid out on the tower's patch grid (`result["grid"]`,
    i.e. `model.grid`, unless `grid` is given)."""
    gh, gw = grid or result["grid"]
    row = result["attentions"][:, :, predicting_position(result, answer_index)]   # [L, H, T]
    return row[..., result["image_positions"]].reshape(*row.shape[:2], gh, gw)


def attention_mass(result: dict, answer_index: int = 0) -> dict[str, torch.Tensor]:
    """Share of the predicting position's attention on image tokens, question tokens and the
    rest (BOS, template, earlier answer tokens). Each [L, H]; the three sum to 1."""
    row = result["attentions"][:, :, predicting_position(result, answer_index)].float()  # [L, H, T]
    image = row[..., result["image_positions"]].sum(-1)
    question = row[..., result["question_positions"]].sum(-1)
    return {"image": image, "question": question, "other": row.sum(-1) - image - question}


# ---------------------------------------------------------------- relevancy (Chefer et al. 2021)
def relevancy_map(model, tokenizer, question: str, answer: str | list[int], image, answer_index: int = 0,
                  return_all: bool = False):
    """Gradient-weighted attention rollout (Chefer, Gur & Wolf 2021, arXiv 2103.15679) for a
    decoder-only LM. Returns [gh, gw] (non-negative): the relevancy of each image patch for
    answer token `answer_index`.

    Per layer l: A_bar = mean_heads( relu(dy/dA_l * A_l) ), y = the logit of the answer token at
    its predicting position, A_l [H, T, T] the attention probabilities. Rollout:
    R = I; R += A_bar_l @ R for l = 1..L. The map is R[predicting position, image tokens].
    With `return_all=True` also returns (R [T, T], result).
    """
    was_training = model.training
    model.eval()   # dropout off: the attention we weight is the one that was used
    try:
        result = teacher_forced(model, tokenizer, question, answer, image, with_grad=True)
        pos = predicting_position(result, answer_index)
        target = int(result["input_ids"][pos + 1])
        y = result["logits"][pos, target]
        # The eager attention tensors are the softmax outputs used in attn @ V, so they are in
        # the graph; autograd.grad raises if one were not (no silent zero relevancy).
        grads = torch.autograd.grad(y, result["attentions_graph"])
    finally:
        model.train(was_training)
    T = result["input_ids"].shape[0]
    R = torch.eye(T, dtype=torch.float32, device=y.device)
    for a, g in zip(result["attentions_graph"], grads):
        a_bar = (g[0] * a[0].detach()).clamp(min=0).mean(0).float()   # [T, T]
        R = R + a_bar @ R
    gh, gw = result["grid"]
    heat = R[pos, result["image_positions"].to(R.device)].reshape(gh, gw).detach()
    return (heat, R.detach(), result) if return_all else heat


# ---------------------------------------------------------------- display and scoring
def _upsample(heat: torch.Tensor, size_hw: tuple[int, int]) -> torch.Tensor:
    """[gh, gw] -> [H, W] bilinear (each patch's value spread over its pixels)."""
    return F.interpolate(heat.detach().float()[None, None].cpu(), size=size_hw, mode="bilinear",
                         align_corners=False)[0, 0]


def overlay(image, heat: torch.Tensor, alpha: float = 0.5, cmap: str = "jet"):
    """PIL image with `heat` [gh, gw] upsampled (bilinear) to its size, colour-mapped and
    blended in with weight `alpha`. The map is min-max normalized (only its shape matters)."""
    from matplotlib import colormaps
    from PIL import Image
    w, h = image.size
    up = _upsample(heat, (h, w))
    up = (up - up.min()) / (up.max() - up.min()).clamp(min=1e-12)
    rgb = (colormaps[cmap](up.numpy())[..., :3] * 255).astype("uint8")
    return Image.blend(image.convert("RGB"), Image.fromarray(rgb), alpha)


def localization_score(heat: torch.Tensor, box, image_size) -> float:
    """Mass of the normalized map inside `box` [x0, y0, x1, y1] (pixels, end exclusive) divided
    by the box's share of the image; `image_size` is S or (W, H). The map [gh, gw] is upsampled
    to pixels first. 1.0 = no better than uniform; 1/share = all mass in the box."""
    w, h = (image_size, image_size) if isinstance(image_size, int) else image_size
    up = _upsample(heat, (h, w)).clamp(min=0).double()
    up = up / up.sum()
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    x0, x1, y0, y1 = max(x0, 0), min(x1, w), max(y0, 0), min(y1, h)
    share = (x1 - x0) * (y1 - y0) / (w * h)
    if share <= 0:
        raise ValueError(f"box {box} is empty inside a {w}x{h} image")
    return float(up[y0:y1, x0:x1].sum() / share)


@torch.no_grad()
def token_norm_stats(model, tokenizer, images, question: str) -> dict[str, float]:
    """Summary of `lgemma.alignment.token_norms`: mean/std of the L2 norms of visual tokens and
    of the question's text tokens as the LM receives them (text after Gemma's sqrt(hidden)
    scaling, which spliced visual tokens skip), and the ratio of means (visual / text).
    `images`: pixels [B,3,S,S] or features [B,N,Dv]; `question` may hold `<image>`."""
    with torch.no_grad():
        n = token_norms(model, tokenizer, images, remove_image(question) if "<image>" in question else question)
    vis, txt = n["visual"], n["text"]
    return {"visual_mean": vis.mean().item(), "visual_std": vis.std().item(),
            "text_mean": txt.mean().item(), "text_std": txt.std().item(),
            "ratio": (vis.mean() / txt.mean()).item()}


# ---------------------------------------------------------------- what the frozen tower knows
PROBE_ATTRIBUTES = ("shape", "color", "size", "position")


def object_label(obj: dict, attribute: str, grid: tuple[int, int] = (8, 8), image_size: int = 64) -> str:
    """The class of a ShapesWorld object (`scenes.json`'s dict: shape, color, size, cx, cy) for a probe.

    `position` is where the object's center lies *within its patch*: `top-left`, `top-right`,
    `bottom-left` or `bottom-right` quarter of the patch under it. Not its cell of the grid: a probe
    reads the features at the object, and every patch feature carries its own position embedding, so
    the cell (or left/right of the image center) would be read off the embedding by any tower, even an
    untrained one. The offset within the patch is position that only the tower's processing of the
    pixels can tell: how precisely its features localize what they see."""
    if attribute != "position":
        return obj[attribute]
    gh, gw = grid
    fx = obj["cx"] / image_size * gw % 1.0
    fy = obj["cy"] / image_size * gh % 1.0
    return f"{'top' if fy < 0.5 else 'bottom'}-{'left' if fx < 0.5 else 'right'}"


def object_probe(features: dict, scenes: dict, train_ids: list, test_ids: list | dict, attribute: str = "shape",
                 grid: tuple[int, int] = (8, 8), image_size: int = 64, window: int = 3, steps: int = 600,
                 seed: int = 0) -> dict:
    """Do the tower's patch features tell an object's `attribute` (shape, color, size, position)?

    A small MLP reads the `window` x `window` patch features around each object's center
    (`features[image_id]`: [N, Dv] in grid order; `scenes[image_id]`: ShapesWorld's object dicts
    with cx, cy and the attribute; labels from `object_label`). It trains on the objects of
    `train_ids` and is scored on those of `test_ids`. High accuracy here and a low VQA score mean
    the LM, not the tower, fails.
    Returns {"accuracy", "majority" (always the most common training class), "n_test", "classes"};
    with `test_ids` a dict {name: ids} of several test sets, one probe is trained and the result is
    {name: that dict}. Test objects of a class never seen in training count as wrong."""
    gh, gw = grid
    label = lambda o: object_label(o, attribute, grid, image_size)  # noqa: E731
    classes = sorted({label(o) for i in train_ids for o in scenes[i]})
    if len(classes) < 2:
        raise ValueError(f"the training objects have {len(classes)} {attribute!r} class(es): nothing to probe")

    def objects(ids):
        xs, ys = [], []
        for i in ids:
            f = features[i].float().reshape(gh, gw, -1).permute(2, 0, 1)
            f = F.pad(f, [window // 2] * 4).permute(1, 2, 0)        # zero features beyond the border
            for o in scenes[i]:
                r, c = divmod(_token_index(o, grid, image_size), gw)
                xs.append(f[r:r + window, c:c + window].reshape(-1))
                ys.append(classes.index(label(o)) if label(o) in classes else -1)
        if not xs:
            raise ValueError(f"no objects in the {len(ids)} probe images given")
        return torch.stack(xs), torch.tensor(ys)

    x, y = objects(train_ids)
    tests = test_ids if isinstance(test_ids, dict) else {"test": test_ids}
    predict = _fit_probe(x, y, len(classes), steps, seed)
    most = torch.bincount(y, minlength=len(classes)).argmax()
    out = {}
    for name, ids in tests.items():
        xt, yt = objects(ids)
        accuracy = (predict(xt) == yt).float().mean().item()
        out[name] = {"accuracy": round(accuracy, 4), "majority": round((yt == most).float().mean().item(), 4),
                     "n_test": len(yt), "classes": classes}
    return out if isinstance(test_ids, dict) else out["test"]


def scene_record(image_id: str) -> dict:
    """A record for ShapesWorld image `image_id` (e.g. `heldout_000012`), for `ImageSource` / `load_image`."""
    return {"image": f"images/{image_id.split('_')[0]}/{image_id}.png"}


def probe_sets(scenes: dict, n_train: int = 3000) -> tuple[list, dict[str, list], dict]:
    """The probe's image sets on ShapesWorld: the first `n_train` training images; the test sets
    `heldout` (every held-out image's objects) and `compositional` (only the objects whose color-shape
    pair never occurs in training, `shapes.HELDOUT_COMBOS`, in the compositional images); and the
    scenes with the compositional images' other objects left out. Returns (train, tests, scenes)."""
    from .data.shapes import HELDOUT_COMBOS
    unseen = {tuple(p) for p in HELDOUT_COMBOS}
    train = [i for i in scenes if i.startswith("train_")][:n_train]
    tests = {"heldout": [i for i in scenes if i.startswith("heldout_")],
             "compositional": [i for i in scenes if i.startswith("compositional_")]}
    kept = dict(scenes)
    for i in tests["compositional"]:
        kept[i] = [o for o in scenes[i] if (o["color"], o["shape"]) in unseen]
    tests = {k: [i for i in v if kept[i]] for k, v in tests.items()}
    return train, {k: v for k, v in tests.items() if v}, kept


def tower_features(cfg, image_ids: list) -> tuple[dict, tuple[int, int]]:
    """The frozen stage-0 tower of `cfg` (trained if not cached) and its patch features of ShapesWorld
    images {image_id: [N, Dv]}, read from / added to the feature store that training fills."""
    from .pipeline import ImageSource, ensure_stage0, feature_store
    from .vision import build_vision_tower
    weights, _ = ensure_stage0(cfg, progress=False, parts=("vision",))
    tower = build_vision_tower(cfg.vision, weights)
    source = ImageSource(cfg, tower)
    records = {i: scene_record(i) for i in image_ids}
    source.cache(list(records.values()), progress=False, store=feature_store(cfg))
    return {i: source(r) for i, r in records.items()}, tuple(tower.grid)


def tower_probe(cfg, attribute: str = "shape", n_train: int = 3000, test: str = "heldout", **kwargs) -> dict:
    """`object_probe` on a config's frozen stage-0 tower and ShapesWorld data: trained on the
    objects of the first `n_train` training images, scored on `test`: `heldout` (every held-out
    image's objects) or `compositional` (objects of the color-shape pairs never seen in training).
    Uses the feature store that training filled (computes what is missing)."""
    import json
    from pathlib import Path
    scenes = json.loads((Path(cfg.data.root) / "scenes.json").read_text())
    train, tests, scenes = probe_sets(scenes, n_train)
    if test not in tests:
        raise KeyError(f"unknown probe test set {test!r}; this data has {sorted(tests)}")
    features, grid = tower_features(cfg, train + tests[test])
    return object_probe(features, scenes, train, tests[test], attribute, grid, cfg.data.image_size, **kwargs)


def untrained_features(cfg, image_ids: list) -> tuple[dict, tuple[int, int]]:
    """The control for `tower_features`: the same ViT class and size as `cfg`'s tower at its random
    initialization (seeded as stage 0 seeds it), never trained. What a probe reads from it comes from
    the pixels and the architecture alone."""
    from .pipeline import ImageSource
    from .vision import build_vision_tower
    torch.manual_seed(cfg.train.stage0.seed)
    tower = build_vision_tower(cfg.vision)
    source = ImageSource(cfg, tower)
    records = {i: scene_record(i) for i in image_ids}
    source.cache(list(records.values()), progress=False)
    return {i: source(r) for i, r in records.items()}, tuple(tower.grid)


def pair_counts(cfg, split: str = "train") -> "pd.DataFrame":
    """How often each color occurs with each shape among the objects of `split`'s ShapesWorld images
    (colors x shapes). In training, the never-seen pairs are zeros: for those colors, color alone
    rules a shape out, a shortcut any readout trained on this data can take."""
    import json
    from pathlib import Path

    import pandas as pd
    scenes = json.loads((Path(cfg.data.root) / "scenes.json").read_text())
    objs = [o for i, v in scenes.items() if i.startswith(split + "_") for o in v]
    return pd.crosstab(pd.Series([o["color"] for o in objs], name="color"),
                       pd.Series([o["shape"] for o in objs], name="shape"))


def probe_table(configs: dict, attributes=PROBE_ATTRIBUTES, windows=(1, 3), tests=("heldout", "compositional"),
                n_train: int = 3000, untrained: str | None = None, **kwargs) -> list[dict]:
    """`tower_probe` for several towers at once, {label: config}: one row per tower, attribute, window
    and test set {"tower", "attribute", "window", "test", "accuracy", "majority", "n_test"}. One probe
    per (tower, attribute, window) scores every test set; features are computed once per tower.
    `untrained`: also probe, under this label, the first config's ViT at its random initialization
    (`untrained_features`), the control that tells what training added."""
    import json
    from pathlib import Path
    rows = []
    items = list(configs.items()) + ([(untrained, None)] if untrained else [])
    for name, cfg in items:
        control = cfg is None
        cfg = next(iter(configs.values())) if control else cfg
        scenes = json.loads((Path(cfg.data.root) / "scenes.json").read_text())
        train, sets, scenes = probe_sets(scenes, n_train)
        unknown = set(tests) - set(sets)
        if unknown:
            raise KeyError(f"unknown probe test set(s) {sorted(unknown)}; this data has {sorted(sets)}")
        sets = {k: sets[k] for k in tests}
        ids = train + [i for v in sets.values() for i in v]
        features, grid = untrained_features(cfg, ids) if control else tower_features(cfg, ids)
        for attribute in attributes:
            for window in windows:
                res = object_probe(features, scenes, train, sets, attribute, grid, cfg.data.image_size,
                                   window=window, **kwargs)
                rows += [{"tower": name, "attribute": attribute, "window": window, "test": t,
                          **{k: r[k] for k in ("accuracy", "majority", "n_test")}} for t, r in res.items()]
    return rows


# ---------------------------------------------------------------- spatial relations: where is the relation lost?
RELATIONS = ("left", "right", "above", "below")


def spatial_questions(cfg, split: str = "heldout", n: int | None = None, seed: int = 0) -> list[dict]:
    """One "where is A relative to B?" question per ShapesWorld image of `split` that has a clear
    relation between two of its objects (ShapesWorld's own templates and rule). Items:
    {"image_id", "question" (with `<image>`), "answer" (one of `RELATIONS`), "a", "b" (the two objects'
    scene dicts)}; at most `n` of them."""
    import json
    import random
    from pathlib import Path
    from .data.shapes import TEMPLATES, Obj, Scene, _spatial_pairs, ref
    scenes = json.loads((Path(cfg.data.root) / "scenes.json").read_text())
    rng = random.Random(seed)
    out = []
    for image_id, objs in scenes.items():
        if not image_id.startswith(split + "_") or (n is not None and len(out) >= n):
            continue
        scene = Scene([Obj(o["shape"], o["color"], o["size"], o["cx"], o["cy"], o["r"]) for o in objs],
                      cfg.data.image_size)
        pairs = _spatial_pairs(scene)
        if pairs:
            a, b, answer = rng.choice(pairs)
            question = rng.choice(TEMPLATES["spatial"]).format(a=ref(scene, scene.objects[a]),
                                                                b=ref(scene, scene.objects[b]))
            # scene.objects keeps scenes.json's order (sorted left to right when generated)
            out.append({"image_id": image_id, "question": "<image>\n" + question, "answer": answer,
                        "a": objs[a], "b": objs[b]})
    return out


AXIS = {"left": "left/right", "right": "left/right", "above": "above/below", "below": "above/below"}


def spatial_decisions(answers: list[str], truths: list[str], n_objects: list[int]) -> "pd.DataFrame":
    """A spatial answer is two decisions: the *axis* (is A beside B or above/below it?) and the
    *direction* along it (left or right, above or below). With two objects in the image, the axis is
    a property of the image alone (which way the two are apart); which of them is A, and so the
    direction, needs the objects found by their names. With three, both need it. One row per group
    (all questions, then by the image's number of objects): n, accuracy, axis (the answer's axis is
    the true one; an answer that is no relation counts as wrong), direction | axis (right answers
    among those with the right axis), and what always answering the most common axis would score."""
    import pandas as pd
    rows = {}
    for group in ["all", *sorted({f"{k} objects" for k in n_objects})]:
        idx = [i for i, k in enumerate(n_objects) if group in ("all", f"{k} objects")]
        if not idx:  # no spatial question at all
            continue
        right = sum(answers[i] == truths[i] for i in idx)
        axis = sum(AXIS.get(answers[i]) == AXIS[truths[i]] for i in idx)
        common = max(sum(AXIS[truths[i]] == a for i in idx) for a in set(AXIS.values()))
        rows[group] = {"n": len(idx), "accuracy": right / len(idx), "axis": axis / len(idx),
                       "direction | axis": right / axis if axis else float("nan"),
                       "axis, most common": common / len(idx)}
    columns = ["n", "accuracy", "axis", "direction | axis", "axis, most common"]
    return pd.DataFrame(rows, index=columns).T.astype({"n": int})


def spatial_breakdown(model, tokenizer, cfg, split: str = "heldout", source=None) -> "pd.DataFrame":
    """`spatial_decisions` of the model's answers to the spatial questions of an evaluation split (the
    questions behind `metrics.json`'s spatial score). `source`: a `pipeline.ImageSource` (made here if None)."""
    import json
    from .data.shapes import final_answer
    from .evaluation import normalize, predict
    from .pipeline import ImageSource, eval_records
    records = [r for r in eval_records(cfg)[split] if r["question_type"] == "spatial"]
    source = source or ImageSource(cfg, model.vision)
    answers = [normalize(final_answer(a)) for a in predict(model, tokenizer, records, source, progress=False)]
    scenes = json.loads((Path(cfg.data.root) / "scenes.json").read_text())
    n_objects = [len(scenes[Path(r["image"]).stem]) for r in records]
    return spatial_decisions(answers, [normalize(r["answer"]) for r in records], n_objects)


def _token_index(obj: dict, grid: tuple[int, int], image_size: int) -> int:
    """Index of the token (row-major on `grid`) under the object's center."""
    gh, gw = grid
    return min(int(obj["cy"] / image_size * gh), gh - 1) * gw + min(int(obj["cx"] / image_size * gw), gw - 1)


def _token_cells(obj: dict, grid: tuple[int, int], image_size: int) -> list[int]:
    """Indices of the tokens (row-major on `grid`) whose cell overlaps the object's box."""
    gh, gw = grid
    x0, y0, x1, y1 = obj["cx"] - obj["r"], obj["cy"] - obj["r"], obj["cx"] + obj["r"], obj["cy"] + obj["r"]
    ch, cw = image_size / gh, image_size / gw
    return [r * gw + c for r in range(gh) for c in range(gw)
            if c * cw < x1 and (c + 1) * cw > x0 and r * ch < y1 and (r + 1) * ch > y0]


def _fit_probe(x, y, n_classes: int, steps: int = 800, seed: int = 0):
    """A small MLP (features standardized on `x`) trained on (x, y) with AdamW on random batches of 256;
    returns `predict(features) -> class indices`. The probe of `object_probe` and `relation_probe`."""
    mean, std = x.mean(0), x.std(0) + 1e-5
    x = (x - mean) / std
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    mlp = torch.nn.Sequential(torch.nn.Linear(x.shape[1], 256), torch.nn.GELU(), torch.nn.Linear(256, n_classes))
    opt = torch.optim.AdamW(mlp.parameters(), lr=1e-3, weight_decay=0.05)
    with torch.enable_grad():  # callers may hold no_grad
        for _ in range(steps):
            idx = torch.randint(0, len(x), (min(256, len(x)),), generator=g)
            loss = F.cross_entropy(mlp(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()

    @torch.no_grad()
    def predict(features):
        return mlp((features - mean) / std).argmax(1)
    return predict


def _mlp_probe(x, y, xt, yt, steps: int = 800, seed: int = 0) -> float:
    """Accuracy on (xt, yt) of `_fit_probe` trained on (x, y)."""
    return round((_fit_probe(x, y, int(y.max()) + 1, steps, seed)(xt) == yt).float().mean().item(), 3)


@torch.no_grad()
def relation_probe(model, tokenizer, cfg, n_train: int = 1500, steps: int = 800, seed: int = 0) -> dict:
    """Where along the pipeline is the answer to "where is A relative to B?" still there? Small MLP
    probes, trained on questions about training images and scored on held-out ones, read
    - `tower`: the frozen tower's features of the patches under A's and B's centers (concatenated);
    - `connector`: the visual tokens there (what the LM receives);
    - `LM layer k`: the LM's hidden state at the position that predicts the answer, after layer k
      (0: the input embedding);
    for two labels: `relation` (4 classes, `RELATIONS`) and `a_left` (is A in the left half of the
    image: A's position alone). Returns {"relation": {stage: accuracy, "majority": ...}, "a_left":
    {...}, "n_train", "n_test"}. A stage where a label drops to the majority rate has lost it."""
    from .data.collate import build_prompt
    from .pipeline import ImageSource, feature_store
    model.eval()
    source = ImageSource(cfg, model.vision)
    items = {"train": spatial_questions(cfg, "train", n_train, seed), "test": spatial_questions(cfg, "heldout", seed=seed)}
    if not items["train"] or not items["test"]:
        raise ValueError(f"{cfg.data.root}: no images with a clear spatial relation to probe")
    source.cache([scene_record(q["image_id"]) for v in items.values() for q in v], progress=False,
                 store=feature_store(cfg))
    size = cfg.data.image_size
    data = {}
    for split, questions in items.items():
        cols = {"tower": [], "connector": [], "lm": [], "relation": [], "a_left": []}
        for q in questions:
            features = source(scene_record(q["image_id"]))                 # [N, Dv]
            tokens = model.visual_tokens(features[None])[0]                 # [N', Dl]
            ta, tb = (_token_index(q[k], model.vision.grid, size) for k in "ab")
            ca, cb = (_token_index(q[k], model.grid, size) for k in "ab")
            cols["tower"].append(torch.cat([features[ta], features[tb]]).float())
            cols["connector"].append(torch.cat([tokens[ca], tokens[cb]]).float())
            ids = torch.tensor([build_prompt(tokenizer, q["question"], model.num_image_tokens)])
            out = model.lm.model(inputs_embeds=model.embed(ids, features[None]), output_hidden_states=True)
            cols["lm"].append(torch.stack([h[0, -1] for h in out.hidden_states]).float())
            cols["relation"].append(RELATIONS.index(q["answer"]))
            cols["a_left"].append(int(q["a"]["cx"] < size / 2))
        data[split] = {k: torch.stack(v) if k in ("tower", "connector", "lm") else torch.tensor(v)
                       for k, v in cols.items()}
    tr, te = data["train"], data["test"]
    result = {"n_train": len(tr["relation"]), "n_test": len(te["relation"])}
    for label in ("relation", "a_left"):
        y, yt = tr[label], te[label]
        row = {"majority": round((yt == torch.bincount(y).argmax()).float().mean().item(), 3)}
        for stage in ("tower", "connector"):
            row[stage] = _mlp_probe(tr[stage], y, te[stage], yt, steps, seed)
        for layer in range(tr["lm"].shape[1]):
            row[f"LM layer {layer}"] = _mlp_probe(tr["lm"][:, layer], y, te["lm"][:, layer], yt, steps, seed)
        result[label] = row
    return result


@torch.no_grad()
def _prompt_image_attention(model, tokenizer, question: str, pixels: torch.Tensor) -> torch.Tensor:
    """Attention [L, H, N'] of the prompt's last position (the one that predicts the answer's first
    token) on the visual tokens, for `question` (with `<image>`) on `pixels` [3, S, S]. Call it inside
    `eager_attention(model.lm)`."""
    ids = build_prompt(tokenizer, question, model.num_image_tokens)
    out = model.lm.model(inputs_embeds=model.embed(torch.tensor([ids]), pixels[None]), output_attentions=True)
    start = ids.index(tokenizer.convert_tokens_to_ids("<image>"))
    return torch.stack([att[0, :, -1, start:start + model.num_image_tokens] for att in out.attentions])


@torch.no_grad()
def referent_attention(model, tokenizer, cfg, n: int = 100, seed: int = 0) -> dict[str, torch.Tensor]:
    """Does the answer look at the objects the question names? For `n` held-out spatial questions
    ("where is A relative to B?"), the attention of the position that predicts the answer, per
    layer (mean over heads and questions), on the visual tokens covering A, those covering B (and
    not A), and the rest of the image; beside it `uniform`, the share A and B would get if that
    attention were spread evenly over the image. Returns {"A", "B", "rest", "uniform A", "uniform B"}:
    [L] tensors."""
    from .pipeline import ImageSource
    source = ImageSource(cfg, model.vision)
    sums, count, n_img = None, 0, model.num_image_tokens
    with eager_attention(model.lm):
        for q in spatial_questions(cfg, "heldout", n, seed):
            att = _prompt_image_attention(model, tokenizer, q["question"], source(scene_record(q["image_id"])))
            a = _token_cells(q["a"], model.grid, cfg.data.image_size)
            b = [i for i in _token_cells(q["b"], model.grid, cfg.data.image_size) if i not in a]
            w = att.mean(1)                                              # [L, N'] over heads
            wa, wb, total = w[:, a].sum(1), w[:, b].sum(1), w.sum(1)
            t = torch.stack([wa, wb, total - wa - wb, total * len(a) / n_img, total * len(b) / n_img], 1)
            sums = t if sums is None else sums + t
            count += 1
    mean = sums / max(count, 1)
    return {k: mean[:, i] for i, k in enumerate(("A", "B", "rest", "uniform A", "uniform B"))}


@torch.no_grad()
def named_object_attention(model, tokenizer, cfg, types=("color", "shape", "size"), n: int = 60,
                           split: str = "heldout") -> dict[str, dict]:
    """Does the answer single out the object a question names, or look at every object alike? For up
    to `n` questions of each type in `types` about one object of an image with two or more objects
    (the eval records of `split` that carry the object's `box`), the attention of the position that
    predicts the answer, per layer and head: its mean per visual token on the named object, divided
    by its mean per visual token on the other objects. 1 means no preference (the answer could be
    read from a summary of all objects); well above 1, that head finds the named object.
    Returns {type: {"ratio": [L, H] per head, "all heads": [L] (their attention summed), "n": questions}}."""
    import json

    from .pipeline import ImageSource, records as split_records
    scenes = json.loads((Path(cfg.data.root) / "scenes.json").read_text())
    source = ImageSource(cfg, model.vision)
    sums, counts = {}, {}
    with eager_attention(model.lm):
        for r in split_records(cfg, split):
            qtype = r.get("question_type")
            if qtype not in types or counts.get(qtype, 0) >= n or r.get("box") is None:
                continue
            objs = scenes.get(Path(r["image"]).stem, [])
            named = [o for o in objs if list(o["box"]) == list(r["box"])]
            if len(objs) < 2 or len(named) != 1:
                continue
            on = _token_cells(named[0], model.grid, cfg.data.image_size)
            off = sorted({i for o in objs if o is not named[0]
                          for i in _token_cells(o, model.grid, cfg.data.image_size)} - set(on))
            if not on or not off:
                continue
            att = _prompt_image_attention(model, tokenizer, r["conversations"][0]["value"], source(r))
            per_token = torch.stack([att[..., on].mean(-1), att[..., off].mean(-1)], 1)  # [L, 2, H]
            sums[qtype] = per_token if qtype not in sums else sums[qtype] + per_token
            counts[qtype] = counts.get(qtype, 0) + 1
    return {t: {"ratio": sums[t][:, 0] / sums[t][:, 1].clamp_min(1e-12),
                "all heads": sums[t][:, 0].sum(-1) / sums[t][:, 1].sum(-1).clamp_min(1e-12), "n": counts[t]}
            for t in types if t in sums}


def unseen_pair_targets(cfg, records: list[dict]) -> list[bool | None]:
    """For compositional-split records: is the object the question asks about (its `box`) one of the
    color-shape pairs never seen in training (`shapes.HELDOUT_COMBOS`)? None for questions about no
    single object (count, existence, captions)."""
    import json
    from pathlib import Path
    from .data.shapes import HELDOUT_COMBOS
    scenes = json.loads((Path(cfg.data.root) / "scenes.json").read_text())
    out = []
    for r in records:
        objs = scenes.get(Path(r["image"]).stem, [])
        match = [o for o in objs if r.get("box") is not None and o["box"] == r["box"]]
        out.append((match[0]["color"], match[0]["shape"]) in HELDOUT_COMBOS if match else None)
    return out


def pair_answers(model, tokenizer, cfg, splits=("heldout", "compositional"), source=None) -> "pd.DataFrame":
    """The color and shape questions of `splits`, answered: one row per question with its split, type,
    question (lower case), `object` ("unseen pair" or "seen pair": the object asked about), the answer, the prediction, `correct`,
    and `never_seen`: whether the *predicted* attribute makes, with the attribute the question names ("what
    color is the **triangle**?"), a color-shape pair never seen in training. A model that learned the
    question's prior never answers so on any image; one trained against that prior (`debias`) may answer so
    on images where the pair is not there, the price of the fix. `source`: a `pipeline.ImageSource` (made here
    if None)."""
    import pandas as pd

    from .data.shapes import COLORS, HELDOUT_COMBOS, SHAPES
    from .evaluation import normalize, predict
    from .pipeline import ImageSource, eval_records
    source = source or ImageSource(cfg, model.vision)
    rows = []
    for split in splits:
        records = [r for r in eval_records(cfg)[split] if r["question_type"] in ("color", "shape")]
        asks = unseen_pair_targets(cfg, records)
        for r, asked, p in zip(records, asks, predict(model, tokenizer, records, source, progress=False)):
            qtype, words = r["question_type"], remove_image(r["conversations"][0]["value"]).lower().rstrip("?").split()
            named = next((w for w in (SHAPES if qtype == "color" else COLORS) if w in words), None)
            pair = (normalize(p), named) if qtype == "color" else (named, normalize(p))
            rows.append({"split": split, "type": qtype, "question": " ".join(words) + "?",
                         "object": "unseen pair" if asked else "seen pair",
                         "answer": r["answer"], "predicted": p, "correct": normalize(p) == normalize(r["answer"]),
                         "never_seen": named is not None and pair in HELDOUT_COMBOS})
    return pd.DataFrame(rows)


STEP8_RUNS = Path(__file__).resolve().parent.parent / "results" / "step8" / "runs.jsonl"


CHAIN_COLUMNS = {"spatial": "spatial, chain", "both_cells_right": "chain, both cells right",
                 "relation_follows_own_cells": "chain, relation follows own cells"}


def experiment_runs(path=STEP8_RUNS) -> "pd.DataFrame":
    """The committed runs of the Step-8 experiments (`results/step8/`: made with experiment code that is
    not part of lgemma, kept there with its patch and scripts), one row per run: held-out, blind and
    compositional accuracy, accuracy per question type, and color / shape accuracy on the compositional
    split's never-seen pairs and on its seen pairs; for runs recorded with `pair_answers`, the share of held-out
    color / shape questions answered with a never-seen pair (`color, never-seen answers`); for runs trained with `data.locate_fraction`, how often
    their answer to "Where is each object?" names each held-out object with its right column, row and cell
    (`locate cell, 2 objects`: the cell on images of two objects); for runs trained to answer spatial questions
    with both objects' cells first ("circle 1 3, square 4 6, so left"), their own-format scores: `spatial, chain`
    (the word after ", so "; the `spatial` column is lgemma's exact match of the whole answer), `chain, both
    cells right` and `chain, relation follows own cells`; for runs on a `clip_where` tower, its heads' held-out
    scores (`tower column`, `tower row`, `tower color`, `tower shape`) and its `tower stage-0 steps`; and
    `debias weight`: the question prior's weight in stage 2 (`train.instruct.debias_weight`; 0 without `debias`)."""
    import json

    import pandas as pd
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        run = json.loads(line)
        sets = dict(x.split("=", 1) for x in run.get("sets", []) if "=" in x)
        debiased = sets.get("train.instruct.debias", "none") != "none"
        row = {"run": run["name"], "held-out": run["heldout"], "blind": run["blind"], "compositional": run["comp"],
               **run["per_type"],
               "debias weight": float(sets.get("train.instruct.debias_weight", 1.0)) if debiased else 0.0}
        for key, value in run.get("unseen_detail", {}).items():  # "0.012 (n=85)"
            attribute, which = key.split("_")
            row[f"{attribute}, {which} pairs"] = float(value.split()[0])
        for key, value in run.get("never_seen_heldout", {}).items():  # runs recorded with `pair_answers`
            row[f"{key}, never-seen answers"] = float(value.split()[0])
        for key, value in run.get("locate_heldout", {}).items():  # runs trained with `locate` turns
            if key != "objects":
                row[f"locate {key}"] = value
        chain = run.get("spatial_chain", {})  # code/score_cot.py's scores
        row.update({column: chain[key] for key, column in CHAIN_COLUMNS.items() if key in chain})
        row.update({f"tower {key}": value for key, value in run.get("tower", {}).items()})  # clip_where towers
        rows.append(row)
    return pd.DataFrame(rows).set_index("run")
