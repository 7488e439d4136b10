"""The real Gemma 3 270M, offline: the bundled GGUF file is converted once to a safetensors
folder, and later loads come from that folder in seconds.

One module-scoped fixture does the (slow, ~1 minute) conversion once per test run: into the
machine's cache (`gguf_cache_dir()`) when that is still empty, so that the notebooks find it,
else into a temporary folder, so that the conversion itself is always tested."""
import shutil
import time

import pytest
import torch

from lgemma.config import LanguageConfig
from lgemma.language import END_TURN, IMAGE_TOKEN, START_TURN, gguf_cache_dir, load_language_model

NAME = "gemma3-270m"


@pytest.fixture(scope="module")
def two_loads(tmp_path_factory):
    default = gguf_cache_dir() / NAME
    folder = default if not (default / "converted.json").exists() else tmp_path_factory.mktemp("gguf") / NAME
    cfg = LanguageConfig(name=NAME)
    t0 = time.time()
    first = load_language_model(cfg, folder)
    t1 = time.time()
    second = load_language_model(cfg, folder)
    t2 = time.time()
    print(f"first load (converts) {t1 - t0:.1f} s, second load (cache) {t2 - t1:.1f} s")
    yield folder, first, second, t1 - t0, t2 - t1
    if folder != default:
        shutil.rmtree(folder)  # a 1 GB test copy


def test_gguf_converts_once_then_loads_from_the_cache_fast(two_loads):
    folder, (lm, tok), (lm2, tok2), first_s, second_s = two_loads
    assert (folder / "converted.json").exists() and (folder / "model.safetensors").exists()
    assert not list(folder.glob("*.gguf")) and not list(folder.parent.glob(f".{NAME}-*"))  # no leftovers
    assert second_s < 10, f"second load took {second_s:.1f} s (first, converting: {first_s:.1f} s)"
    # the real model: Gemma 3's class and sizes, dequantized to plain float32 weights
    assert type(lm).__name__ == "Gemma3ForCausalLM"
    c = lm.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == (640, 18, 4, 1)
    assert getattr(c, "quantization_config", None) is None and lm.lm_head.weight.dtype == torch.float32
    assert lm.lm_head.weight.data_ptr() == lm.get_input_embeddings().weight.data_ptr()  # tied, as Gemma
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.norm.weight"):
        assert torch.equal(lm.state_dict()[name], lm2.state_dict()[name])


def test_gguf_tokenizer_has_gemma_turns_and_an_image_token(two_loads):
    _, (lm, tok), (_, tok2), _, _ = two_loads
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    assert image_id == 262144 == tok2.convert_tokens_to_ids(IMAGE_TOKEN)  # appended to Gemma 3's 262,144
    assert lm.get_input_embeddings().weight.shape[0] == len(tok) == 262145
    ids = tok(f"{START_TURN}user\n{IMAGE_TOKEN}\nWhat color?{END_TURN}", add_special_tokens=False).input_ids
    assert ids[0] == tok.convert_tokens_to_ids(START_TURN) and ids[-1] == tok.convert_tokens_to_ids(END_TURN)
    assert image_id in ids and tok.pad_token == "<pad>" and tok.bos_token == "<bos>"
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt == "<bos><start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n"


def test_gguf_weights_are_a_pretrained_language_model(two_loads):
    """Dequantization went right: the LM predicts English far better than chance (ln 262145 = 12.5)."""
    _, (lm, tok), _, _, _ = two_loads
    text = "The sun rises in the east and sets in the west. Water freezes at zero degrees Celsius."
    ids = torch.tensor([tok(text).input_ids])
    with torch.no_grad():
        loss = lm.eval()(ids, labels=ids).loss.item()
    assert loss < 4.0, loss
