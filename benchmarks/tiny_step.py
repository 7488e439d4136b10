"""How fast is one stage-2 training step of the default `tiny` variant, by precision, attention code and activation?

    python benchmarks/tiny_step.py               # about a minute on 2 CPU cores
    python benchmarks/tiny_step.py --threads 1

The `tiny` preset's shapes with random weights (no stage 0 needed): vision features of 64 patches
(the frozen tower's output is cached during training, so the tower is not timed), the
`mlp2x_gelu` connector, the tiny Gemma (4 layers, hidden 128), batch 32 x 176 tokens (ShapesWorld's
mean padded length), loss on 16 answer tokens per sample. A step is LLaVA's stage 2: forward with
labels, backward, AdamW step on connector + LM.

Each setting is timed in this process against the reference, float32 with PyTorch's `sdpa`
attention (transformers' default): best of `--steps` steps after two warm-up steps, settings
interleaved round by round so that a busy machine slows them alike. `bf16-mixed` is what Lightning
runs for `train.precision: bf16-mixed` on a CPU (`torch.autocast("cpu", torch.bfloat16)`, float32
weights). It pays off where the CPU multiplies bfloat16 natively (AVX512-BF16 or AMX; see
`lgemma.training.resolve_precision`); elsewhere it can be slower than float32. `eager_float32` is
transformers' eager attention computed in float32 inside bf16 autocast (`lgemma.language`); `gelu_pytorch_tanh`
is Gemma's own MLP activation and `silu` Llama's, whose CPU kernel is much cheaper in bf16. The `tiny`
preset runs bf16-mixed (where the CPU has it), eager, gelu_pytorch_tanh.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lgemma.config import LanguageConfig  # noqa: E402
from lgemma.language import tiny_gemma  # noqa: E402
from lgemma.model import LlavaGemma  # noqa: E402
from lgemma.training import resolve_precision  # noqa: E402

TANH = "gelu_pytorch_tanh"  # Gemma's MLP activation, and the tiny preset's
SETTINGS = (("32-true", "sdpa", TANH), ("32-true", "eager", TANH), ("bf16-mixed", "sdpa", TANH),
            ("bf16-mixed", "eager", TANH), ("bf16-mixed", "eager_float32", TANH), ("bf16-mixed", "eager", "silu"),
            ("bf16-mixed", "eager_float32", "silu"))


class _Features(torch.nn.Module):
    """Stands in for the frozen tower: the batch already holds its cached features."""
    hidden_size, num_patches = 128, 64


def build(attention: str, activation: str = TANH, vocab: int = 486, seed: int = 0) -> LlavaGemma:
    torch.manual_seed(seed)
    lm = tiny_gemma(LanguageConfig(attention=attention, activation=activation), vocab)
    return LlavaGemma(_Features(), lm, image_token_id=vocab - 1)


def batch(size: int, length: int, answer: int, vocab: int = 486, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(8, vocab - 1, (size, length), generator=g)
    ids[:, 4:4 + 64] = vocab - 1                                   # the <image> placeholders
    labels = torch.full_like(ids, -100)
    labels[:, -answer:] = ids[:, -answer:]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
            "images": torch.randn(size, 64, 128, generator=g)}


def step_seconds(model, opt, b: dict, precision: str) -> float:
    t0 = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
        loss, _ = model(b["input_ids"], b["attention_mask"], b["labels"], b["images"])
    opt.zero_grad()
    loss.backward()
    opt.step()
    return time.perf_counter() - t0


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=8, help="timed steps per setting (best one counts)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--length", type=int, default=176)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    b = batch(a.batch, a.length, 16)
    runs = {}
    for precision, attention, activation in SETTINGS:
        model = build(attention, activation)
        opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-3)
        for _ in range(2):
            step_seconds(model, opt, b, precision)
        runs[precision, attention, activation] = (model, opt, [])
    for _ in range(a.steps):
        for key, (model, opt, times) in runs.items():
            times.append(step_seconds(model, opt, b, key[0]))
    ref = min(runs[SETTINGS[0]][2])
    print(f"tiny stage-2 step, batch {a.batch} x {a.length} tokens, {a.threads} thread(s); "
          f"train.precision=auto resolves to {resolve_precision('auto')} here")
    print(f"{'precision':>11} {'attention':>13} {'activation':>17} {'best step':>10} {'vs float32 + sdpa':>18}")
    out = {}
    for (precision, attention, activation), (_, _, times) in runs.items():
        best = min(times)
        out[f"{precision}/{attention}/{activation}"] = best
        print(f"{precision:>11} {attention:>13} {activation:>17} {best * 1e3:8.0f} ms {ref / best:17.2f}x")
    return out


if __name__ == "__main__":
    main()
