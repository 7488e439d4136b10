"""The language model and its tokenizer.

- `tiny` / `small`: transformers' Gemma architecture at toy size, with a byte-level BPE
  tokenizer trained on ShapesWorld text (stage 0 trains both).
- a hub id or a local folder of a Gemma / Gemma 2 / Gemma 3 checkpoint.

Every tokenizer gets Gemma's turn format as its chat template and an `<image>` special
token (added and the embedding resized when a real checkpoint lacks it, as the released
`Intel/llava-gemma-2b` did with id 256000).
"""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GemmaConfig, GemmaForCausalLM, PreTrainedTokenizerFast

from .config import LanguageConfig

IMAGE_TOKEN = "<image>"
START_TURN, END_TURN = "<start_of_turn>", "<end_of_turn>"
TINY_LMS = ("tiny", "small")
SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", START_TURN, END_TURN, IMAGE_TOKEN]

# Gemma's chat template (no system turn; `assistant` is called `model`).
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else m['role']) + '\n'"
    " + m['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")


class WeightsUnavailable(RuntimeError):
    """A language model could not be loaded (offline, or a missing folder)."""


def train_tokenizer(texts, vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on `texts` (an iterable of str): decoding is exact, like Gemma's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>",
                                   additional_special_tokens=[START_TURN, END_TURN, IMAGE_TOKEN])
    fast.chat_template = GEMMA_CHAT_TEMPLATE
    return fast


def prepare_tokenizer(tokenizer) -> int:
    """Make sure `tokenizer` has `<image>`, a pad token and a chat template; return how many
    tokens were added (the caller resizes the embedding by that much)."""
    added = 0
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        added += tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]},
                                              replace_extra_special_tokens=False)
    if tokenizer.pad_token is None:
        added += tokenizer.add_special_tokens({"pad_token": "<pad>"})
    if not tokenizer.chat_template:
        tokenizer.chat_template = GEMMA_CHAT_TEMPLATE
    for t in (START_TURN, END_TURN):
        if t not in tokenizer.get_vocab():
            raise ValueError(f"tokenizer lacks Gemma's {t!r} token: lgemma expects a Gemma tokenizer")
    return added


def tiny_gemma(cfg: LanguageConfig, vocab_size: int) -> GemmaForCausalLM:
    """A from-scratch Gemma (same class as gemma-2b) at toy size."""
    hf = GemmaConfig(vocab_size=vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                     num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                     num_key_value_heads=cfg.kv_heads, head_dim=cfg.hidden_size // cfg.heads,
                     max_position_embeddings=cfg.max_position_embeddings, pad_token_id=0, eos_token_id=1,
                     bos_token_id=2, tie_word_embeddings=True)
    return GemmaForCausalLM(hf)


def load_language_model(cfg: LanguageConfig, folder: str | Path | None = None, dtype=torch.float32):
    """(model, tokenizer) for `cfg.name`.

    `tiny`/`small` load from `folder` (the stage-0 output). Otherwise `cfg.name` is a hub id
    or a local folder with a transformers checkpoint (e.g. `google/gemma-2b-it`).
    """
    source = str(folder) if cfg.name in TINY_LMS else cfg.name
    if cfg.name in TINY_LMS and (folder is None or not Path(folder).exists()):
        raise FileNotFoundError(f"tiny LM {cfg.name!r} has no stage-0 folder at {folder}: run "
                                f"`lgemma pretrain-unimodal` first")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except OSError as e:
        raise WeightsUnavailable(
            f"could not load language model {source!r} ({e}). Offline? On a machine with internet run "
            f"`huggingface-cli download {source}` (Gemma needs an accepted licence and a token), then set "
            f"language.name to the downloaded folder.") from e
    added = prepare_tokenizer(tokenizer)
    if added:
        model.resize_token_embeddings(len(tokenizer))
    return model, tokenizer
