"""Measuring stage 1: has the connector put images where the frozen LM can read them?

"Aligning" a frozen vision tower with a frozen LM means training only the connector so that
its outputs, spliced in place of `<image>`, make the LM predict the right caption. We
measure that directly, with the LM as the judge:

- `caption_logprobs`: log p(caption | image) for every image x caption pair, teacher-forced
  through the full model (the same spans and labels as training, from `build_sample`);
- `retrieval_accuracy`: how often each image's own caption scores highest (chance 1/n);
- `nearest_vocab`: which word embeddings the projected patches point towards (cosine);
- `token_norms`: how long visual tokens are compared with text tokens as the LM receives
  them. Gemma multiplies token embeddings by sqrt(hidden_size); in transformers 5 that
  happens inside the embedding module, so spliced visual tokens are *not* scaled (the
  transformers-4.38 code LLaVA-Gemma used scaled `inputs_embeds`, visual tokens included).

Plus small helpers for the notebooks: `load_stage` (a model with its connector after a
given stage) and `caption_set` (held-out images with their canonical captions).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from .data.collate import IGNORE_INDEX, build_sample, collate

CAPTION_PROMPT = "<image>\nDescribe the image concisely."  # one of stage 1's caption prompts
STAGES = ("random", "align", "instruct")


# ---------------------------------------------------------------- models and data
def load_stage(cfg, stage: str):
    """(model, tokenizer) as it stands after `stage` of `cfg`'s run (trained beforehand):

    - `random`:   stage-0 tower and LM, connector freshly initialised (as training starts);
    - `align`:    the same with the stage-1 connector (LM still the frozen stage-0 LM);
    - `instruct`: the finished variant (stage-2 connector and LM).
    """
    from safetensors.torch import load_file

    from .pipeline import build_model, load_variant
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; use one of {STAGES}")
    if stage == "instruct":
        model, tokenizer, _ = load_variant(cfg.run_dir)
        return model, tokenizer
    model, tokenizer = build_model(cfg, progress=False)
    if stage == "align":
        weights = Path(cfg.run_dir) / "align" / "trained.safetensors"
        if not weights.exists():
            raise FileNotFoundError(f"{weights} not found: variant {cfg.name!r} has no finished stage 1 "
                                    f"(skip_align={cfg.train.skip_align}); train it with train_variant(cfg)")
        model.load_state_dict(load_file(str(weights)), strict=False)
    return model.eval(), tokenizer


def caption_set(cfg, split: str = "heldout", n: int = 20) -> list[dict]:
    """The first `n` images of a ShapesWorld split with distinct canonical captions, as
    records {"id", "image", "caption"} (image paths relative to the data root)."""
    from .data.shapes import Obj, Scene, describe
    scenes = json.loads((Path(cfg.data.root) / "scenes.json").read_text())
    out, seen = [], set()
    for image_id, objs in scenes.items():
        if not image_id.startswith(split + "_"):
            continue
        scene = Scene([Obj(**{k: o[k] for k in ("shape", "color", "size", "cx", "cy", "r")}) for o in objs],
                      cfg.data.image_size)
        caption = describe(scene)
        if caption not in seen:
            seen.add(caption)
            out.append({"id": image_id, "image": f"images/{split}/{image_id}.png", "caption": caption})
        if len(out) == n:
            break
    if not out:
        raise ValueError(f"no images of split {split!r} in {cfg.data.root}/scenes.json")
    return out


# ---------------------------------------------------------------- caption retrieval
@torch.no_grad()
def caption_logprobs(model, tokenizer, images: torch.Tensor, captions: list[str], prompt: str = CAPTION_PROMPT,
                     batch_size: int = 64, per_token: bool = False) -> torch.Tensor:
    """log p(caption + <end_of_turn> | prompt with image) for every pair -> [n_images, n_captions].

    `images`: pixels [n,3,S,S] or tower features [n,N,Dv] (the tower runs once). Sums token
    log-probabilities (`per_token=True`: their mean). Uses the model's own forward with labels,
    so exactly the tokens that carry stage-1 loss are scored.
    """
    model.eval()
    features = model.vision(images) if images.dim() == 4 else images
    samples = [build_sample(tokenizer, [(prompt, c)], model.num_image_tokens) for c in captions]
    pairs = [(i, j) for i in range(len(features)) for j in range(len(captions))]
    scores = torch.empty(len(features), len(captions))
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        batch = collate([{"input_ids": torch.tensor(samples[j].input_ids), "labels": torch.tensor(samples[j].labels)}
                         for _, j in chunk], tokenizer.pad_token_id)
        imgs = features[[i for i, _ in chunk]]
        _, logits = model(batch["input_ids"], batch["attention_mask"], batch["labels"], imgs)
        targets = batch["labels"][:, 1:]
        keep = targets != IGNORE_INDEX                                  # as in LlavaGemma.forward
        token_lp = logits.float().log_softmax(-1).gather(1, targets[keep][:, None]).squeeze(1)  # [M]
        rows = keep.nonzero()[:, 0]
        total = torch.zeros(len(chunk)).index_add_(0, rows, token_lp)
        if per_token:
            total = total / keep.sum(1)
        for (i, j), s in zip(chunk, total):
            scores[i, j] = s
    return scores


def retrieval_accuracy(scores: torch.Tensor, truth_idx) -> float:
    """Fraction of rows of `scores` [n_queries, n_candidates] whose argmax is `truth_idx[row]`."""
    truth = torch.as_tensor(truth_idx)
    if len(truth) != len(scores):
        raise ValueError(f"truth_idx has {len(truth)} entries but scores has {len(scores)} rows")
    return (scores.argmax(1) == truth).float().mean().item()


def accuracy_difference(p1: float, n1: int, p2: float, n2: int, z: float = 1.96) -> tuple[float, float]:
    """(p1 - p2, half-width of its ~95% normal-approximation interval) for two accuracies
    measured on n1 and n2 questions. A difference smaller than the half-width is noise."""
    se = math.sqrt(p1 * (1 - p1) / max(n1, 1) + p2 * (1 - p2) / max(n2, 1))
    return p1 - p2, z * se


# ---------------------------------------------------------------- where visual tokens land
@dataclass
class Neighbours:
    """k nearest vocabulary entries of M vectors: ids [M,k], cosine [M,k], tokens (M lists of k)."""
    ids: torch.Tensor
    cosine: torch.Tensor
    tokens: list[list[str]]


@torch.no_grad()
def nearest_vocab(model, tokenizer, visual_tokens: torch.Tensor, k: int = 5, skip_special: bool = True) -> Neighbours:
    """Nearest rows of the LM's input embedding matrix [V, Dl] by cosine similarity, for
    vectors [..., Dl] (flattened to [M, Dl]). Cosine ignores length, so Gemma's sqrt(hidden)
    scale does not matter here. Special tokens (`<image>`, `<pad>`, ...) are skipped by default."""
    table = model.lm.get_input_embeddings().weight.float()
    v = visual_tokens.reshape(-1, table.shape[1]).float()
    cos = torch.nn.functional.normalize(v, dim=-1) @ torch.nn.functional.normalize(table, dim=-1).T  # [M, V]
    if skip_special:
        cos[:, [i for i in tokenizer.all_special_ids if i < cos.shape[1]]] = -float("inf")
    top = cos.topk(k, dim=-1)
    tokens = [[tokenizer.decode([i]) for i in row] for row in top.indices.tolist()]
    return Neighbours(top.indices, top.values, tokens)


def embedding_scale(lm) -> float:
    """The factor Gemma's embedding module multiplies token embeddings by (sqrt(hidden_size));
    1.0 for an embedding that does not scale."""
    emb = lm.get_input_embeddings()
    scale = getattr(emb, "scalar_embed_scale", None)
    if scale is None and hasattr(emb, "embed_scale"):
        scale = float(emb.embed_scale)
    return float(scale) if scale is not None else 1.0


@torch.no_grad()
def token_norms(model, tokenizer, images: torch.Tensor, text: str) -> dict[str, torch.Tensor]:
    """L2 norms of what the decoder receives, per token:

    - `visual` [B*N]: visual tokens as spliced today (transformers 5: not scaled);
    - `visual_scaled` [B*N]: the same times sqrt(hidden), as transformers 4.38 (LLaVA-Gemma's
      code) fed them, since it scaled all of `inputs_embeds` after the splice;
    - `text` [T]: token embeddings of `text` as the LM receives them (scaled);
    - `text_unscaled` [T]: the raw rows of the embedding matrix.
    """
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
    if len(ids) == 0:
        raise ValueError("text must hold at least one token")
    emb = model.lm.get_input_embeddings()
    visual = model.visual_tokens(images).reshape(-1, emb.weight.shape[1]).float()
    scale = embedding_scale(model.lm)
    return {"visual": visual.norm(dim=-1), "visual_scaled": (visual * scale).norm(dim=-1),
            "text": emb(ids).float().norm(dim=-1), "text_unscaled": emb.weight[ids].float().norm(dim=-1)}
