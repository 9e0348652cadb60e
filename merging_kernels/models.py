"""Small reference models for merging experiments, built from standard torch layers only.

Their permutation specs are in :mod:`merging_kernels.permutation_spec`
(:func:`~merging_kernels.permutation_spec.spec_for`). Sized for 8x8 inputs
(scikit-learn's digits) so that a model trains on a CPU in seconds.

* :class:`MLP` -- Linear/ReLU stack;
* :class:`ResNet20` -- CIFAR-style ResNet-20 (3 stages x 3 basic blocks, BatchNorm,
  1x1-conv shortcut where a stage changes width/stride), width-scalable;
* :class:`ViT` -- pre-LayerNorm vision transformer with explicit q/k/v/out
  ``nn.Linear`` projections (not ``nn.MultiheadAttention``, so that heads can be permuted).
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ._validation import check_int, check_real

__all__ = ["MLP", "ResNet20", "ViT"]


class InputShapeError(ValueError, RuntimeError):
    """A forward input of the wrong shape. Also a RuntimeError, what torch raised here before these checks, so
    that callers that catch a model's RuntimeError (mudsc_merge names the calibration batch) still do."""


def _check_input(x, name: str = "x") -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


class MLP(nn.Module):
    """``in_features -> hidden[0] -> ... -> out_features`` with ReLU between; inputs are flattened."""

    def __init__(self, in_features: int, hidden: Sequence[int], out_features: int):
        super().__init__()
        in_features = check_int(in_features, "in_features", low=1)
        out_features = check_int(out_features, "out_features", low=1)
        if isinstance(hidden, (str, bytes)) or not isinstance(hidden, Iterable):
            raise TypeError(f"hidden must be a sequence of layer widths (ints), got {type(hidden).__name__}")
        hidden = [check_int(h, f"hidden[{i}]", low=1) for i, h in enumerate(hidden)]
        sizes = [in_features, *hidden, out_features]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.acts = nn.ModuleList(nn.ReLU() for _ in hidden)

    def forward(self, x):
        _check_input(x)
        n = self.layers[0].in_features  # read from the layer: a model unpickled whole skips __init__
        if x.dim() < 2 or x.shape[1:].numel() != n:  # batch first; the rest is flattened
            raise InputShapeError(f"x must be (B, {n}) or (B, ...) with {n} features per sample, got shape "
                                  f"{tuple(x.shape)}")
        x = x.flatten(1)
        for layer, act in zip(self.layers[:-1], self.acts):
            x = act(layer(x))
        return self.layers[-1](x)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.shortcut is None else self.shortcut(x)))


