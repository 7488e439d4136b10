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


def test_tiny_lm_activation_is_built_saved_and_keyed(tokenizer, tmp_path):
    """`language.activation` reaches the MLP and the saved config; "gelu" (which transformers' Gemma would
    silently read as its tanh approximation) is refused; the stage-0 cache key changes with the activation
    but, at Gemma's default (the presets'), stays what it was before the field."""
    import torch.nn.functional as F
    from lgemma.config import get_preset
    from lgemma.pipeline import stage0_dirs
    cfg = LanguageConfig(hidden_size=32, layers=1, heads=2, kv_heads=1, intermediate_size=64, activation="silu")
    lm = tiny_gemma(cfg, len(tokenizer))
    x = torch.linspace(-4, 4, 101)
    assert torch.equal(lm.model.layers[0].mlp.act_fn(x), F.silu(x))
    gemma = tiny_gemma(LanguageConfig(hidden_size=32, layers=1, heads=2, intermediate_size=64), len(tokenizer))
    assert torch.equal(gemma.model.layers[0].mlp.act_fn(x), F.gelu(x, approximate="tanh"))
    lm.save_pretrained(tmp_path), tokenizer.save_pretrained(tmp_path)
    assert load_language_model(cfg, tmp_path)[0].model.layers[0].mlp.act_fn(x).equal(F.silu(x))
    with pytest.raises(ValueError, match="tanh"):
        tiny_gemma(LanguageConfig(hidden_size=32, layers=1, heads=2, intermediate_size=64, activation="gelu"), 50)
    from lgemma.ablation import Grid, cell_config
    tiny = get_preset("tiny")
    assert tiny.language.activation == get_preset("tiny-lmsmall").language.activation == "gelu_pytorch_tanh"
    grid = Grid()  # the paper's LM-size axis: only the size may differ
    assert {cell_config(grid, c).language.activation for c in grid.cells()} == {"gelu_pytorch_tanh"}
    with_default = stage0_dirs(tiny)[1]
    tiny.language.activation = "silu"
    key = stage0_dirs(tiny)[1]
    tiny.language.activation = "gelu_pytorch_tanh"
    del tiny.language.activation                  # a config from before the field existed
    assert stage0_dirs(tiny)[1] == with_default != key


def test_eager_float32_attention_is_eager_in_float32(tokenizer):
    """`language.attention: eager_float32`: in float32 exactly transformers' eager (padding mask included);
    under bf16 autocast its attention probabilities are nearer the float32 ones than plain eager's, whose scores
    autocast computes in bfloat16."""
    cfg = LanguageConfig(hidden_size=32, layers=2, heads=2, kv_heads=1, intermediate_size=64, attention="eager")
    torch.manual_seed(0)
    lm = tiny_gemma(cfg, len(tokenizer)).eval()
    ids, mask = torch.randint(8, len(tokenizer), (2, 9)), torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    with torch.no_grad():
        eager = lm(ids, attention_mask=mask, output_attentions=True)
        lm.set_attn_implementation("eager_float32")
        ours = lm(ids, attention_mask=mask, output_attentions=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = lm(ids, attention_mask=mask, output_attentions=True)
        lm.set_attn_implementation("eager")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            plain = lm(ids, attention_mask=mask, output_attentions=True)
    assert torch.equal(eager.logits, ours.logits)
    assert (mixed.attentions[0] - ours.attentions[0]).abs().max() < (plain.attentions[0].float() - ours.attentions[0]).abs().max()


def test_missing_lm_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="pretrain-unimodal"):
        load_language_model(LanguageConfig(name="tiny"), tmp_path / "nope")
    with pytest.raises(WeightsUnavailable, match="Offline"):
        load_language_model(LanguageConfig(name=str(tmp_path / "not-a-model")))
