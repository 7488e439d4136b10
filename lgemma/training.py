"""LLaVA's two training stages as one LightningModule.

    stage "align"    (LLaVA stage 1): connector trains; vision tower and LM frozen.
    stage "instruct" (LLaVA stage 2): connector and LM train; vision tower frozen.

What trains is decided by the stage's learning rates (`lr` for the connector, `lm_lr` for
the LM; 0 means frozen), mapped to optimizer parameter groups. Schedule: linear warmup
(3%) then cosine, as LLaVA. Lightning gives progress bars, CSV logs, strategies (ddp, fsdp,
deepspeed), precision and gradient accumulation. Checkpoints we write ourselves hold only
what was trained, as safetensors, beside the config that rebuilds the rest.
"""
from __future__ import annotations

import json
import logging
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader
from transformers import get_cosine_schedule_with_warmup

from .config import StageConfig, TrainConfig
from .data.collate import LlavaDataset, collate
from .debias import product_loss
from .model import LlavaGemma

STAGES = ("align", "instruct")



def quiet_lightning() -> None:
    """Keep the console for what a learner needs: progress bars and lgemma's own messages."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    for message in (".*module\\(s\\) in eval mode.*",            # the frozen vision tower, on purpose
                    ".*isinstance\\(treespec, LeafSpec\\).*", ".*does not have many workers.*"):
        warnings.filterwarnings("ignore", message=message)


def set_trainable(model: LlavaGemma, stage: str, cfg: StageConfig) -> None:
    """Freeze/unfreeze by stage: the vision tower never trains; the LM trains iff lm_lr > 0,
    either every weight (`lm_train: full`) or only its LoRA adapters (`lm_train: lora`)."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; use one of {STAGES}")
    if cfg.debias not in ("none", "question_prior"):
        raise ValueError(f"unknown debias {cfg.debias!r}; use 'none' or 'question_prior'")
    if cfg.debias != "none" and stage != "instruct":
        raise ValueError(f"debias={cfg.debias!r} is for stage 2 (train.instruct), not train.{stage}")
    if cfg.debias_weight < 0:
        raise ValueError(f"debias_weight must be 0 or more (the prior's exponent), got {cfg.debias_weight}")
    if cfg.lm_train not in ("full", "lora"):
        raise ValueError(f"unknown lm_train {cfg.lm_train!r}; use 'full' or 'lora'")
    model.vision.requires_grad_(False)
    model.connector.requires_grad_(True)
    lm_trains = stage == "instruct" and cfg.lm_lr > 0
    has_lora = any("lora_" in k for k, _ in model.lm.named_parameters())
    if lm_trains and cfg.lm_train == "lora" and not has_lora:
        raise ValueError("lm_train is 'lora' but the LM has no LoRA adapters: build it with "
                         "lgemma.pipeline.build_model (which adds them) or lgemma.language.add_lora")
    for k, p in model.lm.named_parameters():
        p.requires_grad_(lm_trains and (cfg.lm_train == "full" or "lora_" in k))


