"""The whole recipe, cached step by step: data -> stage 0 -> stage 1 -> stage 2 -> eval.

Each step writes its output once and is skipped when the output exists, so notebooks, the
CLI and the demo all call `train_variant(cfg)` ("load if cached, else train").

    runs/stage0/vision-<name>-<hash>/   tiny CLIP (stage 0), shared by every variant using it
    runs/stage0/lm-<name>-<hash>/       tiny Gemma + tokenizer (stage 0)
    runs/<variant>/align/               stage 1: connector weights, CSV logs, resume checkpoint
    runs/<variant>/instruct/            stage 2: connector + LM weights, logs, checkpoint
    runs/<variant>/config.yaml, model.safetensors, metrics.json
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import lightning as L
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .config import Config, load_config
from .data.collate import LlavaDataset
from .data.llava_json import load_image, load_records
from .language import IMAGE_TOKEN, TINY_LMS, add_lora, load_language_model
from .model import LlavaGemma
from .training import stage0_precision
from .vision import TINY_TOWERS, build_vision_tower


# ---------------------------------------------------------------- fast mode
def fast_mode() -> bool:
    """`LGEMMA_FAST=1`: tiny data and few steps, for tests and quick looks (results are poor)."""
    return os.environ.get("LGEMMA_FAST", "") not in ("", "0")


def apply_fast(cfg: Config) -> Config:
    d, t = cfg.data, cfg.train
    d.n_train, d.n_heldout, d.n_compositional = 400, 40, 40
    d.root = d.root.rstrip("/") + "-fast"
    t.stage0.clip_steps, t.stage0.lm_steps, t.stage0.clip_batch_size = 20, 20, 64
    t.stage0.dino_steps, t.stage0.dino_batch_size = 20, 32
    t.align.steps, t.instruct.steps = 10, 20
    t.align.batch_size = t.instruct.batch_size = 16
    if cfg.language.name not in TINY_LMS:  # a real LM (gemma3-270m) is ~70x slower per sample on a CPU
        t.align.steps, t.instruct.steps, t.align.batch_size, t.instruct.batch_size = 1, 2, 4, 4
        d.eval_files = {k: v for k, v in d.eval_files.items() if k == "heldout"} or d.eval_files
        d.eval_max_questions = 8
    cfg.runs_dir = cfg.runs_dir.rstrip("/") + "-fast"
    return cfg


def get_config(name_or_path: str, overrides: list[str] = ()) -> Config:
    """Preset or YAML, then fast mode if `LGEMMA_FAST=1`, then `key.sub=value` overrides (an
    explicit override wins). Relative data and run folders are resolved against `LGEMMA_HOME`
    when it is set (the notebooks set it to the project root, so they share `make train`'s caches)."""
    import yaml
    cfg = load_config(name_or_path)
    cfg = apply_fast(cfg) if fast_mode() else cfg
    for item in overrides:
        key, _, value = item.partition("=")
        if not _:
            raise ValueError(f"override {item!r} must look like section.key=value, e.g. train.instruct.steps=400")
        *path, last = key.split(".")
        node = cfg
        for i, p in enumerate([*path, last]):
            if not dataclasses.is_dataclass(node) or not hasattr(node, p):
                raise ValueError(f"override {item!r}: {type(node).__name__} has no field {p!r}")
            if i < len(path):
                node = getattr(node, p)
        setattr(node, last, _typed(item, node, last, yaml.safe_load(value)))
    return resolve_home(cfg)


def _typed(item: str, node, field: str, new):
    """An override's value in its field's declared type: YAML reads `1e-3` as a string and `2`
    as an int, but a learning rate is a float. Raises on a value of the wrong kind."""
    kind = str(type(node).__dataclass_fields__[field].type)  # "float", "int", "bool", "int | str", ...
    try:
        if kind == "float" and not isinstance(new, bool):
            return float(new)
        if kind == "int" and not isinstance(new, bool) and float(new) == int(float(new)):
            return int(float(new))
    except (TypeError, ValueError):
        pass
    if kind in ("float", "int") or (kind == "bool" and not isinstance(new, bool)):
        raise ValueError(f"override {item!r}: {field} must be {'an' if kind == 'int' else 'a'} {kind}, got {new!r}")
    return new


def resolve_home(cfg: Config) -> Config:
    """Make relative data and run folders relative to `LGEMMA_HOME` (if set)."""
    home = Path(os.environ.get("LGEMMA_HOME", "."))
    cfg.data.root = str(home / cfg.data.root)
    cfg.runs_dir = str(home / cfg.runs_dir)
    return cfg


# ---------------------------------------------------------------- data
def ensure_data(cfg: Config, progress: bool = True) -> Path:
    """Generate ShapesWorld into `cfg.data.root` unless it is there; check LLaVA files exist."""
    root = Path(cfg.data.root)
    if cfg.data.kind == "llava":
        for f in [cfg.data.caption_file, cfg.data.instruct_file, *cfg.data.eval_files.values()]:
            if f and not (root / f).exists():
                raise FileNotFoundError(f"{root / f} not found: see data/README.md for getting the LLaVA-1.5 files")
        return root
    marker = root / "summary.json"
    if marker.exists():
        summary = json.loads(marker.read_text())
        for key, default in (("locate_fraction", 0.0), ("spatial_turns", 0), ("spatial_answer", "word")):
            made, asked = summary.get(key, default), getattr(cfg.data, key)
            if made != asked:
                raise ValueError(f"{root} was generated with data.{key}={made}, but the config asks for {asked}: "
                                 f"set data.root to a new folder (e.g. --set data.root={root}-{key}) or delete {root}")
    else:
        from .data.shapes import generate
        d = cfg.data
        summary = generate(root, seed=d.seed, n_train=d.n_train, n_heldout=d.n_heldout,
                           n_compositional=d.n_compositional, image_size=d.image_size,
                           questions_per_image=d.questions_per_image, locate_fraction=d.locate_fraction,
                           spatial_turns=d.spatial_turns, spatial_answer=d.spatial_answer, progress=progress)
        marker.write_text(json.dumps(summary, indent=2))
    return root


def records(cfg: Config, which: str) -> list[dict]:
    """`captions`, `instruct`, or an eval split name, read through the LLaVA loader."""
    files = {"captions": cfg.data.caption_file, "instruct": cfg.data.instruct_file, **cfg.data.eval_files}
    if which not in files:
        raise KeyError(f"unknown record set {which!r}; known: {sorted(files)}")
    return load_records(Path(cfg.data.root) / files[which])


def eval_records(cfg: Config, limit: int | None = None) -> dict[str, list[dict]]:
    """Every eval split's records; with `data.eval_max_questions` (or `limit`) a fixed random subset
    of each (seeded, in file order), so that slow LMs are evaluated in minutes on the same questions."""
    import random
    out = {k: records(cfg, k) for k in cfg.data.eval_files}
    limit = cfg.data.eval_max_questions if limit is None else limit
    if limit:
        out = {k: [v[i] for i in sorted(random.Random(cfg.data.seed).sample(range(len(v)), min(limit, len(v))))]
               for k, v in out.items()}
    return out


def heldout_captions(cfg: Config) -> list[dict]:
    """Captions of held-out images (ShapesWorld writes them) for stage 0's retrieval check; for
    other data, the first 500 training captions (then it measures fit, not generalization)."""
    path = Path(cfg.data.root) / "captions_heldout.json"
    return load_records(path) if path.exists() else records(cfg, "captions")[:500]


class ImageSource:
    """record -> pixels [3,S,S] (or, once `cache` ran, the frozen tower's features [N,Dv])."""

    def __init__(self, cfg: Config, tower):
        self.root = Path(cfg.data.root) / cfg.data.image_folder
        self.tower, self.features = tower, {}

    def pixels(self, rec: dict) -> torch.Tensor:
        return self.tower.preprocess(load_image(self.root / rec["image"], f"record {rec.get('id')!r}"))

    def __call__(self, rec: dict) -> torch.Tensor:
        f = self.features.get(rec["image"])
        return f if f is not None else self.pixels(rec)

    @torch.no_grad()
    def cache(self, recs: list[dict], batch_size: int = 256, progress: bool = True, store: Path | None = None) -> None:
        """Run the frozen tower once over every image of `recs`. With `store` (a safetensors
        file), features computed before are read from it and new ones added to it, so runs
        that share a frozen tower (the ablation grid, the demo) compute them only once."""
        if store is not None and store.exists() and not self.features:
            self.features.update(load_file(str(store)))
        todo = sorted({r["image"]: r for r in recs if "image" in r and r["image"] not in self.features}.items())
        for i in tqdm(range(0, len(todo), batch_size), desc="vision features", disable=not progress, leave=False):
            chunk = todo[i:i + batch_size]
            feats = self.tower(torch.stack([self.pixels(r) for _, r in chunk]))
            self.features.update({k: f.clone() for (k, _), f in zip(chunk, feats)})
        if store is not None and todo:
            tmp = store.with_suffix(f".tmp{os.getpid()}")
            save_file({k: v.contiguous() for k, v in self.features.items()}, str(tmp))
            os.replace(tmp, store)  # atomic: a reader never sees half a file


# ---------------------------------------------------------------- stage 0
def _hash(*parts) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:8]


