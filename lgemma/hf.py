"""transformers interop: lgemma <-> `LlavaForConditionalGeneration` (the layout of `Intel/llava-gemma-2b`).

    lgemma LlavaGemma                     transformers LlavaForConditionalGeneration
    vision.encoder (open_clip ViT)   <->  model.vision_tower (CLIPVisionModel; weights remapped)
    vision.encoder (CLIP / DINOv2)   <->  model.vision_tower (same module, same keys)
    connector.0 / connector.2        <->  model.multi_modal_projector.linear_1 / linear_2
    lm.model                         <->  model.language_model
    lm.lm_head                       <->  lm_head

Both sides compute the same thing: penultimate vision layer, CLS dropped (`"default"`), the
`mlp2x_gelu` projector, visual tokens put at the `<image>` ids of the embedded prompt. Gemma's
sqrt(hidden) scale lives inside transformers' embedding module, and both sides splice *after*
that lookup, so neither scales visual tokens (`tests/test_hf.py` checks it).

    model, tok = load_transformers("Intel/llava-gemma-2b")      # or a local folder
    save_transformers(model, tok, "export/")                     # -> LlavaForConditionalGeneration
                                                                 #    + AutoProcessor load it
Checkpoints are read and written as safetensors only.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from .language import END_TURN, IMAGE_TOKEN, prepare_tokenizer
from .model import LlavaGemma
from .vision import VisionTower, hf_clip_tower

# Gemma's turns, accepting both plain-string contents (lgemma, tokenizers) and transformers'
# multimodal content lists ([{"type": "image"}, {"type": "text", "text": ...}], processors).
LLAVA_GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else m['role']) + '\n' }}"
    "{% if m['content'] is string %}{{ m['content'] | trim }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}{{ '<image>\n' }}{% elif c['type'] == 'text' %}{{ c['text'] | trim }}{% endif %}"
    "{% endfor %}{% endif %}{{ '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")


# ---------------------------------------------------------------- open_clip ViT -> transformers CLIP
def open_clip_to_hf_clip(encoder: nn.Module) -> tuple[object, dict[str, torch.Tensor]]:
    """An open_clip `VisionTransformer` as (CLIPVisionConfig, CLIPVisionModel state dict).

    Same maths, other names: `conv1` -> `patch_embedding`, `ln_pre` -> `pre_layrnorm`, the fused
    `in_proj` [3D, D] split into `q_proj`, `k_proj`, `v_proj`, `c_fc`/`c_proj` -> `fc1`/`fc2`.
    Raises for open_clip options CLIP has no slot for (attention pooling, layer scale, ...)."""
    from open_clip.transformer import QuickGELU, VisionTransformer
    from transformers import CLIPVisionConfig
    if not isinstance(encoder, VisionTransformer):
        raise TypeError(f"expected an open_clip VisionTransformer, got {type(encoder).__name__}")
    blocks = encoder.transformer.resblocks
    b0 = blocks[0]
    unsupported = {
        "attention pooling": encoder.attn_pool is not None,
        "pooling other than the CLS token": encoder.pool_type != "tok",
        "no CLS token": getattr(encoder, "class_embedding", None) is None,
        "no ln_pre": not isinstance(encoder.ln_pre, nn.LayerNorm),
        "layer scale": not isinstance(b0.ls_1, nn.Identity),
        "scaled attention / cosine attention": not isinstance(b0.attn, nn.MultiheadAttention)
        or not isinstance(getattr(b0, "ln_attn", nn.Identity()), nn.Identity),
        "a non-GELU MLP": not isinstance(b0.mlp.gelu, (nn.GELU, QuickGELU)),
        "a conv patch embedding with bias": encoder.conv1.bias is not None,
    }
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise ValueError(f"this open_clip ViT uses {', '.join(bad)}: transformers' CLIPVisionModel cannot hold it, "
                         f"so it cannot be exported to the Llava layout")
    width = encoder.transformer.width
    act = "quick_gelu" if isinstance(b0.mlp.gelu, QuickGELU) else "gelu"
    if act == "gelu" and b0.mlp.gelu.approximate != "none":
        raise ValueError("open_clip ViT uses tanh-approximate GELU; export supports exact GELU or QuickGELU")
    config = CLIPVisionConfig(
        hidden_size=width, intermediate_size=b0.mlp.c_fc.out_features, num_hidden_layers=len(blocks),
        num_attention_heads=b0.attn.num_heads, image_size=encoder.image_size[0], patch_size=encoder.patch_size[0],
        num_channels=encoder.conv1.in_channels, hidden_act=act, layer_norm_eps=encoder.ln_pre.eps,
        projection_dim=encoder.proj.shape[1] if encoder.proj is not None else width)
    p = ""  # transformers 5 names CLIPVisionModel keys without the old `vision_model.` prefix
    sd = {p + "embeddings.class_embedding": encoder.class_embedding,
          p + "embeddings.patch_embedding.weight": encoder.conv1.weight,
          p + "embeddings.position_embedding.weight": encoder.positional_embedding,
          p + "pre_layrnorm.weight": encoder.ln_pre.weight, p + "pre_layrnorm.bias": encoder.ln_pre.bias,
          p + "post_layernorm.weight": encoder.ln_post.weight, p + "post_layernorm.bias": encoder.ln_post.bias}
    for i, blk in enumerate(blocks):
        q = f"{p}encoder.layers.{i}."
        for name, w in zip(("q_proj", "k_proj", "v_proj"), blk.attn.in_proj_weight.chunk(3)):
            sd[f"{q}self_attn.{name}.weight"] = w
        for name, b in zip(("q_proj", "k_proj", "v_proj"), blk.attn.in_proj_bias.chunk(3)):
            sd[f"{q}self_attn.{name}.bias"] = b
        pairs = {"self_attn.out_proj": blk.attn.out_proj, "layer_norm1": blk.ln_1, "layer_norm2": blk.ln_2,
                 "mlp.fc1": blk.mlp.c_fc, "mlp.fc2": blk.mlp.c_proj}
        for name, mod in pairs.items():
            sd[f"{q}{name}.weight"], sd[f"{q}{name}.bias"] = mod.weight, mod.bias
    return config, {k: v.detach().clone() for k, v in sd.items()}


def _vision_to_hf(tower: VisionTower) -> tuple[object, dict[str, torch.Tensor]]:
    """(vision_config, vision tower state dict in transformers' names)."""
    if tower.kind == "open_clip":
        return open_clip_to_hf_clip(tower.encoder)
    if tower.kind in ("hf_clip", "dinov2"):  # already transformers modules
        return tower.encoder.config, {k: v.detach().clone() for k, v in tower.encoder.state_dict().items()}
    raise ValueError(f"vision tower kind {tower.kind!r} cannot be exported to transformers' Llava layout")


def _hf_feature_layer(lgemma_layer: int, num_layers: int) -> int:
    """lgemma's block index (-2 = penultimate block) as an index into transformers' `hidden_states`
    (embedding output + one entry per block), written negative as LLaVA does: -2 stays -2."""
    return lgemma_layer % num_layers - num_layers


# ---------------------------------------------------------------- export
def llava_config(model: LlavaGemma, vision_config=None):
    """The `LlavaConfig` describing `model` (vision config, the LM's own config, image token)."""
    from transformers import LlavaConfig
    if not isinstance(model.connector, nn.Sequential) or len(model.connector) != 3:
        raise ValueError("transformers' Llava projector is `mlp2x_gelu` (Linear-GELU-Linear); this model's "
                         f"connector is {model.connector.__class__.__name__}: retrain with connector.kind=mlp2x_gelu")
    if getattr(model.lm.config, "final_logit_softcapping", None):
        warnings.warn("the LM caps its logits (Gemma 2); transformers' Llava does not apply the cap, so exported "
                      "logits differ (their argmax, hence greedy generation, does not)")
    vision_config = vision_config or _vision_to_hf(model.vision)[0]
    text_config = model.lm.config
    return LlavaConfig(
        vision_config=vision_config, text_config=text_config, image_token_index=model.image_token_id,
        image_seq_length=model.num_image_tokens, projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=_hf_feature_layer(model.vision.cfg.feature_layer, model.vision.num_layers),
        multimodal_projector_bias=True, tie_word_embeddings=bool(text_config.tie_word_embeddings),
        pad_token_id=text_config.pad_token_id)


def to_transformers(model: LlavaGemma):
    """A new `LlavaForConditionalGeneration` holding a copy of `model`'s weights (same dtype)."""
    from transformers import LlavaForConditionalGeneration
    vision_config, vision_sd = _vision_to_hf(model.vision)
    config = llava_config(model, vision_config)
    dtype = next(model.lm.parameters()).dtype
    hf = LlavaForConditionalGeneration(config).to(dtype)
    sd = {f"model.vision_tower.{k}": v for k, v in vision_sd.items()}
    for ours, theirs in ((0, "linear_1"), (2, "linear_2")):
        for p in ("weight", "bias"):
            sd[f"model.multi_modal_projector.{theirs}.{p}"] = getattr(model.connector[ours], p)
    sd.update({f"model.language_model.{k}": v for k, v in model.lm.model.state_dict().items()})
    sd["lm_head.weight"] = model.lm.lm_head.weight
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]  # buffers transformers rebuilds
    if missing or unexpected:
        raise RuntimeError(f"weight mapping to transformers' Llava is incomplete: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    hf.generation_config.pad_token_id = model.lm.config.pad_token_id
    return hf.eval()


def _processor(model: LlavaGemma, tokenizer):
    from transformers import LlavaImageProcessor, LlavaProcessor
    size = model.vision.image_size
    image_processor = LlavaImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}, do_pad=True,
        image_mean=list(model.vision.mean), image_std=list(model.vision.std))
    patch = size // model.vision.grid[0]
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=LLAVA_GEMMA_CHAT_TEMPLATE, image_token=IMAGE_TOKEN)