def trained_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Only the parameters that train (what a checkpoint must hold)."""
    return {k: p.detach().contiguous() for k, p in model.named_parameters() if p.requires_grad}


class LlavaModule(L.LightningModule):
    """One training stage of LLaVA-Gemma."""

    def __init__(self, model: LlavaGemma, stage: str, stage_cfg: dict):
        super().__init__()
        self.save_hyperparameters(ignore=["model"])
        self.model, self.stage, self.cfg = model, stage, StageConfig(**stage_cfg)
        set_trainable(model, stage, self.cfg)
        self.strict_loading = False  # our checkpoints hold only the trained weights

    def _shared_step(self, batch: dict, mode: str) -> torch.Tensor:
        loss, logits = self.model(batch["input_ids"], batch["attention_mask"], batch["labels"], batch.get("images"))
        if "prior_pos" in batch:  # stage 2 with train.instruct.debias=question_prior
            loss = product_loss(logits, batch["labels"], batch, self.cfg.debias_weight)
        self.log(f"{mode}_loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def training_step(self, batch, batch_idx):
        return self._shared_step(batch, "train")

    def configure_optimizers(self):
        c = self.cfg
        groups = [{"params": list(self.model.connector.parameters()), "lr": c.lr, "name": "connector"}]
        lm_params = [p for p in self.model.lm.parameters() if p.requires_grad]
        if lm_params:
            groups.append({"params": lm_params, "lr": c.lm_lr, "name": "lm"})
        opt = torch.optim.AdamW(groups, weight_decay=c.weight_decay)
        sched = get_cosine_schedule_with_warmup(opt, int(c.warmup_ratio * c.steps), c.steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        keep = {f"model.{k}" for k in trained_state(self.model)}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}


def resolve_precision(precision: str) -> str:
    """Lightning's precision for `train.precision`; "auto" is `bf16-mixed` where the hardware
    computes in bfloat16 natively (a CUDA GPU that supports it, or a CPU with AVX512-BF16 or AMX:
    matrix products there are several times faster than in float32) and `32-true` elsewhere."""
    if precision != "auto":
        return precision
    if torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "32-true"
    native = [getattr(torch.cpu, f, lambda: False) for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    try:
        return "bf16-mixed" if any(f() for f in native) else "32-true"
    except RuntimeError:
        return "32-true"


def stage0_precision(cfg) -> str:
    """Lightning's precision for stage 0: `train.stage0.precision`, "auto" following `train.precision`."""
    p = cfg.train.stage0.precision
    return resolve_precision(cfg.train.precision if p == "auto" else p)


def trainer_settings(cfg: TrainConfig) -> dict:
    """The run config's Lightning settings as `Trainer` keyword arguments."""
    return dict(precision=resolve_precision(cfg.precision), strategy=cfg.strategy, devices=cfg.devices,
                num_nodes=cfg.num_nodes, accumulate_grad_batches=cfg.accumulate_grad_batches)


def global_rank() -> int:
    """This process's rank in a multi-process (ddp, fsdp) run; 0 otherwise. Lightning's launcher
    starts ranks > 0 by re-running the same command, so the pipeline asks this to leave the files
    (weights, metrics) to rank 0."""
    from lightning.pytorch.utilities import rank_zero_only
    return getattr(rank_zero_only, "rank", 0)


def make_loader(dataset: LlavaDataset, batch_size: int, shuffle: bool, num_workers: int = 0, seed: int = 0):
    pad = dataset.tokenizer.pad_token_id
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
                      collate_fn=lambda b: collate(b, pad), generator=torch.Generator().manual_seed(seed),
                      persistent_workers=num_workers > 0)


