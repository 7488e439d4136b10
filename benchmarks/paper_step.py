"""A paper preset's stage-2 training step at its real size, on a GPU, with random weights:
step time, tokens per second and MFU (model FLOPs utilization).

    python benchmarks/paper_step.py                              # paper-2b-clip, 1 GPU, bf16, 3 timed steps
    python benchmarks/paper_step.py --strategy fsdp --steps 2     # the same step under FSDP
    python benchmarks/paper_step.py --size tiny --device cpu      # a smoke test (tests/test_benchmarks.py)

Nothing is downloaded: the tower is open_clip's `ViT-L-14-336-quickgelu` with random weights (the
CLIP presets; DINOv2's configuration would come from the hub), the LM transformers' `GemmaForCausalLM` with gemma-2b's (or 7b's) configuration,
written out below. A batch is the preset's per-device stage-2 batch of random LLaVA-shaped samples
(576 image tokens, a prompt, an answer); the step is lgemma's own `LlavaModule` in Lightning's
`Trainer`, with the preset's precision and activation checkpointing, or those given here.

Model FLOPs of a step (recomputation not counted, as MFU is defined): 6 x the LM's non-embedding
parameters per token and 12 x layers x attention width x sequence length per token (PaLM's count)
for the decoder, forward and backward; 6 x hidden x vocabulary per supervised token for the LM head
(lgemma applies it there only); 6 x the connector's parameters per image token; 2 x the frozen
tower's parameters per patch (forward only). MFU = model FLOPs per second / the GPUs' dense bf16 peak.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# transformers' GemmaConfig of google/gemma-2b(-it) and gemma-7b(-it) (their config.json)
GEMMA = {"google/gemma-2b-it": dict(vocab_size=256_000, hidden_size=2048, intermediate_size=16_384, num_hidden_layers=18,
                                    num_attention_heads=8, num_key_value_heads=1, head_dim=256),
         "google/gemma-7b-it": dict(vocab_size=256_000, hidden_size=3072, intermediate_size=24_576, num_hidden_layers=28,
                                    num_attention_heads=16, num_key_value_heads=16, head_dim=256)}
TINY_GEMMA = dict(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=16)
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "L4": 121.0}  # dense, per GPU


def build(preset: str, size: str):
    """The preset's model with random weights: (LlavaGemma, config)."""
    from transformers import GemmaConfig, GemmaForCausalLM

    from lgemma.config import VisionConfig, get_preset
    from lgemma.model import LlavaGemma
    from lgemma.vision import build_vision_tower
    cfg = get_preset(preset)
    if size == "tiny":
        cfg.vision = VisionConfig(name="tiny", width=32, layers=2, heads=2, embed_dim=32)
        text = TINY_GEMMA
    elif cfg.vision.name.startswith("dinov2"):
        raise ValueError(f"{preset}: DINOv2's config comes from the hub; this offline step covers the CLIP presets")
    else:
        cfg.vision.pretrained = ""  # open_clip's architecture, random weights
        text = GEMMA[cfg.language.name]
    tower = build_vision_tower(cfg.vision)
    lm = GemmaForCausalLM(GemmaConfig(**text, pad_token_id=0, eos_token_id=1, bos_token_id=2, tie_word_embeddings=True))
    model = LlavaGemma(tower, lm, image_token_id=text["vocab_size"] - 1, connector=cfg.connector.kind)
    model.checkpoint_activations(cfg.train.activation_checkpointing)
    return model, cfg


