"""LLaVA-Gemma in one file: the whole idea of a LLaVA-style vision-language model.

    image -> VisionTower (frozen) -> patch features [B, N, Dv]
          -> Connector -> visual tokens [B, N, Dl]
    text  -> token ids with N `<image>` ids -> token embeddings [B, T, Dl]
    splice: embeddings at `<image>` positions := visual tokens
          -> Gemma decoder -> next-token loss on the assistant's reply only

Three details worth knowing:
- The LM head (Dl x vocab, 256K columns for Gemma) is applied only where a label exists.
  At paper scale most positions are image or prompt tokens, so this saves most of the
  head's time and memory.
- Training memory is mostly the activations the backward pass needs. `checkpoint_activations`
  keeps fewer of them and recomputes the rest during the backward pass (an option, off by default).
- Gemma multiplies *token* embeddings by sqrt(hidden_size) (in transformers it happens inside
  the embedding layer). Visual tokens are spliced in after that lookup, so they are not
  scaled: the connector must learn the right norm itself (see notebook 01).
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from .connector import build_connector
from .data.collate import IGNORE_INDEX

# What "selective" checkpointing keeps: the results of matrix products and attention (slow to
# recompute). Norms, activation functions, rotary embeddings and residual adds hold as much memory
# but are cheap to recompute.
_aten = torch.ops.aten
KEPT_OPS = {_aten.mm.default, _aten.addmm.default, _aten.bmm.default, *(
    getattr(_aten, name).default for name in ("_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention") if hasattr(_aten, name))}


def _keep_products(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in KEPT_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def splice_images(embeds: torch.Tensor, input_ids: torch.Tensor, image_token_id: int,
                  visual_tokens: torch.Tensor) -> torch.Tensor:
    """Put visual tokens [B_img, N, D] where `input_ids == image_token_id` in embeds [B, T, D].

    Samples are filled in order: the i-th sample holding image tokens gets visual_tokens[i].
    Raises if any sample's placeholder count differs from N.
    """
    mask = input_ids == image_token_id
    per_sample = mask.sum(1)
    counts = per_sample[per_sample > 0]
    n_img, n_tok = visual_tokens.shape[:2]
    if len(counts) != n_img or (counts != n_tok).any():
        raise ValueError(f"image placeholder mismatch: the batch has {len(counts)} sample(s) with image tokens "
                         f"(counts per sample {per_sample.tolist()}) but {n_img} image(s) of {n_tok} visual "
                         f"tokens each; every sample with an image needs exactly {n_tok} <image> ids")
    embeds = embeds.clone()
    embeds[mask] = visual_tokens.reshape(-1, visual_tokens.shape[-1]).to(embeds.dtype)
    return embeds


class LlavaGemma(nn.Module):
    """Vision tower + connector + Gemma. `images` may be pixels [B,3,S,S] or cached tower
    features [B,N,Dv] (the tower is frozen, so its output can be computed once)."""

    def __init__(self, vision: nn.Module, lm: nn.Module, image_token_id: int, connector: str = "mlp2x_gelu",
                 pool: int = 1):
        super().__init__()
        self.vision = vision
        self.connector = build_connector(connector, vision.hidden_size, lm.config.hidden_size, pool)
        self.pool = pool
        self.lm = lm
        self.image_token_id = image_token_id

    @property
    def grid(self) -> tuple[int, int]:
        """The visual tokens' grid (rows, columns): the tower's patch grid, or coarser if the connector pools."""
        return self.vision.grid[0] // self.pool, self.vision.grid[1] // self.pool

    @property
    def num_image_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    def checkpoint_activations(self, mode: str = "selective") -> None:
        """Trade compute for memory in training (each decoder layer of the LM, in train mode only):
        "full" keeps only each layer's input and recomputes the layer in the backward pass (about a
        third more compute); "selective" also keeps the matrix products' outputs and recomputes only
        the cheap element-wise ops; "off" keeps everything (the default)."""
        if mode == "off":
            if self.lm.is_activation_checkpointing:
                self.lm.activation_checkpointing_disable()
            return
        if mode not in ("selective", "full"):
            raise ValueError(f"unknown activation checkpointing {mode!r}; use 'off', 'selective' or 'full'")
        kwargs = {"use_reentrant": False}
        if mode == "selective":
            kwargs["context_fn"] = partial(create_selective_checkpoint_contexts, _keep_products)
        self.lm.activation_checkpointing_enable(kwargs)

    def visual_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Pixels [B,3,S,S] or tower features [B,N,Dv] -> visual tokens [B,N,Dl]."""
        features = self.vision(images) if images.dim() == 4 else images
        return self.connector(features.to(self.connector_dtype))

    @property
    def connector_dtype(self) -> torch.dtype:
        return next(self.connector.parameters()).dtype

    def embed(self, input_ids: torch.Tensor, images: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings [B,T,Dl] with the visual tokens spliced in."""
        embeds = self.lm.get_input_embeddings()(input_ids)
        if images is None:
            if (input_ids == self.image_token_id).any():
                raise ValueError("input_ids hold <image> tokens but no images were given")
            return embeds
        return splice_images(embeds, input_ids, self.image_token_id, self.visual_tokens(images))

    def forward(self, input_ids, attention_mask=None, labels=None, images=None, **lm_kwargs):
        """With `labels`: returns (loss, logits at supervised positions [M, vocab]).
        Without: returns full logits [B, T, vocab]."""
        embeds = self.embed(input_ids, images)
        if labels is not None:
            lm_kwargs.setdefault("use_cache", False)  # a loss needs no KV cache
        hidden = self.lm.model(inputs_embeds=embeds, attention_mask=attention_mask, **lm_kwargs).last_hidden_state
        if labels is None:
            return self._head(hidden)
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX              # position t predicts token t+1
        logits = self._head(hidden[:, :-1][keep])   # the LM head only where a label exists
        loss = F.cross_entropy(logits.float(), targets[keep])
        return loss, logits

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm.lm_head(hidden)
        cap = getattr(self.lm.config, "final_logit_softcapping", None)  # Gemma 2 / 3
        return torch.tanh(logits / cap) * cap if cap else logits

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, images: torch.Tensor | None = None,
                 max_new_tokens: int = 32, stop_token_ids=(), **kwargs):
        """Greedy decoding with the KV cache (transformers' `generate` on `inputs_embeds`).
        Prompts must be left-padded. Returns the new token ids [B, <=max_new_tokens]
        (or transformers' output object when `return_dict_in_generate=True`)."""
        embeds = self.embed(input_ids, images)
        pad = self.lm.config.pad_token_id if self.lm.config.pad_token_id is not None else 0
        return self.lm.generate(inputs_embeds=embeds, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                                do_sample=False, eos_token_id=list(stop_token_ids) or None, pad_token_id=pad,
                                **kwargs)
