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

Attention is only returned by the *eager* implementation (SDPA/flash fuse the softmax away),
so the LM is switched to eager for the forward and switched back afterwards.
"""
from __future__ import annotations

from contextlib import contextmanager

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
              "logits": out.logits[0], "grid": tuple(model.vision.grid), "embeds": embeds[0]}
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
    i.e. `model.vision.grid`, unless `grid` is given)."""
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
def object_probe(features: dict, scenes: dict, train_ids: list, test_ids: list, attribute: str = "shape",
                 grid: tuple[int, int] = (8, 8), image_size: int = 64, window: int = 3, steps: int = 600,
                 seed: int = 0) -> dict:
    """Do the tower's patch features tell an object's `attribute` (shape, color, size)?

    A small MLP reads the `window` x `window` patch features around each object's center
    (`features[image_id]`: [N, Dv] in grid order; `scenes[image_id]`: ShapesWorld's object dicts
    with cx, cy and the attribute). It trains on the objects of `train_ids` and is scored on those
    of `test_ids`. High accuracy here and a low VQA score mean the LM, not the tower, fails.
    Returns {"accuracy", "majority" (always the most common class), "n_test", "classes"}."""
    gh, gw = grid
    classes = sorted({o[attribute] for i in train_ids for o in scenes[i]})

    def objects(ids):
        xs, ys = [], []
        for i in ids:
            f = features[i].float().reshape(gh, gw, -1).permute(2, 0, 1)
            f = F.pad(f, [window // 2] * 4).permute(1, 2, 0)        # zero features beyond the border
            for o in scenes[i]:
                r = min(int(o["cy"] / image_size * gh), gh - 1)
                c = min(int(o["cx"] / image_size * gw), gw - 1)
                xs.append(f[r:r + window, c:c + window].reshape(-1))
                ys.append(classes.index(o[attribute]) if o[attribute] in classes else -1)
        return torch.stack(xs), torch.tensor(ys)

    (x, y), (xt, yt) = objects(train_ids), objects(test_ids)
    mean, std = x.mean(0), x.std(0) + 1e-5
    x, xt = (x - mean) / std, (xt - mean) / std
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    mlp = torch.nn.Sequential(torch.nn.Linear(x.shape[1], 256), torch.nn.GELU(), torch.nn.Linear(256, len(classes)))
    opt = torch.optim.AdamW(mlp.parameters(), lr=1e-3, weight_decay=0.05)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (min(256, len(x)),), generator=g)
        loss = F.cross_entropy(mlp(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        accuracy = (mlp(xt).argmax(1) == yt).float().mean().item()
    majority = (yt == torch.bincount(y, minlength=len(classes)).argmax()).float().mean().item()
    return {"accuracy": round(accuracy, 4), "majority": round(majority, 4), "n_test": len(yt), "classes": classes}


def tower_probe(cfg, attribute: str = "shape", n_train: int = 3000, **kwargs) -> dict:
    """`object_probe` on a config's frozen stage-0 tower and ShapesWorld data: trained on the
    objects of the first `n_train` training images, scored on every held-out image's objects.
    Uses the feature store that training filled (computes what is missing)."""
    import json
    from pathlib import Path
    from .pipeline import ImageSource, ensure_stage0, feature_store
    from .vision import build_vision_tower
    clip_file, _ = ensure_stage0(cfg, progress=False, parts=("vision",))
    tower = build_vision_tower(cfg.vision, clip_file)
    scenes = json.loads((Path(cfg.data.root) / "scenes.json").read_text())
    train = [i for i in scenes if i.startswith("train_")][:n_train]
    test = [i for i in scenes if i.startswith("heldout_")]
    source = ImageSource(cfg, tower)
    records = {i: {"image": f"images/{i.split('_')[0]}/{i}.png"} for i in train + test}
    source.cache(list(records.values()), progress=False, store=feature_store(cfg))
    features = {i: source(r) for i, r in records.items()}
    return object_probe(features, scenes, train, test, attribute, tower.grid, cfg.data.image_size, **kwargs)
