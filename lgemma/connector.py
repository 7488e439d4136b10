"""The connector: vision features [B, N, Dv] -> visual tokens [B, N, Dl] in the LM's space.

This is the only part LLaVA trains in stage 1. LLaVA-1 used a single linear layer;
LLaVA-1.5 (and LLaVA-Gemma) use `mlp2x_gelu`: Linear -> GELU -> Linear.
"""
from torch import nn

CONNECTORS = ("linear", "mlp2x_gelu")


def build_connector(kind: str, vision_dim: int, lm_dim: int) -> nn.Module:
    """`linear` or `mlp2x_gelu` (names as in LLaVA's `mm_projector_type`)."""
    if kind == "linear":
        return nn.Linear(vision_dim, lm_dim)
    if kind == "mlp2x_gelu":
        return nn.Sequential(nn.Linear(vision_dim, lm_dim), nn.GELU(), nn.Linear(lm_dim, lm_dim))
    raise KeyError(f"unknown connector {kind!r}; known: {', '.join(CONNECTORS)}")