def stage0_dirs(cfg: Config) -> tuple[Path, Path]:
    """Folders of the stage-0 vision tower and LM; the hash covers everything they depend on."""
    d, s0, base = cfg.data, cfg.train.stage0, Path(cfg.runs_dir) / "stage0"
    data_key = (Path(d.root).name, d.seed, d.n_train, d.image_size, s0.seed)  # not where it lives
    if d.questions_per_image != 4:  # (appended only when changed, so older cache keys stay valid)
        data_key += (d.questions_per_image,)
    precision = stage0_precision(cfg)
    if precision != "32-true":       # bf16 training gives (slightly) different weights
        data_key += (precision,)
    language_key = {k: v for k, v in vars(cfg.language).items() if k != "attention"}  # how it runs, not what it is
    if cfg.language.activation == "gelu_pytorch_tanh":  # came later: left out at its default (older keys stay valid)
        language_key.pop("activation", None)
    # vision.objective came later: left out of the key at its default, so older cache keys stay valid
    vision_key = {k: v for k, v in vars(cfg.vision).items() if not (k == "objective" and v == "clip")}
    if cfg.vision.objective == "dino":
        vision = base / f"vision-{cfg.vision.name}-dino-{_hash(data_key, vision_key, s0.dino_steps, s0.dino_batch_size, s0.dino_lr)}"
    else:
        vision = base / f"vision-{cfg.vision.name}-{_hash(data_key, vision_key, s0.clip_steps, s0.clip_batch_size, s0.clip_lr)}"
    if d.locate_fraction:  # `locate` turns change the LM's text, not the tower's images and captions
        data_key += (("locate", d.locate_fraction),)
    if d.spatial_turns or d.spatial_answer != "word":  # so do the spatial turns
        data_key += (("spatial", d.spatial_turns, d.spatial_answer),)
    lm = base / f"lm-{cfg.language.name}-{_hash(data_key, language_key, s0.lm_steps, s0.lm_batch_size, s0.lm_lr, d.max_length)}"
    return vision, lm


