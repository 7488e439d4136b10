"""Stage 0: make the two pretrained, frozen parts that LLaVA takes for granted.

At paper scale the vision tower is CLIP ViT-L/14 (trained by OpenAI on 400M image-text
pairs) and the LM is gemma-2b-it. In ShapesWorld lgemma trains small versions itself:
- a tiny open_clip ViT + text tower, trained contrastively on captions (open_clip's loss);
  or, with `vision.objective: dino`, the same ViT trained on the images alone, DINOv2-style
  (lightly's losses and heads): the paper's self-supervised tower (the last section: what, why);
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
from .data.shapes import COLORS, GRID, SHAPES, Obj, cell
from .language import tiny_gemma, train_tokenizer
from .training import check_steps, quiet_lightning, stage0_precision
from .vision import CLIP_CONTEXT_LENGTH, build_tiny_clip


def adamw_cosine(params, lr: float, steps: int, weight_decay: float) -> dict:
    """AdamW with 5% linear warmup then cosine decay, stepped every batch (Lightning's format)."""
    from transformers import get_cosine_schedule_with_warmup
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = get_cosine_schedule_with_warmup(opt, max(1, steps // 20), steps)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class ClipModule(L.LightningModule):
    """Contrastive image-caption training with open_clip's model and loss. With `where_layer` (the
    tower's feature layer, 0-based) the batch also holds `where_labels` and four linear heads on that
    layer's patch tokens learn them (the `clip_where` objective; the heads are not part of the tower)."""

    def __init__(self, clip: open_clip.CLIP, lr: float, steps: int, where_layer: int | None = None):
        super().__init__()
        self.clip, self.lr, self.steps, self.where_layer = clip, lr, steps, where_layer
        self.loss = open_clip.ClipLoss()
        if where_layer is not None:
            width = clip.visual.transformer.width
            self.where_heads = torch.nn.ModuleDict({k: torch.nn.Linear(width, n) for k, n in WHERE_CLASSES.items()})

    def training_step(self, batch, batch_idx):
        if self.where_layer is None:
            images, texts = batch
            img, txt, scale = self.clip(images, texts)
            loss = self.loss(img, txt, scale)
        else:
            images, texts, labels = batch  # labels [B, 4, N]
            out = self.clip.forward_intermediates(image=images, text=texts, image_indices=[self.where_layer],
                                                  image_output_fmt="NLC", output_logit_scale_bias=True)
            loss = self.loss(out["image_features"], out["text_features"], out["logit_scale"])
            tokens = out["image_intermediates"][0]  # [B, N, W]: what the LLaVA connector will read
            for i, (name, head) in enumerate(self.where_heads.items()):
                part = torch.nn.functional.cross_entropy(head(tokens).flatten(0, 1).float(), labels[:, i].flatten())
                self.log(f"where_{name}_loss", part)
                loss = loss + part
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return adamw_cosine(self.parameters(), self.lr, self.steps, weight_decay=0.1)


# `clip_where`: per patch, the covering object's column and row (lgemma.data.shapes.cell, GRID classes)
# or background, and its color and shape or background (the last class of each).
WHERE_CLASSES = {"column": GRID + 1, "row": GRID + 1, "color": len(COLORS) + 1, "shape": len(SHAPES) + 1}


def where_labels(objects: list[dict], scene_size: int, grid: int) -> torch.Tensor:
    """[4, grid*grid] class of each patch of a `grid` x `grid` tower for a scene (`scenes.json`'s object
    dicts): the column and row of the cell of the object that covers the patch's centre (its box; the
    later object where two overlap), its color and its shape; background patches get the last class.
    The position is the *object's*, not the patch's: every patch of an object says where the object is,
    the background says nothing, the kind of visual token whose position the LM learns to read
    (README, Step 8: 'Which object, then where it is')."""
    bg = [WHERE_CLASSES[k] - 1 for k in WHERE_CLASSES]
    out = torch.tensor(bg)[:, None].repeat(1, grid * grid)
    step = scene_size / grid
    for o in objects:
        col, row = cell(Obj(o["shape"], o["color"], o["size"], o["cx"], o["cy"], o["r"]), scene_size)
        x0, y0, x1, y1 = o["cx"] - o["r"], o["cy"] - o["r"], o["cx"] + o["r"], o["cy"] + o["r"]
        for gy in range(grid):
            for gx in range(grid):
                if x0 <= (gx + 0.5) * step <= x1 and y0 <= (gy + 0.5) * step <= y1:
                    out[:, gy * grid + gx] = torch.tensor([col, row, list(COLORS).index(o["color"]),
                                                           SHAPES.index(o["shape"])])
    return out


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
    `load_image(record) -> [3,S,S]` tensor. Records without an image (text-only) are skipped; the
    caption is the first reply. Reports held-out image->caption retrieval accuracy."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.train.stage0.seed, verbose=False)
    s0 = cfg.train.stage0
    tok = open_clip.tokenizer.SimpleTokenizer(context_length=CLIP_CONTEXT_LENGTH)
    records, heldout = [r for r in records if "image" in r], [r for r in heldout if "image" in r]
    captions = [turns(r)[0][1] for r in records]
    images = torch.stack([load_image(r) for r in records]) if records else torch.zeros(0)
    where = cfg.vision.objective == "clip_where"
    tensors = (images, tok(captions))
    if where:  # each patch's object and that object's cell, from the generator's scene table
        scenes_file = Path(cfg.data.root) / "scenes.json"
        if cfg.data.kind != "shapes" or not scenes_file.exists():
            raise ValueError(f"vision.objective clip_where learns ShapesWorld's scene labels, but {scenes_file} does "
                             f"not exist (data.kind={cfg.data.kind!r}): use vision.objective clip for other data")
        scenes, grid = json.loads(scenes_file.read_text()), cfg.vision.image_size // cfg.vision.patch_size
        tensors += (torch.stack([where_labels(scenes[Path(r["image"]).stem], cfg.data.image_size, grid)
                                 for r in records]),)
    data = TensorDataset(*tensors)
    clip = build_tiny_clip(cfg.vision)
    t0 = time.time()
    loader = DataLoader(data, batch_size=s0.clip_batch_size, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(cfg.train.stage0.seed))
    check_steps("stage 0 (contrastive CLIP on the caption records with an image)", s0.clip_steps, loader,
                "Lower train.stage0.clip_batch_size to at most the number of captions, or add captions.")
    module = ClipModule(clip, s0.clip_lr, s0.clip_steps,
                        where_layer=cfg.vision.feature_layer % cfg.vision.layers if where else None)
    _trainer(out, s0.clip_steps, gradient_clip_val=1.0, precision=stage0_precision(cfg)).fit(module, loader)
    info = {"seconds": round(time.time() - t0, 1), "steps": s0.clip_steps, "objective": cfg.vision.objective,
            "heldout_retrieval_top1": clip_retrieval(clip, tok, heldout, load_image)}
    if where and heldout:  # how well the heads read the labels from held-out images, on the patches objects cover
        info["where_heldout_accuracy"] = where_accuracy(module, [load_image(r) for r in heldout],
                                                        [where_labels(scenes[Path(r["image"]).stem], cfg.data.image_size, grid)
                                                         for r in heldout])
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(out / "clip.safetensors"))
    (out / "info.json").write_text(json.dumps(info, indent=2))
    return info


@torch.no_grad()
def where_accuracy(module: ClipModule, images: list[torch.Tensor], labels: list[torch.Tensor]) -> dict:
    """Share of the object-covered patches whose column, row, color and shape each `clip_where` head gets
    right (background patches left out: they are most patches, and easy)."""
    module.eval()
    tokens = module.clip.visual.forward_intermediates(torch.stack(images), indices=[module.where_layer], stop_early=True,
                                                      intermediates_only=True, output_fmt="NLC")["image_intermediates"][0]
    labels = torch.stack(labels)                                       # [n, 4, N]
    covered = labels[:, 0] < WHERE_CLASSES["column"] - 1
    return {name: round((head(tokens).argmax(-1) == labels[:, i])[covered].float().mean().item(), 4)
            for i, (name, head) in enumerate(module.where_heads.items())}


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
    """Text-only training conversations: captions as a one-turn 'describe' and the instruct
    conversations (every turn), with the `<image>` placeholder removed where a record has one
    (text-only records, as the ShareGPT ones in LLaVA's 665K mix, are taken as they are)."""
    def without_image(r, n_turns=None):
        ts = turns(r)[:n_turns]
        return [(remove_image(ts[0][0]), ts[0][1]), *ts[1:]] if "image" in r else ts
    return [without_image(r) for r in instruct_records] + [without_image(r, 1) for r in caption_records]


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
    check_steps("stage 0 (the tiny LM on the text of the caption and instruct records)", s0.lm_steps, loader,
                "Check the caption and instruct files, and train.stage0.lm_steps (at least 1).")
    _trainer(out, s0.lm_steps, gradient_clip_val=1.0, precision=stage0_precision(cfg)).fit(TextLMModule(lm, s0.lm_lr, s0.lm_steps), loader)
    lm.save_pretrained(out)
    tokenizer.save_pretrained(out)
    info = {"seconds": round(time.time() - t0, 1), "steps": s0.lm_steps, "vocab_size": len(tokenizer),
            "parameters": sum(p.numel() for p in lm.parameters())}
    (out / "info.json").write_text(json.dumps(info, indent=2))
    return info


# ---------------------------------------------------------------- stage 0: the self-supervised tower (toy DINOv2)
# The paper's second tower, DINOv2 (Oquab et al. 2023, arXiv 2304.07193), never sees text: it learns by
# self-distillation, a student ViT matching a teacher that is the exponential moving average of itself,
# on two views of one image. The objective here is DINOv2's at toy scale, every part of it lightly's:
# - the DINO loss on the CLS token (Caron et al. 2021): the student's view 1 predicts the teacher's
#   view 2 and vice versa, as distributions over K prototypes (the teacher centered and sharpened);
# - the iBOT loss on the patch tokens (Zhou et al. 2022): the student sees a view with blocks of patches
#   masked out and predicts, at each masked patch, the teacher's output there for the unmasked view.
#   LLaVA reads the *patch* tokens, and this is the term that trains them directly (plain DINO trains
#   them only through what CLS gathers from them);
# - KoLeo on the student's CLS tokens (weight 0.1): it spreads a batch's embeddings apart.
# Why not the alternatives: plain DINO leaves the patch tokens to chance; MAE's pixel targets spend a
# 128-wide ViT on reproducing flat colors that any patch embedding already keeps; SimCLR and BYOL lean on
# the color augmentations ruled out below. And it is what the paper's DINOv2 does.
# One departure: the projection heads use batch norm (lightly's `batch_norm=True`, DINO's choice for
# ResNets). ShapesWorld images are so alike that at initialization every image's CLS token is the same to
# 99% (cosine); without batch norm, centering then leaves the teacher uniform and both losses stick at
# log K within 20 steps. With it the heads see the batch's differences from the first step.
#
# What the augmentations leave intact, and why: every answer the VLM is later asked about must survive
# them, or the tower is trained to be blind to it.
# - color: no color jitter, grayscale or solarization (DINO's usual ones). Color questions ask for one of
#   six exact colors, orange next to yellow and red; invariance to hue is invariance to the answer;
# - orientation: no flips or rotations. A horizontal flip swaps "left of" and "right of" (spatial
#   questions); a vertical one makes the upward triangle a shape the world does not have;
# - scale: no resized crops. "small" and "large" are absolute sizes (radius 5.8 vs 10.9 px at 64 px); a
#   crop of 40% of the image zoomed back to 64 px makes a small circle as large as a large one;
# - count: no local crops, which cut objects out, and no blur (a small triangle's corners).
# What varies: where things are, by a random shift of up to DINO_SHIFT px (the border pixels, background,
# are replicated), which changes no answer (spatial questions are relative), and which patches are masked.


DINO_SHIFT = 4            # px, each view's random translation (torchvision RandomCrop, edge padding)
DINO_PROTOTYPES = 512     # K, each projection head's output size (DINOv2 uses 65,536 on ImageNet)
DINO_HEAD = (512, 128)    # hidden and bottleneck widths of the projection heads
DINO_MOMENTUM = 0.98      # the teacher's EMA momentum at the start (-> 1 on a cosine); short runs: low


def vit_tokens(visual, pixels: torch.Tensor, mask: torch.Tensor | None = None,
               mask_token: torch.Tensor | None = None) -> torch.Tensor:
    """An open_clip ViT's final tokens [B, 1 + N, W] (CLS first, after `ln_post`).

    With `mask` [B, gh, gw] (True: masked), the patch embeddings of the masked patches are replaced by
    `mask_token` [W] before the position embeddings are added, as in iBOT and DINOv2, so the masked
    tokens still know where they are, not what is there. Without a mask this is the ViT's own forward
    up to (not including) its CLIP projection."""
    h = visual.conv1(pixels).flatten(2).transpose(1, 2)                       # [B, N, W]
    if mask is not None:
        if mask_token is None:
            raise ValueError("a mask needs a mask_token to put in place of the masked patches")
        h = torch.where(mask.flatten(1)[..., None], mask_token.to(h.dtype), h)
    cls = visual.class_embedding.to(h.dtype).expand(h.shape[0], 1, -1)
    h = torch.cat([cls, h], dim=1) + visual.positional_embedding.to(h.dtype)
    h = visual.ln_pre(visual.patch_dropout(h))
    return visual.ln_post(visual.transformer(h))


class TwoViews(torch.utils.data.Dataset):
    """Images [n, 3, S, S] -> two views of each (lightly's MultiViewTransform), each shifted by up to
    `shift` px with the border pixels replicated (see the section's comment for what stays intact)."""

    def __init__(self, images: torch.Tensor, shift: int = DINO_SHIFT):
        from lightly.transforms.multi_view_transform import MultiViewTransform
        from torchvision.transforms import v2
        self.images = images
        view = v2.Compose([v2.RandomCrop(images.shape[-1], padding=shift, padding_mode="edge")])
        self.transform = MultiViewTransform([view, view])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> list[torch.Tensor]:
        return self.transform(self.images[i])


class DinoModule(L.LightningModule):
    """DINOv2-style self-distillation of an open_clip ViT (the section's comment says what and why).

    Student: `visual` (trained), a learned mask token and two lightly `DINOProjectionHead`s, one for the
    CLS token (DINO loss) and one for the patch tokens (iBOT loss), as DINOv2 (its patch targets are a
    different distribution from its image targets). Teacher: copies of the ViT and heads, updated only as
    their exponential moving average (`update_momentum`, `momentum` -> 1 on a cosine). The teacher
    temperature warms up from `teacher_temp[0]` to `[1]` over the first 30% of the steps; the heads' last
    layers stay frozen for the first 10% (DINO's guard against early collapse)."""

    def __init__(self, visual, lr: float, steps: int, momentum: float = DINO_MOMENTUM, koleo_weight: float = 0.1,
                 teacher_temp: tuple[float, float] = (0.04, 0.07), prototypes: int = DINO_PROTOTYPES,
                 head: tuple[int, int] = DINO_HEAD):
        super().__init__()
        from copy import deepcopy

        from lightly.loss import DINOLoss, IBOTPatchLoss, KoLeoLoss
        from lightly.models.modules import DINOProjectionHead
        from lightly.models.utils import deactivate_requires_grad
        width = visual.transformer.width
        self.lr, self.steps, self.momentum, self.koleo_weight = lr, steps, momentum, koleo_weight
        self.teacher_temp = teacher_temp
        self.student, self.teacher = visual, deepcopy(visual)
        deactivate_requires_grad(self.teacher)

        def heads():  # (student, teacher); weight norm cannot be deep-copied, hence a second head
            student = DINOProjectionHead(width, *head, prototypes, batch_norm=True, freeze_last_layer=1)
            teacher = DINOProjectionHead(width, *head, prototypes, batch_norm=True)
            teacher.load_state_dict(student.state_dict())
            deactivate_requires_grad(teacher)
            return student, teacher

        self.student_head, self.teacher_head = heads()
        self.student_patch_head, self.teacher_patch_head = heads()
        self.mask_token = torch.nn.Parameter(torch.zeros(width))
        self.dino_loss = DINOLoss(prototypes)
        self.ibot_loss = IBOTPatchLoss(prototypes)
        self.koleo_loss = KoLeoLoss()

    def training_step(self, batch, batch_idx):
        from lightly.models.utils import random_block_mask
        from lightly.utils.scheduler import linear_warmup_schedule
        views = torch.cat(batch)                                  # [2B, 3, S, S]: view 1, then view 2
        mask = random_block_mask((len(views), *self.student.grid_size), device=views.device)  # DINOv2's
        patches = mask.flatten(1)
        temp = linear_warmup_schedule(self.global_step, int(0.3 * self.steps), *self.teacher_temp)
        with torch.no_grad():
            t = vit_tokens(self.teacher, views)
            t_cls, t_patch = self.teacher_head(t[:, 0]), self.teacher_patch_head(t[:, 1:][patches])
        s = vit_tokens(self.student, views, mask, self.mask_token)
        s_cls, s_patch = self.student_head(s[:, 0]), self.student_patch_head(s[:, 1:][patches])
        dino = self.dino_loss(list(t_cls.chunk(2)), list(s_cls.chunk(2)), teacher_temp=temp)
        ibot = self.ibot_loss(t_patch, s_patch, mask, teacher_temp=temp)
        koleo = sum(self.koleo_loss(c) for c in s[:, 0].float().chunk(2))
        loss = dino + ibot + self.koleo_weight * koleo
        self.log_dict({"train_loss": loss, "dino_loss": dino, "ibot_loss": ibot, "koleo_loss": koleo},
                      prog_bar=True)
        return loss

    def on_after_backward(self):
        phase = int(self.global_step >= self.steps // 10)  # lightly counts the frozen phase in epochs
        self.student_head.cancel_last_layer_gradients(current_epoch=phase)
        self.student_patch_head.cancel_last_layer_gradients(current_epoch=phase)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        from lightly.models.utils import update_momentum
        from lightly.utils.scheduler import cosine_schedule
        m = cosine_schedule(self.global_step, self.steps, self.momentum, 1.0)
        update_momentum(self.student, self.teacher, m)
        update_momentum(self.student_head, self.teacher_head, m)
        update_momentum(self.student_patch_head, self.teacher_patch_head, m)

    def configure_optimizers(self):
        params = [p for m in (self.student, self.student_head, self.student_patch_head) for p in m.parameters()
                  if p.requires_grad]
        return adamw_cosine([*params, self.mask_token], self.lr, self.steps, weight_decay=0.04)


def pretrain_vision_dino(cfg: Config, records: list[dict], load_image, out_dir: str | Path) -> dict:
    """Train the tiny ViT of `cfg.vision` (`objective: dino`) self-supervised on the images of `records`
    (their text is never used); save `dino.safetensors` (the ViT alone, keys as
    `build_tiny_clip(cfg.vision).visual`) and `info.json`: `seconds` (wall), `cpu_seconds` (this
    process's CPU time: the same with one thread on an idle machine, and what to compare where others
    share the cores), `steps`, the last logged losses and, on ShapesWorld, the quality number
    `heldout_large_shape_probe` (`dino_probe`). `load_image(record) -> [3,S,S]`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    s0 = cfg.train.stage0
    images = {r["image"]: r for r in records if "image" in r}   # each image once
    if s0.dino_steps < 1:
        raise ValueError(f"stage 0 (DINO): train.stage0.dino_steps={s0.dino_steps} would train nothing")
    if len(images) < s0.dino_batch_size:
        raise ValueError(f"stage 0 (DINO): {len(images)} training images, fewer than one batch of "
                         f"train.stage0.dino_batch_size={s0.dino_batch_size}: lower it or add images")
    L.seed_everything(s0.seed, verbose=False)
    pixels = torch.stack([load_image(r) for r in images.values()])
    visual = build_tiny_clip(cfg.vision).visual
    loader = DataLoader(TwoViews(pixels), batch_size=s0.dino_batch_size, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(s0.seed))
    t0, c0 = time.time(), time.process_time()
    trainer = _trainer(out, s0.dino_steps, gradient_clip_val=3.0, precision=stage0_precision(cfg))
    trainer.fit(DinoModule(visual, s0.dino_lr, s0.dino_steps), loader)
    info = {"seconds": round(time.time() - t0, 1), "cpu_seconds": round(time.process_time() - c0, 1),
            "steps": s0.dino_steps,
            **{k: round(float(v), 4) for k, v in trainer.callback_metrics.items() if k.endswith("_loss")}}
    weights = out / "dino.safetensors"
    save_file({k: v.contiguous() for k, v in visual.state_dict().items()}, str(weights))
    info.update(dino_probe(cfg, weights, load_image))
    (out / "info.json").write_text(json.dumps(info, indent=2))
    return info


def dino_probe(cfg: Config, weights: str | Path, load_image, n_train: int = 1000) -> dict:
    """Stage 0's quality number for a tower without captions to retrieve: {"heldout_large_shape_probe":
    accuracy} of `interpret.object_probe` telling the shape of each held-out *large* object from the one
    patch feature at its center (window 1), trained on the large objects of the first `n_train` training
    images. That patch lies inside the object, all one color: its shape is not in its pixels, only in what
    the tower gathered from around it (an untrained tower reads the small objects' shapes from their
    pixels as well as a trained one, so they would not show training). {} without ShapesWorld's
    `scenes.json`."""
    from .interpret import object_probe, scene_record
    from .vision import build_vision_tower
    path = Path(cfg.data.root) / "scenes.json"
    if not path.exists():
        return {}
    large = {i: [o for o in objs if o["size"] == "large"] for i, objs in json.loads(path.read_text()).items()}
    train = [i for i in large if i.startswith("train_") and large[i]][:n_train]
    test = [i for i in large if i.startswith("heldout_") and large[i]]
    tower = build_vision_tower(cfg.vision, weights)
    features = {}
    with torch.no_grad():
        for k in range(0, len(train + test), 256):
            chunk = (train + test)[k:k + 256]
            features.update(zip(chunk, tower(torch.stack([load_image(scene_record(i)) for i in chunk]))))
    probe = object_probe(features, large, train, test, "shape", tower.grid, cfg.data.image_size, window=1)
    return {"heldout_large_shape_probe": probe["accuracy"]}
