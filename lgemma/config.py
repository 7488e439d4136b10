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
    questions_per_image: int = 4    # question turns per training conversation (of 6 types + describe)
    locate_fraction: float = 0.0    # share of training conversations with a `locate` turn ("where is each object?")
    spatial_turns: int = 0          # > 0: that many spatial turns in every training conversation that can have one
    spatial_answer: str = "word"    # training answers to spatial questions: "word" ("left") or "chain"
    #                                 ("circle 1 3, square 4 6, so left": lgemma.data.shapes.spatial_chain)
    caption_file: str = "captions.json"
    instruct_file: str = "instruct_train.json"
    eval_files: dict = field(default_factory=lambda: {
        "heldout": "instruct_heldout.json", "compositional": "instruct_compositional.json"})
    image_folder: str = ""          # image paths in the json are relative to root/image_folder
    pad_to_square: bool = True      # LLaVA-1.5 `image_aspect_ratio: pad`
    max_length: int = 256           # longer samples are truncated (and counted, never dropped)
    eval_max_questions: int = 0     # 0: every eval question; else a fixed random subset per split (slow LMs)


@dataclass
class VisionConfig:
    """A frozen image encoder. `name` is `tiny`/`small` (open_clip ViTs lgemma trains itself in
    stage 0), an open_clip model name such as `ViT-L-14-336`, or `dinov2:<hub id or folder>`.
    `objective` is how stage 0 trains a tiny/small tower: `clip` (contrastive, on captions),
    `dino` (self-supervised on the images alone, DINOv2-style: the paper's other kind of tower) or
    `clip_where` (contrastive, plus every patch token trained to say which object covers it and where
    that object is, from ShapesWorld's scene labels: `lgemma.unimodal.where_labels`)."""
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
    objective: str = "clip"         # stage 0 of tiny/small: "clip" (captions), "dino" (images only) or
    #                                 "clip_where" (captions + each patch's object and that object's cell)


@dataclass
class ConnectorConfig:
    """The only part trained in stage 1: `linear`, LLaVA-1.5's `mlp2x_gelu`, or `conv_mlp` (each
    visual token reads its patch's 3x3 neighbourhood; `pool: 2` makes one token of 2x2 patches)."""
    kind: str = "mlp2x_gelu"
    pool: int = 1


@dataclass
class LanguageConfig:
    """The language model. `name` is `tiny`/`small` (Gemma architecture trained from scratch in
    stage 0), `gemma3-270m` (the real Gemma 3 270M, bundled as GGUF) or a hub id / local folder of
    a Gemma checkpoint (the size fields are then unused)."""
    name: str = "tiny"
    hidden_size: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 1
    intermediate_size: int = 512
    vocab_size: int = 1024          # tiny tokenizers are trained to at most this size
    max_position_embeddings: int = 512
    attention: str = "sdpa"         # transformers' attn_implementation: "sdpa", "eager" (tiny LMs in bf16 on a CPU),
    #                                 "eager_float32" (lgemma.language: eager's arithmetic in float32 under bf16), ...
    activation: str = "gelu_pytorch_tanh"  # tiny/small: the MLP's (Gemma's tanh GELU; "silu", Llama's: faster on CPUs)


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
    lm_train: str = "full"          # when lm_lr > 0: "full" (every LM weight) or "lora" (low-rank adapters)
    lora_rank: int = 16
    debias: str = "none"            # stage 2: "question_prior" trains in product with the question-only prior (debias.py)
    debias_weight: float = 1.0      # the prior's exponent in that product (0: no debiasing; 1: the full prior)


@dataclass
class Stage0Config:
    """Unimodal pretraining of the tiny towers (LLaVA assumes both come pretrained). Its own
    seed: variants that differ only in `train.seed` share one stage 0, as LLaVA runs share CLIP."""
    seed: int = 0
    clip_steps: int = 200
    clip_batch_size: int = 128
    clip_lr: float = 1e-3
    dino_steps: int = 200           # the self-supervised tower (vision.objective: dino), two views per image
    dino_batch_size: int = 64
    dino_lr: float = 2e-3
    precision: str = "32-true"      # of stage 0 ("auto": as train.precision); the tiny presets use "auto"
    lm_steps: int = 300
    lm_batch_size: int = 32
    lm_lr: float = 3e-3


