"""The self-supervised tiny tower (vision.objective: dino, preset tiny-dino): the ViT forward it trains
through, its loss falling, its patch features beating an untrained tower's, and the preset end to end."""
import json
import math

import pytest
import torch
from PIL import Image

from lgemma import unimodal
from lgemma.config import VisionConfig, get_preset
from lgemma.vision import build_tiny_clip, build_vision_tower

SMALL = dict(width=32, layers=2, heads=2, embed_dim=32)


def test_vit_tokens_is_the_vit_forward_and_masks_only_what_it_is_told():
    visual = build_tiny_clip(VisionConfig(**SMALL)).visual.eval()
    x = torch.randn(3, 3, 64, 64)
    tokens = unimodal.vit_tokens(visual, x)
    assert tokens.shape == (3, 65, 32)
    torch.testing.assert_close(tokens[:, 0] @ visual.proj, visual(x))          # CLS, as open_clip pools it
    mask = torch.zeros(3, 8, 8, dtype=torch.bool)
    mask[0, 2:4, 2:5] = True
    masked = unimodal.vit_tokens(visual, x, mask, torch.zeros(32))
    torch.testing.assert_close(masked[1:], tokens[1:])                        # unmasked images: unchanged
    assert not torch.allclose(masked[0], tokens[0])
    # a masked patch no longer depends on its pixels (only on where it is)
    x2 = x.clone()
    x2[0, :, 16:32, 16:40] = torch.randn(3, 16, 24)
    torch.testing.assert_close(unimodal.vit_tokens(visual, x2, mask, torch.zeros(32))[0], masked[0])
    with pytest.raises(ValueError, match="mask_token"):
        unimodal.vit_tokens(visual, x, mask)


def test_two_views_keep_colors_sizes_and_orientation():
    """The only augmentation is a shift: the views are the image translated, nothing recolored,
    flipped or rescaled (the section's comment in unimodal.py says why)."""
    torch.manual_seed(0)
    image = torch.zeros(3, 64, 64)
    image[:, 20:30, 24:40] = torch.tensor([0.9, 0.2, 0.1])[:, None, None]   # a red 10x16 box
    for view in unimodal.TwoViews(image[None])[0]:
        assert view.shape == image.shape
        box = (view[0] > 0.5).nonzero()
        (y0, x0), (y1, x1) = box.min(0).values.tolist(), box.max(0).values.tolist()
        assert (y1 - y0 + 1, x1 - x0 + 1) == (10, 16)                           # size and orientation kept
        assert abs(y0 - 20) <= unimodal.DINO_SHIFT and abs(x0 - 24) <= unimodal.DINO_SHIFT
        torch.testing.assert_close(view[:, y0, x0], image[:, 20, 24])          # its color, exactly


@pytest.fixture(scope="module")
def dino_run(world, tmp_path_factory):
    """The DINO tower of `tiny-dino`, narrowed, trained a few dozen steps on the small world (seconds)."""
    from lgemma.data.llava_json import load_records
    cfg = get_preset("tiny-dino")
    cfg.vision.width, cfg.vision.layers, cfg.vision.heads = 64, 3, 4
    cfg.data.root = str(world)
    cfg.train.stage0.dino_steps, cfg.train.stage0.dino_batch_size, cfg.train.stage0.dino_lr = 120, 32, 1e-3
    tower = build_vision_tower(cfg.vision)
    out = tmp_path_factory.mktemp("dino")
    recs = load_records(world / "captions.json")
    load = lambda r: tower.preprocess(Image.open(world / r["image"]))  # noqa: E731
    info = unimodal.pretrain_vision_dino(cfg, recs, load, out)
    return cfg, out, info, load


