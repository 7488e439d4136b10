"""transformers interop: export to and import from `LlavaForConditionalGeneration`, checked
against transformers' own implementation on tiny random configs (logits within 1e-4, identical
greedy generations), both directions."""
import numpy as np
import pytest
import torch
from PIL import Image

from lgemma.data.collate import build_prompt
from lgemma.hf import from_transformers, load_transformers, open_clip_to_hf_clip, save_transformers
from lgemma.language import END_TURN, IMAGE_TOKEN

QUESTIONS = ["<image>\nWhat color is the circle?", "<image>\nHow many objects are there?"]


def _spread(module, std=0.3, seed=1):
    """Random weights with a larger spread than the default init, so greedy generations of a random
    model vary from step to step instead of repeating one token (a weaker test)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def _left_padded(tok, n_image_tokens):
    prompts = [build_prompt(tok, q, n_image_tokens) for q in QUESTIONS]
    width = max(map(len, prompts))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def _check_equivalent(ours, theirs, tok, image_size):
    """Same logits (full sequence, left-padded batch) and same greedy generation with the KV cache."""
    ids, mask = _left_padded(tok, ours.num_image_tokens)
    pixels = torch.randn(len(QUESTIONS), 3, image_size, image_size)
    with torch.no_grad():
        a = ours(ids, mask, images=pixels)
        b = theirs(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits
    keep = mask.bool()
    assert (a[keep] - b[keep]).abs().max() < 1e-4
    stop = [tok.convert_tokens_to_ids(END_TURN), tok.eos_token_id]
    scores = dict(return_dict_in_generate=True, output_scores=True)
    mine = ours.generate(ids, mask, pixels, max_new_tokens=10, stop_token_ids=stop, **scores)
    ref = theirs.generate(input_ids=ids, pixel_values=pixels, attention_mask=mask, max_new_tokens=10,
                          do_sample=False, eos_token_id=stop, pad_token_id=tok.pad_token_id, **scores)
    assert mine.sequences.tolist() == ref.sequences[:, ids.shape[1]:].tolist()
    assert all((x - y).abs().max() < 1e-4 for x, y in zip(mine.scores, ref.scores))  # every cached step
    assert len(set(mine.sequences[0].tolist())) > 1  # not a degenerate one-token loop


def test_open_clip_vit_maps_onto_transformers_clip(tiny_model):
    from transformers import CLIPVisionModel
    model, _ = tiny_model
    config, state = open_clip_to_hf_clip(model.vision.encoder)
    clip = CLIPVisionModel(config).eval()
    clip.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = clip(x, output_hidden_states=True).hidden_states[-2][:, 1:]  # Llava's "default" choice
    assert (model.vision(x) - ref).abs().max() < 1e-5


def test_export_loads_in_transformers_and_matches(tiny_model, tmp_path):
    """lgemma (open_clip tower, tiny Gemma) -> folder -> transformers' Llava + AutoProcessor."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration
    model, tok = tiny_model
    _spread(model.lm)
    model.eval()
    folder = save_transformers(model, tok, tmp_path / "export")
    assert (folder / "model.safetensors").exists() and not list(folder.glob("*.bin"))
    theirs = LlavaForConditionalGeneration.from_pretrained(folder).eval()
    _check_equivalent(model, theirs, tok, 64)

    # the processor builds the same prompt ids and (up to resampling) the same pixels
    processor = AutoProcessor.from_pretrained(folder)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is the circle?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    image = Image.fromarray((np.random.default_rng(0).random((64, 48, 3)) * 255).astype("uint8"))
    inputs = processor(images=image, text=text, return_tensors="pt")
    assert inputs["input_ids"][0].tolist() == build_prompt(tok, QUESTIONS[0], model.num_image_tokens)
    assert (inputs["pixel_values"][0] - model.vision.preprocess(image)).abs().max() < 0.05

    # ... and lgemma reads its own export back (through the transformers CLIP tower kind)
    back, tok2 = load_transformers(folder)
    assert back.vision.kind == "hf_clip" and tok2.convert_tokens_to_ids(IMAGE_TOKEN) == model.image_token_id
    ids, mask = _left_padded(tok, model.num_image_tokens)
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert (back(ids, mask, images=pixels) - model(ids, mask, images=pixels))[mask.bool()].abs().max() < 1e-4


