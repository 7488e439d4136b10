"""The demo's model side, with no Gradio in it: find trained variants, load them once, answer
a question with the probability of every answer token, and draw where the model looked.

    variants = find_variants("runs")                  # {"tiny": Path("runs/tiny"), ...}
    reply = answer(load("runs/tiny"), image, "What color is the circle?")
    reply.text, reply.tokens, reply.seconds          # "red", [("red", 0.93, [...]), ...], 0.04
    explain(load("runs/tiny"), image, reply, "relevancy")   # PIL overlay (Chefer relevancy)
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
import yaml
from PIL import Image

from lgemma.data.collate import build_prompt
from lgemma.data.llava_json import expand_to_square
from lgemma.interpret import image_attention, overlay, relevancy_map, teacher_forced
from lgemma.language import END_TURN
from lgemma.pipeline import load_variant

RUN_FILES = ("model.safetensors", "config.yaml", "metrics.json")
DISPLAY_SIZE = 256  # overlays are drawn on the image enlarged to this many pixels


def find_variants(runs_dir: str | Path) -> dict[str, Path]:
    """Every trained variant in `runs_dir`: the sub-folders holding all of RUN_FILES."""
    runs = Path(runs_dir)
    found = sorted(d for d in runs.iterdir() if d.is_dir() and all((d / f).is_file() for f in RUN_FILES)) \
        if runs.is_dir() else []
    return {d.name: d for d in found}


@lru_cache(maxsize=8)
def load(run_dir: Path):
    """(model, tokenizer, config) of a variant, loaded on first use and kept afterwards."""
    return load_variant(run_dir)


def info(run_dir: Path) -> str:
    """Markdown summary of a variant: what it is, how long it trained, how well it answers."""
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    m = json.loads((run_dir / "metrics.json").read_text())
    v, lm, t = cfg["vision"], cfg["language"], cfg["train"]
    seconds = m.get("train_seconds", {})
    pope = m.get("pope", {}).get("all", {})
    rows = [
        ("vision tower", f"{v['name']}: ViT {v['layers']} layers, width {v['width']}, {v['image_size']} px"),
        ("language model", f"{lm['name']}: Gemma {lm['layers']} layers, hidden {lm['hidden_size']}"),
        ("connector", cfg["connector"]["kind"]),
        ("stage 1 (align)", "skipped" if t["skip_align"] else f"{t['align']['steps']} steps"),
        ("stage 2 (instruct)", f"{t['instruct']['steps']} steps"),
        ("training time", " + ".join(f"{k} {s:.0f} s" for k, s in seconds.items() if k != "total")),
        ("held-out accuracy", _fmt(m.get("overall_accuracy"))),
        ("blind (no image)", _fmt(m.get("blind_accuracy"))),
        ("compositional", _fmt(m.get("compositional_accuracy"))),
        ("POPE F1", _fmt(pope.get("f1"))),
    ]
    return "\n".join(f"- **{k}**: {v}" for k, v in rows)


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


@dataclass
class Reply:
    text: str
    token_ids: list[int]
    tokens: list[tuple[str, float, list[tuple[str, float]]]]  # (token, its probability, top 3)
    seconds: float


@torch.no_grad()
def answer(variant, image: Image.Image, question: str, max_new_tokens: int = 48) -> Reply:
    """Greedy answer to `question` about `image`, with each answer token's probability."""
    model, tokenizer, _ = variant
    t0 = time.perf_counter()
    ids = torch.tensor([build_prompt(tokenizer, "<image>\n" + question, model.num_image_tokens)])
    pixels = model.vision.preprocess(image)[None]
    stop = [tokenizer.convert_tokens_to_ids(END_TURN), tokenizer.eos_token_id]
    out = model.generate(ids, torch.ones_like(ids), pixels, max_new_tokens=max_new_tokens, stop_token_ids=stop,
                         output_scores=True, return_dict_in_generate=True)
    seconds = time.perf_counter() - t0
    new = out.sequences[0].tolist()
    tokens = []
    for token, scores in zip(new, out.scores):
        p = scores[0].float().softmax(-1)
        top = p.topk(3)
        tokens.append((tokenizer.decode([token]), p[token].item(),
                       [(tokenizer.decode([i]), q) for i, q in zip(top.indices.tolist(), top.values.tolist())]))
    return Reply(tokenizer.decode(new, skip_special_tokens=True).strip(), new, tokens, seconds)


def explain(variant, image: Image.Image, question: str, reply: Reply, method: str = "relevancy",
            layer: int | None = None) -> tuple[Image.Image, str]:
    """Where the model looked to produce the reply's first token: `relevancy` (Chefer et al.,
    all layers) or raw `attention` of one LM layer (None: mean of the layers), heads averaged.
    Returns the overlay on the padded, enlarged image and a caption saying what it shows."""
    model, tokenizer, _ = variant
    question = "<image>\n" + question
    token = repr(reply.tokens[0][0])
    if method == "relevancy":
        heat = relevancy_map(model, tokenizer, question, reply.token_ids, image)
        caption = f"relevancy of the image patches for {token} (all layers)"
    else:
        maps = image_attention(teacher_forced(model, tokenizer, question, reply.token_ids, image))  # [L,H,gh,gw]
        if layer is None:
            heat, caption = maps.mean((0, 1)), f"attention to the image when producing {token}, mean of layers"
        else:
            layer = min(layer, len(maps) - 1)  # variants may have fewer layers than asked for
            heat, caption = maps[layer].mean(0), f"attention to the image when producing {token}, layer {layer + 1}"
    square = expand_to_square(image, model.vision.fill_color).resize((DISPLAY_SIZE,) * 2, Image.Resampling.NEAREST)
    return overlay(square, heat), caption