@dataclass
class TrainConfig:
    seed: int = 0
    skip_align: bool = False        # the paper's "no pretrained connector" variant
    align: StageConfig = field(default_factory=lambda: StageConfig(steps=250, lr=1e-3))
    instruct: StageConfig = field(default_factory=lambda: StageConfig(steps=1600, lr=2e-3, lm_lr=2e-3))
    stage0: Stage0Config = field(default_factory=Stage0Config)
    cache_features: bool = True     # frozen tower: compute its features once
    # Budget curve: evaluate during stage 2 after these fractions of its steps (e.g. [0.0625, 0.125,
    # 0.25, 0.5, 1.0]) on a fixed subset of `curve_questions` questions per eval split -> instruct/curve.json
    curve_points: list = field(default_factory=list)
    curve_questions: int = 400
    # Lightning's Trainer settings. Global batch = stage batch_size x devices x num_nodes x accumulate_grad_batches.
    precision: str = "auto"         # "auto": bf16-mixed on GPUs and CPUs with native bf16, else 32-true
    strategy: str = "auto"          # "ddp", "fsdp", "deepspeed_stage_2" (needs `pip install deepspeed`), ...
    devices: int | str = 1
    num_nodes: int = 1              # machines, each with `devices` GPUs (launched by torchrun or SLURM: README)
    accumulate_grad_batches: int = 1
    num_workers: int = 0            # DataLoader workers (image decoding, at paper scale)
    activation_checkpointing: str = "off"  # "selective" / "full": less LM activation memory, more compute (model.py)


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
    c = Config(name="tiny")
    # The one departure from LLaVA-1.5's recipe: a connector that reads each patch's 3x3
    # neighbourhood. The tiny ViT's patches do not each know their object's shape, and the 1M-
    # parameter LM learns only slowly to assemble it from several tokens (README, "what make train does").
    c.connector.kind = "conv_mlp"
    c.language.attention = "eager"  # in bf16 on a CPU, 1.5x faster steps than sdpa at this size (benchmarks/tiny_step.py)
    c.train.stage0.precision = "auto"
    return c


def _tiny_dino() -> Config:
    """The tiny preset with the self-supervised tower: the same ViT class and size, trained in stage 0
    on the images alone (DINOv2-style, `lgemma/unimodal.py`) instead of contrastively on captions."""
    c = _tiny()
    c.name, c.vision.objective = "tiny-dino", "dino"
    return c


def _tiny_noalign() -> Config:
    c = _tiny()
    c.name, c.train.skip_align = "tiny-noalign", True
    return c


def small_vision() -> VisionConfig:
    """The `small` tiny-world tower: the paper's "stronger vision backbone" axis."""
    return VisionConfig(name="small", width=192, layers=6, heads=6, embed_dim=192)


def small_language() -> LanguageConfig:
    """The `small` tiny-world Gemma: the paper's 2B -> 7B axis."""
    return LanguageConfig(name="small", hidden_size=192, layers=6, heads=6, kv_heads=1, intermediate_size=768,
                          attention="eager")


def _small_vision(c: Config) -> Config:
    c.vision = small_vision()
    return c


def _small_lm(c: Config) -> Config:
    c.language = small_language()
    return c


def _renamed(c: Config, name: str, skip_align: bool = False) -> Config:
    c.name, c.train.skip_align = name, skip_align
    return c


def _gemma3_270m() -> Config:
    """The tiny ViT with the real, pretrained Gemma 3 270M (bundled GGUF). A 270M LM on a 2-core
    CPU is ~70x slower per sample than the tiny one, so: bf16 autocast, a short stage 1, and a
    short stage 2 that trains LoRA adapters (not the 168M-parameter embedding), and evaluation
    on a fixed subset of 200 questions per split."""
    c = _tiny()
    c.name = "gemma3-270m"
    c.connector = ConnectorConfig()  # LLaVA-1.5's mlp2x_gelu, as the paper (the tiny LM's conv_mlp: see _tiny)
    c.train.stage0 = Stage0Config()  # the float32 stage-0 tower its README numbers were measured with
    c.language = LanguageConfig(name="gemma3-270m")
    c.data.eval_max_questions = 200
    c.train.precision = "bf16-mixed"
    c.train.align = StageConfig(steps=30, batch_size=16, lr=1e-3)
    c.train.instruct = StageConfig(steps=100, batch_size=8, lr=1e-3, lm_lr=5e-4, lm_train="lora", lora_rank=16)
    return c


