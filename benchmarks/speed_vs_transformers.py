"""lgemma against transformers' `LlavaForConditionalGeneration`: training step time, peak memory
and KV-cached generation speed, at one config with identical weights.

    python benchmarks/speed_vs_transformers.py --small --batch 4   # 2 CPU cores: about 15 minutes
    python benchmarks/speed_vs_transformers.py                     # paper scale (ViT-L/14-336 sized tower)

The config: a Gemma 3 270M-sized LM (hidden 640, 18 layers, 4 heads, 1 KV head, head_dim 256,
intermediate 2048) with its 262,144-token vocabulary, a CLIP ViT at 336 px / patch 14 (576 image
tokens), prompts of one image and a short question, answers of a few dozen tokens. Random init.
The reference is built from the lgemma model by `lgemma.hf.to_transformers` (same weights; the
script checks that both give the same loss before timing anything).

A training step is LLaVA's stage 2: forward with labels, backward, AdamW step; connector + LM
trained, vision tower frozen. What differs: lgemma applies the LM head (640 x 262,144) only at the
supervised positions (the answers, ~5% of the sequence), and transformers at every position,
then upcasts all those logits to float32 for the loss. lgemma is measured once per activation
checkpointing mode in `--checkpointing` (default: `off`, lgemma's default, and `selective`, which
keeps the matrix products and recomputes the element-wise ops in the backward pass); the
reference keeps every activation (transformers' default).

Memory is measured in a fresh subprocess per implementation (`--worker`), so neither sees the
other's allocations. `resident` is what stays between steps (weights + AdamW state), `peak` the
most held during a step after it, `step = peak - resident` what a step adds (activations, logits,
gradients):
- CUDA: `torch.cuda.memory_allocated` / `max_memory_allocated` (tensors only).
- CPU: the process's resident set size (Linux /proc/self/status), minus the RSS of the interpreter
  with its libraries loaded before any model exists; the peak (VmHWM) is reset after the warm-up
  step. glibc is told to hand freed memory back (MALLOC_MMAP_THRESHOLD_), so RSS follows live
  tensors. (tracemalloc does not see torch's allocations; `ru_maxrss` is inherited across exec.)

Time: the best timed step (after a warm-up step); generation: the best of three runs of
`--gen-batch` prompts x `gen_tokens` new tokens (prefill included), greedy with the KV cache, the
two implementations alternating. Best-of rather than mean: on a shared machine the noise only adds.
With `--threads 1` on CPU the clock is the process's CPU time, which other jobs do not inflate.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GEMMA3_270M = dict(hidden_size=640, num_hidden_layers=18, num_attention_heads=4, num_key_value_heads=1,
                   head_dim=256, intermediate_size=2048, vocab_size=262_144, sliding_window=512,
                   max_position_embeddings=32_768, query_pre_attn_scalar=256)
VIT_L_14_336 = dict(width=1024, layers=24, heads=16, patch=14, image=336)
SIZES = {
    # paper scale: the LLaVA-1.5 tower's shape, Gemma 3 270M
    "full": dict(vision=VIT_L_14_336, lm=GEMMA3_270M, answer=32, steps=5, gen_tokens=64),
    # CPU: the same LM, vocabulary and 576 image tokens, a 2-layer tower (frozen, same cost on both sides)
    "small": dict(vision=dict(width=256, layers=2, heads=4, patch=14, image=336), lm=GEMMA3_270M,
                  answer=32, steps=2, gen_tokens=32),
    # the test suite's smoke run: seconds
    "tiny": dict(vision=dict(width=32, layers=2, heads=2, patch=8, image=32),
                 lm=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         head_dim=16, intermediate_size=64, vocab_size=4096, sliding_window=32),
                 answer=8, steps=1, gen_tokens=4),
}
REFERENCE = "transformers"


def impl_names(modes) -> list[str]:
    """lgemma once per checkpointing mode ("lgemma" is mode off, "lgemma+selective", ...), then the reference."""
    return [f"lgemma+{m}" if m != "off" else "lgemma" for m in modes] + [REFERENCE]


def mode_of(impl: str) -> str:
    return impl.partition("+")[2] or "off"
IMAGE_ID, PAD_ID, BOS_ID = 5, 0, 2


# ---------------------------------------------------------------- models and data
def build(size: str, impl: str, device: str, dtype: torch.dtype, seed: int = 0):
    """The lgemma model, or its transformers copy (same weights for the same seed)."""
    import open_clip
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from lgemma.config import VisionConfig
    from lgemma.hf import to_transformers
    from lgemma.model import LlavaGemma
    from lgemma.vision import VisionTower
    s = SIZES[size]
    v = s["vision"]
    torch.manual_seed(seed)
    vit = open_clip.model._build_vision_tower(
        64, open_clip.model.CLIPVisionCfg(layers=v["layers"], width=v["width"], head_width=v["width"] // v["heads"],
                                          patch_size=v["patch"], image_size=v["image"]))
    vcfg = VisionConfig(name="bench", image_size=v["image"], patch_size=v["patch"], width=v["width"],
                        layers=v["layers"], heads=v["heads"])
    tower = VisionTower(vcfg, vit, "open_clip", (0.5,) * 3, (0.5,) * 3, v["image"])
    lm = Gemma3ForCausalLM(Gemma3TextConfig(**s["lm"], pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=1,
                                            tie_word_embeddings=True))
    model = LlavaGemma(tower, lm, IMAGE_ID, "mlp2x_gelu")
    if impl != REFERENCE:
        model.checkpoint_activations(mode_of(impl))
    if impl == REFERENCE:
        ref = to_transformers(model)
        del model, lm, tower, vit
        gc.collect()
        ref.model.vision_tower.requires_grad_(False)   # LLaVA: the tower is frozen in both stages
        model = ref
    return model.to(device=device, dtype=dtype)


def batch(size: str, batch_size: int, device: str, seed: int = 0) -> dict:
    """Right-padded stage-2 samples: bos, turn header, 576 image ids, a question, an answer of a few
    dozen tokens (lengths vary) and <end_of_turn>; labels on the answer only."""
    s = SIZES[size]
    g = torch.Generator().manual_seed(seed)
    n_img = (s["vision"]["image"] // s["vision"]["patch"]) ** 2
    vocab = s["lm"]["vocab_size"]
    rows, labels = [], []
    for _ in range(batch_size):
        q, a = int(torch.randint(8, 16, (), generator=g)), int(torch.randint(s["answer"] // 2, s["answer"] + 1, (), generator=g))
        text = lambda n: torch.randint(10, vocab, (n,), generator=g).tolist()
        prompt = [BOS_ID] + text(3) + [IMAGE_ID] * n_img + text(q) + text(5)
        answer = text(a) + text(2)
        rows.append(prompt + answer)
        labels.append([-100] * len(prompt) + answer)
    width = max(map(len, rows))
    ids = torch.full((batch_size, width), PAD_ID)
    lab = torch.full((batch_size, width), -100)
    mask = torch.zeros((batch_size, width), dtype=torch.long)
    for i, (r, l) in enumerate(zip(rows, labels)):
        ids[i, :len(r)], lab[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), torch.tensor(l), 1
    pixels = torch.randn(batch_size, 3, s["vision"]["image"], s["vision"]["image"], generator=g)
    return {k: t.to(device) for k, t in dict(input_ids=ids, labels=lab, attention_mask=mask, pixels=pixels).items()}


def loss_of(model, impl: str, b: dict) -> torch.Tensor:
    if impl != REFERENCE:
        return model(b["input_ids"], b["attention_mask"], b["labels"], b["pixels"].to(model.connector_dtype))[0]
    return model(input_ids=b["input_ids"], pixel_values=b["pixels"].to(model.dtype),
                 attention_mask=b["attention_mask"], labels=b["labels"]).loss


def train_step(model, impl: str, b: dict, opt) -> float:
    loss = loss_of(model, impl, b)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def optimizer(model):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)


def sync(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


def clock(device: str) -> float:
    """Seconds. On a CPU run with one torch thread, this process's CPU time: other jobs on a shared
    machine then do not count (and no thread waits on another). Otherwise wall time."""
    if device == "cpu" and torch.get_num_threads() == 1:
        return time.process_time()
    return time.perf_counter()


def generate(model, impl: str, b: dict, n_tokens: int):
    """Greedy, KV-cached, exactly `n_tokens` new tokens for the prompts of `b` (one image each)."""
    ids, mask = b["input_ids"], b["attention_mask"]
    kw = dict(max_new_tokens=n_tokens, min_new_tokens=n_tokens)
    if impl != REFERENCE:
        return model.generate(ids, mask, b["pixels"].to(model.connector_dtype), **kw)
    return model.generate(input_ids=ids, pixel_values=b["pixels"].to(model.dtype), attention_mask=mask,
                          do_sample=False, pad_token_id=PAD_ID, **kw)[:, ids.shape[1]:]


def prompts(size: str, n: int, device: str) -> dict:
    """Generation prompts: the training samples cut before their answers (all the same length)."""
    b = batch(size, n, device, seed=1)
    keep = int((b["labels"] == -100).long().cumprod(1).sum(1).min())
    return {"input_ids": b["input_ids"][:, :keep], "attention_mask": b["attention_mask"][:, :keep], "pixels": b["pixels"]}


# ---------------------------------------------------------------- measurements
def time_training(model, impl, b, steps, device) -> list[float]:
    if impl != REFERENCE:  # the lgemma variants share one model
        model.checkpoint_activations(mode_of(impl))
    opt = optimizer(model)
    train_step(model, impl, b, opt)  # warm-up: allocates AdamW state, first-call overheads
    times = []
    for _ in range(steps):
        sync(device)
        t0 = clock(device)
        train_step(model, impl, b, opt)
        sync(device)
        times.append(clock(device) - t0)
    del opt
    gc.collect()
    return times


@torch.no_grad()
def time_generation(models: dict, p: dict, n_tokens: int, device: str, repeats: int = 3) -> dict:
    """New tokens per second of each implementation, best of `repeats`, the implementations
    alternating so that a busy spell on a shared machine hits both."""
    best = {impl: float("inf") for impl in models}
    for impl, m in models.items():
        generate(m, impl, p, 2)  # warm-up
    for _ in range(repeats):
        for impl, m in models.items():
            sync(device)
            t0 = clock(device)
            out = generate(m, impl, p, n_tokens)
            sync(device)
            best[impl] = min(best[impl], clock(device) - t0)
            assert out.shape[1] == n_tokens
    return {impl: out.numel() / t for impl, t in best.items()}


def _status(field: str) -> int:
    """A byte count from /proc/self/status (Linux): VmRSS now, VmHWM the peak since the last reset."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status: CPU memory needs Linux")