class ResNet20(nn.Module):
    """CIFAR-style ResNet-20: a 3x3 stem, 3 stages of 3 basic blocks with widths
    (16, 32, 64) x ``width_multiplier`` (each at least 1), strides 1/2/2, global average pooling, a Linear
    classifier. On 8x8 digits the stages see 8x8, 4x4 and 2x2 maps.

    Input: (B, in_channels, H, W), (B, H, W) when ``in_channels`` is 1, or (B, in_channels * S * S), flattened
    square images."""

    def __init__(self, width_multiplier: float = 1.0, num_classes: int = 10, in_channels: int = 1,
                 blocks_per_stage: int = 3):
        super().__init__()
        width_multiplier = check_real(width_multiplier, "width_multiplier", low=0, low_open=True)
        num_classes = check_int(num_classes, "num_classes", low=1)
        in_channels = check_int(in_channels, "in_channels", low=1)
        # spec_for needs a first block per stage (its shortcut carries the stage's width change)
        blocks_per_stage = check_int(blocks_per_stage, "blocks_per_stage", low=1)
        widths = [max(1, int(round(w * width_multiplier))) for w in (16, 32, 64)]
        self.stem = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.stem_bn = nn.BatchNorm2d(widths[0])
        stages, cin = [], widths[0]
        for s, cout in enumerate(widths):
            blocks = []
            for b in range(blocks_per_stage):
                blocks.append(BasicBlock(cin, cout, 2 if (s > 0 and b == 0) else 1))
                cin = cout
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[-1], num_classes)

    def forward(self, x):
        _check_input(x)
        c, shape = self.stem.in_channels, x.shape  # read from the layer: a model unpickled whole skips __init__
        if x.dim() == 2:  # flattened square images; one image read as several smaller ones would run silently
            side = math.isqrt(shape[1] // c)
            if side < 1 or c * side * side != shape[1]:
                raise self._shape_error(shape)
            x = x.reshape(shape[0], c, side, side)
        elif x.dim() == 3 and c == 1:
            x = x.unsqueeze(1)
        elif x.dim() != 4 or shape[1] != c:
            raise self._shape_error(shape)
        if x.shape[-1] < 1 or x.shape[-2] < 1:
            raise self._shape_error(shape)
        x = F.relu(self.stem_bn(self.stem(x)))
        for stage in self.stages:
            x = stage(x)
        return self.fc(self.pool(x).flatten(1))

    def _shape_error(self, shape) -> ValueError:
        c = self.stem.in_channels
        flat = "S*S" if c == 1 else f"{c}*S*S"
        layouts = f"(B, {c}, H, W){', (B, H, W)' if c == 1 else ''} or (B, {flat}) (flattened square images)"
        return InputShapeError(f"x must be {layouts}, got shape {tuple(shape)}")


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be a multiple of heads ({heads})")
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x):
        b, t, d = x.shape
        h = self.heads

        def split(z):
            return z.reshape(b, t, h, d // h).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // h), dim=-1)
        return self.out((att @ v).transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_dim: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.ln2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, dim)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class ViT(nn.Module):
    """Pre-LN ViT: linear patch embedding, class token, learned position embedding, ``depth`` blocks,
    final LayerNorm, Linear head on the class token.

    Input: (B, channels, image_size, image_size), (B, image_size, image_size) when ``channels`` is 1, or
    (B, channels * image_size**2), flattened."""

    def __init__(self, image_size: int = 8, patch_size: int = 2, dim: int = 32, depth: int = 2, heads: int = 4,
                 mlp_dim: int = 64, num_classes: int = 10, channels: int = 1):
        super().__init__()
        image_size = check_int(image_size, "image_size", low=1)
        patch_size = check_int(patch_size, "patch_size", low=1)
        dim = check_int(dim, "dim", low=1)
        depth = check_int(depth, "depth", low=0)  # no blocks: patch embedding, norm and head only
        heads = check_int(heads, "heads", low=1)
        mlp_dim = check_int(mlp_dim, "mlp_dim", low=1)
        num_classes = check_int(num_classes, "num_classes", low=1)
        channels = check_int(channels, "channels", low=1)
        if image_size % patch_size:
            raise ValueError(f"image_size ({image_size}) must be a multiple of patch_size ({patch_size})")
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be a multiple of heads ({heads})")
        self.image_size, self.patch_size, self.channels = image_size, patch_size, channels
        self.dim, self.heads = dim, heads
        tokens = (image_size // patch_size) ** 2
        self.patch_embed = nn.Linear(channels * patch_size * patch_size, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_dim) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        p, s, c = self.patch_size, self.image_size, self.channels
        _check_input(x)
        rest = x.shape[1:]  # any other layout with c*s*s entries per sample would be cut into wrong patches
        if not (rest == (c, s, s) or rest == (c * s * s,) or (c == 1 and rest == (s, s))):
            layouts = f"(B, {c}, {s}, {s}){f', (B, {s}, {s})' if c == 1 else ''} or (B, {c * s * s})"
            raise InputShapeError(f"x must be {layouts}, got shape {tuple(x.shape)}")
        x = x.reshape(x.shape[0], c, s // p, p, s // p, p).permute(0, 2, 4, 1, 3, 5).reshape(x.shape[0], -1, c * p * p)
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])
