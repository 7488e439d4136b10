"""Configs as plain dataclasses, named presets, YAML in and out.

A run is fully described by one `Config`: which vision tower, connector and language model
to build, and how to train them. Presets are an explicit dict (no registry, no substring
matching): `get_preset("tiny")`; an unknown name raises and lists the known ones.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml


@dataclass
class DataConfig:
    """Where the data comes from. `kind: shapes` generates ShapesWorld into `root`;
    `kind: llava` reads LLaVA-1.5 json files (paths relative to `root`)."""
    kind: str = "shapes"
    root: str = "data/generated/shapesworld-s0"
    seed: int = 0
    image_size: int = 64            # generated size; each tower resizes to its own input size
    n_train: int = 6000
    n_heldout: int = 300
    n_compositional: int = 200
    caption_file: str = "captions.json"
    instruct_file: str = "instruct_train.json"
    eval_files: dict = field(default_factory=lambda: {
        "heldout": "instruct_heldout.json", "compositional": "instruct_compositional.json"})
    image_folder: str = ""          # image paths in the json are relative to root/image_folder
    pad_to_square: bool = True      # LLaVA-1.5 `image_aspect_ratio: pad`
    max_length: int = 256           # longer samples are truncated (and counted, never dropped)


@dataclass
class VisionConfig:
    """A frozen image encoder. `name` is `tiny`/`small` (open_clip ViTs lgemma trains itself in
    stage 0), an open_clip model name such as `ViT-L-14-336`, or `dinov2:<hub id or folder>`."""
    name: str = "tiny"
    pretrained: str = ""            # open_clip pretrained tag (e.g. "openai") or a weights file
    image_size: int = 64            # 8x8 patches of 8 px (48 px loses too much shape detail)
    patch_size: int = 8
    width: int = 128
    layers: int = 4
    heads: int = 4
    embed_dim: int = 128            # CLIP joint embedding size (stage 0 only)
    feature_layer: int = -2         # LLaVA: penultimate layer
    drop_cls: bool = True           # LLaVA: patch tokens only


@dataclass
class ConnectorConfig:
    """The only part trained in stage 1: `linear` or LLaVA-1.5's `mlp2x_gelu`."""
    kind: str = "mlp2x_gelu"


@dataclass
class LanguageConfig:
    """The language model. `name` is `tiny`/`small` (Gemma architecture trained from scratch in
    stage 0) or a hub id / local folder of a Gemma checkpoint (the size fields are then unused)."""
    name: str = "tiny"
    hidden_size: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 1
    intermediate_size: int = 512
    vocab_size: int = 1024          # tiny tokenizers are trained to at most this size
    max_position_embeddings: int = 512


@dataclass
class StageConfig:
    """One training stage (LLaVA stage 1 `align` or stage 2 `instruct`)."""
    steps: int = 300
    batch_size: int = 32
    lr: float = 1e-3                # the connector's learning rate
    lm_lr: float = 0.0              # the LM's; 0 -> LM frozen (stage 1)
    warmup_ratio: float = 0.03      # LLaVA: 3% warmup, then cosine
    weight_decay: float = 0.0
    grad_clip: float = 1.0


@dataclass
class Stage0Config:
    """Unimodal pretraining of the tiny towers (LLaVA assumes both come pretrained)."""
    clip_steps: int = 200
    clip_batch_size: int = 128
    clip_lr: float = 1e-3
    lm_steps: int = 300
    lm_batch_size: int = 32
    lm_lr: float = 3e-3


@dataclass
class TrainConfig:
    seed: int = 0
    skip_align: bool = False        # the paper's "no pretrained connector" variant
    align: StageConfig = field(default_factory=lambda: StageConfig(steps=250, lr=1e-3))
    instruct: StageConfig = field(default_factory=lambda: StageConfig(steps=800, lr=2e-3, lm_lr=2e-3))
    stage0: Stage0Config = field(default_factory=Stage0Config)
    cache_features: bool = True     # frozen tower: compute its features once
    precision: str = "32-true"
    strategy: str = "auto"
    devices: int | str = 1
    accumulate_grad_batches: int = 1
    num_workers: int = 0


@dataclass
class Config:
    name: str = "tiny"
    data: DataConfig = field(default_factory=DataConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    connector: ConnectorConfig = field(default_factory=ConnectorConfig)
    language: LanguageConfig = field(default_factory=LanguageConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    runs_dir: str = "runs"

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self, path: str | Path | None = None) -> str:
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        return _build(cls, d, "config")

    @classmethod
    def from_yaml(cls, path: str | Path) -> "Config":
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"config file {path} does not exist")
        d = yaml.safe_load(path.read_text()) or {}
        if not isinstance(d, dict):
            raise ValueError(f"{path}: expected a mapping at the top level, got {type(d).__name__}")
        return _build(cls, d, str(path))


def _build(cls, d: dict, where: str):
    """Dataclass from a nested dict; unknown keys raise (a typo must not be ignored)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(d) - set(fields)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {sorted(unknown)} for {cls.__name__}; "
                         f"known: {sorted(fields)}")
    kwargs = {}
    for k, v in d.items():
        sub = _dataclass_type(cls, k)
        kwargs[k] = _build(sub, v, f"{where}.{k}") if sub and isinstance(v, dict) else v
    return cls(**kwargs)


def _dataclass_type(cls, name: str):
    default = cls.__dataclass_fields__[name]
    value = default.default_factory() if default.default_factory is not dataclasses.MISSING else None
    return type(value) if dataclasses.is_dataclass(value) else None


# ---------------------------------------------------------------- presets
def _tiny() -> Config:
    return Config(name="tiny")


def _tiny_noalign() -> Config:
    c = _tiny()
    c.name, c.train.skip_align = "tiny-noalign", True
    return c


def _small_vision(c: Config) -> Config:
    c.vision = VisionConfig(name="small", width=192, layers=6, heads=6, embed_dim=192)
    return c


def _small_lm(c: Config) -> Config:
    c.language = LanguageConfig(name="small", hidden_size=192, layers=6, heads=6, kv_heads=1,
                                intermediate_size=768)
    return c


def _renamed(c: Config, name: str, skip_align: bool = False) -> Config:
    c.name, c.train.skip_align = name, skip_align
    return c


PRESETS = {
    "tiny": _tiny,
    "tiny-noalign": _tiny_noalign,
    "tiny-vsmall": lambda: _renamed(_small_vision(_tiny()), "tiny-vsmall"),
    "tiny-lmsmall": lambda: _renamed(_small_lm(_tiny()), "tiny-lmsmall"),
    "small": lambda: _renamed(_small_lm(_small_vision(_tiny())), "small"),
}


def get_preset(name: str) -> Config:
    """A fresh copy of a named preset; raises with the list of known names."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    return copy.deepcopy(PRESETS[name]())


def load_config(name_or_path: str) -> Config:
    """A preset name or a YAML file path."""
    if name_or_path.endswith((".yaml", ".yml")) or Path(name_or_path).is_file():
        return Config.from_yaml(name_or_path)
    return get_preset(name_or_path)
