"""The connector: vision features [B, N, Dv] -> visual tokens [B, N, Dl] in the LM's space.

This is the only part LLaVA trains in stage 1. LLaVA-1 used a single linear layer;
LLaVA-1.5 (and LLaVA-Gemma) use `mlp2x_gelu`: Linear -> GELU -> Linear, token by token.

`conv_mlp` is `mlp2x_gelu` whose first layer reads each patch's 3x3 neighbourhood on the
patch grid (a 3x3 convolution) instead of the patch alone, as the convolutional projectors
of MobileVLM (LDP) and Honeybee (C-Abstractor) do. It keeps one visual token per patch, or with
`pool=2` one per 2x2 patches (average pooling after the convolution, as LDP's downsampling): 4x
fewer visual tokens, so the LM's steps are shorter.
"""
import math

from torch import nn

CONNECTORS = ("linear", "mlp2x_gelu", "conv_mlp")


class ConvMLP(nn.Module):
    """3x3 convolution over the patch grid -> GELU -> (pool x pool average) -> Linear.
    [B, N, Dv] -> [B, N / pool^2, Dl]. Needs a square grid of patches whose side `pool` divides."""

    def __init__(self, vision_dim: int, lm_dim: int, pool: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(vision_dim, lm_dim, kernel_size=3, padding=1)
        self.act = nn.GELU()
        self.pool = nn.AvgPool2d(pool) if pool > 1 else nn.Identity()
        self.proj = nn.Linear(lm_dim, lm_dim)

    def forward(self, x):
        b, n, d = x.shape
        side = math.isqrt(n)
        k = getattr(self.pool, "kernel_size", 1)
        if side * side != n or side % k:
            raise ValueError(f"conv_mlp needs a square grid of patch features whose side connector.pool={k} "
                             f"divides, got {n} per image: use connector.kind=mlp2x_gelu for this tower")
        grid = x.transpose(1, 2).reshape(b, d, side, side)        # [B, Dv, side, side], row-major as the patches
        y = self.pool(self.act(self.conv(grid)))                  # [B, Dl, side / pool, side / pool]
        return self.proj(y.flatten(2).transpose(1, 2))            # [B, N / pool^2, Dl], same row-major order


def output_layer(connector: nn.Module) -> nn.Linear:
    """The connector's last linear layer (whose weight and bias set the visual tokens' scale)."""
    if isinstance(connector, nn.Linear):
        return connector
    return connector.proj if isinstance(connector, ConvMLP) else connector[-1]


def build_connector(kind: str, vision_dim: int, lm_dim: int, pool: int = 1) -> nn.Module:
    """`linear` or `mlp2x_gelu` (names as in LLaVA's `mm_projector_type`), or `conv_mlp` (with
    `pool` > 1: one visual token per pool x pool patches)."""
    if pool != 1 and kind != "conv_mlp":
        raise ValueError(f"connector.pool={pool} needs connector.kind=conv_mlp (got {kind!r}): "
                         f"LLaVA's {kind} keeps one token per patch")
    if kind == "linear":
        return nn.Linear(vision_dim, lm_dim)
    if kind == "mlp2x_gelu":
        return nn.Sequential(nn.Linear(vision_dim, lm_dim), nn.GELU(), nn.Linear(lm_dim, lm_dim))
    if kind == "conv_mlp":
        return ConvMLP(vision_dim, lm_dim, pool)
    raise KeyError(f"unknown connector {kind!r}; known: {', '.join(CONNECTORS)}")