def ensure_stage0(cfg: Config, progress: bool = True, parts=("vision", "language")) -> tuple[Path | None, Path | None]:
    """Train the tiny vision tower and/or tiny LM unless cached (only those in `parts`).
    Returns (tower weights, LM folder); None for parts that come pretrained from elsewhere."""
    from . import unimodal
    ensure_data(cfg, progress)
    vision_dir, lm_dir = stage0_dirs(cfg)
    dino = cfg.vision.objective == "dino"  # the self-supervised tower (images only) instead of the CLIP
    clip_file = vision_dir / ("dino.safetensors" if dino else "clip.safetensors")
    if "vision" in parts and cfg.vision.name in TINY_TOWERS and not clip_file.exists():
        tower = build_vision_tower(cfg.vision)
        src = ImageSource(cfg, tower)
        if dino:
            print(f"stage 0: self-supervised (DINOv2-style) pretraining of the {cfg.vision.name} ViT -> {vision_dir}")
            info = unimodal.pretrain_vision_dino(cfg, records(cfg, "captions"), src.pixels, vision_dir)
            print(f"stage 0: vision done in {info['seconds']} s, shape of held-out large objects from the patch at "
                  f"their center {info.get('heldout_large_shape_probe')}")
        else:
            print(f"stage 0: contrastive pretraining of the {cfg.vision.name} CLIP -> {vision_dir}")
            info = unimodal.pretrain_vision(cfg, records(cfg, "captions"), src.pixels, heldout_captions(cfg), vision_dir)
            print(f"stage 0: vision done in {info['seconds']} s, held-out retrieval top-1 {info['heldout_retrieval_top1']}")
        for stale in vision_dir.glob("features-*.safetensors"):  # features of an earlier tower
            stale.unlink()
    if "language" in parts and cfg.language.name in TINY_LMS and not (lm_dir / "info.json").exists():
        print(f"stage 0: pretraining the {cfg.language.name} Gemma on ShapesWorld text -> {lm_dir}")
        info = unimodal.pretrain_language(cfg, records(cfg, "captions"), records(cfg, "instruct"), lm_dir)
        print(f"stage 0: LM done in {info['seconds']} s ({info['parameters']:,} parameters)")
    return (clip_file if cfg.vision.name in TINY_TOWERS else None,
            lm_dir if cfg.language.name in TINY_LMS else None)