def batches(model, batch_size: int, prompt: int, answer: int, seed: int = 0):
    """Endless identical batches of `batch_size` samples: bos, image tokens, a prompt, an answer
    (supervised), as `lgemma.data.collate.collate` builds them."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.lm.config.vocab_size
    n_img, size = model.num_image_tokens, model.vision.image_size
    text = lambda n: torch.randint(10, vocab - 1, (batch_size, n), generator=g)  # noqa: E731
    ids = torch.cat([torch.full((batch_size, 1), 2), torch.full((batch_size, n_img), model.image_token_id),
                     text(prompt), text(answer)], 1)
    labels = ids.clone()
    labels[:, :1 + n_img + prompt] = -100
    b = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids),
         "images": torch.randn(batch_size, 3, size, size, generator=g)}
    while True:
        yield b


def model_flops(model, batch: dict) -> float:
    """Model FLOPs of one training step on `batch` (see the module docstring)."""
    c = model.lm.config
    embedding = model.lm.get_input_embeddings().weight.numel()
    body = sum(p.numel() for p in model.lm.parameters()) - embedding  # the head is tied to the embedding
    tokens, seq = batch["input_ids"].numel(), batch["input_ids"].shape[1]
    supervised = int((batch["labels"][:, 1:] != -100).sum())
    image_tokens = batch["images"].shape[0] * model.num_image_tokens
    return (6 * body * tokens + 12 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * seq * tokens
            + 6 * c.hidden_size * c.vocab_size * supervised
            + 6 * sum(p.numel() for p in model.connector.parameters()) * image_tokens
            + 2 * sum(p.numel() for p in model.vision.parameters()) * (model.num_image_tokens + 1) * batch["images"].shape[0])


def main(argv=None) -> dict:
    import lightning as L

    from lgemma.config import StageConfig
    from lgemma.training import LlavaModule, quiet_lightning
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="paper-2b-clip")
    ap.add_argument("--size", choices=["real", "tiny"], default="real")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--devices", type=int, default=1)
    ap.add_argument("--strategy", default="auto", help="auto (one device), ddp, fsdp, ...")
    ap.add_argument("--precision", default=None, help="default: the preset's (bf16-mixed)")
    ap.add_argument("--checkpointing", choices=["off", "selective", "full"], default=None,
                    help="activation checkpointing (default: the preset's)")
    ap.add_argument("--batch", type=int, default=None, help="per-device batch (default: the preset's stage-2 batch)")
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens per sample besides the image (64)")
    ap.add_argument("--answer", type=int, default=128, help="supervised answer tokens per sample (128)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps, after one warm-up step")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak, if not in the table")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    model, cfg = build(args.preset, args.size)
    if args.checkpointing:
        model.checkpoint_activations(args.checkpointing)
    stage = cfg.train.instruct
    batch_size = args.batch or stage.batch_size
    data = batches(model, batch_size, args.prompt, args.answer)
    flops = model_flops(model, next(data))

    class Clock(L.Callback):
        def __init__(self):
            self.times = []

        def on_train_batch_start(self, *a):
            if args.device == "cuda":
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, *a):
            if args.device == "cuda":
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.t0)

    quiet_lightning()
    clock = Clock()
    trainer = L.Trainer(max_steps=args.steps + 1, accelerator="gpu" if args.device == "cuda" else args.device,
                        devices=args.devices, strategy=args.strategy, precision=args.precision or cfg.train.precision,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[clock], gradient_clip_val=stage.grad_clip, num_sanity_val_steps=0, limit_val_batches=0)
    module = LlavaModule(model, "instruct", vars(StageConfig(**{**vars(stage), "steps": args.steps + 1})))
    t0 = time.perf_counter()
    trainer.fit(module, torch.utils.data.DataLoader(list(next(data) for _ in range(args.steps + 1)), batch_size=None))
    if not trainer.is_global_zero:
        return {}
    step = min(clock.times[1:] or clock.times)
    world = trainer.world_size
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    tokens = batch_size * next(data)["input_ids"].shape[1] * world
    res = {"preset": args.preset, "size": args.size, "device": name, "world_size": world,
           "strategy": type(trainer.strategy).__name__, "precision": str(trainer.precision),
           "checkpointing": args.checkpointing or cfg.train.activation_checkpointing, "batch_per_device": batch_size,
           "tokens_per_step": tokens, "step_s": round(step, 4), "steps_s": [round(t, 4) for t in clock.times],
           "tokens_per_s": round(tokens / step, 1), "model_tflops_per_step": float(f"{flops * world / 1e12:.4g}"),
           "mfu": float(f"{flops / step / (peak * 1e12):.4g}") if peak else None, "peak_bf16_tflops": peak,
           "parameters": sum(p.numel() for p in model.parameters()), "wall_s": round(time.perf_counter() - t0, 1)}
    if args.device == "cuda":
        res["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    print(json.dumps(res, indent=2))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