def save_transformers(model: LlavaGemma, tokenizer, folder: str | Path) -> Path:
    """Write `model` + `tokenizer` in transformers' Llava layout: config.json, model.safetensors,
    generation_config.json (stops at `<end_of_turn>`), tokenizer files and a LlavaProcessor
    (LLaVA-1.5 pad-to-square preprocessing, `<image>`, Gemma's chat template). Returns `folder`.

    Load it back with `LlavaForConditionalGeneration.from_pretrained(folder)` and
    `AutoProcessor.from_pretrained(folder)`, or with `load_transformers(folder)`."""
    import copy
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    hf = to_transformers(model)
    stop = [tokenizer.convert_tokens_to_ids(END_TURN), tokenizer.eos_token_id]
    hf.generation_config.eos_token_id = [t for t in stop if t is not None]
    hf.save_pretrained(folder, safe_serialization=True)
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = LLAVA_GEMMA_CHAT_TEMPLATE
    _processor(model, tokenizer).save_pretrained(folder)
    return folder


# ---------------------------------------------------------------- import
def from_transformers(hf, processor=None) -> LlavaGemma:
    """An lgemma `LlavaGemma` sharing the modules of a `LlavaForConditionalGeneration` (no copy).

    Supports what LLaVA-1.5 / LLaVA-Gemma use: a CLIP vision tower, one feature layer, the
    `"default"` strategy (CLS dropped), a GELU `mlp2x_gelu` projector with biases."""
    from transformers import AutoModelForCausalLM
    c = hf.config
    problems = []
    if c.vision_config.model_type != "clip_vision_model":
        problems.append(f"vision tower {c.vision_config.model_type!r} (lgemma imports CLIP towers)")
    if c.vision_feature_select_strategy != "default":
        problems.append(f"vision_feature_select_strategy={c.vision_feature_select_strategy!r} (lgemma drops CLS)")
    if not isinstance(c.vision_feature_layer, int):
        problems.append(f"several vision feature layers {c.vision_feature_layer}")
    if c.projector_hidden_act != "gelu" or not c.multimodal_projector_bias:
        problems.append(f"projector act {c.projector_hidden_act!r}, bias {c.multimodal_projector_bias}")
    if problems:
        raise ValueError("cannot import this Llava checkpoint into lgemma: " + "; ".join(problems))
    n_layers = c.vision_config.num_hidden_layers
    h = c.vision_feature_layer
    if not (-n_layers <= h <= -1 or 1 <= h <= n_layers):
        raise ValueError(f"vision_feature_layer={h} selects the embedding output; lgemma takes a block's output")
    feature_layer = h % (n_layers + 1) - (n_layers + 1)  # negative, counted over blocks as lgemma does
    if getattr(c.text_config, "final_logit_softcapping", None):
        warnings.warn("the LM caps its logits (Gemma 2): lgemma applies the cap, transformers' Llava does not, "
                      "so logits differ (their argmax, hence greedy generation, does not)")
    mean, std = _image_norm(processor)
    tower = hf_clip_tower(hf.model.vision_tower, feature_layer, mean, std)

    with torch.device("meta"):  # only the shell: its decoder and head are the Llava model's own modules
        lm = AutoModelForCausalLM.from_config(c.text_config)
    lm.model, lm.lm_head = hf.model.language_model, hf.lm_head
    lm.generation_config.pad_token_id = c.text_config.pad_token_id

    model = LlavaGemma(tower, lm, c.image_token_id, "mlp2x_gelu")
    proj = hf.model.multi_modal_projector
    model.connector = nn.Sequential(proj.linear_1, nn.GELU(), proj.linear_2)
    return model.eval()