def feature_store(cfg: Config) -> Path | None:
    """Where the frozen features of a stage-0 tower on this dataset are kept (None for towers
    that come pretrained from elsewhere: their features are recomputed per run)."""
    if cfg.vision.name not in TINY_TOWERS or cfg.data.kind != "shapes":
        return None
    vision_dir, _ = stage0_dirs(cfg)
    return vision_dir / f"features-{Path(cfg.data.root).name}.safetensors"


# ---------------------------------------------------------------- model
def build_model(cfg: Config, progress: bool = True) -> tuple[LlavaGemma, object]:
    """Vision tower + fresh connector + LM, from stage-0 outputs or pretrained checkpoints."""
    clip_file, lm_dir = ensure_stage0(cfg, progress) if (cfg.vision.name in TINY_TOWERS or
                                                         cfg.language.name in TINY_LMS) else (None, None)
    tower = build_vision_tower(cfg.vision, clip_file)
    lm, tokenizer = load_language_model(cfg.language, lm_dir)
    torch.manual_seed(cfg.train.seed)
    model = LlavaGemma(tower, lm, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), cfg.connector.kind, cfg.connector.pool)
    model.checkpoint_activations(cfg.train.activation_checkpointing)  # acts in training only
    if cfg.train.instruct.lm_train == "lora":  # no-op adapters until stage 2 trains them
        add_lora(model.lm, cfg.train.instruct.lora_rank)
    return model, tokenizer


def load_variant(run_dir: str | Path) -> tuple[LlavaGemma, object, Config]:
    """A trained variant from `runs/<variant>/` (config.yaml + model.safetensors)."""
    run_dir = Path(run_dir)
    if not (run_dir / "model.safetensors").exists():
        raise FileNotFoundError(f"{run_dir} holds no trained model (model.safetensors): train it with "
                                f"`lgemma train {run_dir.name}`")
    cfg = Config.from_yaml(run_dir / "config.yaml")
    # runs_dir is where the run's stage 0 lives: for a nested name ("ablation/<run>") that is two
    # folders up, not the parent (a run folder moved under another name: its parent)
    name = Path(cfg.name)
    nested = run_dir.parts[-len(name.parts):] == name.parts
    cfg.runs_dir = str(run_dir.parents[len(name.parts) - 1] if nested else run_dir.parent)
    cfg.data.root = resolve_home(copy.deepcopy(cfg)).data.root
    model, tokenizer = build_model(cfg, progress=False)
    unexpected = model.load_state_dict(load_file(str(run_dir / "model.safetensors")), strict=False).unexpected_keys
    if unexpected:  # the file holds only trained weights (missing keys are normal), but none may be left over
        raise ValueError(f"{run_dir / 'model.safetensors'} holds weights this config's model lacks "
                         f"({', '.join(unexpected[:3])}, ...): was config.yaml edited?")
    return model.eval(), tokenizer, cfg