# LLaVA-1.5's recipe (Liu et al. 2023; LLaVA-Gemma kept it): stage 1 trains the connector
# (lr 1e-3, global batch 256, 1 epoch of the 558K captions), stage 2 the connector and LM
# (lr 2e-5, global batch 128, 1 epoch of the 665K instruct mix); cosine with 3% warmup; bf16.
LLAVA_PRETRAIN_RECORDS, LLAVA_INSTRUCT_RECORDS = 558_128, 665_298


def _paper(name: str, lm: str, vision: str, skip_align: bool = False) -> Config:
    """A paper-scale preset: 8 GPUs x per-device batch 32 (stage 1) / 16 (stage 2) gives LLaVA's
    global batch; on fewer GPUs raise `train.accumulate_grad_batches` to keep it."""
    devices = 8
    if vision == "clip":
        # OpenAI's CLIP ViT-L/14 at 336 px, 24x24 = 576 patch tokens. open_clip's plain `ViT-L-14-336`
        # would use GELU, but OpenAI trained with QuickGELU: the `-quickgelu` config matches the weights.
        v = VisionConfig(name="ViT-L-14-336-quickgelu", pretrained="openai")
    else:  # DINOv2-L at the same 336 px: 24x24 patches of 14 px, the same 576 tokens as CLIP
        v = VisionConfig(name="dinov2:facebook/dinov2-large", image_size=336, patch_size=14)
    steps = lambda records, batch: -(-records // batch)  # one epoch  # noqa: E731
    return Config(
        name=name,
        data=DataConfig(kind="llava", root="data/llava", caption_file="blip_laion_cc_sbu_558k.json",
                        instruct_file="llava_v1_5_mix665k.json", image_folder="images", eval_files={},
                        pad_to_square=True, max_length=2048),
        vision=v,
        connector=ConnectorConfig(kind="mlp2x_gelu"),
        language=LanguageConfig(name=lm),
        train=TrainConfig(
            skip_align=skip_align,
            align=StageConfig(steps=steps(LLAVA_PRETRAIN_RECORDS, 256), batch_size=256 // devices, lr=1e-3),
            instruct=StageConfig(steps=steps(LLAVA_INSTRUCT_RECORDS, 128), batch_size=128 // devices, lr=2e-5,
                                 lm_lr=2e-5),
            cache_features=False,   # 558K x 576 x 1024 features would not fit anywhere
            precision="bf16-mixed", devices=devices, num_workers=4,
            activation_checkpointing="full",  # as LLaVA-1.5's scripts (--gradient_checkpointing True)
            # 2B: data parallel fits an 80 GB GPU; 7B (~34 GB of fp32 weights, x4 with Adam): shard it.
            # find_unused_parameters: the 665K mix has text-only samples, and a batch of only those
            # leaves the connector without gradients, which plain ddp treats as an error.
            strategy="fsdp" if "7b" in lm else "ddp_find_unused_parameters_true"),
    )


PRESETS = {
    "tiny": _tiny,
    "tiny-noalign": _tiny_noalign,
    "tiny-dino": _tiny_dino,
    "tiny-vsmall": lambda: _renamed(_small_vision(_tiny()), "tiny-vsmall"),
    "tiny-lmsmall": lambda: _renamed(_small_lm(_tiny()), "tiny-lmsmall"),
    "small": lambda: _renamed(_small_lm(_small_vision(_tiny())), "small"),
    "gemma3-270m": _gemma3_270m,
    "paper-2b-clip": lambda: _paper("paper-2b-clip", "google/gemma-2b-it", "clip"),
    "paper-2b-clip-noalign": lambda: _paper("paper-2b-clip-noalign", "google/gemma-2b-it", "clip", skip_align=True),
    "paper-7b-clip": lambda: _paper("paper-7b-clip", "google/gemma-7b-it", "clip"),
    "paper-2b-dinov2": lambda: _paper("paper-2b-dinov2", "google/gemma-2b-it", "dinov2"),
    "paper-7b-dinov2": lambda: _paper("paper-7b-dinov2", "google/gemma-7b-it", "dinov2"),
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
