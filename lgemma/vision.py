"""The vision tower: image -> patch features [B, N, Dv], frozen.

LLaVA's choice, kept here for every backbone: take the hidden states of the *penultimate*
transformer layer (`feature_layer=-2`) and drop the CLS token, so the LM receives one
vector per image patch. The grid shape (`tower.grid`) is derived from the tower, never
hard-coded: 8x8 for `tiny`, 24x24 for ViT-L/14 at 336 px.
"""
from __future__ import annotations

from pathlib import Path

import open_clip
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.model import CLIPTextCfg, CLIPVisionCfg
from PIL import Image
from torch import nn

from .config import VisionConfig
from .data.llava_json import expand_to_square

TINY_TOWERS = ("tiny", "small")          # open_clip ViTs lgemma trains itself (stage 0)
OBJECTIVES = ("clip", "dino", "clip_where")  # how: contrastive on captions, self-supervised, or contrastive +
#                                             what and where each patch's object is (unimodal.py)
CLIP_CONTEXT_LENGTH = 32                 # ShapesWorld captions are short


class WeightsUnavailable(RuntimeError):
    """Pretrained weights could not be loaded (offline, or a missing file)."""


def build_tiny_clip(cfg: VisionConfig) -> open_clip.CLIP:
    """A small open_clip CLIP (image + text towers) for stage-0 contrastive training."""
    vision = CLIPVisionCfg(layers=cfg.layers, width=cfg.width, head_width=cfg.width // cfg.heads,
                           patch_size=cfg.patch_size, image_size=cfg.image_size, mlp_ratio=4.0)
    text = CLIPTextCfg(context_length=CLIP_CONTEXT_LENGTH, width=cfg.width, heads=cfg.heads,
                       layers=2, mlp_ratio=4.0)
    return open_clip.CLIP(embed_dim=cfg.embed_dim, vision_cfg=vision, text_cfg=text)