# ---------------------------------------------------------------- training
def train_variant(cfg: Config, progress: bool = True, evaluate: bool = True, trainer_kwargs: dict | None = None,
                  callbacks=()) -> dict:
    """Stage 1 (unless `skip_align`), stage 2, then evaluation; every step cached in `cfg.run_dir`.
    Returns the metrics (also written to `metrics.json`). `callbacks` go to both stages' Trainer."""
    from .training import global_rank, train_stage, trainer_settings
    run = cfg.run_dir
    check_run_config(cfg)
    if (run / "metrics.json").exists() and (run / "model.safetensors").exists():
        return json.loads((run / "metrics.json").read_text())
    run.mkdir(parents=True, exist_ok=True)
    cfg.to_yaml(run / "config.yaml")
    model, tokenizer = build_model(cfg, progress)
    source = ImageSource(cfg, model.vision)
    cap, ins = records(cfg, "captions"), records(cfg, "instruct")
    evals = eval_records(cfg)
    if cfg.train.cache_features:
        source.cache(cap + ins + [r for v in evals.values() for r in v], progress=progress, store=feature_store(cfg))
    n = model.num_image_tokens
    seconds = {}
    trainer_kwargs = {**trainer_settings(cfg.train), **(trainer_kwargs or {})}  # strategy, devices, precision, ...
    stage_kwargs = dict(seed=cfg.train.seed, trainer_kwargs=trainer_kwargs, num_workers=cfg.train.num_workers,
                        callbacks=callbacks)
    if not cfg.train.skip_align:
        ds = LlavaDataset(cap, tokenizer, n, source, cfg.data.max_length, "captions")
        info = train_stage(model, "align", cfg.train.align, ds, run / "align", **stage_kwargs)
        seconds["align"] = info["seconds"]
    prior = None
    if cfg.train.instruct.debias == "question_prior":
        from .debias import QuestionPrior
        prior = QuestionPrior(ins, tokenizer)
    ds = LlavaDataset(ins, tokenizer, n, source, cfg.data.max_length, "instruct", prior=prior)
    if cfg.train.curve_points and global_rank() == 0:
        curve = BudgetCurve(cfg, tokenizer, source, run / "instruct" / "curve.json")
        stage_kwargs["callbacks"] = [*stage_kwargs["callbacks"], curve]
    info = train_stage(model, "instruct", cfg.train.instruct, ds, run / "instruct", **stage_kwargs)
    seconds["instruct"] = info["seconds"]
    seconds["total"] = round(sum(seconds.values()), 1)
    if global_rank() != 0:  # ddp/fsdp: the other ranks only helped train; rank 0 writes and evaluates
        return {"variant": cfg.name, "train_seconds": seconds, "global_rank": global_rank()}
    shutil.copyfile(run / "instruct" / "trained.safetensors", run / "model.safetensors")
    metrics = {"variant": cfg.name, "train_seconds": seconds,
               "truncated_samples": info["truncated_samples"]}
    if evaluate and evals:
        metrics.update(evaluate_variant(model, tokenizer, cfg, source, evals, progress))
    (run / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def curve_records(cfg: Config) -> dict[str, list[dict]]:
    """The budget curve's fixed questions: per eval split, a seeded random subset of
    `train.curve_questions` short-answer questions (captions are left out: slow to generate and
    not part of the accuracy). The same questions at every budget point and in every run."""
    import random
    out = {}
    for split, recs in eval_records(cfg, limit=0).items():
        short = [r for r in recs if r.get("question_type") != "describe"]
        k = min(cfg.train.curve_questions, len(short))
        out[split] = [short[i] for i in sorted(random.Random(cfg.data.seed).sample(range(len(short)), k))]
    return out


def budget_steps(cfg: Config) -> list[int]:
    """The stage-2 steps at which the budget curve is measured (`train.curve_points` as fractions)."""
    steps = cfg.train.instruct.steps
    return sorted({max(1, round(f * steps)) for f in cfg.train.curve_points})


class BudgetCurve(L.Callback):
    """Stage 2's budget curve: at each of `budget_steps(cfg)` it scores a fixed subset of every
    eval split (seeing and blind) and appends a row to `path` (json): step, training seconds so
    far (evaluation time excluded), accuracies. Resumed stages keep the rows already written, and
    the seconds count on from the checkpoint's (its state is saved in every checkpoint)."""

    def __init__(self, cfg: Config, tokenizer, source, path: Path):
        self.cfg, self.tokenizer, self.source, self.path = cfg, tokenizer, source, Path(path)
        self.points = budget_steps(cfg)
        self.evals = curve_records(cfg)
        self.rows = json.loads(self.path.read_text()) if self.path.exists() else []
        self.seconds = self.rows[-1]["seconds"] if self.rows else 0.0
        self.t0 = None

    def on_train_batch_start(self, trainer, *args):
        if self.t0 is None:
            self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, *args):
        step = trainer.global_step
        if step not in self.points or any(r["step"] == step for r in self.rows):
            return
        self.seconds += time.perf_counter() - self.t0
        from .evaluation import evaluate
        model = pl_module.model
        was_training = model.training
        model.eval()
        res = evaluate(model, self.tokenizer, self.evals, self.source, progress=False, examples=0)
        model.train(was_training)
        row = {"step": step, "seconds": round(self.seconds, 2)}
        for split, r in res.items():
            seeing = r["seeing"]
            row.update({split: seeing["overall_accuracy"], f"{split}_blind": r["blind"]["overall_accuracy"],
                        f"{split}_n": seeing["n"], f"{split}_per_type": seeing["per_type"]})
            if "all" in seeing.get("pope", {}):
                row[f"{split}_pope"] = {k: seeing["pope"]["all"][k] for k in ("f1", "yes_ratio")}
        self.rows.append(row)
        self.path.write_text(json.dumps(self.rows, indent=1))
        self.t0 = time.perf_counter()

    def state_dict(self) -> dict:
        running = time.perf_counter() - self.t0 if self.t0 is not None else 0.0
        return {"seconds": self.seconds + running}

    def load_state_dict(self, state: dict) -> None:
        self.seconds = float(state.get("seconds", self.seconds))