def _reset_peak_rss() -> None:
    """Start VmHWM again from the current RSS (Linux >= 4.0). Not `ru_maxrss`: that one is inherited
    from the parent across fork + exec, so a child would report the parent's peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # then the peak covers the whole (fresh) process, warm-up step included


def memory_worker(size, impl, batch_size, device, dtype) -> dict:
    """Run in a fresh process: memory of one implementation's training steps (bytes)."""
    import open_clip  # noqa: F401  libraries count in the interpreter's baseline, not in the model's memory
    import transformers  # noqa: F401

    import lgemma.hf  # noqa: F401
    base = _status("VmRSS")
    model = build(size, impl, device, dtype)
    b = batch(size, batch_size, device)
    model.train()
    opt = optimizer(model)
    train_step(model, impl, b, opt)  # AdamW state now exists
    gc.collect()
    if device == "cuda":
        resident = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        resident = _status("VmRSS") - base
        _reset_peak_rss()
    train_step(model, impl, b, opt)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else _status("VmHWM") - base
    return {"peak": peak, "resident": resident, "step": peak - resident}


def measure_memory(args, device) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}
    out = {}
    for impl in impl_names(args.checkpointing):
        cmd = [sys.executable, __file__, "--worker", impl, "--size", args.size, "--batch", str(args.batch),
               "--device", device, "--dtype", args.dtype] + (["--threads", str(args.threads)] if args.threads else [])
        res = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if res.returncode != 0:
            raise RuntimeError(f"memory worker {impl} failed:\n{res.stderr[-3000:]}")
        out[impl] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


