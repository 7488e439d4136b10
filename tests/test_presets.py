"""Paper-scale presets: LLaVA-1.5's hyperparameters, and every preset really trains.

No weights can be downloaded here, so each paper preset runs on random-init *stand-ins of the
same classes*, sizes shrunk: open_clip's `ViT-L-14-336-quickgelu` config with a small width and
a local weights file, transformers' `Dinov2Model` and `GemmaForCausalLM` saved as checkpoint
folders. Everything else is the preset itself: data kind `llava` (LLaVA-1.5 json files,
non-square images padded to square), connector, both stages, bf16, through `train_variant`.
Loading the real weights is the same code path (a hub id instead of a folder)."""
import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from lgemma import language, vision
from lgemma.config import LLAVA_INSTRUCT_RECORDS, LLAVA_PRETRAIN_RECORDS, PRESETS, LanguageConfig, get_preset
from lgemma.pipeline import build_model, load_variant, train_variant

PAPER = ["paper-2b-clip", "paper-2b-clip-noalign", "paper-7b-clip", "paper-2b-dinov2", "paper-7b-dinov2"]
CLIP = "ViT-L-14-336-quickgelu"


def test_the_paper_presets_exist():
    assert sorted(n for n in PRESETS if n.startswith("paper-")) == sorted(PAPER)


@pytest.mark.parametrize("name", PAPER)
def test_paper_preset_has_llava15_hyperparameters(name):
    c = get_preset(name)
    t, a, i = c.train, c.train.align, c.train.instruct
    per_step = t.devices * t.accumulate_grad_batches
    assert (a.lr, a.lm_lr, a.batch_size * per_step) == (1e-3, 0.0, 256)            # stage 1: connector only
    assert (i.lr, i.lm_lr, i.batch_size * per_step) == (2e-5, 2e-5, 128)           # stage 2: connector + LM
    assert (a.steps - 1) * 256 < LLAVA_PRETRAIN_RECORDS <= a.steps * 256            # one epoch of 558K
    assert (i.steps - 1) * 128 < LLAVA_INSTRUCT_RECORDS <= i.steps * 128            # one epoch of 665K
    assert a.warmup_ratio == i.warmup_ratio == 0.03 and i.lm_train == "full"
    assert t.precision == "bf16-mixed" and not t.cache_features and t.skip_align == name.endswith("-noalign")
    assert c.connector.kind == "mlp2x_gelu" and c.vision.feature_layer == -2 and c.vision.drop_cls
    d = c.data
    assert d.kind == "llava" and d.pad_to_square and d.caption_file == "blip_laion_cc_sbu_558k.json"
    assert d.instruct_file == "llava_v1_5_mix665k.json"
    assert c.language.name == ("google/gemma-7b-it" if "-7b-" in name else "google/gemma-2b-it")
    if "clip" in name:
        assert (c.vision.name, c.vision.pretrained) == (CLIP, "openai")
    else:
        assert c.vision.name == "dinov2:facebook/dinov2-large" and c.vision.image_size == 336