def check_run_config(cfg: Config) -> None:
    """Refuse to reuse or continue `cfg.run_dir` if it was trained with another config."""
    saved = cfg.run_dir / "config.yaml"
    if not saved.exists():
        return
    import yaml
    old, new = yaml.safe_load(saved.read_text()), cfg.to_dict()
    try:  # fields added to lgemma since that run take their defaults (which keep the old behaviour)
        old = Config.from_dict(old).to_dict()
    except (TypeError, ValueError):
        pass
    for d in (old, new):  # where the folders live is not part of what was trained
        d.pop("runs_dir", None)
        d["data"]["root"] = str((Path(os.environ.get("LGEMMA_HOME", ".")) / d["data"]["root"]).resolve())
    diff = sorted(_diff(old, new))
    if diff:
        raise ValueError(f"{cfg.run_dir} was trained with a different config ({', '.join(diff[:5])}"
                         f"{', ...' if len(diff) > 5 else ''}): give this run another name "
                         f"(--set name=...) or delete that folder to retrain")


def _diff(a, b, prefix=""):
    if isinstance(a, dict) and isinstance(b, dict):
        for k in set(a) | set(b):
            yield from _diff(a.get(k), b.get(k), f"{prefix}{k}.")
    elif a != b:
        yield prefix.rstrip(".")