class VisionTower(nn.Module):
    """Frozen image encoder returning penultimate-layer patch tokens (no CLS).

    `forward(pixel_values [B,3,H,W]) -> [B, N, hidden_size]`; `preprocess(PIL) -> [3,H,W]`.
    """

    def __init__(self, cfg: VisionConfig, encoder: nn.Module, kind: str, mean, std, image_size: int):
        super().__init__()
        self.cfg, self.encoder, self.kind = cfg, encoder, kind
        self.image_size = image_size
        self.mean, self.std = tuple(mean), tuple(std)
        self.transform = open_clip.image_transform(image_size, is_train=False, mean=self.mean, std=self.std)
        if kind == "open_clip":
            patch = encoder.patch_size[0]
            self.hidden_size = encoder.transformer.width
            self.num_layers = len(encoder.transformer.resblocks)
        else:  # transformers towers: dinov2, hf_clip (CLIPVisionModel)
            patch = encoder.config.patch_size
            self.hidden_size = encoder.config.hidden_size
            self.num_layers = encoder.config.num_hidden_layers
        self.grid = (image_size // patch, image_size // patch)
        self.num_patches = self.grid[0] * self.grid[1]
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):
        return super().train(False)  # frozen: dropout and friends stay off

    @property
    def fill_color(self) -> tuple[int, int, int]:
        """LLaVA pads images to square with the tower's mean color."""
        return tuple(int(round(255 * m)) for m in self.mean)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """PIL RGB image -> normalized tensor [3, S, S] (pad to square first, as LLaVA-1.5)."""
        return self.transform(expand_to_square(image.convert("RGB"), self.fill_color))

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] -> [B, N, Dv] features of layer `feature_layer` (patch tokens only)."""
        layer = self.cfg.feature_layer % self.num_layers  # -2 -> penultimate
        if self.kind == "open_clip":
            out = self.encoder.forward_intermediates(
                pixel_values, indices=[layer], stop_early=True, intermediates_only=True, output_fmt="NLC")
            return out["image_intermediates"][0]  # open_clip already split off the CLS token
        out = self.encoder(pixel_values=pixel_values, output_hidden_states=True)
        hidden = out.hidden_states[layer + 1]  # hidden_states[0] is the embedding output
        return hidden[:, -self.num_patches:]   # drop CLS (and DINOv2 register tokens)


def build_vision_tower(cfg: VisionConfig, weights: str | Path | None = None) -> VisionTower:
    """Build the tower named by `cfg.name`.

    - `tiny` / `small`: open_clip ViT from `cfg`; `weights` is the stage-0 safetensors (the tiny CLIP,
      or with `cfg.objective == "dino"` the self-supervised ViT alone: the same class and size).
    - an open_clip model name (`ViT-B-16`, `ViT-L-14`, `ViT-L-14-336`, ...) with
      `cfg.pretrained` a tag (`openai`) or a local weights file; empty -> random init.
    - `dinov2:<hub id or folder>` (e.g. `dinov2:facebook/dinov2-large`) via transformers;
      `dinov2-random:<hub id or folder>` builds the same class from its config, random init.
    - `hf-clip:<hub id or folder>`: transformers' CLIPVisionModel (e.g. `openai/clip-vit-large-patch14-336`,
      the tower of `Intel/llava-gemma-2b`); `lgemma.hf` builds this kind when importing a Llava checkpoint.
    """
    if cfg.objective not in OBJECTIVES:
        raise ValueError(f"unknown vision.objective {cfg.objective!r}: use one of {OBJECTIVES}")
    if cfg.objective != "clip" and cfg.name not in TINY_TOWERS:
        raise ValueError(f"vision.objective {cfg.objective!r} is how stage 0 trains a tower lgemma trains "
                         f"itself ({TINY_TOWERS}), not {cfg.name!r}; a pretrained DINOv2 is 'dinov2:<id>'")
    if cfg.name in TINY_TOWERS:
        clip = build_tiny_clip(cfg)
        if weights is not None:  # stage 0's file: the whole CLIP, or (objective dino) the ViT alone
            from safetensors.torch import load_file
            (clip.visual if cfg.objective == "dino" else clip).load_state_dict(load_file(str(weights)))
        return VisionTower(cfg, clip.visual, "open_clip", OPENAI_DATASET_MEAN, OPENAI_DATASET_STD, cfg.image_size)
    if cfg.name.startswith(("dinov2:", "dinov2-random:")):
        return _dinov2(cfg)
    if cfg.name.startswith("hf-clip:"):
        return _hf_clip(cfg)
    if cfg.name not in open_clip.list_models():
        raise KeyError(f"unknown vision tower {cfg.name!r}: use one of {TINY_TOWERS}, an open_clip "
                       f"model name (e.g. ViT-L-14-336; all: open_clip.list_models()), 'dinov2:<id>' or 'hf-clip:<id>'")
    try:
        model = open_clip.create_model(cfg.name, pretrained=cfg.pretrained or None, require_pretrained=bool(cfg.pretrained))
    except Exception as e:  # open_clip raises RuntimeError on failed downloads
        raise WeightsUnavailable(
            f"could not load weights {cfg.pretrained!r} for vision tower {cfg.name!r} ({e}). Offline? "
            f"On a machine with internet run `python -c \"import open_clip; open_clip.create_model("
            f"'{cfg.name}', pretrained='{cfg.pretrained}')\"` to fill the Hugging Face cache, or set "
            f"vision.pretrained to a local weights file.") from e
    pp = model.visual.preprocess_cfg
    return VisionTower(cfg, model.visual, "open_clip", pp["mean"], pp["std"], model.visual.image_size[0])


def _dinov2(cfg: VisionConfig) -> VisionTower:
    from transformers import AutoConfig, Dinov2Model
    random_init = cfg.name.startswith("dinov2-random:")
    source = cfg.name.split(":", 1)[1]
    try:
        if random_init:
            hf_cfg = AutoConfig.from_pretrained(source) if Path(source).exists() else None
            encoder = Dinov2Model(hf_cfg)
        else:
            encoder = Dinov2Model.from_pretrained(source)
    except OSError as e:
        raise WeightsUnavailable(
            f"could not load DINOv2 {source!r} ({e}). Offline? Download it on a machine with internet "
            f"(`huggingface-cli download {source}`) and set vision.name to 'dinov2:/path/to/folder'.") from e
    size = encoder.config.image_size if cfg.image_size <= 0 else cfg.image_size
    return VisionTower(cfg, encoder, "dinov2", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), size)


# ---------------------------------------------------------------- transformers' CLIP (the LLaVA-1.5 tower)
def hf_clip_tower(encoder, feature_layer: int = -2, mean=OPENAI_DATASET_MEAN, std=OPENAI_DATASET_STD,
                  name: str = "hf-clip") -> VisionTower:
    """Wrap a transformers `CLIPVisionModel` as a VisionTower (kind `hf_clip`): penultimate layer, CLS
    dropped, exactly what transformers' Llava computes with `vision_feature_select_strategy="default"`."""
    c = encoder.config
    cfg = VisionConfig(name=name, image_size=c.image_size, patch_size=c.patch_size, width=c.hidden_size,
                       layers=c.num_hidden_layers, heads=c.num_attention_heads, feature_layer=feature_layer)
    return VisionTower(cfg, encoder, "hf_clip", mean, std, c.image_size)


def _hf_clip(cfg: VisionConfig) -> VisionTower:
    from transformers import CLIPVisionModel
    source = cfg.name.split(":", 1)[1]
    try:
        encoder = CLIPVisionModel.from_pretrained(source, use_safetensors=True)
    except OSError as e:
        raise WeightsUnavailable(
            f"could not load CLIP {source!r} ({e}). Offline? Download it on a machine with internet "
            f"(`huggingface-cli download {source}`) and set vision.name to 'hf-clip:/path/to/folder'.") from e
    return hf_clip_tower(encoder, cfg.feature_layer, name=cfg.name)
