"""Language side: a checkpoint without <image> gets it; a saved tiny LM loads back the same."""
import pytest
import torch

from lgemma.config import LanguageConfig
from lgemma.language import IMAGE_TOKEN, WeightsUnavailable, load_language_model, prepare_tokenizer, tiny_gemma


def test_prepare_tokenizer_adds_image_token_and_pad(tokenizer):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator(["what color is it"] * 5, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    t = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                additional_special_tokens=["<start_of_turn>", "<end_of_turn>"])
    n = len(t)
    assert prepare_tokenizer(t) == 2 and len(t) == n + 2 and t.pad_token == "<pad>" and t.chat_template
    image_id = t.convert_tokens_to_ids(IMAGE_TOKEN)
    assert image_id in t("<start_of_turn>user\n<image>\nhi", add_special_tokens=False).input_ids
    assert t.convert_tokens_to_ids("<end_of_turn>") == 3       # existing specials untouched
    assert prepare_tokenizer(t) == 0                           # idempotent


def test_saved_tiny_lm_loads_back_identical(tokenizer, tmp_path):
    cfg = LanguageConfig(hidden_size=32, layers=1, heads=2, kv_heads=1, intermediate_size=64)
    lm = tiny_gemma(cfg, len(tokenizer))
    lm.save_pretrained(tmp_path), tokenizer.save_pretrained(tmp_path)
    lm2, tok2 = load_language_model(cfg, tmp_path)
    ids = torch.tensor([tokenizer("What color is the circle?").input_ids])
    with torch.no_grad():
        assert torch.equal(lm.eval()(ids).logits, lm2.eval()(ids).logits)
    assert tok2.convert_tokens_to_ids(IMAGE_TOKEN) == tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)


def test_missing_lm_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="pretrain-unimodal"):
        load_language_model(LanguageConfig(name="tiny"), tmp_path / "nope")
    with pytest.raises(WeightsUnavailable, match="Offline"):
        load_language_model(LanguageConfig(name=str(tmp_path / "not-a-model")))