def evaluate_variant(model, tokenizer, cfg: Config, source=None, evals=None, progress: bool = True) -> dict:
    """Held-out and compositional scores, seeing and blind, flattened for metrics.json."""
    from .evaluation import evaluate
    source = source or ImageSource(cfg, model.vision)
    evals = evals or eval_records(cfg)
    t0 = time.time()
    res = evaluate(model, tokenizer, evals, source, progress=progress)
    main = res.get("heldout", next(iter(res.values())))
    out = {"overall_accuracy": main["seeing"]["overall_accuracy"],
           "blind_accuracy": main["blind"]["overall_accuracy"],
           "per_type": main["seeing"]["per_type"], "blind_per_type": main["blind"]["per_type"],
           "pope": main["seeing"].get("pope", {}),
           "describe_object_f1": main["seeing"].get("describe_object_f1"),
           "splits": res, "eval_seconds": round(time.time() - t0, 1)}
    for split, r in res.items():
        out[f"{split}_accuracy"] = r["seeing"]["overall_accuracy"]
        out[f"{split}_blind_accuracy"] = r["blind"]["overall_accuracy"]
    return out


# ---------------------------------------------------------------- several variants at once
def train_variants(configs: list[Config], jobs: int = 2, progress: bool = True, desc: str = "training") -> None:
    """Train (and evaluate) several variants on `jobs` processes of one CPU thread each: tiny
    models use two cores better as two runs than as one run on two threads. A small task graph:
    each stage-0 part once (the largest first), then every run as soon as the parts it needs are
    done, the most expensive runs first. Two workers never train the same stage 0. One progress
    bar covers all of it in units of estimated work (`work_estimate`: stage 0 included, so its
    ETA holds from the first minute). Results land in each run's folder, as with
    `train_variant` (call it afterwards to read them). Runs with metrics are skipped; with fewer
    than two left to train, nothing happens here (`train_variant` then trains in this process)."""
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    configs = [c for c in configs if not (c.run_dir / "metrics.json").exists()]
    if jobs < 2 or len(configs) < 2:
        return
    for cfg in {c.data.root: c for c in configs}.values():
        ensure_data(cfg, progress)  # once, before any worker reads it
    needs = {c.name: _stage0_parts(c) for c in configs}
    parts = {}
    for c in configs:
        for part, key in needs[c.name].items():
            parts.setdefault(key, (c, part))
    parts = dict(sorted(parts.items(), key=lambda kv: work_estimate(*kv[1]), reverse=True))
    runs = sorted(configs, key=work_estimate, reverse=True)
    part_work = {k: work_estimate(c, part) for k, (c, part) in parts.items()}
    run_work = {c.name: work_estimate(c) for c in configs}
    ctx = mp.get_context("spawn")
    steps = ctx.Manager().dict()  # run name -> training steps done (workers report every 10)
    done, running, finished_work = set(), {}, 0.0
    bar = tqdm(total=sum(part_work.values()) + sum(run_work.values()), desc=f"{desc} ({jobs} at a time)",
               disable=not progress, bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}] {postfix}")
    by_name = {c.name: c for c in configs}
    with ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
        while parts or runs or running:
            while len(running) < jobs:
                ready = [c for c in runs if all(k in done for k in needs[c.name].values())]
                if parts:  # stage 0 first: every run waits on it
                    key, (c, part) = next(iter(parts.items()))
                    del parts[key]
                    running[pool.submit(_prepare, c, part)] = (key, f"stage 0 {part}")
                elif ready:
                    runs.remove(ready[0])
                    running[pool.submit(_train_one, ready[0], steps)] = (None, ready[0].name)
                else:
                    break
            labels = ", ".join(label for _, label in running.values())
            if labels != bar.postfix:
                bar.set_postfix_str(labels, refresh=False)
            finished, _ = wait(running, timeout=2, return_when=FIRST_COMPLETED)
            for f in finished:
                f.result()  # re-raises a worker's error here
                key, label = running.pop(f)
                if key is not None:
                    done.add(key)
                finished_work += part_work[key] if key is not None else run_work[label]
            in_progress = sum(_run_progress(by_name[n], s) for n, s in steps.items()
                              if any(label == n for _, label in running.values()))
            bar.update(max(0.0, finished_work + in_progress - bar.n))
    bar.update(bar.total - bar.n)
    bar.close()


def _lm_work_per_token(lang) -> float:
    """Multiply-adds of the LM's matrices per token (attention projections and MLP; the head is
    applied to a few answer tokens only)."""
    head_dim = lang.hidden_size // lang.heads
    attn = lang.hidden_size * (2 * lang.hidden_size + 2 * lang.kv_heads * head_dim)
    return lang.layers * (attn + 3 * lang.hidden_size * lang.intermediate_size)


