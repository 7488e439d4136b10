"""The vision tower: penultimate-layer patch tokens, grid from the tower, clear offline errors."""
import pytest
import torch

from lgemma.config import VisionConfig
from lgemma.connector import build_connector
from lgemma.vision import WeightsUnavailable, build_vision_tower


def test_tiny_tower_gives_penultimate_patch_tokens():
    cfg = VisionConfig(width=32, layers=3, heads=2, embed_dim=32)
    tower = build_vision_tower(cfg)
    assert tower.grid == (8, 8) and tower.num_patches == 64 and tower.hidden_size == 32
    x = torch.randn(2, 3, 64, 64)
    feats = tower(x)
    assert feats.shape == (2, 64, 32)
    # reference: run the blocks by hand and stop after the penultimate one, drop CLS
    enc = tower.encoder
    h = enc._embeds(x)
    for blk in enc.transformer.resblocks[:-1]:
        h = blk(h)
    assert torch.allclose(feats, h[:, 1:], atol=1e-6)
    assert not any(p.requires_grad for p in tower.parameters())


def test_named_open_clip_model_random_init_grid_from_tower():
    tower = build_vision_tower(VisionConfig(name="ViT-B-16", pretrained=""))
    assert tower.grid == (14, 14) and tower.hidden_size == 768 and tower.image_size == 224


def test_named_model_offline_gives_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsUnavailable, match="ViT-B-16.*Offline"):
        build_vision_tower(VisionConfig(name="ViT-B-16", pretrained="openai"))


def test_unknown_tower_lists_choices():
    with pytest.raises(KeyError, match="ViT-L-14-336"):
        build_vision_tower(VisionConfig(name="vit-huge-typo"))


def test_preprocess_pads_to_square_and_resizes():
    from PIL import Image
    tower = build_vision_tower(VisionConfig(width=32, layers=2, heads=2, embed_dim=32))
    wide = Image.new("RGB", (100, 50), (255, 0, 0))
    x = tower.preprocess(wide)
    assert x.shape == (3, 64, 64)
    assert not torch.allclose(x[:, 0, 32], x[:, 32, 32])  # top rows are padding, centre is red


@pytest.mark.parametrize("kind,n_params", [("linear", 32 * 64 + 64), ("mlp2x_gelu", 32 * 64 + 64 + 64 * 64 + 64),
                                           ("conv_mlp", 9 * 32 * 64 + 64 + 64 * 64 + 64)])
def test_connectors(kind, n_params):
    c = build_connector(kind, 32, 64)
    assert c(torch.randn(2, 16, 32)).shape == (2, 16, 64)
    assert sum(p.numel() for p in c.parameters()) == n_params
    with pytest.raises(KeyError, match="mlp2x_gelu"):
        build_connector("mlp3x", 32, 64)


def test_conv_connector_reads_each_patch_neighbourhood():
    """A feature on patch (row 3, col 5) of an 8x8 grid moves exactly the 3x3 tokens around it,
    in the patches' row-major order; a grid that is not square is refused."""
    c = build_connector("conv_mlp", 4, 8)
    x = torch.zeros(1, 64, 4)
    base = c(x)
    x[0, 3 * 8 + 5] = 1.0
    moved = (c(x) - base).abs().sum(-1)[0] > 1e-6
    assert moved.nonzero().flatten().tolist() == [r * 8 + col for r in (2, 3, 4) for col in (4, 5, 6)]
    with pytest.raises(ValueError, match="square grid"):
        c(torch.zeros(1, 60, 4))


def test_pooled_conv_connector_makes_one_token_per_2x2_patches():
    """connector.pool=2: 8x8 patches -> 4x4 tokens in row-major order; a feature on patch (3, 5)
    reaches the tokens whose 2x2 cell its 3x3 neighbourhood touches; the model counts 16 tokens."""
    c = build_connector("conv_mlp", 4, 8, pool=2)
    x = torch.zeros(1, 64, 4)
    base = c(x)
    assert base.shape == (1, 16, 8)
    x[0, 3 * 8 + 5] = 1.0
    moved = (c(x) - base).abs().sum(-1)[0] > 1e-6
    # neighbourhood rows 2-4, cols 4-6 -> token rows 1-2, token cols 2-3
    assert moved.nonzero().flatten().tolist() == [r * 4 + col for r in (1, 2) for col in (2, 3)]
    with pytest.raises(ValueError, match="pool"):
        c(torch.zeros(1, 49, 4))            # 7x7 patches: 2 does not divide 7
    with pytest.raises(ValueError, match="conv_mlp"):
        build_connector("mlp2x_gelu", 4, 8, pool=2)