def test_dino_loss_falls_and_stage0_writes_its_files(dino_run):
    import csv
    cfg, out, info, _ = dino_run
    rows = [r for r in csv.DictReader((out / "logs" / "version_0" / "metrics.csv").open()) if r.get("train_loss")]
    assert len(rows) >= 5
    # The total does not simply fall: the teacher's temperature warms up over 30% of the steps, which
    # raises the targets' entropy. What shows learning: the DINO term leaves log K, the cross-entropy
    # between a uniform teacher and a uniform student (or a collapsed pair) where it starts.
    dino = [float(r["dino_loss"]) for r in rows]
    assert dino[-1] < math.log(unimodal.DINO_PROTOTYPES) - 0.5, dino
    assert dino[-1] < dino[0] - 0.5, dino                                   # and it fell from its first log
    assert info["steps"] == 120 and info["seconds"] > 0 and 0 <= info["heldout_large_shape_probe"] <= 1
    assert json.loads((out / "info.json").read_text()) == info
    # the weights load into the same open_clip ViT class and size as the CLIP-style tower's
    tower = build_vision_tower(cfg.vision, out / "dino.safetensors")
    assert tower.kind == "open_clip" and tower.grid == (8, 8) and tower(torch.zeros(1, 3, 64, 64)).shape == (1, 64, 64)


def test_dino_makes_views_of_one_image_agree(dino_run, world):
    """What self-distillation trains for: two shifted views of one image get the same CLS embedding,
    and different images different ones. Retrieval of each image's second view by its first (cosine,
    among 64 held-out images) beats the same ViT at its random initialization, seeded as stage 0 seeds
    it. (Stage 0's own quality number, `dino_probe`, needs the full world: 120 images are too few.)"""
    from lgemma.data.llava_json import load_records
    cfg, out, info, load = dino_run
    images = torch.stack([load(r) for r in load_records(world / "captions.json")][:64])
    torch.manual_seed(1)
    v1, v2 = (torch.stack(v) for v in zip(*(unimodal.TwoViews(images)[i] for i in range(len(images)))))

    def retrieval(visual):
        with torch.no_grad():
            a, b = (torch.nn.functional.normalize(unimodal.vit_tokens(visual.eval(), v)[:, 0], dim=-1) for v in (v1, v2))
        return ((a @ b.T).argmax(1) == torch.arange(len(a))).float().mean().item()

    torch.manual_seed(cfg.train.stage0.seed)
    before = retrieval(build_tiny_clip(cfg.vision).visual)
    after = retrieval(build_vision_tower(cfg.vision, out / "dino.safetensors").encoder)
    assert after > before + 0.1, (after, before)


def test_objective_is_checked_and_keeps_older_cache_keys():
    from lgemma.pipeline import stage0_dirs
    with pytest.raises(ValueError, match="unknown vision.objective 'mae'"):
        build_vision_tower(VisionConfig(objective="mae", **SMALL))
    with pytest.raises(ValueError, match="dinov2:<id>"):
        build_vision_tower(VisionConfig(name="ViT-B-16", objective="dino"))
    clip, dino = get_preset("tiny"), get_preset("tiny-dino")
    assert stage0_dirs(clip)[1] == stage0_dirs(dino)[1]                     # the same LM
    assert stage0_dirs(clip)[0] != stage0_dirs(dino)[0] and "-dino-" in stage0_dirs(dino)[0].name
    before = stage0_dirs(clip)[0]
    del clip.vision.objective            # as configs were before the field existed (class default "clip")
    assert "objective" not in vars(clip.vision) and stage0_dirs(clip)[0] == before


def test_tiny_dino_preset_trains_end_to_end_fast(tmp_path, monkeypatch):
    from lgemma import cli
    from lgemma.pipeline import get_config, load_variant, stage0_dirs
    monkeypatch.setenv("LGEMMA_FAST", "1")
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", "tiny-dino"]) == 0
    cfg = get_config("tiny-dino")
    vision_dir = stage0_dirs(cfg)[0]
    assert (vision_dir / "dino.safetensors").exists() and not (vision_dir / "clip.safetensors").exists()
    assert json.loads((vision_dir / "info.json").read_text())["steps"] == cfg.train.stage0.dino_steps
    assert list(vision_dir.glob("features-*.safetensors"))                   # frozen features, stored once
    m = json.loads((cfg.run_dir / "metrics.json").read_text())
    assert {"overall_accuracy", "blind_accuracy", "compositional_accuracy"} <= set(m)
    model, _, saved = load_variant(cfg.run_dir)
    assert saved.vision.objective == "dino" and model.num_image_tokens == 64