def _run_progress(cfg: Config, steps_done: int) -> float:
    """Work done by a run that reported `steps_done` training steps (stage 1's first, then stage 2's)."""
    align = 0 if cfg.train.skip_align else cfg.train.align.steps
    per1, per2 = _step_work(cfg)
    return min(steps_done, align) * per1 + max(0, steps_done - align) * per2


def _step_work(cfg: Config) -> tuple[float, float]:
    """Estimated work of one stage-1 and one stage-2 step (frozen LM in stage 1: no weight gradients)."""
    lm = _lm_work_per_token(cfg.language)
    n_img = (cfg.vision.image_size // cfg.vision.patch_size) ** 2
    return (2 * lm * cfg.train.align.batch_size * (n_img + 40),
            3 * lm * cfg.train.instruct.batch_size * (n_img + 100))


def work_estimate(cfg: Config, part: str | None = None) -> float:
    """Estimated work (about multiply-adds) of a run (`part=None`: stages 1 and 2 and the budget-curve
    evaluations) or of a stage-0 part ("vision", "language"; 0 when cached or not trained here).
    Only the ratios matter: they schedule the longest work first and make the grid's progress bar
    advance in proportion to time."""
    s0 = cfg.train.stage0
    if part is None:
        align = 0 if cfg.train.skip_align else cfg.train.align.steps
        per2 = _step_work(cfg)[1]
        evals = len(cfg.train.curve_points) * 20 * per2  # each budget point: about 20 steps' worth
        return _run_progress(cfg, align + cfg.train.instruct.steps) + evals + 100 * per2  # + the final evaluation
    vision_dir, lm_dir = stage0_dirs(cfg)
    v = cfg.vision
    if part == "vision":
        if v.name not in TINY_TOWERS or any(vision_dir.glob("*.safetensors")):
            return 0.0
        tokens = (v.image_size // v.patch_size) ** 2 + 1
        vit = v.layers * 12 * v.width ** 2 * tokens
        if v.objective == "dino":  # two views, each through the student and the teacher
            return 3 * vit * s0.dino_steps * s0.dino_batch_size * 4
        return 3 * (vit + 2 * 12 * v.width ** 2 * 32) * s0.clip_steps * s0.clip_batch_size
    if cfg.language.name not in TINY_LMS or (lm_dir / "info.json").exists():
        return 0.0
    return 3 * _lm_work_per_token(cfg.language) * 60 * s0.lm_steps * s0.lm_batch_size


def _stage0_parts(cfg: Config) -> dict[str, tuple]:
    """The shared stage-0 work a run needs, keyed so that runs sharing a tower or LM share it."""
    vision_dir, lm_dir = stage0_dirs(cfg)
    return {"vision": ("vision", str(vision_dir)), "language": ("language", str(lm_dir))}


def _prepare(cfg: Config, part: str) -> None:
    """One stage-0 part in a worker: the tower (and its frozen features on every record), or the LM."""
    torch.set_num_threads(1)
    clip_file, _ = ensure_stage0(cfg, progress=False, parts=(part,))
    store = feature_store(cfg)
    if part == "vision" and store is not None and not store.exists():
        recs = [r for k in ("captions", "instruct", *cfg.data.eval_files) for r in records(cfg, k)]
        ImageSource(cfg, build_vision_tower(cfg.vision, clip_file)).cache(recs, progress=False, store=store)


def _train_one(cfg: Config, steps) -> None:
    """One run in a worker; `steps[cfg.name]` follows its training steps for the parent's bar."""
    import lightning as L

    class Report(L.Callback):
        offset = 0

        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step % 10 == 0:
                steps[cfg.name] = self.offset + trainer.global_step

        def on_train_end(self, trainer, pl_module):
            self.offset += trainer.global_step
            steps[cfg.name] = self.offset

    torch.set_num_threads(1)
    train_variant(cfg, progress=False, trainer_kwargs={"enable_progress_bar": False}, callbacks=[Report()])