def _image_norm(processor):
    """The processor's normalization if it has one, else OpenAI CLIP's."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    ip = getattr(processor, "image_processor", None)
    if ip is not None and getattr(ip, "image_mean", None) is not None:
        return tuple(ip.image_mean), tuple(ip.image_std)
    return OPENAI_DATASET_MEAN, OPENAI_DATASET_STD


def load_transformers(source: str | Path, dtype: torch.dtype = torch.float32) -> tuple[LlavaGemma, object]:
    """(LlavaGemma, tokenizer) from a `LlavaForConditionalGeneration` folder or hub id (safetensors),
    e.g. `Intel/llava-gemma-2b`. The tokenizer gets `<image>` checked and Gemma's chat template."""
    from transformers import AutoProcessor, AutoTokenizer, LlavaForConditionalGeneration
    source = str(source)
    try:
        hf = LlavaForConditionalGeneration.from_pretrained(source, dtype=dtype, use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except OSError as e:
        from .language import WeightsUnavailable
        raise WeightsUnavailable(
            f"could not load the Llava checkpoint {source!r} ({e}). Offline? On a machine with internet run "
            f"`huggingface-cli download {source}` and pass the downloaded folder.") from e
    try:
        processor = AutoProcessor.from_pretrained(source)
    except Exception:  # older checkpoints ship no processor config: CLIP's normalization then
        processor = None
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        raise ValueError(f"{source}: the tokenizer has no {IMAGE_TOKEN!r} token, the model's image token "
                         f"{hf.config.image_token_id} cannot be written in a prompt")
    if tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) != hf.config.image_token_id:
        raise ValueError(f"{source}: tokenizer maps {IMAGE_TOKEN} to {tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)} "
                         f"but the model expects image_token_index={hf.config.image_token_id}")
    if prepare_tokenizer(tokenizer):  # a pad token was missing: keep ids in range of the embedding
        raise ValueError(f"{source}: the tokenizer lacks a pad token; add one to the checkpoint's tokenizer")
    return from_transformers(hf, processor), tokenizer