def _hf_llava(tok, text: str):
    """A random transformers Llava in the llava-gemma layout (CLIP tower, Gemma or Gemma 3 LM)."""
    from transformers import CLIPVisionConfig, Gemma3TextConfig, GemmaConfig, LlavaConfig, LlavaForConditionalGeneration
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                              image_size=48, patch_size=8, projection_dim=32)  # quick_gelu, as OpenAI's CLIP
    common = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, head_dim=16, pad_token_id=tok.pad_token_id,
                  eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, tie_word_embeddings=True)
    text_config = (GemmaConfig(**common) if text == "gemma"
                   else Gemma3TextConfig(**common, sliding_window=16, layer_types=["sliding_attention", "full_attention"]))
    config = LlavaConfig(vision_config=vision, text_config=text_config, image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN),
                         image_seq_length=36, vision_feature_layer=-2, vision_feature_select_strategy="default")
    torch.manual_seed(0)
    hf = LlavaForConditionalGeneration(config)
    _spread(hf.model.language_model, 0.3 if text == "gemma" else 0.05)  # Gemma 3 saturates sooner
    return hf.eval()


@pytest.mark.parametrize("text", ["gemma", "gemma3"])
def test_import_matches_transformers(tokenizer, tmp_path, text):
    """transformers' Llava (saved as a folder, as Intel/llava-gemma-2b is) -> lgemma."""
    from transformers import LlavaForConditionalGeneration
    theirs = _hf_llava(tokenizer, text)
    theirs.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    ours, tok = load_transformers(tmp_path)
    assert ours.num_image_tokens == 36 and ours.vision.kind == "hf_clip"
    _check_equivalent(ours, LlavaForConditionalGeneration.from_pretrained(tmp_path).eval(), tok, 48)


def test_visual_tokens_are_spliced_unscaled_on_both_sides(tokenizer):
    """Gemma scales *token* embeddings by sqrt(hidden) inside transformers' embedding module; both
    lgemma and transformers' Llava put the projected image features in after that lookup, unscaled."""
    theirs = _hf_llava(tokenizer, "gemma")
    ours = from_transformers(theirs)
    ids, mask = _left_padded(tokenizer, ours.num_image_tokens)
    pixels = torch.randn(2, 3, 48, 48)
    seen = {}
    hook = theirs.model.language_model.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.update(embeds=kwargs["inputs_embeds"]), with_kwargs=True)
    with torch.no_grad():
        theirs(input_ids=ids, pixel_values=pixels, attention_mask=mask)
        mine = ours.embed(ids, pixels)
        visual = ours.visual_tokens(pixels)
    hook.remove()
    image = ids == ours.image_token_id
    assert torch.allclose(seen["embeds"], mine, atol=1e-6)
    assert torch.allclose(mine[image], visual.reshape(-1, visual.shape[-1]))            # unscaled
    table = theirs.get_input_embeddings().weight
    scale = theirs.config.text_config.hidden_size ** 0.5
    assert torch.allclose(mine[~image], table[ids[~image]] * scale, atol=1e-5)           # text: scaled


def test_export_refuses_what_llava_cannot_hold(tiny_model, tmp_path):
    from lgemma.connector import build_connector
    model, tok = tiny_model
    model.connector = build_connector("linear", model.vision.hidden_size, model.lm.config.hidden_size)
    with pytest.raises(ValueError, match="mlp2x_gelu"):
        save_transformers(model, tok, tmp_path)


def test_dinov2_tower_exports_too(tokenizer, tmp_path):
    """transformers' Llava takes any vision model whose CLS comes first: lgemma's DINOv2 kind exports."""
    from transformers import Dinov2Config, Dinov2Model, LlavaForConditionalGeneration

    from lgemma.config import VisionConfig
    from lgemma.language import tiny_gemma
    from lgemma.model import LlavaGemma
    from lgemma.vision import VisionTower
    from tests.conftest import tiny_cfg
    torch.manual_seed(0)
    encoder = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                       intermediate_size=64, image_size=32, patch_size=8))
    tower = VisionTower(VisionConfig(name="dinov2-random:tiny", image_size=32), encoder, "dinov2",
                        (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 32)
    model = LlavaGemma(tower, tiny_gemma(tiny_cfg().language, len(tokenizer)),
                       tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)).eval()
    _spread(model.lm)
    folder = save_transformers(model, tokenizer, tmp_path)
    _check_equivalent(model, LlavaForConditionalGeneration.from_pretrained(folder).eval(), tokenizer, 32)


def test_hf_clip_tower_builds_from_a_folder(tmp_path):
    """`vision.name: hf-clip:<folder>` (e.g. openai/clip-vit-large-patch14-336, downloaded)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from lgemma.config import VisionConfig
    from lgemma.vision import build_vision_tower
    clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                            num_attention_heads=2, image_size=48, patch_size=8)).eval()
    clip.save_pretrained(tmp_path)
    tower = build_vision_tower(VisionConfig(name=f"hf-clip:{tmp_path}"))
    assert tower.kind == "hf_clip" and tower.grid == (6, 6) and tower.hidden_size == 32
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        assert torch.allclose(tower(x), clip(x, output_hidden_states=True).hidden_states[-2][:, 1:], atol=1e-6)
