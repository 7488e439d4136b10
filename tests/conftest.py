"""Shared fixtures: a small ShapesWorld, a tokenizer trained on it, and random tiny models.
Nothing here downloads anything; everything is built in a few seconds."""
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """A small generated ShapesWorld folder."""
    from lgemma.data.shapes import generate
    root = tmp_path_factory.mktemp("shapesworld")
    generate(root, seed=0, n_train=120, n_heldout=20, n_compositional=20, image_size=64, progress=False)
    return root


@pytest.fixture(scope="session")
def tokenizer(world):
    from lgemma.data.llava_json import load_records, turns
    from lgemma.language import train_tokenizer
    texts = [q + "\n" + a for f in ("captions.json", "instruct_train.json")
             for r in load_records(world / f) for q, a in turns(r)]
    return train_tokenizer(texts, 400)


def tiny_cfg():
    from lgemma.config import get_preset
    cfg = get_preset("tiny")
    cfg.vision.width, cfg.vision.layers, cfg.vision.heads, cfg.vision.embed_dim = 32, 3, 2, 32
    cfg.language.hidden_size, cfg.language.layers, cfg.language.intermediate_size = 32, 2, 64
    cfg.language.heads, cfg.language.kv_heads = 2, 1
    cfg.connector.kind = "mlp2x_gelu"  # LLaVA-1.5's (the tiny preset's conv_mlp has no transformers Llava layout)
    return cfg


@pytest.fixture
def tiny_model(tokenizer):
    """A random-init LlavaGemma (tiny ViT + tiny Gemma) and its tokenizer."""
    from lgemma.language import IMAGE_TOKEN, tiny_gemma
    from lgemma.model import LlavaGemma
    from lgemma.vision import build_vision_tower
    cfg = tiny_cfg()
    torch.manual_seed(0)
    model = LlavaGemma(build_vision_tower(cfg.vision), tiny_gemma(cfg.language, len(tokenizer)),
                       tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), cfg.connector.kind)
    return model, tokenizer
