"""Stage 0: make the two pretrained, frozen parts that LLaVA takes for granted.

At paper scale the vision tower is CLIP ViT-L/14 (trained by OpenAI on 400M image-text
pairs) and the LM is gemma-2b-it. In ShapesWorld lgemma trains small versions itself:
- a tiny open_clip ViT + text tower, trained contrastively on captions (open_clip's loss);
- a tiny Gemma (transformers' Gemma class) trained on ShapesWorld text: captions and
  question-answer turns *without images*, so it knows the language and the answer formats,
  but not what any particular image shows (that is the connector's and stage 2's job).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import lightning as L
import open_clip
import torch
from lightning.pytorch.loggers import CSVLogger
from safetensors.torch import save_file
from torch.utils.data import DataLoader, TensorDataset

from .config import Config
from .data.collate import build_sample, collate, remove_image
from .data.llava_json import turns
from .language import tiny_gemma, train_tokenizer
from .training import quiet_lightning, stage0_precision
from .vision import CLIP_CONTEXT_LENGTH, build_tiny_clip


def adamw_cosine(params, lr: float, steps: int, weight_decay: float) -> dict:
    """AdamW with 5% linear warmup then cosine decay, stepped every batch (Lightning's format)."""
    from transformers import get_cosine_schedule_with_warmup
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = get_cosine_schedule_with_warmup(opt, max(1, steps // 20), steps)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class ClipModule(L.LightningModule):
    """Contrastive image-caption training with open_clip's model and loss."""

    def __init__(self, clip: open_clip.CLIP, lr: float, steps: int):
        super().__init__()
        self.clip, self.lr, self.steps = clip, lr, steps
        self.loss = open_clip.ClipLoss()

    def training_step(self, batch, batch_idx):
        images, texts = batch
        img, txt, scale = self.clip(images, texts)
        loss = self.loss(img, txt, scale)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return adamw_cosine(self.clip.parameters(), self.lr, self.steps, weight_decay=0.1)


class TextLMModule(L.LightningModule):
    """Next-token training of the tiny Gemma on text."""

    def __init__(self, lm, lr: float, steps: int):
        super().__init__()
        self.lm, self.lr, self.steps = lm, lr, steps

    def training_step(self, batch, batch_idx):
        loss = self.lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return adamw_cosine(self.lm.parameters(), self.lr, self.steps, weight_decay=0.01)


def _trainer(out: Path, steps: int, **kw) -> L.Trainer:
    quiet_lightning()
    return L.Trainer(max_steps=steps, logger=CSVLogger(out, name="logs", version=0), enable_checkpointing=False,
                     log_every_n_steps=10, enable_model_summary=False, accelerator="auto", devices=1, **kw)


def pretrain_vision(cfg: Config, records: list[dict], load_image, heldout: list[dict], out_dir: str | Path) -> dict:
    """Train the tiny CLIP on (image, caption) records; save `clip.safetensors` + `info.json`.
    `load_image(record) -> [3,S,S]` tensor. Reports held-out image->caption retrieval accuracy."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.train.stage0.seed, verbose=False)
    s0 = cfg.train.stage0
    tok = open_clip.tokenizer.SimpleTokenizer(context_length=CLIP_CONTEXT_LENGTH)
    captions = [turns(r)[0][1] for r in records]
    images = torch.stack([load_image(r) for r in records])
    data = TensorDataset(images, tok(captions))
    clip = build_tiny_clip(cfg.vision)
    t0 = time.time()
    loader = DataLoader(data, batch_size=s0.clip_batch_size, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(cfg.train.stage0.seed))
    _trainer(out, s0.clip_steps, gradient_clip_val=1.0, precision=stage0_precision(cfg)).fit(ClipModule(clip, s0.clip_lr, s0.clip_steps), loader)
    info = {"seconds": round(time.time() - t0, 1), "steps": s0.clip_steps,
            "heldout_retrieval_top1": clip_retrieval(clip, tok, heldout, load_image)}
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(out / "clip.safetensors"))
    (out / "info.json").write_text(json.dumps(info, indent=2))
    return info


@torch.no_grad()
def clip_retrieval(clip, tok, records: list[dict], load_image, group: int = 50) -> float:
    """Image -> caption top-1 accuracy within groups of `group` held-out pairs (chance 1/group).
    Scenes with identical captions count as correct when any of them is picked."""
    clip.eval()
    group = min(group, len(records))
    hits, total = 0, 0
    for i in range(0, len(records) - group + 1, group):
        chunk = records[i:i + group]
        caps = [turns(r)[0][1] for r in chunk]
        img = clip.encode_image(torch.stack([load_image(r) for r in chunk]), normalize=True)
        txt = clip.encode_text(tok(caps), normalize=True)
        best = (img @ txt.T).argmax(1)
        hits += sum(caps[j] == caps[b] for j, b in enumerate(best.tolist()))
        total += len(chunk)
    return round(hits / max(total, 1), 4)


def lm_texts(caption_records: list[dict], instruct_records: list[dict]) -> list[list[tuple[str, str]]]:
    """Text-only training conversations: captions as a one-turn 'describe' and the
    instruct conversations with their image removed."""
    convs = []
    for r in instruct_records:
        ts = turns(r)
        convs.append([(remove_image(ts[0][0]), ts[0][1]), *ts[1:]])
    for r in caption_records:
        (q, a), = turns(r)[:1]
        convs.append([(remove_image(q), a)])
    return convs


def pretrain_language(cfg: Config, caption_records: list[dict], instruct_records: list[dict], out_dir: str | Path) -> dict:
    """Train the tokenizer and the tiny Gemma on ShapesWorld text; save a transformers folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.train.stage0.seed, verbose=False)
    s0 = cfg.train.stage0
    convs = lm_texts(caption_records, instruct_records)
    corpus = [q + "\n" + a for c in convs for q, a in c]
    tokenizer = train_tokenizer(corpus, cfg.language.vocab_size)
    samples = [build_sample(tokenizer, c, None, cfg.data.max_length) for c in convs]
    # pretraining: every real token is a target, not only the replies
    items = [{"input_ids": torch.tensor(s.input_ids), "labels": torch.tensor(s.input_ids)} for s in samples]
    lm = tiny_gemma(cfg.language, len(tokenizer))
    pad = tokenizer.pad_token_id
    t0 = time.time()
    loader = DataLoader(items, batch_size=s0.lm_batch_size, shuffle=True, collate_fn=lambda b: collate(b, pad),
                        generator=torch.Generator().manual_seed(cfg.train.stage0.seed))
    _trainer(out, s0.lm_steps, gradient_clip_val=1.0, precision=stage0_precision(cfg)).fit(TextLMModule(lm, s0.lm_lr, s0.lm_steps), loader)
    lm.save_pretrained(out)
    tokenizer.save_pretrained(out)
    info = {"seconds": round(time.time() - t0, 1), "steps": s0.lm_steps, "vocab_size": len(tokenizer),
            "parameters": sum(p.numel() for p in lm.parameters())}
    (out / "info.json").write_text(json.dumps(info, indent=2))
    return info