def check_steps(what: str, steps: int, loader: DataLoader, fix: str) -> None:
    """Refuse to start training that would take no step (Lightning would "finish" at once):
    `steps` below 1, or a loader with no batch, e.g. fewer samples than one batch with drop_last.
    `fix` says which setting or data to change."""
    n, batch = len(loader.dataset), loader.batch_size
    if steps < 1:
        raise ValueError(f"{what}: steps={steps} would train nothing. {fix}")
    if len(loader) == 0:
        why = (f"fewer than one full batch of {batch} (incomplete batches are dropped)" if loader.drop_last and n
               else "nothing to batch")
        raise ValueError(f"{what}: {n} training samples, {why}: 0 steps per epoch. {fix}")


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux, else the platform's word for it), for
    benchmark printouts and the provenance of reference results."""
    import platform
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class StageClock(L.Callback):
    """The stage's wall-clock seconds, kept in its checkpoints: a run killed and resumed reports
    the seconds of both parts (up to its last checkpoint), not only those since the resume."""

    def __init__(self):
        self.before, self.t0 = 0.0, time.perf_counter()

    def seconds(self) -> float:
        return self.before + time.perf_counter() - self.t0

    def state_dict(self) -> dict:
        return {"seconds": self.seconds()}

    def load_state_dict(self, state: dict) -> None:
        self.before, self.t0 = float(state.get("seconds", 0.0)), time.perf_counter()


def train_stage(model: LlavaGemma, stage: str, stage_cfg: StageConfig, dataset: LlavaDataset, out_dir: str | Path,
                seed: int = 0, trainer_kwargs: dict | None = None, callbacks=(), checkpoint_every: int = 100,
                num_workers: int = 0) -> dict:
    """Train one stage; resumable. `trainer_kwargs` go to Lightning's `Trainer` (e.g.
    `trainer_settings(cfg.train)`: strategy, devices, num_nodes, precision, accumulate_grad_batches).
    Writes into `out_dir`:
    `trained.safetensors` (only trained weights), `logs/` (CSV), `ckpt/last.ckpt` (for resume)
    and `done.json` (seconds, steps, final loss). A finished stage is loaded, not retrained."""
    out = Path(out_dir)
    done = out / "done.json"
    if done.exists():
        set_trainable(model, stage, stage_cfg)
        model.load_state_dict(load_file(str(out / "trained.safetensors")), strict=False)
        return json.loads(done.read_text())
    quiet_lightning()
    L.seed_everything(seed, verbose=False)
    module = LlavaModule(model, stage, vars(stage_cfg))
    ckpt_cb = ModelCheckpoint(dirpath=out / "ckpt", save_last=True, save_top_k=0,
                              every_n_train_steps=checkpoint_every)
    clock = StageClock()
    kwargs = dict(max_steps=stage_cfg.steps, logger=CSVLogger(out, name="logs", version=0),
                  callbacks=[clock, ckpt_cb, *callbacks], gradient_clip_val=stage_cfg.grad_clip or None,
                  log_every_n_steps=10, enable_model_summary=False, num_sanity_val_steps=0,
                  limit_val_batches=0, accelerator="auto", devices=1)
    kwargs.update(trainer_kwargs or {})
    trainer = L.Trainer(**kwargs)
    loader = make_loader(dataset, stage_cfg.batch_size, shuffle=True, num_workers=num_workers, seed=seed)
    check_steps(f"stage {stage} ({dataset.where})", stage_cfg.steps, loader,
                f"Check its data file, train.{stage}.steps (at least 1) and train.{stage}.batch_size"
                + (", or skip stage 1 with train.skip_align=true." if stage == "align" else "."))
    last = out / "ckpt" / "last.ckpt"
    resuming = last.exists()
    trainer.fit(module, loader, ckpt_path=str(last) if resuming else None, weights_only=True)
    if trainer.global_step < stage_cfg.steps:
        raise RuntimeError(f"stage {stage} stopped at step {trainer.global_step} of {stage_cfg.steps}; "
                           f"run again to resume from {last}")
    info = {"stage": stage, "steps": trainer.global_step, "seconds": round(clock.seconds(), 1),
            "final_loss": float(trainer.callback_metrics.get("train_loss", float("nan"))),
            "resumed": resuming, "truncated_samples": len(dataset.truncated),
            "strategy": type(trainer.strategy).__name__, "world_size": trainer.world_size, "num_nodes": trainer.num_nodes,
            "precision": str(trainer.precision),
            "accumulate_grad_batches": trainer.accumulate_grad_batches}
    if trainer.is_global_zero:
        save_file(trained_state(model), str(out / "trained.safetensors"))
        done.write_text(json.dumps(info, indent=2))
    return info


def loss_curve(stage_dir: str | Path) -> list[tuple[int, float]]:
    """(step, train_loss) pairs from a stage's CSV log."""
    import csv
    path = Path(stage_dir) / "logs" / "version_0" / "metrics.csv"
    rows = list(csv.DictReader(path.open())) if path.exists() else []
    return [(int(r["step"]), float(r["train_loss"])) for r in rows if r.get("train_loss")]