@pytest.fixture(scope="module")
def standins(tmp_path_factory, tokenizer):
    """Tiny random checkpoints of the paper's classes, and a small LLaVA-format data folder."""
    import open_clip.factory
    from transformers import Dinov2Config, Dinov2Model
    root = tmp_path_factory.mktemp("standins")
    lms = {}
    for hub, (heads, kv) in {"google/gemma-2b-it": (2, 1), "google/gemma-7b-it": (4, 4)}.items():  # MQA vs MHA
        folder = root / hub.split("/")[1]
        lm = language.tiny_gemma(LanguageConfig(hidden_size=32, layers=2, heads=heads, kv_heads=kv,
                                                intermediate_size=64), len(tokenizer))
        lm.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        lms[hub] = str(folder)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
                             image_size=56, patch_size=14)).save_pretrained(root / "dinov2-large")
    small = {"embed_dim": 32, "quick_gelu": True,
             "vision_cfg": {"image_size": 56, "layers": 3, "width": 32, "head_width": 16, "patch_size": 14},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    with pytest.MonkeyPatch.context() as mp:  # open_clip's config of that name, shrunk, while these tests run
        mp.setitem(open_clip.factory._MODEL_CONFIGS, CLIP, small)
        save_file(open_clip.create_model(CLIP).state_dict(), str(root / "clip.safetensors"))
        data = root / "llava"
        _llava_folder(data)
        yield {"lms": lms, "dinov2": str(root / "dinov2-large"), "clip": str(root / "clip.safetensors"),
               "data": str(data), "runs": str(root / "runs")}


def _llava_folder(root):
    """LLaVA-1.5's layout in miniature: pretrain-style and mix-style image paths, odd image sizes
    and modes, a multi-turn record and a text-only one (as ShareGPT's in the 665K mix)."""
    images = {"00000/000000001.jpg": ("RGB", (40, 24)), "00000/000000002.jpg": ("L", (20, 36)),
              "coco/train2017/000000000009.jpg": ("RGB", (64, 48)), "gqa/images/n1.jpg": ("RGB", (30, 30))}
    for rel, (mode, size) in images.items():
        (root / "images" / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new(mode, size, 200).save(root / "images" / rel)
    ask = lambda q, a: [{"from": "human", "value": q}, {"from": "gpt", "value": a}]  # noqa: E731
    captions = [{"id": str(k), "image": rel, "conversations": ask("<image>\nWrite a short caption.", "a red circle.")}
                for k, rel in enumerate(list(images)[:2] * 2)]
    instruct = [
        {"id": "coco-9", "image": "coco/train2017/000000000009.jpg",
         "conversations": ask("<image>\nWhat color is the circle?", "red") + ask("How many circles?", "2")},
        {"id": "gqa-1", "image": "gqa/images/n1.jpg", "conversations": ask("Is there a square?\n<image>", "no")},
        {"id": "sharegpt-1", "conversations": ask("Say hello.", "hello")},
        {"id": "coco-9b", "image": "coco/train2017/000000000009.jpg", "conversations": ask("<image>\nShape?", "circle")},
    ]
    (root / "blip_laion_cc_sbu_558k.json").write_text(json.dumps(captions))
    (root / "llava_v1_5_mix665k.json").write_text(json.dumps(instruct))


def standin_config(name, s):
    """The preset with its weights swapped for the stand-ins and its run shrunk to a few steps."""
    cfg = get_preset(name)
    if cfg.vision.name.startswith("dinov2:"):
        cfg.vision.name, cfg.vision.image_size = f"dinov2:{s['dinov2']}", 56
    else:
        cfg.vision.pretrained = s["clip"]
    cfg.language.name = s["lms"][cfg.language.name]
    cfg.data.root, cfg.runs_dir = s["data"], s["runs"]
    t = cfg.train
    t.devices, t.strategy, t.num_workers = 1, "auto", 0   # scale-out itself: tests/test_ddp.py
    for stage in (t.align, t.instruct):
        stage.steps, stage.batch_size = 2, 2
    return cfg


@pytest.mark.parametrize("name", PAPER)
def test_paper_preset_trains_on_standins(name, standins):
    cfg = standin_config(name, standins)
    metrics = train_variant(cfg, progress=False)
    model, tok, saved = load_variant(cfg.run_dir)
    assert model.num_image_tokens == 16 and model.vision.grid == (4, 4)  # 56 px / 14 px patches
    assert model.vision.kind == ("dinov2" if "dinov2" in name else "open_clip")
    run = cfg.run_dir
    assert (run / "align").exists() != name.endswith("-noalign") and "instruct" in metrics["train_seconds"]
    done = json.loads((run / "instruct" / "done.json").read_text())
    assert done["steps"] == 2 and done["precision"] == "bf16-mixed"
    trained = load_file(str(run / "model.safetensors"))
    assert any(k.startswith("connector.") for k in trained) and any(k.startswith("lm.") for k in trained)
    assert not any(k.startswith("vision.") for k in trained)                       # the tower stays frozen
    if not name.endswith("-noalign"):
        align = load_file(str(run / "align" / "trained.safetensors"))
        assert align and all(k.startswith("connector.") for k in align)           # stage 1: connector only
    assert torch.equal(trained["connector.0.weight"], model.connector[0].weight)   # reloads what was trained
    # pad to square with the tower's mean color: a 40x24 image comes out square
    x = model.vision.preprocess(Image.new("RGB", (40, 24), (255, 0, 0)))
    assert x.shape == (3, 56, 56) and not torch.allclose(x[:, 0, 28], x[:, 28, 28])


def test_real_weights_offline_are_clear_errors():
    """The real checkpoints go through the same loaders; offline they say what to do."""
    cfg = get_preset("paper-7b-dinov2")
    with pytest.raises(vision.WeightsUnavailable, match="Offline.*dinov2-large"):
        build_model(cfg)
    with pytest.raises(language.WeightsUnavailable, match="Offline.*huggingface-cli download google/gemma-7b-it"):
        language.load_language_model(cfg.language)


def test_gemma3_preset_trains_lora_adapters_only(tiny_model):
    """`gemma3-270m` (the real LM itself: tests/test_gguf.py) trains LoRA adapters in stage 2: the
    adapters and the connector train, every original LM weight stays frozen, the output is unchanged
    until training moves the adapters (B starts at zero)."""
    from lgemma.training import set_trainable, trained_state
    cfg = get_preset("gemma3-270m")
    assert cfg.language.name == "gemma3-270m" and cfg.vision.name == "tiny" and not cfg.train.skip_align
    assert cfg.train.instruct.lm_train == "lora" and cfg.train.precision == "bf16-mixed"
    model, tok = tiny_model
    ids = torch.tensor([tok("What color is the circle?").input_ids])
    before = model.lm(ids).logits
    language.add_lora(model.lm, cfg.train.instruct.lora_rank)
    assert torch.allclose(model.lm(ids).logits, before, atol=1e-6)
    set_trainable(model, "instruct", cfg.train.instruct)
    keys = trained_state(model)
    assert keys and all(k.startswith("connector.") or "lora_" in k for k in keys)
    assert any("lora_" in k for k in keys) and not any(k.startswith("vision.") for k in keys)
    set_trainable(model, "align", cfg.train.align)
    assert all(k.startswith("connector.") for k in trained_state(model))


def test_lora_without_adapters_is_a_clear_error(tiny_model):
    from lgemma.training import set_trainable
    model, _ = tiny_model
    with pytest.raises(ValueError, match="no LoRA adapters"):
        set_trainable(model, "instruct", get_preset("gemma3-270m").train.instruct)


def test_eval_subset_is_fixed_and_in_file_order(world):
    from lgemma.pipeline import eval_records, records
    cfg = get_preset("gemma3-270m")
    cfg.data.root, cfg.data.eval_max_questions = str(world), 10
    a, b = eval_records(cfg), eval_records(cfg)
    full = records(cfg, "heldout")
    assert a == b and len(a["heldout"]) == 10 and set(a) == set(cfg.data.eval_files)
    positions = [full.index(r) for r in a["heldout"]]
    assert positions == sorted(positions)