# ---------------------------------------------------------------- main
def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="full")
    ap.add_argument("--small", action="store_const", const="small", dest="size", help="same as --size small")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                    help="default: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--batch", type=int, default=None, help="training batch (default: 8 on cuda, 2 on cpu)")
    ap.add_argument("--gen-batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=None, help="timed training steps per implementation")
    ap.add_argument("--rounds", type=int, default=1, help="alternations lgemma/transformers (noise on shared machines)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice; "
                    "use 1 on a machine shared with other jobs, where waiting threads stall every op)")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--checkpointing", nargs="+", choices=["off", "selective", "full"], default=["off", "selective"],
                    help="lgemma's activation checkpointing modes to measure (default: off selective)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    device = args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    args.dtype = args.dtype or ("bfloat16" if device == "cuda" else "float32")
    dtype = getattr(torch, args.dtype)
    args.batch = args.batch or (8 if device == "cuda" else 2)
    if args.worker:
        print(json.dumps(memory_worker(args.size, args.worker, args.batch, device, dtype)))
        return {}
    s = SIZES[args.size]
    steps = args.steps or s["steps"]
    n_img = (s["vision"]["image"] // s["vision"]["patch"]) ** 2
    b = batch(args.size, args.batch, device)
    supervised = int((b["labels"][:, 1:] != -100).sum())
    print(f"config {args.size}: LM {s['lm']['num_hidden_layers']} layers x {s['lm']['hidden_size']}, vocab "
          f"{s['lm']['vocab_size']:,}; ViT {s['vision']['layers']} x {s['vision']['width']}, {n_img} image tokens; "
          f"batch {args.batch} x {b['input_ids'].shape[1]} tokens, {supervised} supervised; {device} {args.dtype}, "
          f"{torch.get_num_threads()} threads")

    impls = impl_names(args.checkpointing)
    ours = impls[0]  # the lgemma variants share one model (the mode is set before each use)
    models = {impl: build(args.size, impl, device, dtype).train() for impl in (ours, REFERENCE)}
    models.update({impl: models[ours] for impl in impls[1:-1]})
    with torch.no_grad():
        losses = {impl: float(loss_of(models[impl], impl, b)) for impl in (ours, REFERENCE)}
    tol = 1e-3 if dtype == torch.float32 else 3e-2
    if abs(losses[ours] - losses[REFERENCE]) > tol * max(1.0, abs(losses[ours])):
        raise AssertionError(f"the two models disagree before timing: losses {losses}")

    step_times = {impl: [] for impl in impls}
    for _ in range(args.rounds):
        for impl in impls:
            step_times[impl] += time_training(models[impl], impl, b, steps, device)
    p = prompts(args.size, args.gen_batch, device)
    # generation runs in eval mode, where checkpointing does nothing: one lgemma measurement serves all
    gen = time_generation({impl: models[impl].eval() for impl in (ours, REFERENCE)}, p, s["gen_tokens"], device)
    gen.update({impl: gen[ours] for impl in impls[1:-1]})
    del models
    gc.collect()

    res = {"config": args.size, "device": device, "dtype": args.dtype, "batch": args.batch,
           "threads": torch.get_num_threads(),
           "clock": "process CPU time" if device == "cpu" and torch.get_num_threads() == 1 else "wall time",
           "tokens_per_sample": int(b["input_ids"].shape[1]), "supervised_tokens": supervised,
           "losses": losses, "train_step_s": {k: min(v) for k, v in step_times.items()},
           "generate_tokens_per_s": gen, "gen_batch": args.gen_batch, "gen_tokens": s["gen_tokens"]}
    if device == "cpu":
        res["cpu"] = _cpu_name()
    elif device == "cuda":
        res["gpu"] = torch.cuda.get_device_name()
    mem = None if args.no_memory else measure_memory(args, device)
    res["vs_reference"] = {}
    for impl in impls[:-1]:
        ratios = {"train_speedup": res["train_step_s"][REFERENCE] / res["train_step_s"][impl],
                  "generate_speedup": gen[impl] / gen[REFERENCE]}
        if mem:
            ratios["peak_memory_ratio"] = mem[impl]["peak"] / mem[REFERENCE]["peak"]
            ratios["step_memory_ratio"] = mem[impl]["step"] / mem[REFERENCE]["step"]
        res["vs_reference"][impl] = ratios
    res.update(res["vs_reference"][ours])  # the first lgemma variant's ratios, also at the top level
    if mem:
        res["memory_bytes"] = mem
    report(res)
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    return res


def _cpu_name() -> str:
    from lgemma.training import cpu_name
    return f"{cpu_name()} ({os.cpu_count()} cores)"


def report(r: dict) -> None:
    """A table with one column per implementation; ratios are against the reference (transformers)."""
    t, g, v = r["train_step_s"], r["generate_tokens_per_s"], r["vs_reference"]
    impls = [*v, REFERENCE]
    w = max(14, *(len(i) + 2 for i in impls))
    row = lambda label, cells: print(f"{label:22}" + "".join(f"{c:>{w}}" for c in cells))  # noqa: E731
    print(f"\n{r['clock']}, {r.get('cpu') or r.get('gpu')}")
    row("", impls)
    row("train step s", [f"{t[i]:.3f}" for i in impls])
    row("  speed vs reference", [f"{v[i]['train_speedup']:.2f}x" for i in v] + [""])
    if "memory_bytes" in r:
        m = r["memory_bytes"]
        row("peak GiB", [f"{m[i]['peak'] / 2**30:.2f}" for i in impls])
        row("  of the reference", [f"{v[i]['peak_memory_ratio']:.2f}x" for i in v] + [""])
        row("step's own GiB", [f"{m[i]['step'] / 2**30:.2f}" for i in impls])
        row("  of the reference", [f"{v[i]['step_memory_ratio']:.2f}x" for i in v] + [""])
    row("generate tok/s", [f"{g[i]:.1f}" for i in impls])
    row("  vs reference", [f"{v[i]['generate_speedup']:.2f}x" for i in v] + [""])
    for impl, x in v.items():
        print(f"targets for {impl}: training >= 2x faster: {x['train_speedup'] >= 2}; peak memory <= 0.5x: "
              f"{x.get('peak_memory_ratio', float('nan')) <= 0.5}; generation >= 1x: {x['generate_speedup'] >= 1.0}")


if __name__ == "__main__":
    main()
